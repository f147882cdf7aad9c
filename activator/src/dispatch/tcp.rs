//! Dispatch for a TCP port (`spec.ports[].protocol: TCP`, or a Service port whose
//! `appProtocol` is not HTTP): no request to read, so nothing to classify or answer.
//! While the service sleeps, a connection wakes it (on its first byte, or on connect
//! for protocols whose server speaks first) and waits through admission like a held
//! request — the same queues, bounds and activation timeout; its bytes stay in the
//! kernel's socket buffer meanwhile. Then it is joined to a ready pod byte for byte in
//! both directions, each half closed when its side closes. A queue that is full or a
//! timeout closes the connection: there is no answer to send. A client that reads
//! nothing of its pod's bytes is cut at the send timeout.
//!
//! Must not: read a byte of the client's before a pod takes it (what the client sent
//! while it waited goes to the pod untouched).

use std::sync::Arc;
use std::time::{Duration, Instant};

use snooze_crds::{TcpActivity, TcpMode, WakeOn};
use tokio::net::TcpStream;
use tracing::debug;

use super::{Io, Proxy, Route};
use crate::admit::{Connection, Parked, Ticket};

/// Longest wait for a pod to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pods tried for one connection before it is closed.
const MAX_TRIES: usize = 3;
/// Each direction's relay buffer.
const BUFFER: usize = 64 * 1024;

/// Serves one client connection of a TCP port. `first_byte_timeout` bounds how long a
/// silent connection (a TCP health check) is kept while the service sleeps and the
/// port wakes on the first byte; `send_timeout` how long the pod's bytes may wait on a
/// client that reads nothing before the connection is closed (and its pod slot freed).
pub async fn serve(
    proxy: &Proxy,
    route: Arc<Route>,
    mode: TcpMode,
    mut client: TcpStream,
    first_byte_timeout: Duration,
    send_timeout: Duration,
) {
    let svc = &route.service;
    let port = route.port_name.as_str();
    let since = Instant::now();
    if mode.wake_on == WakeOn::FirstByte && !svc.has_pod(port) {
        match first_byte(&client, &route, first_byte_timeout).await {
            Some(()) => {}
            None => return,
        }
    }
    let mut ticket = match proxy.admit.park(svc, port, &client, since).await {
        Parked::NotNeeded => Ticket::new(since),
        // Counted as queue_full where the queue refused it; the client sees a close.
        Parked::Full(_) | Parked::Closed => return,
        Parked::Waited(t) => {
            // Waiting consumed the read readiness of the bytes already there.
            client = match client.into_std().and_then(TcpStream::from_std) {
                Ok(s) => s,
                Err(e) => {
                    debug!("re-register: {e}");
                    return;
                }
            };
            t
        }
    };
    let peer = client
        .peer_addr()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| {
            a.ip().to_canonical()
        });
    let activity = Arc::new(Connection::start(
        svc.clone(),
        mode.activity == TcpActivity::Connections,
        &crate::activity::Seen::tcp(peer),
    ));
    let mut refused = Vec::new();
    for _ in 0..MAX_TRIES {
        // A timeout is counted there; the client sees a close.
        let Ok(slot) = proxy
            .admit
            .acquire(svc, port, &mut ticket, &refused, None)
            .await
        else {
            return;
        };
        let addr = slot.addr();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(pod)) => {
                let _ = pod.set_nodelay(true);
                let mut from_client = Io::new(client)
                    .counting(svc.metrics.tcp_received.clone(), activity.clone())
                    .send_timeout(
                        send_timeout,
                        proxy.admit.table.metrics.send_timeouts.clone(),
                    );
                // A pod that reads nothing only holds back its own client.
                let mut from_pod =
                    Io::new(pod).counting(svc.metrics.tcp_sent.clone(), activity.clone());
                let r = tokio::io::copy_bidirectional_with_sizes(
                    &mut from_client,
                    &mut from_pod,
                    BUFFER,
                    BUFFER,
                )
                .await;
                if let Err(e) = r {
                    debug!(service = %svc.display, %addr, "tcp relay: {e}");
                }
                drop(slot);
                return;
            }
            Ok(Err(e)) => debug!(service = %svc.display, %addr, "pod refused: {e}"),
            Err(_) => debug!(service = %svc.display, %addr, "pod connect timed out"),
        }
        refused.push(addr);
    }
}

/// Waits for the client's first byte while the service sleeps: `None` when the client
/// closed or sent nothing within `limit`. A pod that becomes ready meanwhile (someone
/// else woke the service) ends the wait too: the connection is joined at once.
async fn first_byte(client: &TcpStream, route: &Route, limit: Duration) -> Option<()> {
    let mut rx = route.service.subscribe();
    let ready = async {
        loop {
            rx.mark_unchanged();
            if route.service.has_pod(&route.port_name) {
                return;
            }
            if rx.changed().await.is_err() {
                // The service is gone: let admission say so.
                return;
            }
        }
    };
    let mut one = [0u8; 1];
    tokio::select! {
        r = client.peek(&mut one) => match r {
            Ok(n) if n > 0 => Some(()),
            _ => None,
        },
        _ = ready => Some(()),
        _ = tokio::time::sleep(limit) => None,
    }
}
