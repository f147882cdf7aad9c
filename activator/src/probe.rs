//! The activator's own readiness check of a cold service's new pods.
//!
//! The kubelet probes a pod every `periodSeconds` (10 s by default), so a pod that
//! listens 300 ms after its start is marked Ready up to 10 s later. While a service
//! holds requests and has no ready pod, the activator checks the not-ready,
//! not-terminating endpoints of its slices itself, with the workload's own readiness
//! check (from the ScaledService's `status.activationProbe`): every 10 ms at first
//! (2 ms while every check is refused: nothing listens yet, and a refused connection
//! costs the app nothing), backing off to 500 ms, at most [`MAX_IN_FLIGHT`] checks at
//! once per service. A pod
//! that passes takes held and new requests at once; it is checked again every second
//! until the kubelet agrees (it turns ready in the slice) or a check fails (it is taken
//! out again). See DESIGN.md for why this is safe.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use snooze_crds::ActivationProbe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::table::ServiceEntry;

/// Checks in flight at once, per service.
pub const MAX_IN_FLIGHT: usize = 8;
/// Bound on one check (connect and answer).
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// The pace while a service's new pods are young: apps start in hundreds of
/// milliseconds, and each step of a back-off past that start is added to the cold start
/// (20 ms growing by half each time put the first pass ~110 ms after a 300 ms start).
const FIRST_INTERVAL: Duration = Duration::from_millis(10);
/// The pace while young pods refuse the check's connection: the kernel answers it
/// (no process listens on the port yet), so checking often costs the app nothing, and
/// the first check after it listens comes within this, not within [`FIRST_INTERVAL`]
/// (for a server that starts in milliseconds, like Redis, the wait for the next check
/// was most of what the activator added to its cold start).
const REFUSED_INTERVAL: Duration = Duration::from_millis(2);
/// How long the pace stays at [`FIRST_INTERVAL`] once a new pod appears.
const EAGER_FOR: Duration = Duration::from_secs(3);
const MAX_INTERVAL: Duration = Duration::from_millis(500);
/// A pod that passed is checked again this often until the kubelet agrees.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

impl Probe {
    /// The check of a ScaledService's status; `None` for what the activator cannot run.
    pub fn from_spec(p: &ActivationProbe) -> Option<Self> {
        let port = |n: i32| u16::try_from(n).ok().filter(|p| *p > 0);
        if let Some(h) = &p.http_get {
            if !h.scheme.eq_ignore_ascii_case("HTTP") {
                return None;
            }
            // A path with bytes that cannot go on a request line is not sent.
            if !h.path.starts_with('/') || h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return None;
            }
            return Some(Probe::Http {
                port: port(h.port)?,
                path: h.path.clone(),
                headers: h
                    .http_headers
                    .iter()
                    .filter(|x| http::HeaderName::from_bytes(x.name.as_bytes()).is_ok())
                    .filter(|x| http::HeaderValue::from_str(&x.value).is_ok())
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect(),
            });
        }
        if let Some(t) = &p.tcp_socket {
            return Some(Probe::Tcp {
                port: port(t.port)?,
            });
        }
        if let Some(g) = &p.grpc {
            return Some(Probe::Grpc {
                port: port(g.port)?,
                service: g.service.clone().unwrap_or_default(),
            });
        }
        None
    }

    /// One check of the pod at `ip`: true when it passes within the time bound.
    pub async fn check(&self, ip: IpAddr) -> bool {
        self.check_why(ip).await == Check::Passed
    }

    /// One check of the pod at `ip`, and when it failed, whether nothing listened.
    pub async fn check_why(&self, ip: IpAddr) -> Check {
        tokio::time::timeout(CHECK_TIMEOUT, self.check_unbounded(ip))
            .await
            .unwrap_or(Check::Failed)
    }

    async fn check_unbounded(&self, ip: IpAddr) -> Check {
        let port = match self {
            Probe::Tcp { port } | Probe::Http { port, .. } | Probe::Grpc { port, .. } => *port,
        };
        let s = match TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Check::Refused,
            Err(_) => return Check::Failed,
        };
        let passed = match self {
            Probe::Tcp { .. } => true,
            Probe::Http { path, headers, .. } => http_get(s, ip, port, path, headers).await,
            Probe::Grpc { service, .. } => grpc_health(s, ip, port, service).await,
        };
        if passed { Check::Passed } else { Check::Failed }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Passed,
    /// The connection was refused: no process listens on the port yet.
    Refused,
    /// Anything else: a failing answer, a timeout, an unreachable address.
    Failed,
}

/// A GET as the kubelet sends it, on `s` (connected to `ip:port`); passes on 200–399.
async fn http_get(
    mut s: TcpStream,
    ip: IpAddr,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> bool {
    let addr = SocketAddr::new(ip, port);
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: snooze-activator-probe\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut heads = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut heads);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return resp.code.is_some_and(|c| (200..400).contains(&c));
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            _ => return false,
        }
        let mut chunk = [0u8; 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `grpc.health.v1.Health/Check` over h2c on `s` (connected to `ip:port`); passes when
/// the answer is SERVING.
async fn grpc_health(s: TcpStream, ip: IpAddr, port: u16, service: &str) -> bool {
    let Ok((mut send, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await
    else {
        return false;
    };
    let task = tokio::spawn(conn);
    // HealthCheckRequest { service = 1 }, in one length-prefixed gRPC message.
    let mut msg = Vec::new();
    if !service.is_empty() && service.len() < 128 {
        msg.push(0x0a);
        msg.push(service.len() as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let Ok(req) = http::Request::post(format!("http://{ip}:{port}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
    else {
        return false;
    };
    let ok = async {
        let resp = send.send_request(req).await.ok()?;
        if resp.status() != http::StatusCode::OK {
            return None;
        }
        let collected = resp.into_body().collect().await.ok()?;
        let status_ok = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .is_none_or(|v| v == "0");
        let mut data = collected.to_bytes();
        // HealthCheckResponse { status = 1 (varint) }: SERVING is 1.
        if data.len() < 5 || !status_ok {
            return None;
        }
        data.advance(5);
        Some(data.as_ref() == [0x08, 0x01])
    }
    .await
    .unwrap_or(false);
    task.abort();
    ok
}

/// Starts the prober of `svc` unless one runs or there is nothing to run.
pub fn start(svc: &Arc<ServiceEntry>) {
    if svc.pods.lock().probe.is_none() || svc.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    let svc = svc.clone();
    tokio::spawn(async move {
        run(&svc).await;
        svc.probing.store(false, Ordering::Release);
    });
}

/// What the prober has to do now.
fn work(svc: &ServiceEntry) -> (bool, Vec<IpAddr>, Vec<IpAddr>) {
    let b = svc.pods.lock();
    let holding = svc.queued.load(Ordering::Relaxed) > 0 && b.ready.is_empty();
    let unprobed: Vec<IpAddr> = b
        .candidates
        .iter()
        .map(|(ip, _)| *ip)
        .filter(|ip| !b.probed.contains(ip))
        .collect();
    let probed: Vec<IpAddr> = b.probed.iter().copied().collect();
    (holding, unprobed, probed)
}

async fn run(svc: &Arc<ServiceEntry>) {
    let mut interval = FIRST_INTERVAL;
    let mut last_recheck = Instant::now();
    // Since the newest pod appeared (the pace is eager for `EAGER_FOR` after it).
    let mut fresh_since = Instant::now();
    loop {
        let Some(probe) = svc.pods.lock().probe.clone() else {
            return;
        };
        let (holding, unprobed, probed) = work(svc);
        if !holding && probed.is_empty() {
            return;
        }
        // New pods while requests are held; passing ones again every second.
        let mut to_check: Vec<(IpAddr, bool)> = Vec::new();
        if holding {
            to_check.extend(unprobed.iter().map(|ip| (*ip, false)));
        }
        if last_recheck.elapsed() >= RECHECK {
            last_recheck = Instant::now();
            to_check.extend(probed.iter().map(|ip| (*ip, true)));
        }
        let results: Vec<(IpAddr, bool, Check)> = futures::stream::iter(to_check)
            .map(|(ip, was)| {
                let p = probe.clone();
                async move { (ip, was, p.check_why(ip).await) }
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .collect()
            .await;
        // Every new pod refused the connection: nothing listens yet.
        let refused = results
            .iter()
            .any(|(_, was, c)| !was && *c == Check::Refused)
            && results
                .iter()
                .all(|(_, was, c)| *was || *c == Check::Refused);
        for (ip, was, check) in results {
            let passed = check == Check::Passed;
            if passed && !was {
                info!(service = %svc.display, %ip, "pod passed the activator's probe: held requests go to it");
                svc.set_probed(ip, true);
            } else if !passed && was {
                info!(service = %svc.display, %ip, "pod failed the activator's probe again: taken out until the kubelet marks it ready");
                svc.set_probed(ip, false);
            } else if !passed {
                debug!(service = %svc.display, %ip, "not ready yet");
            }
        }
        // Eager while the pods are young (more so while nothing listens on them), then
        // back off; a change of the candidates starts the pace over.
        interval = if fresh_since.elapsed() >= EAGER_FOR {
            (interval * 3 / 2).min(MAX_INTERVAL)
        } else if refused {
            REFUSED_INTERVAL
        } else {
            FIRST_INTERVAL
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = svc.candidates_changed.notified() => fresh_since = Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snooze_crds::{GrpcProbe, HttpGetProbe, ProbeHeader, TcpProbe};

    #[test]
    fn from_the_status() {
        let http = ActivationProbe {
            http_get: Some(HttpGetProbe {
                path: "/ready".into(),
                port: 8080,
                scheme: "HTTP".into(),
                http_headers: vec![
                    ProbeHeader {
                        name: "x-a".into(),
                        value: "1".into(),
                    },
                    ProbeHeader {
                        name: "bad name".into(),
                        value: "1".into(),
                    },
                ],
            }),
            ..Default::default()
        };
        assert_eq!(
            Probe::from_spec(&http),
            Some(Probe::Http {
                port: 8080,
                path: "/ready".into(),
                headers: vec![("x-a".into(), "1".into())]
            })
        );
        let mut https = http.clone();
        https.http_get.as_mut().unwrap().scheme = "HTTPS".into();
        assert_eq!(Probe::from_spec(&https), None);
        let mut bad_path = http.clone();
        bad_path.http_get.as_mut().unwrap().path = "/a b".into();
        assert_eq!(Probe::from_spec(&bad_path), None);
        let tcp = ActivationProbe {
            tcp_socket: Some(TcpProbe { port: 0 }),
            ..Default::default()
        };
        assert_eq!(Probe::from_spec(&tcp), None);
        let grpc = ActivationProbe {
            grpc: Some(GrpcProbe {
                port: 9,
                service: Some("x".into()),
            }),
            ..Default::default()
        };
        assert_eq!(
            Probe::from_spec(&grpc),
            Some(Probe::Grpc {
                port: 9,
                service: "x".into()
            })
        );
    }

    #[tokio::test]
    async fn http_and_tcp_checks() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer: &[u8] = if n == 1 {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let http = Probe::Http {
            port,
            path: "/ready".into(),
            headers: vec![],
        };
        assert!(!http.check(ip).await, "503 fails");
        assert!(http.check(ip).await, "204 passes");
        assert!(Probe::Tcp { port }.check(ip).await);
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            Probe::Tcp { port: closed }.check_why(ip).await,
            Check::Refused,
            "nothing listens: refused, not failed"
        );
        let http_closed = Probe::Http {
            port: closed,
            path: "/ready".into(),
            headers: vec![],
        };
        assert_eq!(http_closed.check_why(ip).await, Check::Refused);
    }
}
