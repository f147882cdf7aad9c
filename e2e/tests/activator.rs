//! The activator's data path with real sockets: the activator library's listeners and
//! proxy in this process, the test application as real backend processes, and hyper
//! clients. No cluster needed (the endpoint events the watchers would deliver are
//! given directly).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use snooze_activator::accept::{Listeners, ServerLimits};
use snooze_activator::admit::Admission;
use snooze_activator::dispatch::pool::Pool;
use snooze_activator::dispatch::{Proxy, Route};
use snooze_activator::metrics::Metrics;
use snooze_activator::stats::StatsHub;
use snooze_activator::table::{ServiceEntry, Settings, Table};
use snooze_crds::stats::{Report, ServiceRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test application process on 127.0.0.1, killed when dropped.
struct Backend {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn backend(extra: &[&str]) -> Backend {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_snooze-testapp"))
        .arg("--listen")
        .arg(addr.to_string())
        .args(extra)
        .env("POD_NAME", format!("backend-{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start testapp");
    let b = Backend { child, addr };
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "testapp did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b
}

struct Activator {
    table: Arc<Table>,
    stats: Arc<StatsHub>,
    svc: Arc<ServiceEntry>,
    port: u16,
    listeners: Arc<Listeners>,
}

impl Activator {
    /// Requests the fast path answered (the rest went through hyper).
    fn fast_path_requests(&self) -> u64 {
        self.table.metrics.fast_path_requests.get()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set_backends(&self, backends: &[&Backend]) {
        self.svc.set_endpoints(
            backends
                .iter()
                .map(|b| (b.addr.ip(), vec![("http".to_string(), b.addr.port())]))
                .collect(),
        );
    }
}

async fn activator_with(
    settings: Settings,
    limits: ServerLimits,
    h2c: bool,
    max_total: u64,
) -> Activator {
    let metrics = Arc::new(Metrics::new());
    let table = Arc::new(Table::new(metrics, max_total));
    let stats = StatsHub::new(table.clone(), "test".into(), Duration::from_secs(1));
    let proxy = Arc::new(Proxy {
        admit: Admission {
            table: table.clone(),
            stats: stats.clone(),
        },
        pool: Pool::new(Duration::from_secs(1), 64),
        response_timeout: Duration::from_secs(30),
    });
    let listeners = Listeners::new(proxy, "127.0.0.1".parse().unwrap(), limits);
    let key = ServiceRef {
        namespace: "test".into(),
        name: "web".into(),
    };
    let svc = table.upsert(key, "web", settings);
    let port = free_port();
    let failed = listeners.sync(&[(port, route(&svc, h2c))].into()).await;
    assert!(failed.is_empty(), "{failed:?}");
    Activator {
        table,
        stats,
        svc,
        port,
        listeners,
    }
}

/// The route of a listener to `svc`'s "http" port.
fn route(svc: &Arc<ServiceEntry>, h2c: bool) -> Arc<Route> {
    Arc::new(Route {
        service: svc.clone(),
        port_name: "http".into(),
        h2c,
        tcp: None,
    })
}

async fn activator(settings: Settings) -> Activator {
    activator_with(settings, ServerLimits::default(), false, 20_000).await
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// hyper's client speaking h2c with prior knowledge.
fn h2c_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn get(url: &str) -> (StatusCode, http::HeaderMap, String) {
    get_with(url, &[]).await
}

/// A GET with these request headers.
async fn get_with(url: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn cold_request_is_held_woken_and_released_by_the_endpoint_event() {
    let a = activator(Settings::default()).await;
    let mut reports = Box::pin(a.stats.clone().stream());
    let first: Report = serde_json::from_slice(&reports.next().await.unwrap()).unwrap();
    assert!(first.full);

    let url = a.url("/");
    let req = tokio::spawn(async move { get(&url).await });
    // The wake signal goes out at once, not on the next tick.
    let wake: Report = tokio::time::timeout(Duration::from_millis(900), async {
        loop {
            let r: Report = serde_json::from_slice(&reports.next().await.unwrap()).unwrap();
            if !r.wake.is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("a wake report within 900ms");
    assert_eq!(wake.wake[0].name, "web");
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 1);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !req.is_finished(),
        "the request is held while there is no pod"
    );
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(5), req)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from backend-"), "{body}");
}

#[tokio::test]
async fn stats_report_the_open_listeners_and_each_change_at_once() {
    let a = activator(Settings::default()).await;
    let mut reports = Box::pin(a.stats.clone().stream());
    let first: Report = serde_json::from_slice(&reports.next().await.unwrap()).unwrap();
    assert!(first.full);
    assert_eq!(first.listening, Some(vec![a.port]));

    let other = a.table.upsert(
        ServiceRef {
            namespace: "test".into(),
            name: "other".into(),
        },
        "other",
        Settings::default(),
    );
    let port2 = free_port();
    let failed = a
        .listeners
        .sync(
            &[
                (a.port, route(&a.svc, false)),
                (port2, route(&other, false)),
            ]
            .into(),
        )
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    let mut want = vec![a.port, port2];
    want.sort_unstable();
    // Reported at once (the periodic report is a second away and never lists ports).
    let changed: Report = tokio::time::timeout(Duration::from_millis(500), reports.next())
        .await
        .expect("a report within 500 ms")
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(changed.listening, Some(want));
    tokio::net::TcpStream::connect(("127.0.0.1", port2))
        .await
        .expect("the reported port accepts connections");

    let failed = a
        .listeners
        .sync(&[(port2, route(&other, false))].into())
        .await;
    assert!(failed.is_empty());
    let closed: Report = tokio::time::timeout(Duration::from_millis(500), reports.next())
        .await
        .expect("a report within 500 ms")
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(closed.listening, Some(vec![port2]));
}

#[tokio::test]
async fn a_connection_left_open_on_a_removed_service_gets_503_with_a_message() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    let req = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n";
    conn.write_all(req).await.unwrap();
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // The ScaledService goes away: its listener closes, this connection stays open.
    assert!(a.listeners.sync(&Default::default()).await.is_empty());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", a.port))
            .await
            .is_err(),
        "the listener is closed"
    );
    conn.write_all(req).await.unwrap();
    let second = read_response(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
    assert!(
        second.contains(&format!("no service is configured on port {}", a.port)),
        "{second}"
    );
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    // ...and the activator closes it.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("closed by the activator")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&rest));
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw connection.
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a full response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    })
    .await
    .expect("a response within 5 s")
}

#[tokio::test]
async fn two_hundred_concurrent_requests_during_a_cold_start_all_succeed() {
    let a = activator(Settings::default()).await;
    let mut reqs = Vec::new();
    for i in 0..200 {
        let url = a.url(&format!("/?n={i}"));
        reqs.push(tokio::spawn(async move { get(&url).await }));
    }
    // All 200 are held before the pod comes up.
    let start = Instant::now();
    while a.svc.queued.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {} held",
            a.svc.queued.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = backend(&["--startup-delay-ms", "200"]).await;
    a.set_backends(&[&b]);
    let mut ok = 0;
    let mut failures = Vec::new();
    for r in reqs {
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .unwrap()
            .unwrap();
        if status == 200 {
            ok += 1;
        } else if failures.len() < 3 {
            failures.push(format!("{status} {body}"));
        }
    }
    assert_eq!(ok, 200, "{failures:?}");
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn no_pod_within_the_activation_timeout_gives_504() {
    let a = activator(Settings {
        timeout: Duration::from_millis(700),
        ..Default::default()
    })
    .await;
    let start = Instant::now();
    let (status, _, body) = get(&a.url("/")).await;
    assert_eq!(status, 504);
    assert!(start.elapsed() >= Duration::from_millis(700));
    assert!(
        body.contains("test/web") && body.contains("no ready pod after waiting 0.7s"),
        "{body}"
    );
    // One wake for one cold request, also when its wait ran out while it was parked;
    // and nothing left in the queue.
    assert_eq!(a.svc.metrics.wakes.get(), 1, "wakes for one cold request");
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn full_queue_gives_503_with_retry_after_at_once() {
    let a = activator(Settings {
        timeout: Duration::from_secs(3),
        max_queued: 5,
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let url = a.url("/");
        held.push(tokio::spawn(async move { get(&url).await.0 }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let (status, headers, body) = get(&a.url("/")).await;
    assert_eq!(status, 503);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(body.contains("too many requests waiting"), "{body}");
    // Counted for the SnoozeQueueOverflow alert: the refused one, not the held ones.
    assert_eq!(a.svc.metrics.queue_full.get(), 1);
    // An h2c request refused the same way is counted once too.
    let h2 = h2c_client();
    let resp = h2
        .request(
            Request::get(a.url("/"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("h2c request");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    assert_eq!(
        a.svc.metrics.queue_full.get(),
        2,
        "one count per refused request"
    );
    // The held ones are still served once a pod is there.
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
}

impl Activator {
    /// More services on this activator, each on a port of its own (the first
    /// service keeps its port).
    async fn add_services(&self, names: &[&str]) -> Vec<(Arc<ServiceEntry>, u16)> {
        let added: Vec<(Arc<ServiceEntry>, u16)> = names
            .iter()
            .map(|n| {
                let key = ServiceRef {
                    namespace: "other".into(),
                    name: (*n).into(),
                };
                (self.table.upsert(key, n, Settings::default()), free_port())
            })
            .collect();
        let mut desired: std::collections::HashMap<u16, Arc<Route>> =
            [(self.port, route(&self.svc, false))].into();
        for (svc, port) in &added {
            desired.insert(*port, route(svc, false));
        }
        let failed = self.listeners.sync(&desired).await;
        assert!(failed.is_empty(), "{failed:?}");
        added
    }
}

/// The activator-wide bound holds whatever the services: four services fill it at
/// their ceiling (a quarter each), and a fifth one's cold request gets 503 at once.
#[tokio::test]
async fn global_queue_bound_protects_the_activator() {
    let a = activator_with(Settings::default(), ServerLimits::default(), false, 4).await;
    let others = a.add_services(&["b", "c", "d", "e"]).await;
    let mut held = Vec::new();
    for port in std::iter::once(a.port).chain(others[..3].iter().map(|(_, p)| *p)) {
        let url = format!("http://127.0.0.1:{port}/");
        held.push(tokio::spawn(async move { get(&url).await.0 }));
    }
    let start = Instant::now();
    while a
        .table
        .queued_total
        .load(std::sync::atomic::Ordering::Relaxed)
        < 4
    {
        assert!(start.elapsed() < Duration::from_secs(5), "held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (fifth, port) = &others[3];
    assert_eq!(get(&format!("http://127.0.0.1:{port}/")).await.0, 503);
    assert_eq!(a.table.metrics.shed_global.get(), 1);
    let b = backend(&[]).await;
    let eps = vec![(b.addr.ip(), vec![("http".to_string(), b.addr.port())])];
    a.svc.set_endpoints(eps.clone());
    for (svc, _) in &others {
        svc.set_endpoints(eps.clone());
    }
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(get(&format!("http://127.0.0.1:{port}/")).await.0, 200);
    assert_eq!(fifth.metrics.queue_full.get(), 1);
    assert_eq!(
        a.table
            .queued_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_client_that_leaves_while_held_frees_its_place_and_a_bare_connect_wakes_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    let settings = Settings {
        max_queued: 1,
        ..Settings::default()
    };
    let a = activator(settings).await;
    let queued = || a.svc.queued.load(Relaxed);
    let wakes = || a.svc.metrics.wakes.get();

    // A TCP connection that sends nothing (a probe) is neither queued nor a wake.
    let probe = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((queued(), wakes()), (0, 0));
    drop(probe);

    // A request that is held, then abandoned by its client, gives its place back.
    let mut gone = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    gone.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    while queued() != 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(wakes(), 1);
    // The queue (1) is full: the next request is refused at once.
    assert_eq!(get(&a.url("/")).await.0, 503);
    drop(gone);
    let start = Instant::now();
    while queued() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the abandoned request still holds its place"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...so the next one is held and answered once a pod is there.
    let url = a.url("/");
    let next = tokio::spawn(async move { get(&url).await.0 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!next.is_finished(), "held, not refused");
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    assert_eq!(next.await.unwrap(), 200);
    assert_eq!(a.table.queued_total.load(Relaxed), 0);
}

#[tokio::test]
async fn ten_megabyte_post_during_a_cold_start_arrives_intact() {
    let a = activator(Settings::default()).await;
    let body: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let want = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let url = a.url("/echo");
    let len = body.len();
    let req = tokio::spawn(async move {
        let resp = client()
            .request(
                Request::post(url)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        (
            status,
            String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                .into_owned(),
        )
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let (status, text) = req.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(text.trim(), format!("len={len} sha256={want}"));
}

#[tokio::test]
async fn streamed_response_arrives_incrementally() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let start = Instant::now();
    let resp = client()
        .request(
            Request::get(a.url("/stream?chunks=5&interval_ms=300"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(f) = body.frame().await {
        if f.unwrap().data_ref().is_some_and(|d| !d.is_empty()) {
            arrivals.push(start.elapsed());
        }
    }
    assert!(arrivals.len() >= 5, "{arrivals:?}");
    // The first chunk is there long before the last one was written (1.2s later).
    assert!(arrivals[0] < Duration::from_millis(600), "{arrivals:?}");
    assert!(
        *arrivals.last().unwrap() >= Duration::from_millis(1100),
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn websocket_round_trip() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", a.port))
        .await
        .expect("websocket handshake through the activator");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "ping {i}"
        )))
        .await
        .unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn h2c_and_grpc_round_trip_with_trailers() {
    let a = activator_with(Settings::default(), ServerLimits::default(), true, 20_000).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let c = h2c_client();
    // A gRPC frame: uncompressed flag, length, payload.
    let payload = b"snooze";
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let req = Request::post(a.url("/snooze.test.Echo/Echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame.clone())))
        .unwrap();
    let resp = c.request(req).await.expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/grpc"
    );
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(collected.to_bytes().as_ref(), frame.as_slice());
}

#[tokio::test]
async fn refused_connection_is_retried_on_another_pod() {
    let a = activator(Settings::default()).await;
    let live = backend(&[]).await;
    let dead_port = free_port(); // nothing listens there
    a.svc.set_endpoints(vec![
        (live.addr.ip(), vec![("http".into(), live.addr.port())]),
        (
            "127.0.0.1".parse().unwrap(),
            vec![("http".into(), dead_port)],
        ),
    ]);
    for _ in 0..20 {
        let (status, _, body) = get(&a.url("/")).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn pod_dying_before_answering_gives_502_and_others_are_unaffected() {
    // A "pod" that reads the request and closes the connection without answering.
    let dying = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dying_addr = dying.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = dying.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    // One activator (one table, pool and set of listeners): a request in flight to a
    // healthy pod while another dies on the broken one.
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let url = a.url("/?delay_ms=300");
    let slow = tokio::spawn(async move { get(&url).await.0 });
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.svc.set_endpoints(vec![(
        dying_addr.ip(),
        vec![("http".into(), dying_addr.port())],
    )]);
    let (status, _, body) = get(&a.url("/")).await;
    assert_eq!(status, 502);
    assert!(body.contains("failed before answering"), "{body}");
    // The request in flight to the healthy pod is unaffected, and the same activator
    // serves the next one.
    assert_eq!(slow.await.unwrap(), 200);
    a.set_backends(&[&b]);
    let (status, _, _) = get(&a.url("/")).await;
    assert_eq!(status, 200);
}

/// A "pod" that answers the first request of each connection and keeps it open, then
/// reads the next request on it and closes without answering: a kept-alive
/// connection that its server closed just as a request was sent on it (the race every
/// connection pool meets). Returns its address and the number of connections it took.
async fn pod_closing_reused_connections() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // The next request on this connection: read, then closed unanswered.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_stale_pooled_connection_never_gives_the_client_a_502() {
    let (addr, accepted) = pod_closing_reused_connections().await;
    let a = activator(Settings::default()).await;
    a.svc
        .set_endpoints(vec![(addr.ip(), vec![("http".into(), addr.port())])]);
    // Each request on its own client connection; the activator reuses its pooled
    // connection to the pod, which the pod closes: the GET is sent again on a new one.
    for i in 0..5 {
        let r = raw(
            a.port,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "request {i}: {r}");
    }
    // 5 answers from the pod took 5 connections: each pooled one was found closed.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    // Not idempotent: a POST is not sent twice; its client is told (502).
    let r = raw(
        a.port,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502 "), "{r}");
}

/// Who keeps a service awake, as both paths record it: client, agent, method and path
/// without the query; behind a trusted proxy the client it forwarded; an
/// `answerWhileAsleep` request never listed.
#[tokio::test]
async fn each_path_records_who_sent_the_requests_that_count() {
    let b = backend(&[]).await;
    for (trusted, fast_path) in [(false, true), (false, false), (true, true), (true, false)] {
        let limits = ServerLimits {
            fast_path,
            trusted_proxies: if trusted {
                vec!["127.0.0.0/8".parse().unwrap()]
            } else {
                vec![]
            },
            ..ServerLimits::default()
        };
        let a = activator_with(Settings::default(), limits, false, 20_000).await;
        a.set_backends(&[&b]);
        a.svc.set_answers(&[snooze_crds::AsleepAnswer {
            path: "/healthz".into(),
            method: None,
            status: 200,
            body: None,
        }]);
        for _ in 0..3 {
            let (status, _, _) = get_with(
                &a.url("/orders?token=secret"),
                &[
                    ("user-agent", "uptime-checker/1.0"),
                    ("x-forwarded-for", "10.1.2.3"),
                ],
            )
            .await;
            assert_eq!(status, StatusCode::OK);
        }
        get_with(&a.url("/healthz"), &[("user-agent", "lb-check")]).await;
        let what = format!("trusted {trusted}, fast path {fast_path}");
        let activity = a.svc.stats().activity;
        assert_eq!(activity.len(), 1, "{what}: {activity:?}");
        let w = &activity[0];
        let client = if trusted { "10.1.2.3" } else { "127.0.0.1" };
        assert_eq!(
            (
                w.client.as_str(),
                w.user_agent.as_str(),
                w.method.as_str(),
                w.path.as_str(),
                w.count
            ),
            (client, "uptime-checker/1.0", "GET", "/orders", 3),
            "{what}"
        );
    }
}

#[tokio::test]
async fn host_header_is_kept_and_forwarded_headers_added() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let (_, _, text) = get_with(
        &a.url("/headers"),
        &[
            ("host", "shop.example.com"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
        ],
    )
    .await;
    assert!(text.contains("host: shop.example.com"), "{text}");
    assert!(text.contains("x-forwarded-for: 127.0.0.1"), "{text}");
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    assert!(!text.contains("x-drop-me"), "{text}");

    // A request that already went through a proxy, with hop-by-hop headers but no
    // `Connection`, on both paths: from a client that is not a trusted proxy, the
    // forwarded fields are replaced (a client cannot pass for another address); from a
    // trusted proxy (`--trusted-proxies`) the chain grows and `-Proto` is kept.
    // `TE` other than `trailers` and `Keep-Alive` go either way.
    for (trusted, fast_path) in [(false, true), (false, false), (true, true), (true, false)] {
        let limits = ServerLimits {
            fast_path,
            trusted_proxies: if trusted {
                vec!["127.0.0.0/8".parse().unwrap()]
            } else {
                vec![]
            },
            ..ServerLimits::default()
        };
        let a = activator_with(Settings::default(), limits, false, 20_000).await;
        a.set_backends(&[&b]);
        let (_, _, text) = get_with(
            &a.url("/headers"),
            &[
                ("x-forwarded-for", "10.1.2.3"),
                ("x-forwarded-proto", "https"),
                ("te", "gzip"),
                ("keep-alive", "timeout=5"),
            ],
        )
        .await;
        let (xff, proto) = if trusted {
            (
                "x-forwarded-for: 10.1.2.3, 127.0.0.1",
                "x-forwarded-proto: https",
            )
        } else {
            ("x-forwarded-for: 127.0.0.1", "x-forwarded-proto: http")
        };
        let what = format!("trusted {trusted}, fast path {fast_path}: {text}");
        assert!(text.lines().any(|l| l == xff), "{what}");
        assert!(text.lines().any(|l| l == proto), "{what}");
        assert_eq!(text.matches("x-forwarded-for").count(), 1, "{what}");
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("te:") || l.starts_with("keep-alive:")),
            "{what}"
        );
    }
}

async fn raw(port: u16, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn bad_input_gets_400_431_and_slow_headers_are_cut() {
    let a = activator_with(
        Settings::default(),
        ServerLimits {
            header_read_timeout: Duration::from_millis(500),
            max_header_bytes: 8192,
            ..Default::default()
        },
        false,
        20_000,
    )
    .await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let malformed = raw(a.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let too_large = raw(a.port, big.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");

    // A client that never finishes its headers is disconnected after the timeout.
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection still open after 5s");
    assert!(start.elapsed() >= Duration::from_millis(450));
    // The activator still serves.
    assert_eq!(get(&a.url("/")).await.0, 200);
}

/// Reads until the activator closes the connection; how long that took.
async fn closed_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(limit, conn.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("connection still open after {limit:?}"))
        .ok();
    start.elapsed()
}

#[tokio::test]
async fn a_kept_alive_connection_is_cut_after_the_header_timeout_and_at_once_on_drain() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let a = activator_with(Settings::default(), limits, false, 20_000).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", a.port));
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // Requests served on the fast path, then half of a next head: cut after the
    // header timeout, counted from the last response.
    let mut slow = connect().await.unwrap();
    for _ in 0..3 {
        slow.write_all(req).await.unwrap();
        assert!(read_response(&mut slow).await.starts_with("HTTP/1.1 200"));
    }
    slow.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(400), "cut after {took:?}");
    // A connection that sends nothing after its response is cut the same way.
    let mut idle = connect().await.unwrap();
    idle.write_all(req).await.unwrap();
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(400), "cut after {took:?}");
    assert!(a.fast_path_requests() >= 4, "{}", a.fast_path_requests());

    // Between requests when the drain starts: closed at once, and the drain ends.
    let mut waiting = connect().await.unwrap();
    for _ in 0..3 {
        waiting.write_all(req).await.unwrap();
        assert!(
            read_response(&mut waiting)
                .await
                .starts_with("HTTP/1.1 200")
        );
    }
    let drain = tokio::spawn({
        let l = a.listeners.clone();
        async move { l.drain(Duration::from_secs(5)).await }
    });
    let took = closed_within(&mut waiting, Duration::from_millis(300)).await;
    assert!(took < Duration::from_millis(300), "closed after {took:?}");
    assert!(drain.await.unwrap(), "the drain did not finish in time");
}

#[tokio::test]
async fn per_pod_concurrency_limit_queues_the_excess() {
    let a = activator(Settings {
        pod_concurrency: 1,
        ..Default::default()
    })
    .await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let start = Instant::now();
    let mut reqs = Vec::new();
    for _ in 0..4 {
        let url = a.url("/?delay_ms=200");
        reqs.push(tokio::spawn(async move { get(&url).await.0 }));
    }
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    // One at a time: four requests of 200 ms take at least 800 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(780),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn one_connection_goes_from_the_fast_path_to_hyper_and_every_request_is_answered() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    // Four pipelined requests on one connection: two the fast path takes (a GET, a
    // HEAD), then one that names a header in `Connection` (hyper's path from there on),
    // then one more.
    let requests = "GET /headers HTTP/1.1\r\nHost: shop.example\r\n\r\n\
        HEAD / HTTP/1.1\r\nHost: shop.example\r\n\r\n\
        GET /headers HTTP/1.1\r\nHost: shop.example\r\nConnection: x-drop-me\r\nx-drop-me: 1\r\n\r\n\
        GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n";
    let all = raw(a.port, requests.as_bytes()).await;
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 4, "{all}");
    // The HEAD answer has no body: the one "hello from" is the last GET's.
    assert_eq!(all.matches("hello from").count(), 1, "{all}");
    assert_eq!(all.matches("host: shop.example").count(), 2, "{all}");
    assert_eq!(
        all.matches("x-forwarded-for: 127.0.0.1").count(),
        2,
        "{all}"
    );
    assert!(!all.contains("x-drop-me"), "{all}");
    assert_eq!(a.svc.requests.load(std::sync::atomic::Ordering::Relaxed), 4);
    // Which path served them: the first two the fast path, the rest hyper.
    assert_eq!(a.fast_path_requests(), 2);
}

/// A "pod" with scripted answers on a kept-alive connection: `/hints` gets a 103
/// and a chunked body with a trailer, `/close` a body that ends with the connection.
async fn scripted_pod() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    if head.starts_with("GET /hints ") {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
                                HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
                                3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
                            )
                            .await;
                    } else {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil-close").await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn informational_chunked_and_close_delimited_answers_pass_through() {
    let a = activator(Settings::default()).await;
    let pod = scripted_pod().await;
    a.svc
        .set_endpoints(vec![(pod.ip(), vec![("http".into(), pod.port())])]);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    s.write_all(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.ends_with(b"0\r\nx-t: 1\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the chunked answer within 5 s");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{text}");
    assert!(text.contains("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.contains("3\r\nabc\r\n"), "{text}");

    // On the same connection: a body without a length ends with the pod's stream, so
    // the client's connection closes after it, announced.
    s.write_all(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nuntil-close"), "{text}");
}

// ---- strict HTTP (issue 15): the client's errors are 4xx from the activator ----------

#[tokio::test]
async fn a_bad_chunk_size_in_a_request_body_is_400_not_502() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let r = raw(
        a.port,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
}

#[tokio::test]
async fn http_1_0_without_host_is_answered_by_the_backend() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let r = raw(a.port, b"GET /headers HTTP/1.0\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200 ") || r.starts_with("HTTP/1.0 200 "),
        "{r}"
    );
    assert!(
        r.contains(&format!("host: {}", b.addr)),
        "the pod's address as Host: {r}"
    );
}

#[tokio::test]
async fn missing_or_repeated_host_is_400_from_the_activator_on_both_paths() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    for req in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        // The same through the hyper path (a chunked body sends it there).
        b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\nhost: a\r\nhost: a\r\n\r\n",
    ] {
        let r = raw(a.port, req).await;
        assert_eq!(
            r.split(' ').nth(1),
            Some("400"),
            "{:?} → {r}",
            String::from_utf8_lossy(req)
        );
        assert!(r.contains("Host"), "{r}");
    }
}

#[tokio::test]
async fn an_absolute_form_target_sets_host() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let r = raw(
        a.port,
        b"GET http://a.example/headers HTTP/1.1\r\nhost: b.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(r.contains("host: a.example"), "{r}");
    assert!(!r.contains("b.example"), "{r}");
}

/// A "pod" whose chunked answers end their size lines with a bare LF.
async fn pod_with_bare_lf_chunks() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_bare_lf_in_a_chunked_answer_is_refused_the_same_way_on_both_paths() {
    let pod = pod_with_bare_lf_chunks().await;
    let a = activator(Settings::default()).await;
    a.svc
        .set_endpoints(vec![(pod.ip(), vec![("http".into(), pod.port())])]);
    // Fast path (a plain GET) and hyper path (HTTP/1.0 goes there): neither hands the
    // client a complete message built on the bare LF.
    for req in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\nhost: x\r\n\r\n",
    ] {
        let r = raw(a.port, req).await;
        assert!(
            !r.contains("hello"),
            "{:?} → {r:?}",
            String::from_utf8_lossy(req)
        );
        assert!(
            !r.ends_with("0\r\n\r\n"),
            "{:?} → {r:?}",
            String::from_utf8_lossy(req)
        );
    }
}

#[tokio::test]
async fn junk_never_wakes_a_sleeping_service_and_is_answered_at_once() {
    let a = activator(Settings::default()).await;
    for (what, bytes) in snooze_e2e::testing::junk() {
        let t0 = Instant::now();
        let r = raw(a.port, &bytes).await;
        let took = t0.elapsed();
        let status = r.split(' ').nth(1).unwrap_or("closed").to_string();
        eprintln!("{what}: {status} after {took:?}");
        assert!(took < Duration::from_millis(100), "{what}: {took:?}");
        assert!(
            matches!(status.as_str(), "400" | "431" | "closed"),
            "{what}: {r}"
        );
        assert_eq!(a.svc.metrics.wakes.get(), 0, "{what} woke the service");
        assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
    // A complete, valid head wakes it.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    while a.svc.metrics.wakes.get() == 0 && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.svc.metrics.wakes.get(), 1);
}

/// A cold service answers an HTTP/2 client's preface with its SETTINGS at once: gRPC's
/// clients (grpc-go, grpc-core, grpc-java) send no request before they have them.
#[tokio::test]
async fn a_cold_h2c_connection_gets_the_servers_settings_at_once() {
    let a = activator_with(Settings::default(), ServerLimits::default(), true, 20_000).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut head))
        .await
        .expect("the server's SETTINGS within 1 s of the preface")
        .unwrap();
    assert_eq!(head[3], 0x4, "a SETTINGS frame first: {head:?}");
    assert_eq!(head[4] & 0x1, 0, "not an ACK: {head:?}");
    // The preface alone is no request: nothing is woken or held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.svc.metrics.wakes.get(), 0);
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// The real gRPC client of the tests (grpc-go, default options), built from Go modules
/// by e2e/cluster/build.sh, which links it into the bin folder that ./test.sh puts on
/// the PATH.
fn grpc_client(addr: &str, extra: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("snooze-grpc-client");
    c.args(["-addr", addr, "-timeout", "20s"]).args(extra);
    c.kill_on_drop(true);
    c
}

async fn wait_for_wakes(a: &Activator, n: u64) {
    let start = Instant::now();
    while a.svc.metrics.wakes.get() < n {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no wake within 5 s (wakes: {})",
            a.svc.metrics.wakes.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
#[ignore = "needs snooze-grpc-client on the PATH (e2e/cluster/build.sh); ./test.sh runs it"]
async fn a_real_grpc_client_wakes_a_cold_service_unary_and_streaming() {
    let a = activator_with(Settings::default(), ServerLimits::default(), true, 20_000).await;
    let addr = format!("127.0.0.1:{}", a.port);
    // Unary, cold: the call wakes the service and is held until a pod is ready.
    let call = tokio::spawn(grpc_client(&addr, &["-msg", "cold unary"]).output());
    wait_for_wakes(&a, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "held while there is no pod");
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let out = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .unwrap()
        .expect("run snooze-grpc-client (is it on the PATH?)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cold unary\n");
    assert_eq!(a.svc.metrics.wakes.get(), 1, "one wake for one cold call");

    // Asleep again; server streaming, cold.
    a.svc.set_endpoints(vec![]);
    drop(b);
    let call = tokio::spawn(grpc_client(&addr, &["-msg", "cold stream", "-stream"]).output());
    wait_for_wakes(&a, 2).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let out = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "cold stream\ncold stream\ncold stream\n"
    );
    // Warm: the same client, answered at once.
    let out = grpc_client(&addr, &["-msg", "warm"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "warm\n");
    assert_eq!(a.svc.metrics.wakes.get(), 2);
}

/// hyper refuses a head of more than 100 fields with 431; the wake gate judges it the
/// same way, so such a head wakes nothing.
#[tokio::test]
async fn a_head_with_more_fields_than_hyper_takes_wakes_nothing() {
    let a = activator(Settings::default()).await;
    let mut head = String::from("GET / HTTP/1.1\r\nHost: web\r\n");
    for i in 0..110 {
        head.push_str(&format!("x-field-{i}: 1\r\n"));
    }
    head.push_str("\r\n");
    let answer = raw(a.port, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(
        a.svc.metrics.wakes.get(),
        0,
        "an oversized head woke the service"
    );
}

/// RFC 9110 §9.3.2: a response to HEAD has no content, whatever its Content-Length
/// says; over h2c it ends with its HEADERS frame (a DATA frame would be a protocol error
/// for the client).
#[tokio::test]
async fn head_over_h2c_gets_the_headers_and_no_body() {
    let a = activator(Settings::default()).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let c = h2c_client();
    for path in ["/", "/bytes?n=8192"] {
        let req = Request::head(a.url(path))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.request(req).await.expect("HEAD over h2c");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let get = get(&a.url(path)).await;
        assert_eq!(
            resp.headers().get("content-length"),
            get.1.get("content-length"),
            "{path}: HEAD tells the length GET has"
        );
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("no reset")
            .to_bytes();
        assert!(body.is_empty(), "{path}: {} bytes of body", body.len());
    }
}

/// h2spec (summerwind/h2spec, built from Go modules by e2e/cluster/build.sh) against a
/// service through the activator: its summary line and the tests it failed.
async fn h2spec(port: u16) -> (String, Vec<String>) {
    let out = tokio::process::Command::new("snooze-h2spec")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-o", "5"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run snooze-h2spec (is it on the PATH?)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("tests,"))
        .unwrap_or_default()
        .trim()
        .to_string();
    // The failures are listed again under "Failures:": a section line ("3.5. HTTP/2
    // Connection Preface") and under it "× 2: …" per failed test; named "3.5/2".
    // Each failure keeps h2spec's own account of it (the "->", "Expected:" and "Actual:"
    // lines under it), so that a failure in CI says what went wrong in its message.
    let mut failures: Vec<String> = Vec::new();
    let mut section = String::new();
    let listed = text.split_once("Failures:").map_or("", |(_, f)| f);
    for l in listed.lines() {
        let l = l.trim();
        if let Some(test) = l.strip_prefix("× ") {
            let n = test.split(':').next().unwrap_or_default();
            failures.push(format!("{section}/{n} ({test})"));
        } else if let Some((num, _)) = l.split_once(". ")
            && !num.is_empty()
            && num.chars().all(|c| c.is_ascii_digit() || c == '.')
        {
            section = num.to_string();
        } else if let Some(last) = failures.last_mut()
            && (l.starts_with("->") || l.starts_with("Expected:") || l.starts_with("Actual:"))
        {
            last.push_str(" | ");
            last.push_str(l);
        }
    }
    // Only the summary and the failures: the whole run (145 tests) would bury the
    // assertion's message in a CI log's middle.
    println!("h2spec on port {port}: {summary}\nFailures:{listed}");
    if !out.status.success() && summary.is_empty() {
        println!("h2spec's stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (summary, failures)
}

/// RFC 9113 conformance through the activator, starting asleep (the first test's
/// connection wakes the service) and awake: every h2spec test passes but 3.5/2, where
/// a port that also serves HTTP/1.1 answers a bad preface as HTTP/1.1.
#[tokio::test]
#[ignore = "needs snooze-h2spec on the PATH (e2e/cluster/build.sh); ./test.sh runs it"]
async fn h2spec_passes_through_the_activator_asleep_and_awake() {
    let a = activator_with(Settings::default(), ServerLimits::default(), true, 20_000).await;
    let b = backend(&[]).await;
    // Asleep: a pod becomes ready 300 ms after the first wake.
    let svc = a.svc.clone();
    let addr = b.addr;
    let waker = tokio::spawn(async move {
        while svc.metrics.wakes.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        svc.set_endpoints(vec![(addr.ip(), vec![("http".to_string(), addr.port())])]);
    });
    let asleep = h2spec(a.port).await;
    waker.await.unwrap();
    assert_eq!(a.svc.metrics.wakes.get(), 1, "one wake");
    let awake = h2spec(a.port).await;
    for (when, (summary, failures)) in [("asleep", asleep), ("awake", awake)] {
        let unexpected: Vec<&String> = failures
            .iter()
            .filter(|f| !f.starts_with("3.5/2 "))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{when}: {summary}; failed: {unexpected:#?}"
        );
    }
}

/// A TCP relay to `to` that counts the connections it accepts.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }
            });
        }
    });
    (addr, count)
}

/// Requests held for a cold h2c service and released together share one new HTTP/2
/// connection to the pod instead of each dialing one.
#[tokio::test]
async fn held_requests_released_together_share_one_h2_connection_to_the_pod() {
    let a = activator_with(Settings::default(), ServerLimits::default(), true, 20_000).await;
    let b = backend(&[]).await;
    let (relay, dials) = counting_relay(b.addr).await;
    let n = 64;
    let mut calls = Vec::new();
    for _ in 0..n {
        // A client per request: one connection each to the activator.
        let url = a.url("/");
        calls.push(tokio::spawn(async move {
            let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
            h2c_client().request(req).await.map(|r| r.status())
        }));
    }
    let start = Instant::now();
    while a.svc.queued.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(start.elapsed() < Duration::from_secs(5), "requests held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.svc
        .set_endpoints(vec![(relay.ip(), vec![("http".to_string(), relay.port())])]);
    for c in calls {
        assert_eq!(c.await.unwrap().expect("answered"), StatusCode::OK);
    }
    assert_eq!(
        dials.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "connections opened to the pod for {n} released requests"
    );
}

// ---- fair sharing (issue 26): one service or client cannot starve the others ------

/// One service floods the activator with cold requests far over the activator-wide
/// bound: it holds at most its ceiling (a quarter of that bound), the rest get 503 at
/// once, and another service's cold request is still held and answered 200.
#[tokio::test]
async fn a_flood_on_one_service_leaves_room_for_another_cold_service() {
    let settings = Settings {
        max_queued: 1000,
        timeout: Duration::from_secs(20),
        ..Settings::default()
    };
    let a = activator_with(settings, ServerLimits::default(), false, 100).await;
    assert_eq!(a.table.max_queued_per_service, 25);
    let (other, other_port) = a.add_services(&["api"]).await.remove(0);
    // The flood: 110 connections, each with a request.
    let mut flood = Vec::new();
    for _ in 0..110 {
        let port = a.port;
        flood.push(tokio::spawn(async move {
            let answer = raw(
                port,
                b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            )
            .await;
            answer.lines().next().unwrap_or_default().to_string()
        }));
    }
    let start = Instant::now();
    let refused = || a.svc.metrics.queue_full.get();
    while refused() < 85 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "refused so far: {}",
            refused()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 25);
    // The other service's cold request is held, not refused.
    let call = tokio::spawn(async move { get(&format!("http://127.0.0.1:{other_port}/")).await.0 });
    let start = Instant::now();
    while other.queued.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "not held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = backend(&[]).await;
    other.set_endpoints(vec![(
        b.addr.ip(),
        vec![("http".to_string(), b.addr.port())],
    )]);
    assert_eq!(call.await.unwrap(), StatusCode::OK);
    a.set_backends(&[&b]);
    let mut lines = std::collections::BTreeMap::new();
    for f in flood {
        *lines.entry(f.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        lines.get("HTTP/1.1 503 Service Unavailable"),
        Some(&85),
        "{lines:?}"
    );
    assert_eq!(lines.get("HTTP/1.1 200 OK"), Some(&25), "{lines:?}");
}

/// A client that sends a request and never reads the response is cut after the send
/// timeout, on the fast path and on hyper's: its request ends (nothing stays in
/// flight, so its service may sleep) and the cut is counted.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    for fast_path in [true, false] {
        let limits = ServerLimits {
            send_timeout: Duration::from_millis(500),
            fast_path,
            ..ServerLimits::default()
        };
        let a = activator_with(Settings::default(), limits, false, 20_000).await;
        let b = backend(&[]).await;
        a.set_backends(&[&b]);
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
            .await
            .unwrap();
        c.write_all(b"GET /bytes?n=33554432 HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        // Never read: the socket buffers fill, the activator's writes wait.
        let in_flight = || a.svc.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        while in_flight() == 0 && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(in_flight(), 1, "fast path {fast_path}: the request started");
        while in_flight() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "fast path {fast_path}: still in flight after {:?}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            a.table.metrics.send_timeouts.get() >= 1,
            "fast path {fast_path}"
        );
        drop(c);
    }
}

/// At the connection cap the listeners stop accepting: a new client waits (in the
/// kernel's accept queue) until a connection closes, then is served.
#[tokio::test]
async fn at_the_connection_cap_a_new_client_waits_for_a_free_place() {
    let limits = ServerLimits {
        max_connections: 3,
        ..ServerLimits::default()
    };
    let a = activator_with(Settings::default(), limits, false, 20_000).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", a.port))
                .await
                .unwrap(),
        );
    }
    let start = Instant::now();
    while a.table.metrics.client_connections.get() < 3 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let port = a.port;
    let call = tokio::spawn(async move {
        raw(
            port,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "served over the cap");
    assert_eq!(a.table.metrics.client_connections.get(), 3);
    drop(idle.pop());
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("served once a place was free")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// An activator serving its one port as TCP (`mode`).
async fn tcp_activator(settings: Settings, mode: snooze_crds::TcpMode) -> Activator {
    tcp_activator_with(settings, ServerLimits::default(), mode).await
}

async fn tcp_activator_with(
    settings: Settings,
    limits: ServerLimits,
    mode: snooze_crds::TcpMode,
) -> Activator {
    let a = activator_with(settings, limits, false, 20_000).await;
    let r = Arc::new(Route {
        service: a.svc.clone(),
        port_name: "http".into(),
        h2c: false,
        tcp: Some(mode),
    });
    assert!(a.listeners.sync(&[(a.port, r)].into()).await.is_empty());
    a
}

/// A TCP echo server on 127.0.0.1 (each connection's bytes sent back; its write side
/// closed when the client's closes).
async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Whether a wake report arrives within `within`.
async fn woken_within(
    reports: &mut (impl futures::Stream<Item = Bytes> + Unpin),
    within: Duration,
) -> bool {
    tokio::time::timeout(within, async {
        loop {
            let Some(b) = reports.next().await else {
                return false;
            };
            let r: Report = serde_json::from_slice(&b).unwrap();
            if !r.wake.is_empty() {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn a_tcp_connection_wakes_on_its_first_byte_and_is_joined_to_the_pod_byte_for_byte() {
    let mode = snooze_crds::TcpMode::default(); // FirstByte, Traffic
    let a = tcp_activator(Settings::default(), mode).await;
    let mut reports = Box::pin(a.stats.clone().stream());
    let first: Report = serde_json::from_slice(&reports.next().await.unwrap()).unwrap();
    assert!(first.full);
    let addr = ("127.0.0.1", a.port);

    // A health check's connect-and-close, and a connection that says nothing: no wake.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        !woken_within(&mut reports, Duration::from_millis(600)).await,
        "woken without a byte"
    );
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Its first bytes wake the service; they wait in the socket until a pod is there.
    c.write_all(b"hello ").await.unwrap();
    assert!(woken_within(&mut reports, Duration::from_millis(900)).await);
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 1);
    c.write_all(b"world").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let echo = echo_server().await;
    a.svc
        .set_endpoints(vec![(echo.ip(), vec![("http".to_string(), echo.port())])]);
    let mut got = vec![0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .expect("the held bytes echoed")
        .unwrap();
    assert_eq!(&got, b"hello world");
    assert_eq!(a.svc.queued.load(std::sync::atomic::Ordering::Relaxed), 0);
    // One connection is one request; silence does not hold it awake (Traffic).
    assert_eq!(a.svc.requests.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        a.svc.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let before = a
        .svc
        .last_request_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.write_all(b"!").await.unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).await.unwrap();
    assert!(
        a.svc
            .last_request_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            > before,
        "bytes are activity"
    );
    // Who opened it is in the summary of who keeps the service awake.
    let who = a.svc.stats().activity;
    assert_eq!(
        who.iter()
            .map(|w| (w.client.as_str(), w.method.as_str(), w.count))
            .collect::<Vec<_>>(),
        [("127.0.0.1", "TCP", 1)],
        "{who:?}"
    );

    // Half-close: the client's end of writing reaches the pod, whose close comes back.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("EOF after the half-close")
        .unwrap();
    assert!(rest.is_empty());
    let metrics = a.table.metrics.encode();
    let received = metrics
        .lines()
        .find(|l| {
            l.starts_with("snooze_activator_tcp_bytes_total")
                && l.contains("name=\"web\"")
                && l.contains("direction=\"received\"")
        })
        .unwrap_or_default()
        .to_string();
    assert!(received.ends_with(" 12"), "{received}");
}

#[tokio::test]
async fn a_tcp_port_that_wakes_on_connect_holds_open_connections_and_closes_refused_ones() {
    let mode = snooze_crds::TcpMode {
        wake_on: snooze_crds::WakeOn::Connect,
        activity: snooze_crds::TcpActivity::Connections,
    };
    let settings = Settings {
        max_queued: 1,
        ..Settings::default()
    };
    let a = tcp_activator(settings, mode).await;
    let mut reports = Box::pin(a.stats.clone().stream());
    let _full = reports.next().await.unwrap();
    let addr = ("127.0.0.1", a.port);

    // A server-speaks-first client sends nothing: the connection alone wakes.
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(woken_within(&mut reports, Duration::from_millis(900)).await);
    // The queue holds one: the next connection is closed at once.
    let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(2), refused.read(&mut buf))
        .await
        .expect("the refused connection closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        a.table.metrics.encode().lines().any(|l| {
            l.starts_with("snooze_activator_queue_full_total")
                && l.contains("name=\"web\"")
                && l.ends_with(" 1")
        }),
        "one queue_full"
    );

    let echo = echo_server().await;
    a.svc
        .set_endpoints(vec![(echo.ip(), vec![("http".to_string(), echo.port())])]);
    c.write_all(b"ping").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf[..4]))
        .await
        .expect("echoed")
        .unwrap();
    assert_eq!(&buf[..4], b"ping");
    // Connections: an open connection holds the service awake, silent or not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        a.svc.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.svc.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A TCP client that stops reading while its pod keeps sending is cut after the send
/// timeout: the connection ends, its pod's side is closed, the cut is counted, and
/// nothing stays in flight (with `activity: Connections` an open connection would
/// otherwise hold the service awake for good).
#[tokio::test]
async fn a_tcp_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let mode = snooze_crds::TcpMode {
        wake_on: snooze_crds::WakeOn::FirstByte,
        activity: snooze_crds::TcpActivity::Connections,
    };
    let limits = ServerLimits {
        send_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    };
    let a = tcp_activator_with(Settings::default(), limits, mode).await;
    // A pod that sends without end once a client connects; says when its side ends.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = l.local_addr().unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let block = vec![b'x'; 64 * 1024];
        while c.write_all(&block).await.is_ok() {}
        let _ = ended_tx.send(());
    });
    a.svc
        .set_endpoints(vec![(pod.ip(), vec![("http".to_string(), pod.port())])]);
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
        .await
        .unwrap();
    c.write_all(b"subscribe").await.unwrap();
    let in_flight = || a.svc.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    while in_flight() == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(in_flight(), 1, "the connection was joined to the pod");
    // Never read: the socket buffers fill, the relay's writes to the client wait.
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the pod's side closed within 10 s of a client that reads nothing")
        .unwrap();
    let cut_after = start.elapsed();
    assert!(
        cut_after >= Duration::from_millis(500),
        "cut before the send timeout ({cut_after:?})"
    );
    while in_flight() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "still in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        a.table.metrics.send_timeouts.get() >= 1,
        "the cut is counted"
    );
    drop(c);
}

fn waiting_page(after: Duration) -> snooze_crds::WaitingPage {
    snooze_crds::WaitingPage {
        after: after.into(),
        title: "Waking web".into(),
        message: "One moment <please>".into(),
    }
}

/// What Chrome sends when it loads a page.
const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

/// `activation.waitingPage`: a browser's page load that waited `after` gets the page
/// (503, HTML, reloading itself), on HTTP/1.1 and HTTP/2; a plain GET and a script's
/// fetch keep being held and are answered by the pod; without the page a page load is
/// held like any request.
#[tokio::test]
async fn a_page_load_gets_the_waiting_page_and_every_other_request_keeps_waiting() {
    let a = activator(Settings::default()).await;
    let url = a.url("/");
    let page_load = [("accept", BROWSER_ACCEPT), ("sec-fetch-mode", "navigate")];
    // Off (the default): held like any request.
    let held = tokio::time::timeout(Duration::from_millis(1500), get_with(&url, &page_load)).await;
    assert!(
        held.is_err(),
        "without a waiting page a page load is held: {held:?}"
    );

    a.svc
        .set_waiting_page(Some(&waiting_page(Duration::from_millis(500))));
    let u = url.clone();
    let plain = tokio::spawn(async move { get_with(&u, &[("accept", "*/*")]).await });
    let u = url.clone();
    let fetch = tokio::spawn(async move {
        get_with(
            &u,
            &[("accept", BROWSER_ACCEPT), ("sec-fetch-mode", "cors")],
        )
        .await
    });
    let t0 = Instant::now();
    let (status, headers, body) = get_with(&url, &page_load).await;
    let waited = t0.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "the page came after {waited:?}"
    );
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["refresh"], "2");
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(body.contains("<title>Waking web</title>"), "{body}");
    assert!(body.contains("One moment &lt;please&gt;"), "{body}");
    assert!(body.contains(r#"<meta http-equiv="refresh" content="2">"#));
    // The same over HTTP/2 (prior knowledge).
    let mut req = Request::get(&url);
    for (k, v) in page_load {
        req = req.header(k, v);
    }
    let r = h2c_client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(a.svc.metrics.waiting_pages.get(), 2);

    // The others are still held, and the pod answers them once it is there.
    assert!(!plain.is_finished() && !fetch.is_finished());
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    for held in [plain, fetch] {
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("hello from backend-"), "{body}");
    }
    // With a pod, a page load is the app's.
    let (status, _, body) = get_with(&url, &page_load).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("hello from backend-"), "{body}");
    assert_eq!(a.svc.metrics.waiting_pages.get(), 2);
}

/// The waiting page in a real browser: headless Chromium (Debian's
/// chromium-headless-shell, driven by Playwright, `e2e/browser/waiting_page.py`) loads a
/// cold service, is shown the page after `after`, and — once the service has a pod —
/// the page's own reload lands it on the app's answer. Screenshots of both are kept
/// (see `snooze_e2e::testing::Browser`).
#[tokio::test]
#[ignore = "needs chromium-headless-shell and snooze-browser-python (e2e/cluster/build.sh); ./test.sh runs it"]
async fn a_real_browser_is_shown_the_waiting_page_and_lands_on_the_app() {
    let a = activator(Settings::default()).await;
    a.svc
        .set_waiting_page(Some(&waiting_page(Duration::from_secs(1))));
    let mut browser = snooze_e2e::testing::Browser::open(&a.url("/"), "waiting-page-activator");
    browser
        .said("PAGE 503 'Waking web'", Duration::from_secs(60))
        .await;
    // Held still: the page is shown and reloads, the app is not there yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = backend(&[]).await;
    a.set_backends(&[&b]);
    browser
        .said("APP hello from backend-", Duration::from_secs(30))
        .await;
    browser.finish().await;
    // The first load and each reload before the pod came got the page.
    assert!(a.svc.metrics.waiting_pages.get() >= 2);
}
