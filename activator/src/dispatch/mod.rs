//! Dispatch: a classified, admitted connection's requests forwarded to pods, by one of
//! two paths chosen once per request — the HTTP/1.1 fast path ([`fast`]) while a
//! request qualifies, hyper ([`hyper_path`]) for the rest — both through one pool of
//! connections to pods ([`pool`]) that bounds the dials to a pod, HTTP/1 and HTTP/2
//! alike. A TCP port's connections take [`tcp`] instead: admitted like a request, then
//! relayed byte for byte on a connection of their own (no pool: a TCP connection is
//! not reused). hyper's connection and the TCP relay do their I/O through [`Io`]: a
//! stream with the bytes already read replayed first, its reads counted when asked,
//! and its writes to a client that reads nothing ended at the send timeout (the fast
//! path bounds its own writes).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::admit::{Admission, Connection};
use crate::table::ServiceEntry;

pub mod fast;
pub mod hyper_path;
pub mod pool;
pub mod tcp;

/// Where a listener's requests go: one port of one ScaledService.
pub struct Route {
    pub service: Arc<ServiceEntry>,
    /// Name of the backend Service port ("" when unnamed); selects the pod port.
    pub port_name: String,
    /// The backend speaks HTTP/2 without TLS (`appProtocol: kubernetes.io/h2c`).
    pub h2c: bool,
    /// Served as a TCP stream ([`tcp`]), not as HTTP.
    pub tcp: Option<snooze_crds::TcpMode>,
}

/// The client of a connection, as the pod is told of it.
pub struct Peer {
    /// The client's address (the connection's peer).
    pub ip: std::net::IpAddr,
    /// The client's address as an `X-Forwarded-For` value.
    pub forwarded_for: http::HeaderValue,
    /// The client is a trusted proxy (`--trusted-proxies`): the `X-Forwarded-For` it
    /// sends is extended and its `X-Forwarded-Proto` kept; anyone else's are replaced.
    pub trusted: bool,
}

/// What the data paths share: admission, the pool, the pods' response timeout.
pub struct Proxy {
    pub admit: Admission,
    pub pool: Arc<pool::Pool>,
    /// Longest wait for a pod's response headers.
    pub response_timeout: Duration,
}

/// A connection's stream as hyper's connections and the TCP relay use it, each part
/// asked for when built: the bytes already read from it (by the fast path) read again
/// first; what is read from it counted (a TCP relay's bytes, and activity for the idle
/// clock); its writes ended at the send timeout (a client's).
pub struct Io {
    stream: TcpStream,
    replay: Bytes,
    counted: Option<(Counter, Arc<Connection>)>,
    deadline: Option<SendDeadline>,
}

impl Io {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            replay: Bytes::new(),
            counted: None,
            deadline: None,
        }
    }

    /// `bytes` are read before anything more from the stream.
    pub fn replaying(mut self, bytes: Bytes) -> Self {
        self.replay = bytes;
        self
    }

    /// Bytes read are added to `bytes` and are activity of `connection`.
    pub fn counting(mut self, bytes: Counter, connection: Arc<Connection>) -> Self {
        self.counted = Some((bytes, connection));
        self
    }

    /// A write (or flush) that waits longer than `limit` on a peer reading nothing
    /// fails, counted in `timeouts`.
    pub fn send_timeout(mut self, limit: Duration, timeouts: Counter) -> Self {
        self.deadline = Some(SendDeadline::new(limit, timeouts));
        self
    }

    fn written<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &mut self.deadline {
            Some(d) => d.check(cx, r),
            None => r,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if let Some((bytes, connection)) = &self.counted
            && n > 0
        {
            bytes.inc_by(n as u64);
            connection.traffic();
        }
        r
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.written(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The send timeout of a client connection (`--send-timeout`, like nginx's
/// `send_timeout`): a write that waits on a client reading nothing fails once it has
/// waited this long, which ends the connection and frees what it held (its request, a
/// pod slot). Wraps the outcome of each write (and flush) to the client.
struct SendDeadline {
    limit: Duration,
    /// Since when writes have been waiting (the timer), none while they go through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    timeouts: Counter,
}

impl SendDeadline {
    fn new(limit: Duration, timeouts: Counter) -> Self {
        Self {
            limit,
            stalled: None,
            timeouts,
        }
    }

    /// Passes a write's outcome on; a write still pending after the limit is an error.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timeouts.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within the send timeout",
            )));
        }
        Poll::Pending
    }
}
