//! HTTP rules that the stages apply the same way — classify (the wake gate), the fast
//! path's httparse heads and hyper's parsed requests: Host fields, hop-by-hop tokens,
//! `X-Forwarded-For`, hyper's field limit. Pure functions; no I/O, no state.

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

/// Most header fields in a request head: hyper's limit (its default; a head with more
/// gets 431 from it), so the wake gate and the fast path judge a head as hyper will.
pub const MAX_HEADERS: usize = 100;

/// The method and the path (without the query) of an HTTP/1.x request head, for
/// matching `answerWhileAsleep`; an absolute-form target gives its path.
pub fn method_and_path(head: &[u8]) -> Option<(&str, &str)> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    req.parse_with_uninit_headers(head, &mut headers).ok()?;
    let (method, target) = (req.method?, req.path?);
    Some((method, target_path(target)))
}

/// The path of a request target (origin or absolute form), without query or fragment.
pub fn target_path(target: &str) -> &str {
    // Origin-form (almost every request) first: no search for a scheme.
    let scheme = if target.starts_with('/') {
        None
    } else {
        target.find("://")
    };
    let rest = match scheme {
        Some(i) => {
            let after = &target[i + 3..];
            after.find('/').map_or("/", |j| &after[j..])
        }
        _ => target,
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

/// [`target_path`] of a target in bytes (not necessarily UTF-8).
pub fn target_path_bytes(target: &[u8]) -> &[u8] {
    // Origin-form (almost every request): the path ends at `?` or `#`, whatever bytes
    // it holds; no UTF-8 check needed.
    if target.first() == Some(&b'/') {
        let end = target
            .iter()
            .position(|b| *b == b'?' || *b == b'#')
            .unwrap_or(target.len());
        return &target[..end];
    }
    match std::str::from_utf8(target) {
        Ok(t) => target_path(t).as_bytes(),
        Err(_) => {
            let end = target
                .iter()
                .position(|b| *b == b'?' || *b == b'#')
                .unwrap_or(target.len());
            &target[..end]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
