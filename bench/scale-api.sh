#!/usr/bin/env bash
# The operator's API requests at scale (issue 28), before and after, in one run:
# N ScaledServices idle, W of them woken at once, all N busy (steady traffic to each),
# then L idle. In each phase the operator built from SCALE_BEFORE (a git revision, its
# own cached target directory) and the one from this tree take turns on the same
# objects and pods (switched by image tag; each measured after a settle time), and the
# API server's audit log says what each sent. Also the leader's reconciles and API
# reads (its own metrics: reads per reconcile), and its RSS (per service, from N to L).
#
#   bench/scale.sh --api                       # N=1000 W=100 L=5000, 60 s windows
#   SCALE_BEFORE=2c81f7b bench/scale.sh --api  # with a "before" operator
#   SCALE_PHASES=busy SCALE_REUSE=1 SCALE_KEEP=1 bench/scale.sh --api   # one phase again
#   SCALE_N=20 SCALE_WAKE=5 SCALE_LARGE=40 SCALE_MEASURE_SECONDS=10 SCALE_SETTLE_SECONDS=5 bench/scale.sh --api
# Needs the cluster up with release binaries (SNOOZE_PROFILE=release) and Snooze
# installed; run as root. Takes about 40 minutes at the defaults.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
N=${SCALE_N:-1000}
W=${SCALE_WAKE:-100}
L=${SCALE_LARGE:-5000}
MEASURE=${SCALE_MEASURE_SECONDS:-60}
SETTLE=${SCALE_SETTLE_SECONDS:-30}
INTERVAL=${SCALE_BUSY_INTERVAL:-5}
BEFORE=${SCALE_BEFORE:-}
NS=scale-api
PROFILE_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/snooze/target}/${SNOOZE_PROFILE:-release}
audit=$STATE_DIR/logs/audit.log
[ $((2 * W)) -le "$N" ] || { echo "SCALE_WAKE must be at most half of SCALE_N" >&2; exit 1; }
[ -n "$(leader)" ] || { echo "no operator leader: is Snooze installed?" >&2; exit 1; }
limit=$(k get deploy -n snooze-system snooze-operator -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -o 'max-ports-per-namespace=[0-9]*' | cut -d= -f2)
[ "${limit:-1000}" -ge "$L" ] || { echo "the install allows $limit activator ports per namespace, the run needs $L: helm upgrade ... --set operator.maxPortsPerNamespace=$L" >&2; exit 1; }

# The operators, as images the node agent maps to executables (copies: a build during
# the run changes nothing).
versions=after
# (cp then mv: a copy still running from an earlier run stays as it is)
cp "$PROFILE_DIR/snooze-operator" "$STATE_DIR/operator-after.tmp" && mv "$STATE_DIR/operator-after.tmp" "$STATE_DIR/operator-after"
if [ -n "$BEFORE" ]; then
  src=$HOME/.cache/snooze/bench-before/src
  rm -rf "$src" && mkdir -p "$src"
  git archive "$BEFORE" | tar -x -C "$src"
  echo "building the operator of $BEFORE (release) ..."
  (cd "$src" && CARGO_TARGET_DIR=$HOME/.cache/snooze/bench-before/target cargo build --release --offline -q -p snooze-operator)
  cp "$HOME/.cache/snooze/bench-before/target/release/snooze-operator" "$STATE_DIR/operator-before.tmp"
  mv "$STATE_DIR/operator-before.tmp" "$STATE_DIR/operator-before.bin"
  # This tree's chart may pass flags the older build does not have (it would exit at
  # start): the older one runs behind a wrapper that drops them, saying which.
  cat > "$STATE_DIR/operator-before" <<WRAP
#!/bin/bash
PATH=/usr/bin:/bin
known=\$("$STATE_DIR/operator-before.bin" --help | grep -o -- '--[a-z0-9-]*' | sort -u)
args=()
for a in "\$@"; do
  if [[ \$a != --* ]] || grep -qx -- "\${a%%=*}" <<<"\$known"; then args+=("\$a"); else echo "dropped \$a: unknown to this build" >&2; fi
done
exec "$STATE_DIR/operator-before.bin" "\${args[@]}"
WRAP
  chmod 755 "$STATE_DIR/operator-before"
  versions="before after"
fi
python3 - "$STATE_DIR" <<'PY'
import json, sys
p = f"{sys.argv[1]}/images.json"
m = json.load(open(p))
for v in ("before", "after"):
    m["images"][f"ghcr.io/snooze-sh/operator:{v}"] = f"{sys.argv[1]}/operator-{v}"
json.dump(m, open(p, "w"), indent=2)
PY
original_image=$(k get deploy -n snooze-system snooze-operator -o jsonpath='{.spec.template.spec.containers[0].image}')
restore() { k set image -n snooze-system deploy/snooze-operator "operator=$original_image" >/dev/null || true; }
trap restore EXIT

use() { # use VERSION: the operators run that build; returns once one leads, settled
  k set image -n snooze-system deploy/snooze-operator "operator=ghcr.io/snooze-sh/operator:$1" >/dev/null
  k rollout status -n snooze-system deploy/snooze-operator --timeout=600s >/dev/null
  local l
  while :; do
    l=$(leader)
    if [ -n "$l" ] && k get pod -n snooze-system "$l" -o jsonpath='{.spec.containers[0].image}' 2>/dev/null | grep -q ":$1\$"; then break; fi
    sleep 1
  done
  sleep "$SETTLE"
}
scrape_token
metrics() { scrape "http://$(k get pod -n snooze-system "$(leader)" -o jsonpath='{.status.podIP}'):9091/metrics"; }
metric_sum() { awk -v m="$1" 'index($1, m) == 1 && (substr($1, length(m) + 1, 1) == "{" || substr($1, length(m) + 1, 1) == "") {s += $2} END {printf "%d", s}'; }

declare -A rss
# window LABEL VERSION [CMD ...]: MEASURE seconds of the audit log and the leader's
# metrics; CMD (if any) runs in the background once the window has started.
window() {
  local a0 a1 m0 m1 pid label=$1 version=$2
  shift 2
  pid=$(pid_of "$(leader)")
  rss[$label/$version]=$(rss_kb "$pid")
  m0=$(metrics); a0=$(wc -l < "$audit")
  [ $# -eq 0 ] || "$@" &
  sleep "$MEASURE"
  m1=$(metrics); a1=$(wc -l < "$audit")
  local rec=$(( $(metric_sum snooze_operator_reconciles_total <<<"$m1") - $(metric_sum snooze_operator_reconciles_total <<<"$m0") ))
  local reads=$(( $(metric_sum snooze_operator_api_reads_total <<<"$m1") - $(metric_sum snooze_operator_api_reads_total <<<"$m0") ))
  tail -n +"$((a0 + 1))" "$audit" | head -n "$((a1 - a0))" | python3 -c '
import collections, json, sys
label, version, secs, rec, reads, rss = sys.argv[1:7]
secs = float(secs)
c = collections.Counter()
for line in sys.stdin:
    e = json.loads(line)
    if e.get("stage") != "ResponseComplete" or not e["user"]["username"].endswith(":snooze-operator"):
        continue
    res = (e.get("objectRef") or {}).get("resource", "?")
    sub = (e.get("objectRef") or {}).get("subresource")
    c[(e["verb"], res + ("/" + sub if sub else ""))] += 1
per_min = lambda n: n * 60 / secs
total = sum(c.values())
gets = sum(n for (v, r), n in c.items() if v == "get" and r != "leases")
writes = sum(n for (v, r), n in c.items() if v in ("create", "update", "patch", "delete") and r != "leases")
rec = int(rec)
print(f"{label:<22} {version:<7} requests/min {per_min(total):>7.0f}  GET (no leases)/min {per_min(gets):>6.0f}  "
      f"writes/min {per_min(writes):>6.0f}  reconciles {rec:>6}  GETs/reconcile {gets / rec if rec else 0:>5.2f}  "
      f"reads/reconcile (metric) {int(reads) / rec if rec else 0:>5.2f}  leader RSS {rss} MB")
print("    " + ", ".join(f"{v} {r} {n}" for (v, r), n in c.most_common(12)))
' "$label" "$version" "$MEASURE" "$rec" "$reads" "$(rss_mb "$pid")"
}

# Each phase with each version: the phase's figures side by side.
phase() { # phase LABEL: window per version
  local v
  for v in $versions; do use "$v"; window "$1" "$v"; done
}

# SCALE_PHASES: which of the phases run (all by default); SCALE_REUSE=1 keeps the
# namespace of an earlier run (SCALE_KEEP=1) instead of creating it again.
phases=" ${SCALE_PHASES:-idle wake busy large} "
runs() { [[ $phases == *" $1 "* ]]; }
gen=$(mktemp)
if [ "${SCALE_REUSE:-0}" != 1 ]; then
  k delete ns $NS --ignore-not-found --wait=true >/dev/null
  k create ns $NS >/dev/null
  echo "creating $N ScaledServices (+ Deployments at zero, Services) ..."
  gen_apps $NS 1 "$N" > "$gen"
  k apply -f "$gen" --server-side >/dev/null
fi
wait_ready $NS "$N"

# 1. N idle.
runs idle && phase "$N idle"

# 2. W woken at once, per version (its own W services): the window starts as they are sent.
urls_of() { # urls_of FROM TO: the activator address of app-FROM … app-TO
  k get endpointslice -n $NS -l "endpointslice.kubernetes.io/managed-by=operator.snooze.dev" -o json | python3 -c '
import json, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for s in json.load(sys.stdin)["items"]:
    name = s["metadata"]["labels"].get("kubernetes.io/service-name", "")
    i = int(name.split("-")[1]) if name.startswith("app-") else 0
    if lo <= i <= hi and s.get("endpoints"):
        print("http://%s:%d/" % (s["endpoints"][0]["addresses"][0], s["ports"][0]["port"]))
' "$1" "$2"
}
first=1
runs wake && for v in $versions; do
  use "$v"
  urls=$(mktemp); urls_of "$first" $((first + W - 1)) > "$urls"
  send() { in_ns xargs -P "$W" -n 1 curl -s -o /dev/null --max-time 120 -w '%{http_code}\n' < "$urls" | sort | uniq -c | tr '\n' ' ' > "$urls.codes"; }
  window "$W woken at once" "$v" send
  wait
  echo "    answers: $(cat "$urls.codes")"
  rm -f "$urls" "$urls.codes"
  first=$((first + W))
done

# 3. All N busy: every Deployment at one replica (set directly, not woken: a thousand
# wakes at once is phase 2's question), then one request every INTERVAL seconds to each.
if runs busy; then
echo "scaling all $N to one replica and waiting for $N ready pods ..."
k scale deploy -n $NS --all --replicas=1 >/dev/null
until [ "$(k get pods -n $NS -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)" -ge "$N" ]; do sleep 5; done
urls=$(mktemp); urls_of 1 "$N" > "$urls"
n_versions=$(wc -w <<<"$versions")
busy_for=$(( n_versions * (MEASURE + SETTLE + 120) ))
in_ns python3 bench/steady.py "$urls" "$INTERVAL" "$busy_for" > "$urls.out" &
traffic=$!
phase "$N busy"
kill -TERM "$traffic" 2>/dev/null || true   # steady.py stops and prints its summary
wait "$traffic" 2>/dev/null || true
echo "    traffic: $(cat "$urls.out" 2>/dev/null || echo stopped before its summary)"
rm -f "$urls" "$urls.out"
fi

# 4. L idle: all back at zero, L - N more created.
if runs large; then
echo "scaling all back to zero; creating $((L - N)) more ScaledServices ..."
k scale deploy -n $NS --all --replicas=0 >/dev/null
gen_apps $NS $((N + 1)) "$L" > "$gen"
k apply -f "$gen" --server-side >/dev/null
wait_ready $NS "$L"
phase "$L idle"
for v in $versions; do
  runs idle && echo "leader RSS ($v): $((${rss[$N idle/$v]} / 1024)) MB with $N, $((${rss[$L idle/$v]} / 1024)) MB with $L: $(( (${rss[$L idle/$v]} - ${rss[$N idle/$v]}) * 1024 / (L - N) )) bytes per added service"
done
fi
rm -f "$gen"
[ "${SCALE_KEEP:-0}" = 1 ] || k delete ns $NS --wait=false >/dev/null
