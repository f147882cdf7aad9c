#!/usr/bin/env bash
# The local cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy (nftables) and the snooze node agent, all inside one private network
# namespace, with add-ons as pods: CoreDNS as the cluster DNS, Traefik as the ingress
# controller and Gateway, Prometheus (e2e/cluster/addons/).
#
#   e2e/cluster/cluster.sh up      # build what is missing, start (idempotent), print usage
#   e2e/cluster/cluster.sh addons  # add the add-ons wanted now (see addons below)
#   e2e/cluster/cluster.sh down    # stop everything, remove the namespace and the data
#   e2e/cluster/cluster.sh env     # print the variables to use the cluster
#   e2e/cluster/cluster.sh status
#   e2e/cluster/cluster.sh apiserver-stop|apiserver-start   # fault injection
#
# Environment: SNOOZE_CLUSTER_DIR (state, certificates, logs; default /tmp/snooze-cluster),
# SNOOZE_NETNS (default snooze), CARGO_TARGET_DIR (where the Rust binaries are),
# SNOOZE_PROFILE (debug or release binaries for the pods; default debug).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../preflight.sh
. "$here/../preflight.sh"   # wants: which add-ons this command needs

NETNS=${SNOOZE_NETNS:-snooze}
STATE=${SNOOZE_CLUSTER_DIR:-/tmp/snooze-cluster}
TARGET=${CARGO_TARGET_DIR:-$repo/target}
PROFILE_DIR=$TARGET/${SNOOZE_PROFILE:-debug}   # SNOOZE_PROFILE=release for benchmarks
NODE_NAME=snooze-node
NODE_IP=10.240.0.1       # the node's and the API server's address
POD_CIDR=10.244.0.0/16   # pod IPs, routed to lo inside the namespace
SERVICE_CIDR=10.96.0.0/16
CLUSTER_DNS=10.96.0.10   # the kube-dns Service (addons/coredns.yaml)
API_PORT=6443
PKI=$STATE/pki
LOGS=$STATE/logs

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }
in_ns() { ip netns exec "$NETNS" "$@"; }

need_root() { [ "$(id -u)" = 0 ] || die "the local cluster needs root (network and mount namespaces)"; }

api_healthy() {
  ip netns list 2>/dev/null | grep -qw "^$NETNS" || return 1
  in_ns curl -fsS --max-time 2 --cacert "$PKI/ca.crt" "https://$NODE_IP:$API_PORT/readyz" >/dev/null 2>&1
}

print_env() {
  cat <<EOF
# The cluster runs inside the network namespace '$NETNS'. Run kubectl through the wrapper:
#   $STATE/kubectl get nodes
# or enter the namespace with the admin kubeconfig:
#   export KUBECONFIG=$STATE/admin.kubeconfig
#   ip netns exec $NETNS kubectl get pods -A
# Logs of every component: $LOGS/
export KUBECONFIG=$STATE/admin.kubeconfig
export SNOOZE_NETNS=$NETNS
export SNOOZE_CLUSTER_DIR=$STATE
EOF
}

# --- certificates ---------------------------------------------------------------------
gen_pki() {
  mkdir -p "$PKI"
  [ -f "$PKI/ca.crt" ] && [ -f "$PKI/kube-proxy.crt" ] && return
  log "generating certificates in $PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=snooze-local-ca" 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    client() { # file, CN, O
      local subj="/CN=$2"; [ -n "${3:-}" ] && subj="/O=$3$subj"
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$subj" 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    client admin snooze-admin system:masters
    client controller-manager system:kube-controller-manager
    client scheduler system:kube-scheduler
    client node "system:node:$NODE_NAME" system:nodes
    client kube-proxy system:kube-proxy
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    cat > apiserver.ext <<EOF
subjectAltName=IP:$NODE_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    rm -f apiserver.csr apiserver.ext
  )
}

kubeconfig() { # name, cert file prefix
  local f="$STATE/$1.kubeconfig"
  KUBECONFIG=$f kubectl config set-cluster local --server="https://$NODE_IP:$API_PORT" \
    --certificate-authority="$PKI/ca.crt" --embed-certs=true >/dev/null
  KUBECONFIG=$f kubectl config set-credentials "$1" --client-certificate="$PKI/$2.crt" \
    --client-key="$PKI/$2.key" --embed-certs=true >/dev/null
  KUBECONFIG=$f kubectl config set-context local --cluster=local --user="$1" >/dev/null
  KUBECONFIG=$f kubectl config use-context local >/dev/null
}

write_image_map() { # bin folder (the add-ons' executables)
  # The `postgres` image as the real one is to a pod: a shell with the PostgreSQL
  # server's programs (initdb, postgres) on its PATH; here Debian's, of this machine.
  local pgbin
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  printf '#!/bin/sh\nPATH=%s:$PATH exec /bin/sh "$@"\n' "${pgbin:-/usr/lib/postgresql/missing/bin}" \
    > "$STATE/postgres-image"
  chmod 755 "$STATE/postgres-image"
  cat > "$STATE/images.json" <<EOF
{
  "images": {
    "registry.k8s.io/coredns/coredns": "$1/coredns",
    "docker.io/traefik": "$1/traefik",
    "quay.io/prometheus/prometheus": "$1/prometheus",
    "ghcr.io/snooze-sh/operator": "$PROFILE_DIR/snooze-operator",
    "ghcr.io/snooze-sh/activator": "$PROFILE_DIR/snooze-activator",
    "ghcr.io/snooze-sh/testapp": "$PROFILE_DIR/snooze-testapp",
    "redis": "$(command -v redis-server || echo /usr/bin/redis-server)",
    "alpine/openssl": "$(command -v openssl || echo /usr/bin/openssl)",
    "postgres": "$STATE/postgres-image"
  }
}
EOF
}

start() { # name, command...
  local name=$1; shift
  log "starting $name"
  in_ns setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/$name.pid"
}

wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${secs}s (logs: $LOGS)"
    sleep 0.5
  done
}

start_apiserver() { # bin folder
  local bin=$1
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=$API_PORT --advertise-address=$NODE_IP \
    --service-cluster-ip-range=$SERVICE_CIDR \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false --v=1 \
    --audit-policy-file="$here/audit-policy.yaml" --audit-log-path="$LOGS/audit.log" \
    --audit-log-maxsize=200 --audit-log-maxbackup=1
}

# --- fault injection (e2e fault tests) -------------------------------------------------
# Stops the API server (SIGTERM, SIGKILL after 10 s) and starts it again with the same
# flags; etcd and everything else keep running.
apiserver_stop() {
  need_root
  # The pid files hold the launching subshells; find the server itself among the
  # namespace's processes.
  local pids=() p
  for p in $(ip netns pids "$NETNS" 2>/dev/null); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = kube-apiserver ] && pids+=("$p")
  done
  [ ${#pids[@]} -gt 0 ] || die "no kube-apiserver is running"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  while kill -0 "${pids[@]}" 2>/dev/null; do sleep 0.1; done
  api_healthy && die "kube-apiserver still answers"
  log "kube-apiserver stopped (pid ${pids[*]})"
}

apiserver_start() {
  need_root
  local bin
  # Only the control plane (built before the cluster came up): the add-ons the command
  # would want may still be building, and inside the cluster's network namespace
  # (where the fault tests run this) a build cannot download anything.
  bin=$(SNOOZE_FOR=demo SNOOZE_DEMO_INGRESS= "$here/build.sh" | tail -n 1)
  start_apiserver "$bin"
  wait_for kube-apiserver 90 api_healthy
  log "kube-apiserver started"
}

# The add-ons the command wants (preflight.sh: wants), applied and waited for; again
# with more wanted, it adds those (`SNOOZE_FOR=test-first cluster.sh up`, then
# `cluster.sh addons` once Traefik and Prometheus are built: test.sh).
addons() { # bin folder
  local bin=$1
  if wants dns; then
    "$STATE/kubectl" apply -f "$here/addons/coredns.yaml" >/dev/null
  fi
  if wants gateway-api; then
    "$STATE/kubectl" apply --server-side -f "$bin/gateway-api-crds.yaml" >/dev/null
    "$STATE/kubectl" wait --for=condition=Established crd --all --timeout=60s >/dev/null
  fi
  # The ingress controller (Ingress and Gateway API).
  if wants ingress; then
    "$STATE/kubectl" apply -f "$here/addons/traefik.yaml" >/dev/null
  fi
  # Prometheus, with Snooze's plain alert rules file (the chart's files/alerts.yaml);
  # not for the demo, which never queries it.
  if wants monitoring; then
    "$STATE/kubectl" apply -f "$here/addons/prometheus.yaml" >/dev/null
    "$STATE/kubectl" create configmap snooze-alerts -n monitoring --dry-run=client -o yaml \
      --from-file=alerts.yaml="$repo/charts/snooze/files/alerts.yaml" | "$STATE/kubectl" apply -f - >/dev/null
  fi
  if wants dns; then
    wait_for "cluster DNS" 90 "$STATE/kubectl" rollout status deployment/coredns -n kube-system --timeout=1s
  fi
  if wants ingress; then
    wait_for "ingress controller" 90 "$STATE/kubectl" rollout status deployment/traefik -n traefik --timeout=1s
  fi
  if wants monitoring; then
    wait_for "prometheus" 90 "$STATE/kubectl" rollout status deployment/prometheus -n monitoring --timeout=1s
  fi
}

up() {
  need_root
  if api_healthy && [ -f "$STATE/node-agent.pid" ] && kill -0 "$(cat "$STATE/node-agent.pid")" 2>/dev/null; then
    log "already up"
    print_env
    return
  fi
  for tool in openssl curl ip setsid kubectl; do
    command -v $tool >/dev/null || die "$tool is required (see README: setup)"
  done
  local bin
  bin=$("$here/build.sh" | tail -n 1)
  if [ "${SNOOZE_PROFILE:-debug}" = release ]; then
    # Benchmarks run on release pods: build them from the sources at hand (nothing
    # builds release binaries otherwise, and stale ones measure old code).
    log "building the release binaries the pods run"
    (cd "$repo" && cargo build -q --release --bins -p snooze-operator -p snooze-activator -p snooze-e2e)
  fi
  [ -x "$PROFILE_DIR/snooze-node-agent" ] || die "missing $PROFILE_DIR/snooze-node-agent: run cargo build --workspace --bins"
  local t0=$SECONDS
  down_quiet
  rm -rf "$LOGS"
  mkdir -p "$STATE" "$LOGS" "$STATE/etcd" "$STATE/node"
  chmod 755 "$STATE" "$STATE/node"   # containers run as other users and read from here
  gen_pki
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig node node
  kubeconfig kube-proxy kube-proxy
  write_image_map "$bin"
  cat > "$STATE/kubectl" <<EOF
#!/usr/bin/env bash
exec ip netns exec $NETNS kubectl --kubeconfig $STATE/admin.kubeconfig "\$@"
EOF
  chmod +x "$STATE/kubectl"

  ip netns add "$NETNS"
  in_ns ip link set lo up
  in_ns ip addr add "$NODE_IP/32" dev lo
  in_ns ip route add local "$POD_CIDR" dev lo
  # ClusterIPs are local too: kube-proxy's nftables rules rewrite them (output hook)
  # to a pod address before the packet leaves.
  in_ns ip route add local "$SERVICE_CIDR" dev lo

  start etcd "$bin/etcd" --name default --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
  wait_for etcd 30 in_ns curl -fsS http://127.0.0.1:2379/health

  start_apiserver "$bin"
  wait_for kube-apiserver 90 api_healthy

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --use-service-account-credentials=true --leader-elect=false \
    --bind-address=127.0.0.1 --profiling=false --v=1
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false --v=1

  start node-agent env KUBECONFIG="$STATE/node.kubeconfig" RUST_LOG="${SNOOZE_NODE_LOG:-info,kube=warn}" \
    "$PROFILE_DIR/snooze-node-agent" --node-name $NODE_NAME --node-ip $NODE_IP \
    --images "$STATE/images.json" --state-dir "$STATE/node" --log-dir "$LOGS/pods" \
    --api-host $NODE_IP --api-port $API_PORT --cluster-dns $CLUSTER_DNS

  wait_for "node $NODE_NAME" 60 "$STATE/kubectl" wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
  # kube-proxy in nftables mode: ClusterIP and NodePort (on the node's address).
  # conntrack-max-per-core=0: the conntrack table size is the host's, not ours to set.
  start kube-proxy "$bin/kube-proxy" --kubeconfig="$STATE/kube-proxy.kubeconfig" \
    --proxy-mode=nftables --hostname-override=$NODE_NAME --cluster-cidr=$POD_CIDR \
    --conntrack-max-per-core=0 --metrics-bind-address=127.0.0.1:10249 \
    --healthz-bind-address=127.0.0.1:10256 --v=1
  wait_for kube-proxy 60 in_ns curl -fsS http://127.0.0.1:10256/healthz
  wait_for "default service account" 60 "$STATE/kubectl" get serviceaccount default -n default
  wait_for "kube-root-ca.crt" 60 "$STATE/kubectl" get configmap kube-root-ca.crt -n default
  addons "$bin"
  log "up in $((SECONDS - t0))s"
  print_env
}

down_quiet() {
  if ip netns list 2>/dev/null | grep -qw "^$NETNS"; then
    local pids
    pids=$(ip netns pids "$NETNS" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill -TERM $pids 2>/dev/null || true
      for _ in $(seq 1 20); do
        pids=$(ip netns pids "$NETNS" 2>/dev/null || true)
        [ -z "$pids" ] && break
        sleep 0.25
      done
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
      sleep 0.2
    fi
    ip netns del "$NETNS"
  fi
  rm -f "$STATE"/*.pid
  rm -rf "$STATE/etcd" "$STATE/node"
}

down() {
  need_root
  down_quiet
  log "down (logs kept in $LOGS)"
}

status() {
  if api_healthy; then
    "$STATE/kubectl" get nodes,pods -A -o wide
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  up) up ;;
  addons) need_root; api_healthy || die "the cluster is not up"; addons "$("$here/build.sh" | tail -n 1)" ;;
  down) down ;;
  env) print_env ;;
  status) status ;;
  apiserver-stop) apiserver_stop ;;
  apiserver-start) apiserver_start ;;
  *) echo "usage: $0 up|addons|down|env|status|apiserver-stop|apiserver-start" >&2; exit 2 ;;
esac
