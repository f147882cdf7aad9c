//! One listener per (ScaledService, Service port), on the activator port the operator
//! assigned. The port a connection arrives on says which service it is for; the Host
//! header is never used for routing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::fast;
use crate::proxy::{Parked, Proxy, Route, forwarded_for};
use crate::rules::{self, FirstRequest};

/// Whether the connection opens with the HTTP/2 preface, read without consuming it (so
/// hyper reads the request from the socket itself). None: closed first.
async fn starts_with_h2_preface(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut buf = [0u8; rules::H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != rules::H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n == rules::H2_PREFACE.len() {
            return Ok(Some(true));
        }
        // A prefix of the preface so far ("P…"): wait for more (the caller bounds it).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A client must send its request headers within this time.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer); larger ones get 431.
    pub max_header_bytes: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_h2_streams: u32,
    /// Let the HTTP/1.1 fast path take the requests it can (off: hyper serves all;
    /// the differential tests compare the two).
    pub fast_path: bool,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_h2_streams: 1000,
            fast_path: true,
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
    /// Every client connection's task (parked or served).
    tasks: TaskTracker,
    /// Cancelled when the activator stops accepting (shutdown); open connections
    /// then finish their requests and close.
    pub stop_accepting: CancellationToken,
}

impl Listeners {
    pub fn new(proxy: Arc<Proxy>, bind: IpAddr, limits: ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            bind,
            limits,
            open: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
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
        desired: &HashMap<u16, Arc<Route>>,
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
            for (port, route) in desired {
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
                .iter()
                .filter(|(p, _)| !open.contains_key(p))
                .map(|(p, r)| (*p, r.clone()))
                .collect()
        };
        for (port, route) in to_open {
            match listen(SocketAddr::new(self.bind, port)) {
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
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(self.limits.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_h2_streams);
        let builders = Arc::new((h1, h2));
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
            self.tasks.spawn(self.clone().connection(
                stream,
                remote,
                port,
                route.clone(),
                builders.clone(),
            ));
        }
    }

    /// One client connection: wait for its first bytes, park an HTTP/1.x one while its
    /// service has no pod (see [`Proxy::park`]), then serve it with hyper as HTTP/1.1 or, when it
    /// opens with the HTTP/2 preface, h2c.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        port: u16,
        route: watch::Receiver<Option<Arc<Route>>>,
        builders: Arc<(http1::Builder, http2::Builder<TokioExecutor>)>,
    ) {
        let limit = self.limits.header_read_timeout;
        let max = self.limits.max_header_bytes;
        let cold = |route: &watch::Receiver<Option<Arc<Route>>>| {
            route
                .borrow()
                .as_ref()
                .is_some_and(|r| !r.service.has_pod(&r.port_name))
        };
        // Nothing is woken or parked for a connection that sends nothing (a TCP probe).
        // A sleeping service wakes only for a complete, valid HTTP/1.x request head:
        // junk, TLS hellos, malformed, oversized or Host-less heads are answered
        // (400/431 by hyper or the proxy) or closed without a wake. For a cold service
        // the head is judged at once (one peek that waits for the bytes); otherwise the
        // first byte is waited for, and the head judged only if the service went to
        // sleep meanwhile. An HTTP/2 connection is not parked: its clients (gRPC's
        // among them) wait for the server's SETTINGS before sending a request, so
        // hyper's HTTP/2 server takes it as soon as the preface is there, and its
        // first request wakes the service inside the proxy (`Proxy::handle`).
        if !cold(&route) {
            match tokio::time::timeout(limit, stream.peek(&mut [0u8; 1])).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        let head = if cold(&route) {
            match tokio::time::timeout(limit, first_request(&stream, max)).await {
                Ok(Some(judged)) => Some(judged),
                // Closed, or no complete head within the header read timeout.
                Ok(None) | Err(_) => return,
            }
        } else {
            None
        };
        let since = Instant::now();
        let mut parked_since = None;
        // Whether the connection speaks h2c, when the head was judged.
        let h2_known = head.as_ref().map(|(v, _)| *v == FirstRequest::H2);
        let current = match (route.borrow().clone(), head) {
            (Some(r), Some((verdict, bytes))) => match verdict {
                // A health check it answers itself (`answerWhileAsleep`) wakes
                // nothing either: the proxy answers it.
                FirstRequest::Complete
                    if r.service.has_answers()
                        && rules::method_and_path(&bytes)
                            .is_some_and(|(m, p)| r.service.is_asleep_answer(m, p)) =>
                {
                    None
                }
                FirstRequest::Complete => Some(r),
                _ => None,
            },
            (other, _) => other,
        };
        if let Some(r) = current {
            match self
                .proxy
                .park(&r.service, &r.port_name, &stream, since)
                .await
            {
                Parked::NotNeeded => {}
                // (A parked connection is HTTP/1.x: its head was judged, or it opened
                // while the service was awake; then it may still be h2c.)
                Parked::Full(queued)
                    if !match h2_known {
                        Some(h2) => h2,
                        None => starts_h2(&stream).await,
                    } =>
                {
                    let answer = self.proxy.queue_full_answer(&r.service, queued);
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                    // Read what the client sent (bounded), so closing does not reset
                    // the connection before it has read the answer.
                    let mut sink = [0u8; 4096];
                    let drain = async {
                        let mut left = 64 * 1024;
                        while left > 0 {
                            match stream.read(&mut sink).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => left -= n.min(left),
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    return;
                }
                Parked::Full(_) => {}
                Parked::Closed => return,
                Parked::Released | Parked::TimedOut => {
                    parked_since = Some(since);
                    // Waiting consumed the read readiness of the bytes already there;
                    // a fresh registration reports them again.
                    stream = match stream.into_std().and_then(TcpStream::from_std) {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(port, %remote, "re-register: {e}");
                            return;
                        }
                    };
                }
            }
        }
        let h2 = match h2_known {
            Some(h2) => h2,
            None => match tokio::time::timeout(limit, starts_with_h2_preface(&stream)).await {
                Ok(Ok(Some(h2))) => h2,
                _ => return,
            },
        };
        let forwarded_for = forwarded_for(remote.ip());
        // HTTP/1.1 takes the fast path while its requests qualify; what it read of a
        // request it passes on goes to hyper first.
        let mut read = Bytes::new();
        if !h2 && self.limits.fast_path && !self.stop_accepting.is_cancelled() {
            let inbound = fast::Inbound {
                proxy: &self.proxy,
                route: &route,
                forwarded_for: forwarded_for.as_bytes(),
                header_read_timeout: limit,
                max_header_bytes: self.limits.max_header_bytes,
                stop: &self.stop_accepting,
                parked_since: &mut parked_since,
            };
            match fast::serve(inbound, stream).await {
                fast::Outcome::Done => return,
                fast::Outcome::Fallback(s, b) => (stream, read) = (s, b),
            }
        }
        let proxy = self.proxy.clone();
        let parked_since = std::sync::Mutex::new(parked_since);
        let svc = hyper::service::service_fn(move |req| {
            let current = route.borrow().clone();
            let proxy = proxy.clone();
            let since = parked_since.lock().ok().and_then(|mut p| p.take());
            let forwarded_for = forwarded_for.clone();
            async move {
                Ok::<_, Infallible>(
                    proxy
                        .handle(current, port, req, &forwarded_for, since)
                        .await,
                )
            }
        });
        let io = TokioIo::new(Rewind { read, stream });
        let r = if h2 {
            let conn = builders.1.serve_connection(io, svc);
            self.serve(conn, |c| c.graceful_shutdown()).await
        } else if self.stop_accepting.is_cancelled() {
            // Draining: answer this connection's request, then close it.
            let mut h1 = builders.0.clone();
            h1.keep_alive(false);
            h1.serve_connection(io, svc).with_upgrades().await
        } else {
            let conn = builders.0.serve_connection(io, svc).with_upgrades();
            self.serve(conn, |c| c.graceful_shutdown()).await
        };
        if let Err(e) = r {
            debug!(port, %remote, "connection: {e}");
        }
    }

    /// Runs a hyper connection; once the activator drains, asks it to finish its
    /// requests and close.
    async fn serve<F, E>(&self, conn: F, shutdown: impl FnOnce(Pin<&mut F>)) -> Result<(), E>
    where
        F: Future<Output = Result<(), E>>,
    {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            _ = self.stop_accepting.cancelled() => {}
        }
        shutdown(conn.as_mut());
        conn.await
    }

    /// Stops accepting, asks open connections to finish their requests, and waits for
    /// them up to `grace`. Returns true when all finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stop_accepting.cancel();
        self.tasks.close();
        // Served and parked connections alike: their requests were accepted.
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// A client connection handed from the fast path to hyper: the bytes the fast path
/// read are read again first.
struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accept queue asked of the kernel (capped by `net.core.somaxconn`, 4,096 on
/// current kernels). tokio's `bind` asks for 1,024: a burst of 2,000 first requests
/// overflowed it and the dropped SYNs came back a second later.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `bind` sets).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Peeks at a new connection until its first request can be judged (the bytes stay in
/// the socket for whoever serves it), with the bytes peeked; `None` when the client
/// closed first.
async fn first_request(stream: &TcpStream, max: usize) -> Option<(FirstRequest, Vec<u8>)> {
    let mut buf = vec![0u8; 4096.min(max)];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        match rules::first_request(&buf[..n], max) {
            FirstRequest::Partial if n == buf.len() && n < max => {
                buf.resize((2 * n).min(max), 0);
            }
            FirstRequest::Partial => {
                // Peeking leaves the socket readable: wait a little for more.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            verdict => {
                buf.truncate(n);
                return Some((verdict, buf));
            }
        }
    }
}

/// Whether the connection opens with the HTTP/2 preface (peeked).
async fn starts_h2(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    matches!(stream.peek(&mut buf).await, Ok(n) if n >= 3 && buf[..n.min(24)].starts_with(&rules::H2_PREFACE[..n.min(24)]))
}
