//! Faults, one at a time (./test.sh runs this binary with one test thread): the API
//! server stopped and started, the operator leader killed, activators deleted and
//! killed, a backend pod killed. Each case drives a bounded load at the managed
//! Service's endpoints the way an ingress does (`snooze_e2e::faults::Load`) and counts
//! every failed request; the counts are printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use snooze_e2e::faults::*;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(120);

fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// A warm `web` (1 replica, never below) with its slice listing activators that listen.
async fn warm_web(client: &Client, ns: &str, replicas: i32) {
    scaled_app(client, ns, replicas, replicas, 3, "1h", &[]).await;
    wait_for("warm web answers", T, || async {
        let t = listening_targets(client, ns, "web", "http").await?;
        match http_get(&format!("http://{}/", t[0]), Duration::from_secs(5)).await? {
            (200, _) => Ok(()),
            (c, b) => Err(format!("{c}: {b}")),
        }
    })
    .await;
}

/// A sleeping `cold` app (0 replicas, min 0) in the same namespace, holding requests
/// up to `activation_timeout`.
async fn cold_app(client: &Client, ns: &str, activation_timeout: &str) -> Vec<String> {
    cold_app_named(client, ns, "cold", activation_timeout).await
}

async fn cold_app_named(
    client: &Client,
    ns: &str,
    name: &str,
    activation_timeout: &str,
) -> Vec<String> {
    app(client, ns, name, 0, &[]).await;
    let ssvcs: Api<snooze_crds::ScaledService> = Api::namespaced(client.clone(), ns);
    let mut ss = serde_json::to_value(scaled_service(name, 0, 1, "1h")).unwrap();
    ss["spec"]["activation"]["timeout"] = activation_timeout.into();
    let ss: snooze_crds::ScaledService = serde_json::from_value(ss).unwrap();
    ssvcs.create(&PostParams::default(), &ss).await.unwrap();
    wait_for("cold slice", T, || {
        listening_targets(client, ns, name, "http")
    })
    .await
}

fn same_processes(before: &[(String, i32)], after: &[(String, i32)]) {
    assert!(!before.is_empty(), "no Snooze processes found");
    for (pod, pid) in before {
        assert!(alive(*pid), "{pod}: process {pid} exited");
    }
    assert_eq!(before, after, "Snooze processes changed");
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn api_server_restart_fails_no_request_and_ends_no_process() {
    ensure_snooze().await;
    in_namespace("fault-api", |client, ns| async move {
        warm_web(&client, &ns, 1).await;
        // The wake patch goes out within a second or two of the API server's return;
        // the Deployment and ReplicaSet controllers then take their own time to come
        // back (their watches back off up to 30 s): the held request may wait for that.
        let cold = cold_app(&client, &ns, "180s").await;
        let before = snooze_pids(&client).await;
        let agent = node_agent_pid().expect("node agent pid");
        let outage = secs("FAULT_API_OUTAGE_SECONDS", 20);
        let after = secs("FAULT_AFTER_SECONDS", 120);

        let load = Load::start(
            &client,
            &ns,
            "web",
            4,
            Duration::from_millis(20),
            T * 5,
            100_000,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster("apiserver-stop").await;
        let stopped = Instant::now();
        // A request for the sleeping service while the API server is away: held.
        let cold_req = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = http_get(&format!("http://{}/", cold[0]), Duration::from_secs(200)).await;
            (r, t0.elapsed(), Instant::now())
        });
        tokio::time::sleep(outage).await;
        cluster("apiserver-start").await;
        let (back, back_at) = (stopped.elapsed(), Instant::now());
        // Snooze's part: the wake patch soon after the API server is back.
        let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(client.clone(), &ns);
        wait_for(
            "the cold Deployment woken",
            Duration::from_secs(30),
            || async {
                match deployment_replicas(&deploys, "cold").await? {
                    0 => Err("still 0 replicas".to_string()),
                    _ => Ok(()),
                }
            },
        )
        .await;
        let woken = back_at.elapsed();
        let (cold_result, cold_took, done) = cold_req.await.unwrap();
        eprintln!(
            "API server away {back:?}; cold Deployment scaled {woken:?} after it was back; \
             held cold request: {:?} after {cold_took:?}, {:?} after the API server was back \
             (the rest is the Deployment and ReplicaSet controllers coming back, and the pod)",
            cold_result.as_ref().map(|(c, _)| *c),
            done.saturating_duration_since(back_at)
        );
        tokio::time::sleep(after).await;
        let report = load.stop().await;
        let now = snooze_pids(&client).await;
        eprintln!("load on the warm service: {report}");
        eprintln!("Snooze processes before {before:?}, after {now:?}");
        assert_eq!(report.failed(), 0, "failures: {:?}", report.failures);
        assert!(
            report.ok > 1000,
            "too little load to mean anything: {report}"
        );
        assert_eq!(cold_result.map(|(c, _)| c), Ok(200));
        same_processes(&before, &now);
        assert!(alive(agent), "the node agent exited");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn operator_leader_killed_after_a_cold_request_one_leader_at_a_time() {
    ensure_snooze().await;
    in_namespace("fault-leader", |client, ns| async move {
        let cold = cold_app(&client, &ns, "60s").await;
        let leader = wait_for("one leader", T, || async {
            let l = operator_leadership(&client).await;
            let leaders: Vec<_> = l.iter().filter(|(_, x)| *x).collect();
            (leaders.len() == 1)
                .then(|| leaders[0].0.clone())
                .ok_or(format!("{l:?}"))
        })
        .await;
        let pids = container_pids(
            &client,
            SNOOZE_NAMESPACE,
            "app.kubernetes.io/component=operator",
        )
        .await;
        let pid = pids
            .iter()
            .find(|(p, _)| *p == leader)
            .expect("leader pid")
            .1;

        // Watch the operators' own leadership metric throughout.
        let most = Arc::new(AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let (c, m, st) = (client.clone(), most.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            let mut took_over: Option<Instant> = None;
            let killed_at = Instant::now();
            while !st.is_cancelled() {
                let l = operator_leadership(&c).await;
                let n = l.iter().filter(|(_, x)| *x).count();
                m.fetch_max(n, Ordering::SeqCst);
                if n == 1 && took_over.is_none() && killed_at.elapsed() > Duration::from_millis(300)
                {
                    took_over = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            took_over.map(|t| t - killed_at)
        });

        let t0 = Instant::now();
        let req = tokio::spawn(async move {
            http_get(&format!("http://{}/", cold[0]), Duration::from_secs(60)).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        kill9(pid);
        let killed = Instant::now();
        let r = req.await.unwrap();
        let answered = t0.elapsed();
        // A leader again (the restarted container or the other replica).
        wait_for("a leader after the kill", T, || async {
            let l = operator_leadership(&client).await;
            l.iter()
                .any(|(_, x)| *x)
                .then_some(())
                .ok_or(format!("{l:?}"))
        })
        .await;
        let takeover = killed.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        let first_leader_seen = watcher.await.unwrap();
        eprintln!(
            "cold request answered {:?} after {answered:?}; leader {leader} (pid {pid}) killed; \
             a leader again after {:?} (first seen by the poller {:?}); most leaders at once: {}",
            r.as_ref().map(|(c, _)| *c),
            takeover,
            first_leader_seen,
            most.load(Ordering::SeqCst)
        );
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        assert!(answered < Duration::from_secs(60));
        assert!(most.load(Ordering::SeqCst) <= 1, "two leaders at once");
    })
    .await;
}

/// Wakes do not wait for a leader (issue 28). The leader is lost as when its node
/// dies: its pod force-deleted and its process killed, so its Lease stays held by a
/// pod that is gone until it expires (15 s). A cold request sent at once is answered
/// by a follower's wake (`operator/src/backstop.rs`), about as fast as a cold request
/// with a leader, and before any replica leads again. Without the backstop the request
/// waits for the lease to run out (15.3 s measured before).
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_cold_request_right_after_the_leader_is_lost_is_woken_by_a_follower() {
    ensure_snooze().await;
    in_namespace("fault-follower", |client, ns| async move {
        let first = cold_app_named(&client, &ns, "first", "60s").await;
        let second = cold_app_named(&client, &ns, "second", "60s").await;
        let leader = wait_for("one leader and a follower", T, || async {
            let l = operator_leadership(&client).await;
            let leaders: Vec<_> = l.iter().filter(|(_, x)| *x).collect();
            (leaders.len() == 1 && l.len() >= 2)
                .then(|| leaders[0].0.clone())
                .ok_or(format!("{l:?}"))
        })
        .await;
        // With a leader: the baseline.
        let t = Instant::now();
        let r = http_get(&format!("http://{}/", first[0]), Duration::from_secs(60)).await;
        let with_leader = t.elapsed();
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        let woken = |ops: &[(String, String)]| -> f64 {
            ops.iter()
                .filter_map(|(_, b)| metric(b, "snooze_operator_follower_wakes_total{outcome=\"woken\"}"))
                .sum()
        };
        let before = woken(&scrape(&client, "operator", 9091).await);

        let pid = container_pids(
            &client,
            SNOOZE_NAMESPACE,
            "app.kubernetes.io/component=operator",
        )
        .await
        .into_iter()
        .find(|(p, _)| *p == leader)
        .expect("leader pid")
        .1;
        let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        pods.delete(
            &leader,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        kill9_unless_gone(pid);
        let t = Instant::now();
        let r = http_get(&format!("http://{}/", second[0]), Duration::from_secs(60)).await;
        let without = t.elapsed();
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let holder = leases
            .get(LEASE)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity);
        let after = woken(&scrape(&client, "operator", 9091).await);
        eprintln!(
            "cold request with a leader: {with_leader:?}; right after the leader {leader} was lost: \
             {without:?} (lease holder then: {holder:?}); follower wakes {before} -> {after}"
        );
        assert_eq!(r.map(|(c, _)| c), Ok(200));
        // Answered while the Lease still names the lost leader: no new leader woke it.
        assert_eq!(holder.as_deref(), Some(leader.as_str()));
        assert!(after > before, "no follower wake counted: {before} -> {after}");
        // The goal is about 1 s more than with a leader; 3 s leaves room for this
        // machine's noise and is still far below the lease's 15 s.
        assert!(
            without < with_leader + Duration::from_secs(3),
            "{without:?} against {with_leader:?} with a leader"
        );
        // Leave a leader and two operators behind for the next tests.
        wait_for("a leader and two operators again", T, || async {
            let l = operator_leadership(&client).await;
            (l.iter().filter(|(_, x)| *x).count() == 1 && l.len() >= 2)
                .then_some(())
                .ok_or(format!("{l:?}"))
        })
        .await;
    })
    .await;
}

/// A steady reconcile reads nothing from the API server (issue 28): once a
/// ScaledService is programmed, what makes the leader reconcile it again (a change of
/// the ScaledService, of its backend Service) is answered from the leader's caches
/// (`operator/src/caches.rs`): `snooze_operator_reconciles_total` moves and
/// `snooze_operator_api_reads_total` does not; nor for a ScaledService whose Service or
/// workload is missing, once its status says so. Here and not in a parallel suite: another
/// test creating ScaledServices meanwhile makes the reads of a first reconcile.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_steady_reconcile_reads_nothing_from_the_api_server() {
    ensure_snooze().await;
    in_namespace("reads", |client, ns| async move {
        app(&client, &ns, "web", 1, &[]).await;
        let ssvcs: Api<snooze_crds::ScaledService> = Api::namespaced(client.clone(), &ns);
        ssvcs
            .create(&PostParams::default(), &scaled_service("web", 0, 2, "1h"))
            .await
            .unwrap();
        // Two that cannot be programmed: their missing Service or workload is confirmed
        // once with a GET, then believed from the cache while the status says so.
        let mut lost = scaled_service("lost", 0, 2, "1h");
        lost.spec.service = "no-such-service".into();
        let mut no_target = scaled_service("no-target", 0, 2, "1h");
        no_target.spec.service = "web".into();
        for ss in [&lost, &no_target] {
            ssvcs.create(&PostParams::default(), ss).await.unwrap();
        }
        for (name, want) in [
            ("web", "True"),
            ("lost", "False ServiceNotFound"),
            ("no-target", "False TargetNotFound"),
        ] {
            wait_for(&format!("{name} Ready={want}"), T, || async {
                let (r, m) = ready_reason(&ssvcs, name).await?;
                r.starts_with(want)
                    .then_some(())
                    .ok_or(format!("{r}: {m}"))
            })
            .await;
        }
        // What the caches can answer (routes, listed every 5 minutes, and pods, listed
        // after a failed wake, are not a steady reconcile's).
        let counts = || async {
            let body = leader_metrics(&client).await.unwrap();
            let mut reads = 0.0;
            for l in body
                .lines()
                .filter(|l| l.starts_with("snooze_operator_api_reads_total{"))
            {
                if l.contains("what=\"routes\"") || l.contains("what=\"pods\"") {
                    continue;
                }
                reads += l
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
            (
                metric(&body, "snooze_operator_reconciles_total").unwrap_or(0.0),
                reads,
                body,
            )
        };
        // Steady means no other test's namespace still being deleted: its ScaledServices
        // find their Service or workload gone, which is confirmed once with a GET.
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        wait_for("no namespace terminating", Duration::from_secs(120), || async {
            let l = nss.list(&Default::default()).await.map_err(|e| e.to_string())?;
            let t: Vec<String> = l
                .items
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_some())
                .map(|n| n.metadata.name.clone().unwrap_or_default())
                .collect();
            t.is_empty().then_some(()).ok_or(format!("terminating: {t:?}"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rec0, reads0, body0) = counts().await;
        let before: Vec<&str> = body0
            .lines()
            .filter(|l| l.starts_with("snooze_operator_api_reads_total"))
            .collect();
        let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns);
        for i in 0..5 {
            let touch = serde_json::json!({"metadata": {"labels": {"e2e-touch": i.to_string()}}});
            let pp = kube::api::PatchParams::default();
            for name in ["web", "lost", "no-target"] {
                ssvcs
                    .patch(name, &pp, &kube::api::Patch::Merge(&touch))
                    .await
                    .unwrap();
            }
            svcs.patch("web", &pp, &kube::api::Patch::Merge(&touch))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rec1, reads1, body) = counts().await;
        let reads: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("snooze_operator_api_reads_total"))
            .collect();
        eprintln!(
            "reconciles {rec0} -> {rec1}, API reads {reads0} -> {reads1}; before {before:?}, after {reads:?}"
        );
        assert!(
            rec1 - rec0 >= 15.0,
            "the changes made too few reconciles: {rec0} -> {rec1}"
        );
        assert_eq!(
            reads1, reads0,
            "a steady reconcile read from the API server"
        );
    })
    .await;
}

async fn activator_pids(client: &Client) -> Vec<(String, i32)> {
    container_pids(
        client,
        SNOOZE_NAMESPACE,
        "app.kubernetes.io/component=activator",
    )
    .await
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn activator_deleted_gracefully_under_load_fails_no_request() {
    ensure_snooze().await;
    in_namespace("fault-actdel", |client, ns| async move {
        warm_web(&client, &ns, 1).await;
        let victims = activator_pids(&client).await;
        assert!(victims.len() >= 2, "needs two activators: {victims:?}");
        let load = Load::start(
            &client,
            &ns,
            "web",
            4,
            Duration::from_millis(20),
            T * 2,
            50_000,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        pods.delete(&victims[0].0, &DeleteParams::default())
            .await
            .unwrap();
        let t0 = Instant::now();
        wait_for("a replacement activator listed", T, || async {
            let now = activator_pids(&client).await;
            (now.len() == victims.len() && !now.iter().any(|(p, _)| *p == victims[0].0))
                .then_some(())
                .ok_or(format!("{now:?}"))
        })
        .await;
        let replaced = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let report = load.stop().await;
        eprintln!(
            "activator {} deleted; replaced after {replaced:?}; load: {report}",
            victims[0].0
        );
        assert_eq!(report.failed(), 0, "failures: {:?}", report.failures);
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn activator_killed_under_load_fails_only_requests_in_flight_on_it() {
    ensure_snooze().await;
    in_namespace("fault-actkill", |client, ns| async move {
        warm_web(&client, &ns, 1).await;
        let victims = activator_pids(&client).await;
        let (pod, pid) = victims[0].clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let ip = pods
            .get(&pod)
            .await
            .unwrap()
            .status
            .unwrap()
            .pod_ip
            .unwrap();
        let load = Load::start(
            &client,
            &ns,
            "web",
            4,
            Duration::from_millis(20),
            T * 2,
            50_000,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed_at = load.started.elapsed();
        kill9(pid);
        // Its container restarts (same pod, same IP) and is listed again once it listens.
        wait_for("the killed activator back", T, || async {
            let now = activator_pids(&client).await;
            now.iter()
                .any(|(p, x)| *p == pod && *x != pid)
                .then_some(())
                .ok_or(format!("{now:?}"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let report = load.stop().await;
        let on_victim_at_kill: Vec<_> = report
            .failures
            .iter()
            .filter(|f| {
                f.target.starts_with(&format!("{ip}:")) && f.at < killed_at + Duration::from_secs(1)
            })
            .collect();
        eprintln!(
            "activator {pod} ({ip}) killed at {killed_at:?}; load: {report}; \
             failed in flight on it: {}",
            on_victim_at_kill.len()
        );
        // Only requests in flight on the killed one (4 workers: at most 4), none later.
        assert!(on_victim_at_kill.len() <= 4, "{:?}", report.failures);
        assert_eq!(
            report.failed(),
            on_victim_at_kill.len(),
            "other failures: {:?}",
            report.failures
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn backend_pod_killed_under_load_fails_only_requests_sent_to_it() {
    ensure_snooze().await;
    in_namespace("fault-podkill", |client, ns| async move {
        warm_web(&client, &ns, 2).await;
        let backends = wait_for("two running backend pods", T, || async {
            let p = container_pids(&client, &ns, "app=web").await;
            (p.len() == 2).then_some(p.clone()).ok_or(format!("{p:?}"))
        })
        .await;
        let load = Load::start(&client, &ns, "web", 4, Duration::from_millis(20), T * 2, 50_000).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let killed_at = load.started.elapsed();
        kill9(backends[0].1);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let report = load.stop().await;
        let later = report.failed_after(killed_at + Duration::from_secs(1));
        eprintln!(
            "backend {} killed at {killed_at:?}; load: {report}; failed more than 1 s after the kill: {}",
            backends[0].0,
            later.len()
        );
        assert!(report.failed() <= 4, "{:?}", report.failures);
        assert!(later.is_empty(), "{later:?}");
    })
    .await;
}

/// Open file descriptors and resident memory (KiB) of a process.
fn fds_and_rss(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    (fds, rss)
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn soak_cycles_from_zero_to_n_and_back_fail_nothing_and_leak_nothing() {
    ensure_snooze().await;
    in_namespace("fault-soak", |client, ns| async move {
        let cycles: usize = std::env::var("SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
        // Every request takes 50 ms; 8 in flight with target 2 → several replicas.
        app(&client, &ns, "web", 0, &["--delay-ms", "50"]).await;
        let ssvcs: Api<snooze_crds::ScaledService> = Api::namespaced(client.clone(), &ns);
        let ss: snooze_crds::ScaledService = serde_json::from_value(serde_json::json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web"},
            "spec": {
                "scaleTargetRef": {"name": "web"}, "service": "web",
                "minReplicas": 0, "maxReplicas": 4, "idleTimeout": "2s",
                "scaling": {"metric": "concurrency", "target": 2, "stableWindow": "6s", "panicWindow": "2s",
                            "scaleDownDelay": "0s", "maxScaleDownStep": 10},
            },
        }))
        .unwrap();
        ssvcs.create(&PostParams::default(), &ss).await.unwrap();
        let deploys: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
        wait_for("managed endpoints", T, || listening_targets(&client, &ns, "web", "http")).await;
        let activators = activator_pids(&client).await;

        let (mut total, mut peaks) = (Report::default(), Vec::new());
        let mut baseline = Vec::new();
        for cycle in 0..cycles {
            // A burst from zero: 8 clients in a closed loop for 4 s.
            let load = Load::start(&client, &ns, "web", 8, Duration::ZERO, Duration::from_secs(4), 5_000).await;
            let mut peak = 0;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(4) {
                peak = peak.max(deployment_replicas(&deploys, "web").await.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let r = load.stop().await;
            peaks.push(peak);
            total.sent += r.sent;
            total.ok += r.ok;
            total.failures.extend(r.failures);
            wait_for("back to zero", T, || async {
                match deployment_replicas(&deploys, "web").await? {
                    0 => Ok(()),
                    n => Err(format!("{n} replicas")),
                }
            })
            .await;
            // The pods' endpoints leave the slices a moment after the scale.
            tokio::time::sleep(Duration::from_secs(2)).await;
            if cycle == 0 {
                // The level after one full cycle (one-time allocations made).
                baseline = activators.iter().map(|(_, pid)| fds_and_rss(*pid)).collect();
            }
        }
        let end: Vec<(usize, u64)> = activators.iter().map(|(_, pid)| fds_and_rss(*pid)).collect();
        eprintln!(
            "soak: {cycles} cycles 0 → 1 → N → 0, peaks {peaks:?}; {total}; \
             activators (fds, RSS KiB) after cycle 1 {baseline:?}, after the last {end:?}"
        );
        assert_eq!(total.failed(), 0, "failures: {:?}", total.failures);
        assert!(total.ok >= 10_000 || cycles < 30, "too few requests: {total}");
        assert!(peaks.iter().filter(|p| **p >= 2).count() >= cycles / 2, "rarely above 1 replica: {peaks:?}");
        for ((f0, r0), (f1, r1)) in baseline.iter().zip(&end) {
            assert!(
                (*f1 as f64) <= (*f0 as f64) * 1.1 + 1.0,
                "file descriptors grew: {f0} → {f1}"
            );
            assert!((*r1 as f64) <= (*r0 as f64) * 1.1, "RSS grew: {r0} → {r1} KiB");
        }
    })
    .await;
}

/// A metric's value in a Prometheus text body (a series without labels).
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `(pod, /metrics body)` of every pod of `component` that answers on `port`.
async fn scrape(client: &Client, component: &str, port: u16) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let list = pods
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("app.kubernetes.io/component={component}")),
        )
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in list {
        let name = kube::ResourceExt::name_any(&p);
        let Some(ip) = p.status.and_then(|s| s.pod_ip) else {
            continue;
        };
        if let Ok((200, body)) = snooze_e2e::testing::scrape(
            &format!("http://{ip}:{port}/metrics"),
            Duration::from_secs(2),
        )
        .await
        {
            out.push((name, body));
        }
    }
    out
}

/// The operators' leader Lease (the chart's `<release>-operator`).
const LEASE: &str = "snooze-operator";

/// Sets the leader Lease's holder (`None`: released, as a leader that stops does).
async fn set_lease_holder(
    leases: &Api<k8s_openapi::api::coordination::v1::Lease>,
    holder: Option<&str>,
) {
    wait_for("the lease written", T, || async {
        let mut l = leases.get(LEASE).await.map_err(|e| e.to_string())?;
        let spec = l.spec.get_or_insert_with(Default::default);
        spec.holder_identity = holder.map(str::to_string);
        spec.lease_duration_seconds = Some(if holder.is_some() { 60 } else { 1 });
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        leases
            .replace(LEASE, &PostParams::default(), &l)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn the_leader_lease_lost_twenty_times_leaves_no_task_and_no_stream_behind() {
    ensure_snooze().await;
    let client = client().await;
    let rounds: usize = std::env::var("LEASE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    // One leader (or none), and each activator reading one stats stream per operator
    // replica: the leader's and each follower's (their wake backstop), in either role.
    let settled = |want_leaders: usize| {
        let client = client.clone();
        async move {
            let ops = scrape(&client, "operator", 9091).await;
            let leaders = ops
                .iter()
                .filter(|(_, b)| metric(b, "snooze_operator_leader") == Some(1.0))
                .count();
            let acts = scrape(&client, "activator", 9090).await;
            let streams: Vec<f64> = acts
                .iter()
                .map(|(_, b)| metric(b, "snooze_activator_stats_streams").unwrap_or(-1.0))
                .collect();
            let want_streams = ops.len() as f64;
            if leaders == want_leaders
                && !acts.is_empty()
                && streams.iter().all(|s| *s == want_streams)
            {
                Ok(ops
                    .iter()
                    .map(|(p, b)| (p.clone(), metric(b, "snooze_operator_tasks").unwrap_or(0.0)))
                    .collect::<Vec<_>>())
            } else {
                Err(format!("leaders {leaders}, activator streams {streams:?}"))
            }
        }
    };
    wait_for("one leader streaming from every activator", T, || {
        settled(1)
    })
    .await;
    let mut tasks: std::collections::BTreeMap<String, Vec<(bool, f64)>> = Default::default();
    let t0 = Instant::now();
    for round in 0..rounds {
        // Another holder takes the lease: the leader steps down, its term ends.
        set_lease_holder(&leases, Some("e2e-thief")).await;
        let followers = wait_for("no leader, one stream per operator", T, || settled(0)).await;
        // Released: a replica leads again, with one stream per activator.
        set_lease_holder(&leases, None).await;
        let leading = wait_for("a leader again", T, || settled(1)).await;
        let ops = scrape(&client, "operator", 9091).await;
        for (pod, n) in followers {
            tasks.entry(pod).or_default().push((false, n));
        }
        for (pod, n) in leading {
            let leader = ops
                .iter()
                .any(|(p, b)| *p == pod && metric(b, "snooze_operator_leader") == Some(1.0));
            tasks.entry(pod).or_default().push((leader, n));
        }
        eprintln!(
            "round {round}: lease lost and taken again ({:?} so far)",
            t0.elapsed()
        );
    }
    // Each pod's task count, in the same role, comes back to where it was: a term that
    // left one task behind would add 1 per term it led (about 5 between the medians).
    for (pod, samples) in &tasks {
        for role in [false, true] {
            let seen: Vec<f64> = samples
                .iter()
                .filter(|(l, _)| *l == role)
                .map(|(_, n)| *n)
                .collect();
            if seen.len() < 4 {
                continue;
            }
            // One sample can catch a term's tasks still starting or stopping (a term
            // ends asynchronously): the medians of the first and second half compare.
            let median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let half = seen.len() / 2;
            let (first, last) = (median(&seen[..half]), median(&seen[half..]));
            eprintln!(
                "{pod} {}: tasks {seen:?}, medians {first} -> {last}",
                if role { "leading" } else { "following" }
            );
            assert!(
                last - first <= 4.0,
                "{pod} grew from {first} to {last} tasks over {} terms ({})",
                seen.len(),
                if role { "leading" } else { "following" }
            );
        }
    }
}
