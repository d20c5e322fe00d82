//! trellis-ca: the built-in private CA.
//!
//! What it does: keeps a root and an intermediate (or an externally signed intermediate),
//! signs workload certificates for SPIFFE identities from verified CSRs, records every issuance
//! durably (index + audit log), revokes and publishes a CRL, serves all of it over HTTP (native
//! API and an AWS Private CA-compatible JSON API), and gives workloads a self-renewing
//! [`Identity`] with rustls resolvers and SPIFFE-aware verifiers.
//!
//! What it does not do: OCSP, ACME, name constraints, HSM keys.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
mod authority;
mod ca_dir;
mod commit;
pub mod cp_client;
mod csr;
mod ephemeral;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod identity;
mod journal;
mod metrics;
mod policy;
mod renewer;
mod serial;
mod state;
mod token;
mod trust;

pub use authority::{AuditRecord, Authority, IndexRecord, Issued, RevokeReason};
pub use ca_dir::{CaConfig, CaDir, parse_certs, read_certs};
pub use csr::{KeyKind, VerifiedCsr};
pub use ephemeral::{EphemeralCa, IdentityMaterial};
pub use error::CaError;
pub use identity::{Credential, Identity, RenewFuture, Renewer, renew_delay};
pub use metrics::CaMetrics;
pub use policy::{DnsSans, Policy, parse_duration};
pub use renewer::{FileRenewer, HttpRenewer, LocalRenewer, generate_key_and_csr};
pub use serial::Serial;
pub use state::CaState;
pub use token::{AuthError, NewToken, Scope, TokenRecord, Tokens};
pub use trust::{TrustBundle, crypto_provider, peer_spiffe_id, spiffe_id_of};
