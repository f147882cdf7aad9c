//! TCP services through Snooze on the local cluster, with the clients users have: a
//! real Redis server (Debian's `redis-server`, mapped by the node agent from the image
//! `redis:7`) asleep behind its managed Service, woken by `redis-cli`; a silent
//! connection does not hold it awake and is closed when it sleeps; a connect-and-close
//! health check wakes nothing; a real PostgreSQL (Debian's server programs as the
//! `postgres` image, initdb in the pod's start command) woken by `psql`; a TLS server
//! (`openssl s_server`) asleep behind a port with `appProtocol: https`, woken by curl's
//! ClientHello and answering it with its own certificate (passthrough); a web app that
//! needs Redis (`spec.needs`) wakes both at once, again when the pair is put to sleep
//! and woken within seconds of its last wake. Run by ./test.sh; only these:
//! `./test.sh tcp`.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use snooze_crds::ScaledService;
use snooze_e2e::testing::*;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(90);

/// A Redis Deployment at `replicas`, listening on its pod's address, ready when it
/// accepts a TCP connection; its Service's port says `appProtocol: redis`.
async fn redis(client: &kube::Client, ns: &str, replicas: i32) {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "redis", "labels": {"app": "redis"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "redis"}},
            "template": {
                "metadata": {"labels": {"app": "redis"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "redis",
                        "image": "redis:7",
                        "args": ["--bind", "$(POD_IP)", "--port", "6379", "--save", "",
                                 "--appendonly", "no", "--protected-mode", "no"],
                        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                        "ports": [{"name": "redis", "containerPort": 6379}],
                        "readinessProbe": {
                            "tcpSocket": {"port": "redis"},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }],
                },
            },
        },
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": "redis"},
        "spec": {
            "selector": {"app": "redis"},
            "ports": [{"name": "redis", "port": 6379, "targetPort": "redis", "appProtocol": "redis"}],
        },
    }))
    .unwrap();
    services.create(&PostParams::default(), &s).await.unwrap();
}

/// A ScaledService for `name` (0..=1 replicas, idle `idle`).
fn scaled(name: &str, idle: &str) -> ScaledService {
    serde_json::from_value(json!({
        "apiVersion": "snooze.dev/v1alpha1",
        "kind": "ScaledService",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"name": name},
            "service": name,
            "minReplicas": 0,
            "maxReplicas": 1,
            "idleTimeout": idle,
            "activation": {"timeout": "60s"},
        },
    }))
    .unwrap()
}

/// The managed Service's ClusterIP once every activator listens on its TCP port
/// `port` (the Service port's name).
async fn programmed(client: &kube::Client, ns: &str, name: &str, port: &str) -> String {
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), ns);
    wait_for("the TCP port programmed", T, || async {
        let ss = ssvcs.get(name).await.map_err(|e| e.to_string())?;
        let st = ss.status.ok_or("no status")?;
        let p = st.ports.first().ok_or("no port")?;
        if p.tcp.is_none() {
            return Err(format!("port not TCP: {p:?}"));
        }
        Ok(())
    })
    .await;
    let managed = format!("{name}-snooze");
    wait_for("the activators listening", T, || {
        listening_targets(client, ns, name, port)
    })
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let number = services
        .get(&managed)
        .await
        .unwrap()
        .spec
        .unwrap_or_default()
        .ports
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(port))
        .map(|p| p.port)
        .expect("the port on the managed Service");
    forwarded_cluster_ip(client, ns, &managed, number as u16).await
}

async fn redis_cli(ip: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["-h", ip, "-p", "6379"];
    all.extend_from_slice(args);
    let run = run_tool("redis-cli", &all);
    match tokio::time::timeout(Duration::from_secs(70), run).await {
        Ok(r) => r,
        Err(_) => (false, "redis-cli did not finish within 70 s".into()),
    }
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn a_sleeping_redis_is_woken_by_redis_cli_and_a_silent_connection_does_not_hold_it() {
    ensure_snooze().await;
    in_namespace("tcp-redis", |client, ns| async move {
        redis(&client, &ns, 0).await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        ssvcs
            .create(&PostParams::default(), &scaled("redis", "6s"))
            .await
            .unwrap();
        let ip = programmed(&client, &ns, "redis", "redis").await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);

        // A TCP health check (connect, close) wakes nothing.
        for _ in 0..3 {
            let c = tokio::net::TcpStream::connect((ip.as_str(), 6379))
                .await
                .unwrap();
            drop(c);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            deployment_replicas(&deploys, "redis").await.unwrap(),
            0,
            "a connect-and-close woke redis"
        );

        // The first command wakes it and is answered by Redis.
        let t0 = Instant::now();
        let (ok, out) = redis_cli(&ip, &["PING"]).await;
        assert!(
            ok && out.trim() == "PONG",
            "PING through a sleeping redis: {out}"
        );
        eprintln!("cold PING answered in {:?}", t0.elapsed());
        assert_eq!(deployment_replicas(&deploys, "redis").await.unwrap(), 1);
        let (ok, out) = redis_cli(&ip, &["SET", "greeting", "hello"]).await;
        assert!(ok && out.trim() == "OK", "SET: {out}");
        let (ok, out) = redis_cli(&ip, &["GET", "greeting"]).await;
        assert!(ok && out.trim() == "hello", "GET: {out}");

        // A connection that says nothing more (a pool's idle connection) does not hold
        // it awake: it sleeps after the idle timeout and the connection is closed.
        let mut silent = tokio::net::TcpStream::connect((ip.as_str(), 6379))
            .await
            .unwrap();
        use tokio::io::AsyncWriteExt;
        silent.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("PONG on the pooled connection")
            .unwrap();
        assert_eq!(&buf[..n], b"+PONG\r\n");
        wait_replicas(&deploys, "redis", 0, Duration::from_secs(60)).await;
        let end = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
            .await
            .expect("the idle connection closed once redis slept");
        assert!(matches!(end, Ok(0) | Err(_)), "still open: {end:?}");

        // Asleep again: the next command wakes it again (the data is gone with the pod).
        let (ok, out) = redis_cli(&ip, &["PING"]).await;
        assert!(ok && out.trim() == "PONG", "second wake: {out}");
    })
    .await;
}

/// The `Needs` condition of ScaledService `name`.
async fn needs_condition(
    ssvcs: &Api<ScaledService>,
    name: &str,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition, String> {
    let ss = ssvcs.get(name).await.map_err(|e| e.to_string())?;
    ss.status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == "Needs")
        .cloned()
        .ok_or_else(|| "no Needs condition".to_string())
}

/// When the first pod of `app` was created (whole seconds, as the API server keeps it).
async fn first_pod_created(client: &kube::Client, ns: &str, app: &str) -> i64 {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    list.items
        .iter()
        .filter_map(|p| p.metadata.creation_timestamp.as_ref())
        .map(|t| t.0.as_second())
        .min()
        .expect("a pod")
}

/// Redis and the test app `web` (started with `web_args`) asleep, each with a
/// ScaledService (idle `redis_idle` / `web_idle`), `web.spec.needs: [redis]` resolved:
/// Redis's managed ClusterIP and web's, once both are programmed.
async fn web_needing_redis(
    client: &kube::Client,
    ns: &str,
    web_args: &[&str],
    redis_idle: &str,
    web_idle: &str,
) -> (String, String) {
    redis(client, ns, 0).await;
    app(client, ns, "web", 0, web_args).await;
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    ssvcs
        .create(&pp, &scaled("redis", redis_idle))
        .await
        .unwrap();
    let mut web = serde_json::to_value(scaled("web", web_idle)).unwrap();
    web["spec"]["needs"] = json!(["redis"]);
    ssvcs
        .create(&pp, &serde_json::from_value(web).unwrap())
        .await
        .unwrap();
    let redis_ip = programmed(client, ns, "redis", "redis").await;
    wait_for("web's activators listening", T, || {
        listening_targets(client, ns, "web", "http")
    })
    .await;
    let web_ip = forwarded_cluster_ip(client, ns, "web-snooze", 80).await;
    wait_for("web's Needs condition", T, || async {
        let c = needs_condition(&ssvcs, "web").await?;
        (c.status == "True" && c.message.contains("redis"))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;
    (redis_ip, web_ip)
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn a_web_app_that_needs_redis_wakes_both_at_once_and_holds_redis_awake() {
    ensure_snooze().await;
    in_namespace("tcp-group", |client, ns| async move {
        // The web app takes 4 s to start: woken one after the other, Redis would be
        // woken only by the web app's first query, 4 s after the web app.
        let (redis_ip, web_ip) =
            web_needing_redis(&client, &ns, &["--startup-delay-ms", "4000"], "3s", "15s").await;
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);

        // One cold request to the web app, whose answer needs Redis.
        let url = format!("http://{web_ip}/redis?host={redis_ip}&port=6379");
        let t0 = Instant::now();
        let (status, body) = http_get(&url, Duration::from_secs(90)).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "+PONG\r\n"), "{body}");
        eprintln!("cold web + redis answered in {:?}", t0.elapsed());
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let web_pod = first_pod_created(&client, &ns, "web").await;
        let redis_pod = first_pod_created(&client, &ns, "redis").await;
        let gap = redis_pod - web_pod;
        assert!(
            gap.abs() <= 2,
            "redis's pod was created {gap} s after web's: woken one after the other"
        );

        // Redis (idle 3 s) stays up while the web app that needs it is awake, and says
        // who holds it.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(deployment_replicas(&deploys, "web").await.unwrap(), 1);
        assert_eq!(
            deployment_replicas(&deploys, "redis").await.unwrap(),
            1,
            "redis slept while web, which needs it, was awake"
        );
        wait_for("redis's status.neededBy", T, || async {
            let ss = ssvcs.get("redis").await.map_err(|e| e.to_string())?;
            let by = ss.status.map(|s| s.needed_by).unwrap_or_default();
            (by == ["web"]).then_some(()).ok_or(format!("{by:?}"))
        })
        .await;
        let (ok, out) = kubectl(&["get", "scaledservice", "redis", "-n", &ns]).await;
        assert!(
            ok && out.contains("NEEDED BY") && out.contains("web"),
            "{out}"
        );

        // Once the web app sleeps, so does Redis.
        wait_replicas(&deploys, "web", 0, Duration::from_secs(60)).await;
        wait_replicas(&deploys, "redis", 0, Duration::from_secs(30)).await;

        // A name that does not exist is said, not a crash.
        let patch = json!({"spec": {"needs": ["redis", "ghost"]}});
        ssvcs
            .patch(
                "web",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
        wait_for("Needs=False NeedNotFound", T, || async {
            let c = needs_condition(&ssvcs, "web").await?;
            (c.status == "False" && c.reason == "NeedNotFound" && c.message.contains("ghost"))
                .then_some(())
                .ok_or(format!("{c:?}"))
        })
        .await;
    })
    .await;
}

/// When each of `names` first asks for a replica (its Deployment's spec), polled every
/// 20 ms for up to `within`: the moment the operator's scale patch is seen.
async fn first_scaled_up(
    deploys: &Api<Deployment>,
    names: &[&str],
    within: Duration,
) -> Vec<Option<Instant>> {
    let mut seen = vec![None; names.len()];
    let t0 = Instant::now();
    while seen.iter().any(Option::is_none) && t0.elapsed() < within {
        for (i, n) in names.iter().enumerate() {
            if seen[i].is_none() && deployment_replicas(deploys, n).await.unwrap_or(0) > 0 {
                seen[i] = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// Puts `name` to sleep by hand (`snooze.dev/sleep`, as `kubectl snooze sleep` does) and
/// waits until its Deployment is at zero.
async fn sleep_now(client: &kube::Client, ns: &str, name: &str, token: &str) {
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"annotations": {snooze_crds::annotations::SLEEP: token}}});
    ssvcs
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_replicas(&deploys, name, 0, Duration::from_secs(20)).await;
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn a_group_put_to_sleep_and_woken_again_within_seconds_wakes_together() {
    ensure_snooze().await;
    in_namespace("tcp-rewake", |client, ns| async move {
        // The operator takes one wake signal per cold start (others within 5 s are the
        // same cold start). A group asleep again a few seconds after its wake starts a
        // new one: both members are woken by the next request's signal at once, not
        // later by the reconcile or the tick.
        let (redis_ip, web_ip) =
            web_needing_redis(&client, &ns, &["--startup-delay-ms", "1000"], "60s", "60s").await;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
        let url = format!("http://{web_ip}/redis?host={redis_ip}&port=6379");
        let signal_wakes = || async {
            let m = leader_metrics(&client).await?;
            m.lines()
                .find_map(|l| l.strip_prefix("snooze_operator_wake_to_patch_seconds_count "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| "no snooze_operator_wake_to_patch_seconds_count".to_string())
        };
        for round in 1..=2 {
            let before = wait_for("the leader's metrics", T, signal_wakes).await;
            let sent = Instant::now();
            let watch = first_scaled_up(&deploys, &["web", "redis"], Duration::from_secs(20));
            let (answer, seen) = tokio::join!(http_get(&url, Duration::from_secs(60)), watch);
            let (status, body) = answer.unwrap();
            assert_eq!((status, body.as_str()), (200, "+PONG\r\n"), "round {round}: {body}");
            let (Some(w), Some(r)) = (seen[0], seen[1]) else {
                panic!("round {round}: a scale-up not seen within 20 s: {seen:?}");
            };
            let ms = |t: Instant| t.saturating_duration_since(sent).as_millis();
            eprintln!("round {round}: web scaled up after {} ms, redis after {} ms", ms(w), ms(r));
            let gap = if w > r { w - r } else { r - w };
            assert!(
                gap < Duration::from_millis(700),
                "round {round}: web and redis scaled up {gap:?} apart (web {} ms, redis {} ms after the request): not woken together",
                ms(w),
                ms(r)
            );
            // Both patched on the request's own wake signal (each one observed in
            // `wake_to_patch`), not by the reconcile or tick catching up: with the
            // signal ignored the pair still wakes, ~100 ms apart, and this is what
            // tells the two apart.
            wait_for("both woken by the signal", Duration::from_secs(10), || async {
                let now = signal_wakes().await?;
                (now >= before + 2)
                    .then_some(())
                    .ok_or(format!("round {round}: {} signal wakes since the request (want 2)", now.saturating_sub(before)))
            })
            .await;
            if round == 2 {
                break;
            }
            // Both asleep again (the web app first: Redis is held while it is awake),
            // their pods gone, and the next cold request within 5 s of this wake.
            sleep_now(&client, &ns, "web", "round-1").await;
            sleep_now(&client, &ns, "redis", "round-1").await;
            wait_for("the pods gone", Duration::from_secs(20), || async {
                let n = pods.list(&Default::default()).await.map_err(|e| e.to_string())?.items.len();
                (n == 0).then_some(()).ok_or(format!("{n} pods"))
            })
            .await;
            let since = sent.elapsed();
            eprintln!("asleep again {since:?} after the first request");
            assert!(
                since < Duration::from_secs(5),
                "the group took {since:?} to sleep again: the second wake is not within 5 s of the first, which this test is about"
            );
        }
    })
    .await;
}

/// A self-signed certificate for `cn` (PEM cert, PEM key), made with openssl.
async fn self_signed(cn: &str) -> (String, String) {
    let dir = std::env::temp_dir().join(format!("snooze-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (ok, out) = run_tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "openssl req: {out}");
    let pair = (
        std::fs::read_to_string(&crt).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn a_sleeping_tls_server_is_woken_through_passthrough_and_answers_the_handshake() {
    ensure_snooze().await;
    in_namespace("tcp-tls", |client, ns| async move {
        let (crt, key) = self_signed("tls.example.com").await;
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        secrets
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "metadata": {"name": "tls"},
                    "stringData": {"tls.crt": crt, "tls.key": key},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        // openssl s_server -www: answers a GET over TLS with a status page.
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "tls", "labels": {"app": "tls"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "tls"}},
                "template": {
                    "metadata": {"labels": {"app": "tls"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 2,
                        "containers": [{
                            "name": "tls",
                            "image": "alpine/openssl:3",
                            "command": ["openssl"],
                            "args": ["s_server", "-accept", "$(POD_IP):8443", "-cert", "/certs/tls.crt",
                                     "-key", "/certs/tls.key", "-www", "-quiet"],
                            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                            "ports": [{"name": "https", "containerPort": 8443}],
                            "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": true}],
                            "readinessProbe": {"tcpSocket": {"port": "https"}, "periodSeconds": 1},
                        }],
                        "volumes": [{"name": "certs", "secret": {"secretName": "tls"}}],
                    },
                },
            },
        }))
        .unwrap();
        deploys.create(&pp, &d).await.unwrap();
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "tls"},
            "spec": {
                "selector": {"app": "tls"},
                "ports": [{"name": "https", "port": 443, "targetPort": "https", "appProtocol": "https"}],
            },
        }))
        .unwrap();
        services.create(&pp, &s).await.unwrap();
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        ssvcs.create(&pp, &scaled("tls", "30s")).await.unwrap();
        let ip = programmed(&client, &ns, "tls", "https").await;

        // curl's ClientHello wakes it and reaches the server untouched: the handshake
        // completes with the pod's certificate and the page comes back.
        let (ok, out) = run_tool(
            "curl",
            &["-sk", "--max-time", "60", "-w", "\n%{http_code} %{ssl_verify_result}",
              "--resolve", &format!("tls.example.com:443:{ip}"), "https://tls.example.com/"],
        )
        .await;
        assert!(ok && out.contains("s_server"), "{out}");
        let (ok, cert) = run_tool(
            "sh",
            &["-c", &format!("echo | openssl s_client -connect {ip}:443 -servername tls.example.com 2>/dev/null | openssl x509 -noout -subject")],
        )
        .await;
        assert!(ok && cert.contains("tls.example.com"), "{cert}");
        assert_eq!(deployment_replicas(&deploys, "tls").await.unwrap(), 1);
    })
    .await;
}

/// The uid and gid of the machine's `postgres` user (the server refuses to run as root).
fn postgres_user() -> (i64, i64) {
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("running id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .expect("a postgres user (the preflight installs postgresql)")
    };
    (id("-u"), id("-g"))
}

#[tokio::test]
#[ignore = "needs the local cluster: ./test.sh"]
async fn a_sleeping_postgresql_is_woken_by_psql() {
    ensure_snooze().await;
    in_namespace("tcp-pg", |client, ns| async move {
        let (uid, gid) = postgres_user();
        // As the official image is used (POSTGRES_HOST_AUTH_METHOD=trust): initdb in
        // the pod's start command, clients from any address, then the server.
        let start = r#"export PGDATA=/var/lib/postgresql/data/pgdata && initdb -D "$PGDATA" -U postgres --auth=trust >/dev/null && echo "host all all all trust" >> "$PGDATA/pg_hba.conf" && exec postgres -D "$PGDATA" -k "$PGDATA" -c listen_addresses="$POD_IP" -p 5432"#;
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "db", "labels": {"app": "db"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "db"}},
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "securityContext": {"runAsUser": uid, "runAsGroup": gid, "runAsNonRoot": true},
                        "volumes": [{"name": "data", "emptyDir": {}}],
                        "containers": [{
                            "name": "postgres",
                            "image": "postgres:15",
                            "command": ["sh", "-c", start],
                            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                            "ports": [{"name": "postgres", "containerPort": 5432}],
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                            // PostgreSQL accepts connections before it can serve
                            // them ("the database system is starting up"): a
                            // tcpSocket probe would pass too early, for the kubelet
                            // and the activator alike. pg_isready says when it can
                            // (an exec probe: held connections wait for the kubelet).
                            "readinessProbe": {
                                "exec": {"command": ["sh", "-c", "pg_isready -q -h \"$POD_IP\" -p 5432"]},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                        }],
                    },
                },
            },
        }))
        .unwrap();
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        deploys.create(&PostParams::default(), &d).await.unwrap();
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {
                "selector": {"app": "db"},
                "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres",
                           "appProtocol": "postgresql"}],
            },
        }))
        .unwrap();
        services.create(&PostParams::default(), &s).await.unwrap();
        let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
        ssvcs
            .create(&PostParams::default(), &scaled("db", "8s"))
            .await
            .unwrap();
        let ip = programmed(&client, &ns, "db", "postgres").await;
        assert_eq!(deployment_replicas(&deploys, "db").await.unwrap(), 0);

        // psql's first bytes (its SSL request, then the startup message) wake it; the
        // query is answered once initdb and the server are done.
        let t0 = Instant::now();
        let args = [
            "-h", &ip, "-p", "5432", "-U", "postgres", "-At", "-c", "select 40 + 2",
        ];
        let psql = run_tool("psql", &args);
        let (ok, out) = tokio::time::timeout(Duration::from_secs(70), psql)
            .await
            .expect("psql finished within 70 s");
        assert!(ok && out.trim() == "42", "psql through a sleeping PostgreSQL: {out}");
        let db_alone = t0.elapsed();
        eprintln!("cold psql answered in {db_alone:?}");
        assert_eq!(deployment_replicas(&deploys, "db").await.unwrap(), 1);
        // Idle: asleep again after its idle timeout.
        wait_replicas(&deploys, "db", 0, Duration::from_secs(60)).await;

        // A group: a web app that takes 4 s to start needs the database. One cold
        // request to the web app wakes both at once: both are up in about the slowest
        // member's time, not the sum of both.
        app(&client, &ns, "web", 0, &["--startup-delay-ms", "4000"]).await;
        let mut web = serde_json::to_value(scaled("web", "30s")).unwrap();
        web["spec"]["needs"] = json!(["db"]);
        ssvcs
            .create(&PostParams::default(), &serde_json::from_value(web).unwrap())
            .await
            .unwrap();
        wait_for("web's activators listening", T, || {
            listening_targets(&client, &ns, "web", "http")
        })
        .await;
        let web_ip = forwarded_cluster_ip(&client, &ns, "web-snooze", 80).await;
        assert_eq!(deployment_replicas(&deploys, "db").await.unwrap(), 0);
        let t0 = Instant::now();
        let (status, _) = http_get(&format!("http://{web_ip}/"), Duration::from_secs(90))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let web_up = t0.elapsed();
        let (ok, out) = tokio::time::timeout(Duration::from_secs(70), run_tool("psql", &args))
            .await
            .expect("psql finished within 70 s");
        assert!(ok && out.trim() == "42", "psql after the group woke: {out}");
        let group = t0.elapsed();
        let sum = Duration::from_secs(4) + db_alone;
        eprintln!(
            "group cold start: web answered in {web_up:?}, both answered in {group:?}; members alone: web's start-up 4 s, db {db_alone:?} (sum {sum:?})"
        );
        // Woken together, the database is up by the time the slower web app answers;
        // woken one after the other (by the web app's first query), it would take its
        // own cold start after that.
        let after_web = group.saturating_sub(web_up);
        assert!(
            after_web < db_alone / 2,
            "the database answered {after_web:?} after the web app (alone it takes {db_alone:?}; the group {group:?}, the sum {sum:?}): woken one after the other"
        );
    })
    .await;
}
