#!/usr/bin/env bash
# Protocol versions meeting: builds the agent and broker of the last protocol
# version 1 commit in a temporary git worktree, then
#   1. runs that version 1 agent against this tree's (version 2) broker, and
#   2. runs this tree's agent against the version 1 broker.
# Each must end with one line naming both versions and what to upgrade, and
# exit code 1. Everything runs on 127.0.0.1 and is stopped at the end.
#
# usage: scripts/v1-interop.sh            (builds in debug; ~5 min the first time)
set -euo pipefail
V1_COMMIT=${V1_COMMIT:-eea02f7}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    git -C "$root" worktree remove --force "$work/v1" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== building version 1 ($V1_COMMIT) and this tree"
git worktree add --quiet --detach "$work/v1" "$V1_COMMIT"
(cd "$work/v1" && CARGO_TARGET_DIR="$root/target/v1" cargo build --quiet --bins)
cargo build --quiet --bins
v1="$root/target/v1/debug"
v2="$root/target/debug"

home() { # home DIR KEY
    mkdir -p "$1"; chmod 700 "$1"
    cp "common/tests/fixtures/$2.pem" "$1/identity.pem"; chmod 600 "$1/identity.pem"
}

check() { # check LABEL RC STDERR-FILE
    local line rc=$2
    line=$(tail -n 1 "$3")
    echo "$1: exit $rc: $line"
    if [ "$rc" != 1 ] || ! grep -q "version 1" <<<"$line" || ! grep -q "version 2" <<<"$line" \
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

meet "a version 1 agent, a version 2 broker" "$v2/broker" "$v1/agent" alice
meet "a version 2 agent, a version 1 broker" "$v1/broker" "$v2/agent" bob
echo "both directions refuse with one clear line"
