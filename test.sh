#!/usr/bin/env bash
# The one test command (README "Tests", called by .ci/run): installs what is missing,
# builds everything, runs the unit tests, brings the local cluster up, runs the
# end-to-end tests inside its network namespace, and brings it down again.
#
#   ./test.sh            # everything
#   ./test.sh unit       # unit tests only (no cluster, no root)
#   ./test.sh paths      # only one end-to-end suite (e2e/tests/paths.rs; tcp, tenancy, ...)
#   E2E_FILTER=smoke ./test.sh   # only e2e tests whose name contains the filter
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"
mode=${1:-all}

step() { printf '\n==> %s\n' "$*"; }

. e2e/preflight.sh
t_start=$SECONDS
if [ "$mode" = unit ]; then preflight unit; else preflight cluster; fi
mkdir -p "$SNOOZE_BUILD_LOGS"
# What tests leave to look at (the waiting page's screenshots), kept after the run.
export SNOOZE_ARTIFACTS=${SNOOZE_ARTIFACTS:-$SNOOZE_CACHE/artifacts}

if [ "$mode" != unit ]; then
  step "control plane, CoreDNS, helm and the test tools from Go modules, in the background (cached under $SNOOZE_CACHE)"
  # Side by side with the Rust build below: the cores stay busy through each build's
  # downloads and single-threaded link steps. Traefik and Prometheus, the two longest
  # builds and needed only by the last suites, are built later beside the first
  # suites (SNOOZE_FOR=test-first: preflight.sh, wants).
  SNOOZE_FOR=test-first e2e/cluster/build.sh >"$SNOOZE_BUILD_LOGS/build-go.out" &
  go_builds=$!
  trap 'kill $go_builds 2>/dev/null || true' EXIT
fi

step "cargo build (workspace binaries and tests)"
cargo build --workspace --bins --tests

step "unit tests and the tests that need no cluster (activator data path, shutdown)"
# The cluster tests are #[ignore]d here and run below inside the cluster's namespace.
cargo test --workspace

[ "$mode" = unit ] && exit 0

step "waiting for the Go builds"
wait "$go_builds" || { echo "test.sh: the Go builds failed (logs in $SNOOZE_BUILD_LOGS)" >&2; exit 1; }
trap - EXIT
bin=$(tail -n 1 "$SNOOZE_BUILD_LOGS/build-go.out")
export PATH="$bin:$PATH"
echo "the builds the first suites need done $((SECONDS - t_start)) s after the start"

step "the activator's data path with a real gRPC client (grpc-go), h2spec and a real browser (the waiting page), built above; no cluster"
cargo test --offline -p snooze-e2e --test activator -- --ignored

step "Traefik and Prometheus from Go modules, in the background beside the first suites"
# At the lowest priority: the suites come first, the build takes the idle time.
nice -n 19 e2e/cluster/build.sh >"$SNOOZE_BUILD_LOGS/build-go-rest.out" 2>&1 &
go_rest=$!
trap 'kill $go_rest 2>/dev/null || true' EXIT

step "cluster up (Traefik and Prometheus join it before the suites that use them)"
t0=$SECONDS
SNOOZE_FOR=test-first e2e/cluster/cluster.sh up >/dev/null
echo "cluster up took $((SECONDS - t0))s"
trap 'kill $go_rest 2>/dev/null || true; e2e/cluster/cluster.sh down' EXIT
eval "$(e2e/cluster/cluster.sh env)"
# Waits for the rest of the Go builds, then adds Traefik and Prometheus to the cluster.
rest_done=
rest() {
  [ -z "$rest_done" ] || return 0
  step "waiting for the Traefik and Prometheus builds, then adding them to the cluster"
  wait "$go_rest" || { cat "$SNOOZE_BUILD_LOGS/build-go-rest.out" >&2; echo "test.sh: the Go builds failed (logs in $SNOOZE_BUILD_LOGS)" >&2; exit 1; }
  e2e/cluster/cluster.sh addons
  echo "everything built and in the cluster $((SECONDS - t_start)) s after the start"
  rest_done=1
}

# Inside the cluster's network namespace: pod IPs are only reachable there.
e2e() {
  ip netns exec "$SNOOZE_NETNS" env PATH="$PATH" KUBECONFIG="$KUBECONFIG" \
    cargo test --offline -p snooze-e2e --test "$1" -- --ignored --nocapture --test-threads=${E2E_THREADS:-4} ${E2E_FILTER:-}
}
if [ "$mode" != all ]; then
  rest
  step "end-to-end: only the suite e2e/tests/$mode.rs"
  e2e "$mode"
  exit 0
fi
step "end-to-end: the local cluster itself"
e2e cluster
step "end-to-end: Snooze installed with helm"
e2e snooze
step "end-to-end: tenancy (what one tenant must not do to another through Snooze)"
e2e tenancy
step "end-to-end: TCP services (Redis woken by redis-cli, PostgreSQL by psql, TLS passthrough)"
e2e tcp
step "end-to-end: why it is awake, when it sleeps, and by hand (kubectl snooze)"
e2e awake
# The benchmarks and the faults suite need neither Traefik nor Prometheus: they run
# while those two still build on a first run (about 7 minutes that were spent
# waiting for them in a run from empty caches).
step "benchmarks on a short setting (CI checks that they run; figures are not judged)"
COLD_ROUNDS=2 bench/coldstart.sh
GROUP_ROUNDS=1 bench/group-coldstart.sh
SCALE_N=10 SCALE_IDLE_SECONDS=3 SCALE_WAKE=5 bench/scale.sh
BENCH_DURATION=1s BENCH_ROUNDS=1 BENCH_HELD=500 bench/datapath.sh
BURST_ROUNDS=1 BURST_REQUESTS=400 bench/burst.sh
TCP_DURATION=1s TCP_ROUNDS=1 bench/tcp.sh
ADMIN_CONNECTIONS=500 ADMIN_SOURCES=20 bench/admin.sh
STARTUP_N=20 STARTUP_SLICES=200 STARTUP_RUNS=1 bench/startup.sh
step "end-to-end: faults, one at a time (API server restart, leader kill, activator and pod kills)"
E2E_THREADS=1 e2e faults
rest
step "end-to-end: traffic paths (kube-proxy, CoreDNS, Traefik Ingress and Gateway API)"
e2e paths
step "end-to-end: Prometheus scrapes Snooze; the dashboard's and alerts' queries, an alert firing"
e2e monitoring
step "end-to-end: activator churn, the connection cap, then helm uninstall (one at a time)"
E2E_THREADS=1 e2e zz_disruptive
