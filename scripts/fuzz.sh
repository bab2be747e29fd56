#!/usr/bin/env bash
# Fuzz the frame decoder, the message/offer decoders and the receiver's record
# opener with cargo-fuzz (libFuzzer + AddressSanitizer), each for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# cargo-fuzz needs nightly-only compiler flags; this machine has stable Rust
# only, so RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. Corpora and
# crash artifacts go to fuzz/corpus/ and fuzz/artifacts/ (not committed).
# Exits non-zero if any target finds a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz build -O
for target in frame message open_chunk; do
    echo "== fuzzing $target for ${seconds}s"
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 |
        grep -E '^(Done|stat::number_of_executed_units)|ERROR|panicked' || true
    # cargo fuzz exits non-zero on a crash; pipefail would hide it behind grep.
    if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "CRASH in $target: see fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "no crashes"
