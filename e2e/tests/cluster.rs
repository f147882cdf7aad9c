//! Smoke tests of the local cluster itself: the real control plane with the snooze
//! node agent as kubelet. Run by ./test.sh (they need the cluster and its network
//! namespace, hence `#[ignore]` for a plain `cargo test`).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn deployment_runs_serves_and_scales_to_zero() {
    in_namespace("smoke", |client, ns| async move {
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        deploys
            .create(&pp, &testapp_deployment("web", 2, &[]))
            .await
            .unwrap();
        services.create(&pp, &testapp_service("web")).await.unwrap();

        // The Deployment reaches Ready: both replicas available.
        wait_for("deployment web available", T, || async {
            let d = deploys.get("web").await.map_err(|e| e.to_string())?;
            let avail = d
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            (avail == 2)
                .then_some(())
                .ok_or(format!("available={avail}"))
        })
        .await;
        let ready = ready_pods(&pods, "app=web").await.unwrap();
        assert_eq!(ready.len(), 2, "{ready:?}");
        let ips: Vec<String> = ready.iter().map(|(_, ip)| ip.clone()).collect();
        assert_ne!(ips[0], ips[1], "every pod has its own IP");

        // The EndpointSlice controller lists both pod IPs, ready.
        wait_for("endpointslice with both pod IPs", T, || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .map_err(|e| e.to_string())?;
            let mut found: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.clone())
                .collect();
            found.sort();
            let mut want = ips.clone();
            want.sort();
            (found == want)
                .then_some(())
                .ok_or(format!("slice has {found:?}, pods {want:?}"))
        })
        .await;

        // Every pod IP answers, and each answers as itself.
        for (name, ip) in &ready {
            let (status, body) = http_get(&format!("http://{ip}:8080/"), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert_eq!(body.trim(), format!("hello from {name}"));
        }

        // Scale to 0 through the /scale subresource: processes stop, pods go away.
        let scale = json!({"spec": {"replicas": 0}});
        deploys
            .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
            .await
            .unwrap();
        wait_for("pods of web gone", T, || async {
            let n = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            (n == 0).then_some(()).ok_or(format!("{n} pods left"))
        })
        .await;
        for ip in &ips {
            let r = http_get(&format!("http://{ip}:8080/"), Duration::from_secs(2)).await;
            assert!(r.is_err(), "the process at {ip} still answers: {r:?}");
        }
    })
    .await;
}

fn pod_with(name: &str, sa: Option<&str>, containers: serde_json::Value) -> Pod {
    let mut spec = json!({"containers": containers, "terminationGracePeriodSeconds": 2});
    if let Some(sa) = sa {
        spec["serviceAccountName"] = json!(sa);
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}),
    )
    .unwrap()
}

fn app_container(name: &str, image: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "name": name,
        "image": image,
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
    })
}

async fn container_status(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
) -> Result<k8s_openapi::api::core::v1::ContainerStatus, String> {
    let p = pods.get(pod).await.map_err(|e| e.to_string())?;
    p.status
        .and_then(|s| s.container_statuses)
        .into_iter()
        .flatten()
        .find(|c| c.name == container)
        .ok_or_else(|| "no container status yet".to_string())
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn service_account_token_is_real_and_rbac_is_enforced() {
    in_namespace("rbac", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        sas.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "limited"}})).unwrap())
            .await
            .unwrap();
        pods.create(&pp, &pod_with("api", Some("limited"), json!([app_container("app", TESTAPP_IMAGE, &["--port", "8080"])])))
            .await
            .unwrap();
        let ip = wait_for("pod api ready", T, || async {
            let r = ready_pods(&pods, "app=api").await?;
            r.first().map(|(_, ip)| ip.clone()).ok_or("not ready".to_string())
        })
        .await;

        // The ServiceAccount has no permission: the API server denies the list.
        let (status, body) = http_get(&format!("http://{ip}:8080/api-check"), Duration::from_secs(10)).await.unwrap();
        assert_eq!(status, 403, "{body}");
        assert!(body.contains(&format!("system:serviceaccount:{ns}:limited")), "{body}");

        // Granting it through RBAC makes the same call succeed.
        let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), &ns);
        let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(client.clone(), &ns);
        roles.create(&pp, &serde_json::from_value(json!({
            "metadata": {"name": "list-pods"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        })).unwrap()).await.unwrap();
        bindings.create(&pp, &serde_json::from_value(json!({
            "metadata": {"name": "list-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "list-pods"},
            "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": ns}],
        })).unwrap()).await.unwrap();
        wait_for("list allowed after the RoleBinding", T, || async {
            let (status, body) = http_get(&format!("http://{ip}:8080/api-check"), Duration::from_secs(10)).await?;
            (status == 200 && body.starts_with("allowed")).then_some(()).ok_or(format!("{status} {body}"))
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn image_without_mapping_waits_with_a_reason() {
    in_namespace("noimage", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.create(
            &PostParams::default(),
            &pod_with(
                "ghost",
                None,
                json!([app_container("app", "example.com/not/mapped:1", &[])]),
            ),
        )
        .await
        .unwrap();
        let waiting = wait_for("ErrImagePull", T, || async {
            let c = container_status(&pods, "ghost", "app").await?;
            let w = c.state.and_then(|s| s.waiting).ok_or("not waiting")?;
            match w.reason.as_deref() {
                Some("ErrImagePull") | Some("ImagePullBackOff") => Ok(w),
                r => Err(format!("reason {r:?}")),
            }
        })
        .await;
        let msg = waiting.message.unwrap_or_default();
        assert!(
            msg.contains("example.com/not/mapped:1") && msg.contains("no mapping"),
            "{msg}"
        );
        let p = pods.get("ghost").await.unwrap();
        assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn crashing_container_restarts_with_back_off() {
    in_namespace("crash", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.create(
            &PostParams::default(),
            &pod_with(
                "crash",
                None,
                json!([app_container("app", TESTAPP_IMAGE, &["--crash-with", "3"])]),
            ),
        )
        .await
        .unwrap();
        let c = wait_for("CrashLoopBackOff after a restart", T, || async {
            let c = container_status(&pods, "crash", "app").await?;
            let reason = c
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone());
            (c.restart_count >= 1 && reason.as_deref() == Some("CrashLoopBackOff"))
                .then_some(c.clone())
                .ok_or(format!("restarts={} reason={reason:?}", c.restart_count))
        })
        .await;
        let last = c
            .last_state
            .and_then(|s| s.terminated)
            .expect("lastState.terminated");
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert!(
            last.message
                .unwrap_or_default()
                .contains("crashing on purpose")
        );
        let msg = c
            .state
            .and_then(|s| s.waiting)
            .and_then(|w| w.message)
            .unwrap_or_default();
        assert!(
            msg.starts_with("back-off 20s") || msg.starts_with("back-off 10s"),
            "{msg}"
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn port_in_use_fails_the_container_with_a_clear_message() {
    in_namespace("port", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // Two containers of one pod share its network: the second cannot bind 8080.
        let mut second = app_container(
            "second",
            TESTAPP_IMAGE,
            &["--port", "8080", "--startup-delay-ms", "1500"],
        );
        second.as_object_mut().unwrap().remove("readinessProbe");
        pods.create(
            &PostParams::default(),
            &pod_with(
                "twins",
                None,
                json!([
                    app_container("first", TESTAPP_IMAGE, &["--port", "8080"]),
                    second
                ]),
            ),
        )
        .await
        .unwrap();
        let t = wait_for("second container terminated", T, || async {
            let c = container_status(&pods, "twins", "second").await?;
            c.last_state
                .and_then(|s| s.terminated)
                .or(c.state.and_then(|s| s.terminated))
                .ok_or("not terminated yet".to_string())
        })
        .await;
        assert_ne!(t.exit_code, 0);
        let msg = t.message.unwrap_or_default();
        assert!(
            msg.contains("cannot listen on") && msg.contains("in use"),
            "{msg}"
        );
        let first = container_status(&pods, "twins", "first").await.unwrap();
        assert_eq!(first.restart_count, 0);
        assert!(first.state.and_then(|s| s.running).is_some());
    })
    .await;
}
