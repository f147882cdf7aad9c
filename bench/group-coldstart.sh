#!/usr/bin/env bash
# Cold starts of a wake group (issue 29) on the local cluster: a web app (the test app,
# start-up WEB_MS) whose every answer needs an API behind it (the test app again, start-up
# API_MS, fetched through its managed Service). One cold request to the web app,
# `/fetch?host=<api-snooze>&path=/startup`, answered once both are up. Run ROUNDS times
# with `web.spec.needs: [api]` (the group: both woken at the same moment) and ROUNDS
# times without it (one after the other: the web app's first query wakes the API), in
# alternating rounds of the same run. Each start-up is the app's own (process start →
# listening, from its `/startup`); the figures that count are the total minus the
# slower member's start-up (the group: goal, Snooze's share as for one service) and
# minus the sum of both (one after the other).
#
#   bench/group-coldstart.sh                       # ROUNDS=10, WEB_MS=300, API_MS=600
#   GROUP_ROUNDS=2 bench/group-coldstart.sh        # a short check
# Needs the cluster up and Snooze installed (./demo.sh does both; release pods for
# figures worth comparing: SNOOZE_PROFILE=release e2e/cluster/cluster.sh up); as root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
ROUNDS=${GROUP_ROUNDS:-10}
WEB_MS=${GROUP_WEB_MS:-300}
API_MS=${GROUP_API_MS:-600}
PERIOD=${GROUP_READINESS_PERIOD:-10}
ns=group-coldstart
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
k delete namespace $ns --ignore-not-found --wait=true >/dev/null
k create namespace $ns >/dev/null
app() { # name startup-ms
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1, labels: {app: $1}}
spec:
  replicas: 0
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: ghcr.io/snooze-sh/testapp:dev
        args: ["--port", "8080", "--startup-delay-ms", "$2"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: $PERIOD}
---
apiVersion: v1
kind: Service
metadata: {name: $1}
spec:
  selector: {app: $1}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: snooze.dev/v1alpha1
kind: ScaledService
metadata: {name: $1}
spec:
  scaleTargetRef: {name: $1}
  service: $1
  maxReplicas: 1
  idleTimeout: 2s
YAML
}
{ app web "$WEB_MS"; echo ---; app api "$API_MS"; } | k apply -n $ns -f - >/dev/null
cluster_ip() {
  local ip=
  for _ in $(seq 1 120); do
    ip=$(k get service "$1" -n $ns -o jsonpath='{.spec.clusterIP}' 2>/dev/null || true)
    [ -n "$ip" ] && { echo "$ip"; return; }
    sleep 1
  done
  echo "no Service $1 after 120 s" >&2
  return 1
}
web_ip=$(cluster_ip web-snooze)
api_ip=$(cluster_ip api-snooze)
asleep() { # both at zero replicas and their pods gone
  local r
  for _ in $(seq 1 240); do
    r=$(k get deploy -n $ns web api -o jsonpath='{.items[*].status.replicas}')
    if [ -z "${r//[ 0]/}" ] && [ -z "$(k get pods -n $ns -o name)" ]; then return; fi
    sleep 0.5
  done
  echo "web and api still awake after 120 s" >&2
  return 1
}
needs() { # group|chain
  local v='["api"]'
  [ "$1" = group ] || v=null
  k patch ssvc web -n $ns --type merge -p "{\"spec\":{\"needs\":$v}}" >/dev/null
}
: > "$work/results"
for r in $(seq 1 "$ROUNDS"); do
  for mode in group chain; do
    needs "$mode"
    asleep
    sleep 1
    out=$(in_ns curl -s --max-time 60 -o "$work/body" \
      -w '%{http_code} %{time_total}' "http://$web_ip/fetch?host=$api_ip&port=80&path=/startup")
    code=${out% *}
    total=${out#* }
    if [ "$code" != 200 ]; then
      echo "round $r ($mode): HTTP $code: $(cat "$work/body")" >&2
      exit 1
    fi
    api_us=$(cut -d' ' -f1 "$work/body")
    web_us=$(in_ns curl -s --max-time 10 "http://$web_ip/startup" | cut -d' ' -f1)
    echo "$mode $total $web_us $api_us" >> "$work/results"
    printf 'round %d %-5s %7.1f ms (web started in %.0f ms, api in %.0f ms)\n' "$r" "$mode" \
      "$(awk "BEGIN {print $total * 1000}")" "$(awk "BEGIN {print $web_us / 1000}")" "$(awk "BEGIN {print $api_us / 1000}")"
  done
done
python3 - "$work/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
for mode, what in (("group", "woken together (web needs api)"), ("chain", "one after the other (no needs)")):
    t = [(float(a) * 1000, float(w) / 1000, float(b) / 1000) for m, a, w, b in rows if m == mode]
    if not t:
        continue
    total = [x for x, _, _ in t]
    less_max = [x - max(w, b) for x, w, b in t]
    less_sum = [x - w - b for x, w, b in t]
    print(f"{what}: {len(t)} cold requests")
    print(f"  total                       p50 {pct(total, 50):7.1f} ms  p95 {pct(total, 95):7.1f} ms")
    print(f"  minus the slower start-up   p50 {pct(less_max, 50):7.1f} ms  p95 {pct(less_max, 95):7.1f} ms")
    print(f"  minus both start-ups (sum)  p50 {pct(less_sum, 50):7.1f} ms  p95 {pct(less_sum, 95):7.1f} ms")
PY
[ "${GROUP_KEEP:-0}" = 1 ] || k delete namespace $ns --wait=false >/dev/null
