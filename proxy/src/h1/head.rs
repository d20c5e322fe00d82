//! Message heads on the upstream wire: the request head written into a reused buffer, the
//! response head parsed with `httparse` into a `HeaderMap` whose values share the read buffer
//! (no copy per header), and the body framing both imply (RFC 9112 §6).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};

use super::Malformed;
use super::raw_head::{self, RawHead};

/// Most response header fields accepted (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Largest response head accepted (offsets into it fit a `u16`).
pub const MAX_HEAD_BYTES: usize = u16::MAX as usize;

/// How a request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body bytes at all.
    Empty,
    Length(u64),
    Chunked,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (the connection is not reused).
    UntilEof,
}

/// A parsed response head. Hop-by-hop fields (RFC 9110 §7.6.1: `Connection` and the names it
/// lists, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
/// `Proxy-Authenticate`, `Proxy-Authorization`) never enter `headers`: what they say about this
/// hop is kept in [`Delimiting`], read in the same pass.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// Empty when the fields are in `raw`.
    pub headers: HeaderMap,
    pub raw: Option<RawHead>,
    delimiting: Delimiting,
}

/// What the hop-by-hop and length fields of a response head say about its body and connection.
#[derive(Debug, Default, Clone, Copy)]
struct Delimiting {
    /// `Connection: close` seen.
    close: bool,
    /// `Connection: keep-alive` seen.
    keep_alive: bool,
    /// A `Transfer-Encoding` field seen, and whether its last coding is `chunked`.
    transfer_encoding: bool,
    chunked: bool,
    /// The `Content-Length` (all values agreeing), or why it is unusable.
    content_length: Option<Result<u64, Malformed>>,
}

impl ResponseHead {
    /// The body framing for a response to `method`, and whether the connection stays usable
    /// after it.
    pub fn framing(&self, method: &Method) -> Result<(RespFraming, bool), Malformed> {
        let d = &self.delimiting;
        let mut keep_alive = match self.version {
            Version::HTTP_11 => !d.close,
            _ => d.keep_alive && !d.close,
        };
        let status = self.status.as_u16();
        if method == Method::HEAD || status == 204 || status == 304 {
            return Ok((RespFraming::Empty, keep_alive));
        }
        if d.transfer_encoding {
            // Both framings at once: decode by Transfer-Encoding, then close (RFC 9112 §6.3).
            if d.content_length.is_some() {
                keep_alive = false;
            }
            return Ok(if d.chunked {
                (RespFraming::Chunked, keep_alive)
            } else {
                (RespFraming::UntilEof, false)
            });
        }
        match d.content_length {
            Some(Err(e)) => Err(e),
            Some(Ok(0)) => Ok((RespFraming::Empty, keep_alive)),
            Some(Ok(n)) => Ok((RespFraming::Length(n), keep_alive)),
            None => Ok((RespFraming::UntilEof, false)),
        }
    }
}

/// The request body framing hyper's client would choose (upstreams see the same bytes as
/// before), and whether a `content-length` header must be added.
pub fn request_framing(
    parts: &Parts,
    body_ended: bool,
    exact_len: Option<u64>,
) -> (ReqFraming, bool) {
    if body_ended {
        return (ReqFraming::Empty, false);
    }
    if let Ok(Some(n)) = content_length(&parts.headers) {
        return (ReqFraming::Length(n), false);
    }
    match exact_len {
        Some(n) => (ReqFraming::Length(n), true),
        None if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) => {
            (ReqFraming::Empty, false)
        }
        None => (ReqFraming::Chunked, false),
    }
}

/// Appends the request head to `dst`, then the `added` field lines (`name: value\r\n` each,
/// written by the proxy). Transfer-Encoding is the framing's to write; a Content-Length that the
/// framing replaces is left out.
pub fn encode_request(
    parts: &Parts,
    added: &[u8],
    framing: ReqFraming,
    add_length: bool,
    dst: &mut Vec<u8>,
) {
    dst.extend_from_slice(parts.method.as_str().as_bytes());
    dst.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    dst.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    let drop_length = add_length || framing == ReqFraming::Chunked;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || (drop_length && name == header::CONTENT_LENGTH) {
            continue;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ReqFraming::Length(n) if add_length => {
            put_content_length(dst, n);
        }
        _ => {}
    }
    dst.extend_from_slice(added);
    dst.extend_from_slice(b"\r\n");
}

/// Parses a final response head from the front of `buf` (skipping 1xx interim responses), or
/// `None` when more bytes are needed. The head's bytes are split off `buf`; header values
/// share them.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, Malformed> {
    parse(buf, false)
}

/// [`parse_response`], keeping the forwarded fields as raw lines ([`RawHead`]) when they can go
/// on as they are (the header map is then empty).
pub fn parse_response_raw(buf: &mut BytesMut) -> Result<Option<ResponseHead>, Malformed> {
    parse(buf, true)
}

fn parse(buf: &mut BytesMut, want_raw: bool) -> Result<Option<ResponseHead>, Malformed> {
    loop {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match parser().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Ok(None),
            Ok(_) => return Err(Malformed("response head too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Malformed("too many response headers"));
            }
            Err(_) => return Err(Malformed("bad response head")),
        };
        let code = resp.code.unwrap_or(0);
        if code == 101 {
            return Err(Malformed("protocol switch without an upgrade request"));
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Malformed("bad status code"))?;
        let version = match resp.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Pass 1, over the fields as parsed: what the hop-by-hop and length fields say, and the
        // raw lines to forward (offsets into the head, which keeps its bytes when frozen).
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u16;
        let mut d = Delimiting::default();
        // Names `Connection` lists beyond the usual tokens: removed from what is forwarded.
        let mut listed = false;
        let mut raw = want_raw.then(raw_head::Builder::new);
        for h in resp.headers.iter() {
            let (name, raw_value) = (h.name.as_bytes(), h.value);
            match Field::of(name) {
                Field::Connection => {
                    for token in tokens(raw_value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            d.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            d.keep_alive = true;
                        } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                            listed = true;
                        }
                    }
                }
                Field::TransferEncoding => {
                    d.transfer_encoding = true;
                    // The last field's last coding decides.
                    d.chunked = raw_value
                        .rsplit(|&b| b == b',')
                        .next()
                        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
                Field::HopByHop => {}
                Field::ContentLength => {
                    d.content_length = Some(match d.content_length {
                        None => parse_length(raw_value, None),
                        Some(Ok(n)) => parse_length(raw_value, Some(n)),
                        Some(Err(e)) => Err(e),
                    });
                }
                f @ (Field::Known(_) | Field::Other) => {
                    if let Some(r) = raw.as_mut() {
                        let ns = offset(name);
                        let span = (
                            ns,
                            ns + name.len() as u16,
                            offset(raw_value) + raw_value.len() as u16,
                        );
                        r.keep(buf, span, f == Field::Known(0));
                    }
                }
            }
        }
        if listed && let Some(r) = raw.as_mut() {
            r.refuse();
        }
        // Transfer-Encoding overrides Content-Length; a proxy removes the latter before
        // forwarding (RFC 9112 §6.3).
        let length = match d.content_length {
            Some(Ok(n)) if !d.transfer_encoding => Some(n),
            _ => None,
        };
        let head = buf.split_to(len).freeze();
        // httparse takes the value bytes `HeaderValue` takes (HTAB, SP–`~`, obs-text): raw
        // lines need no further check.
        if let Some(raw) = raw.and_then(|r| r.finish(head.clone(), length)) {
            return Ok(Some(ResponseHead {
                status,
                version,
                headers: HeaderMap::new(),
                raw: Some(raw),
                delimiting: d,
            }));
        }
        return Ok(Some(ResponseHead {
            status,
            version,
            headers: into_map(&head, &d, listed)?,
            raw: None,
            delimiting: d,
        }));
    }
}

/// The response parser's settings (spaces before a field's colon are tolerated, as browsers do).
fn parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config
}

/// Pass 2, when the fields cannot go raw: the frozen head parsed again (it parsed once, so it
/// parses the same), its forwarded fields into a map whose values share the head.
fn into_map(head: &Bytes, d: &Delimiting, listed: bool) -> Result<HeaderMap, Malformed> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    if !matches!(
        parser().parse_response_with_uninit_headers(&mut resp, head, &mut fields),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(Malformed("bad response head"));
    }
    let base = head.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let raw_name = h.name.as_bytes();
        let name = match Field::of(raw_name) {
            Field::Connection | Field::TransferEncoding | Field::HopByHop => continue,
            Field::ContentLength if d.transfer_encoding => continue,
            Field::ContentLength => header::CONTENT_LENGTH,
            Field::Known(i) => KNOWN[usize::from(i)].clone(),
            Field::Other => {
                HeaderName::from_bytes(raw_name).map_err(|_| Malformed("bad header name"))?
            }
        };
        let at = h.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(head.slice(at..at + h.value.len()))
            .map_err(|_| Malformed("bad header value"))?;
        headers.append(name, value);
    }
    if listed {
        for h in resp.headers.iter() {
            if Field::of(h.name.as_bytes()) != Field::Connection {
                continue;
            }
            for token in tokens(h.value) {
                if let Ok(name) = HeaderName::from_bytes(token) {
                    headers.remove(name);
                }
            }
        }
    }
    Ok(headers)
}

/// How a response header field is treated while the head is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Connection,
    TransferEncoding,
    ContentLength,
    /// Another hop-by-hop field: dropped.
    HopByHop,
    /// A common end-to-end field: its name is `KNOWN[i]`, no need to parse it.
    Known(u8),
    Other,
}

/// End-to-end names common in responses, recognized while classifying (`HeaderName::from_bytes`
/// lowercases through a table and matches every standard name: ~150 instructions a field).
static KNOWN: [HeaderName; 12] = [
    header::DATE,
    header::ETAG,
    header::VARY,
    header::SERVER,
    header::EXPIRES,
    header::LOCATION,
    header::SET_COOKIE,
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::LAST_MODIFIED,
    header::ACCEPT_RANGES,
    header::CONTENT_ENCODING,
];

/// Writes `content-length: <n>\r\n` (the formatting machinery costs ~250 instructions).
pub(crate) fn put_content_length(dst: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    dst.extend_from_slice(b"content-length: ");
    dst.extend_from_slice(&digits[at..]);
    dst.extend_from_slice(b"\r\n");
}

/// Whether field name `name` is `lower` (lowercase letters, digits and `-`) in any case. `name`
/// is a token (httparse checked it): setting bit 5 of a token byte turns an uppercase letter into
/// its lowercase one and no other token byte into a letter, digit or `-`, so eight bytes compare
/// at once (~60 instructions a name fewer than `eq_ignore_ascii_case`).
#[inline(always)]
pub(crate) fn name_is(name: &[u8], lower: &[u8]) -> bool {
    const BIT5: u64 = 0x2020_2020_2020_2020;
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lower).all(|(a, b)| a | 0x20 == *b);
    }
    let word = |s: &[u8], i: usize| {
        s.get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let mut i = 0;
    while i + 8 < n {
        if word(name, i) | BIT5 != word(lower, i) {
            return false;
        }
        i += 8;
    }
    // The last (possibly overlapping) eight bytes.
    word(name, n - 8) | BIT5 == word(lower, n - 8)
}

impl Field {
    /// Classifies a raw field name (ASCII case-insensitive), by length first.
    fn of(name: &[u8]) -> Field {
        let is = |s: &[u8]| name_is(name, s);
        match name.len() {
            2 if is(b"te") => Field::HopByHop,
            4 if is(b"date") => Field::Known(0),
            4 if is(b"etag") => Field::Known(1),
            4 if is(b"vary") => Field::Known(2),
            6 if is(b"server") => Field::Known(3),
            7 if is(b"expires") => Field::Known(4),
            7 if is(b"trailer") || is(b"upgrade") => Field::HopByHop,
            8 if is(b"location") => Field::Known(5),
            10 if is(b"connection") => Field::Connection,
            10 if is(b"keep-alive") => Field::HopByHop,
            10 if is(b"set-cookie") => Field::Known(6),
            12 if is(b"content-type") => Field::Known(7),
            13 if is(b"cache-control") => Field::Known(8),
            13 if is(b"last-modified") => Field::Known(9),
            13 if is(b"accept-ranges") => Field::Known(10),
            14 if is(b"content-length") => Field::ContentLength,
            16 if is(b"proxy-connection") => Field::HopByHop,
            16 if is(b"content-encoding") => Field::Known(11),
            17 if is(b"transfer-encoding") => Field::TransferEncoding,
            18 if is(b"proxy-authenticate") => Field::HopByHop,
            19 if is(b"proxy-authorization") => Field::HopByHop,
            _ => Field::Other,
        }
    }
}

/// One `Content-Length` field's value: a comma list whose values must agree with each other and
/// with the previous fields' `seen` (RFC 9110 §8.6).
fn parse_length(value: &[u8], seen: Option<u64>) -> Result<u64, Malformed> {
    let mut seen = seen;
    for part in value.split(|&b| b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(Malformed("bad content-length"));
        }
        let n = digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if seen.is_some_and(|f| f != n) {
            return Err(Malformed("conflicting content-length values"));
        }
        seen = Some(n);
    }
    // `split` yields at least one part, so `seen` is set here.
    seen.ok_or(Malformed("bad content-length"))
}

/// A `Name: value` field line (no CRLF) split at its first colon, the value without the
/// whitespace before it; `None` for a line without a colon.
pub(crate) fn split_field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    Some((&line[..colon], line[colon + 1..].trim_ascii_start()))
}

/// The elements of a comma-separated field value (`Connection`, `Transfer-Encoding`...), with
/// their surrounding whitespace trimmed.
pub(super) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The Content-Length, if present; several values must agree (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Malformed> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        found = Some(parse_length(v.as_bytes(), found)?);
    }
    Ok(found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_in_any_case_by_words() {
        let names: [&[u8]; 8] = [
            b"te",
            b"date",
            b"connection",
            b"content-type",
            b"content-length",
            b"transfer-encoding",
            b"proxy-authorization",
            b"x-a-header-longer-than-sixteen",
        ];
        for lower in names {
            let upper = lower.to_ascii_uppercase();
            let mixed: Vec<u8> = lower
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if i % 3 == 0 {
                        b.to_ascii_uppercase()
                    } else {
                        *b
                    }
                })
                .collect();
            for name in [lower.to_vec(), upper, mixed] {
                assert!(name_is(&name, lower), "{name:?}");
            }
            // Any one byte changed (to another token byte), or one byte more or fewer, differs.
            for i in 0..lower.len() {
                for other in [b'_', b'.', b'a', b'Z', b'1'] {
                    let mut name = lower.to_vec();
                    if name[i].eq_ignore_ascii_case(&other) {
                        continue;
                    }
                    name[i] = other;
                    assert!(!name_is(&name, lower), "{name:?}");
                }
            }
            assert!(!name_is(&lower[1..], lower));
            assert!(!name_is(&[lower, b"s"].concat(), lower));
        }
        assert_eq!(Field::of(b"Content-Length"), Field::ContentLength);
        assert_eq!(Field::of(b"CONNECTION"), Field::Connection);
        assert_eq!(Field::of(b"content_length"), Field::Other);
    }

    #[test]
    fn content_length_is_written_without_fmt() {
        for n in [0u64, 7, 10, 22, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            put_content_length(&mut out, n);
            assert_eq!(out, format!("content-length: {n}\r\n").into_bytes());
        }
    }

    fn parse(wire: &[u8]) -> (Result<Option<ResponseHead>, Malformed>, BytesMut) {
        let mut buf = BytesMut::from(wire);
        let r = parse_response(&mut buf);
        (r, buf)
    }

    #[test]
    fn parses_a_head_and_leaves_the_body() {
        let (r, rest) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nhi");
        let head = r.unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&rest[..], b"hi");
        assert_eq!(
            head.framing(&Method::GET).unwrap(),
            (RespFraming::Length(2), true)
        );
        assert_eq!(
            head.framing(&Method::HEAD).unwrap(),
            (RespFraming::Empty, true)
        );
    }

    #[test]
    fn raw_heads_materialize_to_what_the_map_parser_builds() {
        struct Carrier(Option<RawHead>);
        impl super::raw_head::RawHeadSource for Carrier {
            fn take_raw_head(&mut self) -> Option<Box<RawHead>> {
                self.0.take().map(Box::new)
            }
        }
        let many: String = (0..13).map(|i| format!("X-{i}: {i}\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n");
        let cases: [(&str, bool); 7] = [
            (
                "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 05:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:  2 \r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\nKeep-Alive: timeout=5\r\nTE: x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
                true,
            ),
            ("HTTP/1.0 200 OK\nX-Bare: lf\nContent-Length: 0\n\n", true),
            // A name `Connection` lists, a space before a colon, too many lines: the map.
            (
                "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nName : spaced\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            (&many, false),
        ];
        for (wire, goes_raw) in cases {
            let map = parse(wire.as_bytes()).0.unwrap().unwrap();
            let mut buf = BytesMut::from(wire.as_bytes());
            let raw = parse_response_raw(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty(), "{wire:?}");
            assert_eq!(raw.raw.is_some(), goes_raw, "{wire:?}");
            assert_eq!(
                raw.framing(&Method::GET).unwrap(),
                map.framing(&Method::GET).unwrap()
            );
            let mut resp = http::Response::new(Carrier(raw.raw));
            *resp.headers_mut() = raw.headers;
            super::super::raw_head::materialize(&mut resp);
            assert_eq!(resp.headers(), &map.headers, "{wire:?}");
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let (r, rest) = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        let head = r.unwrap().unwrap();
        assert_eq!(head.status, 204);
        assert!(rest.is_empty());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").0.unwrap().is_none());
        assert!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                .0
                .is_err()
        );
        assert!(parse(b"HTTP/1.1 2000 OK\r\n\r\n").0.is_err());
        assert!(parse(b"garbage\r\n\r\n").0.is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |wire: &[u8]| {
            let head = parse(wire).0.unwrap().unwrap();
            head.framing(&Method::GET)
        };
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok((RespFraming::Chunked, true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Ok((RespFraming::Chunked, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Ok((RespFraming::UntilEof, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok((RespFraming::UntilEof, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"),
            Ok((RespFraming::Length(5), false))
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Ok((RespFraming::Length(5), false))
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n"),
            Ok((RespFraming::Length(5), true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            Ok((RespFraming::Empty, true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok((RespFraming::Length(5), true))
        );
        assert!(framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n").is_err());
        assert!(framing(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
    }

    #[test]
    fn hop_by_hop_fields_never_enter_the_map() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
              X-Hop: 1\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\n\
              Proxy-Connection: close\r\nProxy-Authenticate: Basic\r\nX-Kept: 2\r\n\
              Content-Length: 2\r\n\r\nhi",
        )
        .0
        .unwrap()
        .unwrap();
        let mut names: Vec<&str> = head.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert_eq!(
            head.framing(&Method::GET).unwrap(),
            (RespFraming::Length(2), true)
        );
        // Transfer-Encoding wins over Content-Length, which is not forwarded (RFC 9112 §6.3).
        let head =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .0
                .unwrap()
                .unwrap();
        assert!(head.headers.is_empty());
        assert_eq!(
            head.framing(&Method::GET).unwrap(),
            (RespFraming::Chunked, false)
        );
        // Agreeing values over several fields; a close in any Connection field counts.
        let head = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: x\r\nconnection: Close\r\nContent-Length: 4, 4\r\n\r\n",
        )
        .0
        .unwrap()
        .unwrap();
        assert_eq!(
            head.framing(&Method::GET).unwrap(),
            (RespFraming::Length(4), false)
        );
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n")
            .0
            .unwrap()
            .unwrap();
        assert!(head.framing(&Method::GET).is_err());
        assert!(head.framing(&Method::HEAD).is_ok());
    }

    #[test]
    fn known_names_are_recognized_in_any_case() {
        for (i, name) in KNOWN.iter().enumerate() {
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(Field::of(upper.as_bytes()), Field::Known(i as u8), "{name}");
        }
        assert_eq!(Field::of(b"X-Date"), Field::Other);
        let head = parse(b"HTTP/1.1 200 OK\r\nSERVER: x\r\nDate: y\r\nContent-Length: 0\r\n\r\n")
            .0
            .unwrap()
            .unwrap();
        assert_eq!(head.headers[header::SERVER], "x");
        assert_eq!(head.headers[header::DATE], "y");
    }

    #[test]
    fn request_heads_match_hyper_framing() {
        let (mut parts, ()) = http::Request::post("http://a/x?y=1")
            .header("host", "a")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        let (framing, add) = request_framing(&parts, false, None);
        encode_request(&parts, b"", framing, add, &mut out);
        assert_eq!(
            out,
            b"POST /x?y=1 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        let (framing, add) = request_framing(&parts, false, Some(4));
        encode_request(&parts, b"", framing, add, &mut out);
        assert!(out.ends_with(b"host: a\r\ncontent-length: 4\r\n\r\n"));
        parts.method = Method::GET;
        assert_eq!(
            request_framing(&parts, false, None),
            (ReqFraming::Empty, false)
        );
        assert_eq!(
            request_framing(&parts, true, None),
            (ReqFraming::Empty, false)
        );
    }
}
