#!/usr/bin/env bash
# The one test command (README "Tests", called by .ci/run): installs what is missing,
# builds everything, runs the unit tests, brings the local cluster up, runs the
# end-to-end tests inside its network namespace, and brings it down again.
#
#   ./test.sh            # everything
#   ./test.sh unit       # unit tests only (no cluster, no root)
#   ./test.sh paths      # only the traffic paths (DNS + ClusterIP, NodePort, Ingress, HTTPRoute)
#   E2E_FILTER=smoke ./test.sh   # only e2e tests whose name contains the filter
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"
mode=${1:-all}

step() { printf '\n==> %s\n' "$*"; }

install_packages() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v setsid >/dev/null || missing+=(util-linux)
  command -v nft >/dev/null || missing+=(nftables)   # kube-proxy's nftables mode runs nft
  command -v python3 >/dev/null || missing+=(python3) # build.sh unpacks the Gateway API CRDs
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
      echo "missing ${missing[*]}: install them (apt-get install ${missing[*]})" >&2; exit 1
    fi
  fi
  command -v kubectl >/dev/null || { echo "kubectl is required (https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }
  command -v go >/dev/null || { echo "go >= 1.26 is required to build the local control plane and its add-ons" >&2; exit 1; }
}

step "cargo build (workspace binaries and tests)"
cargo build --workspace --bins --tests

step "unit tests and the tests that need no cluster (activator data path, shutdown)"
# The cluster tests are #[ignore]d here and run below inside the cluster's namespace.
cargo test --workspace

[ "$mode" = unit ] && exit 0

install_packages
step "control plane and helm (cached under ~/.cache/snooze)"
bin=$(e2e/cluster/build.sh | tail -n 1)
export PATH="$bin:$PATH"

step "cluster up"
t0=$SECONDS
e2e/cluster/cluster.sh up >/dev/null
echo "cluster up took $((SECONDS - t0))s"
trap 'e2e/cluster/cluster.sh down' EXIT
eval "$(e2e/cluster/cluster.sh env)"

# Inside the cluster's network namespace: pod IPs are only reachable there.
e2e() {
  ip netns exec "$SNOOZE_NETNS" env PATH="$PATH" KUBECONFIG="$KUBECONFIG" \
    cargo test --offline -p snooze-e2e --test "$1" -- --ignored --nocapture --test-threads=${E2E_THREADS:-4} ${E2E_FILTER:-}
}
if [ "$mode" = paths ]; then
  step "end-to-end: traffic paths (kube-proxy, CoreDNS, Traefik Ingress and Gateway API)"
  e2e paths
  exit 0
fi
step "end-to-end: the local cluster itself"
e2e cluster
step "end-to-end: Snooze installed with helm"
e2e snooze
step "end-to-end: traffic paths (kube-proxy, CoreDNS, Traefik Ingress and Gateway API)"
e2e paths
step "end-to-end: Prometheus scrapes Snooze; the dashboard's and alerts' queries, an alert firing"
e2e monitoring
step "benchmarks on a short setting (CI checks that they run; figures are not judged)"
COLD_ROUNDS=2 bench/coldstart.sh
SCALE_N=10 SCALE_IDLE_SECONDS=3 SCALE_WAKE=5 bench/scale.sh
BENCH_DURATION=1s BENCH_ROUNDS=1 BENCH_HELD=500 bench/datapath.sh
STARTUP_N=20 STARTUP_SLICES=200 STARTUP_RUNS=1 bench/startup.sh
step "end-to-end: faults, one at a time (API server restart, leader kill, activator and pod kills)"
E2E_THREADS=1 e2e faults
step "end-to-end: activator churn, then helm uninstall (one at a time)"
E2E_THREADS=1 e2e zz_disruptive
