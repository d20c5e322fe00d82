//! AWS Private CA (`acm-pca`, JSON 1.1) compatibility: IssueCertificate, GetCertificate,
//! GetCertificateAuthorityCertificate, RevokeCertificate, DescribeCertificateAuthority.
//!
//! Authentication is SigV4 with a trellis credential as the access key pair; the credential's
//! scope decides the identity, exactly as on the native API. Differences from AWS (documented):
//! the requested validity is clamped to the CA's max TTL, the signing algorithm is always the
//! CA key's (ECDSA P-256 with SHA-256), and idempotency tokens are accepted but not replayed.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use trellis_core::{NamespaceName, ServiceName, SpiffeId};

use super::CaApi;
use super::wire::{WireError, json_response};
use crate::authority::{RevokeReason, to_pem};
use crate::csr::VerifiedCsr;
use crate::error::CaError;
use crate::serial::Serial;
use crate::token::{AuthError, Scope};
use crate::trust::spiffe_id_of;

const CT: &str = "application/x-amz-json-1.1";

fn err(aws_type: &'static str, msg: impl Into<String>) -> WireError {
    WireError::new(StatusCode::BAD_REQUEST, "invalid_request", aws_type, msg)
}

pub(super) async fn handle(
    api: &CaApi,
    target: &str,
    parts: &Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let scope = match super::sigv4::verify(parts, &body, api.tokens()) {
        Ok(s) => s,
        Err(e) => {
            api.authority().count_error("unauthenticated");
            return WireError::from(&e).aws();
        }
    };
    dispatch(api, target, &scope, &body).await
}

/// One authenticated action: decode the JSON 1.1 body, act, answer (success or AWS error shape).
pub(crate) async fn dispatch(
    api: &CaApi,
    target: &str,
    scope: &Scope,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let res = match target {
        "IssueCertificate" => issue(api, scope, body).await,
        "GetCertificate" => get_certificate(api, body),
        "GetCertificateAuthorityCertificate" => get_ca_certificate(api, body),
        "RevokeCertificate" => revoke(api, scope, body).await,
        "DescribeCertificateAuthority" => describe(api, body),
        other => Err(err(
            "UnknownOperationException",
            format!("unsupported operation {other}"),
        )),
    };
    match res {
        Ok(v) => json_response(StatusCode::OK, &v, CT),
        Err(e) => e.aws(),
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| err("ValidationException", e.to_string()))
}

fn check_ca_arn(api: &CaApi, arn: &str) -> Result<(), WireError> {
    if !arn.starts_with("arn:") {
        return Err(err("InvalidArnException", format!("{arn:?} is not an ARN")));
    }
    if arn != api.ca_arn() {
        return Err(err(
            "ResourceNotFoundException",
            format!("certificate authority {arn} not found"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Validity {
    value: i64,
    #[serde(rename = "Type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IssueRequest {
    certificate_authority_arn: String,
    csr: String,
    signing_algorithm: String,
    validity: Validity,
    #[serde(default)]
    #[allow(dead_code)]
    idempotency_token: Option<String>,
    #[serde(default)]
    template_arn: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    api_passthrough: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    validity_not_before: Option<Value>,
}

const SIGNING_ALGORITHMS: &[&str] = &[
    "SHA256WITHECDSA",
    "SHA384WITHECDSA",
    "SHA512WITHECDSA",
    "SHA256WITHRSA",
    "SHA384WITHRSA",
    "SHA512WITHRSA",
    "SM3WITHSM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
];

fn validity_ttl(v: &Validity) -> Result<Duration, WireError> {
    let now = OffsetDateTime::now_utc();
    let secs = match v.kind.as_str() {
        "DAYS" => v.value.checked_mul(86400),
        "MONTHS" => v.value.checked_mul(30 * 86400),
        "YEARS" => v.value.checked_mul(365 * 86400),
        "ABSOLUTE" => Some(v.value - now.unix_timestamp()),
        "END_DATE" => {
            // yyyyMMddHHmmss as a number.
            let s = v.value.to_string();
            let fmt = time::macros::format_description!("[year][month][day][hour][minute][second]");
            let t = time::PrimitiveDateTime::parse(&s, &fmt).map_err(|_| {
                err(
                    "InvalidArgsException",
                    format!("Validity END_DATE {s} is not yyyyMMddHHmmss"),
                )
            })?;
            Some(t.assume_utc().unix_timestamp() - now.unix_timestamp())
        }
        other => {
            return Err(err(
                "ValidationException",
                format!("unknown Validity Type {other}"),
            ));
        }
    };
    match secs {
        Some(s) if s > 0 => Ok(Duration::from_secs(s as u64)),
        _ => Err(err(
            "InvalidArgsException",
            "Validity must end in the future",
        )),
    }
}

async fn issue(api: &CaApi, scope: &Scope, body: &[u8]) -> Result<Value, WireError> {
    let req: IssueRequest = parse(body)?;
    check_ca_arn(api, &req.certificate_authority_arn)?;
    if !SIGNING_ALGORITHMS.contains(&req.signing_algorithm.as_str()) {
        return Err(err(
            "ValidationException",
            format!("unknown SigningAlgorithm {}", req.signing_algorithm),
        ));
    }
    if let Some(t) = &req.template_arn
        && !t.contains("EndEntityCertificate")
    {
        return Err(err(
            "InvalidArgsException",
            format!("only end-entity templates are supported, not {t}"),
        ));
    }
    let ttl = validity_ttl(&req.validity)?;
    use base64::Engine;
    let csr_bytes = base64::engine::general_purpose::STANDARD
        .decode(req.csr.trim())
        .map_err(|_| err("MalformedCSRException", "Csr is not base64"))?;
    let csr = VerifiedCsr::parse(&csr_bytes).map_err(|e| {
        api.authority().count_error(e.reason());
        WireError::from(&e)
    })?;
    let (ns, svc) = match scope {
        Scope::Workload { namespace, service } => (namespace.clone(), service.clone()),
        Scope::Admin => {
            // An admin credential names the identity in the CSR's CN as `<service>.<namespace>`.
            let cn = csr.common_name().unwrap_or_default();
            let (s, n) = cn.split_once('.').ok_or_else(|| {
                err(
                    "InvalidArgsException",
                    "with an admin credential the CSR CN must be <service>.<namespace>",
                )
            })?;
            let s: ServiceName = s
                .parse()
                .map_err(|e| err("InvalidArgsException", format!("{e}")))?;
            let n: NamespaceName = n
                .parse()
                .map_err(|e| err("InvalidArgsException", format!("{e}")))?;
            (n, s)
        }
    };
    let id = SpiffeId::new(api.authority().trust_domain().clone(), ns, svc);
    let authority = api.authority().clone();
    let issued =
        tokio::task::spawn_blocking(move || authority.issue(&csr, &id, Some(ttl), true, "aws-api"))
            .await
            .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
            .map_err(|e| WireError::from(&e))?;
    Ok(json!({ "CertificateArn": format!("{}/certificate/{}", api.ca_arn(), issued.serial) }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetCertificateRequest {
    certificate_authority_arn: String,
    certificate_arn: String,
}

fn ca_chain_pem(api: &CaApi) -> String {
    let roots = api.authority().roots();
    let mut s = api.authority().intermediate_pem().to_owned();
    if let Some(root) = roots.first() {
        s.push_str(&to_pem("CERTIFICATE", root));
    }
    s
}

fn get_certificate(api: &CaApi, body: &[u8]) -> Result<Value, WireError> {
    let req: GetCertificateRequest = parse(body)?;
    check_ca_arn(api, &req.certificate_authority_arn)?;
    let serial = req
        .certificate_arn
        .strip_prefix(api.ca_arn())
        .and_then(|r| r.strip_prefix("/certificate/"))
        .ok_or_else(|| {
            err(
                "InvalidArnException",
                format!("{} is not a certificate of this CA", req.certificate_arn),
            )
        })?;
    let serial: Serial = serial.parse().map_err(|_| {
        err(
            "InvalidArnException",
            format!("bad certificate ARN {}", req.certificate_arn),
        )
    })?;
    let cert = api.authority().certificate(&serial).ok_or_else(|| {
        err(
            "ResourceNotFoundException",
            format!("certificate {} not found", req.certificate_arn),
        )
    })?;
    Ok(json!({
        "Certificate": to_pem("CERTIFICATE", &cert),
        "CertificateChain": ca_chain_pem(api),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CaArnRequest {
    certificate_authority_arn: String,
}

fn get_ca_certificate(api: &CaApi, body: &[u8]) -> Result<Value, WireError> {
    let req: CaArnRequest = parse(body)?;
    check_ca_arn(api, &req.certificate_authority_arn)?;
    let roots = api.authority().roots();
    Ok(json!({
        "Certificate": api.authority().intermediate_pem(),
        "CertificateChain": roots.first().map(|r| to_pem("CERTIFICATE", r)).unwrap_or_default(),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RevokeRequest {
    certificate_authority_arn: String,
    certificate_serial: String,
    revocation_reason: String,
}

async fn revoke(api: &CaApi, scope: &Scope, body: &[u8]) -> Result<Value, WireError> {
    let req: RevokeRequest = parse(body)?;
    check_ca_arn(api, &req.certificate_authority_arn)?;
    let reason = match req.revocation_reason.as_str() {
        "UNSPECIFIED" => RevokeReason::Unspecified,
        "KEY_COMPROMISE" => RevokeReason::KeyCompromise,
        "CERTIFICATE_AUTHORITY_COMPROMISE" => RevokeReason::CaCompromise,
        "AFFILIATION_CHANGED" => RevokeReason::AffiliationChanged,
        "SUPERSEDED" => RevokeReason::Superseded,
        "CESSATION_OF_OPERATION" => RevokeReason::CessationOfOperation,
        "PRIVILEGE_WITHDRAWN" => RevokeReason::PrivilegeWithdrawn,
        "A_A_COMPROMISE" => RevokeReason::AaCompromise,
        other => {
            return Err(err(
                "ValidationException",
                format!("unknown RevocationReason {other}"),
            ));
        }
    };
    let serial: Serial = req.certificate_serial.parse().map_err(|_| {
        err(
            "InvalidArgsException",
            format!("bad CertificateSerial {}", req.certificate_serial),
        )
    })?;
    let cert = api.authority().certificate(&serial).ok_or_else(|| {
        err(
            "ResourceNotFoundException",
            format!("certificate {} not found", req.certificate_serial),
        )
    })?;
    // A workload credential may revoke only certificates of its own identity.
    if let Scope::Workload { namespace, service } = scope {
        let owner = spiffe_id_of(&cert);
        if !owner.is_some_and(|o| o.namespace() == namespace && o.service() == service) {
            return Err(WireError::from(&AuthError::Forbidden(
                "revoke another identity's certificate".into(),
            )));
        }
    }
    let authority = api.authority().clone();
    tokio::task::spawn_blocking(move || authority.revoke(&serial, reason, "aws-api"))
        .await
        .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
        .map_err(|e| WireError::from(&e))?;
    Ok(json!({}))
}

fn describe(api: &CaApi, body: &[u8]) -> Result<Value, WireError> {
    let req: CaArnRequest = parse(body)?;
    check_ca_arn(api, &req.certificate_authority_arn)?;
    let der = api.authority().intermediate();
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?;
    let nb = x.validity().not_before.timestamp();
    let na = x.validity().not_after.timestamp();
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    Ok(json!({
        "CertificateAuthority": {
            "Arn": api.ca_arn(),
            "OwnerAccount": super::ACCOUNT_ID,
            "CreatedAt": nb,
            "LastStateChangeAt": nb,
            "Type": "SUBORDINATE",
            "Serial": x.raw_serial_as_string(),
            "Status": "ACTIVE",
            "NotBefore": nb,
            "NotAfter": na,
            "CertificateAuthorityConfiguration": {
                "KeyAlgorithm": "EC_prime256v1",
                "SigningAlgorithm": "SHA256WITHECDSA",
                "Subject": { "CommonName": cn, "Organization": "trellis" }
            },
            "RevocationConfiguration": {
                "CrlConfiguration": { "Enabled": true, "ExpirationInDays": 7 }
            },
            "KeyStorageSecurityStandard": "FIPS_140_2_LEVEL_1_OR_HIGHER",
            "UsageMode": "SHORT_LIVED_CERTIFICATE"
        }
    }))
}
