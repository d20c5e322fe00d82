//! LB errors and the one table that maps them to the wire.

use http::StatusCode;

/// Why the LB answered a request itself. `Upstream*` name who failed; none is retried here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("no target in target group {0:?}")]
    NoTarget(String),
    #[error("upstream connect or protocol error: {0}")]
    Upstream(String),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
}

impl ForwardError {
    /// The error-to-wire table.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::NoTarget(_) => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ForwardError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LbError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("reload refused: {0}")]
    Reload(String),
    #[error("listener {listener:?}: TLS: {reason}")]
    Tls { listener: String, reason: String },
    #[error("target_group {group:?}: discovery: {reason}")]
    Discovery { group: String, reason: String },
}

/// Errors of the admin weights API, with their status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    #[error("unknown listener {0:?}")]
    UnknownListener(String),
    #[error("unknown rule {0:?}")]
    UnknownRule(String),
    #[error("rule {0:?} does not forward")]
    NotForward(String),
    #[error("rule does not forward to target group {0:?}")]
    UnknownGroup(String),
    #[error("{0}")]
    Invalid(String),
}

impl WeightError {
    pub fn status(&self) -> StatusCode {
        match self {
            WeightError::UnknownListener(_) | WeightError::UnknownRule(_) => StatusCode::NOT_FOUND,
            WeightError::NotForward(_) => StatusCode::CONFLICT,
            WeightError::UnknownGroup(_) | WeightError::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }
}
