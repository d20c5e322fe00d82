//! PKCS#10 CSR intake: parse, verify the self-signature, and accept only strong keys.
//!
//! Only the public key is taken from a CSR; the CA decides the subject and every extension.

use rcgen::SubjectPublicKeyInfo;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::error::CaError;

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest CSR accepted, in bytes (PEM or DER).
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// The key family of an accepted CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Ed25519,
    Rsa { bits: usize },
}

/// A CSR whose signature verified and whose key passed the policy.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    pub(crate) spki: SubjectPublicKeyInfo,
    pub(crate) kind: KeyKind,
    pub(crate) common_name: Option<String>,
}

impl VerifiedCsr {
    /// Parse a CSR from PEM (`-----BEGIN CERTIFICATE REQUEST-----`) or raw DER bytes.
    pub fn parse(input: &[u8]) -> Result<Self, CaError> {
        if input.len() > MAX_CSR_BYTES {
            return Err(CaError::MalformedCsr(format!(
                "CSR is {} bytes, more than {MAX_CSR_BYTES}",
                input.len()
            )));
        }
        let trimmed = input.trim_ascii_start();
        if trimmed.starts_with(b"-----") {
            let p = pem::parse(trimmed).map_err(|e| CaError::MalformedCsr(e.to_string()))?;
            if p.tag() != "CERTIFICATE REQUEST" && p.tag() != "NEW CERTIFICATE REQUEST" {
                return Err(CaError::MalformedCsr(format!(
                    "PEM block is {:?}, expected CERTIFICATE REQUEST",
                    p.tag()
                )));
            }
            Self::from_der(p.contents())
        } else {
            Self::from_der(input)
        }
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CaError> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CaError::MalformedCsr("trailing bytes after the CSR".into()));
        }
        let spki = &csr.certification_request_info.subject_pki;
        let kind = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let bits = rsa.key_size();
                if bits < MIN_RSA_BITS {
                    return Err(CaError::WeakKey(format!(
                        "RSA-{bits} is below the minimum RSA-{MIN_RSA_BITS}"
                    )));
                }
                KeyKind::Rsa { bits }
            }
            Ok(PublicKey::EC(_)) if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok());
                if curve.as_ref() != Some(&OID_EC_P256) {
                    return Err(CaError::WeakKey(
                        "only the P-256 curve is accepted for ECDSA keys".into(),
                    ));
                }
                KeyKind::EcdsaP256
            }
            _ if spki.algorithm.algorithm == OID_SIG_ED25519 => KeyKind::Ed25519,
            _ => {
                return Err(CaError::WeakKey(format!(
                    "unsupported key algorithm {} (accepted: ECDSA P-256, Ed25519, RSA >= {MIN_RSA_BITS})",
                    spki.algorithm.algorithm
                )));
            }
        };
        // Key policy first (so a weak key is reported as such), then the self-signature.
        csr.verify_signature()
            .map_err(|_| CaError::BadCsrSignature)?;
        let spki = SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| CaError::WeakKey(format!("unsupported public key: {e}")))?;
        let common_name = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(Self {
            spki,
            kind,
            common_name,
        })
    }

    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }
    /// The CSR subject's CN (informational only: the CA decides the subject).
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(key: &KeyPair) -> String {
        CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn accepts_p256_and_ed25519() {
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            VerifiedCsr::parse(csr_for(&k).as_bytes()).unwrap().kind,
            KeyKind::EcdsaP256
        );
        let k = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            VerifiedCsr::parse(csr_for(&k).as_bytes()).unwrap().kind,
            KeyKind::Ed25519
        );
    }

    #[test]
    fn mutated_csrs_never_panic() {
        use rand::Rng;
        let k = KeyPair::generate().unwrap();
        let der = CertificateParams::default()
            .serialize_request(&k)
            .unwrap()
            .der()
            .to_vec();
        let mut rng = rand::rng();
        let mut accepted = 0;
        for _ in 0..2000 {
            let mut m = der.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            if rng.random_bool(0.1) {
                m.truncate(rng.random_range(0..m.len()));
            }
            if VerifiedCsr::from_der(&m).is_ok() {
                accepted += 1;
            }
        }
        // A mutation can hit an unsigned, ignored byte; anything more means no signature check.
        assert!(accepted < 100, "{accepted}");
    }

    #[test]
    fn rejects_p384() {
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            VerifiedCsr::parse(csr_for(&k).as_bytes()),
            Err(CaError::WeakKey(_))
        ));
    }

    #[test]
    fn rejects_bad_signature_and_garbage() {
        let k = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&k).unwrap();
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 5] ^= 0x01; // inside the signature
        assert!(matches!(
            VerifiedCsr::from_der(&der),
            Err(CaError::BadCsrSignature) | Err(CaError::MalformedCsr(_))
        ));
        assert!(matches!(
            VerifiedCsr::parse(b"not a csr"),
            Err(CaError::MalformedCsr(_))
        ));
        assert!(
            VerifiedCsr::parse(
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err()
        );
    }
}
