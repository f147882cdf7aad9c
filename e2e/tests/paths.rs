//! The traffic paths users have, end to end on the local cluster's real add-ons:
//! kube-proxy (nftables), CoreDNS and Traefik (Ingress and Gateway API). Each test wakes
//! a sleeping service through one path and counts failures over a 0 → 1 → 0 → 1 cycle
//! under steady load; the Ingress and HTTPRoute are the repository's `examples/` files.
//! Run by ./test.sh; only these: `./test.sh paths`.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;

const T: Duration = Duration::from_secs(90);
/// The node's address (e2e/cluster/cluster.sh) and Traefik's node port
/// (e2e/cluster/addons/traefik.yaml).
const NODE_IP: &str = "10.240.0.1";
const TRAEFIK_NODE_PORT: u16 = 30080;

/// How a request reaches the managed Service `web-snooze`.
#[derive(Clone, Debug)]
enum Via {
    /// From a pod, by name: its resolv.conf → CoreDNS → the ClusterIP → kube-proxy.
    Pod { client: String, host: String },
    /// From outside the pods, to the node's address and the Service's node port.
    NodePort { addr: String },
    /// Through Traefik (its node port) with the virtual host of the Ingress/HTTPRoute.
    Traefik { host: String },
}

impl Via {
    async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let t = Duration::from_secs(60);
        match self {
            Via::Pod { client, host } => {
                let url = format!("http://{client}/fetch?host={host}&port=80&path={path}");
                http_get(&url, t).await
            }
            Via::NodePort { addr } => http_get(&format!("http://{addr}{path}"), t).await,
            Via::Traefik { host } => {
                let url = format!("http://{NODE_IP}:{TRAEFIK_NODE_PORT}{path}");
                let (status, _, body) = http_get_as(&url, Some(host), t).await?;
                Ok((status, body))
            }
        }
    }
}

/// `web` at 0 replicas with a ScaledService (idle 3 s, up to 3 replicas) that answers
/// `/healthz` itself while asleep (so a test can see a path is programmed without
/// waking anything), its managed Service of `service_type`.
async fn sleeping_web(client: &kube::Client, ns: &str, service_type: &str) {
    app(client, ns, "web", 0, &[]).await;
    let mut ss = serde_json::to_value(scaled_service("web", 0, 3, "3s")).unwrap();
    ss["spec"]["activation"]["answerWhileAsleep"] =
        serde_json::json!([{"path": "/healthz", "body": "asleep\n"}]);
    ss["spec"]["serviceType"] = service_type.into();
    let ss: ScaledService = serde_json::from_value(ss).unwrap();
    Api::<ScaledService>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ss)
        .await
        .unwrap();
}

/// An example file of the repository, made to fit the test's namespace: namespace
/// `shop` → `ns`, host `shop.example.com` → `<ns>.example.com` (tests run side by side
/// on one Traefik), the Gateway `my-gateway` in `infra` → the cluster's `traefik/traefik`.
fn example(file: &str, ns: &str) -> String {
    let path = repo_path("examples/") + file;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.replace("namespace: shop", &format!("namespace: {ns}"))
        .replace("shop.example.com", &format!("{ns}.example.com"))
        .replace("name: my-gateway", "name: traefik")
        .replace("namespace: infra", "namespace: traefik")
}

async fn apply(ns: &str, what: &str, yaml: &str) {
    let file = std::env::temp_dir().join(format!("{ns}-{what}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", file.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&file);
    assert!(ok, "kubectl apply {what}: {out}");
}

/// Waits until `via` reaches the activators: `/healthz` answered by them while asleep.
async fn wait_programmed(via: &Via, deploys: &Api<Deployment>) {
    wait_for(&format!("{via:?} answered by the activator"), T, || async {
        match via.get("/healthz").await {
            Ok((200, b)) if b == "asleep\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        deployment_replicas(deploys, "web").await.unwrap(),
        0,
        "a health check through {via:?} woke web"
    );
}

/// Sends a GET every 100 ms for `dur` through `via`, starting while `web` is asleep:
/// returns the results in order and whether `web` went back to zero after waking.
async fn steady_load(
    via: &Via,
    deploys: &Api<Deployment>,
    dur: Duration,
) -> (Vec<Result<(u16, String), String>>, bool) {
    let watch = ReplicaWatch::start(deploys, "web");
    let start = Instant::now();
    let mut handles = Vec::new();
    while start.elapsed() < dur {
        let via = via.clone();
        handles.push(tokio::spawn(async move { via.get("/").await }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    let (_, dropped) = watch.finish().await;
    (results, dropped)
}

/// 0 → 1 under load (6 s, twice the idle timeout), 1 → 0 once it stops, 0 → 1 again
/// (4 s): every request answered 200 by a pod of `web`, the cold one first of all.
async fn zero_one_zero_one(via: &Via, deploys: &Api<Deployment>) {
    let mut total = 0;
    for (round, secs) in [("first wake", 6), ("second wake", 4)] {
        assert_eq!(deployment_replicas(deploys, "web").await.unwrap(), 0);
        let (results, dropped) = steady_load(via, deploys, Duration::from_secs(secs)).await;
        let failed: Vec<_> = results
            .iter()
            .filter(|r| !matches!(r, Ok((200, b)) if b.starts_with("hello from web-")))
            .collect();
        eprintln!(
            "{via:?} {round}: {} requests, {} failed",
            results.len(),
            failed.len()
        );
        assert!(
            matches!(&results[0], Ok((200, b)) if b.starts_with("hello from web-")),
            "{round}: the cold request got {:?}",
            results[0]
        );
        assert!(
            failed.is_empty(),
            "{round}: {} of {} failed: {:?}",
            failed.len(),
            results.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(!dropped, "{round}: scaled to zero under load");
        assert!(
            deployment_replicas(deploys, "web").await.unwrap() >= 1,
            "{round}: not awake"
        );
        total += results.len();
        wait_replicas(deploys, "web", 0, T).await;
    }
    assert!(total >= 80, "only {total} requests were sent");
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_pod_calling_the_managed_service_by_name_loses_nothing() {
    ensure_snooze().await;
    in_namespace("path-dns", |client, ns| async move {
        sleeping_web(&client, &ns, "ClusterIP").await;
        app(&client, &ns, "caller", 1, &[]).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let caller = wait_for("caller ready", T, || async {
            let p = ready_pods(&pods, "app=caller").await?;
            p.first()
                .map(|(_, ip)| format!("{ip}:8080"))
                .ok_or("no ready caller".to_string())
        })
        .await;
        // As the README says: http://web-snooze.<namespace> from any pod.
        let via = Via::Pod {
            client: caller.clone(),
            host: format!("web-snooze.{ns}"),
        };
        wait_programmed(&via, &deploys).await;
        // The name is the Service's ClusterIP, resolved by the cluster DNS; the short
        // name works too (the pod's search path).
        let cluster_ip = Api::<Service>::namespaced(client.clone(), &ns)
            .get("web-snooze")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.cluster_ip)
            .unwrap();
        for host in [format!("web-snooze.{ns}"), "web-snooze".to_string()] {
            let url = format!("http://{caller}/fetch?host={host}&port=80&path=/healthz");
            let (status, headers, body) = http_get_as(&url, None, T).await.unwrap();
            assert_eq!((status, body.as_str()), (200, "asleep\n"), "{host}");
            let addr = headers["x-fetch-addr"].to_str().unwrap();
            assert_eq!(
                addr,
                format!("{cluster_ip}:80"),
                "{host} resolved to {addr}"
            );
        }
        zero_one_zero_one(&via, &deploys).await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn a_client_of_the_node_port_loses_nothing() {
    ensure_snooze().await;
    in_namespace("path-nodeport", |client, ns| async move {
        sleeping_web(&client, &ns, "NodePort").await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let node_port = wait_for("web-snooze with a node port", T, || async {
            let s = services
                .get("web-snooze")
                .await
                .map_err(|e| e.to_string())?;
            let spec = s.spec.unwrap_or_default();
            (spec.type_.as_deref() == Some("NodePort"))
                .then(|| spec.ports?.first()?.node_port)
                .flatten()
                .ok_or(format!("type {:?}", spec.type_))
        })
        .await;
        let via = Via::NodePort {
            addr: format!("{NODE_IP}:{node_port}"),
        };
        wait_programmed(&via, &deploys).await;
        zero_one_zero_one(&via, &deploys).await;
    })
    .await;
}

/// `examples/<file>` applied in front of a sleeping `web`, then the cycle through Traefik.
async fn through_traefik(prefix: &str, file: &str) {
    ensure_snooze().await;
    let file = file.to_string();
    in_namespace(prefix, |client, ns| async move {
        sleeping_web(&client, &ns, "ClusterIP").await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        apply(&ns, &file, &example(&file, &ns)).await;
        let via = Via::Traefik {
            host: format!("{ns}.example.com"),
        };
        wait_programmed(&via, &deploys).await;
        zero_one_zero_one(&via, &deploys).await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn an_ingress_through_traefik_loses_nothing() {
    through_traefik("path-ingress", "ingress.yaml").await;
}

#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn an_httproute_through_traefik_loses_nothing() {
    through_traefik("path-route", "httproute.yaml").await;
}

/// The usual mistake: the Ingress keeps pointing at the app's own Service. Through it a
/// sleeping app is never woken (the ingress has no endpoint to send to), and the
/// operator says so where `kubectl describe scaledservice` shows it.
#[tokio::test]
#[ignore = "needs the local cluster: run ./test.sh"]
async fn an_ingress_at_the_apps_own_service_gets_a_readable_hint() {
    ensure_snooze().await;
    in_namespace("path-mistake", |client, ns| async move {
        // The Ingress was there before Snooze, and stays as it was.
        let wrong = example("ingress.yaml", &ns).replace("name: web-snooze", "name: web");
        assert!(wrong.contains("name: web\n"), "{wrong}");
        apply(&ns, "ingress", &wrong).await;
        sleeping_web(&client, &ns, "ClusterIP").await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        let hint = wait_for("a Warning event naming the Ingress", T, || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.kind=ScaledService"))
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("BackendBypassesSnooze"))
                .and_then(|e| e.message)
                .ok_or("none yet".to_string())
        })
        .await;
        eprintln!("hint: {hint}");
        assert!(
            hint.contains(&format!("Ingress {ns}/web")) && hint.contains("web-snooze"),
            "{hint}"
        );
        // What the user saw: Traefik has no endpoint for `web` while it sleeps (it drops
        // a router without servers: 404; with allowEmptyServices, 503), and the request
        // does not wake it.
        let via = Via::Traefik {
            host: format!("{ns}.example.com"),
        };
        let got = via.get("/").await;
        assert!(matches!(got, Ok((404 | 503, _))), "{got:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 0);
    })
    .await;
}
