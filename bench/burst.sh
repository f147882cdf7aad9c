#!/usr/bin/env bash
# A burst of new clients at one activator in the local cluster (issue 27), against its
# floor on the same machine in the same rounds. BURST_REQUESTS clients (default 2,000)
# open their connections at the same moment to one activator endpoint of a cold service
# whose share of the queue there is half of them (`maxQueuedRequests` = BURST_REQUESTS,
# two activators): half are held, half refused with 503. Each refusal is timed from its
# client's connect; the client also records when its connect finished, so the time
# splits into the connect (the kernel's handshake and accept queue, the client's own
# scheduling) and what came after it.
#
# The floor is `snooze-bench refuse` in the cluster's network namespace: a tokio server
# with as many worker threads as the activator (one per core) and the same accept queue,
# that holds the first half of the connections and answers every other head with 503 at
# once, doing nothing else, sent the same burst.
# Its figures are what the kernel, the client on the same two cores and tokio cost
# without Snooze's admission; the activator's distance to it is Snooze's share.
#
#   bench/burst.sh                      # BURST_ROUNDS=5 BURST_REQUESTS=2000
#   BURST_ROUNDS=1 BURST_REQUESTS=400 bench/burst.sh   # a short check (./test.sh)
#   BURST_PIN=1 bench/burst.sh          # clients on CPU 0, the server (activator or
#                                       # floor) on CPU 1: is the time the two's contention?
# Each round also reports the CPU time (user + system, ms) the serving process spent on
# the burst: the activator's (the one the endpoint belongs to) against the floor's.
# Needs the cluster up and Snooze installed with release builds
# (SNOOZE_PROFILE=release e2e/cluster/cluster.sh up; helm upgrade --install ...); as root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
ROUNDS=${BURST_ROUNDS:-5}
N=${BURST_REQUESTS:-2000}
ns=burst-bench
profile=${SNOOZE_PROFILE:-release}
T=${CARGO_TARGET_DIR:-$repo/target}/$profile
# cargo's name for the debug directory's profile is "dev".
cargo build -q --profile "$([ "$profile" = debug ] && echo dev || echo "$profile")" -p snooze-e2e --bin snooze-bench
work=$(mktemp -d)
floor_pid=
act_pid=
cleanup() {
  [ -z "$floor_pid" ] || kill "$floor_pid" 2>/dev/null || true
  # The activator's threads may run on every CPU again.
  [ -z "${BURST_PIN:-}" ] || [ -z "$act_pid" ] ||
    for t in /proc/"$act_pid"/task/*; do taskset -p -c "0-$(( $(nproc) - 1 ))" "${t##*/}" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
activators=$(k get deployment snooze-activator -n snooze-system -o jsonpath='{.spec.replicas}')
[ "$activators" = 2 ] || echo "note: $activators activators (the share of the queue is $N / $activators)" >&2

k delete namespace $ns --ignore-not-found --wait=true >/dev/null
k create namespace $ns >/dev/null
# A service that never becomes ready within a round: woken by the first request, its
# app takes an hour to start, so every round finds it cold with its queue empty (held
# requests are answered 504 after the 5-s activation timeout, before the next round).
k apply -n $ns -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: cold, labels: {app: cold}}
spec:
  replicas: 0
  selector: {matchLabels: {app: cold}}
  template:
    metadata: {labels: {app: cold}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: ghcr.io/snooze-sh/testapp:dev
        args: ["--port", "8080", "--startup-delay-ms", "3600000"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: cold}
spec:
  selector: {app: cold}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: snooze.dev/v1alpha1
kind: ScaledService
metadata: {name: cold}
spec:
  scaleTargetRef: {name: cold}
  service: cold
  maxReplicas: 1
  idleTimeout: 1h
  activation: {timeout: 5s, maxQueuedRequests: $N}
YAML
target=
for _ in $(seq 1 120); do
  target=$(k get endpointslices -n $ns -l kubernetes.io/service-name=cold-snooze \
    -o jsonpath='{.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}' 2>/dev/null || true)
  [[ "$target" =~ ^[0-9.]+:[0-9]+$ ]] && in_ns bash -c "echo > /dev/tcp/${target%:*}/${target#*:}" 2>/dev/null && break
  target=
  sleep 1
done
[ -n "$target" ] || { echo "no activator endpoint for cold-snooze after 120 s" >&2; exit 1; }
# The activator process behind the endpoint (its --listen-address is the pod IP).
act_pid=$(pgrep -f -- "snooze-activator.* --listen-address=${target%:*} " | head -n 1 || true)
[ -n "$act_pid" ] || { echo "no activator process listening on ${target%:*}" >&2; exit 1; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{printf "%d", ($14 + $15) * 1000 / hz}' "/proc/$1/stat"; }
PIN=${BURST_PIN:-}
if [ -n "$PIN" ]; then
  [ "$(nproc)" -ge 2 ] || { echo "BURST_PIN needs two CPUs" >&2; exit 1; }
  for t in /proc/"$act_pid"/task/*; do taskset -p -c 1 "${t##*/}" >/dev/null; done
fi
client_pin=()
[ -z "$PIN" ] || client_pin=(taskset -c 0)
floor_addr=${BURST_FLOOR:-127.0.0.1:29999}  # pod IPs sit on the namespace's loopback too
ulimit -n "$(ulimit -Hn)"
# A floor process per round: its first N/activators connections are held.
floor() {
  [ -z "$floor_pid" ] || { kill "$floor_pid" 2>/dev/null || true; wait "$floor_pid" 2>/dev/null || true; }
  ip netns exec "$SNOOZE_NETNS" "$T/snooze-bench" refuse --listen "$floor_addr" --hold $((N / activators)) > "$work/floor.out" 2>&1 &
  floor_pid=$!
  for _ in $(seq 1 50); do
    if grep -q refusing "$work/floor.out"; then
      [ -z "$PIN" ] || for t in /proc/"$floor_pid"/task/*; do taskset -p -c 1 "${t##*/}" >/dev/null; done
      return
    fi
    sleep 0.1
  done
  echo "the floor server did not start: $(cat "$work/floor.out")" >&2
  exit 1
}
echo "activator endpoint $target (one of $activators), floor $floor_addr; $N clients, $ROUNDS rounds each"
: > "$work/results"
for r in $(seq 1 "$ROUNDS"); do
  for who in floor activator; do
    addr=$target; pid=$act_pid
    [ "$who" != floor ] || { floor; addr=$floor_addr; pid=$floor_pid; }
    c0=$(cpu_ms "$pid")
    out=$(in_ns "${client_pin[@]}" bash -c "ulimit -n \$(ulimit -Hn); exec '$T/snooze-bench' burst --requests $N --target $addr --from-connect")
    out=$(python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d["server_cpu_ms"] = int(sys.argv[2]); print(json.dumps(d))' "$out" "$(( $(cpu_ms "$pid") - c0 ))")
    echo "$who $out" >> "$work/results"
    echo "round $r $who: $out"
    # The held requests' 504s (activation timeout 5 s), the sockets closed.
    [ "$who" = floor ] || sleep 7
  done
done
python3 - "$work/results" "$N" <<'PY'
import json, statistics, sys
rows = [l.split(" ", 1) for l in open(sys.argv[1])]
n = int(sys.argv[2])
print(f"\n{'':<10} {'refused':>8} {'503 p50':>8} {'503 p99':>8} {'connect p50':>12} {'connect p99':>12} {'after p50':>10} {'after p99':>10} {'server CPU':>11}   (ms, median of rounds)")
med = {}
for who in ("floor", "activator"):
    ds = [json.loads(j) for w, j in rows if w == who]
    m = {k: statistics.median(d[k] for d in ds) for k in ds[0] if isinstance(ds[0][k], (int, float))}
    med[who] = m
    print(f"{who:<10} {m['refused_503']:>8.0f} {m['503_p50_ms']:>8.1f} {m['503_p99_ms']:>8.1f} {m['connect_p50_ms']:>12.1f} {m['connect_p99_ms']:>12.1f} {m['after_connect_p50_ms']:>10.1f} {m['after_connect_p99_ms']:>10.1f} {m['server_cpu_ms']:>11.0f}")
    per_round = ", ".join("%.1f" % d["503_p99_ms"] for d in ds)
    print(f"{'':<10} 503 p99 per round: {per_round}")
a, f = med["activator"], med["floor"]
print(f"activator − floor: 503 p50 {a['503_p50_ms'] - f['503_p50_ms']:+.1f} ms, p99 {a['503_p99_ms'] - f['503_p99_ms']:+.1f} ms")
PY
k delete namespace $ns --wait=false >/dev/null
