#!/usr/bin/env bash
# An older protocol version against this tree, in one run, alternating rounds
# (old, new, new, old …: each first in every other round): the end-to-end time
# of a 1 KiB file (sender start to its verified receipt, so it includes the
# process start, TLS, the RSA operations and ML-KEM; and the sender's and
# receiver's CPU time for it) and the throughput of a 1 GiB file, with the CPU
# time per byte of sender, receiver and broker. Medians; ratios new / old.
#
#   scripts/bench-old-version.sh          version 2 (565ad4b) against this tree (3)
#   SIZE_MIB=256 RUNS=4 LATENCY_RUNS=10 scripts/bench-old-version.sh
#   OLD_COMMIT=eea02f7 OLD_VERSION=1 scripts/bench-old-version.sh
#
# Builds both in release (the old one from OLD_COMMIT in a temporary worktree,
# into target/vN). Everything on 127.0.0.1; stopped by PID at the end.
set -euo pipefail
OLD_COMMIT=${OLD_COMMIT:-565ad4b}
OLD_VERSION=${OLD_VERSION:-2}
size_mib=${SIZE_MIB:-1024}
runs=${RUNS:-6}
latency_runs=${LATENCY_RUNS:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-versions.XXXXXX)
. scripts/common.sh
# More to undo than the common cleanup.
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    git -C "$root" worktree remove --force "$work/oldsrc" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "building version $OLD_VERSION ($OLD_COMMIT) and this tree, release" >&2
git worktree add --quiet --detach "$work/oldsrc" "$OLD_COMMIT"
(cd "$work/oldsrc" && CARGO_TARGET_DIR="$root/target/v$OLD_VERSION" cargo build --release --quiet --bins)
cargo build --release --quiet --bins
declare -A bin=([old]="$root/target/v$OLD_VERSION/release" [new]="$root/target/release")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }   # utime + stime of a running process
hz=$(getconf CLK_TCK)
# timed FILE CMD…: runs CMD, writes its wall time and its user and system CPU
# seconds to FILE, to the microsecond (/usr/bin/time prints hundredths, and a
# small transfer's sender needs less than one); the wall time is taken around
# the command alone, not Python's start.
timed() {
    python3 -c 'import resource, subprocess, sys, time
before = resource.getrusage(resource.RUSAGE_CHILDREN)  # a python3 wrapper may have had children
t = time.monotonic()
rc = subprocess.run(sys.argv[2:]).returncode
t = time.monotonic() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
u, s = r.ru_utime - before.ru_utime, r.ru_stime - before.ru_stime
open(sys.argv[1], "w").write(f"{t:.6f} {u:.6f} {s:.6f}\n")
sys.exit(rc)' "$@"
}
home() { mkdir -p "$1"; chmod 700 "$1"; cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"; }

declare -A port broker_pid receiver_pid
for v in old new; do
    port[$v]=$(free_port)
    "${bin[$v]}/broker" --listen "127.0.0.1:${port[$v]}" --data-dir "$work/b$v" >"$work/b$v.log" 2>&1 &
    broker_pid[$v]=$!; pids+=($!)
done
sleep 1
# bob has known alice for two days: a key pinned in the last day may make a
# receiver decrypt only 6 offers a minute (PROTOCOL.md §9).
alice_fp="SHA256:$(openssl pkey -in common/tests/fixtures/alice.pem -pubout -outform DER 2>/dev/null \
    | openssl dgst -sha256 -binary | base64 | tr -d '=')"
for v in old new; do
    home "$work/alice$v" alice; home "$work/bob$v" bob; mkdir -p "$work/out$v"
    echo "alice $alice_fp $(($(date +%s) - 2 * 86400))" >"$work/bob$v/known_peers"; chmod 600 "$work/bob$v/known_peers"
    "${bin[$v]}/agent" --broker "127.0.0.1:${port[$v]}" --home "$work/bob$v" --name bob \
        --role receiver --out-dir "$work/out$v" >"$work/r$v.log" 2>&1 &
    receiver_pid[$v]=$!; pids+=($!)
done
for _ in $(seq 100); do
    grep -q "receiving as" "$work/rold.log" 2>/dev/null && grep -q "receiving as" "$work/rnew.log" 2>/dev/null && break
    sleep 0.1
done

head -c 1024 /dev/urandom >"$work/small.bin"
echo "generating ${size_mib} MiB of random data" >&2
head -c "$((size_mib << 20))" /dev/urandom >"$work/big.bin"
bytes=$((size_mib << 20))

send() { # send VERSION FILE: runs the sender; prints "seconds sender_cpu_s receiver_cpu_s broker_cpu_s"
    local v=$1 f=$2 r0 r1 b0 b1
    rm -f "$work/out$v"/*
    r0=$(ticks "${receiver_pid[$v]}"); b0=$(ticks "${broker_pid[$v]}")
    timed "$work/time" "${bin[$v]}/agent" --broker "127.0.0.1:${port[$v]}" \
        --home "$work/alice$v" --name alice --role sender --to bob --file "$f" --json >"$work/s.json" 2>"$work/s.err" \
        || { echo "version $v: send failed" >&2; cat "$work/s.err" >&2; exit 1; }
    # The receiver prints its line once the file is in place; wait for it.
    for _ in $(seq 200); do [ -e "$work/out$v/$(basename "$f")" ] && break; sleep 0.01; done
    r1=$(ticks "${receiver_pid[$v]}"); b1=$(ticks "${broker_pid[$v]}")
    awk -v r="$((r1 - r0))" -v b="$((b1 - b0))" -v hz="$hz" \
        '{ printf "%.4f %.4f %.3f %.3f\n", $1, $2 + $3, r / hz, b / hz }' "$work/time"
}

echo "1 KiB latency: $latency_runs alternating rounds" >&2
# Each version goes first in every other round: the machine favours one place.
order() { if [ $(($1 % 2)) -eq 1 ]; then echo old new; else echo new old; fi; }
for i in $(seq "$latency_runs"); do
    for v in $(order "$i"); do send "$v" "$work/small.bin" >>"$work/lat$v"; done
done
echo "${size_mib} MiB: $runs alternating rounds" >&2
for i in $(seq "$runs"); do
    for v in $(order "$i"); do send "$v" "$work/big.bin" >>"$work/big$v"; done
    for v in old new; do
        cmp -s "$work/big.bin" "$work/out$v/big.bin" || { echo "the $v copy differs" >&2; exit 1; }
    done
done

col() { awk -v c="$1" '{ print $c }' "$2" | median; }
printf '\n| | version %s (%s) | this tree | new / old |\n|---|---|---|---|\n' "$OLD_VERSION" "$OLD_COMMIT"
l1=$(col 1 "$work/latold"); l2=$(col 1 "$work/latnew")
printf '| 1 KiB end to end, median of %s (ms) | %.1f | %.1f | %.2f |\n' "$latency_runs" \
    "$(awk -v x="$l1" 'BEGIN{print x*1000}')" "$(awk -v x="$l2" 'BEGIN{print x*1000}')" "$(awk -v a="$l1" -v b="$l2" 'BEGIN{print b/a}')"
# The receiver's and broker's CPU times are counted in ticks (10 ms; the sender's to
# the microsecond): a mean over the rounds says more than a median.
mean() { awk -v c="$1" '{ s += $c } END { print s / NR * 1000 }' "$2"; }
for c in 2:sender 3:receiver; do
    n=${c%%:*}; role=${c##*:}
    a=$(mean "$n" "$work/latold"); b=$(mean "$n" "$work/latnew")
    printf '| 1 KiB, %s CPU, mean of %s (ms) | %.1f | %.1f | %.2f |\n' "$role" "$latency_runs" "$a" "$b" \
        "$(awk -v a="$a" -v b="$b" 'BEGIN{ if (a > 0) print b/a; else print 0 }')"
done
t1=$(col 1 "$work/bigold"); t2=$(col 1 "$work/bignew")
m1=$(awk -v b="$bytes" -v t="$t1" 'BEGIN { print b / t / 1e6 }'); m2=$(awk -v b="$bytes" -v t="$t2" 'BEGIN { print b / t / 1e6 }')
printf '| %s MiB, median of %s (MB/s) | %.0f | %.0f | %.2f |\n' "$size_mib" "$runs" "$m1" "$m2" "$(awk -v a="$m1" -v b="$m2" 'BEGIN{print b/a}')"
for c in 2:sender 3:receiver 4:broker; do
    n=${c%%:*}; role=${c##*:}
    a=$(col "$n" "$work/bigold"); b=$(col "$n" "$work/bignew")
    printf '| %s CPU per byte (ns/B) | %.2f | %.2f | %.2f |\n' "$role" \
        "$(awk -v s="$a" -v b="$bytes" 'BEGIN{print s*1e9/b}')" "$(awk -v s="$b" -v b="$bytes" 'BEGIN{print s*1e9/b}')" \
        "$(awk -v a="$a" -v b="$b" 'BEGIN{ if (a > 0) print b/a; else print 0 }')"
done
echo
echo "raw (seconds sender_cpu receiver_cpu broker_cpu), old:"; cat "$work/bigold"
echo "new:"; cat "$work/bignew"
