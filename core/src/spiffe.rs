//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::{NameError, NamespaceName, ServiceName, TrustDomain};

/// Why a string is not a trellis SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("SPIFFE id {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "SPIFFE id {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/svc/<service>"
    )]
    Shape(String),
    #[error("SPIFFE id {id:?}: {source}")]
    Name {
        id: String,
        #[source]
        source: NameError,
    },
}

/// A workload identity as trellis issues it. Only this path shape is accepted, so an id always
/// names exactly one (trust domain, namespace, service).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: NamespaceName,
    service: ServiceName,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, namespace: NamespaceName, service: ServiceName) -> Self {
        Self {
            trust_domain,
            namespace,
            service,
        }
    }
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &NamespaceName {
        &self.namespace
    }
    pub fn service(&self) -> &ServiceName {
        &self.service
    }
    /// The URI form, as written into the certificate's URI SAN.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }

    /// The control plane's own identity in `trust_domain`
    /// (`spiffe://<td>/ns/trellis-system/svc/control-plane`), presented by its HTTPS API and
    /// checked by every client of it. The CA's APIs never issue it (see [`Self::is_reserved`]).
    pub fn control_plane(trust_domain: TrustDomain) -> Self {
        let (Ok(namespace), Ok(service)) = (
            CONTROL_PLANE_NAMESPACE.parse(),
            CONTROL_PLANE_SERVICE.parse(),
        ) else {
            unreachable!("the control plane's names are valid constants (tested)")
        };
        Self {
            trust_domain,
            namespace,
            service,
        }
    }

    /// Whether (namespace, service) is the control plane's own identity, which no token may
    /// obtain: a workload holding it could pose as the control plane.
    pub fn is_reserved(namespace: &NamespaceName, service: &ServiceName) -> bool {
        namespace.as_str() == CONTROL_PLANE_NAMESPACE && service.as_str() == CONTROL_PLANE_SERVICE
    }
}

/// Namespace of the control plane's own identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "trellis-system";
/// Service of the control plane's own identity.
pub const CONTROL_PLANE_SERVICE: &str = "control-plane";

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/svc/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("svc"), Some(svc), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::Shape(s.to_owned()));
        };
        let name_err = |source| SpiffeIdError::Name {
            id: s.to_owned(),
            source,
        };
        Ok(Self {
            trust_domain: td.parse().map_err(name_err)?,
            namespace: ns.parse().map_err(name_err)?,
            service: svc.parse().map_err(name_err)?,
        })
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "spiffe://mesh.local/ns/my-app/svc/api";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "mesh.local");
        assert_eq!(id.namespace().as_str(), "my-app");
        assert_eq!(id.service().as_str(), "api");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn the_control_plane_identity_is_a_valid_reserved_id() {
        let td: TrustDomain = "mesh.local".parse().unwrap();
        let cp = SpiffeId::control_plane(td);
        assert_eq!(
            cp.to_string(),
            "spiffe://mesh.local/ns/trellis-system/svc/control-plane"
        );
        assert_eq!(cp.to_string().parse::<SpiffeId>().unwrap(), cp);
        assert!(SpiffeId::is_reserved(cp.namespace(), cp.service()));
        let app: SpiffeId = "spiffe://mesh.local/ns/trellis-system/svc/api"
            .parse()
            .unwrap();
        assert!(!SpiffeId::is_reserved(app.namespace(), app.service()));
    }

    #[test]
    fn rejects() {
        for bad in [
            "http://mesh.local/ns/a/svc/b",
            "spiffe://mesh.local/ns/a/svc/b/extra",
            "spiffe://mesh.local/ns/a/service/b",
            "spiffe://mesh.local/ns//svc/b",
            "spiffe://Mesh.local/ns/a/svc/b",
            "spiffe://mesh.local/ns/a/svc/b c",
            "spiffe://mesh.local",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
