//! The test application of the end-to-end tests and the demo: a small HTTP server with
//! knobs for the behaviours Snooze must cope with.
//!
//! Routes:
//! - `/` answers `hello from <pod>`; `?delay_ms=N` overrides the per-request delay;
//! - `/ready` is the readiness endpoint (503 until `--ready-delay` has passed), `/healthz`;
//! - `/startup` answers the app's own start-up in µs (process start → listening);
//! - `/echo` reads the whole body and answers its length and SHA-256;
//! - `/headers` answers the request's headers, one per line (`Host` included);
//! - `/stream?chunks=N&interval_ms=M` streams N chunks, M ms apart;
//! - `/ws` is a WebSocket echo;
//! - `/snooze.test.Echo/Echo` is a unary gRPC echo (framed body back, `grpc-status` trailer),
//!   `/snooze.test.Echo/Stream` its server-streaming twin (the message back three times);
//! - `/api-check` lists pods in its namespace with its service-account token;
//! - `/bytes?n=N` answers N bytes;
//! - `/fetch?host=H&port=P&path=/x` makes one GET to `http://H:P/x` from the pod, the way
//!   an in-cluster client does (the name resolved with the pod's resolv.conf), and
//!   answers that response's status and body, with the address it connected to in
//!   `x-fetch-addr` (502 when the name does not resolve or the connection fails);
//! - `/slow-clients?addr=IP:PORT&n=N&hold_ms=M[&from=IP]` opens N connections (at most
//!   10,000) to `addr` from the pod (bound to `from` when given), each sending a request head it never finishes, holds them M ms
//!   (at most 30 s) and answers how many it opened and how many the server had closed
//!   (a tenant's flood of slow clients, for the tenancy tests).
//!
//! HTTP/1.1 and h2c (prior knowledge) are served on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Parser, Debug, Clone)]
#[command(about = "Snooze's test application")]
struct Args {
    /// Address to listen on. Defaults to `$POD_IP:8080`, or `127.0.0.1:8080` without POD_IP.
    #[arg(long, env = "TESTAPP_LISTEN")]
    listen: Option<SocketAddr>,
    /// Port used with POD_IP when --listen is not given.
    #[arg(long, env = "TESTAPP_PORT", default_value_t = 8080)]
    port: u16,
    /// Sleep this long before binding the port (a slow start-up).
    #[arg(long, env = "TESTAPP_STARTUP_DELAY_MS", default_value_t = 0)]
    startup_delay_ms: u64,
    /// `/ready` answers 503 until this long after the port is bound.
    #[arg(long, env = "TESTAPP_READY_DELAY_MS", default_value_t = 0)]
    ready_delay_ms: u64,
    /// Delay of every request to `/` (overridden by `?delay_ms=`).
    #[arg(long, env = "TESTAPP_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,
    /// Exit with this code right after start (a crashing container).
    #[arg(long, env = "TESTAPP_CRASH_WITH")]
    crash_with: Option<i32>,
}

struct App {
    name: String,
    started: Instant,
    /// From the process's start to listening: the app's own start-up.
    startup: Duration,
    ready_after: Duration,
    delay: Duration,
    requests: AtomicU64,
    /// From listening to the first request that is not a health check or `/startup`:
    /// for a cold start through Snooze, the activator's share once the app listens.
    first_request: std::sync::OnceLock<Duration>,
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    app.requests.fetch_add(1, Ordering::Relaxed);
    if !matches!(req.uri().path(), "/healthz" | "/ready" | "/startup") {
        let _ = app.first_request.set(app.started.elapsed());
    }
    let mut resp = match req.uri().path() {
        "/healthz" => full(StatusCode::OK, "ok\n"),
        // The app's start-up, and listening → its first request, in µs ("-" if none).
        "/startup" => full(
            StatusCode::OK,
            format!(
                "{} {}\n",
                app.startup.as_micros(),
                app.first_request
                    .get()
                    .map_or("-".to_string(), |d| d.as_micros().to_string())
            ),
        ),
        "/ready" => {
            if app.started.elapsed() >= app.ready_after {
                full(StatusCode::OK, "ready\n")
            } else {
                full(StatusCode::SERVICE_UNAVAILABLE, "not ready yet\n")
            }
        }
        "/echo" => echo(req).await,
        "/headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<binary>")));
            }
            full(StatusCode::OK, out)
        }
        "/stream" => stream(&req),
        "/ws" => websocket(req),
        "/snooze.test.Echo/Echo" => grpc_echo(req, 1).await,
        "/snooze.test.Echo/Stream" => grpc_echo(req, 3).await,
        "/api-check" => api_check().await,
        "/fetch" => fetch(&req).await,
        "/slow-clients" => slow_clients(&req).await,
        "/redis" => redis_ping(&req).await,
        "/bytes" => {
            // A body of n bytes (benchmarks: 8 KB, 1 MB), capped at 64 MiB.
            let n = query_u64(&req, "n").unwrap_or(1024).min(64 << 20) as usize;
            full(StatusCode::OK, Bytes::from(vec![b'x'; n]))
        }
        _ => {
            let delay = query_u64(&req, "delay_ms")
                .map(Duration::from_millis)
                .unwrap_or(app.delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            full(StatusCode::OK, format!("hello from {}\n", app.name))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&app.name) {
        resp.headers_mut().insert("x-pod-name", v);
    }
    Ok(resp)
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len();
                    hasher.update(d);
                }
            }
            Err(e) => return full(StatusCode::BAD_REQUEST, format!("body error: {e}\n")),
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    full(StatusCode::OK, format!("len={len} sha256={hex}\n"))
}

fn stream(req: &Request<Incoming>) -> Response<Body> {
    let chunks = query_u64(req, "chunks").unwrap_or(5).min(10_000);
    let interval = Duration::from_millis(query_u64(req, "interval_ms").unwrap_or(100).min(60_000));
    let s = futures::stream::unfold(0u64, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let data = Bytes::from(format!("chunk {i}\n"));
        Some((Ok::<_, std::io::Error>(Frame::data(data)), i + 1))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(s)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let key = match req.headers().get("sec-websocket-key") {
        Some(k) => k.clone(),
        None => return full(StatusCode::BAD_REQUEST, "not a websocket request\n"),
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

/// gRPC echo: the request's message back `times` times, 20 ms apart (1: unary `Echo`;
/// 3: server-streaming `Stream`), then `grpc-status: 0`.
async fn grpc_echo(req: Request<Incoming>, times: usize) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return full(StatusCode::BAD_REQUEST, format!("body error: {e}\n")),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures::stream::unfold(0usize, move |i| {
        let body = body.clone();
        let trailers = trailers.clone();
        async move {
            if i > times {
                return None;
            }
            if i == times {
                return Some((Ok::<_, std::io::Error>(Frame::trailers(trailers)), i + 1));
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some((Ok(Frame::data(body)), i + 1))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Lists the pods of the app's own namespace with its in-cluster credentials (the
/// service-account token the node agent mounted) and answers what the API server said.
fn query_str<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// `/redis?host=H&port=P`: a Redis PING over TCP from the app (a web app's first query
/// to its database); answers what the server said.
async fn redis_ping(req: &Request<Incoming>) -> Response<Body> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(host) = query_str(req, "host") else {
        return full(StatusCode::BAD_REQUEST, "redis: host= is required\n");
    };
    let port = query_u64(req, "port").unwrap_or(6379) as u16;
    let work = async {
        let mut tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        tcp.write_all(b"PING\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Bytes::copy_from_slice(&buf[..n]))
    };
    match tokio::time::timeout(Duration::from_secs(60), work).await {
        Ok(Ok(said)) => full(StatusCode::OK, said),
        Ok(Err(e)) => full(StatusCode::BAD_GATEWAY, format!("redis: {e}\n")),
        Err(_) => full(
            StatusCode::GATEWAY_TIMEOUT,
            "redis: no answer within 60 s\n",
        ),
    }
}

async fn slow_clients(req: &Request<Incoming>) -> Response<Body> {
    let Some(addr) = query_str(req, "addr").and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return full(
            StatusCode::BAD_REQUEST,
            "slow-clients: addr=IP:PORT is required\n",
        );
    };
    let n = query_u64(req, "n").unwrap_or(100).min(10_000) as usize;
    let hold = Duration::from_millis(query_u64(req, "hold_ms").unwrap_or(1000).min(30_000));
    // `from`: the source address to bind (the local cluster's pods share one network
    // namespace, where the kernel would otherwise pick the same source for every pod).
    let from = query_str(req, "from").and_then(|a| a.parse::<std::net::IpAddr>().ok());
    let (mut open, refused) = snooze_e2e::slow::open(addr, n, |_| from).await;
    tokio::time::sleep(hold).await;
    let closed = snooze_e2e::slow::closed(&mut open).await;
    full(
        StatusCode::OK,
        format!(
            "{{\"opened\":{},\"refused\":{refused},\"closed_by_server\":{closed}}}\n",
            open.len()
        ),
    )
}

async fn fetch(req: &Request<Incoming>) -> Response<Body> {
    let Some(host) = query_str(req, "host") else {
        return full(StatusCode::BAD_REQUEST, "fetch: host= is required\n");
    };
    let port = query_u64(req, "port").unwrap_or(80) as u16;
    let path = query_str(req, "path").unwrap_or("/");
    let work = async {
        // getaddrinfo: /etc/resolv.conf of the pod's mount namespace, search path and all.
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("resolving {host}: no address"))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let up = Request::get(path)
            .header(header::HOST, host)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(up)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: body: {e}"))?
            .to_bytes();
        Ok::<_, String>((addr, status, body))
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(Ok((addr, status, body))) => {
            let mut r = full(status, body);
            if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
                r.headers_mut().insert("x-fetch-addr", v);
            }
            r
        }
        Ok(Err(e)) => full(StatusCode::BAD_GATEWAY, format!("fetch: {e}\n")),
        Err(_) => full(StatusCode::GATEWAY_TIMEOUT, "fetch: no answer in 30s\n"),
    }
}

async fn api_check() -> Response<Body> {
    use k8s_openapi::api::core::v1::Pod;
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            return full(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no in-cluster config: {e}\n"),
            );
        }
    };
    let ns = client.default_namespace().to_string();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, &ns);
    match pods.list(&Default::default()).await {
        Ok(l) => full(
            StatusCode::OK,
            format!("allowed: {} pods in {ns}\n", l.items.len()),
        ),
        Err(kube::Error::Api(e)) => full(
            StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("{}: {}\n", e.reason, e.message),
        ),
        Err(e) => full(StatusCode::BAD_GATEWAY, format!("error: {e}\n")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let process_start = Instant::now();
    let args = Args::parse();
    if let Some(code) = args.crash_with {
        eprintln!("testapp: crashing on purpose with exit code {code}");
        std::process::exit(code);
    }
    let listen = match args.listen {
        Some(a) => a,
        None => {
            let ip = std::env::var("POD_IP").unwrap_or_else(|_| "127.0.0.1".into());
            SocketAddr::new(ip.parse()?, args.port)
        }
    };
    if args.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.startup_delay_ms)).await;
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("testapp: cannot listen on {listen}: {e}"))?;
    let app = Arc::new(App {
        name: std::env::var("POD_NAME").unwrap_or_else(|_| "testapp".into()),
        started: Instant::now(),
        startup: process_start.elapsed(),
        ready_after: Duration::from_millis(args.ready_delay_ms),
        delay: Duration::from_millis(args.delay_ms),
        requests: AtomicU64::new(0),
        first_request: std::sync::OnceLock::new(),
    });
    eprintln!("testapp: listening on {listen}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { eprintln!("testapp: accept: {e}"); continue; }
            },
            _ = term.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    // Like a well-behaved app: stop accepting, finish the requests in progress (idle
    // keep-alive connections are closed), then exit.
    drop(listener);
    let drained = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_ok();
    eprintln!(
        "testapp: SIGTERM, served {} requests, drained={drained}",
        app.requests.load(Ordering::Relaxed)
    );
    Ok(())
}
