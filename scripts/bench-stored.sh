#!/usr/bin/env bash
# What leaving a transfer at the broker costs against sending it live, on
# 127.0.0.1 with release builds: in alternating rounds (direct, relay, stored,
# direct, relay, stored …) one file of SIZE_MIB goes from alice to bob
#   direct  bob online; alice's `--role sender` run, start to exit (on one
#           machine the agents connect directly: the broker carries nothing)
#   relay   the same with `--direct never`: through the broker's relay
#   stored  bob offline; alice's `--store` run (start to exit 12), then bob's
#           receiver from its start to its `received` event; both, and the sum
# and the CPU time (user + system) of the broker, the sender and the receiver
# in each round, per byte sent (a stored round's receiver counted from its
# start, its connection and prekey work included). Prints the medians and the
# stored/live ratios.
#
#   scripts/bench-stored.sh                  256 MiB, 5 rounds of each
#   SIZE_MIB=1024 ROUNDS=3 scripts/bench-stored.sh
#   CLUSTER=1 scripts/bench-stored.sh        the broker in a cluster: stored
#       transfers go to NATS JetStream (scripts/common.sh's start_nats), whose
#       CPU is counted with the broker's
#
# Files live under target/ (on the disk, not in memory).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${SIZE_MIB:-256}
rounds=${ROUNDS:-5}
work=$(mktemp -d -p "$PWD/target" bench-stored.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
bin=$PWD/target/release
now() { date +%s.%N; }
# CPU seconds (user + system) a process has used so far.
cpu_of() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }
# The broker's CPU seconds, with its NATS server's in a cluster.
broker_cpu() {
    if [ -n "$npid" ]; then
        echo "$(cpu_of "$bpid") + $(cpu_of "$npid")" | bc -l
    else
        cpu_of "$bpid"
    fi
}

head -c $((size_mib << 20)) /dev/urandom >"$work/data.bin"
mkdir -p "$work/alice" "$work/bob"
chmod 700 "$work/alice" "$work/bob"
cluster=()
npid=
if [ "${CLUSTER:-0}" = 1 ]; then
    start_nats
    npid=$nats_pid
    cluster=(--cluster "$url" --broker-id bench)
fi
"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/b" "${cluster[@]}" >"$work/b.out" 2>"$work/b.log" &
bpid=$!
pids+=("$bpid")
for _ in $(seq 200); do grep -q fingerprint "$work/b.out" 2>/dev/null && break; sleep 0.05; done
addr=$(awk '/listening on/ { print $NF }' "$work/b.out")
a=("$bin/agent" --broker "$addr" --quiet)

# Starts bob's receiver into a fresh out dir; sets rpid.
receiver() {
    rm -rf "$work/in"
    mkdir -p "$work/in"
    "${a[@]}" --home "$work/bob" --name bob --role receiver --out-dir "$work/in" --yes --json \
        </dev/null >"$work/r.out" 2>"$work/r.err" &
    rpid=$!
    pids+=("$rpid")
}
stop_receiver() { kill "$rpid"; wait "$rpid" 2>/dev/null || true; }
# Runs alice's sender with extra options $@; prints "seconds cpu_seconds".
sender() {
    local t0 t1
    t0=$(now)
    /usr/bin/time -f "%U %S" -o "$work/s.time" "${a[@]}" --home "$work/alice" --name alice \
        --role sender --to bob --file "$work/data.bin" --json "$@" </dev/null >"$work/s.out" 2>"$work/s.err" || true
    t1=$(now)
    echo "$(echo "$t1 - $t0" | bc -l) $(tail -1 "$work/s.time" | awk '{ print $1 + $2 }')"
}

# Bob registers and leaves his prekeys, then goes away; alice pins him.
receiver
for _ in $(seq 600); do grep -q "one_time=16" "$work/b.log" && break; sleep 0.05; done
"${a[@]}" --home "$work/alice" --name alice --role sender --to bob --message hello --json >/dev/null 2>&1
stop_receiver

# One live round: alice's sender with $2… into the file $1.
live() {
    local into=$1
    shift
    receiver
    for _ in $(seq 600); do grep -q "receiving as" "$work/r.err" && break; sleep 0.05; done
    b0=$(broker_cpu); r0=$(cpu_of "$rpid")
    read -r secs scpu < <(sender "$@")
    for _ in $(seq 600); do grep -q '"event":"received"' "$work/r.out" && break; sleep 0.02; done
    b1=$(broker_cpu); r1=$(cpu_of "$rpid")
    cmp -s "$work/data.bin" "$work/in/data.bin" || { echo "live round: data differs" >&2; exit 1; }
    stop_receiver
    echo "$secs $scpu $(echo "$b1 - $b0" | bc -l) $(echo "$r1 - $r0" | bc -l)" >>"$into"
}

bytes=$((size_mib << 20))
: >"$work/live"
: >"$work/relay"
: >"$work/stored"
for round in $(seq "$rounds"); do
    live "$work/live"
    live "$work/relay" --direct never
    # stored
    b0=$(broker_cpu)
    read -r ssecs scpu < <(sender --store)
    grep -q '"event":"stored"' "$work/s.out" || { echo "stored round $round: not stored" >&2; cat "$work/s.err" >&2; exit 1; }
    t0=$(now)
    receiver
    for _ in $(seq 6000); do grep -q '"event":"received"' "$work/r.out" && break; sleep 0.005; done
    t1=$(now)
    r1=$(cpu_of "$rpid"); b1=$(broker_cpu)
    cmp -s "$work/data.bin" "$work/in/data.bin" || { echo "stored round $round: data differs" >&2; exit 1; }
    stop_receiver
    dsecs=$(echo "$t1 - $t0" | bc -l)
    echo "$ssecs $dsecs $scpu $(echo "$b1 - $b0" | bc -l) $r1" >>"$work/stored"
    echo "round $round: direct $(awk 'END { print $1 }' "$work/live") s; relay $(awk 'END { print $1 }' "$work/relay") s; stored $ssecs s + delivery $dsecs s" >&2
done

col() { awk -v c="$2" '{ print $c }' "$1" | median; }
live=$(col "$work/live" 1)
store=$(col "$work/stored" 1)
deliver=$(col "$work/stored" 2)
total=$(awk '{ print $1 + $2 }' "$work/stored" | median)
per_byte() { echo "scale=2; $1 * 1000000000 / $bytes" | bc -l; }
echo "size ${size_mib} MiB, ${rounds} rounds each, medians${npid:+ (broker in a cluster: its CPU counts nats-server)}"
relay=$(col "$work/relay" 1)
printf "direct:  %.3f s (%.0f MB/s)   cpu ns/B: sender %s broker %s receiver %s\n" \
    "$live" "$(echo "$bytes / $live / 1000000" | bc -l)" \
    "$(per_byte "$(col "$work/live" 2)")" "$(per_byte "$(col "$work/live" 3)")" "$(per_byte "$(col "$work/live" 4)")"
printf "relay:   %.3f s (%.0f MB/s)   cpu ns/B: sender %s broker %s receiver %s\n" \
    "$relay" "$(echo "$bytes / $relay / 1000000" | bc -l)" \
    "$(per_byte "$(col "$work/relay" 2)")" "$(per_byte "$(col "$work/relay" 3)")" "$(per_byte "$(col "$work/relay" 4)")"
printf "stored:  %.3f s to store + %.3f s to deliver = %.3f s   cpu ns/B: sender %s broker %s receiver %s\n" \
    "$store" "$deliver" "$total" \
    "$(per_byte "$(col "$work/stored" 3)")" "$(per_byte "$(col "$work/stored" 4)")" "$(per_byte "$(col "$work/stored" 5)")"
printf "stored/direct wall: %.2f, stored/relay: %.2f, store alone/relay: %.2f\n" \
    "$(echo "$total / $live" | bc -l)" "$(echo "$total / $relay" | bc -l)" "$(echo "$store / $relay" | bc -l)"
