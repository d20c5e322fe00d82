//! trellis-discovery: the control plane.
//!
//! What it does: a Cloud Map-compatible registry (AWS JSON 1.1 API, SigV4), a long-poll watch API
//! for sidecars (`GET /v1/watch/<namespace>/<service>`), an authoritative DNS server over the DNS
//! namespaces (hickory-server), active/custom/TTL health checks, and an embedded crash-safe store or
//! etcd (several replicas serving one registry, each from an in-memory view fed by an etcd watch).
//! What it does not do: proxy traffic (that is `trellis-proxy`) or run a consensus of its own.
//!
//! Without the default `server` feature only the client-side types build (the wire error table).

mod error;

#[cfg(feature = "server")]
mod api;
#[cfg(feature = "server")]
mod ca_mount;
#[cfg(feature = "server")]
mod dns;
#[cfg(feature = "server")]
mod dns_tcp;
#[cfg(feature = "server")]
mod dns_udp;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod fuzz;
#[cfg(feature = "server")]
mod health;
#[cfg(feature = "server")]
pub mod health_settings;
#[cfg(feature = "server")]
mod health_tls;
#[cfg(feature = "server")]
mod http;
#[cfg(feature = "server")]
mod metrics;
#[cfg(feature = "server")]
mod mmsg;
#[cfg(feature = "server")]
pub mod model;
#[cfg(feature = "server")]
mod registry;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
mod sigv4;
#[cfg(feature = "server")]
mod store;
#[cfg(feature = "server")]
mod throttle;

pub use error::ApiError;
pub use trellis_core::{Endpoint, EndpointSet, HealthStatus};

#[cfg(feature = "server")]
pub use {
    health::HealthConfig,
    http::{Auth, MAX_BODY, Mount},
    registry::{Registry, RegistryConfig},
    server::{ApiTls, Server, ServerConfig, ServerError, run},
    sigv4::Credentials,
    store::{
        DEFAULT_LEASE_TTL, EtcdConfig, EtcdStore, EtcdTls, FeedSink, MemoryStore, RedbStore,
        SCHEMA, STORE_FILE, Store, StoreError, StoreSpec, StoreSpecError, Write, migrate,
    },
    throttle::RateLimit,
};

/// The watch API path for a service (what the sidecar polls).
pub fn watch_path(
    namespace: &str,
    service: &str,
    revision: Option<u64>,
    wait: std::time::Duration,
) -> String {
    match revision {
        Some(r) => format!(
            "/v1/watch/{namespace}/{service}?revision={r}&wait={}s",
            wait.as_secs()
        ),
        None => format!("/v1/watch/{namespace}/{service}?wait={}s", wait.as_secs()),
    }
}
