# The one preflight of ./demo.sh, ./test.sh and .ci/run (sourced, not run): checks at
# the start, in seconds, what cannot be installed for the user (Rust, Go, kubectl, root,
# the kernel's network namespaces and nftables) with one line each, installs the
# Debian packages that are missing, and gives the build steps a progress line each
# (what, how long, cached or built) with the full output in a log file.
#
#   . e2e/preflight.sh
#   preflight unit      # Rust only (cargo tests, no cluster)
#   preflight cluster   # everything the local cluster needs

SNOOZE_CACHE=${SNOOZE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snooze}
SNOOZE_BUILD_LOGS=${SNOOZE_BUILD_LOGS:-$SNOOZE_CACHE/logs}
export SNOOZE_CACHE SNOOZE_BUILD_LOGS
RUST_MIN=1.89 # the workspace's rust-version
GO_MIN=1.26   # the local cluster's Go modules

# Which add-ons of the local cluster a command needs, in one place for build.sh and
# cluster.sh: the tests need all; the demo (SNOOZE_FOR=demo) only the control plane and
# helm, plus CoreDNS and Traefik when it goes through the ingress
# (SNOOZE_DEMO_INGRESS=traefik). SNOOZE_FOR=test-first is what the test suites before
# the traffic paths need (all but Traefik and Prometheus, the two longest builds):
# test.sh starts them on it while those two still build (cluster.sh addons adds them).
wants() { # ingress | gateway-api | dns | monitoring | test-tools
  case ${SNOOZE_FOR:-test} in
    demo)
      case $1 in
        ingress | gateway-api | dns) [ "${SNOOZE_DEMO_INGRESS:-}" = traefik ] ;;
        *) return 1 ;;
      esac ;;
    test-first) [ "$1" != ingress ] && [ "$1" != monitoring ] ;;
    *) return 0 ;;
  esac
}

# version_ge A B: true when dotted version A >= B
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

preflight() { # unit | cluster
  local mode=$1 errors=()
  if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    errors+=("Rust >= $RUST_MIN is required: install it with rustup (https://rustup.rs), then open a new shell")
  else
    local rv
    rv=$(rustc --version | awk '{print $2}')
    version_ge "${rv%%-*}" "$RUST_MIN" || errors+=("Rust >= $RUST_MIN is required, found $rv: rustup update stable")
  fi
  if [ "$mode" = cluster ]; then
    [ "$(id -u)" = 0 ] || errors+=("root is required: the local cluster uses network and mount namespaces (run with sudo -E)")
    if ! command -v go >/dev/null; then
      errors+=("Go >= $GO_MIN is required to build the local control plane: install it from https://go.dev/dl")
    else
      local gv
      gv=$(go env GOVERSION); gv=${gv#go}
      version_ge "$gv" "$GO_MIN" || errors+=("Go >= $GO_MIN is required, found $gv: install it from https://go.dev/dl")
    fi
    command -v kubectl >/dev/null || errors+=("kubectl is required: https://kubernetes.io/docs/tasks/tools/")
    [ -e /proc/self/ns/net ] && [ -e /proc/self/ns/mnt ] ||
      errors+=("the kernel has no network or mount namespaces (CONFIG_NET_NS, CONFIG_NAMESPACES): the local cluster needs them")
  fi
  if [ ${#errors[@]} -gt 0 ]; then
    printf 'preflight: %s\n' "${errors[@]}" >&2
    return 1
  fi
  # A C linker for the Rust build (ring compiles C too).
  local missing=()
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  if [ "$mode" = cluster ]; then
    command -v openssl >/dev/null || missing+=(openssl)   # the cluster's certificates
    command -v curl >/dev/null || missing+=(curl)         # health checks, the Gateway API CRDs
    command -v ip >/dev/null || missing+=(iproute2)       # the cluster's network namespace
    command -v setsid >/dev/null || missing+=(util-linux)
    command -v nft >/dev/null || missing+=(nftables)      # kube-proxy's nftables mode runs nft
    command -v python3 >/dev/null || missing+=(python3)   # unpacks the Gateway API CRDs
    if wants test-tools; then                             # real servers and clients of e2e/tests/tcp.rs
      command -v redis-server >/dev/null || missing+=(redis-server)
      command -v redis-cli >/dev/null || missing+=(redis-tools)
      command -v psql >/dev/null || missing+=(postgresql-client)
      # The waiting page's browser test: Chromium, and a venv for Playwright.
      # (Debian's package; where apt has none, e2e/cluster/build.sh has Playwright fetch its own.)
      command -v chromium-headless-shell >/dev/null ||
        { apt-cache show chromium-headless-shell >/dev/null 2>&1 && missing+=(chromium-headless-shell); }
      python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
      if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        missing+=(postgresql)
        # Only the programs: no cluster of the machine's own created or started.
        mkdir -p /etc/postgresql-common/createcluster.d 2>/dev/null &&
          echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/snooze.conf 2>/dev/null || true
      fi
    fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "preflight: installing ${missing[*]} (apt-get)" >&2
      mkdir -p "$SNOOZE_BUILD_LOGS"
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
        >"$SNOOZE_BUILD_LOGS/apt.log" 2>&1; then
        echo "preflight: apt-get install ${missing[*]} failed (log: $SNOOZE_BUILD_LOGS/apt.log)" >&2
        return 1
      fi
    else
      echo "preflight: missing ${missing[*]}: install them (apt-get install ${missing[*]})" >&2
      return 1
    fi
  fi
  if [ "$mode" = cluster ]; then
    # nftables in the kernel, tried where kube-proxy will use it: a throw-away namespace.
    local ns=snooze-preflight-$$
    if ! { ip netns add "$ns" && ip netns exec "$ns" nft add table inet snooze_preflight; } >/dev/null 2>&1; then
      ip netns del "$ns" >/dev/null 2>&1 || true
      echo "preflight: cannot create a network namespace with an nftables table (kernel without nf_tables, or no CAP_NET_ADMIN): kube-proxy needs both" >&2
      return 1
    fi
    ip netns del "$ns"
  fi
}

# step NAME LOG CMD...: runs CMD with its output in LOG, prints one line when it ends
# (built in N s, or failed with the log named). Quiet when CMD prints "cached" only.
step_run() {
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  mkdir -p "$(dirname "$log")"
  if "$@" >"$log" 2>&1; then
    printf '  %-34s %s\n' "$name" "done in $((SECONDS - t0)) s" >&2
  else
    printf '  %-34s FAILED after %s s; last lines of %s:\n' "$name" "$((SECONDS - t0))" "$log" >&2
    tail -n 15 "$log" | sed 's/^/    /' >&2
    return 1
  fi
}
