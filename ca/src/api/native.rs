//! The native API: `POST /v1/ca/sign`, `GET /v1/ca/roots`, `GET /v1/ca/crl`, `POST /v1/ca/revoke`,
//! and for admin credentials `POST /v1/ca/tokens` (create a scoped credential) and
//! `GET /v1/ca/audit` (the audit log).

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use trellis_core::{NamespaceName, ServiceName, SpiffeId};

use super::CaApi;
use super::wire::{WireError, json_response, text_response};
use crate::authority::RevokeReason;
use crate::csr::VerifiedCsr;
use crate::error::CaError;
use crate::serial::Serial;
use crate::token::{AuthError, Scope};

const PEM: &str = "application/x-pem-file";

pub(super) async fn handle(api: &CaApi, parts: &Parts, body: Bytes) -> Response<Full<Bytes>> {
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/ca/sign") => match sign(api, parts, body).await {
            Ok(r) => r,
            Err(e) => e.native(),
        },
        (&Method::GET, "/v1/ca/roots") => {
            text_response(StatusCode::OK, api.authority().roots_pem(), PEM)
        }
        (&Method::GET, "/v1/ca/crl") => text_response(
            StatusCode::OK,
            api.authority().crl_pem().as_bytes().to_vec(),
            PEM,
        ),
        (&Method::POST, "/v1/ca/revoke") => match revoke(api, parts, body).await {
            Ok(r) => r,
            Err(e) => e.native(),
        },
        (&Method::POST, "/v1/ca/tokens") => match create_token(api, parts, body).await {
            Ok(r) => r,
            Err(e) => e.native(),
        },
        (&Method::GET, "/v1/ca/audit") => match audit(api, parts).await {
            Ok(r) => r,
            Err(e) => e.native(),
        },
        (
            _,
            "/v1/ca/sign" | "/v1/ca/roots" | "/v1/ca/crl" | "/v1/ca/revoke" | "/v1/ca/tokens"
            | "/v1/ca/audit",
        ) => WireError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "UnknownOperationException",
            "method not allowed",
        )
        .native(),
        _ => WireError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "UnknownOperationException",
            "no such route",
        )
        .native(),
    }
}

fn query(parts: &Parts) -> impl Iterator<Item = (&str, &str)> {
    parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
}

fn auth(api: &CaApi, parts: &Parts) -> Result<Scope, WireError> {
    api.tokens()
        .check_header(parts.headers.get(http::header::AUTHORIZATION))
        .map_err(|e| {
            api.authority().count_error("unauthenticated");
            WireError::from(&e)
        })
}

async fn sign(api: &CaApi, parts: &Parts, body: Bytes) -> Result<Response<Full<Bytes>>, WireError> {
    let scope = auth(api, parts)?;
    let (mut ns, mut svc, mut ttl) = (None, None, None);
    for (k, v) in query(parts) {
        let bad = |what: &str| {
            WireError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "InvalidArgsException",
                format!("bad {what} {v:?}"),
            )
        };
        match k {
            "namespace" => ns = Some(v.parse::<NamespaceName>().map_err(|_| bad("namespace"))?),
            "service" => svc = Some(v.parse::<ServiceName>().map_err(|_| bad("service"))?),
            "ttl" => ttl = Some(crate::policy::parse_duration(v).ok_or_else(|| bad("ttl"))?),
            _ => {}
        }
    }
    let (ns, svc) = match (&scope, ns, svc) {
        (Scope::Workload { namespace, service }, ns, svc) => (
            ns.unwrap_or_else(|| namespace.clone()),
            svc.unwrap_or_else(|| service.clone()),
        ),
        (Scope::Admin, Some(ns), Some(svc)) => (ns, svc),
        (Scope::Admin, _, _) => {
            return Err(WireError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "InvalidArgsException",
                "an admin credential must name ?namespace=...&service=...",
            ));
        }
    };
    if !scope.allows(&ns, &svc) {
        api.authority().count_error("forbidden");
        return Err(WireError::from(&AuthError::Forbidden(format!(
            "obtain the identity of {svc}.{ns}"
        ))));
    }
    let id = SpiffeId::new(api.authority().trust_domain().clone(), ns, svc);
    let authority = api.authority().clone();
    let requester = format!("token:{}", token_id(parts));
    let issued = tokio::task::spawn_blocking(move || {
        let csr = VerifiedCsr::parse(&body);
        if let Err(e) = &csr {
            authority.count_error(e.reason());
        }
        authority.issue(&csr?, &id, ttl, false, &requester)
    })
    .await
    .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
    .map_err(|e| WireError::from(&e))?;
    let mut r = text_response(StatusCode::OK, issued.chain_pem, PEM);
    if let Ok(v) = http::HeaderValue::from_str(&issued.serial.to_string()) {
        r.headers_mut().insert("x-trellis-serial", v);
    }
    Ok(r)
}

fn token_id(parts: &Parts) -> String {
    parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|t| t.split_once('.'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    serial: String,
    #[serde(default = "unspecified")]
    reason: String,
}
fn unspecified() -> String {
    "unspecified".into()
}

fn admin(api: &CaApi, parts: &Parts, what: &str) -> Result<(), WireError> {
    if auth(api, parts)? != Scope::Admin {
        return Err(WireError::from(&AuthError::Forbidden(what.into())));
    }
    Ok(())
}

/// `{"namespace": "...", "service": "..."}` or `{"admin": true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    namespace: Option<NamespaceName>,
    service: Option<ServiceName>,
    #[serde(default)]
    admin: bool,
}

async fn create_token(
    api: &CaApi,
    parts: &Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, WireError> {
    admin(api, parts, "create credentials")?;
    let b: TokenBody = serde_json::from_slice(&body)
        .map_err(|e| WireError::from(&CaError::InvalidRequest(e.to_string())))?;
    let scope = match (b.admin, b.namespace, b.service) {
        (true, None, None) => Scope::Admin,
        (false, Some(namespace), Some(service)) => Scope::Workload { namespace, service },
        _ => {
            return Err(WireError::from(&CaError::InvalidRequest(
                "give namespace and service, or admin: true".into(),
            )));
        }
    };
    let tokens = api.tokens().clone();
    let t = tokio::task::spawn_blocking(move || tokens.create(scope))
        .await
        .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
        .map_err(|e| WireError::from(&e))?;
    // The same shape as `trellis-ca token create`.
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "token": t.bearer(),
            "aws_access_key_id": t.id,
            "aws_secret_access_key": t.secret,
        }),
        "application/json",
    ))
}

async fn audit(api: &CaApi, parts: &Parts) -> Result<Response<Full<Bytes>>, WireError> {
    admin(api, parts, "read the audit log")?;
    let authority = api.authority().clone();
    let records = tokio::task::spawn_blocking(move || authority.audit_log())
        .await
        .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
        .map_err(|e| WireError::from(&e))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "records": records }),
        "application/json",
    ))
}

async fn revoke(
    api: &CaApi,
    parts: &Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, WireError> {
    admin(api, parts, "revoke certificates")?;
    let b: RevokeBody = serde_json::from_slice(&body)
        .map_err(|e| WireError::from(&CaError::InvalidRequest(e.to_string())))?;
    let serial: Serial = b.serial.parse().map_err(|e| WireError::from(&e))?;
    let reason: RevokeReason = b.reason.parse().map_err(|e| WireError::from(&e))?;
    let authority = api.authority().clone();
    let requester = format!("token:{}", token_id(parts));
    tokio::task::spawn_blocking(move || authority.revoke(&serial, reason, &requester))
        .await
        .map_err(|e| WireError::from(&CaError::Internal(e.to_string())))?
        .map_err(|e| WireError::from(&e))?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"revoked": b.serial}),
        "application/json",
    ))
}
