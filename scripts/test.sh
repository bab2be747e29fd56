#!/usr/bin/env bash
# Every check CI runs, in order: formatting, lints, the test suite (with the
# Wycheproof known-answer counts printed), and the RustSec advisory audit.
# Needs cargo-nextest and cargo-audit (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

advisory_db=${KEYFERRY_ADVISORY_DB:-../shared/advisory-db}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries: build them first.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast
# The known-answer tests ran above; run them once more visibly for their counts.
cargo test -p keyferry-common --test wycheproof --locked -q -- --nocapture --test-threads=1 2>&1 | grep -o 'wycheproof .*'
cargo audit --db "$advisory_db" --no-fetch
