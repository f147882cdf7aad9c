//! Accept: one listener per (ScaledService, Service port), on the activator port the
//! operator assigned, and the connection's way through the stages after it (classify,
//! admit, dispatch), each entered once; a TCP port's connections go to
//! `dispatch::tcp`, which has no request to classify or answer. The port a connection arrives on says which
//! service it is for; the Host header is never used for routing. Owns the listeners,
//! the connections' tasks and the drain.
//!
//! Must not: parse a request, queue or wake (that is `classify` and `admit`), or build
//! an answer (that is `answer`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admit::{InFlight, Parked};
use crate::answer;
use crate::classify::{Class, FirstRequest, classify};
use crate::dispatch::hyper_path::forwarded_for;
use crate::dispatch::{Io, Peer, Proxy, Route, fast};
use crate::rules;

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
    /// Most client connections open at once on all listeners; at the limit the
    /// listeners stop accepting until one closes (new clients wait in the kernel's
    /// accept queue: backpressure, never a file-descriptor exhaustion).
    pub max_connections: usize,
    /// A write to a client that reads nothing for this long cuts the connection (like
    /// nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Clients whose `X-Forwarded-For`/`-Proto` are trusted (an ingress controller's
    /// pods): extended and kept. Anyone else's are replaced with what the activator
    /// sees, so a client cannot make a pod believe it comes from elsewhere.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_h2_streams: 1000,
            fast_path: true,
            max_connections: 50_000,
            send_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
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
    /// One permit per open client connection (`ServerLimits::max_connections`).
    connections: Arc<tokio::sync::Semaphore>,
    /// Started when the activator stops accepting (shutdown); open connections then
    /// finish their requests and close.
    pub drain: Drain,
}

/// The activator's drain as its connections see it: a flag that every request reads
/// without a lock, and a token to wait on.
#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    token: CancellationToken,
}

impl Drain {
    pub fn start(&self) {
        // Set before the waiters wake: a waiter that wakes finds it set.
        self.started.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Cancelled when the drain starts.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Listeners {
    pub fn new(proxy: Arc<Proxy>, bind: IpAddr, limits: ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
            proxy,
            bind,
            limits,
            open: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            drain: Drain::default(),
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
                            && r.tcp == route.tcp
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
                    let cancel = self.drain.token().child_token();
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
        self.proxy.admit.stats.set_listening(self.ports());
        failed
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        route: watch::Receiver<Option<Arc<Route>>>,
        cancel: CancellationToken,
    ) {
        let at = Arc::new(Listening {
            port,
            route,
            builders: self.builders(),
        });
        loop {
            // A place for the next connection first: at the cap, nothing is accepted.
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = self.connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
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
            let task = self
                .clone()
                .connection_task(stream, remote, at.clone(), permit);
            self.tasks.spawn(task);
        }
    }

    /// hyper's servers for a listener's connections, with the limits.
    fn builders(&self) -> (http1::Builder, http2::Builder<TokioExecutor>) {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(self.limits.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_h2_streams);
        (h1, h2)
    }

    /// One client connection's task: [`Self::connection`], counted in
    /// `client_connections`, holding its place under the connection cap until it ends.
    /// What it holds is what each held request costs while its service wakes: the
    /// connection's future is made inside the task (made outside and moved in, the
    /// task would hold it twice: as the moved value and as the awaited one).
    fn connection_task(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        at: Arc<Listening>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send + 'static {
        let metrics = self.proxy.admit.table.metrics.clone();
        metrics.client_connections.inc();
        async move {
            self.connection(stream, remote, at).await;
            metrics.client_connections.dec();
            drop(permit);
        }
    }

    /// One client connection, through the stages in order: classify its first bytes,
    /// park an HTTP/1.x one whose first request would wake its sleeping service (admit),
    /// then dispatch its requests — the fast path while they qualify, hyper for the
    /// rest and for h2c.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        at: Arc<Listening>,
    ) {
        let (port, route) = (at.port, &at.route);
        let limit = self.limits.header_read_timeout;
        // A TCP port has no requests: its own admission and relay (`dispatch::tcp`).
        let tcp = route.borrow().clone().and_then(|r| r.tcp.map(|m| (r, m)));
        if let Some((r, mode)) = tcp {
            Box::pin(crate::dispatch::tcp::serve(
                &self.proxy,
                r,
                mode,
                stream,
                limit,
                self.limits.send_timeout,
            ))
            .await;
            return;
        }
        // Classify. Nothing is woken or parked for a connection that sends nothing (a
        // TCP probe), and a sleeping service wakes only for a complete, valid HTTP/1.x
        // request head: junk, TLS hellos, malformed, oversized or Host-less heads are
        // answered (400/431 by hyper or the proxy) or closed without a wake. An HTTP/2
        // connection is not parked: its clients (gRPC's among them) wait for the
        // server's SETTINGS before sending a request, so hyper's HTTP/2 server takes it
        // as soon as the preface is there, and its first request is admitted like any.
        let asleep = || {
            route
                .borrow()
                .as_ref()
                .is_some_and(|r| !r.service.has_pod(&r.port_name))
        };
        let class = match tokio::time::timeout(
            limit,
            classify(&stream, self.limits.max_header_bytes, asleep),
        )
        .await
        {
            Ok(Some(c)) => c,
            // Closed, or no bytes (or no complete head, asleep) within the timeout.
            Ok(None) | Err(_) => return,
        };
        // Admit: a first request that would wake the service waits here, unread.
        let mut ticket = None;
        let wakes = match (&class, route.borrow().clone()) {
            (
                Class::H1 {
                    judged: Some((FirstRequest::Complete, head)),
                },
                Some(r),
            ) => {
                // A health check it answers itself (`answerWhileAsleep`) wakes nothing.
                let quiet = r.service.has_answers()
                    && rules::method_and_path(head)
                        .is_some_and(|(m, p)| r.service.is_asleep_answer(m, p));
                (!quiet).then_some(r)
            }
            _ => None,
        };
        // The peeked head is not kept while the connection waits (a parked connection
        // costs a socket and a small task, not a 4 KB buffer).
        let h2 = class == Class::H2;
        drop(class);
        if let Some(r) = wakes {
            let since = Instant::now();
            match self
                .proxy
                .admit
                .park(&r.service, &r.port_name, &stream, since)
                .await
            {
                Parked::NotNeeded => {}
                Parked::Full(answer) => {
                    // The refused request is counted like any, and answered at once
                    // without hyper (a burst's refusals take milliseconds).
                    drop(InFlight::start(r.service.clone(), true, None));
                    answer::record(&r.service, answer.status(), since);
                    let bytes = answer.raw(&r.service.display, true);
                    refuse(&mut stream, &bytes).await;
                    return;
                }
                Parked::Closed => return,
                Parked::Waited(t) => {
                    ticket = Some(t);
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
        // Dispatch, in a future of its own allocated only now: a parked connection's
        // task holds just the stages before (the dispatch state is most of the
        // connection future's size: 10,000 parked connections took 46 MB more with it
        // inline).
        Box::pin(self.dispatch(stream, remote, at, h2, ticket)).await;
    }

    /// Dispatch: the fast path while requests qualify, then hyper (HTTP/1.1 or h2c).
    async fn dispatch(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        at: Arc<Listening>,
        h2: bool,
        mut ticket: Option<crate::admit::Ticket>,
    ) {
        let port = at.port;
        let limit = self.limits.header_read_timeout;
        // Dispatch. HTTP/1.1 takes the fast path while its requests qualify; what it
        // read of a request it passes on goes to hyper first.
        let client = remote.ip().to_canonical();
        let peer = Arc::new(Peer {
            ip: client,
            forwarded_for: forwarded_for(client),
            trusted: self
                .limits
                .trusted_proxies
                .iter()
                .any(|n| n.contains(&client)),
        });
        let mut read = Bytes::new();
        if !h2 && self.limits.fast_path && !self.drain.started() {
            let inbound = fast::Inbound {
                proxy: &self.proxy,
                route: &at.route,
                peer: &peer,
                header_read_timeout: limit,
                max_header_bytes: self.limits.max_header_bytes,
                send_timeout: self.limits.send_timeout,
                stop: &self.drain,
                ticket: &mut ticket,
            };
            match fast::serve(inbound, stream).await {
                fast::Outcome::Done => return,
                fast::Outcome::Fallback(s, b) => (stream, read) = (s, b),
            }
        }
        let proxy = self.proxy.clone();
        let ticket = std::sync::Mutex::new(ticket);
        let listening = at.clone();
        let svc = hyper::service::service_fn(move |req| {
            let current = listening.route.borrow().clone();
            let proxy = proxy.clone();
            let ticket = ticket.lock().ok().and_then(|mut t| t.take());
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(proxy.handle(current, port, req, &peer, ticket).await) }
        });
        let io = TokioIo::new(Io::new(stream).replaying(read).send_timeout(
            self.limits.send_timeout,
            self.proxy.admit.table.metrics.send_timeouts.clone(),
        ));
        let r = if h2 {
            let conn = at.builders.1.serve_connection(io, svc);
            self.serve(conn, |c| c.graceful_shutdown()).await
        } else if self.drain.started() {
            // Draining: answer this connection's request, then close it.
            let mut h1 = at.builders.0.clone();
            h1.keep_alive(false);
            h1.serve_connection(io, svc).with_upgrades().await
        } else {
            let conn = at.builders.0.serve_connection(io, svc).with_upgrades();
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
            _ = self.drain.token().cancelled() => {}
        }
        shutdown(conn.as_mut());
        conn.await
    }

    /// Stops accepting, asks open connections to finish their requests, and waits for
    /// them up to `grace`. Returns true when all finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.drain.start();
        self.tasks.close();
        // Served and parked connections alike: their requests were accepted.
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// The listener a connection came in on, shared by its connections: the port, where
/// its requests go (changed when the service or its pods change), hyper's servers.
struct Listening {
    port: u16,
    route: watch::Receiver<Option<Arc<Route>>>,
    builders: (http1::Builder, http2::Builder<TokioExecutor>),
}

/// The accept queue asked of the kernel (capped by `net.core.somaxconn`, 4,096 on
/// current kernels). tokio's `bind` asks for 1,024: a burst of 2,000 first requests
/// overflowed it and the dropped SYNs came back a second later.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `bind` sets);
/// also the burst benchmark's floor server, so that it has the same accept queue.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Writes a refusal and closes: the client's request is read (bounded) first, so
/// closing does not reset the connection before the client has read the answer.
async fn refuse(stream: &mut TcpStream, answer: &[u8]) {
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
    // On the heap: an array here would be part of every connection's future (this
    // function is awaited inline), parked or not — 4 KB of each of 10,000 held requests.
    let mut sink = vec![0u8; 4096];
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::Admission;
    use crate::dispatch::pool::Pool;
    use crate::metrics::Metrics;
    use crate::stats::StatsHub;
    use crate::table::Table;

    /// A held request is a connection's task waiting in `park`: its size is most of
    /// what 10,000 held requests cost (10.5 KB each when a refusal's 4 KB buffer was
    /// inline and the task held the connection's future twice; 2 KB in all with both
    /// gone, measured by RSS). Here, unoptimised: 1,088 bytes; 2,016 with the future
    /// held twice, 4,928 with the buffer inline.
    #[tokio::test]
    async fn a_connections_task_is_small() {
        let metrics = Arc::new(Metrics::new());
        let table = Arc::new(Table::new(metrics, 100));
        let stats = StatsHub::new(table.clone(), "test".into(), Duration::from_secs(1));
        let proxy = Arc::new(Proxy {
            admit: Admission { table, stats },
            pool: Pool::new(Duration::from_secs(1), 4),
            response_timeout: Duration::from_secs(1),
        });
        let listeners =
            Listeners::new(proxy, "127.0.0.1".parse().unwrap(), ServerLimits::default());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, remote) = l.accept().await.unwrap();
        let permit = listeners.connections.clone().acquire_owned().await.unwrap();
        let (_tx, route) = watch::channel(None);
        let at = Arc::new(Listening {
            port: addr.port(),
            route,
            builders: listeners.builders(),
        });
        let task = listeners
            .clone()
            .connection_task(stream, remote, at, permit);
        let size = std::mem::size_of_val(&task);
        eprintln!("a connection's task: {size} bytes");
        assert!(size <= 1536, "a connection's task takes {size} bytes");
    }
}
