//! The upstream HTTP client: pooled keep-alive connections per endpoint, TCP_NODELAY, connect
//! timeout. Plaintext HTTP/1.1 to local apps; mTLS with ALPN between sidecars, where HTTP/2 is
//! negotiated and one connection multiplexes many requests. Upgrades (WebSocket) always use an
//! HTTP/1.1 connection.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use http::Version;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::pool::H1Pool;
use crate::shared_timer::SharedTimer;
use crate::tls::MtlsConnector;

/// Idle pooled connections kept per endpoint.
const MAX_IDLE_PER_HOST: usize = 256;

#[derive(Debug, Clone)]
enum Inner {
    Plain(Client<HttpConnector, ProxyBody>),
    Mtls(Client<MtlsConnector, ProxyBody>),
}

impl Inner {
    async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match self {
            Inner::Plain(c) => c.request(req).await,
            Inner::Mtls(c) => c.request(req).await,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamClient {
    main: Inner,
    upgrade: Inner,
    h2_prior_knowledge: bool,
    /// Plaintext HTTP/1.1: the lean pool of `pool.rs` instead of `main`.
    h1: Option<Arc<H1Pool>>,
    /// Per-try timeouts (`shared_timer.rs`: a slot per try instead of a timer-wheel entry).
    timer: SharedTimer,
}

fn builder(idle_timeout: Duration, h2_only: bool) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(false)
        .http2_only(h2_only);
    b
}

impl UpstreamClient {
    /// A plaintext client; `h2` selects HTTP/2 with prior knowledge.
    pub fn plain(connect_timeout: Duration, idle_timeout: Duration, h2: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let main = Inner::Plain(builder(idle_timeout, h2).build(connector.clone()));
        let upgrade = Inner::Plain(builder(idle_timeout, false).build(connector));
        UpstreamClient {
            main,
            upgrade,
            h2_prior_knowledge: h2,
            h1: (!h2).then(|| H1Pool::new(connect_timeout, idle_timeout)),
            timer: SharedTimer::new(),
        }
    }

    /// An mTLS client: `alpn_any` offers h2 and http/1.1, `alpn_h1` only http/1.1 (for upgrades).
    pub fn mtls(
        alpn_any: Arc<rustls::ClientConfig>,
        alpn_h1: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let main = Inner::Mtls(
            builder(idle_timeout, false).build(MtlsConnector::new(alpn_any, connect_timeout)),
        );
        let upgrade = Inner::Mtls(
            builder(idle_timeout, false).build(MtlsConnector::new(alpn_h1, connect_timeout)),
        );
        UpstreamClient {
            main,
            upgrade,
            h2_prior_knowledge: false,
            h1: None,
            timer: SharedTimer::new(),
        }
    }

    /// The timer for per-try timeouts.
    pub fn timer(&self) -> &SharedTimer {
        &self.timer
    }

    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        self.main.send(req).await.map_err(classify)
    }

    /// Sends the request `parts` + `body` to the endpoint at `addr` (`authority` names it).
    ///
    /// On the plaintext HTTP/1.1 path the head is written from `parts` as they are, borrowed:
    /// a caller that may retry keeps its head without a copy. Hyper's client (HTTP/2, mTLS,
    /// CONNECT) gets a request of its own, addressed to `authority`, whose headers are cloned
    /// when `keep` (another try may need them) and taken from `parts` otherwise.
    ///
    /// The response comes without hop-by-hop fields on either path.
    ///
    /// Not an `async fn`: the plaintext path returns the pool's future as it is, and hyper's
    /// client is boxed, so the future every request carries is no bigger than the pool's (it
    /// is moved into place per request).
    pub fn send_parts<'a>(
        &'a self,
        addr: std::net::SocketAddr,
        authority: &Authority,
        parts: &'a mut Parts,
        added: &'a [u8],
        body: ProxyBody,
        keep: bool,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
        match &self.h1 {
            // CONNECT tunnels keep hyper's client, like upgrades.
            Some(pool) if parts.method != hyper::Method::CONNECT => {
                Either::Left(pool.send_parts(addr, parts, added, body))
            }
            _ => {
                let mut up = Request::new(body);
                *up.method_mut() = parts.method.clone();
                *up.uri_mut() = endpoint_uri(authority, parts.uri.path_and_query());
                *up.version_mut() = if self.h2_prior_knowledge {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                *up.headers_mut() = if keep {
                    parts.headers.clone()
                } else {
                    std::mem::take(&mut parts.headers)
                };
                append_lines(up.headers_mut(), added);
                // Hop-by-hop fields leave here, where the response is made: the pool's parser
                // never puts them in its header map.
                Either::Right(Box::pin(async move {
                    let mut resp = self.send(up).await?;
                    crate::forward::strip_hop_by_hop(resp.headers_mut());
                    Ok(resp.map(ProxyBody::from))
                }))
            }
        }
    }

    /// Sends over an HTTP/1.1 connection so the response can switch protocols.
    pub async fn send_upgrade(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.upgrade.send(req).await.map_err(classify)
    }
}

/// Appends field lines the proxy wrote (`name: value\r\n` each) to a header map, for hyper's
/// client, which writes heads from the map only. A line that is not a valid field is skipped.
fn append_lines(headers: &mut http::HeaderMap, lines: &[u8]) {
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some((name, value)) = crate::h1::head::split_field(line) else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value.trim_ascii_end()),
        ) {
            headers.append(name, value);
        }
    }
}

/// `http://<authority><path and query>` (`/` when the request had none).
pub fn endpoint_uri(authority: &Authority, path: Option<&PathAndQuery>) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        path.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"))
}

/// Decides by type: connect errors (refused, timed out, TLS refused) vs failures after sending.
fn classify(e: hyper_util::client::legacy::Error) -> ProxyError {
    if e.is_connect() {
        let mut src = e.source();
        while let Some(s) = src {
            if let Some(io) = s.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return ProxyError::ConnectTimeout;
            }
            src = s.source();
        }
        ProxyError::ConnectFailed
    } else {
        ProxyError::UpstreamReset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_lines_join_the_map_for_hyper() {
        let mut h = http::HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_static("10.0.0.1"),
        );
        append_lines(
            &mut h,
            b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nnot a field\r\n",
        );
        let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["10.0.0.1", "127.0.0.1"]);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h.len(), 3);
        append_lines(&mut h, b"");
        assert_eq!(h.len(), 3);
    }
}
