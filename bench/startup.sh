#!/usr/bin/env bash
# Activator start-up in a busy cluster: N ScaledServices (with status.ports, as the
# operator writes them) and M EndpointSlices of Services that none of them names. Runs
# the activator binary as a process of its own inside the cluster's network namespace
# (admin kubeconfig, listeners on 127.0.0.1) and reports the time from its start to
# /readyz answering 200 (both watches synced, every listener open) and its RSS then and
# 5 s later. Release build.
#
#   bench/startup.sh                                   # N=1000, M=20000
#   STARTUP_N=20 STARTUP_SLICES=200 bench/startup.sh   # short
#   STARTUP_BIN=/path/to/snooze-activator bench/startup.sh   # another build (before/after)
#   STARTUP_KEEP=1 bench/startup.sh                   # keep the objects for the next run
# Needs the cluster up (e2e/cluster/cluster.sh up); run as root.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
N=${STARTUP_N:-1000}
M=${STARTUP_SLICES:-20000}
RUNS=${STARTUP_RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/snooze/target}
eval "$(e2e/cluster/cluster.sh env)"
in_ns() { ip netns exec "$SNOOZE_NETNS" env KUBECONFIG="$KUBECONFIG" "$@"; }

cargo build -q --release -p snooze-activator -p snooze-e2e --bin snooze-activator --bin snooze-bench
BIN=${STARTUP_BIN:-$CARGO_TARGET_DIR/release/snooze-activator}
in_ns kubectl apply -f crds/scaledservice.yaml >/dev/null
# Snooze's own operator would program (and rewrite) these ScaledServices: paused.
# The objects go with their namespace at the end (STARTUP_KEEP=1 keeps them for the
# next run), before the operator comes back, so it never sees them.
op_replicas=$(in_ns kubectl get deploy -n snooze-system snooze-operator -o jsonpath='{.spec.replicas}' 2>/dev/null || true)
cleanup() {
  if [ "${STARTUP_KEEP:-0}" != 1 ]; then
    in_ns kubectl delete ns startup-bench --ignore-not-found --wait=false >/dev/null
    # ScaledServices an operator once reconciled carry its finalizer: with the operator
    # paused nobody would remove it, and the namespace would never go.
    in_ns kubectl get scaledservices -n startup-bench -o name 2>/dev/null \
      | in_ns xargs -r -n 100 kubectl patch -n startup-bench --type=merge \
          -p '{"metadata":{"finalizers":null}}' >/dev/null || true
    in_ns kubectl wait --for=delete ns/startup-bench --timeout=300s >/dev/null 2>&1 || true
  fi
  if [ -n "$op_replicas" ]; then
    in_ns kubectl scale deploy -n snooze-system snooze-operator --replicas="$op_replicas" >/dev/null
    in_ns kubectl rollout status -n snooze-system deploy/snooze-operator --timeout=180s >/dev/null
  fi
}
trap cleanup EXIT
if [ -n "$op_replicas" ]; then
  in_ns kubectl scale deploy -n snooze-system snooze-operator --replicas=0 >/dev/null
fi
in_ns "$CARGO_TARGET_DIR/release/snooze-bench" populate --scaled-services "$N" --slices "$M"
echo "objects: $N ScaledServices, $M unrelated EndpointSlices"

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
for run in $(seq 1 "$RUNS"); do
  t0=$(date +%s%N)
  # nsenter execs the activator itself ($! is its PID; `ip netns exec` forks).
  nsenter --net="/run/netns/$SNOOZE_NETNS" env KUBECONFIG="$KUBECONFIG" "$BIN" \
    --listen-address 127.0.0.1 --admin-address 127.0.0.1:19191 \
    --pod-name startup-bench --log-format text >/tmp/startup-bench.log 2>&1 &
  pid=$!
  ready=""
  for _ in $(seq 1 15000); do
    if in_ns curl -sf -o /dev/null --max-time 1 http://127.0.0.1:19191/readyz; then
      ready=$(( ($(date +%s%N) - t0) / 1000000 )); break
    fi
    kill -0 "$pid" 2>/dev/null || { cat /tmp/startup-bench.log >&2; exit 1; }
    sleep 0.02
  done
  [ -n "$ready" ] || { echo "not ready after 300 s" >&2; kill "$pid"; exit 1; }
  rss_ready=$(rss_mb "$pid")
  listening=$(in_ns ss -ltnH 'sport >= :30000' | grep -c 127.0.0.1 || true)
  sleep 5
  rss_later=$(rss_mb "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "run $run: ready after ${ready} ms; RSS ${rss_ready} MB at ready, ${rss_later} MB 5 s later; ${listening} listeners"
done
