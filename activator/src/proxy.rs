//! One request through the activator: find a pod (holding the request in the bounded
//! queue while there is none), forward it with streamed bodies, and answer every
//! request it accepted — with the pod's response or a clear error.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::pool::{Conn, Lease, Pool};
use crate::stats::StatsHub;
use crate::table::{ServiceEntry, Slot, Table};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Where a listener's requests go: one port of one ScaledService.
pub struct Route {
    pub service: Arc<ServiceEntry>,
    /// Name of the backend Service port ("" when unnamed); selects the pod port.
    pub port_name: String,
    /// The backend speaks HTTP/2 without TLS (`appProtocol: kubernetes.io/h2c`).
    pub h2c: bool,
}

pub struct Proxy {
    pub table: Arc<Table>,
    pub pool: Arc<Pool>,
    pub stats: Arc<StatsHub>,
    /// Longest wait for a pod's response headers.
    pub response_timeout: Duration,
}

/// What became of a connection parked before its first request was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// The service has a pod for this port: nothing to wait for.
    NotNeeded,
    /// The queue is full: the request gets its 503 at once (see
    /// [`Proxy::queue_full_answer`]); the service's held count.
    Full(u64),
    /// A pod became ready while the connection waited.
    Released,
    /// The activation timeout passed (the request gets its 504).
    TimedOut,
    /// The client went away while waiting.
    Closed,
}

/// A queue was full: the service's count of held requests, and whether it was the
/// global bound that refused.
struct QueueFull {
    queued: u64,
    global: bool,
}

enum Refusal {
    QueueFull { queued: u64 },
    Timeout { waited: Duration },
}

/// A request being served: counted for its service (received, last request, in
/// flight) until dropped. An `answerWhileAsleep` request is not activity: it shows in
/// the metrics only.
pub(crate) struct InFlight {
    service: Arc<ServiceEntry>,
    pub(crate) counted: bool,
}

impl InFlight {
    pub(crate) fn start(service: Arc<ServiceEntry>, counted: bool) -> Self {
        if counted {
            service.requests.fetch_add(1, Ordering::Relaxed);
            service.last_request_ms.store(now_ms(), Ordering::Relaxed);
            service.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        service.metrics.in_flight.inc();
        Self { service, counted }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
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
            .fetch_max(now_ms(), Ordering::Relaxed);
    }
}

/// A reserved pod slot, given back when dropped.
pub(crate) struct SlotGuard {
    pub(crate) service: Arc<ServiceEntry>,
    pub(crate) slot: Slot,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.service.release(&self.slot.endpoint);
    }
}

struct Queued<'a> {
    service: &'a ServiceEntry,
    table: &'a Table,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.service.queued.fetch_sub(1, Ordering::AcqRel);
        self.table.queued_total.fetch_sub(1, Ordering::AcqRel);
        self.service.metrics.queued.dec();
    }
}

/// A response body that holds the request's guards until the body is finished, so
/// in-flight counts and pod slots cover streamed responses.
struct Guarded<B> {
    inner: B,
    _guards: (InFlight, Option<SlotGuard>, Option<Lease>),
}

impl<B> hyper::body::Body for Guarded<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a response to HEAD: none, ended from the start, with no size of its own
/// (so no server adds a `Content-Length: 0` the pod did not send); holds the request's
/// guards like [`Guarded`].
struct NoContent {
    _guards: (InFlight, Option<SlotGuard>, Option<Lease>),
}

impl hyper::body::Body for NoContent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
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

pub fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static HTTP: HeaderValue = HeaderValue::from_static("http");

/// Whether a header is hop-by-hop by name (or is `TE`, kept only as `trailers`).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::TE || HOP_BY_HOP.iter().any(|h| h == n)
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed list, whatever
/// `Connection` names, and `TE` unless it is `trailers` (gRPC needs it). With
/// `upgrade`, `Connection: upgrade` and `Upgrade` are carried through.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names settles that (a header
    // `Connection` names is only removed when `Connection` itself is there).
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| crate::rules::connection_tokens(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    let upgrade_value = if upgrade {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if h.contains_key(header::TE) {
        let kept: Vec<HeaderValue> = h
            .get_all(header::TE)
            .iter()
            .filter(|v| crate::rules::te_kept(v.as_bytes()))
            .cloned()
            .collect();
        h.remove(header::TE);
        for v in kept {
            h.append(header::TE, v);
        }
    }
    if let Some(u) = upgrade_value {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
}

/// The client's address as an `X-Forwarded-For` value; made once per connection.
pub fn forwarded_for(remote: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&remote.to_string()).expect("an IP address is a valid header value")
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| crate::rules::connection_tokens(v.as_bytes()))
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

impl Proxy {
    /// Handles one request that arrived on a listener; `route` is `None` when the port
    /// has no service any more.
    ///
    /// `parked_since`: when the connection's first request started waiting, if it was
    /// parked before being read (its wait counts against the activation timeout).
    pub async fn handle(
        self: Arc<Self>,
        route: Option<Arc<Route>>,
        listen_port: u16,
        req: Request<Incoming>,
        forwarded_for: &HeaderValue,
        parked_since: Option<Instant>,
    ) -> Response<Body> {
        let Some(route) = route else {
            // The service was removed while this connection stayed open: answer, and
            // close the connection so the client connects afresh.
            let mut resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("snooze: no service is configured on port {listen_port}\n"),
            );
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        };
        let svc = route.service.clone();
        let start = parked_since.unwrap_or_else(Instant::now);
        // The client's errors are answered here, never forwarded and never a wake.
        if let Some(minor) = match req.version() {
            Version::HTTP_10 => Some(0),
            Version::HTTP_11 => Some(1),
            _ => None,
        } && let Err(why) =
            crate::rules::host_fields(minor, req.headers().get_all(header::HOST).iter().count())
        {
            let mut resp = text(
                StatusCode::BAD_REQUEST,
                format!("snooze: bad request: {why}\n"),
            );
            // Like hyper after a malformed head: the connection ends with this answer.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            svc.metrics.response(resp.status().as_u16());
            return resp;
        }
        // Health checks (`answerWhileAsleep`): answered here while no pod is ready,
        // forwarded otherwise; never activity.
        let (method, path) = (req.method().as_str(), req.uri().path());
        let quiet = svc.is_asleep_answer(method, path);
        if quiet
            && !svc.has_pod(&route.port_name)
            && let Some(a) = svc.asleep_answer(method, path)
        {
            let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
            let resp = text(status, a.body.unwrap_or_default());
            svc.metrics.asleep_answers.inc();
            svc.metrics.response(resp.status().as_u16());
            return resp;
        }
        let in_flight = InFlight::start(svc.clone(), !quiet);
        let resp = self
            .serve(&route, in_flight, req, forwarded_for, start)
            .await;
        svc.metrics.response(resp.status().as_u16());
        svc.metrics.latency.observe(start.elapsed().as_secs_f64());
        resp
    }

    /// A new connection for a service with no pod for its port: wait, without reading
    /// the request, until a pod is ready, the activation timeout passes, or the client
    /// goes away. The request stays in the kernel's socket buffer meanwhile, so a
    /// parked connection costs the activator a socket and a small task, not HTTP
    /// buffers. It takes a place in the service's queue and in the global bound and
    /// sends the wake signal at once, like a request held inside the proxy.
    ///
    /// After `Released` or `TimedOut` the stream's read readiness may have been
    /// consumed: register it afresh before reading from it.
    pub async fn park(
        &self,
        svc: &Arc<ServiceEntry>,
        port_name: &str,
        stream: &tokio::net::TcpStream,
        since: Instant,
    ) -> Parked {
        let has_pod =
            |eps: &crate::table::EndpointSet| eps.iter().any(|e| e.port(port_name).is_some());
        let mut rx = svc.subscribe();
        if has_pod(&rx.borrow_and_update()) {
            return Parked::NotNeeded;
        }
        let settings = svc.settings();
        // A full queue is counted (and answered) when the request is served.
        let _queued = match self.enter_queue(svc, settings.max_queued) {
            Ok(q) => q,
            Err(full) => {
                if full.global {
                    self.table.metrics.shed_global.inc();
                }
                return Parked::Full(full.queued);
            }
        };
        self.stats.wake(svc);
        crate::probe::start(svc);
        let deadline = tokio::time::Instant::from_std(since + settings.timeout);
        let mut closed = std::pin::pin!(peer_closed(stream));
        loop {
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() || has_pod(&rx.borrow_and_update()) {
                        svc.metrics.cold_wait.observe(since.elapsed().as_secs_f64());
                        return Parked::Released;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Parked::TimedOut,
                _ = &mut closed => return Parked::Closed,
            }
        }
    }

    /// Takes a place in the service's queue and in the global bound, held until the
    /// returned guard drops; refused (and given back) when either is full.
    fn enter_queue<'a>(
        &'a self,
        svc: &'a ServiceEntry,
        max_queued: u64,
    ) -> Result<Queued<'a>, QueueFull> {
        let q = svc.queued.fetch_add(1, Ordering::AcqRel);
        let g = self.table.queued_total.fetch_add(1, Ordering::AcqRel);
        let place = Queued {
            service: svc,
            table: &self.table,
        };
        svc.metrics.queued.inc();
        if q >= max_queued || g >= self.table.max_queued_total {
            svc.metrics.queue_full.inc();
        }
        if q >= max_queued {
            return Err(QueueFull {
                queued: q,
                global: false,
            });
        }
        if g >= self.table.max_queued_total {
            return Err(QueueFull {
                queued: q,
                global: true,
            });
        }
        Ok(place)
    }

    /// The whole answer to a new connection's first request that found the queue full:
    /// 503 with `Retry-After` and `Connection: close`, written by the listener without
    /// handing the connection to hyper (a burst's refusals are answered in
    /// milliseconds). Counted like any request.
    pub fn queue_full_answer(&self, svc: &ServiceEntry, queued: u64) -> Vec<u8> {
        svc.requests.fetch_add(1, Ordering::Relaxed);
        svc.last_request_ms.store(now_ms(), Ordering::Relaxed);
        svc.metrics.response(503);
        let body = queue_full_text(svc, queued);
        crate::rules::answer(503, &body, &[("retry-after", "1"), ("connection", "close")])
    }

    async fn acquire(
        &self,
        svc: &Arc<ServiceEntry>,
        port_name: &str,
        start: Instant,
        exclude: &[SocketAddr],
    ) -> Result<Slot, Refusal> {
        let settings = svc.settings();
        // Pods that refused this request are passed over while another can take it; when
        // none can, they are tried again (the attempts are bounded by the caller).
        let pick = || {
            svc.pick(port_name, settings.pod_concurrency, exclude)
                .or_else(|| {
                    (!exclude.is_empty())
                        .then(|| svc.pick(port_name, settings.pod_concurrency, &[]))
                        .flatten()
                })
        };
        if let Some(s) = pick() {
            return Ok(s);
        }
        // A request whose wait is already over (a connection parked until the timeout)
        // gets its 504 now: no second place in the queue, no second wake.
        let deadline = start + settings.timeout;
        if Instant::now() >= deadline {
            return Err(Refusal::Timeout {
                waited: start.elapsed(),
            });
        }
        // Hold the request: a place in the service's queue and in the global bound.
        let _queued = match self.enter_queue(svc, settings.max_queued) {
            Ok(q) => q,
            Err(full) => {
                if full.global {
                    self.table.metrics.shed_global.inc();
                }
                return Err(Refusal::QueueFull {
                    queued: full.queued,
                });
            }
        };
        let mut rx = svc.subscribe();
        let deadline = tokio::time::Instant::from_std(deadline);
        if svc.endpoints().is_empty() {
            self.stats.wake(svc);
            crate::probe::start(svc);
        }
        loop {
            if let Some(s) = pick() {
                svc.metrics.cold_wait.observe(start.elapsed().as_secs_f64());
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, svc.changed(&mut rx))
                .await
                .is_err()
            {
                return Err(Refusal::Timeout {
                    waited: start.elapsed(),
                });
            }
        }
    }

    async fn serve(
        &self,
        route: &Route,
        in_flight: InFlight,
        mut req: Request<Incoming>,
        forwarded_for: &HeaderValue,
        start: Instant,
    ) -> Response<Body> {
        let svc = &route.service;
        let head = req.method() == http::Method::HEAD;
        let upgrade = is_upgrade(&req);
        let h2 = route.h2c || (req.version() == Version::HTTP_2 && !upgrade);
        rewrite_request(&mut req, forwarded_for, upgrade, h2);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        // Pick a pod and connect. A pod that refuses the connection is passed over for
        // this request (it has not been sent yet): the next pick goes to another pod,
        // or waits for one like a cold request. Three refusals end in 502.
        let mut tried: Vec<SocketAddr> = Vec::new();
        if !h2 {
            set_origin_form(&mut req);
        }
        let mut req = Some(req);
        let mut lease: Option<Lease> = None;
        let mut unproven: crate::pool::Unproven;
        let (slot, mut resp) = 'attempt: loop {
            let (slot, conn) = loop {
                let slot = match self.acquire(svc, &route.port_name, start, &tried).await {
                    Ok(s) => s,
                    Err(Refusal::QueueFull { queued }) => {
                        let mut r = text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            queue_full_text(svc, queued),
                        );
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        return r;
                    }
                    Err(Refusal::Timeout { waited }) => {
                        svc.timeouts.fetch_add(1, Ordering::Relaxed);
                        svc.metrics.activation_timeouts.inc();
                        return text(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "snooze: {} had no ready pod after waiting {:.1}s\n",
                                svc.display,
                                waited.as_secs_f64()
                            ),
                        );
                    }
                };
                let guard = SlotGuard {
                    service: svc.clone(),
                    slot,
                };
                let addr = SocketAddr::new(guard.slot.endpoint.ip, guard.slot.port);
                match self.pool.checkout(addr, h2, upgrade).await {
                    Ok((c, u)) => {
                        unproven = u;
                        break (guard, c);
                    }
                    Err(e) => {
                        warn!(service = %svc.display, %addr, "connect failed: {e}");
                        self.pool.forget(&addr);
                        tried.push(addr);
                        if tried.len() >= 3 {
                            return text(
                                StatusCode::BAD_GATEWAY,
                                format!(
                                    "snooze: {}: could not connect to a pod ({addr}: {e})\n",
                                    svc.display
                                ),
                            );
                        }
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            let addr = SocketAddr::new(slot.slot.endpoint.ip, slot.slot.port);
            let Some(mut this) = req.take() else {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "snooze: request lost\n".into(),
                );
            };
            // An HTTP/1.0 request may come without Host; it goes on as HTTP/1.1, which
            // needs one: the pod's address, as a client calling it directly would send.
            if !h2
                && !this.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(&addr.to_string())
            {
                this.headers_mut().insert(header::HOST, v);
            }
            let sent = match conn {
                Conn::H1(mut s) => {
                    let r =
                        tokio::time::timeout(self.response_timeout, s.try_send_request(this)).await;
                    if !upgrade {
                        lease = Some(Lease::new(self.pool.clone(), addr, s));
                    }
                    r
                }
                Conn::H2(mut s) => {
                    tokio::time::timeout(self.response_timeout, s.try_send_request(this)).await
                }
            };
            // The connection carried a response head, or failed: its place goes on.
            unproven.proven();
            match sent {
                Ok(Ok(r)) => break 'attempt (slot, r),
                // The connection closed before the request was written (a pod closing
                // its idle keep-alive connections, or shutting down): it was not sent, so
                // it goes to another connection or pod.
                Ok(Err(mut e)) if e.message().is_some() && tried.len() < 2 => {
                    debug!(service = %svc.display, %addr, "not sent, retrying: {}", e.error());
                    req = e.take_message();
                    tried.push(addr);
                    drop(slot);
                    continue 'attempt;
                }
                Ok(Err(e)) => {
                    if let Some(l) = lease.take() {
                        l.discard();
                    }
                    let e = e.into_error();
                    // The request's own body failed (a malformed chunk, a client gone
                    // mid-body): the client's error, not the pod's.
                    if e.is_user() {
                        let why = std::error::Error::source(&e)
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| e.to_string());
                        debug!(service = %svc.display, %addr, "request body: {why}");
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("snooze: {}: bad request body: {why}\n", svc.display),
                        );
                    }
                    debug!(service = %svc.display, %addr, "upstream error: {e}");
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "snooze: {}: pod {addr} failed before answering: {e}\n",
                            svc.display
                        ),
                    );
                }
                Err(_) => {
                    if let Some(l) = lease.take() {
                        l.discard();
                    }
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "snooze: {}: pod {addr} did not answer within {}s\n",
                            svc.display,
                            self.response_timeout.as_secs()
                        ),
                    );
                }
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let guards = (in_flight, slot);
            tokio::spawn(async move {
                let _guards = guards;
                if let (Ok(c), Ok(u)) = tokio::join!(client_upgrade, upstream_upgrade) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(
                parts,
                http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
            );
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        let (parts, body) = resp.into_parts();
        let guards = (in_flight, Some(slot), lease);
        if head {
            // A response to HEAD has no content (RFC 9110 §9.3.2), whatever its
            // Content-Length says and whatever a pod sends after it (hyper's HTTP/2
            // server, for one, sends a handler's body): an empty body ends an h2c
            // answer with its HEADERS frame.
            drop(body);
            return Response::from_parts(parts, BodyExt::boxed(NoContent { _guards: guards }));
        }
        let body = Guarded {
            inner: body,
            _guards: guards,
        };
        Response::from_parts(parts, BodyExt::boxed(body))
    }
}

/// The body of a 503 for a full queue, the same on every path.
fn queue_full_text(svc: &ServiceEntry, queued: u64) -> String {
    format!(
        "snooze: {} has too many requests waiting ({queued}); retry later\n",
        svc.display
    )
}

/// Prepares a request for the pod: hop-by-hop headers out, `X-Forwarded-*` in, `Host`
/// kept, and the request line in the form the upstream protocol wants.
fn rewrite_request(
    req: &mut Request<Incoming>,
    forwarded_for: &HeaderValue,
    upgrade: bool,
    h2: bool,
) {
    // The authority is copied only when it has to move (into the h2 `:authority`, or
    // into a Host header an h2 client did not send).
    // An absolute-form target's authority replaces Host (RFC 9112 §3.2.2); otherwise
    // Host stays, and moves into `:authority` for h2.
    let has_host = req.headers().contains_key(header::HOST);
    let authority = match req.uri().authority() {
        Some(a) if req.version() != Version::HTTP_2 => Some(a.to_string()),
        _ if h2 || !has_host => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string())),
        _ => None,
    };
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let xff = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) => HeaderValue::from_bytes(&crate::rules::forwarded_for(
            Some(prev),
            forwarded_for.as_bytes(),
        ))
        .ok(),
        None => Some(forwarded_for.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HTTP.clone());
    }
    if h2 {
        headers.remove(header::HOST);
        let auth = authority.unwrap_or_else(|| "localhost".into());
        if let Ok(u) = Uri::builder()
            .scheme("http")
            .authority(auth)
            .path_and_query(path_and_query(req))
            .build()
        {
            *req.uri_mut() = u;
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert(header::HOST, a);
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

fn path_and_query(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string()
}

fn set_origin_form(req: &mut Request<Incoming>) {
    if req.uri().authority().is_some()
        && let Ok(u) = path_and_query(req).parse()
    {
        *req.uri_mut() = u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header_too() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");

        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        plain.insert(header::TE, HeaderValue::from_static("trailers"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain, before);
    }

    #[test]
    fn te_trailers_and_upgrade_survive() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
