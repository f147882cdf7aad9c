//! The admin server of both binaries: `/livez`, `/readyz` (from a `watch` flag),
//! `/metrics` (OpenMetrics text from the binary's registry) and any routes of the
//! binary's own (the activator's stats stream).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::auth::TokenCheck;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
/// The answer of a binary's own route, made asynchronously (it may ask the API server).
pub type RouteAnswer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
/// A binary's own routes: `None` for a path it does not serve.
pub type Routes = Box<dyn Fn(&Request<Incoming>) -> Option<RouteAnswer> + Send + Sync>;

/// A short plain-text answer.
pub fn text(status: StatusCode, msg: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(msg.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub struct Admin {
    /// True while the process should receive work.
    pub ready: watch::Receiver<bool>,
    /// The metrics in OpenMetrics text.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    pub routes: Option<Routes>,
    /// When set, `/metrics` is for the readers it allows (`--metrics-audience`).
    pub metrics_auth: Option<Arc<TokenCheck>>,
}

impl Admin {
    pub async fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        if let Some(r) = self.routes.as_ref().and_then(|f| f(req)) {
            return r.await;
        }
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "ok\n"),
            "/readyz" if *self.ready.borrow() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                if let Some(auth) = &self.metrics_auth
                    && let Err(refused) = auth.check(req.headers()).await
                {
                    return refused;
                }
                let mut r = text(StatusCode::OK, (self.metrics)());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves until the task is dropped; accept errors are logged and retried. Every
    /// connection is bounded (see [`AdminLimits`]): a flood of slow or idle
    /// connections from some clients cannot keep another (the kubelet's probe, the
    /// operator's stats stream) out, nor use up the process's file descriptors.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        self.serve_with(listener, AdminLimits::default()).await
    }

    pub async fn serve_with(
        self: Arc<Self>,
        listener: TcpListener,
        limits: AdminLimits,
    ) -> anyhow::Result<()> {
        let open = Arc::new(OpenConnections::default());
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let builder = Arc::new(builder);
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("admin accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over a bound the connection is closed at once: the client sees it and
            // may retry, and nothing waits on its behalf.
            let Some(slot) = open.take(remote.ip(), &limits) else {
                drop(stream);
                continue;
            };
            let me = self.clone();
            let builder = builder.clone();
            let (idle, first) = (limits.idle_timeout, limits.header_read_timeout);
            tokio::spawn(async move {
                let _slot = slot;
                // hyper's header timeout runs from a request's first byte: a connection
                // that sends nothing is cut here.
                match tokio::time::timeout(first, stream.peek(&mut [0u8; 1])).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let svc = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(&req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                // A connection lasts as long as it is used: a stream that is being
                // answered (the stats stream) is, an idle kept-alive one is not.
                let _ = tokio::time::timeout(idle, conn).await;
            });
        }
    }
}

/// The bounds of the admin server.
#[derive(Debug, Clone)]
pub struct AdminLimits {
    /// Connections open at once, all clients together (well below the file-descriptor
    /// limit: the data path needs those).
    pub max_connections: usize,
    /// Connections open at once from one client address: one client's flood leaves
    /// room for the others (the kubelet probes from its node's address).
    pub max_per_client: usize,
    /// Connections past `max_connections` for clients that have none open.
    pub reserve: usize,
    /// A client must send its request head within this time.
    pub header_read_timeout: Duration,
    /// The longest a connection stays open (the stats stream reconnects after it).
    pub idle_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_client: 64,
            reserve: 64,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Open admin connections, in all and per client address.
#[derive(Default)]
struct OpenConnections {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection's place, given back when dropped.
struct Slot {
    open: Arc<OpenConnections>,
    ip: IpAddr,
}

impl OpenConnections {
    fn take(self: &Arc<Self>, ip: IpAddr, limits: &AdminLimits) -> Option<Slot> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *g;
        let mine = per.entry(ip).or_default();
        // Past the bound in all, a client with no connection open still gets in while
        // the reserve lasts: a flood from many addresses leaves room for the next
        // client (the kubelet's next probe), never for more of the flood.
        let admit = *mine < limits.max_per_client
            && (*total < limits.max_connections
                || (*mine == 0 && *total < limits.max_connections + limits.reserve));
        if !admit {
            if *mine == 0 {
                per.remove(&ip);
            }
            return None;
        }
        *total += 1;
        *mine += 1;
        Some(Slot {
            open: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.open.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per) = &mut *g;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(from: IpAddr, addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind((from, 0).into())?;
        let mut c = s.connect(addr).await?;
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// 1,000 connections that never send a head, from 100 other addresses than the
    /// prober's: /readyz is still answered at once, the flood is capped per client and
    /// in all, and each slow connection is cut after the header timeout.
    #[tokio::test]
    async fn readyz_is_answered_under_a_flood_of_slow_connections() {
        let (tx, rx) = watch::channel(true);
        let admin = Arc::new(Admin {
            ready: rx,
            metrics: Box::new(String::new),
            metrics_auth: None,
            routes: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = AdminLimits {
            max_connections: 256,
            max_per_client: 4,
            reserve: 8,
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
        };
        tokio::spawn(admin.serve_with(listener, limits));
        let mut flood = Vec::new();
        for i in 0..1000u32 {
            // From 127.0.1.0 to 127.0.1.99: 100 clients, 10 connections each (400
            // within the per-client bound, more than the 256 in all).
            let from: IpAddr = format!("127.0.1.{}", i % 100).parse().unwrap();
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind((from, 0).into()).unwrap();
            flood.push(s.connect(addr).await.unwrap());
        }
        let start = std::time::Instant::now();
        let r = get("127.0.0.1".parse().unwrap(), addr, "/readyz")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        // The flood got at most the bound in all; the rest was closed at once.
        let mut closed = 0;
        for c in &mut flood {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_millis(2), c.read(&mut b)).await;
            if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, 1000 - 256, "closed at once of 1000");
        // After the header timeout, the slow ones are cut too.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for c in &mut flood {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "a slow connection still open"
            );
        }
        tx.send_replace(false);
        let r = get("127.0.0.1".parse().unwrap(), addr, "/readyz")
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    }
}
