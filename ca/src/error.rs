//! The crate's error type. Each variant is a decision the caller can act on; the HTTP and AWS
//! wire mappings live in one table in `api/wire.rs`.

use std::path::PathBuf;

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A state, key or certificate file is unreadable, truncated or corrupt. Never answered by
    /// silently creating a new CA.
    #[error("CA state file {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to overwrite an existing CA: {0} already exists")]
    AlreadyExists(PathBuf),
    #[error("no CA in {0} (run `trellis-ca init` first)")]
    NotInitialized(PathBuf),
    #[error("CA in {0} waits for its intermediate (run `trellis-ca install-intermediate`)")]
    IntermediatePending(PathBuf),
    /// The CSR could not be parsed (bad PEM/DER).
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR signature does not verify")]
    BadCsrSignature,
    #[error("CSR key rejected: {0}")]
    WeakKey(String),
    #[error("requested TTL {requested:?} exceeds the maximum {max:?}")]
    TtlTooLong {
        requested: std::time::Duration,
        max: std::time::Duration,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("no certificate with serial {0}")]
    UnknownSerial(String),
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    /// Shared state already holds this serial (another replica drew it): draw another.
    #[error("serial {0} is already recorded")]
    SerialTaken(String),
    /// Shared state (etcd) cannot be reached: nothing was recorded; retry later.
    #[error("CA state unavailable: {0}")]
    Unavailable(String),
    #[error("installed certificate does not match: {0}")]
    Mismatch(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CaError {
    pub(crate) fn corrupt(path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        CaError::Corrupt {
            path: path.into(),
            detail: detail.to_string(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CaError::Io {
            path: path.into(),
            source,
        }
    }
    /// A short stable label for metrics (`trellis_ca_issue_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            CaError::Corrupt { .. } => "corrupt_state",
            CaError::Io { .. } => "io",
            CaError::AlreadyExists(_) => "already_exists",
            CaError::NotInitialized(_) => "not_initialized",
            CaError::IntermediatePending(_) => "intermediate_pending",
            CaError::MalformedCsr(_) => "malformed_csr",
            CaError::BadCsrSignature => "bad_csr_signature",
            CaError::WeakKey(_) => "weak_key",
            CaError::TtlTooLong { .. } => "ttl_too_long",
            CaError::InvalidRequest(_) => "invalid_request",
            CaError::UnknownSerial(_) => "unknown_serial",
            CaError::AlreadyRevoked(_) => "already_revoked",
            CaError::SerialTaken(_) => "serial_taken",
            CaError::Unavailable(_) => "unavailable",
            CaError::Mismatch(_) => "mismatch",
            CaError::Rcgen(_) => "internal",
            CaError::Internal(_) => "internal",
        }
    }
}
