#!/usr/bin/env bash
# Data-path benchmark, one command: the same load against (a) the backend directly,
# (b) nginx as a reverse proxy with 1 worker, (c) HAProxy with 1 thread (keep-alive
# both sides, `http-reuse always`), (d) the activator with 1 worker thread, (e) the same
# with its activity summary off, and (f) with BENCH_BASELINE an older build of the
# activator, in alternating rounds; then the activator's RSS idle and with held requests, and the
# time from a pod appearing to the held requests' answers. Prints a table and ratios.
#
#   bench/datapath.sh                                  # defaults below
#   BENCH_DURATION=10s BENCH_ROUNDS=5 BENCH_CONNECTIONS=64 bench/datapath.sh
#   BENCH_HELD=10000 bench/datapath.sh
#   BENCH_SERVICES=1000 bench/datapath.sh    # 1,000 more services configured
#   BENCH_KEEP=1 bench/datapath.sh           # keep results.jsonl and the logs in /tmp/bench-work
#   BENCH_PATH='/bytes?n=8192' bench/datapath.sh   # 8 KiB responses (27 B at /)
#   BENCH_BASELINE=/dir bench/datapath.sh    # also snooze-activator and snooze-bench
#                                            # from /dir (an older release build): before/after
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
DURATION=${BENCH_DURATION:-5s}
ROUNDS=${BENCH_ROUNDS:-3}
CONNS=${BENCH_CONNECTIONS:-32}
HELD=${BENCH_HELD:-10000}
# Extra services configured on the activator (routing must not slow down with them).
EXTRA=${BENCH_SERVICES:-0}
PATH_Q=${BENCH_PATH:-/}

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  [ "$(id -u)" = 0 ] || { echo "nginx is needed: apt-get install nginx-light" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
  [ "$(id -u)" = 0 ] || { echo "HAProxy is needed: apt-get install haproxy" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
BASE=${BENCH_BASELINE:-}
[ -z "$BASE" ] || [ -x "$BASE/snooze-activator" ] || { echo "BENCH_BASELINE: no snooze-activator in $BASE" >&2; exit 1; }
cargo build -q --release -p snooze-activator -p snooze-e2e --bins
T=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${BENCH_KEEP:-}" ] && trap 'cp -r "$work" /tmp/bench-work; cleanup' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACK=$(free_port); NGX=$(free_port); ACT=$(free_port); ADMIN=$(free_port); COLD=$(free_port)
HAP=$(free_port); OLD=$(free_port); OLD_ADMIN=$(free_port); OLD_COLD=$(free_port)
NOSUM=$(free_port); NOSUM_ADMIN=$(free_port); NOSUM_COLD=$(free_port)
wait_port() { for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

POD_NAME=backend "$T/snooze-testapp" --listen 127.0.0.1:$BACK 2>/dev/null & BACK_PID=$!; pids+=($BACK_PID)
mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log stderr error;
events { worker_connections 65536; }
http {
  access_log off;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BACK; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
CONF
"$NGINX" -p "$work" -c "$work/nginx.conf" & NGX_PID=$!; pids+=($NGX_PID)
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend bench
  bind 127.0.0.1:$HAP
  default_backend backend
backend backend
  server s1 127.0.0.1:$BACK maxconn 0
CONF
"$HAPROXY" -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & HAP_PID=$!; pids+=($HAP_PID)
python3 - "$work/activator.json" "$ACT" "$COLD" "$BACK" "$EXTRA" <<'PY'
import json, sys
path, act, cold, back, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
services = [
    {"namespace": "bench", "name": "web", "port": act, "endpoints": [f"127.0.0.1:{back}"]},
    {"namespace": "bench", "name": "cold", "port": cold, "endpoints": [], "timeout": "1h", "maxQueuedRequests": 100000},
]
# Ports 21000.. sit below the ephemeral range, away from the ones picked above.
services += [{"namespace": "bench", "name": f"extra-{i}", "port": 21000 + i, "endpoints": [f"127.0.0.1:{back}"]} for i in range(extra)]
json.dump({"services": services}, open(path, "w"))
PY
# --max-connections: the held requests below need one descriptor each and no pod
# connection, so the default cap (half the open-file limit) would stop them early on a
# machine with a low limit (8,976 of 10,000 at a limit of 20,000).
"$T/snooze-activator" --static-config "$work/activator.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$ADMIN --worker-threads 1 --max-queued-total 100000 \
  --max-connections "$(( $(ulimit -n) - 1024 ))" 2>"$work/activator.log" & ACT_PID=$!; pids+=($ACT_PID)
# The same activator with the activity summary off (`--activity-summary=false`): what
# keeping who sent the requests costs, in the same rounds.
sed "s/\"port\": $ACT,/\"port\": $NOSUM,/; s/\"port\": $COLD,/\"port\": $NOSUM_COLD,/" "$work/activator.json" > "$work/activator-nosum.json"
"$T/snooze-activator" --static-config "$work/activator-nosum.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$NOSUM_ADMIN --worker-threads 1 --activity-summary=false 2>"$work/activator-nosum.log" & NOSUM_PID=$!; pids+=($NOSUM_PID)
if [ -n "$BASE" ]; then
  sed "s/\"port\": $ACT,/\"port\": $OLD,/; s/\"port\": $COLD,/\"port\": $OLD_COLD,/" "$work/activator.json" > "$work/activator-old.json"
  "$BASE/snooze-activator" --static-config "$work/activator-old.json" --listen-address 127.0.0.1 \
    --admin-address 127.0.0.1:$OLD_ADMIN --worker-threads 1 --max-queued-total 100000 2>"$work/activator-old.log" & OLD_PID=$!; pids+=($OLD_PID)
  wait_port $OLD
fi
wait_port $BACK; wait_port $NGX; wait_port $ACT; wait_port $HAP; wait_port $NOSUM

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { "$T/snooze-bench" load --url "http://127.0.0.1:$1$PATH_Q" --connections "$CONNS" --duration "$DURATION" --label "$2"; }
# One load run, with the CPU time (user + system) the process serving it spent per
# request: less at the mercy of the other tenants of a shared machine than req/s.
measure() {
  local c0 out c1
  c0=$(cpu_ticks "$3"); out=$(load "$1" "$2"); c1=$(cpu_ticks "$3")
  python3 -c 'import json, sys
d = json.loads(sys.argv[1])
d["cpu_us_per_req"] = (int(sys.argv[3]) - int(sys.argv[2])) * 1e6 / int(sys.argv[4]) / max(d["requests"], 1)
print(json.dumps(d))' "$out" "$c0" "$c1" "$(getconf CLK_TCK)"
}

echo "machine: $(nproc) cores, $(uname -r); connections=$CONNS duration=$DURATION rounds=$ROUNDS path=$PATH_Q services=$((EXTRA + 2))"
load $BACK warmup >/dev/null; load $NGX warmup >/dev/null; load $HAP warmup >/dev/null; load $ACT warmup >/dev/null; load $NOSUM warmup >/dev/null
[ -z "$BASE" ] || load $OLD warmup >/dev/null
: > "$work/results.jsonl"
NGX_WORKER=$(pgrep -P "$NGX_PID" | head -n 1)
for r in $(seq 1 "$ROUNDS"); do
  measure $BACK direct "$BACK_PID" >> "$work/results.jsonl"
  measure $NGX nginx "$NGX_WORKER" >> "$work/results.jsonl"
  measure $HAP haproxy "$HAP_PID" >> "$work/results.jsonl"
  measure $ACT activator "$ACT_PID" >> "$work/results.jsonl"
  measure $NOSUM activator-nosummary "$NOSUM_PID" >> "$work/results.jsonl"
  [ -z "$BASE" ] || measure $OLD activator-before "$OLD_PID" >> "$work/results.jsonl"
done
ACT_RSS_LOADED=$(rss_kb $ACT_PID)

# RSS with requests held for a service with no pod.
"$T/snooze-bench" hold --url "http://127.0.0.1:$COLD/" --requests "$HELD" > "$work/hold.out" & HOLD_PID=$!; pids+=($HOLD_PID)
for _ in $(seq 1 600); do grep -q held "$work/hold.out" 2>/dev/null && break; sleep 0.1; done
sleep 1
ACT_RSS_HELD=$(rss_kb $ACT_PID)
QUEUED=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^snooze_activator_queued_requests\{.*name="cold"/ {print $2}')
kill $HOLD_PID 2>/dev/null || true

# A fresh activator process for the idle figure.
kill $ACT_PID; wait $ACT_PID 2>/dev/null || true
"$T/snooze-activator" --static-config "$work/activator.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$ADMIN --worker-threads 1 2>/dev/null & ACT_PID=$!; pids+=($ACT_PID)
wait_port $ACT; sleep 1
ACT_RSS_IDLE=$(rss_kb $ACT_PID)

RELEASE1=$("$T/snooze-bench" release --requests 1 --rounds 50)
RELEASE=$("$T/snooze-bench" release --requests "$(( HELD < 2000 ? HELD : 2000 ))" --rounds 3)

python3 - "$work/results.jsonl" <<PY
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows: by.setdefault(r["label"], []).append(r)
med = {k: {m: statistics.median(x[m] for x in v) for m in ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req")} | {"errors": sum(x["errors"] for x in v)} for k, v in by.items()}
print(f"{'target':<20} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>7} {'CPU µs/req':>11}   (median of rounds; CPU of the serving process)")
for k in ("direct", "nginx", "haproxy", "activator", "activator-nosummary", "activator-before"):
    if k not in med: continue
    m = med[k]; print(f"{k:<20} {m['rps']:>10.0f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} {m['p999_ms']:>9.3f} {m['errors']:>7} {m['cpu_us_per_req']:>11.1f}")
d, n, a = med["direct"], med["nginx"], med["activator"]
print(f"throughput: activator/nginx = {a['rps']/n['rps']:.2f}, activator/direct = {a['rps']/d['rps']:.2f}, nginx/direct = {n['rps']/d['rps']:.2f}")
h = med["haproxy"]
print(f"CPU per request: activator/nginx = {a['cpu_us_per_req']/n['cpu_us_per_req']:.2f}, activator/haproxy = {a['cpu_us_per_req']/h['cpu_us_per_req']:.2f}")
if "activator-nosummary" in med:
    o = med["activator-nosummary"]
    print(f"activity summary: CPU per request on/off = {a['cpu_us_per_req']/o['cpu_us_per_req']:.3f}, throughput on/off = {a['rps']/o['rps']:.3f}")
if "activator-before" in med:
    b = med["activator-before"]
    print(f"before/after: CPU per request after/before = {a['cpu_us_per_req']/b['cpu_us_per_req']:.3f}, throughput after/before = {a['rps']/b['rps']:.3f}")
print(f"added p99 over direct: activator {a['p99_ms']-d['p99_ms']:.3f} ms, nginx {n['p99_ms']-d['p99_ms']:.3f} ms")
PY
echo "activator RSS: idle $((ACT_RSS_IDLE/1024)) MB, after the load $((ACT_RSS_LOADED/1024)) MB, with $HELD requests held $((ACT_RSS_HELD/1024)) MB (queued gauge: ${QUEUED:-?})"
echo "pod appears → answer, one held request, 50 cold starts (in-process activator): $RELEASE1"
echo "pod appears → answers, $(( HELD < 2000 ? HELD : 2000 )) held requests, 3 cold starts: $RELEASE"
# The slowest answer within 300 ms of the first in every round (a SYN retransmit shows
# as ~1 s: see MAX_CONNECTING_PER_POD in activator/src/dispatch/pool.rs).
python3 -c 'import json,sys; s=json.loads(sys.argv[1])["slowest_after_first_ms_per_round"]; ok=sum(x<=300 for x in s); print(f"held-request release: slowest within 300 ms of the first in {ok} of {len(s)} rounds {s}")' "$RELEASE"
# A burst of first requests at a cold service whose queue holds half of them: the
# refused half gets its 503 at once.
BURST=$("$T/snooze-bench" burst --requests "$(( HELD < 2000 ? HELD : 2000 ))" --max-queued "$(( (HELD < 2000 ? HELD : 2000) / 2 ))")
echo "burst of first requests at a cold service, half refused: $BURST"
if [ -n "$BASE" ] && [ -x "$BASE/snooze-bench" ]; then
  echo "the same burst, before: $("$BASE/snooze-bench" burst --requests "$(( HELD < 2000 ? HELD : 2000 ))" --max-queued "$(( (HELD < 2000 ? HELD : 2000) / 2 ))")"
fi
