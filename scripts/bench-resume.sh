#!/usr/bin/env bash
# How long a resume takes to get going, against another build's agents
# (e.g. the last version 3 release): a transfer of PREFIX + 1 GiB is cut by
# killing the sender once the receiver holds PREFIX bytes; then the same
# command is run again. Measured, in alternating rounds (ours, theirs, …):
#   first  time from the new sender's start to the first new byte the
#          receiver writes (what the restart costs: for version 3 it reads
#          the whole prefix on both sides first; since version 4 it should
#          not grow with the prefix)
#   exit   time from the new sender's start to its exit (the rest verified)
#   rest   what the remaining bytes take at the run's own rate: the first
#          attempt's, from its first byte on the receiver's disk to the cut
#   bound  issue 27's limit for exit: 2 s + 1.5 x rest
# With root, the page cache is dropped before each restart, so a prefix is
# read from the disk as it would be days later.
#
#   scripts/bench-resume.sh [OTHER_BIN_DIR]             prefixes of 1 and 6 GiB
#   SIZES="1 6 20" ROUNDS=1 scripts/bench-resume.sh OTHER_BIN_DIR
#
# OTHER_BIN_DIR holds the reference `agent` and `broker` (a release build of
# another commit); without it only this build runs. Files live under target/
# (on the disk, not in memory).
set -euo pipefail
cd "$(dirname "$0")/.."

other=${1:-}
sizes=${SIZES:-1 6}
rounds=${ROUNDS:-2}
rest_mib=1024
work=$(mktemp -d -p "$PWD/target" bench-resume.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
ours=$PWD/target/release
now() { date +%s.%N; }
size_of() { stat -c %s "$1" 2>/dev/null || echo 0; }
drop_caches() { if [ "$(id -u)" = 0 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }

# One cut-and-resume with the binaries in $1 for a prefix of $2 MiB.
# Prints: first_s exit_s rest_s bound_s resumed_from
once() {
    local bin=$1 prefix_mib=$2
    rm -rf "$work/b" "$work/alice" "$work/bob" "$work/in"
    mkdir -p "$work/alice" "$work/bob" "$work/in"
    chmod 700 "$work/alice" "$work/bob"
    "$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/b" >"$work/b.out" 2>"$work/b.log" &
    local bpid=$!
    pids+=("$bpid")
    for _ in $(seq 200); do grep -q fingerprint "$work/b.out" 2>/dev/null && break; sleep 0.05; done
    local addr
    addr=$(awk '/listening on/ { print $NF }' "$work/b.out")
    local a=("$bin/agent" --broker "$addr")
    # The receiver takes anything (version 3 has no --yes; stdin is not a
    # terminal, so version 4 takes anything without it too).
    "${a[@]}" --home "$work/bob" --name bob --role receiver --out-dir "$work/in" --max-size 1000GiB \
        </dev/null >"$work/r.out" 2>"$work/r.err" &
    local rpid=$!
    pids+=("$rpid")
    for _ in $(seq 600); do grep -q "receiving as" "$work/r.out" 2>/dev/null && break; sleep 0.05; done
    local send=("${a[@]}" --home "$work/alice" --name alice --role sender --to bob --json
        --file "$work/data.bin")
    "${send[@]}" </dev/null >"$work/s1.out" 2>"$work/s1.err" &
    local spid=$!
    local part="" s0="" s1 s0_bytes=0 s1_bytes=0
    for _ in $(seq 6000); do
        part=$(find "$work/in" -path '*/t/data.bin' 2>/dev/null | head -1)
        if [ -z "$s0" ] && [ -n "$part" ] && [ "$(size_of "$part")" -gt 0 ]; then
            s0=$(now); s0_bytes=$(size_of "$part")
        fi
        [ -n "$part" ] && [ "$(size_of "$part")" -ge $((prefix_mib << 20)) ] && break
        sleep 0.02
    done
    s1=$(now); s1_bytes=$(size_of "$part")
    kill -9 "$spid"; wait "$spid" 2>/dev/null || true
    # The run's rate needs two readings of the first attempt's progress.
    if [ -z "$s0" ] || [ "$s1_bytes" -le "$s0_bytes" ]; then
        echo "the first attempt did not get going: $(cat "$work/s1.err")" >&2
        exit 1
    fi
    # The receiver journals what verified once it sees the sender gone.
    for _ in $(seq 600); do grep -q "failed" "$work/r.err" 2>/dev/null && break; sleep 0.05; done
    sleep 1
    local held
    held=$(size_of "$part")
    drop_caches
    local t0 t1="" t2
    t0=$(now)
    "${send[@]}" </dev/null >"$work/s2.out" 2>"$work/s2.err" &
    spid=$!
    while kill -0 "$spid" 2>/dev/null; do
        if [ -z "$t1" ] && [ "$(size_of "$part")" -gt "$held" ]; then t1=$(now); fi
        sleep 0.005
    done
    t2=$(now)
    wait "$spid" || { echo "the second sender failed: $(cat "$work/s2.err")" >&2; exit 1; }
    [ -n "$t1" ] || t1=$t2
    local want got from
    want=$(sha256sum <"$work/data.bin" | cut -d' ' -f1)
    got=$(sha256sum <"$work/in/data.bin" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "the received file differs" >&2; exit 1; }
    from=$(grep -o '"resumed_from":[0-9]*' "$work/s2.out" | cut -d: -f2)
    kill "$rpid" "$bpid" 2>/dev/null || true
    wait "$rpid" "$bpid" 2>/dev/null || true
    # The rest at this run's own rate (the first attempt's bytes per second
    # on the receiver's disk), and the bound it gives.
    local total
    total=$(size_of "$work/data.bin")
    awk -v t0="$t0" -v t1="$t1" -v t2="$t2" -v f="$from" -v n="$total" \
        -v a0="$s0" -v a1="$s1" -v b0="$s0_bytes" -v b1="$s1_bytes" \
        'BEGIN { rate = (b1 - b0) / (a1 - a0); rest = (n - f) / rate
                 printf "%.2f %.2f %.2f %.2f %.0f\n", t1 - t0, t2 - t0, rest, 2 + 1.5 * rest, f }'
}


echo "resume after a cut, same command run again; rest ${rest_mib} MiB; rounds ${rounds}"
echo "prefix  build   round  first_s  exit_s  rest_s  bound_s  resumed_from"
for gib in $sizes; do
    head -c "$(((gib << 30) + (rest_mib << 20)))" /dev/urandom >"$work/data.bin"
    : >"$work/ours.txt"; : >"$work/theirs.txt"
    for r in $(seq "$rounds"); do
        # Each build goes first in every other round.
        if [ -z "$other" ]; then order=ours
        elif [ $((r % 2)) = 1 ]; then order="ours theirs"; else order="theirs ours"; fi
        for who in $order; do
            if [ "$who" = ours ]; then bin=$ours; else bin=$other; fi
            line=$(once "$bin" "$((gib << 10))")
            echo "$line" >>"$work/$who.txt"
            printf '%4s GiB  %-6s  %5d  %s\n' "$gib" "$who" "$r" "$line"
        done
    done
    for who in ours ${other:+theirs}; do
        f=$(cut -d' ' -f1 "$work/$who.txt" | median)
        e=$(cut -d' ' -f2 "$work/$who.txt" | median)
        b=$(cut -d' ' -f4 "$work/$who.txt" | median)
        printf '%4s GiB  %-6s  median first %s s, exit %s s, bound %s s\n' "$gib" "$who" "$f" "$e" "$b"
    done
    rm -f "$work/data.bin"
done
