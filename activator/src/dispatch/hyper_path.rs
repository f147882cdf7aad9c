//! Dispatch, the hyper path: every request the fast path does not take — HTTP/2
//! streams, upgrades, requests that must wait for a pod, bodies not read in full, and
//! what hyper itself must answer (malformed heads: 400, 431). Each request is judged
//! (the client's errors, health checks answered while asleep), admitted
//! (`admit::Admission::acquire`: a pod slot, waiting in the queue while there is none),
//! forwarded over the pool with streamed bodies, and answered — with the pod's response
//! or an `answer::Answer` — and counted once (`answer::record`).
//!
//! Must not: queue, wake or count a request itself (that is `admit`), or build an
//! answer's text (that is `answer`).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::pool::{Conn, Lease};
use super::{Peer, Proxy, Route};
use crate::activity::Seen;
use crate::admit::{InFlight, SlotGuard, Ticket};
use crate::answer::{self, Answer, Body, BoxError};

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
    /// `ticket`: the admission of the connection's first request when the connection
    /// was parked before being read (its wait counts against the activation timeout,
    /// and its place in the queue is the request's).
    pub async fn handle(
        self: Arc<Self>,
        route: Option<Arc<Route>>,
        listen_port: u16,
        req: Request<Incoming>,
        peer: &Peer,
        ticket: Option<Ticket>,
    ) -> Response<Body> {
        let Some(route) = route else {
            // The service was removed while this connection stayed open: answer, and
            // close the connection so the client connects afresh.
            return Answer::NoService { port: listen_port }.response("");
        };
        let svc = route.service.clone();
        let mut ticket = ticket.unwrap_or_else(|| Ticket::new(Instant::now()));
        let start = ticket.since;
        let resp = match self.judge(&route, &req) {
            Err(answer) => answer.response(&svc.display),
            Ok(counted) => {
                let h = req.headers();
                let seen = Seen {
                    client: Seen::client_of(
                        peer.ip,
                        peer.trusted,
                        h.get("x-forwarded-for").map(|v| v.as_bytes()),
                    ),
                    agent: h.get(header::USER_AGENT).map_or(b"", |v| v.as_bytes()),
                    method: req.method().as_str().as_bytes(),
                    path: req.uri().path().as_bytes(),
                };
                let in_flight = InFlight::start(svc.clone(), counted, Some(&seen));
                self.serve(&route, in_flight, req, peer, &mut ticket).await
            }
        };
        answer::record(&svc, resp.status().as_u16(), start);
        resp
    }

    /// The answers a request gets without a pod: a client's error (never forwarded and
    /// never a wake), or an `answerWhileAsleep` health check while no pod is ready
    /// (forwarded otherwise; never activity). Ok: whether it counts as activity.
    fn judge(&self, route: &Route, req: &Request<Incoming>) -> Result<bool, Answer> {
        let svc = &route.service;
        if let Some(minor) = match req.version() {
            Version::HTTP_10 => Some(0),
            Version::HTTP_11 => Some(1),
            _ => None,
        } && let Err(why) =
            crate::rules::host_fields(minor, req.headers().get_all(header::HOST).iter().count())
        {
            return Err(Answer::BadRequest(why));
        }
        let (method, path) = (req.method().as_str(), req.uri().path());
        let quiet = svc.is_asleep_answer(method, path);
        if quiet
            && !svc.has_pod(&route.port_name)
            && let Some(a) = svc.asleep_answer(method, path)
        {
            svc.metrics.asleep_answers.inc();
            return Err(Answer::Asleep {
                status: a.status,
                body: a.body.unwrap_or_default(),
            });
        }
        Ok(!quiet)
    }

    async fn serve(
        &self,
        route: &Route,
        in_flight: InFlight,
        mut req: Request<Incoming>,
        peer: &Peer,
        ticket: &mut Ticket,
    ) -> Response<Body> {
        let svc = &route.service;
        let head = req.method() == http::Method::HEAD;
        let upgrade = is_upgrade(&req);
        // A browser's page load gets the service's waiting page, if it has one, after
        // waiting its `after` for a pod.
        let page = svc
            .waiting_page()
            .filter(|_| crate::waiting::is_page_load(req.method(), req.headers()));
        let h2 = route.h2c || (req.version() == Version::HTTP_2 && !upgrade);
        rewrite_request(&mut req, peer, upgrade, h2);
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
        let mut unproven: super::pool::Unproven;
        let (slot, mut resp) = 'attempt: loop {
            let (slot, conn) = loop {
                let guard = match self
                    .admit
                    .acquire(svc, &route.port_name, ticket, &tried, page.as_ref())
                    .await
                {
                    Ok(s) => s,
                    Err(answer) => return answer.response(&svc.display),
                };
                let addr = guard.addr();
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
                            return Answer::ConnectFailed {
                                addr,
                                why: e.to_string(),
                            }
                            .response(&svc.display);
                        }
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            let addr = slot.addr();
            // (Always there: a retry puts back the request it took.)
            let Some(mut this) = req.take() else {
                return Answer::PodFailed {
                    addr,
                    why: "the request was lost on a retry".into(),
                }
                .response(&svc.display);
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
                        return Answer::BadBody(why).response(&svc.display);
                    }
                    debug!(service = %svc.display, %addr, "upstream error: {e}");
                    return Answer::PodFailed {
                        addr,
                        why: e.to_string(),
                    }
                    .response(&svc.display);
                }
                Err(_) => {
                    if let Some(l) = lease.take() {
                        l.discard();
                    }
                    return Answer::PodTimeout {
                        addr,
                        after: self.response_timeout,
                    }
                    .response(&svc.display);
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

/// Prepares a request for the pod: hop-by-hop headers out, `X-Forwarded-*` in, `Host`
/// kept, and the request line in the form the upstream protocol wants.
fn rewrite_request(req: &mut Request<Incoming>, peer: &Peer, upgrade: bool, h2: bool) {
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
    let forwarded_for = &peer.forwarded_for;
    let xff = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) if peer.trusted => HeaderValue::from_bytes(&crate::rules::forwarded_for(
            Some(prev),
            forwarded_for.as_bytes(),
        ))
        .ok(),
        _ => Some(forwarded_for.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !peer.trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
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
