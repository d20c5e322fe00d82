//! A workload's own identity: the current key + chain in an `ArcSwap`, renewed at 2/3 of its
//! lifetime (minus jitter) with exponential backoff on failure, served to rustls through
//! resolvers so a renewal never touches a live connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use time::OffsetDateTime;
use tokio::time::Instant;
use trellis_core::SpiffeId;

use crate::error::CaError;
use crate::trust::{TrustBundle, crypto_provider, spiffe_id_of};

/// Boxed future returned by [`Renewer::renew`].
pub type RenewFuture<'a> = Pin<Box<dyn Future<Output = Result<Credential, CaError>> + Send + 'a>>;

/// Where new certificates come from: the CA over HTTP in production, an in-process CA in tests.
pub trait Renewer: Send + Sync + 'static {
    /// Generates a fresh key, gets it certified and returns key + chain (+ the current trust
    /// bundle when the source knows it).
    fn renew(&self) -> RenewFuture<'_>;
}

/// A private key with its certificate chain (leaf first).
#[derive(Debug)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Roots the source says to trust now (root rotation); `None` keeps the current bundle.
    pub roots: Option<Vec<CertificateDer<'static>>>,
}

/// First retry delay after a failed renewal.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between renewal attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Renewal happens at this fraction of the remaining lifetime (2/3)...
const RENEW_NUM: u32 = 2;
const RENEW_DEN: u32 = 3;
/// ...minus up to this fraction of the lifetime as random jitter (spreads a fleet's renewals).
const JITTER_FRACTION: f64 = 0.1;

struct Current {
    ck: Arc<CertifiedKey>,
    not_after: OffsetDateTime,
    /// Local time the credential was installed, and when to renew it.
    renew_at: Instant,
}

/// A self-renewing workload identity.
pub struct Identity {
    id: SpiffeId,
    current: ArcSwap<Current>,
    bundle: Arc<TrustBundle>,
    renewer: Arc<dyn Renewer>,
    renewals: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Gets a first credential from `renewer` and builds the identity. Call
    /// [`Identity::spawn_renewal`] to keep it fresh.
    pub async fn new(
        renewer: Arc<dyn Renewer>,
        bundle: Arc<TrustBundle>,
    ) -> Result<Arc<Self>, CaError> {
        let cred = renewer.renew().await?;
        let (id, current) = install(&cred, &bundle)?;
        Ok(Arc::new(Self {
            id,
            current: ArcSwap::from_pointee(current),
            bundle,
            renewer,
            renewals: 0.into(),
        }))
    }

    /// Bootstraps from a trellis CA over HTTP with a first certificate for `token`.
    ///
    /// `pinned`: the mesh's root certificates, from configuration. With them, only those roots are
    /// trusted, and every certificate the CA returns must chain to them (a CA impersonated on the
    /// network is refused); root rotation then means updating that configuration, as with
    /// Linkerd's trust anchors. Without them, the trust bundle is fetched from
    /// `GET {ca_url}/v1/ca/roots` and refreshed at every renewal (trust on first use: `ca_url`
    /// must be reached over a trusted network, e.g. loopback or the control-plane network).
    pub async fn bootstrap(
        ca_url: &str,
        token: &str,
        trust_domain: trellis_core::TrustDomain,
        ttl: Option<Duration>,
        pinned: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Arc<Self>, CaError> {
        Self::bootstrap_replicas(&[ca_url], token, trust_domain, ttl, pinned).await
    }

    /// [`Identity::bootstrap`] against several replicas of one CA (control-plane replicas on
    /// etcd): the first certificate and every renewal come from whichever replica answers,
    /// trying them in order (see [`crate::renewer::HttpRenewer`]).
    pub async fn bootstrap_replicas(
        ca_urls: &[impl AsRef<str>],
        token: &str,
        trust_domain: trellis_core::TrustDomain,
        ttl: Option<Duration>,
        pinned: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Arc<Self>, CaError> {
        let renewer = crate::renewer::HttpRenewer::replicas(ca_urls, token, ttl)?;
        let roots = match pinned {
            Some(roots) => {
                if roots.is_empty() {
                    return Err(CaError::InvalidRequest(
                        "the pinned trust bundle holds no certificate".into(),
                    ));
                }
                let bundle = TrustBundle::new(trust_domain, roots)?;
                let renewer = renewer.pinned(bundle.clone())?;
                return Self::new(Arc::new(renewer), bundle).await;
            }
            None if crate::cp_client::any_https(ca_urls) => {
                return Err(CaError::InvalidRequest(
                    crate::cp_client::NEEDS_BUNDLE.into(),
                ));
            }
            None => renewer.fetch_roots().await?,
        };
        let bundle = TrustBundle::new(trust_domain, roots)?;
        Self::new(Arc::new(renewer), bundle).await
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }
    pub fn trust_bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }
    /// The current key + chain.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().ck.clone()
    }
    /// The current leaf certificate.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().ck.cert[0].clone()
    }
    pub fn not_after(&self) -> OffsetDateTime {
        self.current.load().not_after
    }
    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Renews now (also used by the background task).
    pub async fn rotate_now(&self) -> Result<(), CaError> {
        let cred = self.renewer.renew().await?;
        let (id, current) = install(&cred, &self.bundle)?;
        if id != self.id {
            return Err(CaError::Mismatch(format!(
                "renewal returned {id}, expected {}",
                self.id
            )));
        }
        if let Some(roots) = cred.roots {
            self.bundle.update(roots)?;
        }
        self.current.store(Arc::new(current));
        self.renewals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Keeps the identity fresh until the returned task is aborted or the identity dropped.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = BACKOFF_INITIAL;
            loop {
                let Some(me) = weak.upgrade() else { return };
                let at = me.current.load().renew_at;
                drop(me);
                tokio::time::sleep_until(at).await;
                let Some(me) = weak.upgrade() else { return };
                match me.rotate_now().await {
                    Ok(()) => {
                        backoff = BACKOFF_INITIAL;
                        tracing::info!(id = %me.id, not_after = %me.not_after(), "identity renewed");
                    }
                    Err(e) => {
                        tracing::warn!(id = %me.id, error = %e, retry_in = ?backoff, "identity renewal failed");
                        drop(me);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        // Loop: renew_at is in the past, so the next attempt runs immediately.
                    }
                }
            }
        })
    }

    /// mTLS server config: presents this identity, requires a client certificate from the
    /// trust bundle's trust domain.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<ServerConfig, CaError> {
        let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Internal(e.to_string()))?
            .with_client_cert_verifier(self.bundle.client_verifier())
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }

    /// The control plane's own API identity, issued in-process by `authority` with `names` (DNS
    /// names and IP addresses clients dial) as SANs; call [`Identity::spawn_renewal`] to keep it
    /// fresh. Used by `trellis-discovery serve --api-tls` and `trellis-ca serve --tls`.
    pub async fn control_plane(
        authority: &crate::Authority,
        names: Vec<String>,
    ) -> Result<Arc<Self>, CaError> {
        let bundle =
            TrustBundle::new(authority.trust_domain().clone(), authority.roots().to_vec())?;
        let renewer = crate::LocalRenewer::control_plane(authority.clone(), names, None);
        Self::new(renewer, bundle).await
    }

    /// Names every control-plane API certificate carries for an API bound to `listen`:
    /// `localhost`, `127.0.0.1`, `::1` and the listen address unless it is a wildcard.
    pub fn local_api_names(listen: std::net::SocketAddr) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names
    }

    /// TLS server config without client certificates (the control plane's HTTPS API, whose
    /// callers authenticate with tokens or SigV4): presents this identity.
    pub fn public_server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<ServerConfig, CaError> {
        let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Internal(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }

    /// mTLS client config: presents this identity, accepts servers of the trust domain (or
    /// exactly `expected`).
    pub fn client_config(
        self: &Arc<Self>,
        expected: Option<SpiffeId>,
        alpn: &[&[u8]],
    ) -> Result<ClientConfig, CaError> {
        let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Internal(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(self.bundle.server_verifier(expected))
            .with_client_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

fn install(cred: &Credential, bundle: &TrustBundle) -> Result<(SpiffeId, Current), CaError> {
    let leaf = cred
        .chain
        .first()
        .ok_or_else(|| CaError::InvalidRequest("empty certificate chain".into()))?;
    let id = spiffe_id_of(leaf)
        .ok_or_else(|| CaError::InvalidRequest("certificate has no SPIFFE id".into()))?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(CaError::Mismatch(format!(
            "certificate {id} is not in trust domain {}",
            bundle.trust_domain()
        )));
    }
    let (_, x) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| CaError::InvalidRequest(format!("leaf certificate: {e}")))?;
    let not_after = x.validity().not_after.to_datetime();
    let key = rustls::crypto::ring::sign::any_supported_type(&cred.key)
        .map_err(|e| CaError::InvalidRequest(format!("private key: {e}")))?;
    let ck = CertifiedKey::new(cred.chain.clone(), key);
    ck.keys_match()
        .map_err(|e| CaError::Mismatch(format!("key does not match certificate: {e}")))?;
    let remaining = (not_after - OffsetDateTime::now_utc())
        .try_into()
        .unwrap_or(Duration::ZERO);
    Ok((
        id,
        Current {
            ck: Arc::new(ck),
            not_after,
            renew_at: Instant::now() + renew_delay(remaining),
        },
    ))
}

/// Delay until renewal for a certificate with `remaining` lifetime: 2/3 of it, minus up to
/// 10% jitter.
pub fn renew_delay(remaining: Duration) -> Duration {
    let base = remaining * RENEW_NUM / RENEW_DEN;
    let jitter = remaining.mul_f64(JITTER_FRACTION * rand::rng().random::<f64>());
    base.saturating_sub(jitter)
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().ck.clone())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().ck.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_delay_is_two_thirds_minus_jitter() {
        for _ in 0..100 {
            let d = renew_delay(Duration::from_secs(3000));
            assert!(d <= Duration::from_secs(2000), "{d:?}");
            assert!(d >= Duration::from_secs(1700), "{d:?}");
        }
    }
}
