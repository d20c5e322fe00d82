//! [`Renewer`] implementations: over HTTP against a trellis CA, and in-process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use trellis_core::SpiffeId;

use crate::authority::Authority;
use crate::cp_client::ControlPlaneConnector;
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
///
/// With several control-plane replicas, each call goes to the replica that answered last and
/// moves on to the next when one is unreachable, times out or answers 5xx; a 4xx (a refused
/// token, a bad CSR) is every replica's answer and is returned at once.
pub struct HttpRenewer {
    bases: Vec<String>,
    /// Index into `bases` of the replica that answered last.
    preferred: AtomicUsize,
    token: String,
    ttl: Option<Duration>,
    /// Roots from configuration: never fetched; every chain the CA returns must verify against
    /// them.
    pinned: Option<Arc<TrustBundle>>,
    client: Client<ControlPlaneConnector, Full<Bytes>>,
}

/// One replica's failure: whether the next replica may answer differently.
enum CallError {
    /// Unreachable, timed out or 5xx: try the next replica.
    Replica(String),
    /// 4xx: the request itself is refused; every replica would say the same.
    Refused(String),
}

impl HttpRenewer {
    /// `ca_url` like `http://127.0.0.1:7000` (no trailing path).
    pub fn new(ca_url: &str, token: &str, ttl: Option<Duration>) -> Result<Self, CaError> {
        Self::replicas(&[ca_url], token, ttl)
    }

    /// Several replicas of the same CA (control-plane replicas on one etcd), in order of
    /// preference.
    pub fn replicas(
        ca_urls: &[impl AsRef<str>],
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<Self, CaError> {
        let mut bases = Vec::with_capacity(ca_urls.len());
        for url in ca_urls {
            let url = url.as_ref();
            let base = url.trim_end_matches('/').to_owned();
            base.parse::<http::Uri>()
                .map_err(|e| CaError::InvalidRequest(format!("CA URL {url:?}: {e}")))?;
            bases.push(base);
        }
        if bases.is_empty() {
            return Err(CaError::InvalidRequest("no CA URL given".into()));
        }
        Ok(Self {
            bases,
            preferred: AtomicUsize::new(0),
            token: token.to_owned(),
            ttl,
            pinned: None,
            client: Client::builder(TokioExecutor::new()).build(ControlPlaneConnector::plain()),
        })
    }

    /// Renewals keep the roots the identity was built with (configured trust anchors) instead of
    /// taking the CA's word for them; each returned chain must then verify against those roots.
    /// `https://` replicas are then verified against these roots too (their certificate must
    /// carry the control plane's SPIFFE id).
    pub fn pinned(self, roots: Arc<TrustBundle>) -> Result<Self, CaError> {
        let connector = ControlPlaneConnector::with_bundle(&roots)?;
        Ok(Self {
            pinned: Some(roots),
            client: Client::builder(TokioExecutor::new()).build(connector),
            ..self
        })
    }

    /// Sends the request `build` makes for a replica's base URL, replica after replica from the
    /// preferred one, until one answers.
    async fn call(
        &self,
        build: impl Fn(&str) -> Result<http::Request<Full<Bytes>>, CaError>,
    ) -> Result<Bytes, CaError> {
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.bases.len() {
            let at = (first + i) % self.bases.len();
            let base = &self.bases[at];
            match self.call_one(build(base)?).await {
                Ok(body) => {
                    if at != first {
                        self.preferred.store(at, Ordering::Relaxed);
                        tracing::info!(ca = %base, "CA calls moved to another control-plane replica");
                    }
                    return Ok(body);
                }
                Err(CallError::Refused(msg)) => return Err(CaError::Internal(msg)),
                Err(CallError::Replica(msg)) => {
                    if self.bases.len() > 1 {
                        tracing::warn!(ca = %base, error = %msg, "CA replica failed; trying the next");
                    }
                    failures.push(format!("{base}: {msg}"));
                }
            }
        }
        Err(CaError::Internal(if failures.len() == 1 {
            failures.remove(0)
        } else {
            format!("no CA replica answered ({})", failures.join("; "))
        }))
    }

    async fn call_one(&self, req: http::Request<Full<Bytes>>) -> Result<Bytes, CallError> {
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                CallError::Replica(format!(
                    "CA unreachable: {}",
                    crate::cp_client::error_chain(&e)
                ))
            })?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| CallError::Replica(format!("CA response: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let msg = format!("CA answered {status}: {}", String::from_utf8_lossy(&body));
                return Err(if status.is_server_error() {
                    CallError::Replica(msg)
                } else {
                    CallError::Refused(msg)
                });
            }
            Ok(body)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| CallError::Replica("CA request timed out".into()))?
    }

    /// `GET /v1/ca/roots`.
    pub async fn fetch_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let body = self
            .call(|base| {
                http::Request::get(format!("{base}/v1/ca/roots"))
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| CaError::Internal(e.to_string()))
            })
            .await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| CaError::InvalidRequest("roots are not UTF-8 PEM".into()))?;
        crate::ca_dir::parse_certs(text).map_err(CaError::InvalidRequest)
    }

    /// `POST /v1/ca/sign` with a CSR; returns the chain.
    pub async fn sign(&self, csr_pem: String) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let query = self
            .ttl
            .map(|ttl| format!("?ttl={}", ttl.as_secs().max(1)))
            .unwrap_or_default();
        let csr = Bytes::from(csr_pem);
        let body = self
            .call(|base| {
                http::Request::post(format!("{base}/v1/ca/sign{query}"))
                    .header(
                        http::header::AUTHORIZATION,
                        format!("Bearer {}", self.token),
                    )
                    .header(http::header::CONTENT_TYPE, "application/pkcs10")
                    .body(Full::new(csr.clone()))
                    .map_err(|e| CaError::Internal(e.to_string()))
            })
            .await?;
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

/// Renews from an in-process [`Authority`] (tests, the demo, single-binary setups), and the
/// control plane's own API certificate ([`LocalRenewer::control_plane`]).
pub struct LocalRenewer {
    authority: Authority,
    subject: Subject,
    ttl: Option<Duration>,
}

/// Whom a [`LocalRenewer`] certifies.
enum Subject {
    Workload(SpiffeId),
    /// The reserved control-plane id plus these DNS names and IP addresses (what clients dial).
    ControlPlane(Vec<String>),
}

impl LocalRenewer {
    pub fn new(authority: Authority, id: SpiffeId, ttl: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            authority,
            subject: Subject::Workload(id),
            ttl,
        })
    }

    /// The control plane's own API certificate: its reserved SPIFFE id and `names` as SANs.
    pub fn control_plane(
        authority: Authority,
        names: Vec<String>,
        ttl: Option<Duration>,
    ) -> Arc<Self> {
        Arc::new(Self {
            authority,
            subject: Subject::ControlPlane(names),
            ttl,
        })
    }
}

impl Renewer for LocalRenewer {
    fn renew(&self) -> RenewFuture<'_> {
        Box::pin(async move {
            let (key, csr) = generate_key_and_csr()?;
            let csr = VerifiedCsr::parse(csr.as_bytes())?;
            let a = &self.authority;
            let issued = match &self.subject {
                Subject::Workload(id) => a.issue(&csr, id, self.ttl, true, "local")?,
                Subject::ControlPlane(names) => a.issue_control_plane(&csr, names, self.ttl)?,
            };
            Ok(Credential {
                chain: issued.chain,
                key: key_der(&key),
                roots: Some(a.roots().to_vec()),
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
