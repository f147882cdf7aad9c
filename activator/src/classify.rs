//! Classify: what a new connection is, from its first bytes, read without consuming
//! them (peeked, so whoever serves the connection reads them from the socket): HTTP/2
//! with prior knowledge (h2c), or HTTP/1.x — and, for a service that is asleep when the
//! bytes come, whether its first request is one that wakes it.
//!
//! One judgement with the limits hyper applies (head size, [`MAX_HEADERS`] fields,
//! Host), so a head that hyper would refuse never wakes a service. Must not: read the
//! bytes off the socket, wake, queue or answer.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::rules::{MAX_HEADERS, host_fields};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstRequest {
    /// A complete, valid HTTP/1.x request head: worth a wake.
    Complete,
    /// The HTTP/2 connection preface (h2c with prior knowledge). Nothing more is
    /// waited for: HTTP/2 clients such as gRPC's wait for the server's SETTINGS before
    /// they send a request, so hyper's HTTP/2 server takes the connection at once
    /// (answering with SETTINGS) and its first request wakes the service.
    H2,
    /// Not there yet (and still within the size bound).
    Partial,
    /// Not an HTTP request the activator would forward (junk, a TLS ClientHello, a
    /// malformed or oversized head, a bad Host): answered or closed without a wake.
    Invalid,
}

/// Judges the bytes a client sent so far; `max` bounds a request head.
pub fn first_request(buf: &[u8], max: usize) -> FirstRequest {
    if buf.starts_with(H2_PREFACE) {
        return FirstRequest::H2;
    }
    if H2_PREFACE.starts_with(buf) {
        return FirstRequest::Partial;
    }
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {
            let hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .count();
            match host_fields(req.version.unwrap_or(1), hosts) {
                Ok(()) => FirstRequest::Complete,
                Err(_) => FirstRequest::Invalid,
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < max => FirstRequest::Partial,
        _ => FirstRequest::Invalid,
    }
}

/// A connection, classified.
#[derive(Debug, PartialEq, Eq)]
pub enum Class {
    /// HTTP/2 with prior knowledge: hyper's HTTP/2 server takes it at once.
    H2,
    /// HTTP/1.x. `judged`: its first head, peeked, when the service was asleep as the
    /// bytes came — `Some((verdict, bytes))`, `Complete` or `Invalid`; `None` when the
    /// service had a pod (the head is then read and judged by whoever serves it).
    H1 {
        judged: Option<(FirstRequest, Vec<u8>)>,
    },
}

/// Peeks at a new connection until it can be classified; `asleep` is asked once the
/// first bytes are there (a service may go to sleep while a client is silent).
/// `None` when the client closed first. The caller bounds the wait (the header read
/// timeout): nothing is woken or parked for a connection that sends nothing.
pub async fn classify(stream: &TcpStream, max: usize, asleep: impl Fn() -> bool) -> Option<Class> {
    let mut buf = vec![0u8; 4096.min(max).max(H2_PREFACE.len())];
    let mut pause = Duration::from_millis(1);
    let mut judge: Option<bool> = None;
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        let judge = *judge.get_or_insert_with(&asleep);
        match first_request(&buf[..n], max) {
            FirstRequest::H2 => return Some(Class::H2),
            // Not the preface: when the service is awake, that is all there is to know.
            _ if !judge && !H2_PREFACE.starts_with(&buf[..n]) => {
                return Some(Class::H1 { judged: None });
            }
            FirstRequest::Partial if n == buf.len() && n < max => {
                buf.resize((2 * n).min(max), 0);
            }
            FirstRequest::Partial => {
                // Peeking leaves the socket readable: wait a little for more.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            verdict => {
                buf.truncate(n);
                return Some(Class::H1 {
                    judged: Some((verdict, buf)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FirstRequest::*;

    #[test]
    fn what_wakes_a_sleeping_service() {
        let max = 1024;
        let cases: Vec<(&[u8], FirstRequest)> = vec![
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Complete),
            (b"GET / HTTP/1.0\r\n\r\n", Complete),
            (
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Complete,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", Partial),
            (b"GET / HT", Partial),
            (b"G", Partial),
            (b"GET / HTTP/1.1\r\n\r\n", Invalid),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Invalid),
            (b"HELLO THERE\r\n", Invalid),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", Invalid),
            (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", Invalid),
            (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", Invalid),
            (b"PRI * HTTP/2.0\r\n", Partial),
            (b"PRI", Partial),
            // The preface alone is enough: the HTTP/2 server answers it with SETTINGS
            // (a gRPC client sends nothing more before that).
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                H2,
            ),
            (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Invalid),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                first_request(bytes, max),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A head that outgrows the bound without ending.
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.resize(max, b'a');
        assert_eq!(first_request(&big, max), Invalid);
        // hyper answers a head with more than MAX_HEADERS fields with 431: it wakes
        // nothing either (101 fields here, 100 pass).
        let head = |fields: usize| {
            let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
            for i in 1..fields {
                h.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\n");
            h
        };
        assert_eq!(first_request(&head(MAX_HEADERS), 64 * 1024), Complete);
        assert_eq!(first_request(&head(MAX_HEADERS + 1), 64 * 1024), Invalid);
        assert_eq!(first_request(&head(128), 64 * 1024), Invalid);
    }

    #[test]
    fn the_preface_is_h2_and_its_prefix_waits() {
        assert_eq!(first_request(H2_PREFACE, 64 * 1024), H2);
        assert_eq!(first_request(&H2_PREFACE[..10], 64 * 1024), Partial);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn a_connection_is_classified_from_peeked_bytes() {
        use tokio::io::AsyncWriteExt;
        let cases: [(&[u8], bool, Class); 5] = [
            (H2_PREFACE, true, Class::H2),
            (H2_PREFACE, false, Class::H2),
            (b"GET / HTTP/1.1\r\n", false, Class::H1 { judged: None }),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                true,
                Class::H1 {
                    judged: Some((Complete, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec())),
                },
            ),
            (
                b"\x16\x03\x01\x02\x00",
                true,
                Class::H1 {
                    judged: Some((Invalid, b"\x16\x03\x01\x02\x00".to_vec())),
                },
            ),
        ];
        for (bytes, asleep, want) in cases {
            let (mut c, s) = pair().await;
            c.write_all(bytes).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(2), classify(&s, 65536, || asleep))
                .await
                .expect("classified");
            assert_eq!(got, Some(want), "{:?}", String::from_utf8_lossy(bytes));
            // Peeked, not read: the bytes are still there.
            let mut b = vec![0u8; bytes.len()];
            assert_eq!(s.peek(&mut b).await.unwrap(), bytes.len());
        }
    }
}
