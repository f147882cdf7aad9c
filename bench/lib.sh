# Shared by the cluster benchmarks (sourced): the cluster's environment, kubectl and
# commands inside its network namespace, process figures, and the N test apps.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$("$repo/e2e/cluster/cluster.sh" env)"
STATE_DIR=${SNOOZE_CLUSTER_DIR:-/tmp/snooze-cluster}
k() { ip netns exec "$SNOOZE_NETNS" kubectl "$@"; }
in_ns() { ip netns exec "$SNOOZE_NETNS" "$@"; }
pid_of() { # pod name in snooze-system → host PID of its container process
  k get pod -n snooze-system "$1" -o jsonpath='{.status.containerStatuses[0].containerID}' | sed 's|snooze://||'
}
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
leader() { k get lease -n snooze-system snooze-operator -o jsonpath='{.spec.holderIdentity}'; }
# scrape URL: a component's /metrics as an authorized reader (a ServiceAccount bound to
# the chart's metrics-reader ClusterRole, its token made for the metrics audience), so
# it works whether the install turned metrics.authorization on or not. The token is
# made once per script (call scrape_token before any scrape in a subshell).
scrape_token() {
  [ -z "${SCRAPE_TOKEN:-}" ] || return 0
  k create serviceaccount snooze-bench-scraper -n snooze-system >/dev/null 2>&1 || true
  k create clusterrolebinding snooze-bench-scraper --clusterrole="${SNOOZE_RELEASE:-snooze}-metrics-reader" \
    --serviceaccount=snooze-system:snooze-bench-scraper >/dev/null 2>&1 || true
  SCRAPE_TOKEN=$(k create token snooze-bench-scraper -n snooze-system \
    --audience "${SNOOZE_METRICS_AUDIENCE:-snooze-metrics}" --duration 3h)
}
scrape() { scrape_token; in_ns curl -s -H "Authorization: Bearer $SCRAPE_TOKEN" "$1"; }

# gen_apps NS FROM TO: a Deployment at zero, its Service and its ScaledService
# (idleTimeout 1h) for app-FROM … app-TO, as YAML on stdout.
gen_apps() {
  local ns=$1 i
  for i in $(seq "$2" "$3"); do
cat <<YAML
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app-$i, namespace: $ns}
spec:
  replicas: 0
  selector: {matchLabels: {app: app-$i}}
  template:
    metadata: {labels: {app: app-$i}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: app
        image: ghcr.io/snooze-sh/testapp:dev
        args: ["--port", "8080"]
        env:
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1, failureThreshold: 1}
---
apiVersion: v1
kind: Service
metadata: {name: app-$i, namespace: $ns}
spec:
  selector: {app: app-$i}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: snooze.dev/v1alpha1
kind: ScaledService
metadata: {name: app-$i, namespace: $ns}
spec:
  scaleTargetRef: {name: app-$i}
  service: app-$i
  idleTimeout: 1h
YAML
  done
}

# wait_ready NS N [SECONDS]: until N ScaledServices of NS have Ready=True (at most
# SECONDS, default 1800; then the reasons of the others, and failure).
wait_ready() {
  local deadline=$(( $(date +%s) + ${3:-1800} ))
  while [ "$(k get ssvc -n "$1" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)" -lt "$2" ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "not all $2 ScaledServices of $1 Ready; the reasons:" >&2
      k get ssvc -n "$1" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].reason}{"\n"}{end}' | sort | uniq -c >&2
      return 1
    fi
    sleep 2
  done
}
