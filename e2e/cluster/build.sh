#!/usr/bin/env bash
# Builds the local cluster's control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler), its add-ons (kube-proxy, CoreDNS, Traefik,
# Prometheus) and helm from upstream Go modules into a cache outside the repository,
# keyed by version. Builds only what is missing.
#
#   e2e/cluster/build.sh            # prints the bin folder on its last line
#   SNOOZE_CACHE=/some/dir e2e/cluster/build.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

K8S_VERSION=v1.33.13      # keep in step with go.mod
ETCD_VERSION=v3.5.21      # the etcd release that Kubernetes pins
HELM_VERSION=v3.19.5
COREDNS_VERSION=v1.15.0   # keep in step with addons/coredns/go.mod
TRAEFIK_VERSION=v3.6.12   # keep in step with addons/traefik/go.mod
PROMETHEUS_VERSION=v0.316.0
GATEWAY_API_VERSION=v1.7.0   # the standard channel's CRDs
cache=${SNOOZE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snooze}
bin="$cache/k8s-$K8S_VERSION/bin"
helm_bin="$cache/helm-$HELM_VERSION/bin"
mkdir -p "$bin" "$helm_bin"

command -v go >/dev/null || { echo "build.sh: go is required (https://go.dev/dl)" >&2; exit 1; }
export GOFLAGS=-mod=mod CGO_ENABLED=0

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldk="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldk+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldk+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build() { # name, package, ldflags
  local name=$1 pkg=$2 ld=$3
  if [ -x "$bin/$name" ]; then return; fi
  echo "building $name ($pkg)" >&2
  (cd "$here" && go build -trimpath -ldflags "$ld" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
}

build etcd ./cmd/etcd "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldk"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ldk"
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$ldk"
build kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$ldk"

addon() { # name, version, module folder (or "" for go install), package, ldflags
  local name=$1 version=$2 dir=$3 pkg=$4 ld=$5 out="$cache/tools/$1-$2"
  if [ ! -x "$out/$name" ]; then
    echo "building $name $version ($pkg)" >&2
    mkdir -p "$out"
    if [ -n "$dir" ]; then
      (cd "$here/addons/$dir" && go build -trimpath -ldflags "$ld" -o "$out/$name.tmp" "$pkg")
      mv "$out/$name.tmp" "$out/$name"
    else
      GOFLAGS= GOBIN="$out" go install -trimpath -ldflags "$ld" "$pkg@$version"
    fi
  fi
  ln -sf "$out/$name" "$bin/$name"
}
addon coredns "$COREDNS_VERSION" coredns github.com/coredns/coredns "-s -w"
addon traefik "$TRAEFIK_VERSION" traefik github.com/traefik/traefik/v3/cmd/traefik \
  "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION"
addon prometheus "$PROMETHEUS_VERSION" "" github.com/prometheus/prometheus/cmd/prometheus "-s -w"

# Gateway API CRDs: the YAML files of the module's zip, fetched from the module proxy
# (go mod download refuses v1.7.0 here: its go.mod asks for a newer Go, and no code of
# it is compiled).
gw="$cache/tools/gateway-api-$GATEWAY_API_VERSION"
if [ ! -s "$gw/standard-crds.yaml" ]; then
  echo "fetching the Gateway API $GATEWAY_API_VERSION CRDs" >&2
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
fi
ln -sf "$gw/standard-crds.yaml" "$bin/gateway-api-crds.yaml"

if [ ! -x "$helm_bin/helm" ]; then
  echo "building helm $HELM_VERSION" >&2
  GOFLAGS= GOBIN="$helm_bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
ln -sf "$helm_bin/helm" "$bin/helm"
echo "$bin"
