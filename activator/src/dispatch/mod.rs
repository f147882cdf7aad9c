//! Dispatch: a classified, admitted connection's requests forwarded to pods, by one of
//! two paths chosen once per request — the HTTP/1.1 fast path ([`fast`]) while a
//! request qualifies, hyper ([`hyper_path`]) for the rest — both through one pool of
//! connections to pods ([`pool`]) that bounds the dials to a pod, HTTP/1 and HTTP/2
//! alike. A TCP port's connections take [`tcp`] instead: admitted like a request, then
//! relayed byte for byte on a connection of their own (no pool: a TCP connection is
//! not reused). Writes to a client that reads nothing end at the send timeout
//! ([`SendDeadline`], for hyper's connection I/O and the TCP relay; the fast path
//! bounds its own writes).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::admit::Admission;
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

/// The send timeout of a client connection (`--send-timeout`, like nginx's
/// `send_timeout`): a write that waits on a client reading nothing fails once it has
/// waited this long, which ends the connection and frees what it held (its request, a
/// pod slot). Wraps the outcome of each write (and flush) to the client.
pub struct SendDeadline {
    limit: Duration,
    /// Since when writes have been waiting (the timer), none while they go through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    timeouts: Counter,
}

impl SendDeadline {
    pub fn new(limit: Duration, timeouts: Counter) -> Self {
        Self {
            limit,
            stalled: None,
            timeouts,
        }
    }

    /// Passes a write's outcome on; a write still pending after the limit is an error.
    pub fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
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
