//! Last of the e2e runs (./test.sh runs it after the others, one test at a time): what
//! disturbs the shared installation — replacing an activator pod — and then `helm
//! uninstall`, which leaves nothing of the release behind. The CRD stays, as Helm keeps
//! the CRDs of `crds/` (it would delete every ScaledService of the cluster); the README
//! says how to remove it.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_routing_follows_the_activator_pods() {
    ensure_snooze().await;
    in_namespace("follow", |client, ns| async move {
        scaled_app(&client, &ns, 1, 0, 2, "1h", &[]).await;
        let activators: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let ips = || async {
            let mut v: Vec<String> =
                ready_pods(&activators, "app.kubernetes.io/component=activator")
                    .await?
                    .into_iter()
                    .map(|(_, ip)| ip)
                    .collect();
            v.sort();
            Ok::<_, String>(v)
        };
        let want = wait_for("two ready activators", T, || async {
            let v = ips().await?;
            (v.len() == 2).then_some(v.clone()).ok_or(format!("{v:?}"))
        })
        .await;
        wait_for("slice lists the activators", T, || async {
            let t = ingress_targets(&client, &ns, "web", "http").await?;
            let mut got: Vec<String> = t
                .iter()
                .map(|a| a.rsplit_once(':').unwrap().0.to_string())
                .collect();
            got.sort();
            (got == want)
                .then_some(())
                .ok_or(format!("{got:?} != {want:?}"))
        })
        .await;
        // Replace one activator pod: the slice follows the new set.
        let victim = activators
            .list(&ListParams::default().labels("app.kubernetes.io/component=activator"))
            .await
            .unwrap()
            .items[0]
            .name_any();
        activators
            .delete(&victim, &DeleteParams::default())
            .await
            .unwrap();
        let start = Instant::now();
        wait_for("slice follows the replacement", T, || async {
            let now = ips().await?;
            if now.len() != 2 || now == want {
                return Err(format!("activators {now:?}"));
            }
            let t = ingress_targets(&client, &ns, "web", "http").await?;
            let mut got: Vec<String> = t
                .iter()
                .map(|a| a.rsplit_once(':').unwrap().0.to_string())
                .collect();
            // Sorted like `now`: the slice's order is not the strings' (….16 and ….160).
            got.sort();
            (got == now)
                .then_some(())
                .ok_or(format!("{got:?} != {now:?}"))
        })
        .await;
        eprintln!(
            "activator replaced; slice updated {} ms after the delete call",
            start.elapsed().as_millis()
        );
        // Traffic through every listed activator works.
        for t in listening_targets(&client, &ns, "web", "http")
            .await
            .unwrap()
        {
            let (s, _) = http_get(&format!("http://{t}/"), Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(s, 200);
        }
    })
    .await;
}

/// A tenant cannot take every connection an activator has: at its cap
/// (`activator.maxConnections`, here 50; by default half the open-file limit less
/// 2,048) it stops accepting, a new client waits in the kernel's accept queue and is
/// served as soon as a connection closes. Here because it rolls the activators with
/// another value (the next test uninstalls the release).
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn ab_at_an_activators_connection_cap_a_new_client_waits_and_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ensure_snooze().await;
    install_snooze(&["activator.maxConnections=50"]).await;
    in_namespace("cap", |client, ns| async move {
        scaled_app(&client, &ns, 1, 1, 1, "1h", &[]).await;
        let targets = wait_for("web's activators listening", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let target = targets[0].clone();
        // 50 connections with a request each, answered and kept alive (the fast path
        // keeps a kept-alive connection for the header timeout, 10 s).
        let mut kept = Vec::new();
        for _ in 0..50 {
            let mut s = tokio::net::TcpStream::connect(&target).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("answered within 5 s (under the cap)")
                .unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            kept.push(s);
        }
        // The 51st: connected (the kernel's queue) but not served while the 50 stay.
        let url = format!("http://{target}/");
        let t0 = Instant::now();
        let next = tokio::spawn(async move { http_get(&url, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!next.is_finished(), "served over the cap");
        // One closes: it is served.
        drop(kept.pop());
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("served within 5 s of a free place")
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        eprintln!(
            "connection cap 50: the 51st client waited and was served {:.1?} after it connected",
            t0.elapsed()
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn b_helm_uninstall_leaves_nothing_behind() {
    ensure_snooze().await;
    let (ok, out) = run_tool(
        "helm",
        &[
            "uninstall",
            SNOOZE_RELEASE,
            "-n",
            SNOOZE_NAMESPACE,
            "--wait",
            "--timeout",
            "120s",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let selector = format!("app.kubernetes.io/instance={SNOOZE_RELEASE}");
    wait_for("release objects gone", Duration::from_secs(90), || async {
        let (_, ns_objects) = kubectl(&[
            "get",
            "all,serviceaccounts,roles,rolebindings,leases,poddisruptionbudgets,endpointslices",
            "-n",
            SNOOZE_NAMESPACE,
            "-l",
            &selector,
            "-o",
            "name",
        ])
        .await;
        let (_, cluster_objects) = kubectl(&[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            &selector,
            "-o",
            "name",
        ])
        .await;
        let (_, pods) = kubectl(&["get", "pods", "-n", SNOOZE_NAMESPACE, "-o", "name"]).await;
        let left = format!("{ns_objects}{cluster_objects}{pods}");
        let left = left
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("No resources found"))
            .collect::<Vec<_>>()
            .join("\n");
        left.is_empty().then_some(()).ok_or(left)
    })
    .await;
    let (ok, _) = kubectl(&["get", "crd", "scaledservices.snooze.dev"]).await;
    assert!(ok, "the CRD stays (Helm keeps crds/)");
}
