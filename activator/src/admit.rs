//! Admission: the one place where a request of a service gets a pod, a place in the
//! queue, or a refusal. It owns the service's queue (its own bound and the
//! activator-wide one), the wake signal, the per-pod concurrency slots and the request
//! bookkeeping (received, in flight, last request). Both data paths, every HTTP/2
//! stream and every TCP connection ([`Connection`]) come here; a connection parked before its first request was read holds its
//! place here as a [`Ticket`] and gives it to that request, so a request enters the
//! queue once and wakes a service once, whichever path serves it.
//!
//! Must not: read or write a socket's bytes (parking only watches for the peer's
//! close), or build an answer's bytes (that is `answer`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::activity::Seen;
use crate::answer::Answer;
use crate::stats::StatsHub;
use crate::table::{EndpointSet, ServiceEntry, Slot, Table};
use crate::waiting::Page;

/// The activator's clock for activity: wall-clock milliseconds (what the operator
/// compares with its own clock), converted from a monotonic instant the caller has
/// already read (on the fast path a request's stamps add no clock read of their
/// own). The wall clock is sampled at the first use and again at every stats report
/// ([`sync_wall_clock`]), so a step of the system clock shows within one report.
struct WallClock {
    origin: Instant,
    /// Wall-clock milliseconds at `origin`, as of the last sample.
    origin_ms: AtomicU64,
}

fn wall_clock() -> &'static WallClock {
    static CLOCK: OnceLock<WallClock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let origin = Instant::now();
        WallClock {
            origin,
            origin_ms: AtomicU64::new(system_ms()),
        }
    })
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds at `at`.
pub(crate) fn wall_ms(at: Instant) -> u64 {
    let c = wall_clock();
    c.origin_ms.load(Ordering::Relaxed) + at.saturating_duration_since(c.origin).as_millis() as u64
}

pub(crate) fn now_ms() -> u64 {
    wall_ms(Instant::now())
}

/// Samples the wall clock again (see [`WallClock`]).
pub(crate) fn sync_wall_clock() {
    let c = wall_clock();
    let since = Instant::now()
        .saturating_duration_since(c.origin)
        .as_millis() as u64;
    c.origin_ms
        .store(system_ms().saturating_sub(since), Ordering::Relaxed);
}

/// The admission of one activator: the services' table (queues, pods) and the wake
/// signal to the operator.
pub struct Admission {
    pub table: Arc<Table>,
    pub stats: Arc<StatsHub>,
}

/// A place in a service's queue and in the activator-wide bound, given back when
/// dropped.
pub struct Place {
    service: Arc<ServiceEntry>,
    table: Arc<Table>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.service.queued.fetch_sub(1, Ordering::AcqRel);
        self.table.queued_total.fetch_sub(1, Ordering::AcqRel);
        self.service.metrics.queued.dec();
    }
}

/// A request's standing in admission: when it started waiting (its activation timeout
/// runs from then) and, while it waits, its place in the queue. The place taken when
/// the request waited (parked, or held) is the only one it ever takes, and taking it
/// sent the wake: a ticket that has one never queues or wakes again.
pub struct Ticket {
    pub since: Instant,
    place: Option<Place>,
}

impl Ticket {
    /// A request that starts now (or started at `since`) and holds no place yet.
    pub fn new(since: Instant) -> Self {
        Self { since, place: None }
    }
}

/// What became of a connection parked before its first request was read.
pub enum Parked {
    /// The service has a pod for this port: nothing to wait for.
    NotNeeded,
    /// A queue was full: the request's 503, to be written at once.
    Full(Answer),
    /// A pod became ready while the connection waited, or the activation timeout
    /// passed (the request then gets its 504 from [`Admission::acquire`]): the ticket
    /// goes to the connection's first request.
    Waited(Ticket),
    /// The client went away while waiting.
    Closed,
}

/// A request being served: counted for its service (received, last request, in
/// flight) until dropped. An `answerWhileAsleep` request is not activity: it shows in
/// the metrics only.
pub struct InFlight {
    service: Arc<ServiceEntry>,
    pub counted: bool,
    /// [`InFlight::end`] was called: the drop has nothing left to do.
    ended: bool,
}

impl InFlight {
    /// `seen`: who sent it, for the summary of who keeps the service awake (counted
    /// requests only).
    pub fn start(service: Arc<ServiceEntry>, counted: bool, seen: Option<&Seen>) -> Self {
        Self::start_at(service, counted, seen, Instant::now())
    }

    /// [`InFlight::start`] for a request that came at `at`.
    pub fn start_at(
        service: Arc<ServiceEntry>,
        counted: bool,
        seen: Option<&Seen>,
        at: Instant,
    ) -> Self {
        if counted {
            let now = wall_ms(at);
            service.requests.fetch_add(1, Ordering::Relaxed);
            service.last_request_ms.store(now, Ordering::Relaxed);
            service.in_flight.fetch_add(1, Ordering::Relaxed);
            if let Some(seen) = seen {
                service.seen(seen, now);
            }
        }
        service.metrics.in_flight.inc();
        Self {
            service,
            counted,
            ended: false,
        }
    }

    /// The request's end, at `at` (dropping it ends it now).
    pub fn end(mut self, at: Instant) {
        self.finish(at);
        self.ended = true;
    }

    fn finish(&self, at: Instant) {
        self.service.metrics.in_flight.dec();
        if !self.counted {
            return;
        }
        self.service.in_flight.fetch_sub(1, Ordering::Relaxed);
        // A request's end is activity: idle time runs from the last moment anything
        // was open (an SSE stream that ends starts the idle clock then, not at its
        // start).
        self.service
            .last_request_ms
            .fetch_max(wall_ms(at), Ordering::Relaxed);
    }

    /// The request was not sent and will be again (a stale pooled connection): it is
    /// received once, whatever the tries.
    pub fn retried(self) {
        if self.counted {
            self.service.requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.ended {
            self.finish(Instant::now());
        }
    }
}

/// A TCP connection being served: one "request" when it opens (activity, and the
/// autoscaler's count), then activity on every relayed byte ([`Connection::traffic`]).
/// It holds the service awake for its whole life only when `holds_awake`
/// (`activity: Connections`); otherwise silence lets the idle clock run.
pub struct Connection {
    service: Arc<ServiceEntry>,
    _in_flight: InFlight,
}

impl Connection {
    pub fn start(service: Arc<ServiceEntry>, holds_awake: bool, seen: &Seen) -> Self {
        let in_flight = InFlight::start(service.clone(), holds_awake, Some(seen));
        if !holds_awake {
            let now = now_ms();
            service.requests.fetch_add(1, Ordering::Relaxed);
            service.last_request_ms.fetch_max(now, Ordering::Relaxed);
            service.seen(seen, now);
        }
        Self {
            service,
            _in_flight: in_flight,
        }
    }

    /// Bytes went through, one way or the other: the idle clock starts again.
    pub fn traffic(&self) {
        self.service
            .last_request_ms
            .fetch_max(now_ms(), Ordering::Relaxed);
    }
}

/// A reserved pod slot, given back when dropped.
pub struct SlotGuard {
    pub service: Arc<ServiceEntry>,
    pub slot: Slot,
}

impl SlotGuard {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.slot.endpoint.ip, self.slot.port)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.service.release(&self.slot.endpoint);
    }
}

/// Resolves when the peer closes or resets the connection. Pending request bytes do
/// not count: each readiness event is consumed and the next one awaited.
async fn peer_closed(stream: &tokio::net::TcpStream) {
    loop {
        match stream.ready(tokio::io::Interest::READABLE).await {
            Ok(r) if r.is_read_closed() => return,
            Err(_) => return,
            Ok(_) => {
                let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

fn has_pod(eps: &EndpointSet, port_name: &str) -> bool {
    eps.iter().any(|e| e.port(port_name).is_some())
}

impl Admission {
    /// A pod slot at once, without waiting: the fast path's admission (a request that
    /// would wait goes to the hyper path, which waits in [`Admission::acquire`]).
    pub fn try_pick(&self, svc: &Arc<ServiceEntry>, port_name: &str) -> Option<SlotGuard> {
        let slot = svc.pick(port_name, svc.settings().pod_concurrency, &[])?;
        Some(SlotGuard {
            service: svc.clone(),
            slot,
        })
    }

    /// The one wake rule: a request that must wait takes a place in the service's
    /// queue and in the activator-wide bound (refused when either is full), and the
    /// service is woken when it has no ready pod for the request's port. A ticket that
    /// already holds a place keeps it and wakes nothing.
    fn hold(&self, svc: &Arc<ServiceEntry>, port_name: &str, t: &mut Ticket) -> Result<(), Answer> {
        if t.place.is_some() {
            return Ok(());
        }
        // The service's own bound, under the ceiling every service shares.
        let max = svc
            .settings()
            .max_queued
            .min(self.table.max_queued_per_service);
        let q = svc.queued.fetch_add(1, Ordering::AcqRel);
        let g = self.table.queued_total.fetch_add(1, Ordering::AcqRel);
        let place = Place {
            service: svc.clone(),
            table: self.table.clone(),
        };
        svc.metrics.queued.inc();
        if q >= max || g >= self.table.max_queued_total {
            svc.metrics.queue_full.inc();
            if q < max {
                self.table.metrics.shed_global.inc();
            }
            return Err(Answer::QueueFull { queued: q });
        }
        t.place = Some(place);
        if !svc.has_pod(port_name) {
            self.stats.wake(svc);
            crate::probe::start(svc);
        }
        Ok(())
    }

    /// A new connection for a service with no pod for its port: wait, without reading
    /// the request, until a pod is ready, the activation timeout passes, or the client
    /// goes away. The request stays in the kernel's socket buffer meanwhile, so a
    /// parked connection costs the activator a socket and a small task, not HTTP
    /// buffers. It holds its place in the queue (see [`Ticket`]) and the wake is sent
    /// at once, like a request held inside the proxy.
    ///
    /// After `Waited` the stream's read readiness may have been consumed: register it
    /// afresh before reading from it.
    pub async fn park(
        &self,
        svc: &Arc<ServiceEntry>,
        port_name: &str,
        stream: &tokio::net::TcpStream,
        since: Instant,
    ) -> Parked {
        let mut rx = svc.subscribe();
        if has_pod(&rx.borrow_and_update(), port_name) {
            return Parked::NotNeeded;
        }
        let mut ticket = Ticket::new(since);
        if let Err(full) = self.hold(svc, port_name, &mut ticket) {
            return Parked::Full(full);
        }
        // With a waiting page, a connection waits unread only as long as a page load
        // would: then its request is read, and a page load gets the page.
        let wait = svc.waiting_page().map_or(svc.settings().timeout, |p| {
            p.after.min(svc.settings().timeout)
        });
        let deadline = tokio::time::Instant::from_std(since + wait);
        let mut closed = std::pin::pin!(peer_closed(stream));
        loop {
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() || has_pod(&rx.borrow_and_update(), port_name) {
                        svc.metrics.cold_wait.observe(since.elapsed().as_secs_f64());
                        return Parked::Waited(ticket);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Parked::Waited(ticket),
                _ = &mut closed => return Parked::Closed,
            }
        }
    }

    /// A pod slot for a request, waiting for one (in the queue, within the activation
    /// timeout from `ticket.since`) while there is none. Pods in `exclude` refused this
    /// request and are passed over while another can take it; when none can, they are
    /// tried again (the attempts are bounded by the caller). A browser's page load
    /// (`page`: the service's waiting page) waits only the page's `after` (at most the
    /// timeout) and then gets the page.
    pub async fn acquire(
        &self,
        svc: &Arc<ServiceEntry>,
        port_name: &str,
        ticket: &mut Ticket,
        exclude: &[SocketAddr],
        page: Option<&Arc<Page>>,
    ) -> Result<SlotGuard, Answer> {
        let settings = svc.settings();
        let gives_up = |waited: Duration| match page {
            Some(p) => {
                svc.metrics.waiting_pages.inc();
                Answer::WaitingPage(p.clone())
            }
            None => self.timed_out(svc, waited),
        };
        let wait = page.map_or(settings.timeout, |p| p.after.min(settings.timeout));
        let pick = || {
            svc.pick(port_name, settings.pod_concurrency, exclude)
                .or_else(|| {
                    (!exclude.is_empty())
                        .then(|| svc.pick(port_name, settings.pod_concurrency, &[]))
                        .flatten()
                })
                .map(|slot| SlotGuard {
                    service: svc.clone(),
                    slot,
                })
        };
        let held = ticket.place.is_some();
        if let Some(s) = pick() {
            if held {
                svc.metrics
                    .cold_wait
                    .observe(ticket.since.elapsed().as_secs_f64());
            }
            ticket.place = None;
            return Ok(s);
        }
        let deadline = ticket.since + wait;
        if Instant::now() >= deadline {
            return Err(gives_up(ticket.since.elapsed()));
        }
        self.hold(svc, port_name, ticket)?;
        let mut rx = svc.subscribe();
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            if let Some(s) = pick() {
                svc.metrics
                    .cold_wait
                    .observe(ticket.since.elapsed().as_secs_f64());
                ticket.place = None;
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, svc.changed(&mut rx))
                .await
                .is_err()
            {
                return Err(gives_up(ticket.since.elapsed()));
            }
        }
    }

    fn timed_out(&self, svc: &ServiceEntry, waited: Duration) -> Answer {
        svc.timeouts.fetch_add(1, Ordering::Relaxed);
        svc.metrics.activation_timeouts.inc();
        Answer::ActivationTimeout { waited }
    }
}
