//! Downstream request heads for the HTTP/1.1 server loop ([`super::serve`]): parsed with
//! `httparse` into an `http::Request` whose URI and header values share the read buffer (no copy
//! per header), or set aside for hyper when the request is anything but a plain bodiless
//! HTTP/1.1 request.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use super::head::{MAX_HEADERS, name_is, tokens};
use crate::body::ProxyBody;

/// What the front of the read buffer holds. Moved once, straight into the handler: boxing the
/// request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A complete request this loop serves; `close` when the client asked to close after it.
    Request {
        req: Request<ProxyBody>,
        close: bool,
    },
    /// Not a complete head yet.
    Partial,
    /// Anything else — a body, an upgrade, `Expect`, HTTP/1.0, HTTP/2's preface, a head that is
    /// malformed or too large — goes to hyper unchanged, which answers it as before (400, 414,
    /// 431, or serves it). The buffer is left as it was.
    Handoff,
}

/// Largest head taken (offsets into it fit a `u16`); longer ones go to hyper, which answers 431.
const MAX_HEAD_BYTES: usize = u16::MAX as usize;

/// Header fields the proxy may add to a request on its way.
const ADDED_HEADERS: usize = 4;

/// Parses a request head at the front of `buf`, splitting it off when complete.
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Parsed {
    let max_head = max_head.min(MAX_HEAD_BYTES);
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut r,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        _ => return Parsed::Handoff,
    };
    if r.version != Some(1) {
        return Parsed::Handoff;
    }
    let Some(Ok(method)) = r.method.map(|m| Method::from_bytes(m.as_bytes())) else {
        return Parsed::Handoff;
    };
    if method == Method::CONNECT {
        return Parsed::Handoff;
    }
    // Offsets first (they borrow `buf`), then the head is frozen and sliced.
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u16;
    let path = r.path.unwrap_or_default().as_bytes();
    let path_span = (offset(path), offset(path) + path.len() as u16);
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = r.headers.len();
    let mut close = false;
    for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
        match simple_field(h.name.as_bytes(), h.value) {
            Field::Other => {}
            Field::Close => close = true,
            Field::Refused => return Parsed::Handoff,
        }
        let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
        *span = (n, n + h.name.len() as u16, v, v + h.value.len() as u16);
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) =
        Uri::from_maybe_shared(head.slice(usize::from(path_span.0)..usize::from(path_span.1)))
    else {
        // Put back what was split off: hyper answers the bad URI (400 or 414).
        return restore(buf, head);
    };
    // Room for what the proxy adds (`x-forwarded-*`, `host`, the peer identity): growing the
    // map would reallocate it.
    let mut headers = HeaderMap::with_capacity(count + ADDED_HEADERS);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[usize::from(ns)..usize::from(ne)]);
        let value = HeaderValue::from_maybe_shared(head.slice(usize::from(vs)..usize::from(ve)));
        match (name, value) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => return restore(buf, head),
        }
    }
    let mut req = Request::new(ProxyBody::empty());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parsed::Request { req, close }
}

/// Undoes the split of a head that turned out to be hyper's after all.
fn restore(buf: &mut BytesMut, head: bytes::Bytes) -> Parsed {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Parsed::Handoff
}

/// What one request header field means for this loop.
enum Field {
    Other,
    /// `Connection: close`.
    Close,
    /// A body, an upgrade or `Expect`: hyper's.
    Refused,
}

fn simple_field(name: &[u8], value: &[u8]) -> Field {
    // Dispatch on the length first: most names are none of these and cost one compare.
    match name.len() {
        10 if name_is(name, b"connection") => {
            let mut close = false;
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Field::Refused;
                }
            }
            if close { Field::Close } else { Field::Other }
        }
        14 if name_is(name, b"content-length") => {
            if value.trim_ascii() == b"0" {
                Field::Other
            } else {
                Field::Refused
            }
        }
        6 if name_is(name, b"expect") => Field::Refused,
        7 if name_is(name, b"upgrade") => Field::Refused,
        17 if name_is(name, b"transfer-encoding") => Field::Refused,
        _ => Field::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl std::fmt::Debug for Parsed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Parsed::Request { req, close } => {
                    write!(f, "Request({:?}, close={close})", req.uri())
                }
                Parsed::Partial => f.write_str("Partial"),
                Parsed::Handoff => f.write_str("Handoff"),
            }
        }
    }

    fn parse_str(s: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(s);
        (parse(&mut buf, 8192), buf)
    }

    #[test]
    fn a_plain_get_is_parsed_and_split_off() {
        let (p, rest) = parse_str(
            "GET /a/b?x=1 HTTP/1.1\r\nHost: api.local\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        );
        let Parsed::Request { req, close } = p else {
            panic!("{p:?}")
        };
        assert!(!close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/a/b");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "api.local");
        assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(&rest[..], b"GET /next", "pipelined bytes stay");
    }

    #[test]
    fn connection_close_is_noticed() {
        let (p, _) = parse_str("HEAD / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(p, Parsed::Request { close: true, .. }), "{p:?}");
    }

    #[test]
    fn a_partial_head_waits_and_an_oversized_one_goes_to_hyper() {
        let (p, buf) = parse_str("GET / HTTP/1.1\r\nHost: a");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(buf.len(), 23);
        let mut big = BytesMut::from(format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(200)).as_str());
        assert!(matches!(parse(&mut big, 100), Parsed::Handoff));
    }

    #[test]
    fn everything_but_a_plain_bodiless_request_goes_to_hyper_untouched() {
        for s in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
            "GET http://[::1 HTTP/1.1\r\n\r\n",
        ] {
            let (p, buf) = parse_str(s);
            assert!(matches!(p, Parsed::Handoff), "{s:?}: {p:?}");
            assert_eq!(
                &buf[..],
                s.as_bytes(),
                "{s:?}: the buffer is left as it was"
            );
        }
        let (p, _) = parse_str("DELETE /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(p, Parsed::Request { .. }), "{p:?}");
    }
}
