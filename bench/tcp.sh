#!/usr/bin/env bash
# TCP data-path benchmark, one command: bytes pushed to an echo server and read back
# (a) directly, (b) through HAProxy in `mode tcp` with 1 thread, (c) through the
# activator (1 worker thread) serving the port as TCP, in alternating rounds. Prints
# MiB/s and the CPU time (user + system) of the relaying process per MiB echoed (each
# MiB crosses the relay twice: to the server and back), and the ratio to HAProxy.
#
#   bench/tcp.sh
#   TCP_DURATION=10s TCP_ROUNDS=5 TCP_CONNECTIONS=16 bench/tcp.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
DURATION=${TCP_DURATION:-5s}
ROUNDS=${TCP_ROUNDS:-3}
CONNS=${TCP_CONNECTIONS:-8}

if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
  [ "$(id -u)" = 0 ] || { echo "HAProxy is needed: apt-get install haproxy" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
cargo build -q --release -p snooze-activator -p snooze-e2e --bins
T=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACK=$(free_port); HAP=$(free_port); ACT=$(free_port); ADMIN=$(free_port)
wait_port() { for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$T/snooze-bench" tcp-echo --listen 127.0.0.1:$BACK & BACK_PID=$!; pids+=($BACK_PID)
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend bench
  bind 127.0.0.1:$HAP
  default_backend backend
backend backend
  server s1 127.0.0.1:$BACK
CONF
"$HAPROXY" -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & HAP_PID=$!; pids+=($HAP_PID)
cat > "$work/activator.json" <<CONF
{"services": [{"namespace": "bench", "name": "tcp", "port": $ACT, "endpoints": ["127.0.0.1:$BACK"],
  "tcp": {"wakeOn": "FirstByte", "activity": "Traffic"}}]}
CONF
"$T/snooze-activator" --static-config "$work/activator.json" --listen-address 127.0.0.1 \
  --admin-address 127.0.0.1:$ADMIN --worker-threads 1 2>"$work/activator.log" & ACT_PID=$!; pids+=($ACT_PID)
wait_port $BACK; wait_port $HAP; wait_port $ACT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # port label pid
  local c0 out c1
  c0=$(cpu_ticks "$3")
  out=$("$T/snooze-bench" tcp-load --target "127.0.0.1:$1" --connections "$CONNS" --duration "$DURATION" --label "$2")
  c1=$(cpu_ticks "$3")
  python3 -c 'import json, sys
d = json.loads(sys.argv[1])
d["cpu_us_per_mib"] = (int(sys.argv[3]) - int(sys.argv[2])) * 1e6 / int(sys.argv[4]) / max(d["mib"], 1e-9)
print(json.dumps(d))' "$out" "$c0" "$c1" "$(getconf CLK_TCK)"
}

echo "machine: $(nproc) cores, $(uname -r); connections=$CONNS duration=$DURATION rounds=$ROUNDS"
: > "$work/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
  measure $BACK direct "$BACK_PID" >> "$work/results.jsonl"
  measure $HAP haproxy "$HAP_PID" >> "$work/results.jsonl"
  measure $ACT activator "$ACT_PID" >> "$work/results.jsonl"
done
python3 - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows: by.setdefault(r["label"], []).append(r)
med = {k: {m: statistics.median(x[m] for x in v) for m in ("mib_per_s", "cpu_us_per_mib")} for k, v in by.items()}
print(f"{'target':<10} {'MiB/s':>9} {'CPU µs/MiB':>11}   (median of rounds; CPU of the relaying process, the echo server's for direct)")
for k in ("direct", "haproxy", "activator"):
    m = med[k]; print(f"{k:<10} {m['mib_per_s']:>9.0f} {m['cpu_us_per_mib']:>11.0f}")
a, h = med["activator"], med["haproxy"]
print(f"activator/haproxy: throughput {a['mib_per_s']/h['mib_per_s']:.2f}, CPU per MiB {a['cpu_us_per_mib']/h['cpu_us_per_mib']:.2f}")
PY
