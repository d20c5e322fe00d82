//! The upstream HTTP client: pooled keep-alive connections per endpoint, TCP_NODELAY, connect
//! timeout; HTTP/1.1 to local apps, HTTP/2 (multiplexed) between sidecars.

use std::error::Error as _;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::error::ProxyError;

/// Idle pooled connections kept per endpoint.
const MAX_IDLE_PER_HOST: usize = 256;

#[derive(Debug, Clone)]
pub struct UpstreamClient {
    inner: Client<HttpConnector, ProxyBody>,
    h2: bool,
}

impl UpstreamClient {
    /// A plaintext client; `h2` selects HTTP/2 with prior knowledge.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, h2: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .http2_only(h2)
            .build(connector);
        UpstreamClient { inner, h2 }
    }

    pub fn is_h2(&self) -> bool {
        self.h2
    }

    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        self.inner.request(req).await.map_err(classify)
    }
}

/// Decides by type: connect errors (refused, timed out) vs failures after the request was sent.
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
