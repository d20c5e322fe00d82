//! An in-memory CA for tests, the demo and benchmarks: one call to get a trust domain with a
//! root and an intermediate, one call per identity.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use trellis_core::{NamespaceName, ServiceName, SpiffeId, TrustDomain};

use crate::authority::{Authority, Issued};
use crate::csr::VerifiedCsr;
use crate::error::CaError;
use crate::identity::{Credential, Identity};
use crate::policy::Policy;
use crate::renewer::{LocalRenewer, generate_key_and_csr};
use crate::trust::TrustBundle;

/// An issued identity as plain material (chain + PKCS#8 key), e.g. to write to files.
#[derive(Debug, Clone)]
pub struct IdentityMaterial {
    pub issued: Issued,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl IdentityMaterial {
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.issued.chain
    }
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
    pub fn credential(&self) -> Credential {
        Credential {
            chain: self.issued.chain.clone(),
            key: self.private_key(),
            roots: None,
        }
    }
}

/// An in-memory CA.
#[derive(Debug, Clone)]
pub struct EphemeralCa {
    authority: Authority,
}

impl EphemeralCa {
    /// A fresh root + intermediate for `trust_domain` (e.g. `"mesh.local"`).
    pub fn new(trust_domain: &str) -> Result<Self, CaError> {
        let td: TrustDomain = trust_domain
            .parse()
            .map_err(|e| CaError::InvalidRequest(format!("{e}")))?;
        Ok(Self {
            authority: Authority::in_memory(td, Policy::default())?,
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }
    pub fn trust_domain(&self) -> &TrustDomain {
        self.authority.trust_domain()
    }
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.authority.roots().to_vec()
    }
    pub fn roots_pem(&self) -> String {
        self.authority.roots_pem()
    }
    /// A trust bundle holding this CA's root.
    pub fn trust_bundle(&self) -> Result<Arc<TrustBundle>, CaError> {
        TrustBundle::new(self.trust_domain().clone(), self.roots())
    }

    pub fn spiffe_id(&self, namespace: &str, service: &str) -> Result<SpiffeId, CaError> {
        let ns: NamespaceName = namespace
            .parse()
            .map_err(|e| CaError::InvalidRequest(format!("{e}")))?;
        let svc: ServiceName = service
            .parse()
            .map_err(|e| CaError::InvalidRequest(format!("{e}")))?;
        Ok(SpiffeId::new(self.trust_domain().clone(), ns, svc))
    }

    /// Issues key + chain for `spiffe://<td>/ns/<namespace>/svc/<service>`.
    pub fn issue_material(
        &self,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<IdentityMaterial, CaError> {
        let id = self.spiffe_id(namespace, service)?;
        let (key, csr) = generate_key_and_csr()?;
        let issued = self.authority.issue(
            &VerifiedCsr::parse(csr.as_bytes())?,
            &id,
            ttl,
            true,
            "ephemeral",
        )?;
        Ok(IdentityMaterial {
            issued,
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        })
    }

    /// Issues with an explicit validity window (e.g. an already expired certificate).
    pub fn issue_material_with_validity(
        &self,
        namespace: &str,
        service: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IdentityMaterial, CaError> {
        let id = self.spiffe_id(namespace, service)?;
        let (key, csr) = generate_key_and_csr()?;
        let issued = self.authority.issue_with_validity(
            &VerifiedCsr::parse(csr.as_bytes())?,
            &id,
            not_before,
            not_after,
            "ephemeral",
        )?;
        Ok(IdentityMaterial {
            issued,
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        })
    }

    /// A self-renewing [`Identity`] backed by this CA (renewal not started: call
    /// [`Identity::spawn_renewal`]). Trusts this CA's root.
    pub async fn issue_identity(
        &self,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<Arc<Identity>, CaError> {
        let id = self.spiffe_id(namespace, service)?;
        let renewer = LocalRenewer::new(self.authority.clone(), id, ttl);
        Identity::new(renewer, self.trust_bundle()?).await
    }
}
