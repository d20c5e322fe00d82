//! trellis-core: the vocabulary every trellis crate shares.
//!
//! What it holds: validated names ([`NamespaceName`], [`ServiceName`], [`TrustDomain`]), workload
//! identities ([`SpiffeId`]), the endpoint-set wire type of the discovery watch API ([`EndpointSet`]),
//! health state ([`HealthStatus`]), intentions as service tags state them ([`intentions`]), outbound routes as data and as pushed service attributes ([`route_spec`]) and AWS SigV4 verification ([`sigv4`]) for the AWS-compatible
//! APIs. What it does not hold: any I/O, any async runtime, any TLS.
//! Strings from the edge become these types once; inner code never re-checks them.

mod endpoint;
#[doc(hidden)]
pub mod fuzz;
mod health;
pub mod intentions;
mod name;
pub mod route_spec;
pub mod sigv4;
mod spiffe;

pub use endpoint::{Endpoint, EndpointSet};
pub use health::HealthStatus;
pub use name::{NameError, NamespaceName, ServiceName, TrustDomain};
pub use spiffe::{CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE, SpiffeId, SpiffeIdError};
