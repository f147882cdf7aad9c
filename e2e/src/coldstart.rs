//! `snooze-bench coldstart`: cold starts of the test application on the local cluster,
//! split into segments as the API server and the client see them.
//!
//! Each round waits until the app is at zero (no pod; the ScaledService's 2 s idle
//! timeout puts it there), sends one request to an activator the way an ingress would
//! (an endpoint of the managed Service), and records, from watches started before the
//! request: the Deployment's scale patch, the pod's creation and its Ready condition;
//! and from the client: the first byte of the answer. The operator's own wake → patch
//! time comes from its `snooze_operator_wake_to_patch_seconds` histogram (one
//! observation per round).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use std::sync::Mutex as StdMutex;

use crate::testing::{
    SNOOZE_NAMESPACE, http_get, ingress_targets, scrape, testapp_deployment, testapp_service,
    with_readiness_period,
};

/// Instants seen by the watches during one round.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    patch: Option<Instant>,
    created: Option<Instant>,
    ready: Option<Instant>,
}

/// The operator's wake → patch histogram (sum, count) from the leader's metrics.
async fn wake_to_patch(client: &Client) -> anyhow::Result<(f64, u64)> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let holder = leases
        .get("snooze-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .context("no operator leader")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let ip = pods
        .get(&holder)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("leader has no IP")?;
    let (_, text) = scrape(&format!("http://{ip}:9091/metrics"), Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let value = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Ok((
        value("snooze_operator_wake_to_patch_seconds_sum").unwrap_or(0.0),
        value("snooze_operator_wake_to_patch_seconds_count").unwrap_or(0.0) as u64,
    ))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Starts the Deployment and Pod watches; returns once both have listed.
async fn watch_round(
    client: &Client,
    ns: &str,
) -> (Arc<StdMutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(StdMutex::new(Seen::default()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(2);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut tasks = Vec::new();
    {
        let seen = seen.clone();
        let tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let cfg = watcher::Config::default().fields("metadata.name=web");
            let mut s = std::pin::pin!(watcher::watcher(deploys, cfg));
            while let Some(Ok(ev)) = s.next().await {
                match ev {
                    watcher::Event::InitDone => {
                        let _ = tx.send(()).await;
                    }
                    watcher::Event::Apply(d)
                        if d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) >= 1 =>
                    {
                        seen.lock().unwrap().patch.get_or_insert(Instant::now());
                    }
                    _ => {}
                }
            }
        }));
    }
    {
        let seen = seen.clone();
        let tx = ready_tx;
        tasks.push(tokio::spawn(async move {
            let cfg = watcher::Config::default().labels("app=web");
            let mut s = std::pin::pin!(watcher::watcher(pods, cfg));
            while let Some(Ok(ev)) = s.next().await {
                match ev {
                    watcher::Event::InitDone => {
                        let _ = tx.send(()).await;
                    }
                    watcher::Event::Apply(p) => {
                        let now = Instant::now();
                        let mut s = seen.lock().unwrap();
                        s.created.get_or_insert(now);
                        if pod_ready(&p) {
                            s.ready.get_or_insert(now);
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    for _ in 0..2 {
        let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await;
    }
    (seen, tasks)
}

/// Waits until the app has no replica, no pod, and the last wake is `gap` ago.
async fn until_asleep(
    client: &Client,
    ns: &str,
    since_last: Option<Instant>,
    gap: Duration,
) -> anyhow::Result<()> {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let replicas = deploys
            .get("web")
            .await?
            .spec
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let n = pods
            .list(&ListParams::default().labels("app=web"))
            .await?
            .items
            .len();
        let gap_ok = since_last.is_none_or(|t| t.elapsed() >= gap);
        if replicas == 0 && n == 0 && gap_ok {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(180),
            "app not back at zero: {replicas} replicas, {n} pods"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.95), v[v.len() - 1])
}

pub async fn run(
    rounds: usize,
    startup_delay_ms: u64,
    readiness_period_s: i32,
    ns: &str,
) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let nss: Api<Namespace> = Api::all(client.clone());
    if nss.get_opt(ns).await?.is_some() {
        nss.delete(ns, &DeleteParams::default()).await?;
        while nss.get_opt(ns).await?.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    while sas.get_opt("default").await?.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delay = startup_delay_ms.to_string();
    let deploy = with_readiness_period(
        testapp_deployment("web", 0, &["--startup-delay-ms", &delay]),
        readiness_period_s,
    );
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deploy)
        .await?;
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &testapp_service("web"))
        .await?;
    let ssvcs: Api<snooze_crds::ScaledService> = Api::namespaced(client.clone(), ns);
    ssvcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
                "metadata": {"name": "web"},
                "spec": {
                    "scaleTargetRef": {"name": "web"}, "service": "web",
                    "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "2s",
                    "activation": {"timeout": "60s"},
                    "scaling": {"scaleDownDelay": "0s"},
                },
            }))?,
        )
        .await?;
    let start = Instant::now();
    let targets = loop {
        match ingress_targets(&client, ns, "web", "http").await {
            Ok(t) => break t,
            Err(e) if start.elapsed() > Duration::from_secs(60) => anyhow::bail!(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!(
        "coldstart: {rounds} rounds, test app start-up delay {startup_delay_ms} ms, readiness period {readiness_period_s} s, through {targets:?}"
    );

    // The wake signal's arrival is derived: the patch as the watch saw it, less the
    // operator's own wake → patch time (so it includes the watch's delivery).
    const SEGMENTS: [&str; 11] = [
        "request → scale patch seen",
        "  of which request → wake signal at the operator",
        "  of which the operator's wake → patch",
        "scale patch → pod created",
        "pod created → Ready (the kubelet's verdict)",
        "Ready seen → first byte (< 0: before Ready)",
        "total: request → first byte",
        "total − pod created → Ready (Snooze + kube)",
        "the app's own start-up (process → listening)",
        "total − the app's own start-up",
        "listening → first request (activator share)",
    ];
    let mut segs: Vec<Vec<f64>> = vec![Vec::new(); SEGMENTS.len()];
    let mut last: Option<Instant> = None;
    for round in 0..rounds {
        // Wakes within 5 s of the previous one are deduplicated by the operator.
        until_asleep(&client, ns, last, Duration::from_secs(6)).await?;
        let (before_sum, before_n) = wake_to_patch(&client).await?;
        let (seen, tasks) = watch_round(&client, ns).await;
        let target = &targets[round % targets.len()];
        let t0 = Instant::now();
        last = Some(t0);
        let (status, body) = http_get(
            &format!("http://{target}/?round={round}"),
            Duration::from_secs(90),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let first_byte = t0.elapsed();
        anyhow::ensure!(status == 200, "round {round}: {status} {body}");
        // The app's own start-up, as it measured it (one pod: maxReplicas 1).
        // And, as the app saw it, from listening to the first request it was sent (the
        // activator's share of the cold start once the app listens: probe, connect,
        // forward).
        let (startup_ms, share_ms) =
            match http_get(&format!("http://{target}/startup"), Duration::from_secs(5)).await {
                Ok((200, b)) => {
                    let mut f = b.split_whitespace().map(|v| v.parse::<f64>().ok());
                    let us = |v: Option<Option<f64>>| v.flatten().map(|us| us / 1000.0);
                    (us(f.next()), us(f.next()))
                }
                _ => (None, None),
            };
        // The Ready event may trail the answer by the watch's delivery time.
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().ready.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tasks.iter().for_each(|t| t.abort());
        let s = *seen.lock().unwrap();
        let (after_sum, after_n) = wake_to_patch(&client).await?;
        // With the activator's probe the answer may come long before the kubelet's
        // Ready (a 10 s period): Ready is then not waited for.
        let (Some(patch), Some(created)) = (s.patch, s.created) else {
            anyhow::bail!("round {round}: a watch missed an event: {s:?}");
        };
        let since = |t: Instant| t.saturating_duration_since(t0);
        let total = ms(first_byte);
        segs[0].push(ms(since(patch)));
        if after_n == before_n + 1 {
            let wake_to_patch = (after_sum - before_sum) * 1000.0;
            segs[1].push((ms(since(patch)) - wake_to_patch).max(0.0));
            segs[2].push(wake_to_patch);
        }
        segs[3].push(ms(created.saturating_duration_since(patch)));
        if let Some(ready) = s.ready {
            let own = ms(ready.saturating_duration_since(created));
            segs[4].push(own);
            segs[5].push(total - ms(since(ready)));
            segs[7].push(total - own);
        }
        segs[6].push(total);
        if let Some(st) = startup_ms {
            segs[8].push(st);
            segs[9].push(total - st);
        }
        if let Some(share) = share_ms {
            segs[10].push(share);
        }
        eprintln!(
            "round {round}: patch {:.0} ms, created {:.0}, ready {}, first byte {:.0} ms, app start-up {}",
            ms(since(patch)),
            ms(since(created)),
            s.ready
                .map(|r| format!("{:.0}", ms(since(r))))
                .unwrap_or_else(|| "-".into()),
            total,
            startup_ms
                .map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    println!(
        "\n{:<48} {:>9} {:>9} {:>9}   ({rounds} cold starts)",
        "segment (ms)", "p50", "p95", "max"
    );
    for (name, v) in SEGMENTS.iter().zip(segs.iter_mut()) {
        if v.is_empty() {
            println!("{name:<48} {:>9}", "-");
            continue;
        }
        let (p50, p95, max) = stats(v);
        println!("{name:<48} {p50:>9.1} {p95:>9.1} {max:>9.1}");
    }
    nss.delete(ns, &DeleteParams::default()).await?;
    Ok(())
}
