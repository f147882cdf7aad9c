#!/usr/bin/env bash
# Cold starts of a real Redis (Debian's redis-server, image `redis:7` on the local
# cluster) through Snooze's TCP path: ROUNDS times, wait until it sleeps, then time
# `redis-cli PING` to its managed Service, and subtract Redis's own start-up (its log:
# "Redis is starting" → "Ready to accept connections"). Prints p50/p95 of both.
#
# Needs the local cluster up with Snooze installed (./demo.sh leaves it so; release
# pods: SNOOZE_PROFILE=release), redis-server and redis-cli on this machine.
#
#   TCP_COLD_ROUNDS=10 bench/tcp-coldstart.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
ROUNDS=${TCP_COLD_ROUNDS:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Redis's own start-up from its log's millisecond timestamps.
cat > "$work/startup.py" <<'PY'
import re, sys, datetime
start = ready = None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"(\d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2}\.\d{3})", line)
    if not m:
        continue
    t = datetime.datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f")
    if start is None and "starting" in line:
        start = t
    if "Ready to accept connections" in line:
        ready = t
        break
print(f"{(ready - start).total_seconds() * 1000:.1f}" if start and ready else "nan")
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
  t0=$(date +%s%N)
  out=$(ip netns exec "$SNOOZE_NETNS" timeout 60 redis-cli -h "$ip" -p 6379 PING)
  t1=$(date +%s%N)
  [ "$out" = PONG ] || { echo "round $r: $out" >&2; exit 1; }
  pod=$(k get pods -n $ns -o jsonpath='{.items[0].metadata.name}')
  log="$SNOOZE_CLUSTER_DIR/logs/pods/${ns}_${pod}_redis.log"
  startup=$(python3 "$work/startup.py" "$log")
  total=$(( (t1 - t0) / 1000 ))
  echo "round $r: PING answered after $((total / 1000)) ms, redis's own start-up $startup ms"
  results+=("$total $startup")
done
printf '%s\n' "${results[@]}" | python3 -c '
import sys, statistics
rows = [l.split() for l in sys.stdin if l.strip()]
tot = sorted(int(a) / 1000 for a, _ in rows)
net = sorted(int(a) / 1000 - float(b) for a, b in rows if b != "nan")
def p(v, q): return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
print(f"cold PING through the activator: p50 {p(tot, .5):.1f} ms, p95 {p(tot, .95):.1f} ms ({len(tot)} cold starts)")
if net: print(f"minus the server start-up:       p50 {p(net, .5):.1f} ms, p95 {p(net, .95):.1f} ms")
'
k delete namespace $ns --wait=false >/dev/null
