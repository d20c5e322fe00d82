//! The CA directory: layout, `init`, bring-your-own-root, and strict loading.
//!
//! ```text
//! ca.json              trust domain + policy
//! root.crt root.key    self-signed root (root.key absent with --external-root)
//! intermediate.key     signing key (PKCS#8 PEM, 0600)
//! intermediate.csr     only with --external-root, until install-intermediate
//! intermediate.crt     signs every workload certificate and the CRL
//! bundle.pem           extra trusted roots (root rotation), optional
//! index.jsonl          issuance/revocation index (append-only, fsynced)
//! audit.jsonl          audit log (append-only, fsynced)
//! crl.pem              current CRL
//! token.key tokens.jsonl  scoped credentials
//! ```

use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use trellis_core::TrustDomain;

use crate::authority::{Authority, Hierarchy, IndexRecord, Parts, intermediate_params, to_pem};
use crate::error::CaError;
use crate::journal;
use crate::policy::Policy;
use crate::token::Tokens;

pub const CONFIG: &str = "ca.json";
pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
pub const INTERMEDIATE_CERT: &str = "intermediate.crt";
pub const INTERMEDIATE_KEY: &str = "intermediate.key";
pub const INTERMEDIATE_CSR: &str = "intermediate.csr";
pub const BUNDLE: &str = "bundle.pem";
pub const INDEX: &str = "index.jsonl";
pub const AUDIT: &str = "audit.jsonl";
pub const CRL: &str = "crl.pem";

/// `ca.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub external_root: bool,
}

/// A CA directory on disk.
#[derive(Debug, Clone)]
pub struct CaDir {
    path: PathBuf,
}

impl CaDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether a CA (initialised, or waiting for its external intermediate) lives here.
    pub fn exists(&self) -> bool {
        self.file(CONFIG).exists()
    }
    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn refuse_existing(&self) -> Result<(), CaError> {
        for name in [CONFIG, ROOT_KEY, INTERMEDIATE_KEY, INDEX] {
            let p = self.file(name);
            if p.exists() {
                return Err(CaError::AlreadyExists(p));
            }
        }
        std::fs::create_dir_all(&self.path).map_err(|e| CaError::io(&self.path, e))
    }

    /// Creates a root and an intermediate signed by it. Refuses to touch an existing CA.
    pub fn init(&self, trust_domain: TrustDomain, policy: Policy) -> Result<Authority, CaError> {
        self.refuse_existing()?;
        let h = Hierarchy::generate(&trust_domain)?;
        journal::write_new(
            &self.file(ROOT_KEY),
            h.root_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        journal::write_new(
            &self.file(INTERMEDIATE_KEY),
            h.intermediate_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        journal::write_new(
            &self.file(ROOT_CERT),
            to_pem("CERTIFICATE", &h.root).as_bytes(),
            0o644,
        )?;
        journal::write_new(
            &self.file(INTERMEDIATE_CERT),
            to_pem("CERTIFICATE", &h.intermediate).as_bytes(),
            0o644,
        )?;
        Tokens::init_dir(&self.path)?;
        self.write_config(&CaConfig {
            trust_domain,
            policy,
            external_root: false,
        })?;
        self.open()
    }

    /// Bring-your-own-root: creates the intermediate key and writes `intermediate.csr` for an
    /// external root to sign. Returns the CSR path.
    pub fn init_external_root(
        &self,
        trust_domain: TrustDomain,
        policy: Policy,
    ) -> Result<PathBuf, CaError> {
        self.refuse_existing()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = intermediate_params(&trust_domain, OffsetDateTime::now_utc());
        // A CSR carries neither serial nor AKI.
        params.serial_number = None;
        params.use_authority_key_identifier_extension = false;
        let csr = params.serialize_request(&key)?.pem()?;
        journal::write_new(
            &self.file(INTERMEDIATE_KEY),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        let csr_path = self.file(INTERMEDIATE_CSR);
        journal::write_new(&csr_path, csr.as_bytes(), 0o644)?;
        Tokens::init_dir(&self.path)?;
        self.write_config(&CaConfig {
            trust_domain,
            policy,
            external_root: true,
        })?;
        Ok(csr_path)
    }

    /// Installs the externally signed intermediate after checking that it is a CA certificate
    /// for our key and that it chains to `root_pem`.
    pub fn install_intermediate(
        &self,
        cert_pem: &str,
        root_pem: &str,
    ) -> Result<Authority, CaError> {
        let cert_path = self.file(INTERMEDIATE_CERT);
        if cert_path.exists() {
            return Err(CaError::AlreadyExists(cert_path));
        }
        let key = self.load_key(INTERMEDIATE_KEY)?;
        let cert = parse_one_cert(cert_pem)
            .map_err(|e| CaError::Mismatch(format!("intermediate: {e}")))?;
        let root = parse_one_cert(root_pem).map_err(|e| CaError::Mismatch(format!("root: {e}")))?;
        let (_, x) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| CaError::Mismatch(format!("intermediate: {e}")))?;
        if x.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Mismatch(format!(
                "the certificate's public key is not the key in {}",
                self.file(INTERMEDIATE_KEY).display()
            )));
        }
        if !x.is_ca() {
            return Err(CaError::Mismatch(
                "the certificate is not a CA certificate".into(),
            ));
        }
        let (_, r) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| CaError::Mismatch(format!("root: {e}")))?;
        x.verify_signature(Some(r.public_key()))
            .map_err(|_| CaError::Mismatch("the intermediate is not signed by this root".into()))?;
        journal::write_new(
            &self.file(ROOT_CERT),
            to_pem("CERTIFICATE", &root).as_bytes(),
            0o644,
        )?;
        journal::write_new(&cert_path, to_pem("CERTIFICATE", &cert).as_bytes(), 0o644)?;
        self.open()
    }

    /// Signs the intermediate CSR of another CA directory (a control-plane replica that ran
    /// `init --external-root`) with this directory's root: one root, an intermediate per replica,
    /// so a leaf from any replica verifies against the same trust bundle. Returns the certificate
    /// PEM for `install-intermediate`. Needs `root.key` here (keep this directory offline).
    pub fn sign_intermediate(&self, csr_pem: &str) -> Result<String, CaError> {
        let config = self.config()?;
        let root_key = self.load_key(ROOT_KEY)?;
        let root = self.load_cert(ROOT_CERT)?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&root, root_key)?;
        let csr = crate::csr::VerifiedCsr::parse(csr_pem.as_bytes())?;
        let cert = intermediate_params(&config.trust_domain, OffsetDateTime::now_utc())
            .signed_by(&csr.spki, &issuer)?;
        Ok(to_pem("CERTIFICATE", cert.der()))
    }

    fn write_config(&self, c: &CaConfig) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(c).map_err(|e| CaError::Internal(e.to_string()))?;
        journal::write_new(&self.file(CONFIG), &json, 0o644)
    }

    pub fn config(&self) -> Result<CaConfig, CaError> {
        let p = self.file(CONFIG);
        if !p.exists() {
            return Err(CaError::NotInitialized(self.path.clone()));
        }
        let text = journal::read_text(&p)?;
        serde_json::from_str(&text).map_err(|e| CaError::corrupt(&p, e))
    }

    fn load_key(&self, name: &str) -> Result<KeyPair, CaError> {
        let p = self.file(name);
        let text = journal::read_text(&p)?;
        KeyPair::from_pem(&text)
            .map_err(|e| CaError::corrupt(&p, format!("not a PKCS#8 PEM key: {e}")))
    }

    fn load_cert(&self, name: &str) -> Result<CertificateDer<'static>, CaError> {
        let p = self.file(name);
        let text = journal::read_text(&p)?;
        let der = parse_one_cert(&text).map_err(|e| CaError::corrupt(&p, e))?;
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::corrupt(&p, format!("not an X.509 certificate: {e}")))?;
        Ok(der)
    }

    /// The extra trusted roots in `bundle.pem` (root rotation).
    fn load_bundle(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let p = self.file(BUNDLE);
        if !p.exists() {
            return Ok(Vec::new());
        }
        let text = journal::read_text(&p)?;
        if text.trim().is_empty() {
            // Every extra root was removed again.
            return Ok(Vec::new());
        }
        parse_certs(&text).map_err(|e| CaError::corrupt(&p, e))
    }

    /// The trust bundle this CA serves: its root first, then the extra roots of `bundle.pem`.
    pub fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut roots = vec![self.load_cert(ROOT_CERT)?];
        for c in self.load_bundle()? {
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
        Ok(roots)
    }

    /// Adds a root to the trust bundle served by this CA (step 1 of a root rotation).
    pub fn bundle_add(&self, root_pem: &str) -> Result<(), CaError> {
        let new = parse_certs(root_pem).map_err(CaError::InvalidRequest)?;
        let mut all = self.load_bundle()?;
        for c in new {
            if !all.contains(&c) {
                all.push(c);
            }
        }
        self.write_bundle(&all)
    }

    /// Removes a root from the extra trust bundle (last step of a root rotation).
    pub fn bundle_remove(&self, root_pem: &str) -> Result<(), CaError> {
        let gone = parse_certs(root_pem).map_err(CaError::InvalidRequest)?;
        let all: Vec<_> = self
            .load_bundle()?
            .into_iter()
            .filter(|c| !gone.contains(c))
            .collect();
        self.write_bundle(&all)
    }

    fn write_bundle(&self, all: &[CertificateDer<'static>]) -> Result<(), CaError> {
        let pem: String = all.iter().map(|c| to_pem("CERTIFICATE", c)).collect();
        journal::write_atomic(&self.file(BUNDLE), pem.as_bytes(), 0o644)
    }

    /// Loads the CA. Every file is checked; any damage is an error naming the file.
    pub fn open(&self) -> Result<Authority, CaError> {
        let config = self.config()?;
        if !self.file(INTERMEDIATE_CERT).exists() {
            if config.external_root {
                return Err(CaError::IntermediatePending(self.path.clone()));
            }
            return Err(CaError::corrupt(self.file(INTERMEDIATE_CERT), "missing"));
        }
        let intermediate_key = self.load_key(INTERMEDIATE_KEY)?;
        let intermediate = self.load_cert(INTERMEDIATE_CERT)?;
        let root = self.load_cert(ROOT_CERT)?;
        if !config.external_root {
            // The root key must be intact too, even though day-to-day signing never uses it.
            self.load_key(ROOT_KEY)?;
        }
        let (_, ix) = x509_parser::parse_x509_certificate(&intermediate)
            .map_err(|e| CaError::corrupt(self.file(INTERMEDIATE_CERT), e))?;
        if ix.public_key().raw != intermediate_key.subject_public_key_info().as_slice() {
            return Err(CaError::corrupt(
                self.file(INTERMEDIATE_KEY),
                format!(
                    "key does not match {}",
                    self.file(INTERMEDIATE_CERT).display()
                ),
            ));
        }
        let (_, rx) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| CaError::corrupt(self.file(ROOT_CERT), e))?;
        let root_not_after = Some(rx.validity().not_after.to_datetime());
        let mut roots = vec![root];
        for c in self.load_bundle()? {
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
        let index: Vec<IndexRecord> = journal::read_all(&self.file(INDEX))?;
        // Parse the audit log as well: a damaged audit log must stop the CA, not be appended to.
        let _: Vec<crate::authority::AuditRecord> = journal::read_all(&self.file(AUDIT))?;
        let journals = crate::state::JournalState::open(self.path.clone())?;
        let index_path = self.file(INDEX);
        Authority::from_parts(Parts {
            trust_domain: config.trust_domain,
            policy: config.policy,
            intermediate_key,
            intermediate,
            roots,
            root_not_after,
            files: Some((self.path.clone(), journals)),
            index,
        })
        .map_err(|e| match e {
            CaError::InvalidRequest(d) | CaError::UnknownSerial(d) => {
                CaError::corrupt(index_path, d)
            }
            other => other,
        })
    }

    pub fn tokens(&self) -> Result<Tokens, CaError> {
        Tokens::open(&self.path)
    }
}

/// Parses exactly one PEM certificate.
pub(crate) fn parse_one_cert(pem_text: &str) -> Result<CertificateDer<'static>, String> {
    let mut certs = parse_certs(pem_text)?;
    if certs.len() != 1 {
        return Err(format!("expected one certificate, found {}", certs.len()));
    }
    Ok(certs.remove(0))
}

/// Reads a PEM file's certificates ([`parse_certs`]); errors name the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_certs(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses every PEM `CERTIFICATE` block; at least one.
pub fn parse_certs(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("bad PEM: {e}"))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    }
    Ok(certs)
}
