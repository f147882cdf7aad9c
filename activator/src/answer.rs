//! Answers the activator makes itself, and the one place every response is counted.
//!
//! [`Answer`] is each answer that does not come from a pod — a client's error, a full
//! queue, a wake that timed out, a pod that failed, a health check answered while
//! asleep — with its status, its text and its fields, rendered for hyper
//! ([`Answer::response`]) or as raw HTTP/1.1 bytes for the fast path and the accept
//! stage ([`Answer::raw`]), the same on every path. [`record`] counts a response of
//! either kind (status class and latency) for its service.
//!
//! Must not: decide anything (which answer a request gets is the caller's), or touch a
//! socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Response, StatusCode};
use snooze_runtime::admin::text;
pub use snooze_runtime::admin::{Body, BoxError};

use crate::table::ServiceEntry;
use crate::waiting::Page;
use std::sync::Arc;

/// An answer of the activator's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A connection left open on a port whose service was removed (503; the
    /// connection closes so the client connects afresh).
    NoService { port: u16 },
    /// The client's request is malformed (400; the connection closes, as hyper does
    /// after a malformed head).
    BadRequest(&'static str),
    /// The request's body failed while it was sent on (400).
    BadBody(String),
    /// The service's queue, or the activator-wide bound, is full (503, `Retry-After`).
    QueueFull { queued: u64 },
    /// No pod was ready within the activation timeout (504).
    ActivationTimeout { waited: Duration },
    /// No pod took a connection (502).
    ConnectFailed { addr: SocketAddr, why: String },
    /// The pod failed before its response head was complete (502).
    PodFailed { addr: SocketAddr, why: String },
    /// The pod sent no response head within the response timeout (504).
    PodTimeout { addr: SocketAddr, after: Duration },
    /// An `answerWhileAsleep` health check, answered while no pod is ready.
    Asleep { status: u16, body: String },
    /// A browser's page load that waited `activation.waitingPage.after` (503, an HTML
    /// page that reloads itself; see `crate::waiting`).
    WaitingPage(Arc<Page>),
}

impl Answer {
    pub fn status(&self) -> u16 {
        match self {
            Answer::NoService { .. } | Answer::QueueFull { .. } | Answer::WaitingPage(_) => 503,
            Answer::BadRequest(_) | Answer::BadBody(_) => 400,
            Answer::ActivationTimeout { .. } | Answer::PodTimeout { .. } => 504,
            Answer::ConnectFailed { .. } | Answer::PodFailed { .. } => 502,
            Answer::Asleep { status, .. } => *status,
        }
    }

    /// The body: what happened, for whom (`service` is the service's display name).
    pub fn text(&self, service: &str) -> String {
        match self {
            Answer::NoService { port } => {
                format!("snooze: no service is configured on port {port}\n")
            }
            Answer::BadRequest(why) => format!("snooze: bad request: {why}\n"),
            Answer::BadBody(why) => format!("snooze: {service}: bad request body: {why}\n"),
            Answer::QueueFull { queued } => {
                format!("snooze: {service} has too many requests waiting ({queued}); retry later\n")
            }
            Answer::ActivationTimeout { waited } => format!(
                "snooze: {service} had no ready pod after waiting {:.1}s\n",
                waited.as_secs_f64()
            ),
            Answer::ConnectFailed { addr, why } => {
                format!("snooze: {service}: could not connect to a pod ({addr}: {why})\n")
            }
            Answer::PodFailed { addr, why } => {
                format!("snooze: {service}: pod {addr} failed before answering: {why}\n")
            }
            Answer::PodTimeout { addr, after } => format!(
                "snooze: {service}: pod {addr} did not answer within {}s\n",
                after.as_secs()
            ),
            Answer::Asleep { body, .. } => body.clone(),
            Answer::WaitingPage(p) => String::from_utf8_lossy(&p.html).into_owned(),
        }
    }

    fn content_type(&self) -> &'static str {
        match self {
            Answer::WaitingPage(_) => "text/html; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        }
    }

    /// Header fields beyond the content's: `Retry-After` for a full queue,
    /// `Connection: close` where the connection ends with the answer.
    fn fields(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Answer::QueueFull { .. } => &[("retry-after", "1")],
            // Never cached: the next load must reach the app once it is up.
            Answer::WaitingPage(_) => &[
                ("retry-after", "2"),
                ("refresh", "2"),
                ("cache-control", "no-store"),
            ],
            Answer::NoService { .. } | Answer::BadRequest(_) => &[("connection", "close")],
            _ => &[],
        }
    }

    /// Whether the connection ends with this answer.
    pub fn closes(&self) -> bool {
        self.fields().iter().any(|(n, _)| *n == "connection")
    }

    /// The answer for hyper's server.
    pub fn response(&self, service: &str) -> Response<Body> {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::OK);
        let mut r = match self {
            Answer::WaitingPage(p) => text(status, p.html.clone()),
            _ => text(status, self.text(service)),
        };
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type()),
        );
        for (name, value) in self.fields() {
            r.headers_mut()
                .insert(*name, HeaderValue::from_static(value));
        }
        r
    }

    /// The whole answer as HTTP/1.1 bytes, for a raw socket; with `close`, the
    /// connection ends with it (`Connection: close`) whatever the answer.
    pub fn raw(&self, service: &str, close: bool) -> Vec<u8> {
        let mut fields = self.fields().to_vec();
        if close && !self.closes() {
            fields.push(("connection", "close"));
        }
        render(
            self.status(),
            self.content_type(),
            &self.text(service),
            &fields,
        )
    }
}

/// Counts a response to one request of `svc` — the pod's or the activator's own, on
/// any path: its status class and its latency from `start`. Returns the moment it
/// was counted at.
pub fn record(svc: &ServiceEntry, status: u16, start: Instant) -> Instant {
    let now = Instant::now();
    svc.metrics.response(status);
    svc.metrics
        .latency
        .observe(now.saturating_duration_since(start).as_secs_f64());
    now
}

/// An answer as HTTP/1.1 bytes: the status line with the status's reason phrase, the
/// body of type `content_type`, `extra` fields.
fn render(status: u16, content_type: &str, body: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in extra {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_reason_of_their_status() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let cases = [
            (
                Answer::PodFailed {
                    addr,
                    why: "x".into(),
                },
                "502 Bad Gateway",
            ),
            (Answer::QueueFull { queued: 3 }, "503 Service Unavailable"),
            (
                Answer::PodTimeout {
                    addr,
                    after: Duration::from_secs(1),
                },
                "504 Gateway Timeout",
            ),
            (Answer::BadRequest("x"), "400 Bad Request"),
        ];
        for (answer, line) in cases {
            let a = String::from_utf8(answer.raw("ns/web", true)).unwrap();
            assert!(a.starts_with(&format!("HTTP/1.1 {line}\r\n")), "{a}");
            let body = answer.text("ns/web");
            // The length says the body, and the body ends the answer right after the
            // head.
            assert!(
                a.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
                "{a}"
            );
            assert!(a.ends_with(&format!("\r\n\r\n{body}")), "{a}");
            assert_eq!(a.matches("\r\n\r\n").count(), 1, "{a}");
            assert!(a.contains("connection: close\r\n"), "{a}");
        }
    }

    #[test]
    fn hyper_and_raw_answers_agree() {
        let answers = [
            Answer::NoService { port: 8080 },
            Answer::QueueFull { queued: 7 },
            Answer::ActivationTimeout {
                waited: Duration::from_millis(1500),
            },
            Answer::BadRequest("missing Host"),
            Answer::WaitingPage(Arc::new(Page::new(&snooze_crds::WaitingPage {
                after: Duration::from_secs(1).into(),
                title: "t".into(),
                message: "m".into(),
            }))),
        ];
        for a in answers {
            let r = a.response("ns/web");
            let raw = String::from_utf8(a.raw("ns/web", false)).unwrap();
            assert!(raw.starts_with(&format!("HTTP/1.1 {} ", r.status().as_u16())));
            for (name, value) in r.headers() {
                let field = format!("{name}: {}\r\n", value.to_str().unwrap());
                assert!(raw.contains(&field), "{field} in {raw}");
            }
        }
    }
}
