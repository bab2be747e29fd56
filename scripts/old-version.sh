#!/usr/bin/env bash
# Protocol versions meeting: builds the agent and broker of an older protocol
# version's last commit in a temporary git worktree, then
#   1. runs that old agent against this tree's broker, and
#   2. runs this tree's agent against the old broker.
# Each must end with one line naming both versions and what to upgrade, and
# exit code 1. Everything runs on 127.0.0.1 and is stopped at the end.
#
# usage: scripts/old-version.sh           (version 2, commit 565ad4b)
#        OLD_COMMIT=eea02f7 OLD_VERSION=1 scripts/old-version.sh   (version 1)
#        OLD_COMMIT=c4ee9bc OLD_VERSION=5 scripts/old-version.sh   (version 5)
# (builds in debug; ~5 min the first time)
set -euo pipefail
OLD_COMMIT=${OLD_COMMIT:-565ad4b}
OLD_VERSION=${OLD_VERSION:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
NEW_VERSION=$(sed -n 's/^pub const PROTOCOL_VERSION: u16 = \([0-9]*\);/\1/p' common/src/lib.rs)
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    git -C "$root" worktree remove --force "$work/old" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== building version $OLD_VERSION ($OLD_COMMIT) and this tree"
git worktree add --quiet --detach "$work/old" "$OLD_COMMIT"
(cd "$work/old" && CARGO_TARGET_DIR="$root/target/v$OLD_VERSION" cargo build --quiet --bins)
cargo build --quiet --bins
old="$root/target/v$OLD_VERSION/debug"
new="$root/target/debug"

home() { # home DIR KEY
    mkdir -p "$1"; chmod 700 "$1"
    cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"
}

check() { # check LABEL RC STDERR-FILE
    local line rc=$2
    line=$(tail -n 1 "$3")
    echo "$1: exit $rc: $line"
    if [ "$rc" != 1 ] || ! grep -q "version $OLD_VERSION" <<<"$line" \
        || ! grep -q "version $NEW_VERSION" <<<"$line" \
        || ! grep -q "upgrade" <<<"$line"; then
        echo "FAIL: expected exit 1 and one line naming both versions and what to upgrade"
        exit 1
    fi
}

meet() { # meet LABEL BROKER-BIN AGENT-BIN NAME: the agent's --list against the broker
    local port dir="$work/$4" rc
    port=$(free_port)
    "$2" --listen "127.0.0.1:$port" --data-dir "$dir-broker" >"$dir-broker.log" 2>&1 &
    pids+=($!)
    sleep 1
    home "$dir" "$4"
    set +e
    "$3" --broker "127.0.0.1:$port" --home "$dir" --name "$4" --list 2>"$dir.err"
    rc=$?
    set -e
    check "$1" "$rc" "$dir.err"
}

meet "a version $OLD_VERSION agent, a version $NEW_VERSION broker" "$new/broker" "$old/agent" alice
meet "a version $NEW_VERSION agent, a version $OLD_VERSION broker" "$old/broker" "$new/agent" bob
echo "both directions refuse with one clear line"
