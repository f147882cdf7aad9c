#!/usr/bin/env bash
# Scale benchmark on the local cluster: N ScaledServices (each with its Deployment at
# zero and its Service). Reports the time until all are programmed (Ready=True with the
# activator listening), the operator's and activators' RSS and CPU (while programming
# and idle), Snooze's API
# requests during one idle minute as the API server's audit log records them, and then
# W services woken at once (one request each, sent together).
#
#   bench/scale.sh                 # N=1000, W=100
#   SCALE_N=20 SCALE_IDLE_SECONDS=5 SCALE_WAKE=5 bench/scale.sh   # the short setting CI runs
# Needs the cluster up and Snooze installed (./demo.sh does both); run as root.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo"
if [ "${1:-}" = --api ]; then exec "$repo/bench/scale-api.sh"; fi
N=${SCALE_N:-1000}
IDLE=${SCALE_IDLE_SECONDS:-60}
WAKE=${SCALE_WAKE:-100}
[ "$WAKE" -le "$N" ] || WAKE=$N
NS=scale-bench
leader=$(k get lease -n snooze-system snooze-operator -o jsonpath='{.spec.holderIdentity}')
[ -n "$leader" ] || { echo "no operator leader: is Snooze installed?" >&2; exit 1; }
op_pid=$(pid_of "$leader")
op_ip=$(k get pod -n snooze-system "$leader" -o jsonpath='{.status.podIP}')
act_pods=$(k get pods -n snooze-system -l app.kubernetes.io/component=activator -o jsonpath='{.items[*].metadata.name}')
scrape_token
writes() { scrape "http://$op_ip:9091/metrics" | awk '/^snooze_operator_api_writes_total/ {print $2}'; }

echo "operator leader $leader: RSS $(rss_mb "$op_pid") MB before"
k delete ns $NS --ignore-not-found --wait=true >/dev/null
k create ns $NS >/dev/null
gen=$(mktemp)
gen_apps $NS 1 "$N" > "$gen"
declare -A act_pid act_c
for p in $act_pods; do act_pid[$p]=$(pid_of "$p"); done
act_ticks() { for p in $act_pods; do act_c[$p$1]=$(cpu_ticks "${act_pid[$p]}"); done; }
act_cpu_ms() { echo $(( (act_c[$1$3] - act_c[$1$2]) * 1000 / $(getconf CLK_TCK) )); }
w0=$(writes); c0=$(cpu_ticks "$op_pid"); act_ticks 0; t0=$(date +%s.%N)
k apply -f "$gen" --server-side >/dev/null
t_applied=$(date +%s.%N)
while :; do
  ready=$(k get ssvc -n $NS -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)
  [ "$ready" -ge "$N" ] && break
  sleep 1
done
t_ready=$(date +%s.%N)
# Programmed also means every activator listens on every assigned port.
ports=$(k get ssvc -n $NS -o jsonpath='{range .items[*]}{.status.ports[0].activatorPort}{"\n"}{end}' | sort -u | wc -l)
for p in $act_pods; do
  ip=$(k get pod -n snooze-system "$p" -o jsonpath='{.status.podIP}')
  while [ "$(in_ns ss -ltn "src $ip" | grep -c LISTEN)" -lt "$N" ]; do sleep 0.5; done
done
t_listen=$(date +%s.%N)
w1=$(writes); c1=$(cpu_ticks "$op_pid"); act_ticks 1
echo "created $N ScaledServices (+$N Deployments, $N Services): apply took $(awk "BEGIN {printf \"%.1f\", $t_applied - $t0}") s"
echo "all Ready=True $(awk "BEGIN {printf \"%.1f\", $t_ready - $t0}") s after the apply started; all activators listening on all $ports ports after $(awk "BEGIN {printf \"%.1f\", $t_listen - $t0}") s"
echo "operator: RSS $(rss_mb "$op_pid") MB, CPU $(( (c1 - c0) / $(getconf CLK_TCK) )) s while programming, $((${w1%.*} - ${w0%.*})) API writes"
for p in $act_pods; do
  echo "activator $p: RSS $(rss_mb "${act_pid[$p]}") MB, CPU $(act_cpu_ms "$p" 0 1) ms while programming"
done
sleep 5
audit=$STATE_DIR/logs/audit.log
a2=$(wc -l < "$audit" 2>/dev/null || echo 0)
w2=$(writes); c2=$(cpu_ticks "$op_pid"); act_ticks 2
sleep "$IDLE"
w3=$(writes); c3=$(cpu_ticks "$op_pid"); act_ticks 3
a3=$(wc -l < "$audit" 2>/dev/null || echo 0)
echo "idle for ${IDLE}s: operator API writes $((${w3%.*} - ${w2%.*})) (its own count), CPU $(( (c3 - c2) * 1000 / $(getconf CLK_TCK) )) ms, RSS $(rss_mb "$op_pid") MB"
for p in $act_pods; do
  echo "idle for ${IDLE}s: activator $p CPU $(act_cpu_ms "$p" 2 3) ms, RSS $(rss_mb "${act_pid[$p]}") MB"
done
# The same minute at the API server: every request by Snooze's service accounts.
tail -n +"$((a2 + 1))" "$audit" | head -n "$((a3 - a2))" | python3 -c '
import collections, json, sys
idle = float(sys.argv[1])
c = collections.Counter()
for line in sys.stdin:
    e = json.loads(line)
    who = e["user"]["username"].rsplit(":", 1)[-1]
    res = (e.get("objectRef") or {}).get("resource", e.get("requestURI", "?"))
    c[(who, e["verb"], res)] += 1
total = sum(c.values())
print(f"API server audit log, idle {idle:.0f}s: {total} requests from Snooze ({total * 60 / idle:.1f}/min)" + "".join(f"\n  {n:>5}  {w} {v} {r}" for (w, v, r), n in c.most_common()))
' "$IDLE"

# W services woken at once: one request each, all sent together, to the activators.
if [ "$WAKE" -gt 0 ]; then
  urls=$(mktemp)
  for i in $(seq 1 "$WAKE"); do
    k get endpointslice -n $NS -l kubernetes.io/service-name=app-$i-snooze \
      -o jsonpath='{.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}{"\n"}' | sed 's|^|http://|'
  done > "$urls"
  t_w=$(date +%s.%N)
  in_ns xargs -P "$WAKE" -n 1 curl -s -o /dev/null --max-time 120 -w '%{http_code} %{time_starttransfer}\n' < "$urls" > "$urls.out" || true
  t_w_end=$(date +%s.%N)
  python3 - "$urls.out" "$WAKE" "$(awk "BEGIN {print $t_w_end - $t_w}")" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ok = sorted(float(t) * 1000 for c, t in rows if c == "200")
n, wall = int(sys.argv[2]), float(sys.argv[3])
at = lambda p: ok[min(len(ok) - 1, max(0, int(len(ok) * p + 0.999) - 1))] if ok else float("nan")
print(f"{n} services woken at once: {len(ok)}/{n} answered 200; first byte p50 {at(0.5):.0f} ms, p95 {at(0.95):.0f} ms, max {at(1.0):.0f} ms; all answered after {wall:.1f} s")
PY
  # Where the time went: the operator's scale patches for these services, as the API
  # server's audit log has them, against the moment the requests were sent.
  python3 - "$audit" "$t_w" "$NS" "$WAKE" <<'PY'
import datetime, json, sys
path, sent, ns, n = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
wanted = {f"app-{i}" for i in range(1, n + 1)}
first = {}
for line in open(path):
    e = json.loads(line)
    o = e.get("objectRef") or {}
    if (e.get("stage") == "ResponseComplete" and e["verb"] == "patch" and o.get("namespace") == ns
            and o.get("subresource") == "scale" and o.get("name") in wanted):
        t = datetime.datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00")).timestamp()
        if t >= sent:
            first.setdefault(o["name"], t - sent)
if first:
    ts = sorted(first.values())
    print(f"  operator's scale patches for them (audit log): {len(ts)}/{n}, first {ts[0] * 1000:.0f} ms, "
          f"median {ts[len(ts) // 2] * 1000:.0f} ms, last {ts[-1] * 1000:.0f} ms after the requests were sent; "
          "the rest of each wait is kube's controllers and the node starting the pods")
PY
  rm -f "$urls" "$urls.out"
fi
rm -f "$gen"
[ "${SCALE_KEEP:-0}" = 1 ] || k delete ns $NS --wait=false >/dev/null
