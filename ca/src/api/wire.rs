//! The one table that maps errors to the wire: HTTP status + native error code + AWS `__type`.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use crate::error::CaError;
use crate::token::AuthError;

/// An error as both APIs answer it.
#[derive(Debug, Clone)]
pub struct WireError {
    pub status: StatusCode,
    /// Native API `error` field.
    pub code: &'static str,
    /// AWS JSON 1.1 `__type` and its HTTP status.
    pub aws_type: &'static str,
    pub aws_status: StatusCode,
    pub message: String,
}

impl From<&CaError> for WireError {
    fn from(e: &CaError) -> Self {
        let (status, code, aws_type, aws_status) = match e {
            CaError::MalformedCsr(_) | CaError::BadCsrSignature | CaError::WeakKey(_) => (
                StatusCode::BAD_REQUEST,
                "bad_csr",
                "MalformedCSRException",
                StatusCode::BAD_REQUEST,
            ),
            CaError::TtlTooLong { .. } | CaError::InvalidRequest(_) | CaError::Mismatch(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "InvalidArgsException",
                StatusCode::BAD_REQUEST,
            ),
            CaError::UnknownSerial(_) => (
                StatusCode::NOT_FOUND,
                "not_found",
                "ResourceNotFoundException",
                StatusCode::BAD_REQUEST,
            ),
            CaError::AlreadyRevoked(_) => (
                StatusCode::CONFLICT,
                "already_revoked",
                "RequestAlreadyProcessedException",
                StatusCode::BAD_REQUEST,
            ),
            CaError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "ServiceUnavailableException",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            CaError::IntermediatePending(_) | CaError::NotInitialized(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "InvalidStateException",
                StatusCode::BAD_REQUEST,
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "InternalFailure",
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        };
        // Internal details (paths, I/O errors) stay in the server log.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "CA request failed");
            "internal error".to_owned()
        } else {
            e.to_string()
        };
        WireError {
            status,
            code,
            aws_type,
            aws_status,
            message,
        }
    }
}

impl From<&AuthError> for WireError {
    fn from(e: &AuthError) -> Self {
        let (status, code, aws_type, aws_status) = match e {
            AuthError::Missing => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "MissingAuthenticationTokenException",
                StatusCode::FORBIDDEN,
            ),
            AuthError::Invalid => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "UnrecognizedClientException",
                StatusCode::BAD_REQUEST,
            ),
            AuthError::BadSignature => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "InvalidSignatureException",
                StatusCode::BAD_REQUEST,
            ),
            AuthError::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "AccessDeniedException",
                StatusCode::BAD_REQUEST,
            ),
        };
        WireError {
            status,
            code,
            aws_type,
            aws_status,
            message: e.to_string(),
        }
    }
}

impl WireError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        aws_type: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            aws_type,
            aws_status: if status.is_server_error() {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
            message: message.into(),
        }
    }

    /// Native API error: `{"error": code, "message": ...}`.
    pub fn native(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut r = json_response(self.status, &body, "application/json");
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"trellis-ca\""),
            );
        }
        r
    }

    /// AWS JSON 1.1 error: `{"__type": ..., "message": ...}` + `x-amzn-ErrorType`.
    pub fn aws(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "__type": self.aws_type, "message": self.message });
        let mut r = json_response(self.aws_status, &body, "application/x-amz-json-1.1");
        if let Ok(v) = http::HeaderValue::from_str(self.aws_type) {
            r.headers_mut().insert("x-amzn-ErrorType", v);
        }
        r
    }
}

pub fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

pub fn text_response(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}
