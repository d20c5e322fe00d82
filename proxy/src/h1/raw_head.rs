//! An upstream response head kept as the bytes it came in: the end-to-end header lines, as spans
//! of the frozen head, go to the downstream HTTP/1.1 client as they are ([`super::serve`]),
//! without a `HeaderMap` built on the way in and walked again on the way out.
//!
//! The response then carries an empty header map and this head in its body
//! ([`crate::body::ProxyBody`]); headers the proxy adds (a sticky cookie) go in the map and are
//! written after these lines. Whatever hands a response to hyper (HTTP/2, or a connection the loop
//! handed over) first calls [`materialize`], which gives the map exactly what the map-building
//! parser would have (`head::parse_response`; a test checks both agree).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response};

/// Most header lines kept raw; a response with more is parsed into a map instead.
pub const MAX_LINES: usize = 12;

/// The forwarded header lines of one response head.
pub struct RawHead {
    head: Bytes,
    /// `Name: value` of each forwarded field (no CRLF), in order.
    lines: [(u16, u16); MAX_LINES],
    count: u8,
    /// A `Date` line is among them.
    date: bool,
    /// The `Content-Length` (left out of `lines`: the framing is the writer's), kept for a HEAD
    /// response, which passes it on.
    length: Option<u64>,
}

impl std::fmt::Debug for RawHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.lines().map(String::from_utf8_lossy))
            .finish()
    }
}

/// Collects a [`RawHead`] while a head is parsed.
pub struct Builder {
    raw: RawHead,
    usable: bool,
}

impl Builder {
    pub fn new() -> Self {
        Builder {
            raw: RawHead {
                head: Bytes::new(),
                lines: [(0, 0); MAX_LINES],
                count: 0,
                date: false,
                length: None,
            },
            usable: true,
        }
    }

    /// A forwarded field whose name spans `ns..ne` and value ends at `ve` in the head. Only
    /// `Name: value` lines go raw (a field with spaces before its colon, which the parser
    /// tolerates, must be rewritten).
    pub fn keep(&mut self, head: &[u8], (ns, ne, ve): (u16, u16, u16), is_date: bool) {
        let i = usize::from(self.raw.count);
        if !self.usable || i == MAX_LINES || head.get(usize::from(ne)) != Some(&b':') {
            self.usable = false;
            return;
        }
        self.raw.lines[i] = (ns, ve);
        self.raw.count += 1;
        self.raw.date |= is_date;
    }

    /// Something in the head needs the map (a name `Connection` lists).
    pub fn refuse(&mut self) {
        self.usable = false;
    }

    /// The raw head over `head`, if every field could go raw.
    pub fn finish(mut self, head: Bytes, length: Option<u64>) -> Option<RawHead> {
        if !self.usable {
            return None;
        }
        self.raw.head = head;
        self.raw.length = length;
        Some(self.raw)
    }
}

impl RawHead {
    /// The forwarded lines, `Name: value` each.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.lines[..usize::from(self.count)]
            .iter()
            .map(|&(s, e)| &self.head[usize::from(s)..usize::from(e)])
    }

    pub fn has_date(&self) -> bool {
        self.date
    }

    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// Appends the fields to `headers` as the map-building parser would have.
    fn into_map(self, headers: &mut HeaderMap) {
        for line in self.lines() {
            let Some((name, value)) = super::head::split_field(line) else {
                continue;
            };
            let start = value.as_ptr() as usize - self.head.as_ptr() as usize;
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.head.slice(start..start + value.len())),
            ) {
                headers.append(n, v);
            }
        }
        if let Some(n) = self.length {
            headers.append(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// A body that may carry a raw response head.
pub trait RawHeadSource {
    fn take_raw_head(&mut self) -> Option<Box<RawHead>>;
}

/// Moves a raw head from the body into the header map, before the response goes to hyper.
pub fn materialize<B: RawHeadSource>(resp: &mut Response<B>) {
    if let Some(raw) = resp.body_mut().take_raw_head() {
        // The map may already hold what the proxy added; the target's fields come first.
        let added = std::mem::take(resp.headers_mut());
        raw.into_map(resp.headers_mut());
        // `None` names continue the previous one.
        let mut name = None;
        for (n, value) in added {
            if n.is_some() {
                name = n;
            }
            if let Some(name) = &name {
                resp.headers_mut().append(name.clone(), value);
            }
        }
    }
}
