//! Entry points for the `fuzz/` targets and the corpus-replay tests: arbitrary bytes in, never a
//! panic, the properties checked with `assert!`.

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use trellis_core::SpiffeId;

use crate::api::CaApi;
use crate::authority::Authority;
use crate::csr::VerifiedCsr;
use crate::policy::{MIN_TTL, Policy};
use crate::token::{Scope, Tokens};

/// The AWS Private CA actions, in the order the first input byte selects them.
pub const ACM_PCA_ACTIONS: &[&str] = &[
    "IssueCertificate",
    "GetCertificate",
    "GetCertificateAuthorityCertificate",
    "RevokeCertificate",
    "DescribeCertificateAuthority",
];

struct Fixture {
    api: CaApi,
    /// base64 of a valid PEM CSR whose CN is `api.default`.
    csr_b64: String,
    cert_arn: String,
    serial: String,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let built = (|| -> Result<Fixture, Box<dyn std::error::Error>> {
            let authority = Authority::in_memory("mesh.local".parse()?, Policy::default())?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "api.default");
            params.distinguished_name = dn;
            let pem = params.serialize_request(&key)?.pem()?;
            let csr = VerifiedCsr::parse(pem.as_bytes())?;
            let id: SpiffeId = "spiffe://mesh.local/ns/default/svc/api".parse()?;
            let issued = authority.issue(&csr, &id, None, true, "fuzz")?;
            let api = CaApi::new(authority, Tokens::in_memory(), "us-east-1");
            Ok(Fixture {
                cert_arn: format!("{}/certificate/{}", api.ca_arn(), issued.serial),
                serial: issued.serial.to_colon_hex(),
                csr_b64: base64::engine::general_purpose::STANDARD.encode(pem),
                api,
                runtime: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            })
        })();
        match built {
            Ok(f) => f,
            Err(e) => panic!("CA fuzz fixture must build: {e}"),
        }
    })
}

/// One authenticated AWS Private CA request: the first byte picks the action and the scope (admin
/// or the workload `default/api`), the rest is the JSON body, where `$ARN`, `$CSR`, `$CERT` and
/// `$SERIAL` stand for the CA's ARN, a valid CSR, an issued certificate's ARN and its serial.
/// Properties: the answer is JSON; errors are 4xx with an AWS `__type` (5xx only as internal).
pub fn acm_pca_request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let action = ACM_PCA_ACTIONS[usize::from(which) % ACM_PCA_ACTIONS.len()];
    let scope = if (usize::from(which) / ACM_PCA_ACTIONS.len()).is_multiple_of(2) {
        Scope::Admin
    } else {
        Scope::Workload {
            namespace: "default".parse().unwrap_or_else(|_| unreachable!()),
            service: "api".parse().unwrap_or_else(|_| unreachable!()),
        }
    };
    let body = match std::str::from_utf8(body) {
        Ok(text) => text
            .replace("$ARN", f.api.ca_arn())
            .replace("$CSR", &f.csr_b64)
            .replace("$CERT", &f.cert_arn)
            .replace("$SERIAL", &f.serial)
            .into_bytes(),
        Err(_) => body.to_vec(),
    };
    let resp = f
        .runtime
        .block_on(crate::api::aws::dispatch(&f.api, action, &scope, &body));
    let status = resp.status();
    assert!(
        status.is_success() || status.is_client_error() || status.is_server_error(),
        "{action}: status {status}"
    );
    let bytes = f.runtime.block_on(async {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.map(|c| c.to_bytes())
    });
    let Ok(bytes) = bytes;
    let v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => panic!("{action}: answer is not JSON ({e})"),
    };
    if !status.is_success() {
        assert!(
            v["__type"].is_string(),
            "{action}: error without __type: {v}"
        );
    }
}

/// CSR parsing and the issuance policy: any bytes either fail with a typed error or give a key
/// the CA signs; the certificate carries exactly the requested SPIFFE id and a lifetime the
/// policy allows (the first two bytes are the requested TTL in minutes).
pub fn csr(data: &[u8]) {
    let ttl = match data {
        [a, b, ..] => Duration::from_secs(60 * u64::from(u16::from_be_bytes([*a, *b]))),
        _ => Duration::ZERO,
    };
    let policy = Policy::default();
    let clamped = match policy.ttl(Some(ttl), true) {
        Ok(t) => t,
        Err(e) => panic!("clamping never fails: {e}"),
    };
    assert!(clamped <= policy.max_ttl && clamped >= MIN_TTL);
    assert_eq!(policy.ttl(Some(ttl), false).is_err(), ttl > policy.max_ttl);
    let Ok(csr) = VerifiedCsr::parse(data) else {
        return;
    };
    let f = fixture();
    let id: SpiffeId = match "spiffe://mesh.local/ns/fuzz/svc/csr".parse() {
        Ok(id) => id,
        Err(e) => panic!("{e}"),
    };
    match f.api.authority().issue(&csr, &id, Some(ttl), true, "fuzz") {
        Ok(issued) => {
            assert_eq!(issued.spiffe_id, id);
            assert_eq!(crate::trust::spiffe_id_of(&issued.chain[0]), Some(id));
            let life = issued.not_after - issued.not_before;
            assert!(life <= policy.max_ttl + crate::policy::BACKDATE + Duration::from_secs(1));
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
}
