//! AWS Signature Version 4 verification, shared by every AWS-compatible API trellis serves (Cloud Map
//! on the control plane, AWS Private CA on the CA). Each API maps [`SigV4Error`] to its own wire error
//! and looks secrets up its own way (a configured key pair, or a CA credential).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::request::Parts;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// How far `X-Amz-Date` may be from the verifier's clock, either way (AWS: 5 minutes). Beyond it a
/// captured request cannot be replayed.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// Why a request's signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SigV4Error {
    #[error("no Authorization header")]
    Missing,
    #[error("Authorization header is not a valid AWS4-HMAC-SHA256 header")]
    Malformed,
    #[error("X-Amz-Date header is required")]
    MissingDate,
    #[error("unknown access key id")]
    UnknownKey,
    #[error("the request signature does not match")]
    BadSignature,
    /// Valid signature, but `X-Amz-Date` is more than [`MAX_SKEW`] from the server's clock (or
    /// does not agree with the credential scope's date).
    #[error(
        "Signature expired: X-Amz-Date is more than 5 minutes from the server's time (replay window)"
    )]
    Expired,
}

/// The parsed `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…` header.
struct Authorization<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(v: &str) -> Option<Authorization<'_>> {
    let rest = v.strip_prefix("AWS4-HMAC-SHA256")?.trim_start();
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, val) = part.trim().split_once('=')?;
        match k {
            "Credential" => cred = Some(val),
            "SignedHeaders" => signed = Some(val),
            "Signature" => sig = Some(val),
            _ => {}
        }
    }
    let mut c = cred?.split('/');
    let (Some(access_key), Some(date), Some(region), Some(service), Some("aws4_request"), None) =
        (c.next(), c.next(), c.next(), c.next(), c.next(), c.next())
    else {
        return None;
    };
    Some(Authorization {
        access_key,
        date,
        region,
        service,
        signed_headers: signed?,
        signature: sig?,
    })
}

/// Verifies the request's signature. `secret_for` maps the access key id to its secret (None:
/// unknown key). Returns the access key id that signed the request. A request signed more than
/// [`MAX_SKEW`] away from now is [`SigV4Error::Expired`].
pub fn verify<'p>(
    parts: &'p Parts,
    body: &[u8],
    secret_for: impl FnOnce(&str) -> Option<String>,
) -> Result<&'p str, SigV4Error> {
    verify_at(parts, body, secret_for, SystemTime::now())
}

/// [`verify`] against an explicit clock.
pub fn verify_at<'p>(
    parts: &'p Parts,
    body: &[u8],
    secret_for: impl FnOnce(&str) -> Option<String>,
    now: SystemTime,
) -> Result<&'p str, SigV4Error> {
    let header = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .ok_or(SigV4Error::Missing)?
        .to_str()
        .map_err(|_| SigV4Error::Malformed)?;
    let auth = parse_authorization(header).ok_or(SigV4Error::Malformed)?;
    let secret = secret_for(auth.access_key).ok_or(SigV4Error::UnknownKey)?;
    let amz_date = parts
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(SigV4Error::MissingDate)?;

    let mut canonical_headers = String::new();
    for name in auth.signed_headers.split(';') {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let joined = if values.is_empty() && name == "host" {
            // HTTP/2 requests carry the host in the URI's authority.
            parts
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default()
        } else {
            values.join(",")
        };
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&joined);
        canonical_headers.push('\n');
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method.as_str(),
        uri_encode(parts.uri.path(), true),
        canonical_query(parts.uri.query()),
        canonical_headers,
        auth.signed_headers,
        hex::encode(Sha256::digest(body))
    );
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    let k_region = hmac(&k_date, auth.region.as_bytes());
    let k_service = hmac(&k_region, auth.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let expected = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    if !constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        return Err(SigV4Error::BadSignature);
    }
    let signed_at = amz_date_secs(amz_date).ok_or(SigV4Error::Malformed)?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if !amz_date.starts_with(auth.date) || signed_at.abs_diff(now) > MAX_SKEW.as_secs() {
        return Err(SigV4Error::Expired);
    }
    Ok(auth.access_key)
}

/// Seconds since the epoch of an `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`, UTC).
pub fn amz_date_secs(v: &str) -> Option<i64> {
    let b = v.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = v.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Compares without an early exit, so timing does not reveal how much of a signature matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// URI-encodes as SigV4 wants (RFC 3986 unreserved kept). Applied to the already-encoded path, this is
/// the double encoding SigV4 specifies for every service but S3.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_query(q: Option<&str>) -> String {
    let mut pairs: Vec<(&str, &str)> = q
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vanilla() -> Parts {
        // The AWS SigV4 test suite's "get-vanilla" vector.
        http::Request::get("/")
            .header("host", "example.amazonaws.com")
            .header("x-amz-date", "20150830T123600Z")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            )
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// When the vector was signed: 2015-08-30T12:36:00Z.
    fn signed_at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn verify<'p>(
        parts: &'p Parts,
        body: &[u8],
        secret_for: impl FnOnce(&str) -> Option<String>,
    ) -> Result<&'p str, SigV4Error> {
        verify_at(parts, body, secret_for, signed_at())
    }

    #[test]
    fn amz_dates_parse() {
        assert_eq!(amz_date_secs("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(amz_date_secs("19700101T000000Z"), Some(0));
        assert_eq!(amz_date_secs("20240229T235959Z"), Some(1_709_251_199));
        for bad in [
            "",
            "20150830T123600",
            "2015-08-30T12:36Z",
            "20151330T123600Z",
            "2015083XT123600Z",
        ] {
            assert_eq!(amz_date_secs(bad), None, "{bad}");
        }
    }

    #[test]
    fn replay_window_is_five_minutes() {
        let parts = vanilla();
        let ok = |at: SystemTime| verify_at(&parts, b"", |_| Some(SECRET.into()), at);
        assert!(ok(signed_at() + Duration::from_secs(299)).is_ok());
        assert!(ok(signed_at() - Duration::from_secs(299)).is_ok());
        assert_eq!(
            ok(signed_at() + Duration::from_secs(301)),
            Err(SigV4Error::Expired)
        );
        assert_eq!(
            ok(signed_at() - Duration::from_secs(301)),
            Err(SigV4Error::Expired)
        );
        // Today's clock: the 2015 vector is a replay.
        assert_eq!(
            super::verify(&parts, b"", |_| Some(SECRET.into())),
            Err(SigV4Error::Expired)
        );
    }

    #[test]
    fn aws_test_vector() {
        let parts = vanilla();
        let who = verify(&parts, b"", |k| (k == "AKIDEXAMPLE").then(|| SECRET.into()));
        assert_eq!(who, Ok("AKIDEXAMPLE"));
        assert_eq!(
            verify(&parts, b"", |_| Some("nope".into())),
            Err(SigV4Error::BadSignature)
        );
        assert_eq!(verify(&parts, b"", |_| None), Err(SigV4Error::UnknownKey));
        assert_eq!(
            verify(&parts, b"tampered body", |_| Some(SECRET.into())),
            Err(SigV4Error::BadSignature)
        );
    }

    #[test]
    fn malformed_headers() {
        let mut parts = vanilla();
        parts.headers.remove("x-amz-date");
        assert_eq!(
            verify(&parts, b"", |_| Some(SECRET.into())),
            Err(SigV4Error::MissingDate)
        );
        parts
            .headers
            .insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(
            verify(&parts, b"", |_| Some(SECRET.into())),
            Err(SigV4Error::Malformed)
        );
        parts.headers.remove("authorization");
        assert_eq!(
            verify(&parts, b"", |_| Some(SECRET.into())),
            Err(SigV4Error::Missing)
        );
    }
}
