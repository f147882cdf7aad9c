//! Snooze in a shared cluster (issue 26): what one tenant must not be able to do to
//! another, or to itself, through Snooze, tried on the local cluster the way a user
//! would. Run by ./test.sh.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);

/// A Service the user already had under the managed Service's name (`web-snooze`) is
/// never taken over: not patched, not owned, not deleted with the ScaledService; the
/// ScaledService says why it is not programmed (condition and Event), and scales
/// nothing meanwhile.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_service_named_like_the_managed_one_is_never_taken_over() {
    ensure_snooze().await;
    in_namespace("takeover", |client, ns| async move {
        app(&client, &ns, "web", 1, &[]).await;
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        // The user's own Service, to their own app, under the name Snooze would use.
        let theirs = services
            .create(&PostParams::default(), &testapp_service("web-snooze"))
            .await
            .unwrap();
        ssvcs
            .create(&PostParams::default(), &scaled_service("web", 0, 3, "2s"))
            .await
            .unwrap();
        let msg = wait_for("ManagedNameTaken", T, || async {
            let (r, m) = ready_reason(&ssvcs, "web").await?;
            (r == "False ManagedNameTaken")
                .then_some(m.clone())
                .ok_or(format!("{r}: {m}"))
        })
        .await;
        assert!(
            msg.contains("Service web-snooze") && msg.contains("not created by this ScaledService"),
            "{msg}"
        );
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        wait_for("a ManagedNameTaken event", T, || async {
            let n = events
                .list(&ListParams::default().fields("reason=ManagedNameTaken"))
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            (n > 0).then_some(()).ok_or("none".to_string())
        })
        .await;
        // Well past its idle timeout: the Service is as the user made it, and the
        // workload keeps its replica (nothing is programmed, nothing is scaled).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = services.get("web-snooze").await.unwrap();
        assert_eq!(
            now.metadata.resource_version,
            theirs.metadata.resource_version
        );
        assert!(now.metadata.owner_references.is_none());
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 1);

        // Deleting the ScaledService leaves the user's Service in place.
        ssvcs.delete("web", &DeleteParams::default()).await.unwrap();
        wait_scaled_service_gone(&ssvcs, "web", T).await;
        let after = services
            .get_opt("web-snooze")
            .await
            .unwrap()
            .expect("the user's Service stays");
        assert_eq!(after.metadata.uid, theirs.metadata.uid);
    })
    .await;
}

/// A selector-less Service with a hand-written EndpointSlice, labelled as the
/// EndpointSlice controller's (anyone who may write slices in their namespace can),
/// naming another tenant's pod: Snooze routes nothing to it. The ScaledService says
/// why, and no managed Service is made for it.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_forged_endpoint_slice_never_makes_snooze_a_proxy_to_another_tenant() {
    ensure_snooze().await;
    in_namespace("victim", |client, victim_ns| async move {
        // Another team's pod.
        app(&client, &victim_ns, "db", 1, &[]).await;
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(client.clone(), &victim_ns);
        let victim = wait_for("the victim's pod ready", T, || async {
            let p = ready_pods(&pods, "app=db").await?;
            p.into_iter().next().ok_or("none ready".to_string())
        })
        .await;
        in_namespace("forger", move |client, ns| async move {
            let services: Api<Service> = Api::namespaced(client.clone(), &ns);
            let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let pp = PostParams::default();
            deploys
                .create(&pp, &testapp_deployment("web", 0, &[]))
                .await
                .unwrap();
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            }))
            .unwrap();
            services.create(&pp, &svc).await.unwrap();
            let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                Api::namespaced(client.clone(), &ns);
            let forged = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-forged", "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                }},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": [victim.1], "conditions": {"ready": true}},
                    {"addresses": [victim.1], "conditions": {"ready": true},
                     "targetRef": {"kind": "Pod", "name": victim.0, "namespace": victim_ns}},
                ],
            }))
            .unwrap();
            slices.create(&pp, &forged).await.unwrap();
            let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
            ssvcs
                .create(&pp, &scaled_service("web", 0, 1, "1h"))
                .await
                .unwrap();
            let msg = wait_for("ServiceWithoutSelector", T, || async {
                let (r, m) = ready_reason(&ssvcs, "web").await?;
                (r == "False ServiceWithoutSelector")
                    .then_some(m.clone())
                    .ok_or(format!("{r}: {m}"))
            })
            .await;
            assert!(msg.contains("has no selector"), "{msg}");
            // Nothing routes through Snooze: no managed Service, no activator port.
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(services.get_opt("web-snooze").await.unwrap().is_none());
            let ss = ssvcs.get("web").await.unwrap();
            assert!(
                ss.status.map(|s| s.ports.is_empty()).unwrap_or(true),
                "an activator port was assigned"
            );
        })
        .await;
    })
    .await;
}

/// The status line of `GET path` on `addr`, with an `Authorization` header when given
/// (only the head is read: an allowed stats stream never ends).
async fn status_of(addr: &str, path: &str, bearer: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = bearer
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.lines().next().unwrap_or_default().to_string()
}

/// The most stats streams any operator pod says it has open (the leader's: one per
/// activator).
async fn stats_streams(system: &Api<k8s_openapi::api::core::v1::Pod>) -> Result<f64, String> {
    let ops = ready_pods(system, "app.kubernetes.io/component=operator").await?;
    let mut best = 0.0f64;
    for (_, ip) in &ops {
        let (_, body) =
            scrape(&format!("http://{ip}:9091/metrics"), Duration::from_secs(5)).await?;
        for l in body
            .lines()
            .filter(|l| l.starts_with("snooze_operator_stats_streams"))
        {
            if let Some(v) = l.split_whitespace().last().and_then(|v| v.parse().ok()) {
                best = best.max(v);
            }
        }
    }
    Ok(best)
}

/// Only the operator reads the activators' stats stream (every tenant's services,
/// counts and ports): no token is 401, another ServiceAccount's token made for the
/// activators' audience is 403; the probes' paths stay open; and the operator's own
/// streams are up.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn the_stats_stream_is_for_the_operator_alone() {
    ensure_snooze().await;
    in_namespace("snoop", |client, ns| async move {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let activators = wait_for("ready activators", T, || async {
            let p = ready_pods(&pods, "app.kubernetes.io/component=activator").await?;
            (!p.is_empty()).then_some(p).ok_or("none".to_string())
        })
        .await;
        let (ok, token) = kubectl(&[
            "create",
            "token",
            "default",
            "-n",
            &ns,
            "--audience",
            "snooze-activator",
        ])
        .await;
        assert!(ok, "{token}");
        let token = token.trim().to_string();
        for (_, ip) in &activators {
            let addr = format!("{ip}:9090");
            let anon = status_of(&addr, "/v1/stats", None).await;
            assert!(
                anon.starts_with("HTTP/1.1 401"),
                "{addr} without a token: {anon}"
            );
            let other = status_of(&addr, "/v1/stats", Some(&token)).await;
            assert!(
                other.starts_with("HTTP/1.1 403"),
                "{addr} with {ns}/default's token: {other}"
            );
            let junk = status_of(&addr, "/v1/stats", Some("not-a-token")).await;
            assert!(junk.starts_with("HTTP/1.1 401"), "{addr} with junk: {junk}");
            for open in ["/readyz", "/livez"] {
                let st = status_of(&addr, open, None).await;
                assert!(st.starts_with("HTTP/1.1 200"), "{addr}{open}: {st}");
            }
        }
        // The operator leader streams from every activator.
        wait_for("the leader's stats streams", T, || async {
            let best = stats_streams(&pods).await?;
            (best as usize >= activators.len())
                .then_some(())
                .ok_or(format!(
                    "{best} streams for {} activators",
                    activators.len()
                ))
        })
        .await;
    })
    .await;
}

/// `/metrics` names every tenant's services and counts too: with `metrics.authorization`
/// on (the tests' install), both components serve it only to a token made for the
/// metrics audience whose user may `get` /metrics (the chart's metrics-reader role):
/// none or junk is 401, a tenant's token for another audience 401, a tenant's token for
/// the metrics audience without the role 403, the tests' reader (bound to the role) 200.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn metrics_are_for_the_readers_rbac_allows() {
    ensure_snooze().await;
    in_namespace("peek", |client, ns| async move {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let mut admins = Vec::new();
        for (component, port) in [("activator", 9090), ("operator", 9091)] {
            let p = wait_for("ready pods", T, || async {
                let p =
                    ready_pods(&pods, &format!("app.kubernetes.io/component={component}")).await?;
                (!p.is_empty()).then_some(p).ok_or("none".to_string())
            })
            .await;
            admins.extend(p.into_iter().map(|(_, ip)| format!("{ip}:{port}")));
        }
        let token = |audience: &'static str| {
            let ns = ns.clone();
            async move {
                let (ok, t) = kubectl(&[
                    "create",
                    "token",
                    "default",
                    "-n",
                    &ns,
                    "--audience",
                    audience,
                ])
                .await;
                assert!(ok, "{t}");
                t.trim().to_string()
            }
        };
        let tenant_metrics = token("snooze-metrics").await;
        let tenant_stats = token("snooze-activator").await;
        let reader = metrics_token().await;
        for addr in &admins {
            let cases = [
                (None, "401", "without a token"),
                (Some("not-a-token"), "401", "with junk"),
                (
                    Some(tenant_stats.as_str()),
                    "401",
                    "with a tenant's token for the stats audience",
                ),
                (
                    Some(tenant_metrics.as_str()),
                    "403",
                    "with a tenant's token, no role",
                ),
                (Some(reader.as_str()), "200", "with the reader's token"),
            ];
            for (bearer, want, what) in cases {
                let st = status_of(addr, "/metrics", bearer).await;
                assert!(
                    st.starts_with(&format!("HTTP/1.1 {want}")),
                    "{addr}/metrics {what}: {st}"
                );
            }
            for open in ["/readyz", "/livez"] {
                let st = status_of(addr, open, None).await;
                assert!(st.starts_with("HTTP/1.1 200"), "{addr}{open}: {st}");
            }
        }
    })
    .await;
}

/// A tenant's pod floods an activator's admin port with clients that never finish a
/// request head: the per-address bound (64) closes the rest at once, `/readyz` stays
/// answered at once for everyone else, and the activators stay Ready (the kubelet
/// probes from the node's address) and serve the operator's stats streams.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_tenants_flood_of_slow_clients_leaves_the_admin_port_answering() {
    ensure_snooze().await;
    in_namespace("slowloris", |client, ns| async move {
        app(&client, &ns, "attacker", 1, &[]).await;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
        let attacker = wait_for("the attacker's pod ready", T, || async {
            let p = ready_pods(&pods, "app=attacker").await?;
            p.first()
                .map(|(_, ip)| ip.clone())
                .ok_or("none".to_string())
        })
        .await;
        let system: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
        let activators = wait_for("two ready activators", T, || async {
            let p = ready_pods(&system, "app.kubernetes.io/component=activator").await?;
            (p.len() == 2).then_some(p.clone()).ok_or(format!("{p:?}"))
        })
        .await;
        let target = format!("{}:9090", activators[0].1);
        // 2,000 slow clients from the attacker's pod, held 3 s (under the 5 s head
        // timeout, which cuts them all after).
        // From the pod's own address, as a pod's traffic is in a real cluster (the local
        // cluster's pods share one network namespace, where the kernel would pick the
        // activator's own address as the source for every local client alike).
        let url = format!(
            "http://{attacker}:8080/slow-clients?addr={target}&n=2000&hold_ms=3000&from={attacker}"
        );
        let flood = tokio::spawn(async move { http_get(&url, Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Meanwhile: /readyz from here, 20 times, and the activators' Ready condition.
        let mut lat = Vec::new();
        for _ in 0..20 {
            let t0 = std::time::Instant::now();
            let st = status_of(&target, "/readyz", None).await;
            lat.push(t0.elapsed());
            assert!(
                st.starts_with("HTTP/1.1 200"),
                "/readyz during the flood: {st}"
            );
            let ready = ready_pods(&system, "app.kubernetes.io/component=activator")
                .await
                .unwrap();
            assert_eq!(ready.len(), 2, "an activator went unready during the flood");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = flood.await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        let (opened, closed) = (
            v["opened"].as_u64().unwrap(),
            v["closed_by_server"].as_u64().unwrap(),
        );
        lat.sort();
        eprintln!(
            "admin flood from a tenant's pod: {opened} slow clients, {closed} closed at once by \
             the server; /readyz from elsewhere 20/20 200, p50 {:.1?} max {:.1?}; both \
             activators Ready throughout",
            lat[10], lat[19]
        );
        assert_eq!(opened, 2000, "{body}");
        assert!(
            closed >= opened - 64,
            "only {closed} of {opened} closed: the per-address bound did not hold ({body})"
        );
        // The operator's stats streams are still up on every activator.
        wait_for("the leader's stats streams", T, || async {
            let best = stats_streams(&system).await?;
            (best >= 2.0).then_some(()).ok_or(format!("{best} streams"))
        })
        .await;
    })
    .await;
}

/// One namespace cannot take the whole activator port range: over its limit (10 in
/// the tests' install, `operator.maxPortsPerNamespace`) a ScaledService is refused with
/// a reason, the ports it was being given go back, and the namespace's other
/// ScaledServices are programmed as before.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_namespace_cannot_take_more_activator_ports_than_its_limit() {
    ensure_snooze().await;
    in_namespace("portlimit", |client, ns| async move {
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        // A Service with 11 TCP ports, one more than the namespace may hold.
        app(&client, &ns, "big", 0, &[]).await;
        let ports: Vec<serde_json::Value> = (0..11)
            .map(|i| serde_json::json!({"name": format!("p{i}"), "port": 8000 + i, "targetPort": "http"}))
            .collect();
        services
            .patch(
                "big",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"ports": ports}})),
            )
            .await
            .unwrap();
        ssvcs
            .create(&PostParams::default(), &scaled_service("big", 0, 1, "5m"))
            .await
            .unwrap();
        let msg = wait_for("NamespacePortLimit", T, || async {
            let (r, m) = ready_reason(&ssvcs, "big").await?;
            (r == "False NamespacePortLimit")
                .then_some(m.clone())
                .ok_or(format!("{r}: {m}"))
        })
        .await;
        assert!(msg.contains(&format!("namespace {ns} holds 10 activator ports")), "{msg}");
        assert!(
            services.get_opt("big-snooze").await.unwrap().is_none(),
            "no managed Service for a refused ScaledService"
        );
        // The ports it was being given went back: a small one is programmed.
        app(&client, &ns, "small", 0, &[]).await;
        ssvcs
            .create(&PostParams::default(), &scaled_service("small", 0, 1, "5m"))
            .await
            .unwrap();
        wait_for("small Ready=True", T, || async {
            let (r, m) = ready_reason(&ssvcs, "small").await?;
            r.starts_with("True").then_some(()).ok_or(format!("{r}: {m}"))
        })
        .await;
    })
    .await;
}

/// `client` acting as `user` (impersonated): what a namespace's team member can do.
async fn as_user(user: &str) -> kube::Client {
    let mut config = kube::Config::infer().await.expect("kubeconfig");
    config.auth_info.impersonate = Some(user.to_string());
    kube::Client::try_from(config).expect("client")
}

/// A Role of `rules` in `ns` bound to `user`.
async fn grant(client: &kube::Client, ns: &str, user: &str, role: &str, rules: serde_json::Value) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let r: Role =
        serde_json::from_value(serde_json::json!({"metadata": {"name": role}, "rules": rules}))
            .unwrap();
    roles.create(&PostParams::default(), &r).await.unwrap();
    let b: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    bindings.create(&PostParams::default(), &b).await.unwrap();
}

/// A ScaledService whose author may not scale the workload, or make the Service type
/// asked for, is refused at apply time with a message that says which right is
/// missing (the chart's ValidatingAdmissionPolicy); with the rights, it is admitted.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn authors_cannot_do_through_snooze_what_they_may_not_do_themselves() {
    ensure_snooze().await;
    in_namespace("authors", |client, ns| async move {
        app(&client, &ns, "web", 0, &[]).await;
        // Alice may manage ScaledServices and read Deployments in her namespace, no more.
        grant(
            &client,
            &ns,
            "alice",
            "ssvc-author",
            serde_json::json!([
                {"apiGroups": ["snooze.dev"], "resources": ["scaledservices"], "verbs": ["*"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]},
            ]),
        )
        .await;
        let alice = as_user("alice").await;
        let ssvcs: Api<ScaledService> = Api::namespaced(alice.clone(), &ns);
        let refused = |r: Result<ScaledService, kube::Error>| match r {
            Err(kube::Error::Api(e)) => format!("{} {}", e.code, e.message),
            Ok(_) => "admitted".to_string(),
            Err(e) => format!("other error: {e}"),
        };
        // A new RoleBinding reaches the API server's authorizer a moment later (its
        // RBAC cache follows a watch): after each grant, the answer is asked again
        // until the right just granted is no longer the one missing (bounded).
        let create_after_grant = |ss: ScaledService, granted: &'static str| {
            let ssvcs = ssvcs.clone();
            async move {
                let start = std::time::Instant::now();
                loop {
                    let msg = refused(ssvcs.create(&PostParams::default(), &ss).await);
                    if !msg.contains(granted) || start.elapsed() > Duration::from_secs(10) {
                        return msg;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let mut ss = scaled_service("web", 0, 1, "5m");
        // The first grant too: until it reaches the authorizer, Alice may not create
        // ScaledServices at all (seen in CI: a 403 from RBAC, not from the policy).
        let msg = create_after_grant(ss.clone(), "cannot create resource").await;
        assert!(
            msg.starts_with("403") && msg.contains("you may not update the scale of Deployment web"),
            "{msg}"
        );
        // With the right to scale it: NodePort needs the right to create Services.
        grant(
            &client,
            &ns,
            "alice",
            "scaler",
            serde_json::json!([{"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "update", "patch"]}]),
        )
        .await;
        ss.spec.service_type = snooze_crds::ServiceType::NodePort;
        let msg = create_after_grant(ss.clone(), "may not update the scale").await;
        assert!(
            msg.contains("serviceType NodePort needs the right to create Services"),
            "{msg}"
        );
        // LoadBalancer is not in the allowed list (the tests allow ClusterIP and NodePort).
        grant(
            &client,
            &ns,
            "alice",
            "services",
            serde_json::json!([{"apiGroups": [""], "resources": ["services"], "verbs": ["create"]}]),
        )
        .await;
        ss.spec.service_type = snooze_crds::ServiceType::LoadBalancer;
        let msg = create_after_grant(ss.clone(), "needs the right to create Services").await;
        assert!(
            msg.contains("serviceType LoadBalancer is not allowed in this cluster"),
            "{msg}"
        );
        // Within her rights: admitted, and programmed by the operator as usual.
        ss.spec.service_type = snooze_crds::ServiceType::NodePort;
        assert_eq!(
            create_after_grant(ss.clone(), "needs the right to create Services").await,
            "admitted"
        );
        let admin: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        wait_for("web Ready=True", T, || async {
            let (r, m) = ready_reason(&admin, "web").await?;
            r.starts_with("True").then_some(()).ok_or(format!("{r}: {m}"))
        })
        .await;
    })
    .await;
}

/// A client that stops reading holds neither an activator nor its service for ever:
/// the activator cuts it after the send timeout (10 s in the tests' install,
/// `activator.sendTimeout`; 60 s by default), its request ends, and the service sleeps
/// an idle timeout later although the client never closed its connection.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_client_that_stops_reading_is_cut_and_its_service_sleeps() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ensure_snooze().await;
    in_namespace("stall", |client, ns| async move {
        let _ssvcs = scaled_app(&client, &ns, 0, 0, 1, "10s", &[]).await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        wait_for("the activators listening", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let ip = forwarded_cluster_ip(&client, &ns, "web-snooze", 80).await;
        // A client with a small receive window, asking for 64 MiB.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock
            .connect(format!("{ip}:80").parse().unwrap())
            .await
            .unwrap();
        let want: usize = 64 << 20;
        s.write_all(format!("GET /bytes?n={want} HTTP/1.1\r\nhost: web\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        // The first bytes of the answer (the service was woken), then no more reading.
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("the first bytes within 90 s")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let stalled = t0.elapsed();
        // Asleep while the connection is still open on the client's side.
        wait_replicas(&deploys, "web", 0, T).await;
        let asleep = t0.elapsed() - stalled;
        // What is left to read ends short of the body: the activator cut it.
        let mut got = n;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(k)) => got += k,
                Err(_) => panic!("the connection is still open after {got} bytes"),
            }
        }
        eprintln!(
            "stalled reader: answer started {stalled:.1?} after the request, service asleep \
             {asleep:.1?} after the client stopped reading (send timeout 10 s + idle 10 s), \
             {got} of {want} bytes read, then the connection ended"
        );
        assert!(got < want, "the whole body arrived: nothing was cut");
        assert!(
            asleep >= Duration::from_secs(18),
            "asleep {asleep:?} after the stall: before the send timeout and the idle timeout"
        );
    })
    .await;
}

/// One service's flood leaves room for another cold service on the same activator: its
/// share of held requests is clamped to the per-service ceiling
/// (`activator.maxQueuedPerService`, 5,000 by default, a quarter of the activator-wide
/// 20,000) and reported in its status; past it, its requests get 503 at once, and a
/// cold request for another service through the same activator is held and answered.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_flood_on_one_service_leaves_room_for_another_cold_service() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ensure_snooze().await;
    in_namespace("flood", |client, ns| async move {
        // `flood` never becomes ready: everything sent to it is held.
        app(&client, &ns, "flood", 0, &["--ready-delay-ms", "3600000"]).await;
        let mut flood = serde_json::to_value(scaled_service("flood", 0, 1, "30s")).unwrap();
        flood["spec"]["activation"] =
            serde_json::json!({"timeout": "120s", "maxQueuedRequests": 100000});
        let ssvcs = scaled_app(&client, &ns, 0, 0, 1, "30s", &[]).await;
        ssvcs
            .create(
                &PostParams::default(),
                &serde_json::from_value(flood).unwrap(),
            )
            .await
            .unwrap();
        let ceiling = 5000usize;
        // The share asked for (100,000 over the activators) is clamped to the ceiling.
        wait_for("flood's clamped share in its status", T, || async {
            let ss = ssvcs.get("flood").await.map_err(|e| e.to_string())?;
            let share = ss.status.and_then(|s| s.max_queued_per_activator);
            (share == Some(ceiling as i32))
                .then_some(())
                .ok_or(format!("maxQueuedPerActivator {share:?}"))
        })
        .await;
        let flood_targets = wait_for("flood's activators listening", T, || {
            listening_targets(&client, &ns, "flood", "http")
        })
        .await;
        let web_targets = wait_for("web's activators listening", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        // One activator: flood's port and web's port on the same pod.
        let target = flood_targets[0].clone();
        let pod_ip = target.rsplit_once(':').unwrap().0.to_string();
        let web_target = web_targets
            .iter()
            .find(|t| t.rsplit_once(':').unwrap().0 == pod_ip)
            .expect("web served by the same activator")
            .clone();
        // The flood: the ceiling and 100 more, all at once, each a new connection.
        let extra = 100usize;
        let t0 = std::time::Instant::now();
        let mut conns = Vec::new();
        for _ in 0..ceiling + extra {
            let target = target.clone();
            conns.push(tokio::spawn(async move {
                let c0 = std::time::Instant::now();
                let mut s = tokio::net::TcpStream::connect(&target).await.unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nhost: flood\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = vec![0u8; 256];
                // A refusal comes at once; a held request answers nothing here.
                match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let line = head.lines().next().unwrap_or("").to_string();
                        (Some((line, c0.elapsed())), s)
                    }
                    _ => (None, s),
                }
            }));
        }
        // Meanwhile, web (asleep) through the same activator.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let w0 = std::time::Instant::now();
        let (status, body) = http_get(&format!("http://{web_target}/"), T).await.unwrap();
        let web_took = w0.elapsed();
        assert_eq!(status, 200, "web's cold request during the flood: {body}");
        let mut refused = Vec::new();
        let mut held = 0usize;
        let mut other = Vec::new();
        let mut sockets = Vec::new();
        for c in conns {
            let (line, s) = c.await.unwrap();
            match line {
                Some((l, took)) if l.starts_with("HTTP/1.1 503") => refused.push(took),
                None => held += 1,
                Some((l, _)) => other.push(l),
            }
            sockets.push(s);
        }
        refused.sort();
        let at = |q: f64| {
            refused
                .get(((refused.len() as f64 * q) as usize).min(refused.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "flood: {} requests at one activator for one service (ceiling {ceiling}) in \
             {:.1?}: {held} held, {} refused with 503 (from connect: p50 {:.1?}, max {:.1?}), \
             {} other; another service's cold request through the same activator answered \
             200 in {web_took:.1?}",
            ceiling + extra,
            t0.elapsed(),
            refused.len(),
            at(0.5),
            at(1.0),
            other.len(),
        );
        let refused = refused.len();
        assert!(other.is_empty(), "{other:?}");
        assert_eq!((held, refused), (ceiling, extra));
        drop(sockets);
    })
    .await;
}
