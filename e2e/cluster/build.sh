#!/usr/bin/env bash
# Builds the local cluster's control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy: one `go build`, one compile of
# what they share), helm, its add-ons (CoreDNS, Traefik, Prometheus: those the command
# wants, see preflight.sh), and for the tests a real gRPC client (grpc-go, e2e/grpcclient) and the HTTP/2
# conformance suite h2spec (e2e/h2spec) from
# upstream Go modules into a cache outside the repository, keyed by version. Builds
# only what is missing, one component after another (what they share is compiled once)
# while the next ones' modules download, each with one progress line and its full
# output in $SNOOZE_CACHE/logs/build-<component>.log.
#
#   e2e/cluster/build.sh                        # prints the bin folder on its last line
#   SNOOZE_FOR=demo e2e/cluster/build.sh        # what the demo needs: control plane and helm
#   SNOOZE_FOR=demo SNOOZE_DEMO_INGRESS=traefik e2e/cluster/build.sh   # and CoreDNS, Traefik
#   SNOOZE_FOR=test-first e2e/cluster/build.sh  # all the tests need but Traefik and Prometheus
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
PLAYWRIGHT_VERSION=1.65.2   # PyPI; drives Debian's chromium-headless-shell
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

# The missing components, built one after another: concurrent `go build`s do not share
# their work (each compiles the packages they have in common, net/http and client-go
# among them, before any of them is in the build cache), so side by side they cost
# more CPU than in a row. Meanwhile the modules of the ones still waiting are
# downloaded (network, not CPU), and the caller's cargo build keeps the other core busy.
# Cached components say so.
pending=()
component() { # name, "cached" test file, command...
  local name=$1 have=$2; shift 2
  if [ -e "$have" ]; then
    printf '  %-34s cached\n' "$name" >&2
    return
  fi
  pending+=("$name")
  eval "run_$name() { $(printf '%q ' "$@"); }"
}
gw="$cache/tools/gateway-api-$GATEWAY_API_VERSION"
component control_plane "$bin/kube-proxy" control_plane
component helm "$helm_bin/helm" helm_build
if wants dns; then
  component coredns "$cache/tools/coredns-$COREDNS_VERSION/coredns" \
    addon_build coredns "$COREDNS_VERSION" coredns github.com/coredns/coredns "-s -w"
fi
grpc_client_build() {
  mkdir -p "$1"
  (cd "$here/../grpcclient" && go build -trimpath -ldflags "-s -w" -o "$1/snooze-grpc-client.tmp" .)
  mv "$1/snooze-grpc-client.tmp" "$1/snooze-grpc-client"
}
# The gRPC client's version is its go.sum's.
grpc_dir="$cache/tools/grpc-client-$(sha256sum "$here/../grpcclient/go.sum" "$here/../grpcclient/main.go" | sha256sum | cut -c1-12)"
if wants test-tools; then
  component grpc_client "$grpc_dir/snooze-grpc-client" grpc_client_build "$grpc_dir"
fi
h2spec_build() {
  mkdir -p "$1"
  (cd "$here/../h2spec" && go build -trimpath -ldflags "-s -w" -o "$1/snooze-h2spec.tmp" github.com/summerwind/h2spec/cmd/h2spec)
  mv "$1/snooze-h2spec.tmp" "$1/snooze-h2spec"
}
# h2spec's version is its go.sum's.
h2spec_dir="$cache/tools/h2spec-$(sha256sum "$here/../h2spec/go.sum" | cut -c1-12)"
if wants test-tools; then
  component h2spec "$h2spec_dir/snooze-h2spec" h2spec_build "$h2spec_dir"
fi
# A real browser for the waiting page's test: Playwright from PyPI in a venv (it drives
# Debian's chromium-headless-shell, which the preflight installs).
playwright_build() {
  rm -rf "$1" && python3 -m venv "$1" && "$1/bin/pip" install -q "playwright==$PLAYWRIGHT_VERSION" &&
    if ! command -v chromium-headless-shell >/dev/null; then "$1/bin/playwright" install chromium-headless-shell; fi
}
playwright_dir="$cache/tools/playwright-$PLAYWRIGHT_VERSION"
if wants test-tools; then
  component playwright "$playwright_dir/bin/playwright" playwright_build "$playwright_dir"
fi
# Traefik and Prometheus last: the longest builds, needed by the last test suites only
# (test.sh starts the others before they are built).
if wants ingress; then
  component traefik "$cache/tools/traefik-$TRAEFIK_VERSION/traefik" \
    addon_build traefik "$TRAEFIK_VERSION" traefik github.com/traefik/traefik/v3/cmd/traefik \
    "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION"
fi
if wants monitoring; then
  component prometheus "$cache/tools/prometheus-$PROMETHEUS_VERSION/prometheus" \
    addon_build prometheus "$PROMETHEUS_VERSION" "" github.com/prometheus/prometheus/cmd/prometheus "-s -w"
fi

failed=0
if ! wants gateway-api; then
  :
elif [ ! -s "$gw/standard-crds.yaml" ]; then
  step_run gateway-api-crds "$SNOOZE_BUILD_LOGS/build-gateway-api-crds.log" gateway_crds "$gw" || failed=1
else
  printf '  %-34s cached\n' gateway-api-crds >&2
fi
if [ ${#pending[@]} -gt 0 ]; then
  # Downloads ahead of the compiles (best effort: a build downloads what is missing).
  (
    for d in "$here" "$here/addons/traefik" "$here/addons/coredns" "$here/../grpcclient" "$here/../h2spec"; do
      (cd "$d" && go mod download) >>"$SNOOZE_BUILD_LOGS/build-downloads.log" 2>&1 || true
    done
  ) &
  prefetch=$!
  t0=$SECONDS
  : >"$SNOOZE_BUILD_LOGS/building"
  # A line a minute while anything builds, so a long first build is never silent.
  ( while sleep 60; do
      printf '  … Go builds: %d min so far, now %s\n' $(((SECONDS - t0) / 60)) \
        "$(cat "$SNOOZE_BUILD_LOGS/building" 2>/dev/null)" >&2
    done ) &
  ticker=$!
  for name in "${pending[@]}"; do
    echo "${name//_/-}" >"$SNOOZE_BUILD_LOGS/building"
    printf '  %-34s building (log: %s)\n' "${name//_/-}" "$SNOOZE_BUILD_LOGS/build-${name//_/-}.log" >&2
    step_run "${name//_/-}" "$SNOOZE_BUILD_LOGS/build-${name//_/-}.log" "run_$name" || { failed=1; break; }
  done
  kill "$ticker" "$prefetch" 2>/dev/null || true
  wait "$ticker" "$prefetch" 2>/dev/null || true
fi
[ $failed = 0 ] || { echo "build.sh: a component failed to build (its log is named above)" >&2; exit 1; }

# A link is replaced only when it changes: test.sh runs this again while the suites use
# the links (ln -sf leaves a moment without one).
link() { [ "$(readlink "$2" 2>/dev/null)" = "$1" ] || ln -sf "$1" "$2"; }
link "$helm_bin/helm" "$bin/helm"
if wants dns; then
  link "$cache/tools/coredns-$COREDNS_VERSION/coredns" "$bin/coredns"
fi
if wants ingress; then
  link "$cache/tools/traefik-$TRAEFIK_VERSION/traefik" "$bin/traefik"
fi
if wants gateway-api; then
  link "$gw/standard-crds.yaml" "$bin/gateway-api-crds.yaml"
fi
if wants monitoring; then
  link "$cache/tools/prometheus-$PROMETHEUS_VERSION/prometheus" "$bin/prometheus"
fi
if wants test-tools; then
  link "$grpc_dir/snooze-grpc-client" "$bin/snooze-grpc-client"
  link "$h2spec_dir/snooze-h2spec" "$bin/snooze-h2spec"
  printf '#!/bin/sh\nexec %q "$@"\n' "$playwright_dir/bin/python" >"$bin/.snooze-browser-python.$$"
  chmod +x "$bin/.snooze-browser-python.$$"
  mv "$bin/.snooze-browser-python.$$" "$bin/snooze-browser-python"
fi
echo "$bin"
