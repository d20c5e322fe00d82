//! SigV4 for the Cloud Map API: the configured key pair, and the mapping of signature failures to
//! Cloud Map's wire errors. The verification itself is `trellis_core::sigv4`, shared with the CA.

use trellis_core::sigv4::{self, SigV4Error};

use crate::error::ApiError;

/// Credentials the API accepts when it requires signatures.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Verifies a request's SigV4 signature against `creds` (and the 5-minute replay window).
pub fn verify(
    parts: &http::request::Parts,
    body: &[u8],
    creds: &Credentials,
) -> Result<(), ApiError> {
    verify_at(parts, body, creds, std::time::SystemTime::now())
}

fn verify_at(
    parts: &http::request::Parts,
    body: &[u8],
    creds: &Credentials,
    now: std::time::SystemTime,
) -> Result<(), ApiError> {
    sigv4::verify_at(
        parts,
        body,
        |key| (key == creds.access_key_id).then(|| creds.secret_access_key.clone()),
        now,
    )
    .map(|_| ())
    .map_err(|e| match e {
        SigV4Error::Missing => {
            ApiError::MissingAuthenticationToken("Missing Authentication Token".into())
        }
        SigV4Error::UnknownKey => ApiError::UnrecognizedClient(
            "The security token included in the request is invalid.".into(),
        ),
        SigV4Error::BadSignature => ApiError::InvalidSignature(
            "The request signature we calculated does not match the signature you provided.".into(),
        ),
        other => ApiError::InvalidSignature(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AWS SigV4 test suite's "get-vanilla" vector, through the Cloud Map error mapping.
    #[test]
    fn aws_test_vector() {
        let req = http::Request::get("/")
            .header("host", "example.amazonaws.com")
            .header("x-amz-date", "20150830T123600Z")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            )
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        };
        // Signed 2015-08-30T12:36:00Z: valid at that time, a replay today.
        let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        let verify = |p: &http::request::Parts, b: &[u8], c: &Credentials| verify_at(p, b, c, then);
        verify(&parts, b"", &creds).unwrap();
        match super::verify(&parts, b"", &creds) {
            Err(ApiError::InvalidSignature(m)) => {
                assert!(m.starts_with("Signature expired"), "{m}")
            }
            other => panic!("a stale signature must be refused: {other:?}"),
        }
        let bad = Credentials {
            secret_access_key: "nope".into(),
            ..creds.clone()
        };
        assert!(matches!(
            verify(&parts, b"", &bad),
            Err(ApiError::InvalidSignature(_))
        ));
        let other = Credentials {
            access_key_id: "OTHER".into(),
            ..creds
        };
        assert!(matches!(
            verify(&parts, b"", &other),
            Err(ApiError::UnrecognizedClient(_))
        ));
    }
}
