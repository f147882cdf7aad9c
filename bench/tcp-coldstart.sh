#!/usr/bin/env bash
# Cold starts of a real Redis (Debian's redis-server, image `redis:7` on the local
# cluster) through Snooze's TCP path: ROUNDS times, wait until it sleeps, then time a
# PING to its managed Service from the client's connect to its PONG (one process in the
# cluster's network namespace: the time to launch a client tool is not the cold
# start's), and subtract Redis's own start-up: from its process's start (the node
# agent's "container started") to its log's "Ready to accept connections". Prints
# p50/p95 of both.
#
# Needs the local cluster up with Snooze installed (./demo.sh leaves it so; release
# pods: SNOOZE_PROFILE=release), redis-server on this machine.
#
#   TCP_COLD_ROUNDS=10 bench/tcp-coldstart.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
ROUNDS=${TCP_COLD_ROUNDS:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Redis's own start-up: the node agent's record of the container's start (UTC) to
# Redis's "Ready to accept connections" (its millisecond timestamps, local time).
cat > "$work/startup.py" <<'PY'
import re, sys, datetime
agent_log, pod, redis_log = sys.argv[1:4]
start = ready = None
for line in open(agent_log, errors="replace"):
    if "container started" in line and f"pod={pod} " in line:
        start = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
for line in open(redis_log, errors="replace"):
    m = re.search(r"(\d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2}\.\d{3})", line)
    if m and "Ready to accept connections" in line:
        ready = datetime.datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f").timestamp()
        break
print(f"{(ready - start) * 1000:.1f}" if start and ready else "nan")
PY
# One PING: microseconds from the connect to the PONG.
cat > "$work/ping.py" <<'PY'
import socket, sys, time
t = time.perf_counter()
s = socket.create_connection((sys.argv[1], 6379), timeout=60)
s.sendall(b"PING\r\n")
got = b""
while not got.endswith(b"\r\n"):
    chunk = s.recv(64)
    if not chunk:
        break
    got += chunk
us = int((time.perf_counter() - t) * 1e6)
print(us if got == b"+PONG\r\n" else f"error {got!r}")
PY
eval "$(e2e/cluster/cluster.sh env)"
k() { ip netns exec "$SNOOZE_NETNS" kubectl "$@"; }
ns=tcp-coldstart
k create namespace $ns >/dev/null 2>&1 || true
cat <<YAML | k apply -n $ns -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: {name: redis, labels: {app: redis}}
spec:
  replicas: 0
  selector: {matchLabels: {app: redis}}
  template:
    metadata: {labels: {app: redis}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: redis
        image: redis:7
        args: ["--bind", "\$(POD_IP)", "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{name: redis, containerPort: 6379}]
        readinessProbe: {tcpSocket: {port: redis}, periodSeconds: 10}
---
apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  selector: {app: redis}
  ports: [{name: redis, port: 6379, targetPort: redis, appProtocol: redis}]
---
apiVersion: snooze.dev/v1alpha1
kind: ScaledService
metadata: {name: redis}
spec:
  scaleTargetRef: {name: redis}
  service: redis
  maxReplicas: 1
  idleTimeout: 2s
YAML
for _ in $(seq 1 120); do
  ip=$(k get service redis-snooze -n $ns -o jsonpath='{.spec.clusterIP}' 2>/dev/null || true)
  [ -n "$ip" ] && break
  sleep 1
done
[ -n "$ip" ] || { echo "no managed Service" >&2; exit 1; }
results=()
for r in $(seq 1 "$ROUNDS"); do
  for _ in $(seq 1 120); do
    [ "$(k get deploy redis -n $ns -o jsonpath='{.spec.replicas}')" = 0 ] &&
      [ -z "$(k get pods -n $ns -o name)" ] && break
    sleep 0.5
  done
  sleep 1
  total=$(ip netns exec "$SNOOZE_NETNS" timeout 60 python3 "$work/ping.py" "$ip")
  [[ "$total" =~ ^[0-9]+$ ]] || { echo "round $r: $total" >&2; exit 1; }
  pod=$(k get pods -n $ns -o jsonpath='{.items[0].metadata.name}')
  log="$SNOOZE_CLUSTER_DIR/logs/pods/${ns}_${pod}_redis.log"
  startup=$(python3 "$work/startup.py" "$SNOOZE_CLUSTER_DIR/logs/node-agent.log" "$pod" "$log")
  echo "round $r: PING answered $((total / 1000)) ms after the connect, redis's own start-up $startup ms"
  results+=("$total $startup")
done
printf '%s\n' "${results[@]}" | python3 -c '
import sys, statistics
rows = [l.split() for l in sys.stdin if l.strip()]
tot = sorted(int(a) / 1000 for a, _ in rows)
net = sorted(int(a) / 1000 - float(b) for a, b in rows if b != "nan")
def p(v, q): return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
print(f"cold PING through the activator (from connect): p50 {p(tot, .5):.1f} ms, p95 {p(tot, .95):.1f} ms ({len(tot)} cold starts)")
if net: print(f"minus the start-up of Redis (process start to ready): p50 {p(net, .5):.1f} ms, p95 {p(net, .95):.1f} ms")
'
k delete namespace $ns --wait=false >/dev/null
