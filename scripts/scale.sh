#!/usr/bin/env bash
# One broker, many agents: 1,000 authenticated idle receivers plus 20 transfers
# at once (20 senders to 20 receivers), all on 127.0.0.1.
#
#   scripts/scale.sh                         1000 idle, 20 transfers of 64 MiB
#   IDLE=10000 scripts/scale.sh              10,000 idle agents (raises ulimit -n)
#   IDLE=2000 TRANSFERS=10 SIZE_MIB=256 scripts/scale.sh
#   BENCH_DIR=/dev/shm scripts/scale.sh      files on tmpfs instead of the disk
#   BIN=/abs/path/to/binaries scripts/scale.sh   another build's broker, agent
#                                            and examples/idle_agents (none is built)
#
# The idle agents are held by one process (agent/examples/idle_agents.rs), each
# connection authenticated exactly as `agent --role receiver` does it; the
# broker runs with --max-connections-per-ip raised, since they all come from
# 127.0.0.1. Prints a Markdown table: broker RSS before and with the idle
# agents, its peak during the transfers, and the throughput of each transfer
# (min / median / max, from the senders' --json) and in total, and the CPU time
# the whole machine spent while they ran (/proc/stat, all processes).
set -euo pipefail
cd "$(dirname "$0")/.."

idle=${IDLE:-1000}
transfers=${TRANSFERS:-20}
size_mib=${SIZE_MIB:-64}
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-scale.XXXXXX)
. scripts/common.sh

if [ -z "${BIN:-}" ]; then
    cargo build --release --locked --bins -q
    cargo build --release --locked -q -p keyferry-agent --example idle_agents
fi
bin=${BIN:-$PWD/target/release}

rss() { awk -v f="$2" '$1 == f ":" { print int($2 / 1024) }' "/proc/$1/status"; }
# CPU time of the whole machine so far (user + nice + system + irq + softirq), in ticks.
cpu_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

# Every idle agent is a descriptor in the broker and in idle_agents.
conns=$((idle + 4 * transfers + 100))
ulimit -n "$((conns + 1024))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt "$conns" ] || { echo "need $conns open files; ulimit -n is $(ulimit -n)" >&2; exit 1; }
"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker" \
    --max-connections "$conns" --max-connections-per-ip "$conns" --max-transfers-per-agent 4 \
    >"$work/broker.out" 2>"$work/broker.log" &
broker_pid=$!
pids+=("$broker_pid")
for _ in $(seq 100); do grep -q fingerprint "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
addr=$(awk '/listening on/ {print $NF}' "$work/broker.out")
agent() { "$bin/agent" --broker "$addr" "$@"; }
# One identity for the idle agents, one for the senders, one for the receivers
# (RSA key generation is not what we measure); names differ per agent.
for who in idle senders receivers; do agent --home "$work/$who" --name "$who" --list >/dev/null 2>&1; done
rss_start=$(rss "$broker_pid" VmRSS)

echo "connecting $idle idle agents" >&2
mkfifo "$work/hold"
"$bin/examples/idle_agents" "$addr" "$work/idle" "$idle" <"$work/hold" >"$work/idle.out" 2>"$work/idle.err" &
pids+=($!)
exec 3>"$work/hold" # keeps the idle agents' stdin open
for _ in $(seq 1200); do grep -q connected "$work/idle.out" 2>/dev/null && break; sleep 0.1; done
grep -q "connected $idle" "$work/idle.out" || { echo "idle agents failed: $(cat "$work/idle.err")" >&2; exit 1; }
online=$(agent --home "$work/senders" --name senders --list 2>/dev/null | grep -c '^idle-' || true)
rss_idle=$(rss "$broker_pid" VmRSS)

echo "starting $transfers transfers of $size_mib MiB" >&2
mkdir -p "$work/src"
# A file of its own for each transfer: 20 senders reading one file would find
# much of it in the CPU's cache, which one sender of a 20-times larger file does not.
for i in $(seq -w 1 "$transfers"); do
    head -c "$((size_mib << 20))" /dev/urandom >"$work/src/data-$i.bin"
done
sync # the sources' writeback is not the transfers' cost
recv_pids=()
for i in $(seq -w 1 "$transfers"); do
    mkdir -p "$work/in-$i"
    agent --home "$work/receivers" --name "r$i" --role receiver --once --out-dir "$work/in-$i" \
        >"$work/recv-$i.out" 2>"$work/recv-$i.err" &
    recv_pids+=($!)
done
for i in $(seq -w 1 "$transfers"); do
    for _ in $(seq 200); do grep -q "receiving as" "$work/recv-$i.out" 2>/dev/null && break; sleep 0.05; done
done
t0=$(date +%s.%N)
c0=$(cpu_ticks)
send_pids=()
for i in $(seq -w 1 "$transfers"); do
    agent --home "$work/senders" --name "s$i" --role sender --to "r$i" --file "$work/src/data-$i.bin" --json --direct never \
        >"$work/send-$i.json" 2>"$work/send-$i.err" &
    send_pids+=($!)
done
failed=0
for pid in "${send_pids[@]}" "${recv_pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
t1=$(date +%s.%N)
c1=$(cpu_ticks)
[ "$failed" -eq 0 ] || { echo "$failed agents failed" >&2; tail -n 3 "$work"/send-*.err >&2; exit 1; }
for i in $(seq -w 1 "$transfers"); do
    cmp -s "$work/src/data-$i.bin" "$work/in-$i/data-$i.bin" || { echo "transfer $i differs" >&2; exit 1; }
done
rss_peak=$(rss "$broker_pid" VmHWM)
rss_end=$(rss "$broker_pid" VmRSS)

sed -n 's/.*"bytes":\([0-9]*\).*"seconds":\([0-9.]*\).*/\1 \2/p' "$work"/send-*.json |
    awk '{ printf "%.1f\n", $1 / $2 / 1e6 }' | sort -g >"$work/rates.txt"
cpu_per_gib=$(awk -v t="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v b="$((transfers * (size_mib << 20)))" \
    'BEGIN { printf "%.2f", t / hz / (b / 2^30) }')
total=$(awk -v n="$transfers" -v b="$((size_mib << 20))" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", n * b / (c - a) / 1e6 }')

cat <<TABLE

| measure (${idle} idle agents, ${transfers} × ${size_mib} MiB at once) | value |
|---|---|
| idle agents listed online by the broker | ${online} |
| broker RSS at start / with the idle agents / after the transfers | ${rss_start} / ${rss_idle} / ${rss_end} MiB |
| broker peak RSS (VmHWM) | ${rss_peak} MiB |
| per-transfer throughput, min / median / max | $(head -1 "$work/rates.txt") / $(median <"$work/rates.txt") / $(tail -1 "$work/rates.txt") MB/s |
| all transfers together (first start to last receipt) | ${total} MB/s |
| machine CPU while they ran, per GiB moved | ${cpu_per_gib} CPU-s |
TABLE
