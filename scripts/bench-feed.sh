#!/usr/bin/env bash
# One upload to receivers on two other brokers of a cluster (the sender's
# broker feeds each a copy) against the two sends a user needed before (one per
# receiver, each straight to that receiver's broker), in alternating rounds:
# wall time and the sender's CPU time per round, medians and ratios. Three
# brokers on one nats-server, all on 127.0.0.1; bob on broker two, carol on
# broker three, alice on broker one.
#
#   scripts/bench-feed.sh                 SIZE_MIB=256 ROUNDS=5
#   BENCH_DIR=/dev/shm scripts/bench-feed.sh
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${SIZE_MIB:-256}
rounds=${ROUNDS:-5}
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-feed.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
bin=$PWD/target/release

start_nats

declare -A addr
for id in one two three; do
    "$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker-$id" --cluster "$url" \
        --broker-id "$id" >"$work/$id.out" 2>"$work/$id.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on" "$work/$id.out" && break; sleep 0.1; done
    addr[$id]=$(awk '/listening on/ { print $NF }' "$work/$id.out")
done
for r in "bob two" "carol three"; do
    set -- $r
    "$bin/agent" --broker "${addr[$2]}" --home "$work/home-$1" --name "$1" --role receiver \
        --out-dir "$work/in-$1" --yes --quiet >"$work/$1.out" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do grep -q "receiving as" "$work/$1.out" && break; sleep 0.1; done
done
head -c "$((size_mib << 20))" /dev/urandom >"$work/data.bin"

send() { # TIMES-FILE RECEIVER...
    local out=$1
    shift
    local to=()
    for r in "$@"; do to+=(--to "$r"); done
    /usr/bin/time -f "%e %U %S" -a -o "$out" "$bin/agent" --broker "${addr[one]}" \
        --home "$work/home-alice" --name alice --role sender "${to[@]}" \
        --file "$work/data.bin" --quiet >/dev/null
    rm -rf "$work/in-bob"/* "$work/in-carol"/*
}
# One upload; two sends, one after the other. A warm-up of each first.
one_upload() { send "$1" bob carol; }
two_sends() {

    : >"$work/pair"
    send "$work/pair" bob
    send "$work/pair" carol
    awk '{ e += $1; u += $2; s += $3 } END { print e, u, s }' "$work/pair" >>"$1"
}
one_upload /dev/null
two_sends /dev/null
: >"$work/upload.t"
: >"$work/sends.t"
for _ in $(seq "$rounds"); do
    one_upload "$work/upload.t"
    two_sends "$work/sends.t"
done
col() { awk -v c="$1" '{ print $c }' "$2" | median; }
cpu() { awk '{ print $2 + $3 }' "$1" | median; }
ue=$(col 1 "$work/upload.t") se=$(col 1 "$work/sends.t")
uc=$(cpu "$work/upload.t") sc=$(cpu "$work/sends.t")
echo "| $size_mib MiB to bob (broker two) and carol (broker three) | wall s | sender CPU s |"
echo "|---|---|---|"
echo "| one upload, fed on by broker one | $ue | $uc |"
echo "| two sends, one per receiver | $se | $sc |"
awk -v ue="$ue" -v se="$se" -v uc="$uc" -v sc="$sc" 'BEGIN {
    printf "| ratio (one upload / two sends) | %.2f | %.2f |\n", ue / se, uc / sc }'
