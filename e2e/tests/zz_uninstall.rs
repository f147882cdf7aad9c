//! Last of the e2e runs (./test.sh runs it after the others): `helm uninstall` leaves
//! nothing of the release behind. The CRD stays, as Helm keeps the CRDs of `crds/`
//! (it would delete every ScaledService of the cluster); the README says how to remove it.

use std::time::Duration;

use snooze_e2e::testing::*;

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn helm_uninstall_leaves_nothing_behind() {
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
