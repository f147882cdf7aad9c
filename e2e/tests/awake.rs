//! "Why is it awake, when will it sleep, and can I make it now" on the local cluster,
//! with the tools users have: curl as a periodic client (an uptime checker) through the
//! managed Service, and `kubectl snooze` (this workspace's `kubectl-snooze`, found by
//! kubectl on the PATH as a plugin) to ask and to steer. Run by ./test.sh; only these:
//! `./test.sh awake`.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);

/// `kubectl snooze ARGS -n NS`, the plugin found on the PATH next to the other
/// workspace binaries (built by `cargo build --workspace --bins`).
async fn kubectl_snooze(ns: &str, args: &[&str]) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir: PathBuf = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("a target directory")
        .to_path_buf();
    assert!(
        dir.join("kubectl-snooze").exists(),
        "no kubectl-snooze in {} (cargo build --workspace --bins)",
        dir.display()
    );
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut all = vec!["snooze"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-n", ns]);
    let out = tokio::process::Command::new("kubectl")
        .args(&all)
        .env("PATH", path)
        .output()
        .await
        .expect("running kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    eprintln!("$ kubectl {}\n{text}", all.join(" "));
    (out.status.success(), text)
}

/// The managed Service's ClusterIP once an activator serves it.
async fn programmed(client: &kube::Client, ns: &str) -> String {
    wait_for("the activators listening", T, || {
        listening_targets(client, ns, "web", "http")
    })
    .await;
    forwarded_cluster_ip(client, ns, "web-snooze", 80).await
}

/// One request with curl, as an uptime checker sends it.
async fn curl(url: &str, agent: &str) -> (bool, String) {
    run_tool(
        "curl",
        &[
            "-sS",
            "-m",
            "70",
            "-A",
            agent,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ],
    )
    .await
}

fn status(ss: &ScaledService) -> snooze_crds::ScaledServiceStatus {
    ss.status.clone().unwrap_or_default()
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn the_client_that_keeps_it_awake_is_shown_and_it_sleeps_when_the_status_says() {
    ensure_snooze().await;
    in_namespace("awake-why", |client, ns| async move {
        let ssvcs = scaled_app(&client, &ns, 1, 0, 1, "20s", &[]).await;
        let ip = programmed(&client, &ns).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);

        // An uptime checker: every 2 s for 16 s (8 requests), a query string that must
        // never be shown.
        let url = format!("http://{ip}/status?token=secret");
        let mut last_sent = SystemTime::now();
        for _ in 0..8 {
            let (ok, code) = curl(&url, "uptime-checker/1.0").await;
            assert!(ok && code == "200", "curl: {code}");
            last_sent = SystemTime::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // What the status says, once it shows this client.
        let ss = wait_for("status.activity showing the checker", T, || async {
            let ss = ssvcs.get("web").await.map_err(|e| e.to_string())?;
            let st = status(&ss);
            let top = st.activity.first().ok_or("no activity")?;
            (top.user_agent.as_deref() == Some("uptime-checker/1.0"))
                .then_some(ss.clone())
                .ok_or(format!("{:?}", st.activity))
        })
        .await;
        let st = status(&ss);
        let top = &st.activity[0];
        assert_eq!(
            (top.method.as_str(), top.path.as_deref()),
            ("GET", Some("/status"))
        );
        assert!(top.count >= 1 && top.count <= 8, "{top:?}");
        assert!(!top.client.is_empty(), "{top:?}");
        let because = st.awake_because.clone().unwrap_or_default();
        assert!(
            because.contains("uptime-checker/1.0 GET /status"),
            "awakeBecause: {because}"
        );
        let (ok, why) = kubectl_snooze(&ns, &["why", "web"]).await;
        assert!(ok, "{why}");
        assert!(
            why.contains("uptime-checker/1.0")
                && why.contains("/status")
                && !why.contains("secret"),
            "kubectl snooze why: {why}"
        );
        // The column of `kubectl get ssvc -o wide`.
        let (ok, wide) = kubectl(&["get", "ssvc", "web", "-n", &ns, "-o", "wide"]).await;
        assert!(
            ok && wide.contains("AWAKE BECAUSE") && wide.contains("uptime-checker/1.0"),
            "{wide}"
        );

        // The client stopped: within half the idle timeout the status has the exact
        // last request and the time it sleeps, and it sleeps then.
        let sleeps_at = wait_for("status.sleepsAt after the last request", T, || async {
            let st = status(&ssvcs.get("web").await.map_err(|e| e.to_string())?);
            let last = st.last_request_time.as_ref().ok_or("no lastRequestTime")?;
            let last = SystemTime::from(last.0);
            let at = st.sleeps_at.as_ref().ok_or("no sleepsAt")?;
            // The status keeps whole seconds.
            if last + Duration::from_secs(1) < last_sent {
                return Err(format!("lastRequestTime {last:?} before the last request"));
            }
            Ok(SystemTime::from(at.0))
        })
        .await;
        let (ok, table) = kubectl_snooze(&ns, &["status"]).await;
        assert!(
            ok && table.contains("SLEEPS IN") && table.contains("Awake"),
            "{table}"
        );
        let expected = sleeps_at.duration_since(last_sent).unwrap_or_default();
        assert!(
            expected >= Duration::from_secs(19) && expected <= Duration::from_secs(22),
            "sleepsAt is {expected:?} after the last request (idle timeout 20s)"
        );
        wait_replicas(&deploys, "web", 0, T).await;
        let slept = SystemTime::now();
        let off = match slept.duration_since(sleeps_at) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        eprintln!("slept {off:+.1}s from status.sleepsAt");
        assert!(off.abs() <= 2.0, "slept {off:+.1}s from status.sleepsAt");
        // Asleep: nobody holds it, and nothing is listed.
        wait_for("the status of a sleeping service", T, || async {
            let st = status(&ssvcs.get("web").await.map_err(|e| e.to_string())?);
            (st.activity.is_empty() && st.awake_because.is_none() && st.sleeps_at.is_none())
                .then_some(())
                .ok_or(format!(
                    "{:?} {:?} {:?}",
                    st.activity, st.awake_because, st.sleeps_at
                ))
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn sleep_now_wake_for_and_pause_by_hand() {
    ensure_snooze().await;
    in_namespace("awake-hand", |client, ns| async move {
        let ssvcs = scaled_app(&client, &ns, 1, 0, 1, "10s", &[]).await;
        programmed(&client, &ns).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);

        // Sleep now: down at once, acknowledged; the idle timeout is not waited for.
        wait_replicas(&deploys, "web", 1, T).await;
        let (ok, out) = kubectl_snooze(&ns, &["sleep", "web"]).await;
        assert!(ok, "{out}");
        let t0 = Instant::now();
        wait_replicas(&deploys, "web", 0, Duration::from_secs(8)).await;
        eprintln!("asleep {:?} after `kubectl snooze sleep`", t0.elapsed());
        wait_for("status.handledSleep", T, || async {
            let ss = ssvcs.get("web").await.map_err(|e| e.to_string())?;
            let asked = ss
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(snooze_crds::annotations::SLEEP).cloned());
            (status(&ss).handled_sleep == asked && asked.is_some())
                .then_some(())
                .ok_or(format!("{:?}", status(&ss).handled_sleep))
        })
        .await;

        // Wake for 30 s: woken with no request, kept past its 10 s idle timeout, then
        // asleep 10 s after the 30 s.
        let (ok, out) = kubectl_snooze(&ns, &["wake", "web", "--for", "30s"]).await;
        assert!(ok, "{out}");
        let woken = Instant::now();
        wait_replicas(&deploys, "web", 1, Duration::from_secs(8)).await;
        let st = wait_for("status.awakeUntil", T, || async {
            let st = status(&ssvcs.get("web").await.map_err(|e| e.to_string())?);
            st.awake_until
                .is_some()
                .then_some(st.clone())
                .ok_or("no awakeUntil".to_string())
        })
        .await;
        assert!(
            st.awake_because
                .as_deref()
                .is_some_and(|b| b.starts_with("woken until")),
            "{:?}",
            st.awake_because
        );
        tokio::time::sleep(Duration::from_secs(25).saturating_sub(woken.elapsed())).await;
        assert_eq!(
            deployment_replicas(&deploys, "web").await.unwrap(),
            1,
            "asleep before the wake-until ended"
        );
        wait_replicas(&deploys, "web", 0, Duration::from_secs(40)).await;
        let slept = woken.elapsed();
        eprintln!("asleep {slept:?} after `kubectl snooze wake --for 30s` (idle timeout 10s)");
        assert!(
            slept >= Duration::from_secs(38) && slept <= Duration::from_secs(46),
            "asleep {slept:?} after the wake"
        );

        // Pause: the replicas set by hand stay, above maxReplicas included; resume
        // gives them back to Snooze.
        let (ok, out) = kubectl_snooze(&ns, &["pause", "web"]).await;
        assert!(ok, "{out}");
        wait_for("status.paused", T, || async {
            let st = status(&ssvcs.get("web").await.map_err(|e| e.to_string())?);
            st.paused.then_some(()).ok_or("not paused".to_string())
        })
        .await;
        let (ok, out) = kubectl(&["scale", "deployment", "web", "-n", &ns, "--replicas=2"]).await;
        assert!(ok, "{out}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            deployment_replicas(&deploys, "web").await.unwrap(),
            2,
            "Snooze changed the replicas of a paused service"
        );
        let (ok, table) = kubectl_snooze(&ns, &["status"]).await;
        assert!(ok && table.contains("Paused"), "{table}");
        let (ok, out) = kubectl_snooze(&ns, &["resume", "web"]).await;
        assert!(ok, "{out}");
        wait_for("replicas back within maxReplicas", T, || async {
            let r = deployment_replicas(&deploys, "web").await?;
            (r <= 1).then_some(()).ok_or(format!("replicas={r}"))
        })
        .await;
        // Bad input is said, not acted on.
        let (ok, out) = kubectl_snooze(&ns, &["wake", "web", "--for", "soon"]).await;
        assert!(!ok && out.contains("--for"), "{out}");
        let (ok, out) = kubectl_snooze(&ns, &["why", "nothere"]).await;
        assert!(!ok && out.contains("not found"), "{out}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn the_default_roles_let_editors_steer_and_viewers_read() {
    ensure_snooze().await;
    in_namespace("awake-rbac", |_client, ns| async move {
        for (sa, role) in [("dev", "edit"), ("auditor", "view")] {
            let (ok, out) = kubectl(&["create", "serviceaccount", sa, "-n", &ns]).await;
            assert!(ok, "{out}");
            let binding = format!("{sa}-{role}");
            let subject = format!("{ns}:{sa}");
            let (ok, out) = kubectl(&[
                "create",
                "rolebinding",
                &binding,
                "-n",
                &ns,
                "--clusterrole",
                role,
                "--serviceaccount",
                &subject,
            ])
            .await;
            assert!(ok, "{out}");
        }
        // (user, verb, subresource, allowed): what `kubectl snooze` needs of each; the
        // status stays the operator's.
        let resource = "scaledservices.snooze.dev";
        let cases = [
            ("dev", "patch", "", "yes"),
            ("dev", "create", "", "yes"),
            ("dev", "patch", "status", "no"),
            ("auditor", "list", "", "yes"),
            ("auditor", "patch", "", "no"),
        ];
        for (sa, verb, sub, want) in cases {
            let user = format!("system:serviceaccount:{ns}:{sa}");
            // The aggregation controller fills the default roles in shortly after
            // the chart is installed.
            let sub_flag = format!("--subresource={sub}");
            let mut args = vec!["auth", "can-i", verb, resource, "-n", &ns, "--as", &user];
            if !sub.is_empty() {
                args.push(&sub_flag);
            }
            wait_for(
                &format!("{sa} {verb} {resource} {sub}: {want}"),
                T,
                || async {
                    let (_, out) = kubectl(&args).await;
                    (out.trim() == want).then_some(()).ok_or(out)
                },
            )
            .await;
        }
    })
    .await;
}
