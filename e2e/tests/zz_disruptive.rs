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
            let got: Vec<String> = t
                .iter()
                .map(|a| a.rsplit_once(':').unwrap().0.to_string())
                .collect();
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
            let got: Vec<String> = t
                .iter()
                .map(|a| a.rsplit_once(':').unwrap().0.to_string())
                .collect();
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
