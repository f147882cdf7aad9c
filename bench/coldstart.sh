#!/usr/bin/env bash
# Cold-start benchmark on the local cluster: R cold starts of the test application
# (start-up delay D ms, readiness probe every 1 s), each split into segments as the
# API server's watches and the client see them: request → scale patch (and the
# operator's own wake → patch), patch → pod created, created → Ready (the pod's own
# start), Ready → first byte, the total, and the total minus the pod's own start.
#
#   bench/coldstart.sh                          # R=20, D=300
#   COLD_ROUNDS=2 bench/coldstart.sh            # the short setting CI runs
# Needs the cluster up and Snooze installed (./demo.sh does both); run as root.
# Use SNOOZE_PROFILE=release e2e/cluster/cluster.sh up for figures worth comparing.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
ROUNDS=${COLD_ROUNDS:-20}
DELAY=${COLD_STARTUP_DELAY_MS:-300}
eval "$(e2e/cluster/cluster.sh env)"
cargo build -q --release -p snooze-e2e --bin snooze-bench
T=${CARGO_TARGET_DIR:-$repo/target}/release
ip netns exec "$SNOOZE_NETNS" env KUBECONFIG="$KUBECONFIG" \
  "$T/snooze-bench" coldstart --rounds "$ROUNDS" --startup-delay-ms "$DELAY"
