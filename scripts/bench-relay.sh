#!/usr/bin/env bash
# Two broker binaries against each other, in alternating rounds, with the
# same release agents: wall time of the transfer and CPU time of the broker
# (and of the agents) per GiB. For a change to the broker's relay.
#
#   scripts/bench-relay.sh OTHER_BROKER            this build's broker vs OTHER_BROKER
#   ROUNDS=8 SIZE_MIB=2048 scripts/bench-relay.sh OTHER_BROKER
#
# Files live in /dev/shm (no disk: the relay is what is measured).
set -euo pipefail
cd "$(dirname "$0")/.."

other=${1:?usage: scripts/bench-relay.sh OTHER_BROKER_BINARY}
size_mib=${SIZE_MIB:-1024}
rounds=${ROUNDS:-6}
work=$(mktemp -d -p /dev/shm keyferry-relay.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
bin=$PWD/target/release
tck=$(getconf CLK_TCK)
cpu_of() { awk -v t="$tck" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

head -c "$((size_mib << 20))" /dev/urandom >"$work/data.bin"
gib=$(awk -v m="$size_mib" 'BEGIN { print m / 1024 }')

# One transfer through broker binary $1. Prints: wall_s broker_cpu_s agents_cpu_s
once() {
    local broker=$1
    rm -rf "$work/b" "$work/inbox"; mkdir -p "$work/inbox"
    "$broker" --listen 127.0.0.1:0 --data-dir "$work/b" >"$work/b.out" 2>"$work/b.log" &
    local bpid=$!
    pids+=("$bpid")
    for _ in $(seq 100); do grep -q fingerprint "$work/b.out" 2>/dev/null && break; sleep 0.05; done
    local addr
    addr=$(awk '/listening on/ {print $NF}' "$work/b.out")
    # A new broker each round: the agents' pins for the old one go.
    rm -f "$work"/alice/known_brokers "$work"/bob/known_brokers
    /usr/bin/time -f '%U %S' -o "$work/r.cpu" "$bin/agent" --broker "$addr" --home "$work/bob" --name bob \
        --role receiver --once --out-dir "$work/inbox" >"$work/r.out" 2>"$work/r.err" &
    local rpid=$!
    for _ in $(seq 200); do grep -q "receiving as" "$work/r.out" 2>/dev/null && break; sleep 0.05; done
    local b0 t0 t1 b1
    b0=$(cpu_of "$bpid")
    t0=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$work/s.cpu" "$bin/agent" --broker "$addr" --home "$work/alice" --name alice \
        --role sender --to bob --file "$work/data.bin" --direct never >/dev/null 2>"$work/s.err"
    t1=$(date +%s.%N)
    wait "$rpid"
    b1=$(cpu_of "$bpid")
    kill "$bpid"; wait "$bpid" 2>/dev/null || true
    cmp -s "$work/data.bin" "$work/inbox/data.bin" || { echo "the copy differs" >&2; exit 1; }
    local s r
    read -r -a s <"$work/s.cpu"
    read -r -a r <"$work/r.cpu"
    awk -v a="$t0" -v b="$t1" -v b0="$b0" -v b1="$b1" -v su="${s[0]}" -v ss="${s[1]}" -v ru="${r[0]}" -v rs="${r[1]}" \
        'BEGIN { print b - a, b1 - b0, su + ss + ru + rs }'
}

: >"$work/this.txt"; : >"$work/other.txt"
for i in $(seq "$rounds"); do
    echo "round $i/$rounds" >&2
    # Each goes first in every other round (the machine favours one place).
    if [ $((i % 2)) -eq 1 ]; then
        once "$bin/broker" >>"$work/this.txt"
        once "$other" >>"$work/other.txt"
    else
        once "$other" >>"$work/other.txt"
        once "$bin/broker" >>"$work/this.txt"
    fi
done

col() { awk -v c="$2" '{ print $c }' "$1" | median; }
per_gib() { awk -v x="$1" -v g="$gib" 'BEGIN { printf "%.3f", x / g }'; }
mbps() { awk -v s="$1" -v m="$size_mib" 'BEGIN { printf "%.0f", m * 1048576 / s / 1e6 }'; }
tw=$(col "$work/this.txt" 1); ow=$(col "$work/other.txt" 1)
tb=$(col "$work/this.txt" 2); ob=$(col "$work/other.txt" 2)
ta=$(col "$work/this.txt" 3); oa=$(col "$work/other.txt" 3)
cat <<TABLE

| ${size_mib} MiB on tmpfs, ${rounds} alternating rounds, medians | this build | ${other} | this / other |
|---|---|---|---|
| throughput (MB/s) | $(mbps "$tw") | $(mbps "$ow") | $(awk -v a="$ow" -v b="$tw" 'BEGIN { printf "%.2f", a / b }') |
| broker CPU-s per GiB | $(per_gib "$tb") | $(per_gib "$ob") | $(awk -v a="$tb" -v b="$ob" 'BEGIN { printf "%.2f", a / b }') |
| sender + receiver CPU-s per GiB | $(per_gib "$ta") | $(per_gib "$oa") | $(awk -v a="$ta" -v b="$oa" 'BEGIN { printf "%.2f", a / b }') |
TABLE
