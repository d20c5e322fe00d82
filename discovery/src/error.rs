//! Errors of the control plane and the one table that maps them to the wire.

use http::StatusCode;

/// An API error as Cloud Map reports it: the `__type` code, the HTTP status and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    NamespaceNotFound(String),
    #[error("{0}")]
    ServiceNotFound(String),
    #[error("{0}")]
    InstanceNotFound(String),
    #[error("{0}")]
    OperationNotFound(String),
    #[error("{0}")]
    ResourceNotFound(String),
    #[error("{0}")]
    NamespaceAlreadyExists(String),
    #[error("{0}")]
    ServiceAlreadyExists(String),
    #[error("{0}")]
    ResourceInUse(String),
    #[error("{0}")]
    DuplicateRequest(String),
    #[error("{0}")]
    CustomHealthNotFound(String),
    #[error("{0}")]
    ResourceLimitExceeded(String),
    #[error("{0}")]
    TooManyTags(String),
    #[error("{0}")]
    ServiceAttributesLimitExceeded(String),
    #[error("{0}")]
    UnknownOperation(String),
    #[error("{0}")]
    MissingAuthenticationToken(String),
    #[error("{0}")]
    UnrecognizedClient(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client exceeded its request rate; AWS SDKs back off and retry this code.
    #[error("{0}")]
    Throttling(String),
    /// The store failed to make a write durable: nothing was acknowledged.
    #[error("{0}")]
    Internal(String),
    /// The replicated store has no quorum: nothing was written; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Another replica changed what this write depends on; the dispatcher re-runs the action.
    #[error("{0}")]
    Conflict(String),
}

impl ApiError {
    /// The one error-to-wire table: AWS `__type` and HTTP status (from botocore's service model).
    pub fn wire(&self) -> (&'static str, StatusCode) {
        use ApiError::*;
        match self {
            InvalidInput(_) => ("InvalidInput", StatusCode::BAD_REQUEST),
            NamespaceNotFound(_) => ("NamespaceNotFound", StatusCode::NOT_FOUND),
            ServiceNotFound(_) => ("ServiceNotFound", StatusCode::NOT_FOUND),
            InstanceNotFound(_) => ("InstanceNotFound", StatusCode::NOT_FOUND),
            OperationNotFound(_) => ("OperationNotFound", StatusCode::NOT_FOUND),
            ResourceNotFound(_) => ("ResourceNotFoundException", StatusCode::NOT_FOUND),
            NamespaceAlreadyExists(_) => ("NamespaceAlreadyExists", StatusCode::BAD_REQUEST),
            ServiceAlreadyExists(_) => ("ServiceAlreadyExists", StatusCode::BAD_REQUEST),
            ResourceInUse(_) => ("ResourceInUse", StatusCode::CONFLICT),
            DuplicateRequest(_) => ("DuplicateRequest", StatusCode::CONFLICT),
            CustomHealthNotFound(_) => ("CustomHealthNotFound", StatusCode::NOT_FOUND),
            ResourceLimitExceeded(_) => ("ResourceLimitExceeded", StatusCode::BAD_REQUEST),
            TooManyTags(_) => ("TooManyTagsException", StatusCode::BAD_REQUEST),
            ServiceAttributesLimitExceeded(_) => (
                "ServiceAttributesLimitExceededException",
                StatusCode::BAD_REQUEST,
            ),
            UnknownOperation(_) => ("UnknownOperationException", StatusCode::BAD_REQUEST),
            MissingAuthenticationToken(_) => {
                ("MissingAuthenticationTokenException", StatusCode::FORBIDDEN)
            }
            UnrecognizedClient(_) => ("UnrecognizedClientException", StatusCode::FORBIDDEN),
            InvalidSignature(_) => ("InvalidSignatureException", StatusCode::FORBIDDEN),
            PayloadTooLarge(_) => ("InvalidInput", StatusCode::PAYLOAD_TOO_LARGE),
            // botocore's retry rules (legacy and standard) treat this code as throttling.
            Throttling(_) => ("ThrottlingException", StatusCode::BAD_REQUEST),
            Internal(_) => ("InternalFailure", StatusCode::INTERNAL_SERVER_ERROR),
            // botocore retries both: 503 is a transient status, ThrottlingException a throttle code.
            Unavailable(_) => (
                "ServiceUnavailableException",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            Conflict(_) => ("ThrottlingException", StatusCode::BAD_REQUEST),
        }
    }

    pub fn code(&self) -> &'static str {
        self.wire().0
    }

    /// The JSON body: `{"__type": "...", "Message": "..."}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"__type": self.code(), "Message": self.to_string()}))
            .unwrap_or_default()
    }
}

#[cfg(feature = "server")]
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("write refused, nothing was written: {m}"))
            }
            StoreError::Conflict => {
                ApiError::Conflict("concurrent change on another replica; retry".into())
            }
            e => ApiError::Internal(format!("store write failed: {e}")),
        }
    }
}
