//! The HTTP/1.1 fast path: the common request — a complete HTTP/1.1 request head with
//! any body already read, for a service with a ready pod — forwarded in the
//! connection's own task over a pooled plain connection, the heads parsed with
//! `httparse` and rewritten in one pass, the response body passed through as it comes
//! (its framing followed, never re-encoded).
//!
//! Everything else goes to the hyper path with the bytes read so far ([`Outcome::Fallback`]):
//! requests that must wait for a pod, upgrades, `Expect`, `Transfer-Encoding` or
//! absolute-form requests, HTTP/1.0 clients, bodies not yet read in full, `Connection`
//! naming other headers, malformed or oversized heads (hyper answers 400 and 431), a
//! removed service (503), h2c backends and pods that refuse a connection (retried on
//! another pod there). Once a connection has gone to hyper it stays there.
//!
//! Why: hyper's server and client HTTP/1 state machines cost about 30,000 instructions
//! per proxied request, two tasks and the channels between them; nginx spends half the
//! CPU per request (docs/benchmarks.md).

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use super::{Peer, Proxy, Route};
use crate::accept::Drain;
use crate::activity::Seen;
use crate::admit::{InFlight, Ticket};
use crate::answer::{self, Answer};
use crate::rules::MAX_HEADERS;
use crate::table::ServiceEntry;

// Which fields of a response head are dropped is kept in a bit per field.
const _: () = assert!(MAX_HEADERS <= 128);

/// Largest response head taken from a pod.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer for a pod's response.
const READ_CHUNK: usize = 16 * 1024;
/// Most body bytes copied behind a response head for one plain write (see `send_both`).
const COPIED_BODY: usize = 2048;

/// How a connection left the fast path.
pub enum Outcome {
    /// Finished: closed by either side, cut by a timeout, or answered and closed.
    Done,
    /// To be served by the hyper path: the stream, and the bytes already read from it
    /// (to be read again first). No part of them was forwarded.
    Fallback(TcpStream, Bytes),
}

/// The parts of a connection the fast path needs.
pub struct Inbound<'a> {
    pub proxy: &'a Proxy,
    pub route: &'a watch::Receiver<Option<Arc<Route>>>,
    /// The client, for `X-Forwarded-For` and `-Proto`.
    pub peer: &'a Peer,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Longest a write to the client may wait for it to read (a stalled reader is cut).
    pub send_timeout: Duration,
    /// Started when the activator drains: finish the request in progress, then close.
    pub stop: &'a Drain,
    /// The first request's admission, if the connection was parked (see
    /// `admit::Ticket`).
    pub ticket: &'a mut Option<Ticket>,
}

/// A request head the fast path takes.
#[derive(Debug, PartialEq, Eq)]
struct RequestInfo {
    head_len: usize,
    body_len: usize,
    is_head: bool,
    /// GET, HEAD, OPTIONS, TRACE, PUT or DELETE (RFC 9110 §9.2.2): may be sent again
    /// when a reused connection turned out closed before any answer.
    idempotent: bool,
    close: bool,
    /// Where the parts the activity summary keeps are in the head.
    spans: Spans,
}

/// Byte ranges into a request head.
#[derive(Debug, Default, PartialEq, Eq)]
struct Spans {
    method: std::ops::Range<usize>,
    target: std::ops::Range<usize>,
    agent: std::ops::Range<usize>,
    forwarded_for: Option<std::ops::Range<usize>>,
}

impl Spans {
    /// Who sent the request in `head`, for the activity summary.
    fn seen<'a>(&self, head: &'a [u8], peer: &Peer) -> Seen<'a> {
        Seen {
            client: Seen::client_of(
                peer.ip,
                peer.trusted,
                self.forwarded_for.clone().map(|r| &head[r]),
            ),
            agent: &head[self.agent.clone()],
            method: &head[self.method.clone()],
            path: crate::rules::target_path_bytes(&head[self.target.clone()]),
        }
    }
}

/// The range of `part` (a slice of `buf`) in `buf`.
fn span(buf: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

#[derive(Debug, PartialEq, Eq)]
enum ParsedRequest {
    Complete(RequestInfo),
    Partial,
    /// Not for the fast path (or not valid): hyper takes it.
    Other,
}

/// The fields the fast path treats apart, by name (ASCII case-insensitive); one
/// comparison at most for most names, as only names of the same length are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    UserAgent,
    ContentLength,
    Connection,
    TransferEncoding,
    Upgrade,
    Expect,
    Te,
    XForwardedFor,
    XForwardedProto,
    /// The rest of the hyper path's hop-by-hop list (`HOP_BY_HOP`): `Keep-Alive`,
    /// `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`, `Trailer`.
    HopByHop,
    Other,
}

fn field(name: &str) -> Field {
    let n = name.as_bytes();
    let is = |lower: &[u8]| named(n, lower);
    match n.len() {
        2 if is(b"te") => Field::Te,
        4 if is(b"host") => Field::Host,
        6 if is(b"expect") => Field::Expect,
        7 if is(b"upgrade") => Field::Upgrade,
        7 if is(b"trailer") => Field::HopByHop,
        10 if is(b"connection") => Field::Connection,
        10 if is(b"user-agent") => Field::UserAgent,
        10 if is(b"keep-alive") => Field::HopByHop,
        14 if is(b"content-length") => Field::ContentLength,
        15 if is(b"x-forwarded-for") => Field::XForwardedFor,
        16 if is(b"proxy-connection") => Field::HopByHop,
        17 if is(b"transfer-encoding") => Field::TransferEncoding,
        17 if is(b"x-forwarded-proto") => Field::XForwardedProto,
        18 if is(b"proxy-authenticate") => Field::HopByHop,
        19 if is(b"proxy-authorization") => Field::HopByHop,
        _ => Field::Other,
    }
}

/// Whether a field name (token characters, as the parser checked) is `lower` (lowercase
/// letters, digits and `-`) in any case, eight bytes at a time: setting bit 5 of each
/// byte lowercases a letter and turns no other token character into a letter, a digit
/// or `-`.
fn named(name: &[u8], lower: &[u8]) -> bool {
    const BIT5: u64 = 0x2020_2020_2020_2020;
    if name.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (x, y) in (&mut a).zip(&mut b) {
        let (x, y) = (<[u8; 8]>::try_from(x), <[u8; 8]>::try_from(y));
        if let (Ok(x), Ok(y)) = (x, y)
            && u64::from_ne_bytes(x) | BIT5 != u64::from_ne_bytes(y)
        {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

impl Field {
    /// Whether a field of this name is hop-by-hop (RFC 9110 §7.6.1): the hyper path's
    /// list, and `TE` unless its `value` is `trailers`.
    fn hop_by_hop(self, value: &[u8]) -> bool {
        match self {
            Field::Connection | Field::TransferEncoding | Field::Upgrade | Field::HopByHop => true,
            Field::Te => !crate::rules::te_kept(value),
            _ => false,
        }
    }
}

fn trimmed(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trimmed(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 19 digits: below u64::MAX, no overflow.
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether a `Connection` value holds only `close` and `keep-alive`; and whether `close`.
fn connection_tokens(v: &[u8]) -> Option<bool> {
    let mut close = false;
    for t in crate::rules::connection_tokens(v) {
        if t.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !t.eq_ignore_ascii_case(b"keep-alive") {
            return None;
        }
    }
    Some(close)
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Copies lines of a parsed head to the head we send, each ending in CRLF, and runs of
/// adjacent lines that already end in CRLF in one copy: a head that passes unchanged
/// costs one copy, not four per field.
struct Lines<'b> {
    buf: &'b [u8],
    /// The lines taken and not yet copied (without the last one's line end).
    run: std::ops::Range<usize>,
}

impl<'b> Lines<'b> {
    fn new(buf: &'b [u8]) -> Self {
        Self { buf, run: 0..0 }
    }

    /// Takes `line` (a range of `buf` without its line end).
    #[inline(always)]
    fn take(&mut self, out: &mut Vec<u8>, line: std::ops::Range<usize>) {
        // Two bytes between the run and the line: a line end, CRLF when the first is CR
        // (the parser takes CR only before LF).
        if self.run.start < self.run.end
            && self.run.end + 2 == line.start
            && self.buf[self.run.end] == b'\r'
        {
            self.run.end = line.end;
        } else {
            self.flush(out);
            self.run = line;
        }
    }

    /// Takes a field line: its name as it was, through the end of its value (leading
    /// whitespace of the value as sent, trailing whitespace removed by the parser).
    #[inline(always)]
    fn field(&mut self, out: &mut Vec<u8>, h: &httparse::Header<'b>) {
        let name = span(self.buf, h.name.as_bytes());
        // An empty value's slice need not point into the head: the line is the name
        // and its colon (the parser takes no whitespace before the colon).
        let end = if h.value.is_empty() {
            name.end + 1
        } else {
            span(self.buf, h.value).end
        };
        if end <= self.buf.len() && name.end < end {
            self.take(out, name.start..end);
        } else {
            self.flush(out);
            header(out, h.name.as_bytes(), h.value);
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.run.is_empty() {
            out.extend_from_slice(&self.buf[self.run.clone()]);
            out.extend_from_slice(b"\r\n");
            self.run = 0..0;
        }
    }
}

/// Parses a request head; when the fast path takes it, writes the head the pod gets to
/// `out`: hop-by-hop fields removed (RFC 9110 §7.6.1), `X-Forwarded-For` extended or
/// added, `X-Forwarded-Proto` added when absent, `Host` and everything else unchanged.
fn parse_request(buf: &[u8], peer: (&[u8], bool), out: &mut Vec<u8>) -> ParsedRequest {
    let (forwarded_for, trusted) = peer;
    // Uninitialized: the parser writes the fields it finds (zeroing 100 of them first
    // was 3.2 KB of stores per parse).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ParsedRequest::Partial,
        Err(_) => return ParsedRequest::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return ParsedRequest::Other;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return ParsedRequest::Other;
    }
    let mut spans = Spans {
        method: span(buf, method.as_bytes()),
        target: span(buf, path.as_bytes()),
        ..Spans::default()
    };
    out.clear();
    out.reserve(head_len + forwarded_for.len() + 64);
    let mut lines = Lines::new(buf);
    // The request line as sent when it is "METHOD SP target SP HTTP/1.1" (the parser
    // takes single spaces only).
    let version_end = spans.target.end + 9;
    if spans.target.start == spans.method.end + 1
        && buf.get(spans.target.end..version_end) == Some(b" HTTP/1.1")
    {
        lines.take(out, spans.method.start..version_end);
    } else {
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
    }
    let (mut body_len, mut close) = (None, false);
    let (mut xff, mut proto, mut hosts) = (false, false, 0);
    for h in req.headers.iter() {
        let kind = field(h.name);
        match kind {
            Field::Host => hosts += 1,
            Field::UserAgent => spans.agent = span(buf, h.value),
            Field::ContentLength => {
                if body_len.is_some() {
                    return ParsedRequest::Other;
                }
                match parse_length(h.value) {
                    Some(n) => body_len = Some(n),
                    None => return ParsedRequest::Other,
                }
            }
            Field::Connection => {
                match connection_tokens(h.value) {
                    Some(c) => close |= c,
                    None => return ParsedRequest::Other,
                }
                lines.flush(out);
                continue;
            }
            Field::TransferEncoding | Field::Upgrade | Field::Expect => {
                return ParsedRequest::Other;
            }
            Field::XForwardedFor => {
                if xff {
                    return ParsedRequest::Other;
                }
                xff = true;
                spans.forwarded_for = Some(span(buf, h.value));
                // Extended when a trusted proxy sent it; otherwise replaced.
                lines.flush(out);
                if trusted {
                    header(
                        out,
                        h.name.as_bytes(),
                        &crate::rules::forwarded_for(Some(h.value), forwarded_for),
                    );
                } else {
                    header(out, b"x-forwarded-for", forwarded_for);
                }
                continue;
            }
            Field::XForwardedProto if !trusted => {
                lines.flush(out);
                continue;
            }
            Field::XForwardedProto => proto = true,
            _ => {}
        }
        if kind.hop_by_hop(h.value) {
            lines.flush(out);
            continue;
        }
        lines.field(out, h);
    }
    lines.flush(out);
    // A missing or repeated Host is answered 400 on the hyper path (one set of rules:
    // `crate::rules::host_fields`).
    if crate::rules::host_fields(1, hosts).is_err() {
        return ParsedRequest::Other;
    }
    if !xff {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(forwarded_for);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if proto {
        b"\r\n"
    } else {
        b"x-forwarded-proto: http\r\n\r\n"
    });
    let Ok(body_len) = usize::try_from(body_len.unwrap_or(0)) else {
        return ParsedRequest::Other;
    };
    ParsedRequest::Complete(RequestInfo {
        head_len,
        body_len,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        close,
        spans,
    })
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// At the end of the pod's stream; the client's connection closes after it.
    Close,
}

#[derive(Debug, PartialEq, Eq)]
struct ResponseInfo {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The pod's connection can carry another request after this response.
    reusable: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ParsedResponse {
    Complete(ResponseInfo),
    /// An informational (1xx) head of this length: passed on as it is.
    Informational(usize),
    Partial,
    Invalid(&'static str),
}

/// Parses a pod's response head; when complete, writes the head the client gets to
/// `out` (hop-by-hop fields removed, `Connection: close` added when the client's
/// connection closes after it).
fn parse_response(
    buf: &[u8],
    is_head: bool,
    mut close_client: bool,
    out: &mut Vec<u8>,
) -> (ParsedResponse, bool) {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return (ParsedResponse::Partial, close_client),
        Err(_) => {
            return (
                ParsedResponse::Invalid("malformed response head"),
                close_client,
            );
        }
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return (
            ParsedResponse::Invalid("malformed response head"),
            close_client,
        );
    };
    if status == 101 {
        return (
            ParsedResponse::Invalid("unrequested protocol switch"),
            close_client,
        );
    }
    if (100..200).contains(&status) {
        return (ParsedResponse::Informational(head_len), close_client);
    }
    // Fields named by `Connection` are hop-by-hop too.
    let mut named: Vec<&[u8]> = Vec::new();
    let (mut pod_close, mut pod_keep_alive) = (false, false);
    let (mut length, mut chunked, mut coded) = (None, false, false);
    // Fields not passed on (by index; at most MAX_HEADERS of them), and the
    // `Content-Length` fields, dropped when a `Transfer-Encoding` frames the body.
    let (mut drop, mut lengths) = (0u128, 0u128);
    for (i, h) in resp.headers.iter().enumerate() {
        let kind = field(h.name);
        // The body passes through as it is, so its `Transfer-Encoding` stays.
        if kind != Field::TransferEncoding && kind.hop_by_hop(h.value) {
            drop |= 1 << i;
        }
        match kind {
            Field::Connection => {
                for t in crate::rules::connection_tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        pod_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        pod_keep_alive = true;
                    } else {
                        named.push(t);
                    }
                }
            }
            Field::TransferEncoding => {
                coded = true;
                // The final coding decides (RFC 9112 §6.3).
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|c| trimmed(c).eq_ignore_ascii_case(b"chunked"));
            }
            Field::ContentLength => {
                lengths |= 1 << i;
                match (parse_length(h.value), length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => {
                        return (
                            ParsedResponse::Invalid("invalid content-length"),
                            close_client,
                        );
                    }
                }
            }
            _ => {}
        }
    }
    if coded {
        drop |= lengths;
    }
    let framing = if is_head || status == 204 || status == 304 {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked(Chunked::new())
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    close_client |= framing == Framing::Close;
    let reusable = framing != Framing::Close && !pod_close && (version == 1 || pod_keep_alive);

    // The status line as the pod sent it ("HTTP/1.x NNN " checked by the parser, single
    // spaces, after any empty lines it skipped), in HTTP/1.1: no number formatted per
    // response. It ends where its reason phrase does, when it has one.
    let reason = span(buf, resp.reason.unwrap_or_default().as_bytes());
    let line = if reason.start >= 13 && reason.start < reason.end && reason.end <= head_len {
        reason.start - 13..reason.end
    } else {
        let from = buf
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or_default();
        let to = buf[from..head_len]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(head_len, |n| from + n);
        from..if to > from && buf[to - 1] == b'\r' {
            to - 1
        } else {
            to
        }
    };
    out.clear();
    out.reserve(head_len + 24);
    let mut lines = Lines::new(buf);
    if buf[line.clone()].starts_with(b"HTTP/1.1") {
        lines.take(out, line);
    } else {
        out.extend_from_slice(b"HTTP/1.1");
        out.extend_from_slice(buf.get(line.start + 8..line.end).unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    }
    for (i, h) in resp.headers.iter().enumerate() {
        if drop & (1 << i) != 0
            || (!named.is_empty()
                && named
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(h.name.as_bytes())))
        {
            lines.flush(out);
            continue;
        }
        lines.field(out, h);
    }
    lines.flush(out);
    if close_client {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (
        ParsedResponse::Complete(ResponseInfo {
            head_len,
            status,
            framing,
            reusable,
        }),
        close_client,
    )
}

/// Where a chunked body stands (RFC 9112 §7.1), fed the raw bytes as they pass through.
/// Lines end in CRLF only, and the chunk-size line takes the same forms hyper's decoder
/// does (hex digits, optional whitespace, `;` extensions): two framers that disagree
/// over one upstream connection is how response desync starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In the chunk size: the size so far and whether a digit was seen.
    Size {
        n: u64,
        digit: bool,
    },
    /// Whitespace after the size.
    SizeLws(u64),
    /// In a chunk extension (after `;`), up to the CR.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: whether the current line is still empty.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Chunked {
    fn new() -> Self {
        Chunked::Size { n: 0, digit: false }
    }

    /// Consumes bytes of the body; returns how many belong to it (all of `b` unless it
    /// ends inside), or an error for a malformed body.
    fn feed(&mut self, b: &[u8]) -> Result<usize, &'static str> {
        const BAD: &str = "malformed chunked body";
        let mut i = 0;
        while i < b.len() {
            if *self == Chunked::Done {
                return Ok(i);
            }
            let c = b[i];
            *self = match *self {
                Chunked::Size { n, digit } => match c {
                    b'\r' if digit => Chunked::SizeLf(n),
                    b' ' | b'\t' if digit => Chunked::SizeLws(n),
                    b';' if digit => Chunked::Ext(n),
                    _ => {
                        let d = (c as char).to_digit(16).ok_or(BAD)?;
                        if n >> 60 != 0 {
                            return Err(BAD);
                        }
                        Chunked::Size {
                            n: n * 16 + u64::from(d),
                            digit: true,
                        }
                    }
                },
                Chunked::SizeLws(n) => match c {
                    b' ' | b'\t' => Chunked::SizeLws(n),
                    b';' => Chunked::Ext(n),
                    b'\r' => Chunked::SizeLf(n),
                    _ => return Err(BAD),
                },
                Chunked::Ext(n) => match c {
                    b'\r' => Chunked::SizeLf(n),
                    b'\n' => return Err(BAD),
                    _ => Chunked::Ext(n),
                },
                Chunked::SizeLf(n) if c == b'\n' => after_size(n),
                Chunked::Data(n) => {
                    let take = (b.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(left)
                    };
                    continue;
                }
                Chunked::DataCr if c == b'\r' => Chunked::DataLf,
                Chunked::DataLf if c == b'\n' => Chunked::new(),
                Chunked::Trailer { empty } => match c {
                    b'\r' => Chunked::TrailerLf { empty },
                    b'\n' => return Err(BAD),
                    _ => Chunked::Trailer { empty: false },
                },
                Chunked::TrailerLf { empty } if c == b'\n' => {
                    if empty {
                        Chunked::Done
                    } else {
                        Chunked::Trailer { empty: true }
                    }
                }
                _ => return Err(BAD),
            };
            i += 1;
        }
        Ok(i)
    }
}

fn after_size(n: u64) -> Chunked {
    if n == 0 {
        Chunked::Trailer { empty: true }
    } else {
        Chunked::Data(n)
    }
}

impl Framing {
    /// How many bytes of `b` belong to the body, and whether the body is complete.
    fn feed(&mut self, b: &[u8]) -> Result<(usize, bool), &'static str> {
        match self {
            Framing::Empty => Ok((0, true)),
            Framing::Length(n) => {
                let take = (b.len() as u64).min(*n);
                *n -= take;
                Ok((take as usize, *n == 0))
            }
            Framing::Chunked(c) => {
                let take = c.feed(b)?;
                Ok((take, *c == Chunked::Done))
            }
            Framing::Close => Ok((b.len(), false)),
        }
    }
}

/// Why a request got no response head from its pod.
enum Fail {
    /// A reused connection closed before any byte of an answer; the request may be
    /// sent again.
    Stale,
    Answer(Answer),
}

/// Counts an answer of the activator's own and renders it.
fn failed(svc: &ServiceEntry, start: Instant, answer: Answer, close: bool) -> Vec<u8> {
    answer::record(svc, answer.status(), start);
    answer.raw(&svc.display, close)
}

/// Writes to the client within the send timeout; false when the write failed or the
/// client read nothing for that long (counted: the connection is then cut, and with it
/// the request, so a stalled reader holds neither a pod slot nor its service awake).
async fn send(client: &mut TcpStream, mut bytes: &[u8], c: &Inbound<'_>) -> bool {
    if bytes.is_empty() {
        return true;
    }
    // Most writes go whole at once: no timer is made for them.
    match client.try_write(bytes) {
        Ok(n) if n == bytes.len() => return true,
        Ok(n) => bytes = &bytes[n..],
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return false,
    }
    match tokio::time::timeout(c.send_timeout, client.write_all(bytes)).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            c.proxy.admit.table.metrics.send_timeouts.inc();
            false
        }
    }
}

/// Writes `head` and then `body` to the client as [`send`] does, in one system call
/// when the socket takes both: a small body is copied behind the head (one buffer is
/// the cheapest write there is), a larger one goes as a second buffer of one vectored
/// write (copying it would cost more than the vector does).
async fn send_both(
    client: &mut TcpStream,
    head: &mut Vec<u8>,
    body: &[u8],
    c: &Inbound<'_>,
) -> bool {
    if body.len() <= COPIED_BODY {
        head.extend_from_slice(body);
        return send(client, head, c).await;
    }
    let parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(body)];
    let n = match client.try_write_vectored(&parts) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(_) => return false,
    };
    if n >= head.len() {
        send(client, &body[n - head.len()..], c).await
    } else {
        send(client, &head[n..], c).await && send(client, body, c).await
    }
}

/// Writes all of `bytes` to a pod before `deadline`: at once when its socket takes
/// them (most requests: no waiting, no timer), else as the pod reads them. `None`: the
/// deadline came first.
async fn write_within(
    up: &mut TcpStream,
    mut bytes: &[u8],
    deadline: &mut Deadline,
) -> Result<(), Option<std::io::Error>> {
    match up.try_write(bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => bytes = &bytes[n..],
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(Some(e)),
    }
    tokio::select! {
        biased;
        r = up.write_all(bytes) => r.map_err(Some),
        _ = deadline.reached() => Err(None),
    }
}

/// Resolves when the client closed its connection; never when it only sent more
/// (its readiness is left as it is, for the next request's read).
async fn client_gone(s: &TcpStream) {
    // Waits in the read direction's own waker slot (no waiter list to join and leave
    // per request); then asks which readiness it was, already known.
    if std::future::poll_fn(|cx| s.poll_read_ready(cx))
        .await
        .is_err()
    {
        return;
    }
    match s.ready(Interest::READABLE).await {
        Ok(r) if r.is_read_closed() => {}
        Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// A deadline that is moved often and rarely reached: the timer stays registered at
/// an earlier instant and, when it fires before the current deadline, is set again
/// to it, so moving the deadline later costs no timer operation (two per request
/// otherwise, about a tenth of the fast path's instructions).
///
/// Once the timer holds the waker of the task that waits, waiting again with the same
/// waker only reads whether it fired (the timer wakes that task when it does); the
/// timer is polled, and the waker given to it, only when it is new or fired, or when
/// another waker waits.
struct Deadline {
    at: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The waker the timer holds, while it is registered and has not fired.
    registered: Option<std::task::Waker>,
}

impl Deadline {
    fn new(at: tokio::time::Instant) -> Self {
        Self {
            at,
            timer: Box::pin(tokio::time::sleep_until(at)),
            registered: None,
        }
    }

    fn set(&mut self, at: tokio::time::Instant) {
        self.at = at;
        if self.timer.deadline() > at {
            self.timer.as_mut().reset(at);
            self.registered = None;
        }
    }

    async fn reached(&mut self) {
        loop {
            std::future::poll_fn(|cx| {
                let fired = self.timer.is_elapsed();
                poll_registered(&mut self.registered, fired, self.timer.as_mut(), cx)
            })
            .await;
            if tokio::time::Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.timer.as_mut().reset(at);
            self.registered = None;
        }
    }
}

/// Polls `fut`, a future that wakes its task when it completes, unless it already
/// holds this task's waker (`registered`) and has not `fired`: then there is nothing
/// to learn from polling it again (each poll of a timer or a drain token takes a lock
/// or more, and a connection's task polls them on every request).
fn poll_registered<F: Future>(
    registered: &mut Option<std::task::Waker>,
    fired: bool,
    fut: Pin<&mut F>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<F::Output> {
    if !fired && registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        return std::task::Poll::Pending;
    }
    let r = fut.poll(cx);
    *registered = r.is_pending().then(|| cx.waker().clone());
    r
}

/// Makes room to read into `buf`: nearly `n` bytes when it is empty (a cleared
/// buffer takes back the space its consumed bytes held, without copying or allocating,
/// so a whole response fits the one read it came in; done once the consumed part
/// passes an eighth of `n`, not on every request), else at least a quarter of `n`.
fn room(buf: &mut BytesMut, n: usize) {
    let spare = buf.capacity() - buf.len();
    if spare < n / 4 || (buf.is_empty() && spare < n - n / 8) {
        buf.reserve(n);
    }
}

/// Whether a request head (one the fast path took) is an `answerWhileAsleep` request
/// of the service: forwarded, but not activity.
fn asleep_answer(svc: &ServiceEntry, head: &[u8]) -> bool {
    crate::rules::method_and_path(head).is_some_and(|(m, p)| svc.is_asleep_answer(m, p))
}

/// Serves a connection's requests on the fast path while they qualify.
pub async fn serve(c: Inbound<'_>, mut client: TcpStream) -> Outcome {
    let mut buf = BytesMut::with_capacity(4096);
    let mut ubuf = BytesMut::new();
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    // When the last response was sent (or the connection came): the next request head
    // is due within the header read timeout from then. One clock read per request
    // serves its deadlines and its latency.
    let mut idle_since = Instant::now();
    let at = tokio::time::Instant::from_std(idle_since);
    let mut head_deadline = Deadline::new(at + c.header_read_timeout);
    let mut response_deadline = Deadline::new(at + c.proxy.response_timeout);
    // Made once: a drain ends a connection waiting for its next request.
    let mut stopped = std::pin::pin!(c.stop.token().cancelled());
    let mut stop_waker = None;
    // The next request goes on a new connection (its last try on a pooled one found
    // it closed).
    let mut fresh_connection = false;
    // The listener's route, read again only when it changed (a version number compared
    // per request instead of a lock taken).
    let mut routes = c.route.clone();
    let mut current = routes.borrow_and_update().clone();
    loop {
        // A complete request head (and its body), within the header read timeout.
        head_deadline.set(tokio::time::Instant::from_std(idle_since) + c.header_read_timeout);
        let req = loop {
            if !buf.is_empty() {
                match parse_request(
                    &buf,
                    (c.peer.forwarded_for.as_bytes(), c.peer.trusted),
                    &mut out,
                ) {
                    ParsedRequest::Complete(r) if buf.len() >= r.head_len + r.body_len => break r,
                    ParsedRequest::Partial if buf.len() < c.max_header_bytes => {}
                    _ => return Outcome::Fallback(client, buf.freeze()),
                }
            }
            room(&mut buf, 4096);
            let read = tokio::select! {
                biased;
                r = client.read_buf(&mut buf) => r,
                _ = head_deadline.reached() => return Outcome::Done,
                _ = std::future::poll_fn(|cx| {
                    poll_registered(&mut stop_waker, c.stop.started(), stopped.as_mut(), cx)
                }), if buf.is_empty() => return Outcome::Done,
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Done,
                Ok(_) => {}
            }
        };

        // A pod with room, and a connection to it; otherwise hyper's path waits,
        // retries or answers.
        if routes.has_changed().unwrap_or(true) {
            current = routes.borrow_and_update().clone();
        }
        let Some(route) = current.as_ref() else {
            return Outcome::Fallback(client, buf.freeze());
        };
        if route.h2c {
            return Outcome::Fallback(client, buf.freeze());
        }
        let svc = &route.service;
        let Some(slot) = c.proxy.admit.try_pick(svc, &route.port_name) else {
            return Outcome::Fallback(client, buf.freeze());
        };
        let addr = slot.addr();
        let checkout = if fresh_connection {
            c.proxy
                .pool
                .connect_raw(addr)
                .await
                .map(|(s, u)| (s, false, u))
        } else {
            c.proxy.pool.checkout_raw(addr).await
        };
        let (mut up, reused, mut unproven) = match checkout {
            Ok(s) => s,
            Err(e) => {
                debug!(service = %svc.display, %addr, "connect failed, to the hyper path: {e}");
                c.proxy.pool.forget(&addr);
                return Outcome::Fallback(client, buf.freeze());
            }
        };
        // A reused connection that proves closed before any byte of an answer (the pod
        // closed it as idle, or went away) costs the client nothing for an idempotent
        // request: it is sent again once, on a new connection.
        let may_resend = reused && req.idempotent && !fresh_connection;
        fresh_connection = false;

        // Counted from here on, and answered whatever happens.
        // (A parked connection's ticket ends here: its request has its pod.)
        let now = Instant::now();
        let start = c.ticket.take().map_or(now, |t| t.since);
        let counted = !(svc.has_answers() && asleep_answer(svc, &buf[..req.head_len]));
        let seen = req.spans.seen(&buf[..req.head_len], c.peer);
        let in_flight = InFlight::start_at(svc.clone(), counted, Some(&seen), now);
        out.extend_from_slice(&buf[req.head_len..req.head_len + req.body_len]);
        // The request stays in `buf` until an answer has begun (see `may_resend`).
        let consumed = req.head_len + req.body_len;
        let mut close_client = req.close;
        let before_answer = |why: String| Fail::Answer(Answer::PodFailed { addr, why });

        // The request out, then the response head, within the response timeout;
        // informational heads pass.
        response_deadline.set(tokio::time::Instant::from_std(now) + c.proxy.response_timeout);
        let timed_out = || {
            Fail::Answer(Answer::PodTimeout {
                addr,
                after: c.proxy.response_timeout,
            })
        };
        let resp = match write_within(&mut up, &out, &mut response_deadline).await {
            Err(Some(_)) if may_resend => Err(Fail::Stale),
            Err(Some(e)) => Err(before_answer(e.to_string())),
            Err(None) => Err(timed_out()),
            Ok(()) => {
                ubuf.clear();
                let mut began = false;
                loop {
                    let (parsed, close) = if ubuf.is_empty() {
                        (ParsedResponse::Partial, close_client)
                    } else {
                        parse_response(&ubuf, req.is_head, close_client, &mut out)
                    };
                    match parsed {
                        ParsedResponse::Complete(r) => {
                            close_client = close;
                            break Ok(r);
                        }
                        ParsedResponse::Informational(n) => {
                            if !send(&mut client, &ubuf[..n], &c).await {
                                return Outcome::Done;
                            }
                            ubuf.advance(n);
                            continue;
                        }
                        ParsedResponse::Partial if ubuf.len() < MAX_RESPONSE_HEAD => {}
                        ParsedResponse::Partial => {
                            break Err(before_answer("response head too large".into()));
                        }
                        ParsedResponse::Invalid(why) => break Err(before_answer(why.to_string())),
                    }
                    room(&mut ubuf, READ_CHUNK);
                    tokio::select! {
                        biased;
                        r = up.read_buf(&mut ubuf) => match r {
                            Ok(0) | Err(_) if !began && may_resend => break Err(Fail::Stale),
                            Ok(0) => break Err(before_answer("connection closed before message completed".into())),
                            Err(e) => break Err(before_answer(e.to_string())),
                            Ok(_) => began = true,
                        },
                        _ = response_deadline.reached() => break Err(timed_out()),
                        // The client went away: so does the request.
                        _ = client_gone(&client) => return Outcome::Done,
                    }
                }
            }
        };
        drop(std::mem::take(&mut unproven));
        let resp = match resp {
            Ok(r) => {
                buf.advance(consumed);
                c.proxy.admit.table.metrics.fast_path_requests.inc();
                r
            }
            // A reused connection that proved closed before any byte of an answer: the
            // request goes again, once, on a new connection (counted once).
            Err(Fail::Stale) => {
                debug!(service = %svc.display, %addr, "reused connection closed before answering; sending again");
                in_flight.retried();
                *c.ticket = Some(Ticket::new(start));
                drop(slot);
                fresh_connection = true;
                continue;
            }
            Err(Fail::Answer(answer)) => {
                buf.advance(consumed);
                let r = failed(svc, start, answer, close_client);
                if !send(&mut client, &r, &c).await || close_client {
                    return Outcome::Done;
                }
                idle_since = Instant::now();
                continue;
            }
        };
        if c.stop.started() && !close_client {
            // Draining: this response is the connection's last.
            close_client = true;
            out.truncate(out.len() - 2);
            out.extend_from_slice(b"connection: close\r\n\r\n");
        }

        // The head and what came with it of the body, in one write when small.
        ubuf.advance(resp.head_len);
        let mut framing = resp.framing;
        let (take, mut done) = match framing.feed(&ubuf) {
            Ok(t) => t,
            Err(_) => return Outcome::Done,
        };
        idle_since = answer::record(svc, resp.status, start);
        if !send_both(&mut client, &mut out, &ubuf[..take], &c).await {
            return Outcome::Done;
        }
        let mut extra = ubuf.len() > take;
        // The rest of the body as it comes (and the idle time from its end).
        let streamed = !done && !extra;
        while !done && !extra {
            ubuf.clear();
            room(&mut ubuf, READ_CHUNK);
            let n = tokio::select! {
                biased;
                r = up.read_buf(&mut ubuf) => r,
                _ = client_gone(&client) => return Outcome::Done,
            };
            match n {
                Ok(0) if framing == Framing::Close => break,
                // The pod went away mid-response: the client's connection is cut, the
                // only way left to tell it the response is incomplete.
                Ok(0) | Err(_) => return Outcome::Done,
                Ok(_) => {}
            }
            let take;
            (take, done) = match framing.feed(&ubuf) {
                Ok(t) => t,
                Err(_) => return Outcome::Done,
            };
            if !send(&mut client, &ubuf[..take], &c).await {
                return Outcome::Done;
            }
            extra = ubuf.len() > take;
        }
        if streamed {
            idle_since = Instant::now();
        }
        if resp.reusable && done && !extra {
            c.proxy.pool.put_raw(addr, up);
        }
        in_flight.end(idle_since);
        drop(slot);
        if close_client {
            let _ = client.shutdown().await;
            return Outcome::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> (ParsedRequest, String) {
        let mut out = Vec::new();
        let p = parse_request(raw.as_bytes(), (b"10.0.0.9", true), &mut out);
        (p, String::from_utf8(out).unwrap())
    }

    #[test]
    fn fields_are_classified_as_the_hyper_path_strips_them() {
        for h in super::super::hyper_path::HOP_BY_HOP.iter() {
            for name in [h.as_str().to_owned(), h.as_str().to_ascii_uppercase()] {
                assert!(field(&name).hop_by_hop(b""), "{name}");
            }
        }
        assert!(field("TE").hop_by_hop(b"gzip"));
        assert!(!field("te").hop_by_hop(b" trailers "));
        for name in [
            "x-pod-name",
            "date",
            "content-type",
            "hosts",
            "tee",
            "accept",
            "x",
        ] {
            assert_eq!(field(name), Field::Other, "{name}");
            assert!(!field(name).hop_by_hop(b""), "{name}");
        }
        assert_eq!(field("Content-Length"), Field::ContentLength);
        assert_eq!(field("X-FORWARDED-PROTO"), Field::XForwardedProto);
    }

    #[test]
    fn heads_are_copied_with_crlf_line_ends_whatever_they_came_with() {
        // Bare LFs, trailing whitespace, an empty value and an empty line before the
        // status line: what goes on has CRLF line ends and no trailing whitespace.
        let (p, out) = request(
            "GET /x HTTP/1.1\nHost: a \nX-Empty:\r\nAccept: */*\r\nKeep-Alive: 1\r\nX-B: 2\n\n",
        );
        assert!(matches!(p, ParsedRequest::Complete(_)));
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nAccept: */*\r\nX-B: 2\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let (p, _, out) = response(
            "\r\nHTTP/1.1 200 OK\nx-a: 1 \r\nx-b:\r\nx-c: 3 \ncontent-length: 0\n\r\n",
            false,
        );
        assert!(matches!(p, ParsedResponse::Complete(_)));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\nx-b:\r\nx-c: 3\r\ncontent-length: 0\r\n\r\n"
        );
        let (_, _, out) = response("HTTP/1.0 200\r\ncontent-length: 0\r\n\r\n", false);
        assert_eq!(out, "HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n");
    }

    #[test]
    fn forwarded_fields_of_an_untrusted_client_are_replaced() {
        let mut out = Vec::new();
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\r\n";
        let p = parse_request(raw.as_bytes(), (b"10.0.0.9", false), &mut out);
        assert!(matches!(p, ParsedRequest::Complete(_)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn request_head_is_rewritten_in_one_pass() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: gzip\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\n";
        let (p, out) = request(raw);
        assert_eq!(
            p,
            ParsedRequest::Complete(RequestInfo {
                head_len: raw.len(),
                body_len: 0,
                is_head: false,
                idempotent: true,
                close: false,
                spans: Spans {
                    method: 0..3,
                    target: 4..10,
                    agent: 0..0,
                    forwarded_for: Some(115..122),
                },
            })
        );
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nAccept: */*\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let (_, out) = request(
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nconnection: close\r\nx-forwarded-proto: https\r\nte: trailers\r\n\r\nabc",
        );
        assert_eq!(
            out,
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nx-forwarded-proto: https\r\nte: trailers\r\nx-forwarded-for: 10.0.0.9\r\n\r\n"
        );
    }

    #[test]
    fn unusual_requests_go_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nhost: a\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: x-secret\r\nx-secret: 1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nx-forwarded-for: a\r\nx-forwarded-for: b\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert_eq!(request(raw).0, ParsedRequest::Other, "{raw}");
        }
        assert_eq!(
            request("GET / HTTP/1.1\r\nhost: a\r\n").0,
            ParsedRequest::Partial
        );
    }

    fn response(raw: &str, is_head: bool) -> (ParsedResponse, bool, String) {
        let mut out = Vec::new();
        let (p, close) = parse_response(raw.as_bytes(), is_head, false, &mut out);
        (p, close, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing_and_head() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nx-kept: 2\r\n\r\nhello";
        let (p, close, out) = response(raw, false);
        assert_eq!(
            p,
            ParsedResponse::Complete(ResponseInfo {
                head_len: raw.len() - 5,
                status: 200,
                framing: Framing::Length(5),
                reusable: true
            })
        );
        assert!(!close);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-kept: 2\r\n\r\n"
        );

        let (p, close, out) = response(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        );
        assert!(matches!(
            p,
            ParsedResponse::Complete(ResponseInfo {
                framing: Framing::Chunked(_),
                reusable: true,
                ..
            })
        ));
        assert!(!close);
        assert_eq!(out, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");

        // No length: the body ends with the pod's stream, and so does the client's connection.
        let (p, close, out) = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(
            p,
            ParsedResponse::Complete(ResponseInfo {
                framing: Framing::Close,
                reusable: false,
                ..
            })
        ));
        assert!(close);
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");

        for (raw, head) in [
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", true),
        ] {
            let (p, _, _) = response(raw, head);
            assert!(
                matches!(
                    p,
                    ParsedResponse::Complete(ResponseInfo {
                        framing: Framing::Empty,
                        reusable: true,
                        ..
                    })
                ),
                "{raw}"
            );
        }
        let (_, _, out) = response("HTTP/1.0 404 \r\ncontent-length: 0\r\n\r\n", false);
        assert_eq!(out, "HTTP/1.1 404 \r\ncontent-length: 0\r\n\r\n");
        let (p, _, _) = response("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(matches!(
            p,
            ParsedResponse::Complete(ResponseInfo {
                reusable: false,
                ..
            })
        ));
        let (p, _, _) = response(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(matches!(
            p,
            ParsedResponse::Complete(ResponseInfo {
                reusable: false,
                ..
            })
        ));
        let hints = "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n";
        assert_eq!(
            response(hints, false).0,
            ParsedResponse::Informational(hints.len())
        );
        assert!(matches!(
            response(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .0,
            ParsedResponse::Invalid(_)
        ));
        assert!(matches!(
            response("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).0,
            ParsedResponse::Invalid(_)
        ));
        assert_eq!(
            response("HTTP/1.1 200 OK\r\n", false).0,
            ParsedResponse::Partial
        );
    }

    #[test]
    fn chunk_size_lines_are_read_as_httparse_reads_them() {
        // Every size line of up to 5 bytes from this alphabet (a bare LF among them),
        // then CRLF: our decoder takes a line exactly when httparse::parse_chunk_size
        // does, with the same size.
        let alphabet = b"0a5F; \tx=\n";
        let mut lines: Vec<Vec<u8>> = vec![vec![]];
        let mut last = lines.clone();
        for _ in 0..5 {
            let mut next = Vec::new();
            for l in &last {
                for c in alphabet {
                    let mut m = l.clone();
                    m.push(*c);
                    next.push(m);
                }
            }
            lines.extend(next.iter().cloned());
            last = next;
        }
        assert!(lines.len() > 100_000);
        for mut line in lines {
            line.extend_from_slice(b"\r\n");
            // httparse is laxer than hyper's decoder in two ways, where we follow hyper
            // (`hyper::proto::h1::decode`): a size needs a digit, and an extension may
            // not hold a bare LF.
            let hyper_refuses =
                !line[0].is_ascii_hexdigit() || line[..line.len() - 1].contains(&b'\n');
            let theirs = match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((n, size))) if n == line.len() && !hyper_refuses => {
                    Some(size)
                }
                _ => None,
            };
            let mut c = Chunked::new();
            let ours = match (c.feed(&line), c) {
                (Ok(_), Chunked::Data(size)) => Some(size),
                (Ok(_), Chunked::Trailer { .. }) => Some(0),
                _ => None,
            };
            assert_eq!(theirs, ours, "{:?}", String::from_utf8_lossy(&line));
        }
    }

    #[test]
    fn chunked_bodies_end_where_they_end_in_any_split() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"HTTP/1.1 200 OK");
        for split in 0..=body.len() {
            let mut c = Chunked::new();
            let a = c.feed(&with_next[..split]).unwrap();
            assert_eq!(a, split, "split {split}");
            let b = c.feed(&with_next[split..]).unwrap();
            assert_eq!(a + b, body.len(), "split {split}");
            assert_eq!(c, Chunked::Done);
        }
        let mut c = Chunked::new();
        assert_eq!(c.feed(b"0\r\n\r\n").unwrap(), 5);
        assert_eq!(c, Chunked::Done);
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"fffffffffffffffff\r\n",
            // Bare LF anywhere, as hyper and httparse refuse it.
            b"5\nhello\r\n",
            b"5\r\nhello\n",
            b"5;ext\n",
            b"0\r\nx-trailer: 1\n\r\n",
            b"0\r\n\n",
            // Whitespace after the size may only lead to `;` or the line end.
            b"5 x\r\n",
        ] {
            assert!(
                Chunked::new().feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn lengths_count_down() {
        let mut f = Framing::Length(5);
        assert_eq!(f.feed(b"abc").unwrap(), (3, false));
        assert_eq!(f.feed(b"defgh").unwrap(), (2, true));
        assert_eq!(Framing::Empty.feed(b"x").unwrap(), (0, true));
    }
}
