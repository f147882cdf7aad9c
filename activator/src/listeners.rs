//! One listener per (ScaledService, Service port), on the activator port the operator
//! assigned. The port a connection arrives on says which service it is for; the Host
//! header is never used for routing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::{Proxy, Route};

#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A client must send its request headers within this time.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_h2_streams: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_h2_streams: 1000,
        }
    }
}

struct Handle {
    route: watch::Sender<Option<Arc<Route>>>,
    cancel: CancellationToken,
}

pub struct Listeners {
    proxy: Arc<Proxy>,
    bind: IpAddr,
    limits: ServerLimits,
    open: Mutex<HashMap<u16, Handle>>,
    graceful: Mutex<Option<GracefulShutdown>>,
    /// Cancelled when the activator stops accepting (shutdown).
    pub stop_accepting: CancellationToken,
}

impl Listeners {
    pub fn new(proxy: Arc<Proxy>, bind: IpAddr, limits: ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            bind,
            limits,
            open: Mutex::new(HashMap::new()),
            graceful: Mutex::new(Some(GracefulShutdown::new())),
            stop_accepting: CancellationToken::new(),
        })
    }

    /// Ports with an open listener.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.open.lock().keys().copied().collect();
        p.sort_unstable();
        p
    }

    /// Opens, updates and closes listeners so that exactly `desired` are served.
    /// Returns the ports that could not be opened.
    pub async fn sync(
        self: &Arc<Self>,
        desired: HashMap<u16, Arc<Route>>,
    ) -> Vec<(u16, io::Error)> {
        let mut failed = Vec::new();
        {
            let mut open = self.open.lock();
            open.retain(|port, h| {
                if desired.contains_key(port) {
                    true
                } else {
                    info!(port, "closing listener");
                    // Connections still open on it answer 503 from now on.
                    h.route.send_replace(None);
                    h.cancel.cancel();
                    false
                }
            });
            for (port, route) in &desired {
                if let Some(h) = open.get(port) {
                    let same = h.route.borrow().as_ref().is_some_and(|r| {
                        Arc::ptr_eq(&r.service, &route.service)
                            && r.port_name == route.port_name
                            && r.h2c == route.h2c
                    });
                    if !same {
                        h.route.send_replace(Some(route.clone()));
                    }
                }
            }
        }
        let to_open: Vec<(u16, Arc<Route>)> = {
            let open = self.open.lock();
            desired
                .into_iter()
                .filter(|(p, _)| !open.contains_key(p))
                .collect()
        };
        for (port, route) in to_open {
            match TcpListener::bind(SocketAddr::new(self.bind, port)).await {
                Ok(l) => {
                    info!(port, service = %route.service.display, "listening");
                    let (tx, rx) = watch::channel(Some(route));
                    let cancel = self.stop_accepting.child_token();
                    self.open.lock().insert(
                        port,
                        Handle {
                            route: tx,
                            cancel: cancel.clone(),
                        },
                    );
                    tokio::spawn(self.clone().accept_loop(l, port, rx, cancel));
                }
                Err(e) => {
                    warn!(port, "cannot listen: {e}");
                    failed.push((port, e));
                }
            }
        }
        self.proxy.stats.set_listening(self.ports());
        failed
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        route: watch::Receiver<Option<Arc<Route>>>,
        cancel: CancellationToken,
    ) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        warn!(port, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.proxy.clone();
            let route = route.clone();
            let svc = hyper::service::service_fn(move |req| {
                let current = route.borrow().clone();
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(current, port, req, remote).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(self.limits.header_read_timeout)
                .max_buf_size(self.limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(self.limits.max_h2_streams);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let watched = self.graceful.lock().as_ref().map(|g| g.watch(conn));
            if let Some(conn) = watched {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(port, %remote, "connection: {e}");
                    }
                });
            }
        }
    }

    /// Stops accepting, asks open connections to finish their requests, and waits for
    /// them up to `grace`. Returns true when all finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stop_accepting.cancel();
        let g = self.graceful.lock().take();
        match g {
            Some(g) => tokio::time::timeout(grace, g.shutdown()).await.is_ok(),
            None => true,
        }
    }
}
