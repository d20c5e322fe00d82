//! Errors of the proxy crate, and the one table that maps them to the wire.

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("identity: {0}")]
    Identity(String),
}

/// Who failed a proxied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Upstream,
    Downstream,
    Internal,
}

/// Why a proxied request failed. Each carries who failed and whether a retry is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("no route for host")]
    NoRoute,
    #[error("no endpoint available")]
    NoEndpoint,
    #[error("circuit open: too many requests")]
    Overflow,
    #[error("connect to upstream failed")]
    ConnectFailed,
    #[error("connect to upstream timed out")]
    ConnectTimeout,
    #[error("upstream reset the connection")]
    UpstreamReset,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("request timed out")]
    RequestTimeout,
    #[error("peer not authorized")]
    Forbidden,
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute | ProxyError::Forbidden => Side::Downstream,
            ProxyError::NoEndpoint | ProxyError::Overflow => Side::Internal,
            _ => Side::Upstream,
        }
    }

    /// Whether the request certainly did not reach the application, or an idempotent request may be
    /// repeated. Connect failures never reached it; a reset may have.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::ConnectFailed
                | ProxyError::ConnectTimeout
                | ProxyError::UpstreamReset
                | ProxyError::UpstreamTimeout
        )
    }

    /// The one error-to-wire table.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::NoEndpoint | ProxyError::Overflow | ProxyError::ConnectFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout
            | ProxyError::UpstreamTimeout
            | ProxyError::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// Why a streamed body failed part-way (the response status was already sent).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("upstream closed the connection before the body ended")]
    UpstreamClosed,
    #[error("reading the upstream body: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Malformed(#[from] crate::h1::Malformed),
}
