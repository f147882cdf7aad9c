#!/usr/bin/env bash
# The admin port under a flood of slow clients (issue 26): a release activator (static
# config, one service) and `snooze-bench slow-admin`, which opens ADMIN_CONNECTIONS
# connections from ADMIN_SOURCES loopback addresses, each sending a head it never
# finishes, and asks /readyz from 127.0.0.1 every 100 ms before and during the flood.
# Prints /readyz latency and answers, how many flood connections were closed at once
# (the per-client and total bounds), the activator's open descriptors against its
# limit, and when the last slow one was cut (the 5 s header timeout).
#
#   bench/admin.sh                                   # 10,000 connections, 200 sources
#   ADMIN_CONNECTIONS=2000 ADMIN_SOURCES=1 bench/admin.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
N=${ADMIN_CONNECTIONS:-10000}
SOURCES=${ADMIN_SOURCES:-200}
cargo build -q --release -p snooze-activator -p snooze-e2e --bins
T=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ADMIN=$(free_port); PORT=$(free_port)
echo "{\"services\": [{\"namespace\": \"bench\", \"name\": \"web\", \"port\": $PORT, \"endpoints\": []}]}" > "$work/activator.json"
# The activator keeps the limit it is started with (a pod's is usually 1,048,576).
"$T/snooze-activator" --static-config "$work/activator.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$ADMIN --worker-threads 1 >"$work/activator.log" 2>&1 & pid=$!
for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$ADMIN) 2>/dev/null && break; sleep 0.1; done
limit=$(awk '/Max open files/ {print $4}' "/proc/$pid/limits")
echo "activator pid $pid, open-file limit $limit; admin bounds: 64 per client address, 1,024 in all, 5 s to send a head"
"$T/snooze-bench" slow-admin --target 127.0.0.1:$ADMIN --connections "$N" --sources "$SOURCES" --pid "$pid"
