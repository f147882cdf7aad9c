#!/usr/bin/env bash
# Cold-start benchmark on the local cluster: R cold starts of the test application
# (start-up delay D ms) for each readiness probe period (1 s and Kubernetes' default,
# 10 s), with the activator's own probing on and then off (helm upgrade of
# activator.activationProbing, so both are measured in the same run). Each start is
# split into segments as the API server's watches and the client see them: request →
# scale patch (and the operator's own wake → patch), patch → pod created, created →
# Ready (the kubelet's verdict), the first byte, the total, the app's own start-up
# (process start → listening, recorded by the app) and the total minus it.
#
#   bench/coldstart.sh                          # R=20, D=300, periods "1 10", probing "on off"
#   COLD_ROUNDS=2 bench/coldstart.sh            # the short setting CI runs
#   COLD_PERIODS=10 COLD_PROBING=on bench/coldstart.sh
# Needs the cluster up and Snooze installed (./demo.sh does both); run as root.
# Use SNOOZE_PROFILE=release e2e/cluster/cluster.sh up for figures worth comparing.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
ROUNDS=${COLD_ROUNDS:-20}
DELAY=${COLD_STARTUP_DELAY_MS:-300}
PERIODS=${COLD_PERIODS:-1 10}
PROBING=${COLD_PROBING:-on off}
eval "$(e2e/cluster/cluster.sh env)"
cargo build -q --release -p snooze-e2e --bin snooze-bench
T=${CARGO_TARGET_DIR:-$repo/target}/release
in_ns() { ip netns exec "$SNOOZE_NETNS" env PATH="$PATH" KUBECONFIG="$KUBECONFIG" "$@"; }

set_probing() { # true|false
  in_ns helm upgrade snooze "$repo/charts/snooze" -n snooze-system --reuse-values \
    --set "activator.activationProbing=$1" --wait --timeout 180s >/dev/null
  in_ns kubectl -n snooze-system rollout status deployment/snooze-activator --timeout=180s >/dev/null
  # Until the replaced pods are gone too (what comes next lists the activator pods).
  local want n
  want=$(in_ns kubectl -n snooze-system get deployment snooze-activator -o jsonpath='{.spec.replicas}')
  for _ in $(seq 1 240); do
    n=$(in_ns kubectl -n snooze-system get pods -l app.kubernetes.io/component=activator --no-headers | wc -l)
    [ "$n" = "$want" ] && return
    sleep 0.5
  done
  echo "coldstart: old activator pods still there after 120 s" >&2
  return 1
}

for probing in $PROBING; do
  case $probing in on) set_probing true ;; off) set_probing false ;; *) echo "COLD_PROBING: on|off" >&2; exit 2 ;; esac
  for period in $PERIODS; do
    echo "== activator probing $probing, readiness period ${period} s"
    in_ns "$T/snooze-bench" coldstart --rounds "$ROUNDS" --startup-delay-ms "$DELAY" \
      --readiness-period "$period"
  done
done
# Leave the installation as the chart's default has it.
case " $PROBING " in *" off "*) set_probing true ;; esac
