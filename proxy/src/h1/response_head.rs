//! Response heads for the HTTP/1.1 server loop ([`super::serve`]): written straight from the
//! response's `HeaderMap` into the connection's write buffer, with the body framing hyper's
//! server would choose (RFC 9112 §6), so a client sees the same bytes either way.

use http::header;
use http::{StatusCode, response};

use super::head::{put_content_length, tokens};
use super::raw_head::RawHead;

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body bytes (also for HEAD, 204 and 304, whatever the body holds).
    None,
    Length(u64),
    Chunked,
}

/// What is known of the body before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    /// It has ended already.
    Empty,
    Known(u64),
    Unknown,
}

/// Appends the head of `parts` to `dst`. `close`: the connection closes after this response
/// (`connection: close` is written). Returns the framing and whether the connection closes
/// (also when the response itself says `connection: close`).
pub fn encode(
    parts: &response::Parts,
    raw: Option<&RawHead>,
    body: BodyLen,
    head_request: bool,
    mut close: bool,
    dst: &mut Vec<u8>,
) -> (Framing, bool) {
    let status = parts.status;
    if status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let code = status.as_u16();
    // No body on the wire for these; a HEAD response keeps the length the target gave.
    let bodiless = head_request || code == 204 || code == 304;
    let mut wrote_date = false;
    let mut wrote_connection = false;
    // The target's fields as they came (hop-by-hop and length fields already left out), then
    // what the proxy added.
    if let Some(raw) = raw {
        for line in raw.lines() {
            dst.extend_from_slice(line);
            dst.extend_from_slice(b"\r\n");
        }
        wrote_date = raw.has_date();
        if head_request && let Some(n) = raw.content_length() {
            put_content_length(dst, n);
        }
    }
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH if !head_request => continue,
            header::TRANSFER_ENCODING | header::TRAILER => continue,
            header::CONNECTION => {
                close |= says_close(value.as_bytes());
                wrote_connection = true;
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else {
        match body {
            BodyLen::Empty => {
                dst.extend_from_slice(b"content-length: 0\r\n");
                Framing::None
            }
            BodyLen::Known(n) => {
                put_content_length(dst, n);
                Framing::Length(n)
            }
            BodyLen::Unknown => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if close && !wrote_connection {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        super::date::append(dst);
    }
    dst.extend_from_slice(b"\r\n");
    (framing, close)
}

fn says_close(value: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(b"close"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Response};

    fn head(
        resp: Response<()>,
        body: BodyLen,
        head_request: bool,
        close: bool,
    ) -> (String, Framing, bool) {
        let (parts, ()) = resp.into_parts();
        let mut dst = Vec::new();
        let (f, c) = encode(&parts, None, body, head_request, close, &mut dst);
        (String::from_utf8(dst).unwrap(), f, c)
    }

    #[test]
    fn a_known_length_is_written_once_and_a_date_added() {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("5"));
        r.headers_mut().insert("x-a", HeaderValue::from_static("1"));
        let (s, f, c) = head(r, BodyLen::Known(5), false, false);
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{s}"
        );
        assert!(s.ends_with(" GMT\r\n\r\n"), "{s}");
        assert_eq!((f, c), (Framing::Length(5), false));
    }

    #[test]
    fn unknown_lengths_are_chunked_and_empty_bodies_say_zero() {
        let (s, f, _) = head(Response::new(()), BodyLen::Unknown, false, false);
        assert!(s.contains("transfer-encoding: chunked\r\n"), "{s}");
        assert_eq!(f, Framing::Chunked);
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut()
            .insert("date", HeaderValue::from_static("then"));
        let (s, f, _) = head(r, BodyLen::Empty, false, false);
        assert_eq!(
            s,
            "HTTP/1.1 404 Not Found\r\ndate: then\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(f, Framing::None);
    }

    #[test]
    fn head_204_and_304_carry_no_body() {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("42"));
        let (s, f, _) = head(r, BodyLen::Empty, true, false);
        assert!(
            s.contains("content-length: 42\r\n"),
            "HEAD keeps the length: {s}"
        );
        assert_eq!(f, Framing::None);
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let (s, f, _) = head(r, BodyLen::Empty, false, false);
        assert!(!s.contains("content-length"), "{s}");
        assert_eq!(f, Framing::None);
    }

    #[test]
    fn close_is_said_once_whoever_asks() {
        let (s, _, c) = head(Response::new(()), BodyLen::Empty, false, true);
        assert!(c && s.contains("connection: close\r\n"), "{s}");
        let mut r = Response::new(());
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("Close"));
        assert!(says_close(b"keep-alive, Close"));
        let (s, _, c) = head(r, BodyLen::Empty, false, false);
        assert!(c, "the response's own close closes");
        assert_eq!(s.matches("onnection").count(), 1, "{s}");
    }
}
