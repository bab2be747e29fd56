#!/usr/bin/env bash
# What the cluster-wide limits cost an offer: a 1-byte message from alice to
# bob (both on the same broker) through a broker standing alone and through a
# broker of a cluster, which also counts the offer in NATS (keyferry-rates: two
# reads and a revision-checked write; keyferry-sending: a listing of the
# sender's streams and a write, and a delete when it ends). ROUNDS alternating
# pairs; medians of the wall time end to end and their ratio, and the broker's
# own measure of the two checks (its debug line, read from --log-format json).
# All on 127.0.0.1.
#
#   scripts/bench-rate.sh            ROUNDS=21 by default
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-21}
work=$(mktemp -d -p "${TMPDIR:-/tmp}" keyferry-rate.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
bin=$PWD/target/release

start_nats

# Starts a broker (in this shell, so that its PID is kept for the cleanup);
# its address is the last word of "$work/KIND.out".
start_broker() { # KIND [cluster options...]
    local kind=$1
    shift
    RUST_LOG=info,keyferry_broker::session::place=debug "$bin/broker" --listen 127.0.0.1:0 \
        --data-dir "$work/$kind" --offers-per-minute 100000 --log-format json "$@" \
        >"$work/$kind.out" 2>"$work/$kind.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on" "$work/$kind.out" && break; sleep 0.1; done
}
start_broker alone
start_broker cluster --cluster "$url" --broker-id one
alone=$(awk '/listening on/ { print $NF }' "$work/alone.out")
cluster=$(awk '/listening on/ { print $NF }' "$work/cluster.out")

for kind in alone cluster; do
    addr=$alone
    [ "$kind" = cluster ] && addr=$cluster
    "$bin/agent" --broker "$addr" --home "$work/bob-$kind" --name bob --role receiver \
        --out-dir "$work/in-$kind" --yes --quiet >"$work/bob-$kind.out" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do grep -q "receiving as" "$work/bob-$kind.out" && break; sleep 0.1; done
done

send() { # ADDR KIND
    local t0 t1
    t0=$(now_us)
    "$bin/agent" --broker "$1" --home "$work/alice-$2" --name alice --role sender --to bob \
        --message x --quiet >/dev/null 2>&1
    t1=$(now_us)
    echo $(((t1 - t0)))
}
send "$alone" alone >/dev/null
send "$cluster" cluster >/dev/null
: >"$work/alone.us"
: >"$work/cluster.us"
for _ in $(seq "$rounds"); do
    send "$alone" alone >>"$work/alone.us"
    send "$cluster" cluster >>"$work/cluster.us"
done
a=$(median <"$work/alone.us")
c=$(median <"$work/cluster.us")
check=$(grep -o '"micros":[0-9]*' "$work/cluster.log" | cut -d: -f2 | median)
checks=$(grep -c '"micros":' "$work/cluster.log" || true)
echo "| broker | message end to end (median of $rounds, ms) |"
echo "|---|---|"
awk -v a="$a" -v c="$c" 'BEGIN {
    printf "| alone | %.1f |\n| in a cluster | %.1f (%.2f×) |\n", a / 1000, c / 1000, c / a }'
echo
echo "rate and concurrency checks in the cluster broker: median ${check} µs over ${checks} offers"
