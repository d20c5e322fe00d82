//! The borrowed view of a request that conditions read: built once per request, no copies.

use std::net::IpAddr;

use http::HeaderMap;

/// What the router looks at. Everything borrows from the request being routed.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Host header (or `:authority`), possibly with a port.
    pub host: Option<&'a str>,
    /// The path without the query.
    pub path: &'a str,
    /// The raw query without `?`, still percent-encoded.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub source_ip: IpAddr,
}

impl<'a> RequestView<'a> {
    /// View of an `http::Request` from `source_ip`. Host comes from the URI authority (HTTP/2,
    /// absolute-form) or else the `Host` header.
    pub fn of<B>(req: &'a http::Request<B>, source_ip: IpAddr) -> Self {
        Self::reading_host(req, source_ip, true)
    }

    /// [`RequestView::of`], leaving `host` unread (`None`) unless `read_host`: for rules that
    /// never look at it ([`super::RuleIndex::reads_host`]), a header lookup saved per request.
    pub fn reading_host<B>(req: &'a http::Request<B>, source_ip: IpAddr, read_host: bool) -> Self {
        let host = if read_host {
            req.uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
        } else {
            None
        };
        Self {
            method: req.method().as_str(),
            host,
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            source_ip,
        }
    }

    /// `(key, value)` pairs of the raw query; a key without `=` has an empty value.
    pub fn query_pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        self.query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
    }

    /// First path segment: `/api/v1` → `api`, `/` → ``.
    pub fn first_segment(&self) -> &'a str {
        let rest = self.path.strip_prefix('/').unwrap_or(self.path);
        rest.split('/').next().unwrap_or("")
    }
}
