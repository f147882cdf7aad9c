//! Connections to pods: HTTP/1.1 connections kept idle per pod for reuse (bounded),
//! one shared HTTP/2 connection per pod for h2c. A connection is made before a request
//! is handed over, so a refused connection can be retried on another pod without the
//! request having been sent.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

pub enum Conn {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

/// A map by pod address, looked up on every request: foldhash (seeded per map) instead
/// of SipHash, whose hashing of a `SocketAddr` took ~450 instructions per request on
/// the fast path (a checkout and a put). The keys are pod addresses from EndpointSlices,
/// not what a client sends.
type ByPod<V> = HashMap<SocketAddr, V, foldhash::fast::RandomState>;

pub struct Pool {
    h1: Mutex<ByPod<Vec<http1::SendRequest<Incoming>>>>,
    /// Idle plain connections of the HTTP/1.1 fast path (`crate::fast`).
    raw: Mutex<ByPod<Vec<TcpStream>>>,
    h2: Mutex<ByPod<http2::SendRequest<Incoming>>>,
    /// One HTTP/2 handshake in progress per pod; the others wait for its connection.
    h2_dialing: Mutex<ByPod<Arc<tokio::sync::Mutex<()>>>>,
    /// Connection attempts in progress per pod are bounded: when a pod appears with
    /// thousands of held requests, they reuse the connections the first ones opened
    /// instead of flooding the pod's accept queue.
    connecting: Mutex<ByPod<Arc<Semaphore>>>,
    connect_timeout: Duration,
    max_idle_per_pod: usize,
}

/// Most new connections to one pod that have not yet carried a response (connects in
/// progress included). A connect completes when the pod's kernel queues it, not when the
/// app accepts it: releasing 2,000 held requests at once made 2,000 connections, the
/// pod's accept queue (1,024 for a tokio listener) overflowed, and the dropped SYNs
/// were retransmitted a second later (`TcpExtListenOverflows`; answers at 1.05–1.1 s).
/// Bounding the *unproven* connections instead makes the rest wait for one of them to
/// come back to the pool, and reuse it.
const MAX_CONNECTING_PER_POD: usize = 32;

/// A new connection's place under [`MAX_CONNECTING_PER_POD`]: keep it until the
/// connection has carried its first response head (the pod accepted and answered).
#[derive(Default)]
pub struct Unproven(Option<tokio::sync::OwnedSemaphorePermit>);

impl Unproven {
    /// The connection answered: its place goes to the next request.
    pub fn proven(&mut self) {
        self.0 = None;
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration, max_idle_per_pod: usize) -> Arc<Self> {
        Arc::new(Self {
            h1: Mutex::default(),
            raw: Mutex::default(),
            h2: Mutex::default(),
            h2_dialing: Mutex::default(),
            connecting: Mutex::default(),
            connect_timeout,
            max_idle_per_pod,
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// The bound on connection attempts in progress to `addr`.
    fn gate(&self, addr: SocketAddr) -> Arc<Semaphore> {
        self.connecting
            .lock()
            .entry(addr)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONNECTING_PER_POD)))
            .clone()
    }

    /// A plain connection to `addr` for the HTTP/1.1 fast path: an idle pooled one
    /// when there is one, else a new one (under the same bound on connects in
    /// progress as the hyper connections).
    /// `true` with a reused connection; a new one comes with its [`Unproven`] place.
    pub async fn checkout_raw(&self, addr: SocketAddr) -> io::Result<(TcpStream, bool, Unproven)> {
        if let Some(s) = self.idle_raw(addr) {
            return Ok((s, true, Unproven::default()));
        }
        let permit = self
            .gate(addr)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        if let Some(s) = self.idle_raw(addr) {
            return Ok((s, true, Unproven::default()));
        }
        Ok((self.connect(addr).await?, false, Unproven(Some(permit))))
    }

    /// A new plain connection to `addr` (under the bound on unproven connections).
    pub async fn connect_raw(&self, addr: SocketAddr) -> io::Result<(TcpStream, Unproven)> {
        let permit = self
            .gate(addr)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        Ok((self.connect(addr).await?, Unproven(Some(permit))))
    }

    fn idle_raw(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.raw.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(s) = list.pop() {
            // An idle connection has nothing to read: one that reads (the end of the
            // stream, or bytes nobody asked for) was closed by the pod or is broken.
            // No system call unless the socket was reported readable.
            match s.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(s),
                _ => continue,
            }
        }
        None
    }

    /// Puts a plain connection back after a complete response.
    pub fn put_raw(&self, addr: SocketAddr, s: TcpStream) {
        let mut idle = self.raw.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle_per_pod {
            list.push(s);
        }
    }

    /// A connection to `addr`: an idle pooled one when there is one, else a new one.
    /// `fresh` forces a new HTTP/1.1 connection (for upgrades, which consume it).
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        h2: bool,
        fresh: bool,
    ) -> io::Result<(Conn, Unproven)> {
        if h2 {
            let shared = || {
                self.h2
                    .lock()
                    .get(&addr)
                    .filter(|s| s.is_ready())
                    .map(|s| Conn::H2(s.clone()))
            };
            if let Some(c) = shared() {
                return Ok((c, Unproven::default()));
            }
            // One dial at a time per pod: requests released together wait for the
            // first one's handshake and share its connection instead of each opening
            // one (the SYN flood the HTTP/1 bound prevents).
            let dialing = self
                .h2_dialing
                .lock()
                .entry(addr)
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone();
            let _dialing = dialing.lock().await;
            if let Some(c) = shared() {
                return Ok((c, Unproven::default()));
            }
            let io = TokioIo::new(self.connect(addr).await?);
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.h2.lock().insert(addr, send.clone());
            return Ok((Conn::H2(send), Unproven::default()));
        }
        if !fresh && let Some(s) = self.idle(addr) {
            return Ok((Conn::H1(s), Unproven::default()));
        }
        let permit = self
            .gate(addr)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        // While this request waited, another may have finished and returned its
        // connection.
        if !fresh && let Some(s) = self.idle(addr) {
            return Ok((Conn::H1(s), Unproven::default()));
        }
        let io = TokioIo::new(self.connect(addr).await?);
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok((Conn::H1(send), Unproven(Some(permit))))
    }

    fn idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.h1.lock();
        let list = idle.get_mut(&addr)?;
        // Closed connections go; one that is still finishing its last response (its
        // connection task has not run yet) stays for the next request.
        list.retain(|s| !s.is_closed());
        let i = list.iter().rposition(|s| s.is_ready())?;
        Some(list.swap_remove(i))
    }

    /// Puts an HTTP/1.1 connection back; called when its response body is done (see
    /// [`Lease`]), so no task is needed to wait for it.
    fn put(&self, addr: SocketAddr, send: http1::SendRequest<Incoming>) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.h1.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle_per_pod {
            list.push(send);
        }
    }

    /// Idle connections kept, HTTP/1.1 (hyper and plain) and HTTP/2, to `addr` or to
    /// every pod.
    pub fn idle_count(&self, addr: Option<SocketAddr>) -> usize {
        let count = |n: usize, a: &SocketAddr| if addr.is_none_or(|x| x == *a) { n } else { 0 };
        self.h1
            .lock()
            .iter()
            .map(|(a, l)| count(l.len(), a))
            .sum::<usize>()
            + self
                .raw
                .lock()
                .iter()
                .map(|(a, l)| count(l.len(), a))
                .sum::<usize>()
            + self.h2.lock().keys().map(|a| count(1, a)).sum::<usize>()
    }

    /// Forgets the connections of a pod that is gone (it left the EndpointSlices, or
    /// refused a connection): idle ones are closed now, so none outlives the pod.
    pub fn forget(&self, addr: &SocketAddr) {
        self.h1.lock().remove(addr);
        self.raw.lock().remove(addr);
        self.h2.lock().remove(addr);
        self.h2_dialing.lock().remove(addr);
        self.connecting.lock().remove(addr);
    }
}

/// An HTTP/1.1 connection lent to one request; it goes back to the pool when dropped
/// (with the response body, once the client has it all).
pub struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
    send: Option<http1::SendRequest<Incoming>>,
}

impl Lease {
    pub fn new(pool: Arc<Pool>, addr: SocketAddr, send: http1::SendRequest<Incoming>) -> Self {
        Self {
            pool,
            addr,
            send: Some(send),
        }
    }

    /// Closes the connection instead of returning it (its request failed or timed out).
    pub fn discard(mut self) {
        self.send = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.send.take() {
            self.pool.put(self.addr, s);
        }
    }
}
