#!/usr/bin/env bash
# keyferry demo: a broker, a receiver and a sender on 127.0.0.1, each with its own
# temporary home, sending a generated file of a few hundred MiB with a short
# rekey interval so that many session keys are used. Checks the hashes and stops
# everything it started.
#
#   scripts/demo.sh [SIZE_MIB]      (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${1:-300}
work=$(mktemp -d -t keyferry-demo.XXXXXX)
. scripts/common.sh

echo "== building (release)"
cargo build --release --locked --bins -q
bin=target/release

echo "== starting the broker"
"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker" >"$work/broker.out" 2>"$work/broker.log" &
pids+=($!)
for _ in $(seq 100); do grep -q fingerprint "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
cat "$work/broker.out"
addr=$(awk '/listening on/ {print $NF}' "$work/broker.out")

echo "== starting the receiver (bob)"
mkdir -p "$work/inbox"
"$bin/agent" --broker "$addr" --home "$work/bob" --name bob --role receiver --out-dir "$work/inbox" \
    >"$work/receiver.out" 2>"$work/receiver.err" &
receiver=$!
pids+=("$receiver")
for _ in $(seq 300); do grep -q "receiving as" "$work/receiver.out" 2>/dev/null && break; sleep 0.1; done
cat "$work/receiver.out"

echo "== generating ${size_mib} MiB of random data"
head -c "$((size_mib << 20))" /dev/urandom >"$work/big.iso"

echo "== sending it from alice to bob with --rekey-interval 200ms"
"$bin/agent" --broker "$addr" --home "$work/alice" --name alice \
    --role sender --to bob --file "$work/big.iso" --rekey-interval 200ms
"$bin/agent" --broker "$addr" --home "$work/alice" --name alice \
    --role sender --to bob --message "that was big.iso — enjoy"

sleep 0.5
echo "== the receiver printed"
cat "$work/receiver.out"

echo "== checking"
sent=$(sha256sum "$work/big.iso" | cut -d' ' -f1)
got=$(sha256sum "$work/inbox/big.iso" | cut -d' ' -f1)
echo "sent     $sent"
echo "received $got"
if [ "$sent" != "$got" ]; then
    echo "MISMATCH" >&2
    exit 1
fi
echo "== the broker logged"
cat "$work/broker.log"
echo "demo OK: ${size_mib} MiB arrived intact"
