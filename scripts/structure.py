#!/usr/bin/env python3
"""keyferry's structure check, run by scripts/test.sh from the repository root.

For every crate (a directory with Cargo.toml and src/): the import graph
between its modules (`use crate::a::...` and `crate::a::` paths outside
comments and test modules) must have no circle, and no source file may have
more than LIMIT lines of code before its `#[cfg(test)]` block (blank lines and
comments do not count). A file may be allowed to run a little over
(ALLOWED, with its reason; none is now). Prints one line per finding; exit 1 if any."""
import os
import re
import sys

LIMIT = int(os.environ.get("LIMIT", "400"))
# Files allowed over LIMIT, with their own ceiling and the reason.
ALLOWED: dict = {}


def modname(crate_src, path):
    parts = os.path.relpath(path, crate_src)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts)


def code_before_tests(path):
    lines = []
    for line in open(path, encoding="utf-8"):
        s = line.strip()
        if s.startswith("#[cfg(test)]"):
            break
        if s and not s.startswith("//"):
            lines.append(s)
    return lines


def expand(use):
    use = re.sub(r"\s+", "", use)
    m = re.match(r"^(.*?)\{(.*)\}$", use)
    if not m:
        return [use.split(" as ")[0]]
    prefix, inner = m.group(1), m.group(2)
    out, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    out.append(cur)
    res = []
    for o in out:
        if not o or o == "self":
            res.append(prefix.rstrip(":"))
        else:
            res.extend(expand(prefix + o))
    return res


def graph(crate_src):
    mods = {}
    for d, _, files in os.walk(crate_src):
        for f in files:
            if f.endswith(".rs"):
                mods[modname(crate_src, os.path.join(d, f))] = os.path.join(d, f)
    edges = {m: set() for m in mods}

    def edge(m, target):
        segs = target.split("::")
        for k in range(len(segs), 0, -1):
            cand = "::".join(segs[:k])
            if cand in mods and cand != m and not m.startswith(cand + "::"):
                edges[m].add(cand)
                return

    for m, p in mods.items():
        text = "\n".join(code_before_tests(p))
        for use in re.findall(r"\buse\s+crate::([^;]+);", text, re.S):
            for target in expand(use):
                edge(m, target)
        for ref in re.findall(r"\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)", text):
            edge(m, ref)
    return mods, edges


def circles(edges):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


findings = 0
for crate in sorted(os.listdir(".")):
    src = os.path.join(crate, "src")
    if not (os.path.isfile(os.path.join(crate, "Cargo.toml")) and os.path.isdir(src)):
        continue
    mods, edges = graph(src)
    for c in circles(edges):
        print(f"circle in {crate}: {' <-> '.join(c)}")
        findings += 1
    for _, p in sorted(mods.items()):
        n = len(code_before_tests(p))
        limit, why = ALLOWED.get(p, (LIMIT, None))
        if n > limit:
            print(f"big file: {p} has {n} code lines (limit {limit})")
            findings += 1
        elif why and n > LIMIT:
            print(f"note: {p} has {n} code lines, allowed up to {limit}: {why}")
print(f"structure: {findings} finding(s)")
sys.exit(1 if findings else 0)
