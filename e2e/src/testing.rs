//! Helpers of the end-to-end tests: a client for the local cluster, a fresh namespace
//! per test (dumped when the test fails), bounded waits, and the test application's
//! objects.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// The image the node agent maps to the test application.
pub const TESTAPP_IMAGE: &str = "ghcr.io/snooze-sh/testapp:dev";

pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("no cluster: run the e2e tests through ./test.sh (KUBECONFIG of the local cluster)")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what` and
/// the last value it saw.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `body` in a new namespace; on failure prints the pods, their statuses and the
/// namespace's events, and the namespace is deleted either way.
pub async fn in_namespace<F, Fut>(prefix: &str, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let client = client().await;
    let suffix: u32 = rand_suffix();
    let ns = format!("{prefix}-{suffix:06x}");
    let nss: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    nss.create(&PostParams::default(), &obj)
        .await
        .expect("create namespace");
    // The ServiceAccount controller creates `default`; pods need it.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "default service account",
        Duration::from_secs(30),
        || async {
            sas.get_opt("default")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("missing".to_string())
        },
    )
    .await;

    let result = tokio::spawn(body(client.clone(), ns.clone())).await;
    if result.is_err() {
        dump(&client, &ns).await;
    }
    let _ = nss.delete(&ns, &DeleteParams::default()).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id().rotate_left(12)) & 0xff_ffff
}

/// Prints what a developer needs to see when a test fails.
pub async fn dump(client: &Client, ns: &str) {
    eprintln!("---- namespace {ns} at failure ----");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if let Ok(list) = pods.list(&ListParams::default()).await {
        for p in list {
            eprintln!(
                "pod {}: {}",
                p.name_any(),
                serde_json::to_string(&p.status).unwrap_or_default()
            );
        }
    }
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list {
            eprintln!(
                "event {} {}: {} {}",
                e.involved_object.kind.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
    }
}

/// A Deployment of the test application with a readiness probe on `/ready`.
pub fn testapp_deployment(name: &str, replicas: i32, extra_args: &[&str]) -> Deployment {
    let mut args = vec!["--port".to_string(), "8080".to_string()];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": TESTAPP_IMAGE,
                        "args": args,
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/ready", "port": "http"},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }],
                },
            },
        },
    }))
    .expect("valid deployment")
}

/// [`testapp_deployment`] with the readiness probe's `periodSeconds` set (the
/// Kubernetes default is 10; the tests' default 1).
pub fn with_readiness_period(mut d: Deployment, seconds: i32) -> Deployment {
    for c in d
        .spec
        .iter_mut()
        .flat_map(|s| s.template.spec.iter_mut())
        .flat_map(|s| s.containers.iter_mut())
    {
        if let Some(p) = c.readiness_probe.as_mut() {
            p.period_seconds = Some(seconds);
        }
    }
    d
}

/// A Service selecting `app=<name>` on port 80 → `http`.
pub fn testapp_service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }))
    .expect("valid service")
}

/// Pods matching the label `selector` that are Ready, with their IPs.
pub async fn ready_pods(pods: &Api<Pod>, selector: &str) -> Result<Vec<(String, String)>, String> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| Some((p.name_any(), p.status.as_ref()?.pod_ip.clone()?)))
        .collect())
}

/// One HTTP/1.1 GET with a deadline: status and body.
pub async fn http_get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    http_get_as(url, None, timeout)
        .await
        .map(|(status, _, body)| (status, body))
}

/// One HTTP/1.1 GET with a deadline and, when given, another `Host` than the URL's (a
/// virtual host behind an ingress): status, headers and body.
pub async fn http_get_as(
    url: &str,
    host_header: Option<&str>,
    timeout: Duration,
) -> Result<(u16, http::HeaderMap, String), String> {
    http_get_full(url, host_header, None, timeout).await
}

/// The ServiceAccount the tests read `/metrics` as (the tests' install turns
/// `metrics.authorization` on), bound to the chart's metrics-reader ClusterRole.
const SCRAPER: &str = "snooze-e2e-scraper";
static SCRAPER_TOKEN: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// A token of [`SCRAPER`]'s made for the metrics audience, as a Prometheus pod would
/// mount it (made once per test binary).
pub async fn metrics_token() -> String {
    SCRAPER_TOKEN
        .get_or_init(|| async {
            let ns = SNOOZE_NAMESPACE;
            // "already exists" is fine: another test binary made them.
            kubectl(&["create", "serviceaccount", SCRAPER, "-n", ns]).await;
            let role = format!("--clusterrole={SNOOZE_RELEASE}-metrics-reader");
            let sa = format!("--serviceaccount={ns}:{SCRAPER}");
            kubectl(&["create", "clusterrolebinding", SCRAPER, &role, &sa]).await;
            let (ok, token) = kubectl(&[
                "create",
                "token",
                SCRAPER,
                "-n",
                ns,
                "--audience",
                "snooze-metrics",
                "--duration",
                "3h",
            ])
            .await;
            assert!(ok, "kubectl create token: {token}");
            token.trim().to_string()
        })
        .await
        .clone()
}

/// `GET url` (a component's `/metrics`) with the tests' metrics reader's token.
pub async fn scrape(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let token = metrics_token().await;
    http_get_full(url, None, Some(&token), timeout)
        .await
        .map(|(status, _, body)| (status, body))
}

async fn http_get_full(
    url: &str,
    host_header: Option<&str>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, http::HeaderMap, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let fut = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let host_value = match host_header {
            Some(h) => h.to_string(),
            None => format!("{host}:{port}"),
        };
        let mut req = http::Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header("host", host_value);
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("GET {url} timed out after {timeout:?}"))?
}

/// Waits until the ScaledService `name` is gone (its finalizer done).
pub async fn wait_scaled_service_gone(
    ssvcs: &Api<snooze_crds::ScaledService>,
    name: &str,
    timeout: Duration,
) {
    wait_for("ScaledService gone", timeout, || async {
        ssvcs
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .is_none()
            .then_some(())
            .ok_or("still there".to_string())
    })
    .await
}

/// Namespace and release name the e2e tests install Snooze with.
pub const SNOOZE_NAMESPACE: &str = "snooze-system";
pub const SNOOZE_RELEASE: &str = "snooze";

static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Runs a command-line tool (kubectl, helm) and returns (success, stdout+stderr).
pub async fn run_tool(tool: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {tool}: {e} (is it on PATH? ./test.sh sets it up)"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub async fn kubectl(args: &[&str]) -> (bool, String) {
    run_tool("kubectl", args).await
}

/// A path in the repository the tests run from (`rel` from its root). Read from the
/// `CARGO_MANIFEST_DIR` cargo sets when it runs a test, not the compile-time one: two
/// checkouts that share a target directory (a CI clone and a working tree) share
/// compiled test binaries, and a baked-in path would point at the other checkout.
pub fn repo_path(rel: &str) -> String {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    format!("{dir}/../{rel}")
}

/// The Ready condition of a ScaledService: ("<status> <reason>", message).
pub async fn ready_reason(
    ssvcs: &Api<snooze_crds::ScaledService>,
    name: &str,
) -> Result<(String, String), String> {
    let ss = ssvcs.get(name).await.map_err(|e| e.to_string())?;
    let c = ss
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .ok_or("no Ready condition yet")?;
    Ok((format!("{} {}", c.status, c.reason), c.message))
}

/// The `/metrics` text of the operator that holds the leader Lease.
pub async fn leader_metrics(client: &Client) -> Result<String, String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let holder = leases
        .get("snooze-operator")
        .await
        .map_err(|e| e.to_string())?
        .spec
        .and_then(|s| s.holder_identity)
        .ok_or("no operator leader")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let ip = pods
        .get(&holder)
        .await
        .map_err(|e| e.to_string())?
        .status
        .and_then(|s| s.pod_ip)
        .ok_or("the leader has no IP")?;
    let (_, body) = scrape(&format!("http://{ip}:9091/metrics"), Duration::from_secs(5)).await?;
    Ok(body)
}

/// Installs the chart once per test binary, with the real helm, and waits until it is
/// ready.
pub async fn ensure_snooze() {
    INSTALLED
        .get_or_init(|| async { install_snooze(&[]).await })
        .await;
}

/// `helm upgrade --install` of the chart with the tests' values and `extra` (`KEY=VALUE`
/// each, after them), waiting until it is rolled out.
pub async fn install_snooze(extra: &[&str]) {
    let chart = repo_path("charts/snooze");
    let mut args = vec![
        "upgrade",
        "--install",
        SNOOZE_RELEASE,
        &chart,
        "-n",
        SNOOZE_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "180s",
        "--set",
        "logFormat=text",
        // Low, so that tenancy.rs can reach it (no other test uses more than 6 ports
        // in a namespace).
        "--set",
        "operator.maxPortsPerNamespace=10",
        // NodePort for paths.rs; LoadBalancer stays refused (tenancy.rs).
        "--set",
        "admissionPolicy.allowedServiceTypes={ClusterIP,NodePort}",
        // /metrics for authorized readers (tenancy.rs; the tests read it with
        // `scrape`, Prometheus with its own projected token).
        "--set",
        "metrics.authorization.enabled=true",
        // A stalled reader is cut sooner than the default 60 s (tenancy.rs).
        "--set",
        "activator.sendTimeout=10s",
    ];
    for e in extra {
        args.extend(["--set", e]);
    }
    let (ok, out) = run_tool("helm", &args).await;
    assert!(ok, "helm install failed:\n{out}");
}

/// Where an ingress controller would send traffic for the managed Service of a
/// ScaledService: the addresses and port of its EndpointSlice (activator pods).
pub async fn ingress_targets(
    client: &Client,
    ns: &str,
    scaled_service: &str,
    port_name: &str,
) -> Result<Vec<String>, String> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let svc = format!("{scaled_service}-snooze");
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in list.items {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                out.extend(e.addresses.iter().map(|a| format!("{a}:{port}")));
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no ready endpoints in the slice of Service {svc}"));
    }
    out.sort();
    Ok(out)
}

/// A ScaledService for the test application's Deployment and Service `name`.
pub fn scaled_service(name: &str, min: i32, max: i32, idle: &str) -> snooze_crds::ScaledService {
    serde_json::from_value(json!({
        "apiVersion": "snooze.dev/v1alpha1",
        "kind": "ScaledService",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "service": name,
            "minReplicas": min,
            "maxReplicas": max,
            "idleTimeout": idle,
            "activation": {"timeout": "60s"},
        },
    }))
    .expect("valid ScaledService")
}

/// Replicas in the Deployment's spec.
pub async fn deployment_replicas(deploys: &Api<Deployment>, name: &str) -> Result<i32, String> {
    let d = deploys.get(name).await.map_err(|e| e.to_string())?;
    Ok(d.spec.and_then(|s| s.replicas).unwrap_or(1))
}

/// Waits until the Deployment's spec asks for `want` replicas.
pub async fn wait_replicas(deploys: &Api<Deployment>, name: &str, want: i32, timeout: Duration) {
    wait_for(&format!("{name} at {want} replicas"), timeout, || async {
        let r = deployment_replicas(deploys, name).await?;
        (r == want).then_some(()).ok_or(format!("replicas={r}"))
    })
    .await;
}

/// Samples a Deployment's replicas every 200 ms while a load runs: whether it went up,
/// and whether it dropped back to zero after that.
pub struct ReplicaWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(bool, bool)>,
}

impl ReplicaWatch {
    pub fn start(deploys: &Api<Deployment>, name: &str) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (deploys, name, flag) = (deploys.clone(), name.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut went_up, mut dropped) = (false, false);
            while !flag.load(Ordering::SeqCst) {
                if let Ok(r) = deployment_replicas(&deploys, &name).await {
                    if r > 0 {
                        went_up = true;
                    } else if went_up {
                        dropped = true;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (went_up, dropped)
        });
        Self { stop, task }
    }

    /// Stops sampling: (went up, dropped to zero after going up).
    pub async fn finish(self) -> (bool, bool) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("replica sampler")
    }
}

/// The test application: a Deployment and its Service, both named `name`.
pub async fn app(client: &kube::Client, ns: &str, name: &str, replicas: i32, extra: &[&str]) {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    deploys
        .create(&pp, &testapp_deployment(name, replicas, extra))
        .await
        .unwrap();
    services.create(&pp, &testapp_service(name)).await.unwrap();
}

/// The test application `web` with its Service and a ScaledService for it.
pub async fn scaled_app(
    client: &kube::Client,
    ns: &str,
    replicas: i32,
    min: i32,
    max: i32,
    idle: &str,
    extra: &[&str],
) -> Api<snooze_crds::ScaledService> {
    app(client, ns, "web", replicas, extra).await;
    let ssvcs: Api<snooze_crds::ScaledService> = Api::namespaced(client.clone(), ns);
    ssvcs
        .create(
            &PostParams::default(),
            &scaled_service("web", min, max, idle),
        )
        .await
        .unwrap();
    ssvcs
}

/// [`ingress_targets`], checked the way an ingress would use them: every activator
/// listed in the managed EndpointSlice must accept a connection on its port at once (a
/// TCP connect only, no request, so nothing is woken). Err while the slice lists no
/// endpoint; a listed activator that refuses is a test failure (the operator lists an
/// activator only for the ports it reported listening on).
pub async fn listening_targets(
    client: &Client,
    ns: &str,
    scaled_service: &str,
    port_name: &str,
) -> Result<Vec<String>, String> {
    let targets = ingress_targets(client, ns, scaled_service, port_name).await?;
    for t in &targets {
        if let Err(e) = accepts(t).await {
            panic!("{t} is listed in the managed EndpointSlice but: {e}");
        }
    }
    Ok(targets)
}

/// The ClusterIP of Service `name`, once kube-proxy forwards `port` on it. kube-proxy
/// programs a new ClusterIP a moment after the Service appears (refused until then,
/// seen in CI on a loaded machine). A connect-and-close wakes nothing: HTTP ports wake on
/// a request, TCP ports on the first byte.
pub async fn forwarded_cluster_ip(client: &Client, ns: &str, name: &str, port: u16) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let ip = services
        .get(name)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    let addr = format!("{ip}:{port}");
    wait_for(
        "kube-proxy forwarding the ClusterIP",
        Duration::from_secs(90),
        || accepts(&addr),
    )
    .await;
    ip
}

/// Whether `addr` accepts a TCP connection within 2 s (a connect only, no request).
pub async fn accepts(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Bytes that are not an HTTP request the activator would forward.
pub fn junk() -> Vec<(&'static str, Vec<u8>)> {
    let mut oversized = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    oversized.resize(100 * 1024, b'a');
    oversized.extend_from_slice(b"\r\n\r\n");
    vec![
        (
            "a TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\x00\x01\x02\x03\x04\x05\x06\x07"
                .to_vec(),
        ),
        ("a line of junk", b"HELLO THERE\r\n".to_vec()),
        (
            "a malformed head",
            b"GET / HTTP/1.1\r\nbad header line\r\n\r\n".to_vec(),
        ),
        ("a head without Host", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("an oversized head", oversized),
    ]
}

/// A headless Chromium (Debian's chromium-headless-shell driven by Playwright,
/// `e2e/browser/waiting_page.py`, run by `snooze-browser-python` from
/// `e2e/cluster/build.sh`) loading a cold service with a waiting page. It says `PAGE
/// ...` once it shows the page and `APP <first line>` once the page's own reload landed
/// on the app; screenshots of both go to `$SNOOZE_ARTIFACTS/NAME` (default: the
/// system's temp dir, `snooze-artifacts/NAME`).
pub struct Browser {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    pub artifacts: std::path::PathBuf,
}

impl Browser {
    pub fn open(url: &str, name: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let artifacts = std::env::var("SNOOZE_ARTIFACTS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("snooze-artifacts"))
            .join(name);
        std::fs::create_dir_all(&artifacts).unwrap();
        let mut child = tokio::process::Command::new("snooze-browser-python")
            .arg(repo_path("e2e/browser/waiting_page.py"))
            .arg(url)
            .arg(&artifacts)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run snooze-browser-python (is it on the PATH? e2e/cluster/build.sh)");
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            lines,
            artifacts,
        }
    }

    /// The browser's next line (`PAGE ...`, `APP ...`), within `timeout`.
    pub async fn said(&mut self, what: &str, timeout: Duration) -> String {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser did not say {what} within {timeout:?}"))
            .unwrap()
            .unwrap_or_default();
        eprintln!("browser: {line}");
        assert!(
            line.starts_with(what),
            "expected {what}, the browser said {line:?}"
        );
        line
    }

    /// Waits for the script's end, checks it succeeded and left both screenshots.
    pub async fn finish(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the browser did not end within 30 s")
            .unwrap();
        assert!(status.success(), "the browser script failed: {status}");
        for shot in ["waiting-page.png", "app.png"] {
            let p = self.artifacts.join(shot);
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{}: {len} bytes", p.display());
        }
    }
}
