//! SigV4 for the AWS Private CA-compatible API: the access key id is a trellis credential id, its
//! secret the credential's derived secret. The verification itself is `trellis_core::sigv4`.

use http::request::Parts;
use trellis_core::sigv4::{self, SigV4Error};

use crate::token::{AuthError, Scope, Tokens};

/// Verifies the request's SigV4 signature and returns the credential's scope.
pub fn verify(parts: &Parts, body: &[u8], tokens: &Tokens) -> Result<Scope, AuthError> {
    let key = sigv4::verify(parts, body, |key| {
        tokens.scope(key).map(|_| tokens.secret_for(key))
    })
    .map_err(|e| match e {
        SigV4Error::Missing => AuthError::Missing,
        SigV4Error::BadSignature | SigV4Error::Expired => AuthError::BadSignature,
        _ => AuthError::Invalid,
    })?;
    tokens.scope(key).ok_or(AuthError::Invalid)
}
