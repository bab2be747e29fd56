#!/usr/bin/env bash
# One chat line end to end on loopback: alice's `agent --chat bob` reads a
# line on stdin, bob's `agent --chat alice --json` prints it on stdout; the
# time between the two, for LINES lines (default 50) sent one at a time
# (each after the previous one arrived), with the release binaries. Prints
# every line's latency, then the median and the 90th percentile, and the
# CPU time of each process per line.
#
#   scripts/chat-latency.sh
#   LINES=200 REKEY=200ms scripts/chat-latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."

lines=${LINES:-50}
rekey=${REKEY:-5s}
work=$(mktemp -d)
. scripts/common.sh

cargo build --release --locked --bins -q
bin=$PWD/target/release

"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/b" >"$work/b.out" 2>"$work/b.log" &
pids+=($!)
for _ in $(seq 100); do grep -q fingerprint "$work/b.out" 2>/dev/null && break; sleep 0.05; done
addr=$(awk '/listening on/ { print $NF }' "$work/b.out")

python3 - "$bin/agent" "$addr" "$work" "$lines" "$rekey" <<'EOF'
import json, os, statistics, subprocess, sys, time

agent, addr, work, lines, rekey = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
tck = os.sysconf("SC_CLK_TCK")

def chat(me, peer):
    home = os.path.join(work, me)
    os.makedirs(home, mode=0o700, exist_ok=True)
    return subprocess.Popen(
        [agent, "--broker", addr, "--home", home, "--name", me, "--chat", peer,
         "--json", "--rekey-interval", rekey, "--out-dir", home],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, bufsize=1)

def wait_for(p, want):
    while True:
        line = p.stdout.readline()
        if not line:
            sys.exit(f"the chat ended before {want!r}")
        if want in line:
            return line

def cpu(p):
    with open(f"/proc/{p.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tck

alice, bob = chat("alice", "bob"), chat("bob", "alice")
wait_for(alice, '"joined"'); wait_for(bob, '"joined"')
time.sleep(1)  # both streams up
cpu0 = (cpu(alice), cpu(bob))
took = []
for i in range(lines):
    text = f"line {i} {time.time_ns()}"
    t0 = time.perf_counter()
    alice.stdin.write(text + "\n"); alice.stdin.flush()
    wait_for(bob, json.dumps(text))
    took.append((time.perf_counter() - t0) * 1000)
cpu1 = (cpu(alice), cpu(bob))
for i, ms in enumerate(took):
    print(f"line {i:3}: {ms:6.2f} ms")
took.sort()
p90 = took[min(len(took) - 1, int(len(took) * 0.9))]
print(f"{lines} lines, rekey {rekey}: median {statistics.median(took):.2f} ms, p90 {p90:.2f} ms, "
      f"max {took[-1]:.2f} ms")
print(f"CPU per line: alice {1000 * (cpu1[0] - cpu0[0]) / lines:.2f} ms, "
      f"bob {1000 * (cpu1[1] - cpu0[1]) / lines:.2f} ms (sign, seal, acks, keepalives)")
for p in (alice, bob):
    p.stdin.close()
for p in (alice, bob):
    p.wait(timeout=20)
EOF
