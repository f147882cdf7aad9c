#!/usr/bin/env bash
# The local demo in one command: builds release binaries (what users run), brings the
# local cluster up, installs Snooze with helm and an example app, shows it asleep, wakes
# it with one request, and prints the cold start split into its segments (request →
# scale patch → pod created → ready → first byte). Leaves the cluster running (see the
# last lines).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

. e2e/preflight.sh
t_start=$SECONDS
preflight cluster
mkdir -p "$SNOOZE_BUILD_LOGS"
# Only what the demo uses is built and deployed (e2e/preflight.sh: wants): the control
# plane, kube-proxy and helm; CoreDNS and Traefik with SNOOZE_DEMO_INGRESS=traefik.
export SNOOZE_FOR=demo
# The pods run the release builds (what users run).
export SNOOZE_PROFILE=release
target_dir=${CARGO_TARGET_DIR:-$repo/target}

say "building: the Rust workspace (release) and, side by side, the control plane, add-ons and helm from Go modules (cached in $SNOOZE_CACHE)"
# The Go builds run in the background while cargo compiles: the machine's cores stay
# busy through each build's downloads and single-threaded link steps.
e2e/cluster/build.sh >"$SNOOZE_BUILD_LOGS/build-go.out" &
go_builds=$!
# The same packages cluster.sh builds for release pods (one feature set, one build).
if ! step_run "rust workspace (release)" "$SNOOZE_BUILD_LOGS/cargo-release.log" \
  cargo build --release --bins -p snooze-operator -p snooze-activator -p snooze-e2e; then
  kill "$go_builds" 2>/dev/null || true
  exit 1
fi
wait "$go_builds" || { echo "demo: the Go builds failed (logs in $SNOOZE_BUILD_LOGS)" >&2; exit 1; }
bin=$(tail -n 1 "$SNOOZE_BUILD_LOGS/build-go.out")
export PATH="$bin:$PATH"
echo "built in $((SECONDS - t_start)) s"

say "bringing the local cluster up"
t0=$SECONDS
e2e/cluster/cluster.sh up >/dev/null
echo "cluster up in $((SECONDS - t0)) s"
eval "$(e2e/cluster/cluster.sh env)"
k() { ip netns exec "$SNOOZE_NETNS" kubectl "$@"; }

say "helm install snooze"
ip netns exec "$SNOOZE_NETNS" helm upgrade --install snooze charts/snooze -n snooze-system \
  --create-namespace --wait --timeout 180s --set logFormat=text
k get pods -n snooze-system

say "kubectl apply -f examples/app.yaml (idleTimeout shortened to 10s for the demo)"
k apply -f examples/app.yaml
if [ "${SNOOZE_DEMO_INGRESS:-}" = traefik ]; then
  k apply -f examples/ingress.yaml   # the cluster's ingress controller: Traefik
fi
k patch scaledservice web -n shop --type merge -p '{"spec":{"idleTimeout":"10s"}}'

say "waiting for it to fall asleep"
for _ in $(seq 1 120); do
  r=$(k get deploy web -n shop -o jsonpath='{.spec.replicas}')
  [ "$r" = 0 ] && [ -z "$(k get pods -n shop -o name)" ] && break
  sleep 1
done
k get scaledservice web -n shop
k get deploy,pods -n shop

if [ "${SNOOZE_DEMO_INGRESS:-}" = traefik ]; then
  say "one request through the ingress controller (Traefik, its NodePort on the node's address)"
  echo "curl -H 'Host: shop.example.com' http://10.240.0.1:30080/"
  url=http://10.240.0.1:30080/
  host=(-H 'Host: shop.example.com')
  try="curl -H 'Host: shop.example.com' $url"
else
  # The managed Service's ClusterIP, through kube-proxy: where an ingress or an
  # in-cluster client sends it (SNOOZE_DEMO_INGRESS=traefik goes through Traefik).
  ip=$(k get service web-snooze -n shop -o jsonpath='{.spec.clusterIP}')
  say "one request to the managed Service web-snooze ($ip, through kube-proxy), as your ingress sends it"
  echo "curl http://$ip/"
  url=http://$ip/
  host=()
  try="curl $url"
fi
ip netns exec "$SNOOZE_NETNS" curl -sS -m 90 "${host[@]}" \
  -w '\nHTTP %{http_code}: first byte after %{time_starttransfer}s, total %{time_total}s\n' "$url"
echo "from ./demo.sh to the woken request: $((SECONDS - t_start)) s"
say "the cold start, split: 3 more cold starts of a test app (release builds; readiness probe every 10 s, the Kubernetes default)"
ip netns exec "$SNOOZE_NETNS" env KUBECONFIG="$KUBECONFIG" \
  "$target_dir/release/snooze-bench" coldstart --rounds 3 --readiness-period 10 --namespace demo-coldstart

say "what happened"
k get events -n shop --field-selector reason=Woken -o custom-columns=EVENT:.reason,MESSAGE:.message
k get scaledservice web -n shop
k get pods -n shop

cat <<MSG

The cluster keeps running. Try:
  $SNOOZE_CLUSTER_DIR/kubectl get scaledservices -A
  $SNOOZE_CLUSTER_DIR/kubectl describe scaledservice web -n shop
  ip netns exec $SNOOZE_NETNS $try
Tear it down with: e2e/cluster/cluster.sh down
MSG
