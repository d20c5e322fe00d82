//! AWS Signature Version 4 verification for the AWS Private CA-compatible API. The access key id
//! is a trellis credential id; its secret is the credential's derived secret.

use hmac::{Hmac, Mac};
use http::request::Parts;
use sha2::{Digest, Sha256};

use crate::token::{AuthError, Scope, Tokens, ct_eq};

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

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

/// Verifies the request's SigV4 signature and returns the credential's scope.
pub fn verify(parts: &Parts, body: &[u8], tokens: &Tokens) -> Result<Scope, AuthError> {
    let auth = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid)?;
    let a = parse_authorization(auth).ok_or(AuthError::Invalid)?;
    let scope = tokens.scope(a.access_key).ok_or(AuthError::Invalid)?;
    let amz_date = parts
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Invalid)?;

    let mut canonical_headers = String::new();
    for name in a.signed_headers.split(';') {
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
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&values.join(","));
        canonical_headers.push('\n');
    }
    let mut query: Vec<&str> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .collect();
    query.sort_unstable();
    let path = if parts.uri.path().is_empty() {
        "/"
    } else {
        parts.uri.path()
    };
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method,
        path,
        query.join("&"),
        canonical_headers,
        a.signed_headers,
        hex::encode(Sha256::digest(body))
    );
    let credential_scope = format!("{}/{}/{}/aws4_request", a.date, a.region, a.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{credential_scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let secret = tokens.secret_for(a.access_key);
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), a.date.as_bytes());
    let k_region = hmac(&k_date, a.region.as_bytes());
    let k_service = hmac(&k_region, a.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let expected = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    if !ct_eq(expected.as_bytes(), a.signature.as_bytes()) {
        return Err(AuthError::BadSignature);
    }
    Ok(scope)
}
