#!/usr/bin/env bash
# keyferry throughput, memory and latency against scp, measured in one run.
#
#   scripts/bench.sh                 1 GiB, a warm-up round and 6 rounds, the order turning
#   SIZE_MIB=4096 scripts/bench.sh   a larger file (memory must not grow)
#   RUNS=9 LATENCY_RUNS=20 scripts/bench.sh
#   RECV_FLAGS=--trust-sender-hash scripts/bench.sh   the receiver without its own hash
#   SEND_FLAGS='--direct never' scripts/bench.sh      through the broker's relay (by
#                                    default the stream goes direct on one machine)
#   THIRD=relay scripts/bench.sh     the third in each round is keyferry through the
#                                    relay (5 s rekey) instead of the 100 ms rekey
#   WARMUP=0 scripts/bench.sh        count the first round too (by default a round
#                                    of the three goes before and is not counted)
#
# Installs openssh-server (Debian package) if missing and starts a private sshd
# on a loopback port with its own config and keys, stopped by PID at the end.
# Prints a Markdown table: median MB/s of keyferry (5 s and 100 ms rekey) and of
# `scp -c aes256-gcm@openssh.com`, their ratio, peak RSS of broker, sender and
# receiver, session keys used, the median end-to-end time of a 1 KiB file, and
# how fast one core seals and opens through the protocol's code in this build
# (common/examples/seal_speed.rs: shows the AES-NI/SHA-NI paths are in use).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=${SIZE_MIB:-1024}
runs=${RUNS:-6}
latency_runs=${LATENCY_RUNS:-10}
# BENCH_DIR=/dev/shm measures without the disk (keyferry fsyncs what it receives, scp does not).
work=$(mktemp -d -p "${BENCH_DIR:-${TMPDIR:-/tmp}}" keyferry-bench.XXXXXX)
. scripts/common.sh
# More to undo than the common cleanup.
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/sshd.pid" ] && kill "$(cat "$work/sshd.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

if [ ! -x /usr/sbin/sshd ]; then
    echo "installing openssh-server" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
fi
[ -x /usr/bin/time ] || { apt-get update -qq >/dev/null; apt-get install -y -qq time >/dev/null; }

cargo build --release --locked --bins -q
cargo build --release --locked -q -p keyferry-common --example seal_speed
bin=$PWD/target/release

now() { date +%s.%N; }
# CPU seconds (user + system) of process $1, and of its children it reaped.
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
children_cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ print ($16 + $17) / t }' "/proc/$1/stat"; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }

echo "generating ${size_mib} MiB of random data" >&2
head -c "$((size_mib << 20))" /dev/urandom >"$work/data.bin"
bytes=$((size_mib << 20))

# --- sshd for the scp reference -------------------------------------------
port=$((20000 + RANDOM % 20000))
mkdir -p /run/sshd "$work/scp-out"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
cat >"$work/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
PidFile $work/sshd.pid
CONF
/usr/sbin/sshd -f "$work/sshd_config" -E "$work/sshd.log"
for _ in $(seq 50); do [ -f "$work/sshd.pid" ] && break; sleep 0.1; done
# One scp. Prints: seconds(wall) client_cpu sshd_cpu (the server side's CPU is
# that of the session process sshd forks and reaps when it ends).
scp_once() {
    rm -f "$work/scp-out/data.bin"
    local t0 t1 sshd0 sshd1
    sshd0=$(children_cpu_of "$(cat "$work/sshd.pid")")
    t0=$(now)
    /usr/bin/time -f '%U %S' -o "$work/scp.cpu" scp -q -c aes256-gcm@openssh.com -P "$port" -i "$work/client_key" \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
        "$work/data.bin" "$(id -un)@127.0.0.1:$work/scp-out/data.bin"
    t1=$(now)
    sleep 0.2 # the session process is reaped just after the client exits
    sshd1=$(children_cpu_of "$(cat "$work/sshd.pid")")
    cmp -s "$work/data.bin" "$work/scp-out/data.bin" || { echo "scp copy differs" >&2; exit 1; }
    local c
    read -r -a c <"$work/scp.cpu"
    awk -v a="$t0" -v b="$t1" -v u="${c[0]}" -v s="${c[1]}" -v d0="$sshd0" -v d1="$sshd1" \
        'BEGIN { print b - a, u + s, d1 - d0 }'
}

# --- keyferry ------------------------------------------------------------
"$bin/broker" --listen 127.0.0.1:0 --data-dir "$work/broker" >"$work/broker.out" 2>"$work/broker.log" &
broker_pid=$!
pids+=("$broker_pid")
for _ in $(seq 100); do grep -q fingerprint "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
addr=$(awk '/listening on/ {print $NF}' "$work/broker.out")
agent() { "$bin/agent" --broker "$addr" "$@"; }
# Create both identities once (RSA key generation is not what we measure).
agent --home "$work/alice" --name alice --list >/dev/null 2>&1
agent --home "$work/bob" --name bob --list >/dev/null 2>&1

# One transfer: receiver --once and sender, each under /usr/bin/time for peak RSS
# and CPU time. Prints: seconds(wall, sender process) session_keys sender_rss_kib
# receiver_rss_kib cpu_seconds(user + system, both agents) sender_cpu
# receiver_cpu broker_cpu
keyferry_once() {
    local rekey=$1 file=$2 extra=${3:-}
    rm -rf "$work/inbox"; mkdir -p "$work/inbox"
    /usr/bin/time -f '%M %U %S' -o "$work/recv.rss" "$bin/agent" --broker "$addr" --home "$work/bob" --name bob \
        --role receiver --once --out-dir "$work/inbox" ${RECV_FLAGS:-} >"$work/recv.out" 2>"$work/recv.err" &
    local rpid=$!
    for _ in $(seq 200); do grep -q "receiving as" "$work/recv.out" 2>/dev/null && break; sleep 0.05; done
    local t0 t1 b0 b1
    b0=$(cpu_of "$broker_pid")
    t0=$(now)
    /usr/bin/time -f '%M %U %S' -o "$work/send.rss" "$bin/agent" --broker "$addr" --home "$work/alice" --name alice \
        --role sender --to bob --file "$file" --json --rekey-interval "$rekey" ${SEND_FLAGS:-} $extra >"$work/send.json" 2>"$work/send.err"
    t1=$(now)
    wait "$rpid"
    b1=$(cpu_of "$broker_pid")
    cmp -s "$file" "$work/inbox/$(basename "$file")" || { echo "keyferry copy differs" >&2; exit 1; }
    local keys
    keys=$(sed -n 's/.*"session_keys":\([0-9]*\).*/\1/p' "$work/send.json")
    local send recv
    read -r -a send <"$work/send.rss"
    read -r -a recv <"$work/recv.rss"
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }') $keys ${send[0]} ${recv[0]}" \
        "$(awk -v a="${send[1]}" -v b="${send[2]}" -v c="${recv[1]}" -v d="${recv[2]}" -v b0="$b0" -v b1="$b1" \
            'BEGIN { print a + b + c + d, a + b, c + d, b1 - b0 }')"
}

: >"$work/kf5.txt"; : >"$work/kf100.txt"; : >"$work/scp.txt"
# Which of the three goes first turns with each round: on this VM a
# transfer's place in a round changes its time (why is not known; writing
# into pages just freed is a suspect), and a fixed order would hand the
# favoured place to one of them. Each goes first equally often when RUNS is
# a multiple of 3 (the default, 6).
measure() {
    case $1 in
        0) keyferry_once 5s "$work/data.bin" >>"$work/kf5.txt" ;;
        1) scp_once >>"$work/scp.txt" ;;
        2) if [ "${THIRD:-}" = relay ]; then
               keyferry_once 5s "$work/data.bin" "--direct never" >>"$work/kf100.txt"
           else
               keyferry_once 100ms "$work/data.bin" >>"$work/kf100.txt"
           fi ;;
    esac
}
if [ $((runs % 3)) -ne 0 ]; then
    echo "note: RUNS=$runs is not a multiple of 3, so the three do not go first equally often" >&2
fi
# The first transfers of a run are often its slowest (cold caches, fresh
# pages): a round of the three goes first and is not counted, only printed
# (WARMUP=0 counts from the start).
warm=
if [ "${WARMUP:-1}" != 0 ]; then
    echo "warm-up round (not counted)" >&2
    for k in 0 1 2; do measure "$k"; done
    warm=$(paste "$work/kf5.txt" "$work/scp.txt" "$work/kf100.txt")
    : >"$work/kf5.txt"; : >"$work/kf100.txt"; : >"$work/scp.txt"
fi
for i in $(seq "$runs"); do
    echo "run $i/$runs" >&2
    for k in 0 1 2; do measure $(((i - 1 + k) % 3)); done
done

head -c 1024 /dev/urandom >"$work/small.bin"
: >"$work/lat.txt"
for _ in $(seq "$latency_runs"); do
    keyferry_once 5s "$work/small.bin" | awk '{ print $1 }' >>"$work/lat.txt"
done

broker_rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$broker_pid/status")
kill "$broker_pid"; wait "$broker_pid" 2>/dev/null || true

kf5=$(awk '{ print $1 }' "$work/kf5.txt" | median)
kf100=$(awk '{ print $1 }' "$work/kf100.txt" | median)
scp=$(awk '{ print $1 }' "$work/scp.txt" | median)
# Ratios paired within a round (keyferry 5 s / scp of the same round), then
# their median, beside the ratio of the medians.
paired=$(paste "$work/kf5.txt" "$work/scp.txt" | awk '{ print $9 / $1 }' | median | awk '{ printf "%.2f", $1 }')
gib=$(awk -v b="$bytes" 'BEGIN { print b / 1073741824 }')
per_gib() { awk -v g="$gib" '{ printf "%.2f\n", $1 / g }'; }
col() { awk -v c="$2" '{ print $c }' "$1" | median | per_gib; }
kf_send=$(col "$work/kf5.txt" 6); kf_recv=$(col "$work/kf5.txt" 7); kf_broker=$(col "$work/kf5.txt" 8)
kf_machine=$(awk '{ print $5 + $8 }' "$work/kf5.txt" | median | per_gib)
scp_client=$(col "$work/scp.txt" 2); scp_sshd=$(col "$work/scp.txt" 3)
scp_machine=$(awk '{ print $2 + $3 }' "$work/scp.txt" | median | per_gib)
kf100_machine=$(awk '{ print $5 + $8 }' "$work/kf100.txt" | median | per_gib)
kf5_mbps=$(mbps "$bytes" "$kf5"); kf100_mbps=$(mbps "$bytes" "$kf100"); scp_mbps=$(mbps "$bytes" "$scp")
ratio=$(awk -v a="$kf5_mbps" -v b="$scp_mbps" 'BEGIN { printf "%.2f", a / b }')
ratio100=$(awk -v a="$kf100_mbps" -v b="$kf5_mbps" 'BEGIN { printf "%.3f", a / b }')
# CPU time is far less disturbed by other jobs than wall time: the cost of
# rekeying shows better here.
cpu5=$(awk '{ print $5 }' "$work/kf5.txt" | median)
cpu100=$(awk '{ print $5 }' "$work/kf100.txt" | median)
cpu_ratio=$(awk -v a="$cpu100" -v b="$cpu5" 'BEGIN { printf "%.3f", a / b }')
send_rss=$(awk '{ print $3 }' "$work/kf5.txt" "$work/kf100.txt" | sort -g | tail -1)
recv_rss=$(awk '{ print $4 }' "$work/kf5.txt" "$work/kf100.txt" | sort -g | tail -1)
keys5=$(awk '{ print $2 }' "$work/kf5.txt" | median)
keys100=$(awk '{ print $2 }' "$work/kf100.txt" | median)
lat=$(median <"$work/lat.txt")
# One core sealing and opening through the protocol's code, in this build: the
# proof that the hardware paths are in use (without them: about 35 MB/s).
seal_speed=$("$bin/examples/seal_speed" 256)
# The hardware paths the crypto crates detect at run time (AES-NI, VAES, SHA-NI).
cpu_paths=$(grep -m1 -ow -E 'aes|vaes|sha_ni|avx2|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')

third="100 ms rekey"
[ "${THIRD:-}" = relay ] && third="relayed (--direct never), 5 s rekey"
cat <<TABLE

| measure (${size_mib} MiB, ${runs} runs each, median) | value |
|---|---|
| keyferry, 5 s rekey | ${kf5_mbps} MB/s (${keys5} session keys) |
| keyferry, ${third} | ${kf100_mbps} MB/s (${keys100} session keys) |
| scp -c aes256-gcm@openssh.com | ${scp_mbps} MB/s |
| ratio keyferry / scp (of the medians; median of the ratios paired in each round) | ${ratio} (${paired}) |
| CPU-s per GiB, keyferry 5 s: sender / receiver / broker / all three | ${kf_send} / ${kf_recv} / ${kf_broker} / ${kf_machine} |
| CPU-s per GiB, keyferry ${third}: all three | ${kf100_machine} |
| CPU-s per GiB, scp: client / sshd / both | ${scp_client} / ${scp_sshd} / ${scp_machine} |
| ratio ${third} / the first, throughput | ${ratio100} |
| agent CPU time (user + system, sender + receiver), the first / ${third} | ${cpu5} s / ${cpu100} s (ratio ${cpu_ratio}) |
| peak RSS sender / receiver | $((send_rss / 1024)) MiB / $((recv_rss / 1024)) MiB |
| peak RSS broker | $((broker_rss / 1024)) MiB |
| 1 KiB file end to end (connect, auth, offer, transfer, receipt), median of ${latency_runs} | $(awk -v s="$lat" 'BEGIN { printf "%.0f ms", s * 1000 }') |
| one core through the protocol's code (SHA-256 of the stream, AES-256-GCM, frames) | ${seal_speed} |
| CPU instructions for AES and SHA-256 present | ${cpu_paths:-none (the crypto runs on portable code: expect about 35 MB/s)} |
TABLE

# Each round as it went, so a place in the round that was favoured shows.
echo
echo "rounds: seconds, and CPU-s of all the processes, of each (the first in its round marked *;"
echo "w is the warm-up round, not counted)"
{ [ -n "$warm" ] && echo "w $warm"; paste "$work/kf5.txt" "$work/scp.txt" "$work/kf100.txt" | awk '{ print NR, $0 }'; } | awk '
    { r = $1; $1 = ""; $0 = $0; f = (r == "w") ? 1 : (r - 1) % 3 + 1
      printf "%s: kf5 %.2f s %.2f%s | scp %.2f s %.2f%s | kf100 %.2f s %.2f%s\n", r,
          $1, $5 + $8, (f == 1 ? " *" : ""), $9, $10 + $11, (f == 2 ? " *" : ""),
          $12, $16 + $19, (f == 3 ? " *" : "") }'
