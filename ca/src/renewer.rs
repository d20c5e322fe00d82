//! [`Renewer`] implementations: over HTTP against a trellis CA, and in-process.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use trellis_core::SpiffeId;

use crate::authority::Authority;
use crate::csr::VerifiedCsr;
use crate::error::CaError;
use crate::identity::{Credential, RenewFuture, Renewer};
use crate::trust::TrustBundle;

/// Largest response body accepted from the CA.
const MAX_RESPONSE: usize = 1024 * 1024;
/// Per-request timeout towards the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh P-256 key and a CSR for it (the CA decides the subject, so the CSR carries none).
pub fn generate_key_and_csr() -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Renews by calling `POST /v1/ca/sign` with a bearer token; refreshes the trust bundle from
/// `GET /v1/ca/roots` each time.
pub struct HttpRenewer {
    base: String,
    token: String,
    ttl: Option<Duration>,
    /// Roots from configuration: never fetched; every chain the CA returns must verify against
    /// them.
    pinned: Option<Arc<TrustBundle>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpRenewer {
    /// `ca_url` like `http://127.0.0.1:7000` (no trailing path).
    pub fn new(ca_url: &str, token: &str, ttl: Option<Duration>) -> Result<Self, CaError> {
        let base = ca_url.trim_end_matches('/').to_owned();
        base.parse::<http::Uri>()
            .map_err(|e| CaError::InvalidRequest(format!("CA URL {ca_url:?}: {e}")))?;
        Ok(Self {
            base,
            token: token.to_owned(),
            ttl,
            pinned: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Renewals keep the roots the identity was built with (configured trust anchors) instead of
    /// taking the CA's word for them; each returned chain must then verify against those roots.
    pub fn pinned(self, roots: Arc<TrustBundle>) -> Self {
        Self {
            pinned: Some(roots),
            ..self
        }
    }

    async fn call(&self, req: http::Request<Full<Bytes>>) -> Result<Bytes, CaError> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CaError::Internal(format!("CA unreachable: {e}")))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| CaError::Internal(format!("CA response: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(CaError::Internal(format!(
                    "CA answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            Ok(body)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| CaError::Internal("CA request timed out".into()))?
    }

    /// `GET /v1/ca/roots`.
    pub async fn fetch_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let req = http::Request::get(format!("{}/v1/ca/roots", self.base))
            .body(Full::new(Bytes::new()))
            .map_err(|e| CaError::Internal(e.to_string()))?;
        let body = self.call(req).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| CaError::InvalidRequest("roots are not UTF-8 PEM".into()))?;
        crate::ca_dir::parse_certs(text).map_err(CaError::InvalidRequest)
    }

    /// `POST /v1/ca/sign` with a CSR; returns the chain.
    pub async fn sign(&self, csr_pem: String) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut uri = format!("{}/v1/ca/sign", self.base);
        if let Some(ttl) = self.ttl {
            uri.push_str(&format!("?ttl={}", ttl.as_secs().max(1)));
        }
        let req = http::Request::post(uri)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/pkcs10")
            .body(Full::new(Bytes::from(csr_pem)))
            .map_err(|e| CaError::Internal(e.to_string()))?;
        let body = self.call(req).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| CaError::InvalidRequest("chain is not UTF-8 PEM".into()))?;
        crate::ca_dir::parse_certs(text).map_err(CaError::InvalidRequest)
    }
}

impl Renewer for HttpRenewer {
    fn renew(&self) -> RenewFuture<'_> {
        Box::pin(async move {
            let (key, csr) = generate_key_and_csr()?;
            let chain = self.sign(csr).await?;
            let roots = match &self.pinned {
                Some(bundle) => {
                    bundle.verify_chain(&chain)?;
                    None
                }
                None => Some(self.fetch_roots().await?),
            };
            Ok(Credential {
                chain,
                key: key_der(&key),
                roots,
            })
        })
    }
}

/// Renews from an in-process [`Authority`] (tests, the demo, single-binary setups).
pub struct LocalRenewer {
    authority: Authority,
    id: SpiffeId,
    ttl: Option<Duration>,
}

impl LocalRenewer {
    pub fn new(authority: Authority, id: SpiffeId, ttl: Option<Duration>) -> Arc<Self> {
        Arc::new(Self { authority, id, ttl })
    }
}

impl Renewer for LocalRenewer {
    fn renew(&self) -> RenewFuture<'_> {
        Box::pin(async move {
            let (key, csr) = generate_key_and_csr()?;
            let csr = VerifiedCsr::parse(csr.as_bytes())?;
            let issued = self
                .authority
                .issue(&csr, &self.id, self.ttl, true, "local")?;
            Ok(Credential {
                chain: issued.chain,
                key: key_der(&key),
                roots: Some(self.authority.roots().to_vec()),
            })
        })
    }
}

/// Renews by re-reading a certificate chain and key from files (PEM), e.g. written by
/// `trellis-ca issue` or an external agent. Lets a workload pick up rotated files.
pub struct FileRenewer {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl FileRenewer {
    pub fn new(
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cert: cert.into(),
            key: key.into(),
        })
    }
}

impl Renewer for FileRenewer {
    fn renew(&self) -> RenewFuture<'_> {
        Box::pin(async move {
            let cert = tokio::fs::read_to_string(&self.cert)
                .await
                .map_err(|e| CaError::io(&self.cert, e))?;
            let chain =
                crate::ca_dir::parse_certs(&cert).map_err(|e| CaError::corrupt(&self.cert, e))?;
            let key = tokio::fs::read_to_string(&self.key)
                .await
                .map_err(|e| CaError::io(&self.key, e))?;
            let kp = KeyPair::from_pem(&key)
                .map_err(|e| CaError::corrupt(&self.key, format!("not a PKCS#8 PEM key: {e}")))?;
            Ok(Credential {
                chain,
                key: key_der(&kp),
                roots: None,
            })
        })
    }
}
