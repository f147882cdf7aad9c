#!/usr/bin/env bash
# Builds the local cluster's control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy: one `go build`, one compile of
# what they share), its add-ons (CoreDNS, Traefik, and unless SNOOZE_FOR=demo
# Prometheus), helm, and for the tests a real gRPC client (grpc-go, e2e/grpcclient) from
# upstream Go modules into a cache outside the repository, keyed by version. Builds only what is missing, the components side by
# side (one's downloads overlap another's compile), each with one progress line and its
# full output in $SNOOZE_CACHE/logs/build-<component>.log.
#
#   e2e/cluster/build.sh                        # prints the bin folder on its last line
#   SNOOZE_FOR=demo e2e/cluster/build.sh        # what the demo needs (no Prometheus, no test tools)
#   SNOOZE_CACHE=/some/dir e2e/cluster/build.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../preflight.sh
. "$here/../preflight.sh"

K8S_VERSION=v1.33.13      # keep in step with go.mod
ETCD_VERSION=v3.5.21      # the etcd release that Kubernetes pins
HELM_VERSION=v3.19.5
COREDNS_VERSION=v1.15.0   # keep in step with addons/coredns/go.mod
TRAEFIK_VERSION=v3.6.12   # keep in step with addons/traefik/go.mod
PROMETHEUS_VERSION=v0.316.0
GATEWAY_API_VERSION=v1.7.0   # the standard channel's CRDs
cache=$SNOOZE_CACHE
bin="$cache/k8s-$K8S_VERSION/bin"
helm_bin="$cache/helm-$HELM_VERSION/bin"
mkdir -p "$bin" "$helm_bin" "$SNOOZE_BUILD_LOGS"

command -v go >/dev/null || { echo "build.sh: Go >= $GO_MIN is required: install it from https://go.dev/dl" >&2; exit 1; }
export GOFLAGS=-mod=mod CGO_ENABLED=0

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
# One set of ldflags for the five binaries: -X of a package a binary lacks is ignored.
ld="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

control_plane() {
  local out="$bin/.building"
  rm -rf "$out"; mkdir -p "$out"
  (cd "$here" && go build -trimpath -ldflags "$ld" -o "$out/" ./cmd/etcd \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy)
  mv "$out"/* "$bin/" && rmdir "$out"
}

addon_build() { # name, version, module folder (or "" for go install), package, ldflags
  local name=$1 version=$2 dir=$3 pkg=$4 ldf=$5 out="$cache/tools/$1-$2"
  mkdir -p "$out"
  if [ -n "$dir" ]; then
    (cd "$here/addons/$dir" && go build -trimpath -ldflags "$ldf" -o "$out/$name.tmp" "$pkg")
    mv "$out/$name.tmp" "$out/$name"
  else
    GOFLAGS= GOBIN="$out" go install -trimpath -ldflags "$ldf" "$pkg@$version"
  fi
}

gateway_crds() {
  # The YAML files of the module's zip, fetched from the module proxy (go mod download
  # refuses v1.7.0 here: its go.mod asks for a newer Go, and no code of it is compiled).
  local gw=$1 proxy
  mkdir -p "$gw"
  proxy=$(go env GOPROXY); proxy=${proxy%%[,|]*}
  [ "$proxy" != direct ] && [ "$proxy" != off ] || proxy=https://proxy.golang.org
  curl -fsSL -o "$gw/module.zip" "$proxy/sigs.k8s.io/gateway-api/@v/$GATEWAY_API_VERSION.zip"
  python3 - "$gw/module.zip" "$gw/standard-crds.yaml.tmp" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = sorted(n for n in z.namelist()
               if "/config/crd/standard/gateway.networking.k8s.io_" in n and "_vap_" not in n)
with open(sys.argv[2], "wb") as out:
    for n in names:
        out.write(b"---\n" + z.read(n))
PY
  mv "$gw/standard-crds.yaml.tmp" "$gw/standard-crds.yaml"
  rm -f "$gw/module.zip"
}

helm_build() {
  GOFLAGS= GOBIN="$helm_bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# Each missing component becomes one background job; cached ones say so.
jobs_pids=() jobs_names=()
component() { # name, "cached" test file, command...
  local name=$1 have=$2; shift 2
  if [ -e "$have" ]; then
    printf '  %-34s cached\n' "$name" >&2
    return
  fi
  printf '  %-34s building (log: %s)\n' "$name" "$SNOOZE_BUILD_LOGS/build-$name.log" >&2
  step_run "$name" "$SNOOZE_BUILD_LOGS/build-$name.log" "$@" &
  jobs_pids+=($!) jobs_names+=("$name")
}
gw="$cache/tools/gateway-api-$GATEWAY_API_VERSION"
component control-plane "$bin/kube-proxy" control_plane
component coredns "$cache/tools/coredns-$COREDNS_VERSION/coredns" \
  addon_build coredns "$COREDNS_VERSION" coredns github.com/coredns/coredns "-s -w"
component traefik "$cache/tools/traefik-$TRAEFIK_VERSION/traefik" \
  addon_build traefik "$TRAEFIK_VERSION" traefik github.com/traefik/traefik/v3/cmd/traefik \
  "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION"
component helm "$helm_bin/helm" helm_build
component gateway-api-crds "$gw/standard-crds.yaml" gateway_crds "$gw"
grpc_client_build() {
  mkdir -p "$1"
  (cd "$here/../grpcclient" && go build -trimpath -ldflags "-s -w" -o "$1/snooze-grpc-client.tmp" .)
  mv "$1/snooze-grpc-client.tmp" "$1/snooze-grpc-client"
}
# The gRPC client's version is its go.sum's.
grpc_dir="$cache/tools/grpc-client-$(sha256sum "$here/../grpcclient/go.sum" "$here/../grpcclient/main.go" | sha256sum | cut -c1-12)"
if [ "${SNOOZE_FOR:-test}" != demo ]; then
  component grpc-client "$grpc_dir/snooze-grpc-client" grpc_client_build "$grpc_dir"
  component prometheus "$cache/tools/prometheus-$PROMETHEUS_VERSION/prometheus" \
    addon_build prometheus "$PROMETHEUS_VERSION" "" github.com/prometheus/prometheus/cmd/prometheus "-s -w"
fi

if [ ${#jobs_pids[@]} -gt 0 ]; then
  t0=$SECONDS
  # A line a minute while anything builds, so a long first build is never silent.
  ( while sleep 60; do printf '  … Go builds running for %d min\n' $(((SECONDS - t0) / 60)) >&2; done ) &
  ticker=$!
  failed=0
  for i in "${!jobs_pids[@]}"; do
    wait "${jobs_pids[$i]}" || failed=1
  done
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  [ $failed = 0 ] || { echo "build.sh: a component failed to build (logs above)" >&2; exit 1; }
fi

ln -sf "$cache/tools/coredns-$COREDNS_VERSION/coredns" "$bin/coredns"
ln -sf "$cache/tools/traefik-$TRAEFIK_VERSION/traefik" "$bin/traefik"
ln -sf "$gw/standard-crds.yaml" "$bin/gateway-api-crds.yaml"
ln -sf "$helm_bin/helm" "$bin/helm"
if [ "${SNOOZE_FOR:-test}" != demo ]; then
  ln -sf "$cache/tools/prometheus-$PROMETHEUS_VERSION/prometheus" "$bin/prometheus"
  ln -sf "$grpc_dir/snooze-grpc-client" "$bin/snooze-grpc-client"
fi
echo "$bin"
