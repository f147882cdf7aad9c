#!/usr/bin/env bash
# The activity summary's bound, measured: a release activator (static config, one
# service) gets 10,000 identical requests, then 100,000 requests each from a distinct
# client (User-Agent and path of 200+ bytes each); prints its RSS after each and what
# one stats report carries for the service (entries, longest fields, bytes).
#
#   bench/activity.sh
#   ACTIVITY_REQUESTS=20000 bench/activity.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
N=${ACTIVITY_REQUESTS:-100000}
cargo build -q --release -p snooze-activator -p snooze-e2e --bins
T=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
BACK=$(free_port); ACT=$(free_port); ADMIN=$(free_port)
echo "{\"services\":[{\"namespace\":\"bench\",\"name\":\"web\",\"port\":$ACT,\"endpoints\":[\"127.0.0.1:$BACK\"]}]}" > "$work/cfg.json"
POD_NAME=backend "$T/snooze-testapp" --listen 127.0.0.1:$BACK 2>/dev/null & pids+=($!)
"$T/snooze-activator" --static-config "$work/cfg.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$ADMIN --worker-threads 1 2>"$work/activator.log" & ACT_PID=$!; pids+=($ACT_PID)
wait_port $BACK; wait_port $ACT
python3 - "$ACT" "$ACT_PID" "$ADMIN" "$N" <<'PY'
import http.client, json, sys, time, urllib.request
port, pid, admin, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
def run(count, distinct):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t = time.time()
    for i in range(count):
        agent = f"client-{i}-" + "x" * 200 if distinct else "same/1.0"
        path = f"/p{i}/" + "y" * 200 if distinct else "/"
        c.request("GET", path, headers={"User-Agent": agent})
        c.getresponse().read()
    return time.time() - t
print(f"activator RSS at start: {rss()} KB")
print(f"10,000 identical requests in {run(10000, False):.1f} s: RSS {rss()} KB")
print(f"{n:,} requests from distinct clients in {run(n, True):.1f} s: RSS {rss()} KB")
line = urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/stats", timeout=5).readline()
acts = json.loads(line)["services"][0].get("activity", [])
print(f"one stats report: {len(acts)} activity entries, longest User-Agent {max(len(a.get('userAgent', '')) for a in acts)} B, "
      f"longest path {max(len(a.get('path', '')) for a in acts)} B, {len(line):,} bytes in all")
PY
