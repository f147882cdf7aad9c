//! HTTP rules that both data paths (the fast path's httparse heads and hyper's parsed
//! requests) apply the same way, and that decide whether a first request may wake a
//! sleeping service.

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host field; an HTTP/1.0 one
/// at most one. A violation is the client's error (400), never forwarded.
pub fn host_fields(version_minor: u8, count: usize) -> Result<(), &'static str> {
    match (version_minor, count) {
        (_, n) if n > 1 => Err("more than one Host field"),
        (1, 0) => Err("an HTTP/1.1 request needs a Host field"),
        _ => Ok(()),
    }
}

/// Whether one `TE` field goes on to the pod: only `trailers` does (the activator
/// passes trailers through; codings are hop-by-hop, RFC 9110 §10.1.4). Per field, the
/// same on both paths.
pub fn te_kept(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"trailers")
}

/// The tokens of one `Connection` field value (RFC 9110 §7.6.1), trimmed and non-empty.
pub fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The `X-Forwarded-For` value the pod gets: the client's address appended to the one
/// the request carried (one field; a repeated field is not taken on the fast path).
pub fn forwarded_for(prev: Option<&[u8]>, client: &[u8]) -> Vec<u8> {
    match prev {
        Some(prev) => [prev, b", ", client].concat(),
        None => client.to_vec(),
    }
}

/// An answer of the activator's own, whole, as HTTP/1.1 bytes (written by the fast
/// path and by the listener; hyper's path builds the same with `proxy::text`): the
/// status line with the status's reason phrase, a text/plain body, `extra` fields.
pub fn answer(status: u16, body: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
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

/// Most header fields in a request head: hyper's limit (its default; a head with more
/// gets 431 from it), so the wake gate and the fast path judge a head as hyper will.
pub const MAX_HEADERS: usize = 100;

/// The method and the path (without the query) of an HTTP/1.x request head, for
/// matching `answerWhileAsleep`; an absolute-form target gives its path.
pub fn method_and_path(head: &[u8]) -> Option<(&str, &str)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let (method, target) = (req.method?, req.path?);
    Some((method, target_path(target)))
}

/// The path of a request target (origin or absolute form), without query or fragment.
pub fn target_path(target: &str) -> &str {
    let rest = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let after = &target[i + 3..];
            after.find('/').map_or("/", |j| &after[j..])
        }
        _ => target,
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection are, judged before a sleeping service is woken.
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
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use FirstRequest::*;

    #[test]
    fn request_paths_for_matching() {
        type Case<'a> = (&'a [u8], Option<(&'a str, &'a str)>);
        let cases: &[Case] = &[
            (
                b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
                Some(("GET", "/healthz")),
            ),
            (
                b"HEAD /healthz?full=1 HTTP/1.1\r\nHost: a\r\n\r\n",
                Some(("HEAD", "/healthz")),
            ),
            (
                b"GET http://a.example/healthz HTTP/1.1\r\nHost: a\r\n\r\n",
                Some(("GET", "/healthz")),
            ),
            (
                b"GET http://a.example HTTP/1.1\r\nHost: a\r\n\r\n",
                Some(("GET", "/")),
            ),
            (b"GET /a#frag HTTP/1.1\r\n", Some(("GET", "/a"))),
            (b"HELLO\r\n\r\n", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                method_and_path(head),
                *want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn answers_carry_the_reason_of_their_status() {
        let cases = [
            (502, "Bad Gateway"),
            (503, "Service Unavailable"),
            (504, "Gateway Timeout"),
            (400, "Bad Request"),
        ];
        for (status, reason) in cases {
            let a = String::from_utf8(answer(status, "x\n", &[("connection", "close")])).unwrap();
            assert!(
                a.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")),
                "{a}"
            );
            assert!(
                a.contains("content-length: 2\r\nconnection: close\r\n\r\nx\n"),
                "{a}"
            );
        }
    }

    #[test]
    fn connection_tokens_and_forwarded_for() {
        let t: Vec<&[u8]> = connection_tokens(b" close ,, Keep-Alive,upgrade").collect();
        assert_eq!(t, vec![&b"close"[..], b"Keep-Alive", b"upgrade"]);
        assert_eq!(forwarded_for(None, b"10.0.0.1"), b"10.0.0.1");
        assert_eq!(
            forwarded_for(Some(b"1.2.3.4"), b"10.0.0.1"),
            b"1.2.3.4, 10.0.0.1"
        );
    }

    #[test]
    fn host_rules() {
        assert_eq!(host_fields(1, 1), Ok(()));
        assert_eq!(host_fields(0, 0), Ok(()));
        assert_eq!(host_fields(0, 1), Ok(()));
        assert!(host_fields(1, 0).is_err());
        assert!(host_fields(1, 2).is_err());
        assert!(host_fields(0, 2).is_err());
    }

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
}
