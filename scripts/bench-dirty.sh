#!/usr/bin/env bash
# How a receiver's syncing copes with another program's dirty data on the
# same file system: two receiver binaries (this build's and OTHER_AGENT, e.g.
# an earlier build) in alternating rounds, each round after writing DIRTY_MIB
# of unrelated data without syncing it (as a previous copy, or scp, leaves
# it). Same release broker and sender for both. Files on the disk in
# ${BENCH_DIR:-/tmp}.
#
#   scripts/bench-dirty.sh OTHER_AGENT
#   ROUNDS=7 SIZE_MIB=1024 DIRTY_MIB=3072 scripts/bench-dirty.sh OTHER_AGENT
#
# Prints, per binary, the median wall time of the sender (offer to receipt)
# with and without the dirty data, and the receiver's longest sync call
# (strace), and the ratio of the medians.
set -euo pipefail
cd "$(dirname "$0")/.."

other=${1:?usage: scripts/bench-dirty.sh OTHER_AGENT_BINARY}
rounds=${ROUNDS:-5}
size_mib=${SIZE_MIB:-1024}
dirty_mib=${DIRTY_MIB:-3072}
work=$(mktemp -d -p "${BENCH_DIR:-/tmp}" keyferry-dirty.XXXXXX)
. scripts/common.sh
command -v strace >/dev/null || { apt-get update -qq >/dev/null; apt-get install -y -qq strace >/dev/null; }

cargo build --release --locked --bins -q
bin=$PWD/target/release
home() { mkdir -p "$1"; chmod 700 "$1"; cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"; }

"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker" >"$work/broker.out" 2>"$work/broker.log" &
pids+=($!)
for _ in $(seq 100); do grep -q fingerprint "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
addr=$(awk '/listening on/ {print $NF}' "$work/broker.out")
home "$work/alice" alice
home "$work/bob" bob
head -c "$((size_mib << 20))" /dev/urandom >"$work/data.bin"

# One transfer received by $1; prints: seconds longest_sync_seconds
once() {
    local receiver=$1 tag=$2
    rm -rf "$work/in"; mkdir "$work/in"
    strace -f -e trace=syncfs,fsync,fdatasync -T -o "$work/strace" \
        "$receiver" --broker "$addr" --home "$work/bob" --name bob --role receiver --once \
        --out-dir "$work/in" >"$work/recv.out" 2>&1 &
    local rpid=$!
    for _ in $(seq 200); do grep -q "receiving as" "$work/recv.out" 2>/dev/null && break; sleep 0.05; done
    local t0 t1
    t0=$(date +%s.%N)
    "$bin/agent" --broker "$addr" --home "$work/alice" --name alice --role sender --to bob \
        --file "$work/data.bin" >/dev/null 2>"$work/send.err"
    t1=$(date +%s.%N)
    wait "$rpid"
    cmp -s "$work/data.bin" "$work/in/data.bin" || { echo "$tag: copy differs" >&2; exit 1; }
    local longest
    longest=$(grep -oE '<[0-9.]+>$' "$work/strace" | tr -d '<>' | sort -g | tail -1)
    awk -v a="$t0" -v b="$t1" -v l="${longest:-0}" 'BEGIN { print b - a, l }'
}

for f in new-clean new-dirty old-clean old-dirty; do : >"$work/$f.txt"; done
for i in $(seq "$rounds"); do
    echo "round $i/$rounds" >&2
    order="new old"
    [ $((i % 2)) -eq 0 ] && order="old new" # each goes first in every other round
    for who in $order; do
        receiver=$bin/agent
        [ "$who" = old ] && receiver=$other
        sync
        once "$receiver" "$who" >>"$work/$who-clean.txt"
        dd if=/dev/zero of="$work/other" bs=1M count="$dirty_mib" status=none
        once "$receiver" "$who" >>"$work/$who-dirty.txt"
        rm -f "$work/other"
        echo "  $who: clean $(tail -1 "$work/$who-clean.txt"), dirty $(tail -1 "$work/$who-dirty.txt")" >&2
    done
done

col() { awk -v c="$2" '{ print $c }' "$work/$1.txt" | median; }
cat <<TABLE

| receiver (${size_mib} MiB on the disk, ${rounds} alternating rounds, medians) | this build | ${other##*/} given |
|---|---|---|
| seconds, after \`sync\` | $(col new-clean 1) | $(col old-clean 1) |
| seconds, with ${dirty_mib} MiB of another program's dirty data | $(col new-dirty 1) | $(col old-dirty 1) |
| longest sync call in the receiver, with that dirty data | $(col new-dirty 2) s | $(col old-dirty 2) s |
| ratio dirty / clean | $(awk -v a="$(col new-dirty 1)" -v b="$(col new-clean 1)" 'BEGIN { printf "%.2f", a / b }') | $(awk -v a="$(col old-dirty 1)" -v b="$(col old-clean 1)" 'BEGIN { printf "%.2f", a / b }') |
TABLE
