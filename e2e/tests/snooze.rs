//! Snooze end to end on the local cluster: the chart installed with the real helm,
//! ScaledServices applied with kubectl or the API, traffic sent the way an ingress
//! sends it (to the endpoints of the managed Service). Run by ./test.sh.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);

async fn ready_condition(
    ssvcs: &Api<ScaledService>,
    name: &str,
) -> Result<(String, String, String), String> {
    let ss = ssvcs.get(name).await.map_err(|e| e.to_string())?;
    let c = ss
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .ok_or("no Ready condition yet")?;
    Ok((c.status, c.reason, c.message))
}

/// Asserts every 500 ms, until `until` after `since`, that `name` has `want` replicas;
/// `what` names the moment `since` stands for in the failure message.
async fn stays_at(
    deploys: &Api<Deployment>,
    name: &str,
    want: i32,
    since: Instant,
    until: Duration,
    what: &str,
) {
    while since.elapsed() < until {
        assert_eq!(
            deployment_replicas(deploys, name).await.unwrap(),
            want,
            "{name} left {want} replica(s) {:?} after {what}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_no_pods(pods: &Api<Pod>, app: &str) {
    wait_for(&format!("pods of {app} gone"), T, || async {
        let n = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        (n == 0).then_some(()).ok_or(format!("{n} pods"))
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn install_runs_as_own_service_accounts_and_activator_cannot_scale() {
    ensure_snooze().await;
    let client = client().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    for (name, sa) in [
        ("snooze-operator", "snooze-operator"),
        ("snooze-activator", "snooze-activator"),
    ] {
        let d = deploys.get(name).await.unwrap();
        let st = d.status.unwrap();
        assert_eq!(st.ready_replicas, Some(2), "{name}: {st:?}");
        let spec = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some(sa));
        let sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    // The two components' pods (not a `helm test` pod another test may have run).
    let list: Vec<Pod> = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component in (operator,activator)"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(list.len(), 4);
    for p in list {
        let ready = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{} not ready", p.metadata.name.unwrap_or_default());
    }
    let activator = format!("--as=system:serviceaccount:{SNOOZE_NAMESPACE}:snooze-activator");
    // The command as a user types it (kubectl reads `deployments/scale` as the
    // Deployment named "scale"), and the /scale subresource itself.
    let (_, out) = kubectl(&[
        "auth",
        "can-i",
        "patch",
        "deployments/scale",
        "-A",
        &activator,
    ])
    .await;
    assert_eq!(
        out.trim(),
        "no",
        "the activator must not scale workloads: {out}"
    );
    let (_, out) = kubectl(&[
        "auth",
        "can-i",
        "patch",
        "deployments",
        "--subresource=scale",
        "-A",
        &activator,
    ])
    .await;
    assert_eq!(
        out.trim(),
        "no",
        "the activator must not scale workloads: {out}"
    );
    let (_, out) = kubectl(&["auth", "can-i", "patch", "deployments", "-A", &activator]).await;
    assert_eq!(out.trim(), "no");
    let (_, out) = kubectl(&[
        "auth",
        "can-i",
        "watch",
        "endpointslices.discovery.k8s.io",
        "-A",
        &activator,
    ])
    .await;
    assert_eq!(out.trim(), "yes");
    let operator = format!("--as=system:serviceaccount:{SNOOZE_NAMESPACE}:snooze-operator");
    let (_, out) = kubectl(&[
        "auth",
        "can-i",
        "patch",
        "deployments",
        "--subresource=scale",
        "-A",
        &operator,
    ])
    .await;
    assert_eq!(out.trim(), "yes");
    let (_, out) = kubectl(&["auth", "can-i", "delete", "deployments", "-A", &operator]).await;
    assert_eq!(out.trim(), "no", "the operator only touches /scale");
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn kubectl_apply_rejects_invalid_specs_with_readable_messages() {
    ensure_snooze().await;
    in_namespace("invalid", |_client, ns| async move {
        let file = std::env::temp_dir().join(format!("{ns}-bad.yaml"));
        let bad = |spec: &str| {
            format!("apiVersion: snooze.dev/v1alpha1\nkind: ScaledService\nmetadata:\n  name: bad\n  namespace: {ns}\nspec:\n{spec}")
        };
        let cases = [
            (
                "  scaleTargetRef: {name: web}\n  service: web\n  minReplicas: 3\n  maxReplicas: 2\n",
                "minReplicas must be less than or equal to maxReplicas",
            ),
            ("  scaleTargetRef: {name: web}\n  service: web\n  idleTimeout: 5 minutes\n", "idleTimeout"),
            ("  scaleTargetRef: {name: web}\n  service: web\n  idleTimeout: 0s\n", "idleTimeout must be a duration of at least 1s"),
            ("  scaleTargetRef: {name: web}\n", "service: Required value"),
            (
                "  scaleTargetRef: {name: web}\n  service: web\n  schedules: [{cron: every day, duration: 1h, minReplicas: 1}]\n",
                "cron must have five fields",
            ),
            (
                "  scaleTargetRef: {name: web}\n  service: web\n  activation: {waitingPage: {after: 2m}}\n",
                "activation.waitingPage.after must be between 0s and 1m",
            ),
        ];
        for (spec, want) in cases {
            std::fs::write(&file, bad(spec)).unwrap();
            let (ok, out) = kubectl(&["apply", "-f", file.to_str().unwrap()]).await;
            assert!(!ok, "accepted: {spec}");
            assert!(out.contains(want), "message for {spec:?} lacks {want:?}: {out}");
        }
        // An invalid duration gets one readable message (the pattern's), not a second
        // "type conversion error" from the CEL rule.
        for spec in [
            "  scaleTargetRef: {name: web}\n  service: web\n  idleTimeout: abc\n",
            "  scaleTargetRef: {name: web}\n  service: web\n  activation: {timeout: soon}\n",
            "  scaleTargetRef: {name: web}\n  service: web\n  scaling: {stableWindow: long}\n",
        ] {
            std::fs::write(&file, bad(spec)).unwrap();
            let (ok, out) = kubectl(&["apply", "-f", file.to_str().unwrap()]).await;
            assert!(!ok, "accepted: {spec}");
            assert!(out.contains("should match"), "no pattern message for {spec:?}: {out}");
            assert!(!out.contains("conversion"), "a second, confusing message for {spec:?}: {out}");
        }
        let _ = std::fs::remove_file(&file);
    })
    .await;
}

/// `activation.waitingPage` end to end: a browser (headless Chromium) loading a sleeping
/// service through its managed Service's ClusterIP is shown the waiting page after
/// `after`, and the page's own reloads land it on the app once the woken pod answers; a
/// plain GET sent meanwhile is held and answered by the app.
#[tokio::test]
#[ignore = "needs the local cluster and snooze-browser-python: run ./test.sh"]
async fn a_browser_is_shown_the_waiting_page_while_the_app_wakes_and_lands_on_it() {
    ensure_snooze().await;
    in_namespace("page", |client, ns| async move {
        // A start-up slow enough for the page to show (the activator's probe releases
        // the held requests as soon as the pod answers).
        app(&client, &ns, "web", 1, &["--startup-delay-ms", "4000"]).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut ss = scaled_service("web", 0, 1, "3s");
        ss.spec.activation.waiting_page = Some(snooze_crds::WaitingPage {
            after: Duration::from_secs(1).into(),
            title: "Waking web".into(),
            message: "One moment".into(),
        });
        ssvcs.create(&PostParams::default(), &ss).await.unwrap();
        wait_for("Ready=True", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web").await?;
            (s == "True").then_some(()).ok_or(format!("{s} {r} {m}"))
        })
        .await;
        wait_replicas(&deploys, "web", 0, T).await;
        wait_no_pods(&pods, "web").await;
        let ip = forwarded_cluster_ip(&client, &ns, "web-snooze", 80).await;
        let url = format!("http://{ip}/");

        let mut browser = Browser::open(&url, "waiting-page-cluster");
        let page = browser
            .said("PAGE 503 'Waking web'", Duration::from_secs(60))
            .await;
        // A plain client is held, not shown the page.
        let u = url.clone();
        let plain = tokio::spawn(async move { http_get(&u, Duration::from_secs(60)).await });
        browser
            .said("APP hello from web-", Duration::from_secs(60))
            .await;
        browser.finish().await;
        let (status, body) = plain.await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("hello from web-"), "{body}");
        eprintln!("{page}; the plain GET got {status}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn sleeps_when_idle_and_wakes_on_the_first_request() {
    ensure_snooze().await;
    in_namespace("wake", |client, ns| async move {
        app(&client, &ns, "web", 1, &["--startup-delay-ms", "300"]).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        ssvcs.create(&PostParams::default(), &scaled_service("web", 0, 3, "3s")).await.unwrap();

        // Programmed: Ready, the managed Service with the backend's port, status ports.
        wait_for("Ready=True", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web").await?;
            (s == "True").then_some(()).ok_or(format!("{s} {r} {m}"))
        })
        .await;
        let svc: Api<Service> = Api::namespaced(client.clone(), &ns);
        let managed = svc.get("web-snooze").await.unwrap();
        let spec = managed.spec.unwrap();
        assert!(spec.selector.is_none());
        assert_eq!(spec.ports.unwrap()[0].port, 80);
        let st = ssvcs.get("web").await.unwrap().status.unwrap();
        assert_eq!(st.service_name.as_deref(), Some("web-snooze"));
        assert_eq!(st.original_replicas, Some(1));
        assert!(st.ports[0].activator_port >= 20000);

        // Idle: scaled to zero, the processes stop, the pods disappear.
        wait_replicas(&deploys, "web", 0, T).await;
        wait_no_pods(&pods, "web").await;
        wait_for("Active=False ScaledToZero", T, || async {
            let ss = ssvcs.get("web").await.map_err(|e| e.to_string())?;
            let c = ss.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Active")).ok_or("none")?;
            (c.status == "False" && c.reason == "ScaledToZero").then_some(()).ok_or(format!("{} {}", c.status, c.reason))
        })
        .await;

        // Watch the Deployment and the pods to time the wake.
        let t0 = Instant::now();
        let patch_seen = Arc::new(AtomicU64::new(0));
        let ready_seen = Arc::new(AtomicU64::new(0));
        {
            let (deploys, patch_seen) = (deploys.clone(), patch_seen.clone());
            tokio::spawn(async move {
                let mut s = std::pin::pin!(watcher::watcher(deploys, watcher::Config::default().fields("metadata.name=web")));
                while let Some(Ok(ev)) = s.next().await {
                    if let watcher::Event::Apply(d) = ev
                        && d.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
                            patch_seen.store(t0.elapsed().as_millis() as u64, Ordering::SeqCst);
                            return;
                        }
                }
            });
        }
        {
            let (pods, ready_seen) = (pods.clone(), ready_seen.clone());
            tokio::spawn(async move {
                let mut s = std::pin::pin!(watcher::watcher(pods, watcher::Config::default().labels("app=web")));
                while let Some(Ok(ev)) = s.next().await {
                    if let watcher::Event::Apply(p) = ev {
                        let ready = p.status.and_then(|s| s.conditions).unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
                        if ready {
                            ready_seen.store(t0.elapsed().as_millis() as u64, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let targets = listening_targets(&client, &ns, "web", "http").await.unwrap();
        let t_req = t0.elapsed();
        let (status, body) = http_get(&format!("http://{}/", targets[0]), Duration::from_secs(60)).await.unwrap();
        let t_byte = t0.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("hello from web-"), "{body}");

        let events = kubectl(&["get", "events", "-n", &ns, "-o", "jsonpath={range .items[*]}{.reason}|{.message}{\"\\n\"}{end}"]).await.1;
        let wake_to_patch = events
            .lines()
            .filter(|l| l.starts_with("Woken|"))
            .find_map(|l| l.split("wake signal received ").nth(1)?.split("ms").next()?.parse::<u64>().ok());
        let patch = patch_seen.load(Ordering::SeqCst);
        // The activator's own probe may release the request before the kubelet marks
        // the pod Ready: wait for that too (bounded).
        let until = Instant::now() + Duration::from_secs(10);
        while ready_seen.load(Ordering::SeqCst) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ready = ready_seen.load(Ordering::SeqCst);
        eprintln!(
            "cold start (ms since the request): scale patch seen {} (the operator's wake signal → patch: {}), pod Ready seen {}, first byte {}; total {} ms",
            patch.saturating_sub(t_req.as_millis() as u64),
            wake_to_patch.map(|w| w.to_string()).unwrap_or_else(|| "?".into()),
            ready.saturating_sub(t_req.as_millis() as u64),
            (t_byte - t_req).as_millis(),
            (t_byte - t_req).as_millis()
        );
        assert!(patch > 0 && ready >= patch, "patch {patch} ready {ready}");
        assert!(wake_to_patch.is_some(), "no Woken event with the wake timing: {events}");
        let (s, ..) = ready_condition(&ssvcs, "web").await.unwrap();
        assert_eq!(s, "True");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn two_hundred_concurrent_requests_while_cold_all_succeed() {
    ensure_snooze().await;
    in_namespace("burst", |client, ns| async move {
        scaled_app(&client, &ns, 0, 0, 3, "30s", &["--startup-delay-ms", "500"]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 0);
        let mut reqs = Vec::new();
        for i in 0..200 {
            let url = format!("http://{}/?i={i}", targets[i % targets.len()]);
            reqs.push(tokio::spawn(async move {
                http_get(&url, Duration::from_secs(60)).await
            }));
        }
        let mut ok = 0;
        let mut failures = Vec::new();
        for r in reqs {
            match r.await.unwrap() {
                Ok((200, _)) => ok += 1,
                other => failures.push(format!("{other:?}")),
            }
        }
        assert_eq!(
            ok,
            200,
            "failures: {:?}",
            &failures[..failures.len().min(3)]
        );
    })
    .await;
}

/// Sends a GET every `every` for `dur`, round robin over `targets`; (ok, failures).
async fn steady_load(targets: Vec<String>, dur: Duration, every: Duration) -> (u64, Vec<String>) {
    let start = Instant::now();
    let mut handles = Vec::new();
    let mut i = 0usize;
    while start.elapsed() < dur {
        let url = format!("http://{}/", targets[i % targets.len()]);
        i += 1;
        handles.push(tokio::spawn(async move {
            http_get(&url, Duration::from_secs(60)).await
        }));
        tokio::time::sleep(every).await;
    }
    let mut ok = 0;
    let mut failed = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
    }
    (ok, failed)
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn steady_load_through_zero_one_zero_one_loses_nothing() {
    ensure_snooze().await;
    in_namespace("steady", |client, ns| async move {
        scaled_app(&client, &ns, 0, 0, 3, "3s", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;

        // Watch the replicas while the load runs: once up, never back to zero.
        let watch = ReplicaWatch::start(&deploys, "web");
        // 0 → 1 under load, held for well over idleTimeout.
        let (ok, failed) = steady_load(
            targets.clone(),
            Duration::from_secs(8),
            Duration::from_millis(100),
        )
        .await;
        let (went_up, dropped_to_zero) = watch.finish().await;
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(ok >= 60, "{ok}");
        assert!(went_up);
        assert!(!dropped_to_zero, "scaled to zero under load");

        // Load stops: 1 → 0.
        wait_replicas(&deploys, "web", 0, Duration::from_secs(60)).await;
        // 0 → 1 again, nothing lost.
        let (ok, failed) =
            steady_load(targets, Duration::from_secs(3), Duration::from_millis(100)).await;
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(ok >= 20);
        assert!(deployment_replicas(&deploys, "web").await.unwrap() >= 1);
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn kubectl_shows_state_columns_conditions_and_events() {
    ensure_snooze().await;
    in_namespace("columns", |client, ns| async move {
        scaled_app(&client, &ns, 1, 0, 2, "1h", &[]).await;
        wait_for("Active=True", T, || async {
            let (ok, out) = kubectl(&["get", "scaledservices", "-n", &ns]).await;
            let line = out.lines().nth(1).unwrap_or_default().to_string();
            (ok && line.split_whitespace().collect::<Vec<_>>().get(4..7)
                == Some(&["1", "True", "True"][..]))
            .then_some(out.clone())
            .ok_or(out)
        })
        .await;
        let (_, out) = kubectl(&["get", "ssvc", "-n", &ns]).await;
        let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME", "TARGET", "MIN", "MAX", "REPLICAS", "READY", "ACTIVE", "LAST", "REQUEST",
                "NEEDED", "BY", "SLEEPS", "AT", "AGE"
            ],
            "{out}"
        );
        let (_, out) = kubectl(&["describe", "scaledservice", "web", "-n", &ns]).await;
        assert!(
            out.contains("Conditions:")
                && out.contains("Programmed")
                && out.contains("ReplicasReady"),
            "{out}"
        );
        assert!(
            out.contains("Events:") && out.contains("Programmed"),
            "{out}"
        );
        let (_, out) = kubectl(&["explain", "scaledservice.spec.idleTimeout"]).await;
        assert!(out.contains("How long without any request"), "{out}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn missing_target_reports_target_not_found_and_heals() {
    ensure_snooze().await;
    in_namespace("heal", |client, ns| async move {
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        ssvcs
            .create(&PostParams::default(), &scaled_service("web", 0, 2, "1h"))
            .await
            .unwrap();
        wait_for("ServiceNotFound", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web").await?;
            (s == "False" && r == "ServiceNotFound")
                .then_some(())
                .ok_or(format!("{s} {r} {m}"))
        })
        .await;
        services
            .create(&PostParams::default(), &testapp_service("web"))
            .await
            .unwrap();
        let msg = wait_for("TargetNotFound", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web").await?;
            if s == "False" && r == "TargetNotFound" {
                Ok(m)
            } else {
                Err(format!("{s} {r} {m}"))
            }
        })
        .await;
        assert!(msg.contains("Deployment web not found"), "{msg}");
        let (_, out) = kubectl(&[
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "reason=TargetNotFound",
        ])
        .await;
        assert!(out.contains("TargetNotFound"), "no event: {out}");
        deploys
            .create(&PostParams::default(), &testapp_deployment("web", 1, &[]))
            .await
            .unwrap();
        wait_for("Ready=True after the Deployment appears", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web").await?;
            (s == "True").then_some(()).ok_or(format!("{s} {r} {m}"))
        })
        .await;

        // A second ScaledService for the same Deployment is refused with Conflict.
        let mut other = scaled_service("web-again", 0, 2, "1h");
        other.spec.scale_target_ref.name = "web".into();
        other.spec.service = "web".into();
        ssvcs.create(&PostParams::default(), &other).await.unwrap();
        wait_for("Conflict", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web-again").await?;
            (s == "False" && r == "Conflict" && m.contains("ScaledService web"))
                .then_some(())
                .ok_or(format!("{s} {r} {m}"))
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn deleting_restores_replicas_and_removes_the_managed_service() {
    ensure_snooze().await;
    in_namespace("restore", |client, ns| async move {
        let ssvcs = scaled_app(&client, &ns, 2, 0, 3, "2s", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        wait_replicas(&deploys, "web", 0, T).await;
        assert_eq!(
            ssvcs
                .get("web")
                .await
                .unwrap()
                .status
                .unwrap()
                .original_replicas,
            Some(2)
        );
        assert!(services.get_opt("web-snooze").await.unwrap().is_some());
        ssvcs.delete("web", &DeleteParams::default()).await.unwrap();
        wait_scaled_service_gone(&ssvcs, "web", T).await;
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 2);
        assert!(services.get_opt("web-snooze").await.unwrap().is_none());
        assert!(slices.get_opt("web-snooze").await.unwrap().is_none());
        wait_for("deployment available again", T, || async {
            let d = deploys.get("web").await.map_err(|e| e.to_string())?;
            let a = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
            (a == 2).then_some(()).ok_or(format!("available {a}"))
        })
        .await;
    })
    .await;
}

/// `clients` closed-loop clients for `dur`, round robin over `targets`; (ok, failed).
/// Failures are printed (the first few) and paced, so a broken path does not spin.
async fn closed_loop(targets: Vec<String>, clients: usize, dur: Duration) -> (u64, u64) {
    let until = Instant::now() + dur;
    let mut handles = Vec::new();
    for c in 0..clients {
        let url = format!("http://{}/", targets[c % targets.len()]);
        handles.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < until {
                match http_get(&url, Duration::from_secs(60)).await {
                    Ok((200, _)) => ok += 1,
                    other => {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("closed loop: {other:?}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let mut total = (0, 0);
    for h in handles {
        let (o, f) = h.await.unwrap();
        total = (total.0 + o, total.1 + f);
    }
    total
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn follows_a_load_ramp_then_steps_down_and_sleeps() {
    ensure_snooze().await;
    in_namespace("ramp", |client, ns| async move {
        // Every request takes 100 ms; target 2 in flight per replica.
        app(&client, &ns, "web", 1, &["--delay-ms", "100"]).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let ss: ScaledService = serde_json::from_value(serde_json::json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web"},
            "spec": {
                "scaleTargetRef": {"name": "web"}, "service": "web",
                "minReplicas": 0, "maxReplicas": 6, "idleTimeout": "6s",
                "scaling": {"metric": "concurrency", "target": 2, "stableWindow": "6s", "panicWindow": "2s",
                            "scaleDownDelay": "0s", "maxScaleDownStep": 1},
            },
        }))
        .unwrap();
        ssvcs.create(&PostParams::default(), &ss).await.unwrap();
        let targets = wait_for("managed endpoints", T, || listening_targets(&client, &ns, "web", "http")).await;

        // 8 clients in a closed loop ≈ 8 in flight → about 4 replicas.
        let peak = Arc::new(AtomicU64::new(0));
        let load = tokio::spawn(closed_loop(targets.clone(), 8, Duration::from_secs(20)));
        let start = Instant::now();
        while !load.is_finished() {
            let r = deployment_replicas(&deploys, "web").await.unwrap_or(0) as u64;
            peak.fetch_max(r, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (ok, failed) = load.await.unwrap();
        let peak = peak.load(Ordering::SeqCst);
        eprintln!("ramp: {ok} requests in {:?}, {failed} failed, peak {peak} replicas", start.elapsed());
        assert_eq!(failed, 0);
        assert!((3..=5).contains(&peak), "8 in flight with target 2 should give about 4 replicas, got {peak}");

        // Load stops: down one replica at a time, then to zero after idleTimeout.
        let mut seen = vec![deployment_replicas(&deploys, "web").await.unwrap()];
        let until = Instant::now() + Duration::from_secs(60);
        while *seen.last().unwrap() > 0 {
            assert!(Instant::now() < until, "did not reach zero: {seen:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = deployment_replicas(&deploys, "web").await.unwrap();
            if r != *seen.last().unwrap() {
                seen.push(r);
            }
        }
        eprintln!("ramp down: {seen:?}");
        for w in seen.windows(2) {
            assert!(w[1] < w[0], "went back up: {seen:?}");
            assert_eq!(w[0] - w[1], 1, "removed more than one at a time: {seen:?}");
        }
        // The status follows the scale (written by the reconcile the scale triggers).
        wait_for("lastScaleReason Idle", T, || async {
            let st = ssvcs.get("web").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            (st.last_scale_reason.as_deref() == Some("Idle") && st.replicas == Some(0))
                .then_some(())
                .ok_or(format!("{:?} {:?}", st.last_scale_reason, st.replicas))
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_schedule_window_holds_its_floor() {
    ensure_snooze().await;
    in_namespace("sched", |client, ns| async move {
        app(&client, &ns, "web", 0, &[]).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        // A window that started this minute and lasts two: always active in this test.
        let mut ss = scaled_service("web", 0, 4, "2s");
        ss.spec.schedules = serde_json::from_value(serde_json::json!([
            {"cron": "* * * * *", "timeZone": "Europe/Paris", "duration": "2m", "minReplicas": 2}
        ]))
        .unwrap();
        ssvcs.create(&PostParams::default(), &ss).await.unwrap();
        wait_replicas(&deploys, "web", 2, T).await;
        // Held well past idleTimeout with no traffic at all.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 2);
        }
        // Without the window it sleeps.
        let patch = serde_json::json!({"spec": {"schedules": []}});
        ssvcs
            .patch(
                "web",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
        wait_replicas(&deploys, "web", 0, T).await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn managed_slice_lists_an_activator_only_once_it_listens() {
    ensure_snooze().await;
    in_namespace("listen", |client, ns| async move {
        // Watch the managed EndpointSlices the way an ingress controller does and
        // connect to every listed endpoint the moment it appears.
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        let cfg = watcher::Config::default()
            .labels("endpointslice.kubernetes.io/managed-by=operator.snooze.dev");
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<(String, Result<(), String>)>(256);
        let watch = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher::watcher(slices, cfg));
            let mut checked = std::collections::HashSet::new();
            while let Some(Ok(ev)) = s.next().await {
                let watcher::Event::Apply(slice) = ev else { continue };
                let Some(port) = slice.ports.iter().flatten().find_map(|p| p.port) else { continue };
                for e in &slice.endpoints {
                    for a in &e.addresses {
                        let t = format!("{a}:{port}");
                        if !checked.insert(t.clone()) {
                            continue;
                        }
                        let r = accepts(&t).await;
                        if seen_tx.send((t, r)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        // A few ScaledServices in quick succession (one app each, kept at zero).
        let n = 6;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        for i in 0..n {
            let name = format!("web{i}");
            app(&client, &ns, &name, 0, &[]).await;
            ssvcs.create(&PostParams::default(), &scaled_service(&name, 0, 1, "5m")).await.unwrap();
        }
        let activators = ready_pods(
            &Api::namespaced(client.clone(), "snooze-system"),
            "app.kubernetes.io/component=activator",
        )
        .await
        .unwrap()
        .len();
        let want = n * activators;
        let mut results = Vec::new();
        let deadline = Instant::now() + T;
        while results.len() < want {
            match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
                Ok(Some(r)) => results.push(r),
                _ => panic!("only {} of {want} endpoints were listed: {results:?}", results.len()),
            }
        }
        watch.abort();
        let refused: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
        eprintln!("{} endpoints listed, each connected to at once after its slice event; refused: {refused:?}", results.len());
        assert!(refused.is_empty(), "listed before listening: {refused:?}");
        // The status follows the slice in the same reconcile.
        for i in 0..n {
            let name = format!("web{i}");
            wait_for(&format!("{name} Ready"), T, || async {
                let (s, reason, msg) = ready_condition(&ssvcs, &name).await?;
                (s == "True" && reason == "Programmed").then_some(()).ok_or(format!("{s} {reason}: {msg}"))
            })
            .await;
        }
    })
    .await;
}

/// The test app `web` with a 10 s readiness period (the Kubernetes default), at 0
/// replicas, with its ScaledService; returns the managed endpoints once the activator
/// probe is in the status.
async fn default_period_app(client: &kube::Client, ns: &str, args: &[&str]) -> Vec<String> {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    deploys
        .create(
            &pp,
            &with_readiness_period(testapp_deployment("web", 0, args), 10),
        )
        .await
        .unwrap();
    services.create(&pp, &testapp_service("web")).await.unwrap();
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), ns);
    ssvcs
        .create(&pp, &scaled_service("web", 0, 1, "1h"))
        .await
        .unwrap();
    wait_for("the activation probe in the status", T, || async {
        let st = ssvcs
            .get("web")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        let p = st
            .activation_probe
            .ok_or(format!("none: {:?}", st.activation_probe_source))?;
        let h = p.http_get.ok_or("not an httpGet probe")?;
        (h.path == "/ready" && h.port == 8080)
            .then_some(())
            .ok_or(format!("{h:?} from {:?}", st.activation_probe_source))
    })
    .await;
    wait_for("managed endpoints", T, || {
        listening_targets(client, ns, "web", "http")
    })
    .await
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn cold_start_does_not_wait_for_a_10s_readiness_period() {
    ensure_snooze().await;
    in_namespace("probe-fast", |client, ns| async move {
        let targets = default_period_app(&client, &ns, &["--startup-delay-ms", "300"]).await;
        let t0 = Instant::now();
        let r = http_get(&format!("http://{}/", targets[0]), Duration::from_secs(30)).await;
        let took = t0.elapsed();
        eprintln!(
            "cold request with a 10 s readiness period: {:?} after {took:?}",
            r.as_ref().map(|(c, _)| *c)
        );
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        assert!(
            took < Duration::from_secs(2),
            "took {took:?}: waited for the kubelet's period"
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_pod_failing_its_readiness_path_gets_no_request_before_it_passes() {
    ensure_snooze().await;
    in_namespace("probe-wait", |client, ns| async move {
        // Listens at once; /ready answers 503 for its first 3 s.
        let targets = default_period_app(&client, &ns, &["--ready-delay-ms", "3000"]).await;
        let t0 = Instant::now();
        let r = http_get(&format!("http://{}/", targets[0]), Duration::from_secs(30)).await;
        let took = t0.elapsed();
        eprintln!(
            "cold request, /ready 503 for 3 s, 10 s period: {:?} after {took:?}",
            r.as_ref().map(|(c, _)| *c)
        );
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        // Not before /ready passed (the app answers / from its first millisecond), and
        // not after the kubelet's next probe either.
        assert!(
            took >= Duration::from_secs(3),
            "sent before /ready passed: {took:?}"
        );
        assert!(
            took < Duration::from_secs(8),
            "waited for the kubelet: {took:?}"
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn junk_is_answered_at_once_and_never_wakes_a_sleeping_service() {
    ensure_snooze().await;
    in_namespace("junk", |client, ns| async move {
        scaled_app(&client, &ns, 0, 0, 1, "1h", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        for (what, bytes) in junk() {
            for t in &targets {
                let t0 = Instant::now();
                let mut s = tokio::net::TcpStream::connect(t.as_str()).await.unwrap();
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(&bytes).await;
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
                let took = t0.elapsed();
                let text = String::from_utf8_lossy(&out);
                let status = text.split(' ').nth(1).unwrap_or("closed").to_string();
                eprintln!("{what} → {t}: {status} after {took:?}");
                assert!(
                    matches!(status.as_str(), "400" | "431" | "closed"),
                    "{what}: {text}"
                );
                assert!(took < Duration::from_millis(100), "{what}: {took:?}");
            }
        }
        // Nothing woke it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 0);
    })
    .await;
}

// ---- scaling rules users can predict (issue 16) ----------------------------------------

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn woken_by_one_request_it_stays_up_its_idle_timeout_after_the_answer() {
    ensure_snooze().await;
    in_namespace("idle-wake", |client, ns| async move {
        let ssvcs = scaled_app(&client, &ns, 0, 0, 1, "10s", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let r = http_get(&format!("http://{}/", targets[0]), Duration::from_secs(30)).await;
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        let answered = Instant::now();
        // LAST REQUEST is shown within 2 s.
        wait_for("status.lastRequestTime", Duration::from_secs(2), || async {
            let st = ssvcs
                .get("web")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            st.last_request_time.map(|_| ()).ok_or("blank".to_string())
        })
        .await;
        eprintln!(
            "lastRequestTime shown {:?} after the answer",
            answered.elapsed()
        );
        // Still up 9 s after, at zero by 12 s.
        tokio::time::sleep(Duration::from_secs(9).saturating_sub(answered.elapsed())).await;
        assert_eq!(
            deployment_replicas(&deploys, "web").await.unwrap(),
            1,
            "asleep before its idle timeout"
        );
        wait_replicas(
            &deploys,
            "web",
            0,
            Duration::from_secs(12).saturating_sub(answered.elapsed()),
        )
        .await;
        eprintln!("asleep {:?} after the answer", answered.elapsed());
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn idle_time_runs_from_the_end_of_a_long_request() {
    ensure_snooze().await;
    in_namespace("idle-stream", |client, ns| async move {
        scaled_app(&client, &ns, 1, 0, 1, "10s", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        // A 40 s stream (40 chunks, 1 s apart).
        let url = format!("http://{}/stream?chunks=40&interval_ms=1000", targets[0]);
        let stream = tokio::spawn(async move { http_get(&url, Duration::from_secs(60)).await });
        let t0 = Instant::now();
        stays_at(
            &deploys,
            "web",
            1,
            t0,
            Duration::from_secs(38),
            "the stream's start",
        )
        .await;
        assert_eq!(stream.await.unwrap().map(|(c, _)| c), Ok(200));
        let ended = Instant::now();
        // Up for the idle timeout after its end (with a margin for the 1 s tick).
        stays_at(
            &deploys,
            "web",
            1,
            ended,
            Duration::from_secs(9),
            "the stream's end",
        )
        .await;
        wait_replicas(&deploys, "web", 0, Duration::from_secs(10)).await;
        eprintln!("asleep {:?} after the stream ended", ended.elapsed());
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn deleting_gives_back_zero_or_three_and_a_hand_over_starts_nothing() {
    ensure_snooze().await;
    in_namespace("restore-rules", |client, ns| async move {
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        let gone = |name: &'static str| {
            let ssvcs = ssvcs.clone();
            async move { wait_scaled_service_gone(&ssvcs, name, T).await }
        };
        // A Deployment created with `created` replicas, taken over until Snooze has set
        // `set`, then its ScaledService deleted: the replicas given back.
        let take_over_and_delete =
            |name: &'static str, created: i32, min: i32, idle: &'static str, set: i32| {
                let (client, ns, ssvcs, deploys, gone) = (
                    client.clone(),
                    ns.clone(),
                    ssvcs.clone(),
                    deploys.clone(),
                    gone,
                );
                async move {
                    app(&client, &ns, name, created, &[]).await;
                    ssvcs
                        .create(&PostParams::default(), &scaled_service(name, min, 3, idle))
                        .await
                        .unwrap();
                    wait_replicas(&deploys, name, set, T).await;
                    ssvcs.delete(name, &DeleteParams::default()).await.unwrap();
                    gone(name).await;
                    deployment_replicas(&deploys, name).await.unwrap()
                }
            };
        // Created at 0 (minReplicas 1 scales it up): deleting gives back 0.
        assert_eq!(take_over_and_delete("zero", 0, 1, "1h", 1).await, 0);
        // Created at 3 (idle → 0): deleting gives back 3.
        assert_eq!(take_over_and_delete("three", 3, 0, "2s", 0).await, 3);
        // Two ScaledServices on one sleeping Deployment: deleting the owner hands it over
        // as it is; no pod starts.
        app(&client, &ns, "web", 1, &[]).await;
        ssvcs
            .create(&pp, &scaled_service("web", 0, 1, "2s"))
            .await
            .unwrap();
        wait_replicas(&deploys, "web", 0, T).await;
        let mut second = scaled_service("web", 0, 1, "1h");
        second.metadata.name = Some("web-2".into());
        ssvcs.create(&pp, &second).await.unwrap();
        wait_for("the second one reports the conflict", T, || async {
            let (s, r, m) = ready_condition(&ssvcs, "web-2").await?;
            (r == "Conflict")
                .then_some(())
                .ok_or(format!("{s} {r} {m}"))
        })
        .await;
        wait_no_pods(&pods, "web").await;
        ssvcs.delete("web", &DeleteParams::default()).await.unwrap();
        gone("web").await;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            assert_eq!(
                deployment_replicas(&deploys, "web").await.unwrap(),
                0,
                "a pod was started in the hand-over"
            );
            let n = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items
                .len();
            assert_eq!(n, 0, "a pod was started in the hand-over");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn the_queue_bound_holds_per_service_across_activators() {
    ensure_snooze().await;
    in_namespace("queue-bound", |client, ns| async move {
        app(&client, &ns, "web", 0, &["--startup-delay-ms", "8000"]).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        let mut ss = serde_json::to_value(scaled_service("web", 0, 1, "1h")).unwrap();
        ss["spec"]["activation"] = serde_json::json!({"timeout": "20s", "maxQueuedRequests": 100});
        ssvcs.create(&PostParams::default(), &serde_json::from_value(ss).unwrap()).await.unwrap();
        let targets = wait_for("two activators listed", T, || async {
            let t = listening_targets(&client, &ns, "web", "http").await?;
            let st = ssvcs.get("web").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
            (t.len() == 2 && st.max_queued_per_activator == Some(50)).then_some(t.clone()).ok_or(format!("{t:?} share {:?}", st.max_queued_per_activator))
        })
        .await;
        // 300 first requests spread over both activators while the app takes 8 s to start.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300 {
            let url = format!("http://{}/?i={i}", targets[i % targets.len()]);
            tasks.spawn(async move { http_get(&url, Duration::from_secs(30)).await.map(|(c, _)| c) });
        }
        let (mut ok, mut refused, mut other) = (0, 0, 0);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(200) => ok += 1,
                Ok(503) => refused += 1,
                _ => other += 1,
            }
        }
        eprintln!("300 cold requests, maxQueuedRequests 100 over 2 activators: {ok} held and answered, {refused} refused with 503, {other} other");
        assert!(ok <= 100, "{ok} held");
        assert_eq!(ok + refused, 300, "{other} neither held nor refused");
    })
    .await;
}

/// `web` (created at 0) with a ScaledService whose `activation` is `activation`
/// (merged over the defaults of [`scaled_service`]).
async fn scaled_app_with(
    client: &kube::Client,
    ns: &str,
    idle: &str,
    app_args: &[&str],
    activation: serde_json::Value,
) -> Api<ScaledService> {
    app(client, ns, "web", 0, app_args).await;
    let mut ss = serde_json::to_value(scaled_service("web", 0, 1, idle)).unwrap();
    for (k, v) in activation.as_object().unwrap() {
        ss["spec"]["activation"][k] = v.clone();
    }
    let ss: ScaledService = serde_json::from_value(ss).unwrap();
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), ns);
    ssvcs.create(&PostParams::default(), &ss).await.unwrap();
    ssvcs
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn health_checks_are_answered_asleep_and_never_keep_it_awake() {
    ensure_snooze().await;
    in_namespace("health", |client, ns| async move {
        scaled_app_with(
            &client,
            &ns,
            "10s",
            &[],
            serde_json::json!({"answerWhileAsleep": [{"path": "/healthz", "body": "asleep\n"}]}),
        )
        .await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        // Asleep: 60 checks, over every activator, answered by the activator; nothing wakes.
        for i in 0..60 {
            let t = &targets[i % targets.len()];
            let r = http_get(
                &format!("http://{t}/healthz?probe={i}"),
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(
                r,
                Ok((200, "asleep\n".to_string())),
                "check {i} while asleep"
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            deployment_replicas(&deploys, "web").await.unwrap(),
            0,
            "a health check woke it"
        );
        // Awake: one real request, then 60 checks in 30 s; it still goes to sleep its
        // idle timeout after the request, and every check is answered.
        let r = http_get(&format!("http://{}/", targets[0]), Duration::from_secs(30)).await;
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        let answered = Instant::now();
        let checks = {
            let targets = targets.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in 0..60 {
                    let t = &targets[i % targets.len()];
                    match http_get(&format!("http://{t}/healthz"), Duration::from_secs(5)).await {
                        Ok((200, _)) => {}
                        other => failed.push(format!("check {i}: {other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                failed
            })
        };
        wait_replicas(&deploys, "web", 0, Duration::from_secs(25)).await;
        let asleep_after = answered.elapsed();
        eprintln!("asleep {asleep_after:?} after the last real request, checks still running");
        assert!(!checks.is_finished(), "the checks ended before it slept");
        let failed = checks.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_wake_that_times_out_leaves_a_warning_and_the_pods_reason() {
    ensure_snooze().await;
    in_namespace("wake-fails", |client, ns| async move {
        // Never ready: its readiness path fails for an hour.
        let ssvcs = scaled_app_with(
            &client,
            &ns,
            "10s",
            &["--ready-delay-ms", "3600000"],
            serde_json::json!({"timeout": "5s"}),
        )
        .await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let held: Vec<_> = (0..3)
            .map(|i| {
                let url = format!("http://{}/", targets[i % targets.len()]);
                tokio::spawn(async move { http_get(&url, Duration::from_secs(30)).await })
            })
            .collect();
        for h in held {
            assert_eq!(h.await.unwrap().map(|(c, _)| c), Ok(504));
        }
        let gave_up = Instant::now();
        let condition = || async {
            let ss = ssvcs.get("web").await.map_err(|e| e.to_string())?;
            ss.status
                .and_then(|s| {
                    s.conditions
                        .into_iter()
                        .find(|c| c.type_ == "WakeSucceeded")
                })
                .filter(|c| c.status == "False")
                .ok_or("no WakeSucceeded=False yet".to_string())
        };
        let c = wait_for("WakeSucceeded=False", Duration::from_secs(10), condition).await;
        eprintln!(
            "{:?} after the 504s: {} {}",
            gave_up.elapsed(),
            c.reason,
            c.message
        );
        assert_eq!(c.reason, "NotReady", "{}", c.message);
        assert!(c.message.contains("got 504"), "{}", c.message);
        let describe = || async {
            let (ok, out) = kubectl(&["describe", "ssvc", "web", "-n", &ns]).await;
            assert!(ok, "{out}");
            out
        };
        let out = describe().await;
        for want in ["WakeSucceeded", "NotReady", "Warning", "ActivationTimeout"] {
            assert!(out.contains(want), "kubectl describe lacks {want}:\n{out}");
        }
        // Still told after the workload went back to sleep.
        wait_replicas(&deploys, "web", 0, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = condition()
            .await
            .expect("the condition is kept while asleep");
        assert_eq!(c.reason, "NotReady");
        let out = describe().await;
        for want in ["WakeSucceeded", "NotReady", "ActivationTimeout"] {
            assert!(
                out.contains(want),
                "asleep, kubectl describe lacks {want}:\n{out}"
            );
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_wake_alone_restarts_the_idle_clock() {
    ensure_snooze().await;
    in_namespace("wake-clock", |client, ns| async move {
        // Slow to start, so that the client below is gone before a pod could answer.
        scaled_app(
            &client,
            &ns,
            0,
            0,
            1,
            "10s",
            &["--startup-delay-ms", "3000"],
        )
        .await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let targets = wait_for("managed endpoints", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        // Past the idle timeout of the take-over, so only the wake can hold it up.
        tokio::time::sleep(Duration::from_secs(11)).await;
        // A client that sends a request and gives up at once: the wake is the only
        // activity (no request is ever answered).
        {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(targets[0].as_str())
                .await
                .unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let woken = Instant::now();
        wait_replicas(&deploys, "web", 1, Duration::from_secs(5)).await;
        stays_at(
            &deploys,
            "web",
            1,
            woken,
            Duration::from_secs(8),
            "a wake (idleTimeout 10s)",
        )
        .await;
        wait_replicas(&deploys, "web", 0, Duration::from_secs(8)).await;
        eprintln!("asleep {:?} after the wake", woken.elapsed());
    })
    .await;
}

/// The README's quickstart, run as far as it can run without Docker: the image names
/// and tags it builds are the chart's, the Dockerfile takes the `COMPONENT` it passes,
/// the chart lints, packages and renders the `--set image.registry` it suggests, and its
/// `kubectl` lines (rollout status, apply of the example, get) run on the cluster.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn readme_quickstart_runs_as_written() {
    ensure_snooze().await;
    let root = repo_path("");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let quickstart = readme
        .split("## Quickstart on your cluster")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Quickstart section");
    let chart = std::fs::read_to_string(format!("{root}/charts/snooze/Chart.yaml")).unwrap();
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion");
    // The shell lines of its code blocks (comments dropped).
    let mut lines = Vec::new();
    let mut in_sh = false;
    for l in quickstart.lines() {
        if l.starts_with("```") {
            in_sh = l == "```sh";
            continue;
        }
        let cmd = l.split(" #").next().unwrap_or("").trim();
        if in_sh && !cmd.is_empty() && !cmd.starts_with('#') {
            lines.push(cmd.replace("$REGISTRY", "registry.example.com/snooze"));
        }
    }
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    for component in ["operator", "activator", "testapp"] {
        let image = format!("ghcr.io/snooze-sh/{component}:{app_version}");
        let build = lines
            .iter()
            .find(|l| l.starts_with("docker build") && l.contains(&image))
            .unwrap_or_else(|| panic!("no docker build of {image} in the quickstart"));
        assert!(
            build.contains(&format!("--build-arg COMPONENT={component}")),
            "{build}"
        );
        assert!(
            dockerfile.contains(component),
            "the Dockerfile does not build {component}"
        );
        assert!(
            lines
                .iter()
                .any(|l| (l.starts_with("kind load") || l.starts_with("k3d")) && l.contains(&image))
                || quickstart.contains(&format!("k3d image import {image}")),
            "{image} is not loaded into kind"
        );
    }
    // The chart: lints, packages, and renders a user's registry with the same tags.
    let chart_dir = format!("{root}/charts/snooze");
    let (ok, out) = run_tool("helm", &["lint", "--strict", &chart_dir]).await;
    assert!(ok, "{out}");
    let dist = std::env::temp_dir().join(format!("snooze-chart-{}", std::process::id()));
    let (ok, out) = run_tool(
        "helm",
        &["package", &chart_dir, "-d", dist.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        dist.join(format!("snooze-{app_version}.tgz")).exists(),
        "{out}"
    );
    let install = lines
        .iter()
        .find(|l| l.starts_with("helm install snooze ./charts/snooze"))
        .expect("the helm install line");
    assert!(
        install.contains("-n snooze-system --create-namespace"),
        "{install}"
    );
    let (ok, out) = run_tool(
        "helm",
        &[
            "template",
            "snooze",
            &chart_dir,
            "--kube-version",
            "1.33.0",
            "--set",
            "image.registry=registry.example.com/snooze",
        ],
    )
    .await;
    assert!(ok, "{out}");
    for component in ["operator", "activator"] {
        let want = format!("image: registry.example.com/snooze/{component}:{app_version}");
        assert!(out.contains(&want), "helm template lacks {want}");
    }
    // Its kubectl lines, in order, on the cluster (the chart is installed as `snooze`
    // in `snooze-system`, as the quickstart says).
    let kubectl_lines: Vec<&String> = lines.iter().filter(|l| l.starts_with("kubectl ")).collect();
    assert!(kubectl_lines.len() >= 3, "{kubectl_lines:?}");
    for l in kubectl_lines {
        // Paths are the repository's (the quickstart runs from a clone's root).
        let l = l.replace(" examples/", &format!(" {root}/examples/"));
        let args: Vec<&str> = l.split_whitespace().skip(1).collect();
        let (ok, out) = run_tool("kubectl", &args).await;
        assert!(ok, "`{l}` failed:\n{out}");
        eprintln!("$ {l}\n{}", out.trim_end());
    }
    // The example ScaledService is programmed; the Ingress and HTTPRoute examples are
    // valid for the API server (e2e/tests/paths.rs routes traffic through both).
    let client = client().await;
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), "shop");
    wait_for("examples/app.yaml programmed", T, || async {
        let (status, reason, msg) = ready_condition(&ssvcs, "web").await?;
        (status == "True")
            .then_some(())
            .ok_or(format!("{reason}: {msg}"))
    })
    .await;
    for example in ["ingress.yaml", "httproute.yaml"] {
        let (ok, out) = kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &format!("{root}/examples/{example}"),
        ])
        .await;
        assert!(ok, "{example}: {out}");
    }
    let (ok, out) = kubectl(&["delete", "namespace", "shop", "--wait=false"]).await;
    assert!(ok, "{out}");
    let _ = std::fs::remove_dir_all(dist);
}

/// The chart's switches: with every one on, `helm template` renders, the objects the
/// API server knows (NetworkPolicies, Deployments with a priority class and spread
/// constraints, Services, the test Pod) pass its validation (server dry-run; the
/// ServiceMonitor and PodMonitor need the Prometheus Operator's CRDs, absent here), and
/// `helm test` on the installed release passes (both components answer `/readyz`).
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn chart_switches_render_validate_and_helm_test_passes() {
    ensure_snooze().await;
    let chart = repo_path("charts/snooze");
    let (ok, out) = run_tool(
        "helm",
        &[
            "template", "switches", &chart, "--kube-version", "1.33.0", "-n", "default",
            "--set", "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
            "--set", "metrics.grafanaDashboard.enabled=true,metrics.grafanaDashboard.annotations.grafana_folder=Snooze",
            "--set", "networkPolicy.enabled=true,priorityClassName=system-cluster-critical",
            "--set", "networkPolicy.dataFromNamespaces={ingress-nginx},networkPolicy.metricsFromNamespaces={monitoring}",
            "--set-json",
            r#"activator.topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"ScheduleAnyway","labelSelector":{"matchLabels":{"app.kubernetes.io/component":"activator"}}}]"#,
        ],
    )
    .await;
    assert!(ok, "{out}");
    let docs: Vec<&str> = out.split("\n---").collect();
    let kind_of = |d: &str| {
        d.lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let kinds: Vec<String> = docs.iter().map(|d| kind_of(d)).collect();
    for want in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
        "Pod",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "no {want} rendered: {kinds:?}"
        );
    }
    assert!(out.contains("priorityClassName: system-cluster-critical"));
    assert!(out.contains("topologySpreadConstraints:"));
    assert!(out.contains("endPort: 29999"), "the data ports' range");
    // The PrometheusRule carries the rules file as it is (templates left to Prometheus).
    for alert in [
        "SnoozeActivationTimeouts",
        "SnoozeQueueOverflow",
        "SnoozeNoLeader",
        "SnoozeActivatorsNotReady",
    ] {
        assert!(
            out.contains(&format!("alert: {alert}")),
            "{alert} not in the PrometheusRule"
        );
    }
    assert!(
        out.contains("{{ $labels.namespace }}"),
        "alert templates rendered by helm"
    );
    // The dashboard's ConfigMap: labelled for Grafana's sidecar, the JSON as it is.
    let dashboard = docs
        .iter()
        .find(|d| kind_of(d) == "ConfigMap" && d.contains("name: switches-snooze-dashboard"))
        .expect("the dashboard ConfigMap");
    assert!(
        dashboard.contains("grafana_dashboard: \"1\""),
        "{dashboard}"
    );
    assert!(dashboard.contains("\"uid\": \"snooze-overview\""));
    // The namespaced workload objects through the API server (the Prometheus
    // Operator's kinds have no CRD here; the test Pod needs its service account to
    // exist, and is run for real by `helm test` below).
    let validated: Vec<&str> = docs
        .iter()
        .copied()
        .filter(|d| {
            matches!(
                kind_of(d).as_str(),
                "NetworkPolicy" | "Deployment" | "Service" | "PodDisruptionBudget" | "ConfigMap"
            )
        })
        .collect();
    let file = std::env::temp_dir().join(format!("snooze-switches-{}.yaml", std::process::id()));
    std::fs::write(&file, validated.join("\n---")).unwrap();
    let (ok, out) = kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "networkpolicy.networking.k8s.io/switches-snooze-activator created (server dry run)"
        ),
        "{out}"
    );
    let _ = std::fs::remove_file(file);
    // Off by default: nothing of the sort in a plain install.
    let (ok, plain) = run_tool(
        "helm",
        &["template", "plain", &chart, "--kube-version", "1.33.0"],
    )
    .await;
    assert!(ok, "{plain}");
    for absent in [
        "kind: ServiceMonitor",
        "kind: PodMonitor",
        "kind: NetworkPolicy",
        "kind: PrometheusRule",
        "priorityClassName",
    ] {
        assert!(!plain.contains(absent), "{absent} rendered by default");
    }
    // helm test on the installed release.
    let (ok, out) = run_tool(
        "helm",
        &[
            "test",
            SNOOZE_RELEASE,
            "-n",
            SNOOZE_NAMESPACE,
            "--timeout",
            "120s",
        ],
    )
    .await;
    eprintln!("{out}");
    assert!(ok, "helm test failed:\n{out}");
    assert!(out.contains("Phase:          Succeeded"), "{out}");
}

/// Waits until the Deployment controller has caught up with the Deployment's spec
/// (observed generation, all replicas there and ready): the race tests below start from
/// a workload at rest.
async fn settled(deploys: &Api<Deployment>, name: &str) {
    wait_for(
        &format!("{name} settled"),
        Duration::from_secs(60),
        || async {
            let d = deploys.get(name).await.map_err(|e| e.to_string())?;
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let st = d.status.clone().unwrap_or_default();
            let ok = st.observed_generation >= d.metadata.generation
                && st.replicas.unwrap_or(0) == want
                && st.ready_replicas.unwrap_or(0) == want
                && st.updated_replicas.unwrap_or(0) == want;
            ok.then_some(()).ok_or(format!("{st:?}"))
        },
    )
    .await;
}

/// The one writer of replicas (issue 28), with the operator's own deciders: a wake
/// and the autoscaler's tick at once, wanting different numbers. The workload sleeps at
/// 0 when a schedule's floor of 2 begins: the tick, with the new floor, decides 0 → 2
/// (MinReplicas) just as a request arrives and the wake path, with the policy read a
/// moment before, decides 0 → 1. Both decided on the same read. Whichever writes
/// second is refused (its `test` of the replicas fails: 422) and decided again on what
/// the first wrote: the wake on 2
/// (not at zero: nothing to do), the tick on 1 (below its floor: 2). Either order, and
/// both at once, end at 2, the rule in DESIGN (a decision applies only to the replicas
/// it was made on; a wake only raises from zero). Without the precondition the wake
/// written second leaves 1: the tick's floor lost. The Deployment controller's status
/// writes after the first write must not refuse the second (a `resourceVersion`
/// precondition did, up to the retry bound: stop 38's CI run, `Contended(4)`), so each
/// refusal here is exactly one.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_wake_racing_the_autoscalers_tick_loses_neither_decision() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    use snooze_operator::decision::{self, Load, Policy, Reason};
    use snooze_operator::replicas;
    use std::time::SystemTime;
    in_namespace("race", |client, ns| async move {
        app(&client, &ns, "web", 0, &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let t = Duration::from_secs(10);
        let before_schedule = Policy {
            min_replicas: 0,
            max_replicas: 5,
            idle_timeout: Duration::from_secs(300),
            wake_replicas: 1,
            max_step: 1,
            paused: false,
            awake_until: None,
            sleep: false,
        };
        let in_schedule = Policy {
            min_replicas: 2,
            ..before_schedule
        };
        let started = SystemTime::now();
        let wake = |now: i32| {
            let load = Load {
                wake: true,
                ..Default::default()
            };
            let d = decision::decide(&before_schedule, now, &load, SystemTime::now(), started);
            (d.reason == Reason::Wake).then_some((d.desired, d.reason))
        };
        let tick = |now: i32| {
            let load = Load {
                complete: true,
                last_request: Some(SystemTime::now()),
                ..Default::default()
            };
            let d = decision::decide(&in_schedule, now, &load, SystemTime::now(), started);
            Some((d.desired, d.reason))
        };
        let reset = || async {
            replicas::apply(&api, "web", None, t, |_| Some((0, ())))
                .await
                .unwrap();
            settled(&deploys, "web").await;
            let r = replicas::read(&api, "web", t).await.unwrap();
            assert_eq!(r.replicas, 0);
            r
        };
        // The tick writes first, then the wake decided on the same read.
        let seen = reset().await;
        let (a, _) = replicas::apply(&api, "web", Some(seen.clone()), t, tick)
            .await
            .unwrap();
        let (b, conflicts) = replicas::apply(&api, "web", Some(seen), t, wake)
            .await
            .unwrap();
        eprintln!("tick then wake: {a:?}, {b:?} ({conflicts} conflict)");
        assert_eq!(conflicts, 1, "the wake's write was refused once");
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 2);
        // The wake writes first, then the tick decided on the same read.
        let seen = reset().await;
        let (a, _) = replicas::apply(&api, "web", Some(seen.clone()), t, wake)
            .await
            .unwrap();
        let (b, conflicts) = replicas::apply(&api, "web", Some(seen), t, tick)
            .await
            .unwrap();
        eprintln!("wake then tick: {a:?}, {b:?} ({conflicts} conflict)");
        assert_eq!(conflicts, 1, "the tick's write was refused once");
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 2);
        // Both at once, as they run in the operator (the order is the API server's).
        for round in 0..5 {
            let seen = reset().await;
            let (a, b) = tokio::join!(
                replicas::apply(&api, "web", Some(seen.clone()), t, wake),
                replicas::apply(&api, "web", Some(seen), t, tick),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!(
                deployment_replicas(&deploys, "web").await.unwrap(),
                2,
                "round {round}: wake {a:?}, tick {b:?}"
            );
        }
    })
    .await;
}

/// The one writer of replicas (issue 28): two deciders at once. Decider A (an idle
/// step down, one replica at a time) read 3 replicas; decider B (the load wants 5)
/// writes first. A's write, decided on 3, is refused by its precondition, and A decides
/// again on the 5 that are there: 4. Without the precondition A would write 2 and B's
/// scale-up would be lost. A change that leaves the replicas alone (a label, the
/// controller's status) refuses nothing: the precondition is the replicas, not the
/// object's version.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_replica_decision_made_on_a_stale_read_is_made_again_not_written() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    use snooze_operator::replicas::{self, Applied};
    in_namespace("writer", |client, ns| async move {
        app(&client, &ns, "web", 3, &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let t = Duration::from_secs(10);
        settled(&deploys, "web").await;
        let seen = replicas::read(&api, "web", t).await.unwrap();
        assert_eq!(seen.replicas, 3);
        let (b, _) = replicas::apply(&api, "web", None, t, |_| Some((5, "load")))
            .await
            .unwrap();
        assert_eq!(
            b,
            Applied::Changed {
                from: 3,
                to: 5,
                why: "load"
            }
        );
        settled(&deploys, "web").await;
        let mut shown = Vec::new();
        let (a, conflicts) = replicas::apply(&api, "web", Some(seen), t, |now| {
            shown.push(now);
            Some((now - 1, "idle"))
        })
        .await
        .unwrap();
        assert_eq!(shown, vec![3, 5], "decided on the stale read, then again");
        assert_eq!(conflicts, 1);
        assert_eq!(
            a,
            Applied::Changed {
                from: 5,
                to: 4,
                why: "idle"
            }
        );
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 4);
        // Read 4, then someone labels the Deployment (its resourceVersion changes, its
        // replicas do not): the decision made on 4 is written as it was made.
        settled(&deploys, "web").await;
        let seen = replicas::read(&api, "web", t).await.unwrap();
        let label = serde_json::json!({"metadata": {"labels": {"team": "checkout"}}});
        deploys
            .patch("web", &PatchParams::default(), &Patch::Merge(&label))
            .await
            .unwrap();
        let (c, conflicts) =
            replicas::apply(&api, "web", Some(seen), t, |now| Some((now - 1, "idle")))
                .await
                .unwrap();
        assert_eq!(conflicts, 0, "a label refused the write");
        assert_eq!(
            c,
            Applied::Changed {
                from: 4,
                to: 3,
                why: "idle"
            }
        );
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 3);
    })
    .await;
}
