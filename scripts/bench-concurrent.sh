#!/usr/bin/env bash
# Many transfers at once against one (issue: "20 concurrent transfers: aggregate
# throughput at least that of one"): alternating rounds of one transfer of
# TOTAL_MIB and of TRANSFERS transfers of TOTAL_MIB / TRANSFERS each, the same
# bytes in all, each round a fresh run of scripts/scale.sh (10 idle agents).
# Prints every round, the medians, their ratio, and the machine's CPU per GiB.
# The two shapes take turns going first (an even ROUNDS gives each as many).
#
#   scripts/bench-concurrent.sh                        6 rounds, 1 x 1280 vs 20 x 64 MiB, disk
#   BENCH_DIR=/dev/shm ROUNDS=4 scripts/bench-concurrent.sh
#   BIN=/abs/path/to/binaries scripts/bench-concurrent.sh  another build (see scale.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-6}
many=${TRANSFERS:-20}
total=${TOTAL_MIB:-1280}
[ $((total % many)) -eq 0 ] || { echo "TOTAL_MIB ($total) must be a multiple of TRANSFERS ($many)" >&2; exit 2; }
[ -n "${BIN:-}" ] || {
    cargo build --release --locked --bins -q
    cargo build --release --locked -q -p keyferry-agent --example idle_agents
}
export BIN=${BIN:-$PWD/target/release}
work=$(mktemp -d)
. scripts/common.sh
field() { awk -F'|' -v k="$1" 'index($2, k) { gsub(/[^0-9.]/, "", $3); print $3 }'; }

echo "| round | 1 x $total MiB (MB/s) | $many x $((total / many)) MiB together (MB/s) | CPU-s per GiB, one / many |"
echo "|---|---|---|---|"
for r in $(seq "$rounds"); do
    # Each shape goes first in every other round.
    order="1 $many"
    [ $((r % 2)) -eq 0 ] && order="$many 1"
    for n in $order; do
        out=$(IDLE=10 TRANSFERS=$n SIZE_MIB=$((total / n)) scripts/scale.sh 2>"$work/scale.err") ||
            { echo "scale.sh failed (TRANSFERS=$n):" >&2; cat "$work/scale.err" >&2; exit 1; }
        field "all transfers together" <<<"$out" >>"$work/rate-$n"
        field "machine CPU" <<<"$out" >>"$work/cpu-$n"
    done
    echo "| $r | $(tail -1 "$work/rate-1") | $(tail -1 "$work/rate-$many") | $(tail -1 "$work/cpu-1") / $(tail -1 "$work/cpu-$many") |"
done
one=$(median <"$work/rate-1")
all=$(median <"$work/rate-$many")
echo "| median | $one | $all | $(median <"$work/cpu-1") / $(median <"$work/cpu-$many") |"
echo
echo "$many at once / one: $(awk -v a="$all" -v b="$one" 'BEGIN { printf "%.2f", a / b }') (ratio of medians)"
