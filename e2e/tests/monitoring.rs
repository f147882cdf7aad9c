//! Snooze under a real Prometheus (the local cluster's add-on, e2e/cluster/addons/
//! prometheus.yaml): it finds both components through the Kubernetes API and the
//! chart's pod annotations, every PromQL expression of the chart's dashboard and alert
//! rules returns series after traffic, and an alert fires when a never-ready workload
//! times out its requests. Run by ./test.sh.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::PostParams;
use serde_json::Value;
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);

/// The Prometheus API: its Service's ClusterIP (through kube-proxy).
async fn prometheus(client: &kube::Client) -> String {
    let svc = Api::<Service>::namespaced(client.clone(), "monitoring")
        .get("prometheus")
        .await
        .expect("the local cluster's Prometheus (e2e/cluster/addons/prometheus.yaml)");
    format!("{}:9090", svc.spec.unwrap().cluster_ip.unwrap())
}

async fn api(prom: &str, path: &str) -> Result<Value, String> {
    let (status, body) = http_get(&format!("http://{prom}{path}"), Duration::from_secs(10)).await?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"].clone())
}

/// An instant query: its result vector (Err on a PromQL error).
async fn query(prom: &str, expr: &str) -> Result<Vec<Value>, String> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    let data = api(prom, &format!("/api/v1/query?{q}")).await?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// Every PromQL expression of the dashboard (panel queries, and the metric selector of
/// each `label_values` variable), the dashboard's variables filled in.
fn dashboard_queries(ns: &str) -> Vec<(String, String)> {
    let path = repo_path("charts/snooze/files/dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let fill = |e: &str| {
        e.replace("$namespace", ns)
            .replace("$name", ".*")
            .replace("$__rate_interval", "1m")
    };
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            out.push((
                format!("panel {title:?} {}", t["refId"]),
                fill(t["expr"].as_str().unwrap()),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["definition"].as_str() {
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| panic!("variable {}: {def}", v["name"]));
            out.push((format!("variable {}", v["name"]), fill(&inner)));
        }
    }
    out
}

/// The alert rules of the chart's plain rules file: (alert, expr).
fn alert_rules() -> Vec<(String, String)> {
    let path = repo_path("charts/snooze/files/alerts.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut alert = None;
    for l in text.lines().map(str::trim) {
        if let Some(a) = l.strip_prefix("- alert: ") {
            alert = Some(a.to_string());
        } else if let Some(e) = l.strip_prefix("expr: ") {
            out.push((alert.take().expect("expr after its alert"), e.to_string()));
        }
    }
    assert_eq!(out.len(), 4, "{out:?}");
    out
}

/// An alert's signal: its expression without the final threshold (`… > 0`, `… < 1`),
/// which returns series whether or not the alert fires.
fn signal(expr: &str) -> &str {
    let e = expr.trim_end();
    let no_number = e.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let op = no_number.trim_end();
    for cmp in ["<=", ">=", "==", "!=", "<", ">"] {
        if let Some(lhs) = op.strip_suffix(cmp) {
            return lhs.trim_end();
        }
    }
    e
}

#[test]
fn signals_drop_only_the_threshold() {
    assert_eq!(signal("sum(x[5m]) > 0"), "sum(x[5m])");
    assert_eq!(signal("(max(l) or vector(0)) < 1"), "(max(l) or vector(0))");
    assert_eq!(signal("rate(x[1m])"), "rate(x[1m])");
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn prometheus_scrapes_both_and_every_query_returns_series_and_an_alert_fires() {
    ensure_snooze().await;
    in_namespace("monitoring", |client, ns| async move {
        let prom = prometheus(&client).await;

        // 1. Discovery through the Kubernetes API and the chart's pod annotations: every
        // operator and activator pod is a target, and up.
        let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        for component in ["operator", "activator"] {
            let want = ready_pods(&pods, &format!("app.kubernetes.io/component={component}"))
                .await
                .unwrap();
            assert!(!want.is_empty());
            wait_for(
                &format!("every {component} pod scraped and up"),
                T,
                || async {
                    let data = api(&prom, "/api/v1/targets?state=active").await?;
                    let up: Vec<String> = data["activeTargets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|t| t["labels"]["component"] == component && t["health"] == "up")
                        .filter_map(|t| t["labels"]["pod"].as_str().map(String::from))
                        .collect();
                    want.iter()
                        .all(|(pod, _)| up.contains(pod))
                        .then_some(())
                        .ok_or(format!("up: {up:?}, pods: {want:?}"))
                },
            )
            .await;
        }

        // 2. Traffic: `web` woken and used; `broken` never becomes ready, so of four
        // requests at once some are held until activation.timeout (504) and the rest
        // find its small queue full (503).
        scaled_app(&client, &ns, 0, 0, 3, "30s", &[]).await;
        app(&client, &ns, "broken", 0, &["--ready-delay-ms", "3600000"]).await;
        let mut broken = serde_json::to_value(scaled_service("broken", 0, 1, "30s")).unwrap();
        broken["spec"]["activation"] = serde_json::json!({"timeout": "2s", "maxQueuedRequests": 2});
        let broken: ScaledService = serde_json::from_value(broken).unwrap();
        Api::<ScaledService>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &broken)
            .await
            .unwrap();
        let web = wait_for("web's endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let broken = wait_for("broken's endpoints", T, || {
            listening_targets(&client, &ns, "broken", "http")
        })
        .await;
        for i in 0..20 {
            let url = format!("http://{}/", web[i % web.len()]);
            let got = http_get(&url, T).await;
            assert!(matches!(got, Ok((200, _))), "{got:?}");
        }
        // Prometheus has seen broken's counters at 0 on every activator before they
        // count (increase() cannot see a rise it has no earlier sample for; in a real
        // cluster a service exists long before its queue overflows).
        for counter in ["queue_full_total", "activation_timeouts_total"] {
            let expr =
                format!("snooze_activator_{counter}{{namespace=\"{ns}\",name=\"broken\"}} == 0");
            wait_for(&format!("{expr} on every activator"), T, || async {
                let r = query(&prom, &expr).await?;
                (r.len() == broken.len())
                    .then_some(())
                    .ok_or(format!("{} series", r.len()))
            })
            .await;
        }
        let mut held = Vec::new();
        for i in 0..4 {
            let url = format!("http://{}/", broken[i % broken.len()]);
            held.push(tokio::spawn(async move { http_get(&url, T).await }));
        }
        let mut statuses = Vec::new();
        for h in held {
            statuses.push(h.await.unwrap().map(|(s, _)| s));
        }
        statuses.sort();
        eprintln!("broken answered {statuses:?}");
        assert!(statuses.contains(&Ok(504)), "{statuses:?}");
        assert!(statuses.contains(&Ok(503)), "{statuses:?}");

        // 3. Every dashboard query and every alert's signal returns series; the two
        // per-service alerts' full expressions return broken's series.
        let mut queries = dashboard_queries(&ns);
        for (alert, expr) in alert_rules() {
            queries.push((format!("alert {alert} (signal)"), signal(&expr).to_string()));
            if matches!(
                alert.as_str(),
                "SnoozeActivationTimeouts" | "SnoozeQueueOverflow"
            ) {
                queries.push((format!("alert {alert}"), expr));
            }
        }
        assert!(queries.len() >= 25, "{}", queries.len());
        for (what, expr) in &queries {
            let series = wait_for(&format!("{what}: {expr}"), T, || async {
                let r = query(&prom, expr).await?;
                (!r.is_empty()).then_some(r).ok_or("no series".to_string())
            })
            .await;
            eprintln!("{what}: {} series", series.len());
        }

        // 4. The alert fires, for broken.
        let firing = wait_for("SnoozeActivationTimeouts firing for broken", T, || async {
            let data = api(&prom, "/api/v1/alerts").await?;
            data["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| {
                    a["labels"]["alertname"] == "SnoozeActivationTimeouts"
                        && a["labels"]["namespace"] == ns.as_str()
                        && a["labels"]["name"] == "broken"
                        && a["state"] == "firing"
                })
                .cloned()
                .ok_or("not firing".to_string())
        })
        .await;
        eprintln!("firing: {}", firing["annotations"]["description"]);
        assert!(
            firing["annotations"]["description"]
                .as_str()
                .unwrap()
                .contains(&format!("{ns}/broken")),
            "{firing}"
        );
    })
    .await;
}
