#!/usr/bin/env bash
# One upload to 1, 2 and 4 receivers (PROTOCOL.md §2.5): for each count, one
# transfer of a SIZE_MIB file to that many receivers at once, with a fresh
# broker (so its peak RSS is that transfer's). Prints, per count: the wall
# time and the throughput each receiver saw, the sender's and the broker's CPU
# time and peak RSS, and the receivers' CPU time each.
#
#   scripts/bench-fanout.sh                  1 GiB, receivers on the disk in /tmp
#   BENCH_DIR=/dev/shm SIZE_MIB=512 scripts/bench-fanout.sh
set -euo pipefail
size_mib=${SIZE_MIB:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-fanout.XXXXXX)
. scripts/common.sh
[ -x /usr/bin/time ] || { apt-get update -qq >/dev/null; apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --bins
bin=$root/target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hwm() { awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
home() { mkdir -p "$1"; chmod 700 "$1"; cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"; }
alice_fp="SHA256:$(openssl pkey -in common/tests/fixtures/alice.pem -pubout -outform DER 2>/dev/null \
    | openssl dgst -sha256 -binary | base64 | tr -d '=')"

echo "generating ${size_mib} MiB of random data" >&2
head -c "$((size_mib << 20))" /dev/urandom >"$work/big.bin"
bytes=$((size_mib << 20))
names=(bob carol dave mallory)

printf '| receivers | wall (s) | MB/s per receiver | sender CPU (s) | sender peak RSS (MiB) | broker CPU (s) | broker peak RSS (MiB) | CPU per receiver, mean (s) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for n in 1 2 4; do
    port=$(free_port)
    "$bin/broker" --listen "127.0.0.1:$port" --data-dir "$work/broker$n" >"$work/broker$n.log" 2>&1 &
    broker=$!; pids+=($broker)
    sleep 0.5
    home "$work/alice$n" alice
    rx=(); to=()
    for i in $(seq 0 $((n - 1))); do
        name=${names[$i]}
        home "$work/$name$n" "$name"
        echo "alice $alice_fp $(($(date +%s) - 2 * 86400))" >"$work/$name$n/known_peers"
        chmod 600 "$work/$name$n/known_peers"
        mkdir -p "$work/out-$name$n"
        /usr/bin/time -f "%U %S" -o "$work/rt-$name$n" "$bin/agent" --broker "127.0.0.1:$port" \
            --home "$work/$name$n" --name "$name" \
            --role receiver --once --out-dir "$work/out-$name$n" >"$work/r-$name$n.log" 2>&1 &
        rx+=($!); pids+=($!); to+=(--to "$name")
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 100); do grep -q "receiving as" "$work/r-${names[$i]}$n.log" && break; sleep 0.1; done
    done
    b0=$(ticks "$broker")
    t0=$(now)
    /usr/bin/time -f "%U %S %M" -o "$work/time$n" "$bin/agent" --broker "127.0.0.1:$port" \
        --home "$work/alice$n" --name alice --role sender "${to[@]}" --file "$work/big.bin" --json \
        >"$work/s$n.json" 2>"$work/s$n.err" || { cat "$work/s$n.err" >&2; exit 1; }
    t1=$(now)
    b1=$(ticks "$broker"); bpeak=$(hwm "$broker")
    for p in "${rx[@]}"; do wait "$p" || true; done
    rcpu=$(cat "$work"/rt-*"$n" | awk '{ s += $1 + $2; n++ } END { printf "%.2f", s / n }')
    for i in $(seq 0 $((n - 1))); do
        cmp -s "$work/big.bin" "$work/out-${names[$i]}$n/big.bin" || { echo "receiver ${names[$i]} differs" >&2; exit 1; }
    done
    read -r su ss srss <"$work/time$n"
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    printf '| %d | %.2f | %.0f | %.2f | %d | %.2f | %d | %s |\n' "$n" "$wall" \
        "$(awk -v b="$bytes" -v t="$wall" 'BEGIN { print b / t / 1e6 }')" \
        "$(awk -v u="$su" -v s="$ss" 'BEGIN { print u + s }')" "$((srss / 1024))" \
        "$(awk -v a="$b0" -v b="$b1" -v hz="$hz" 'BEGIN { print (b - a) / hz }')" "$bpeak" "$rcpu"
    kill "$broker" 2>/dev/null || true
    rm -rf "$work"/out-*"$n"
done
