//! trellis-proxy: the data plane. `trellis-proxy sidecar` runs beside one app instance: plain
//! HTTP/TCP from the app, discovery-driven load balancing with retries, timeouts, circuit breaking
//! and outlier ejection to upstreams, and an inbound listener in front of the app.
//!
//! What it does not do: run the control plane (it only calls the discovery watch API over HTTP),
//! or own a second route matcher: outbound routes (`outbound.rs`) compile into the `route/` engine
//! the internal LB uses.
//!
//! Reusable pieces for the internal load balancer: [`Pick`] balancers, [`Cluster`] (endpoints +
//! resilience state), [`forward`] (the request path), [`UpstreamClient`], [`Admin`], listeners and
//! [`relay_tcp`].

mod admin;
mod authz;
mod balance;
mod body;
pub mod buffered;
mod circuit;
mod client;
mod clock;
mod cluster;
mod config;
mod deregister;
mod egress;
mod endpoint;
mod env;
mod error;
mod fnv;
mod forward;
#[doc(hidden)]
pub mod fuzz;
mod h1;
pub mod intercept;
pub mod lb;
mod listener;
mod live_intentions;
mod live_routes;
mod metrics;
mod outbound;
mod outlier;
pub mod overload;
mod pool;
mod relay;
mod retry;
pub mod route;
mod server;
mod shared_timer;
mod sidecar;
mod splice;
mod tls;
mod watch;

pub use admin::{Admin, Health};
pub use authz::authorize;
pub use balance::{LeastRequest, PeakEwma, Pick, RoundRobin, Weighted, balancer};
pub use body::ProxyBody;
pub use circuit::Breaker;
pub use client::UpstreamClient;
pub use cluster::{Cluster, ClusterStatus, EndpointSpec, EndpointStatus, Snapshot};
pub use config::{
    AdminConfig, BalancerKind, Config, ControlPlaneConfig, Decision, HeaderMatchConfig,
    IdentityConfig, InboundConfig, IntentionRule, Intentions, LimitsConfig, OutboundConfig,
    Protocol, ResilienceConfig, RouteConfig, RouteMatch, RouteTarget, RuntimeConfig, StaticCluster,
    StaticEndpoint, UnknownDestination, UpstreamConfig,
};
pub use deregister::{DeregisterError, Deregistration};
pub use endpoint::{EndpointState, InFlight, OwnedInFlight};
pub use env::{EnvSource, MapEnv, ProcessEnv};
pub use error::{BodyError, ConfigError, ProxyError, Side, StartError};
pub use forward::{ForwardPolicy, Target, error_response, forward, strip_hop_by_hop};
pub use listener::{AcceptContext, bind_reuseport, original_dst, spawn_accept};
pub use metrics::{Metrics, UpstreamMetrics};
pub use outbound::{RouteTables, Router, Subset, compile as compile_routes, subset_name};
pub use outlier::{OutlierPolicy, Verdict};
pub use relay::{COPY_BUF_SIZE, relay_copy, relay_tcp};
pub use retry::{RetryBudget, is_idempotent};
pub use server::{HttpMode, HttpServer, builder as http_builder, serve};
pub use sidecar::{APP_CLUSTER, Running, StartOptions, run, start, start_with};
pub use tls::{ALPN_H2, ALPN_HTTP1, InboundTls, MtlsConnector, MtlsIo, client_config};
pub use watch::{WatchSink, WatchTarget, apply as apply_endpoint_set, run as watch_endpoints};
