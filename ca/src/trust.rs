//! Trust bundles and SPIFFE-aware rustls verifiers.
//!
//! A [`TrustBundle`] holds every root a workload accepts (several during a root rotation) and
//! can be swapped at runtime without touching live connections. The verifiers check the
//! chain against it, then require the leaf's URI SAN to be a SPIFFE id of the bundle's trust
//! domain (and, on the client side, optionally one expected id). Hostnames are not checked:
//! in the mesh, the SPIFFE id is the identity.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, RootCertStore,
    SignatureScheme,
};
use trellis_core::{SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;

use crate::error::CaError;

/// The rustls crypto provider trellis uses everywhere (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE id in a certificate's URI SAN, if it has exactly one valid trellis id.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = x.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    first.parse().ok()
}

/// The verified SPIFFE id of the peer of a finished handshake (server or client side).
pub fn peer_spiffe_id(conn: &CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(spiffe_id_of)
}

/// The roots a workload trusts, for one trust domain. Swappable at runtime.
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: ArcSwap<RootCertStore>,
    ders: ArcSwap<Vec<CertificateDer<'static>>>,
    client_verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.ders.load().len())
            .finish()
    }
}

impl TrustBundle {
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Self>, CaError> {
        let provider = crypto_provider();
        let (store, verifier) = build(&roots, &provider)?;
        Ok(Arc::new(Self {
            trust_domain,
            roots: ArcSwap::from_pointee(store),
            ders: ArcSwap::from_pointee(roots),
            client_verifier: ArcSwap::from_pointee(verifier),
            provider,
        }))
    }

    /// From a PEM bundle (as `GET /v1/ca/roots` serves it).
    pub fn from_pem(trust_domain: TrustDomain, pem_text: &str) -> Result<Arc<Self>, CaError> {
        let roots = crate::ca_dir::parse_certs(pem_text).map_err(CaError::InvalidRequest)?;
        Self::new(trust_domain, roots)
    }

    /// Replaces the roots; handshakes already verified are unaffected, new ones use the new set.
    pub fn update(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), CaError> {
        if **self.ders.load() == roots {
            return Ok(());
        }
        let (store, verifier) = build(&roots, &self.provider)?;
        self.roots.store(Arc::new(store));
        self.client_verifier.store(Arc::new(verifier));
        self.ders.store(Arc::new(roots));
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.ders.load_full()
    }

    /// Checks that `chain` (leaf first) verifies against these roots as a workload certificate of
    /// the trust domain, as a peer's mTLS verifier would check it.
    pub fn verify_chain(&self, chain: &[CertificateDer<'static>]) -> Result<(), CaError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| CaError::InvalidRequest("empty certificate chain".into()))?;
        let untrusted = |e: rustls::Error| {
            CaError::Mismatch(format!(
                "the certificate does not chain to the trusted roots: {e}"
            ))
        };
        self.client_verifier
            .load()
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(untrusted)?;
        self.check_spiffe(leaf, None).map_err(untrusted)?;
        Ok(())
    }

    /// A verifier for client certificates (mTLS server side). Client auth is mandatory.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(SpiffeClientVerifier {
            bundle: self.clone(),
        })
    }

    /// A verifier for server certificates: any SPIFFE id of the trust domain, or exactly
    /// `expected` when given.
    pub fn server_verifier(
        self: &Arc<Self>,
        expected: Option<SpiffeId>,
    ) -> Arc<dyn ServerCertVerifier> {
        Arc::new(SpiffeServerVerifier {
            bundle: self.clone(),
            expected,
        })
    }

    fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    fn check_spiffe(
        &self,
        end_entity: &CertificateDer<'_>,
        expected: Option<&SpiffeId>,
    ) -> Result<SpiffeId, rustls::Error> {
        let id = spiffe_id_of(end_entity).ok_or_else(|| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(SpiffeError(
                    "certificate carries no trellis SPIFFE id".into(),
                )),
            )))
        })?;
        if id.trust_domain() != &self.trust_domain {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(SpiffeError(format!(
                    "peer {id} is not in trust domain {}",
                    self.trust_domain
                )))),
            )));
        }
        if let Some(want) = expected
            && want != &id
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(SpiffeError(format!(
                    "peer is {id}, expected {want}"
                )))),
            )));
        }
        Ok(id)
    }
}

fn build(
    roots: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
) -> Result<(RootCertStore, Arc<dyn ClientCertVerifier>), CaError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| CaError::InvalidRequest(format!("trust bundle root: {e}")))?;
    }
    if store.is_empty() {
        return Err(CaError::InvalidRequest("trust bundle is empty".into()));
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(store.clone()), provider.clone())
            .build()
            .map_err(|e| CaError::InvalidRequest(format!("client verifier: {e}")))?;
    Ok((store, verifier))
}

#[derive(Debug)]
struct SpiffeError(String);
impl std::fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SpiffeError {}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: roots change at runtime, and trellis clients always send their one chain.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.bundle.client_verifier.load();
        inner.verify_client_cert(end_entity, intermediates, now)?;
        self.bundle.check_spiffe(end_entity, None)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.bundle.algs())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.bundle.algs())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.algs().supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let roots = self.bundle.roots.load();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.bundle.algs().all,
        )?;
        self.bundle
            .check_spiffe(end_entity, self.expected.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.bundle.algs())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.bundle.algs())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.algs().supported_schemes()
    }
}
