//! Typed sidecar configuration: TOML (`--config`) and the same keys from `TRELLIS_*` variables.
//!
//! Environment keys map to TOML paths with `__` between levels:
//! `TRELLIS_IDENTITY__SERVICE=web` is `[identity] service = "web"`, and values are TOML values when
//! they parse as one (`TRELLIS_OUTBOUND__UPSTREAMS='[{service="api",local_port=9191}]'`), else strings.
//! Environment settings override the file. Units are converted here ("250ms" → `Duration`); inner
//! code never re-checks a value.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_core::{NamespaceName, ServiceName, TrustDomain};

use crate::env::EnvSource;
use crate::error::ConfigError;

/// The whole sidecar configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub identity: IdentityConfig,
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Clusters with fixed endpoints, for running without a control plane.
    #[serde(default)]
    pub clusters: Vec<StaticCluster>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub resilience: ResilienceConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub namespace: NamespaceName,
    pub service: ServiceName,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: TrustDomain,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(try_from = "ControlPlaneFile")]
pub struct ControlPlaneConfig {
    /// `host:port` of the control plane's HTTP API (watch + sign): the first of `addresses`.
    pub address: HostPort,
    /// Every control-plane replica, in order of preference (`address` and/or `addresses` in the
    /// file), as IP addresses or DNS names. Watches move to the next on error and resume from
    /// the last revision.
    pub addresses: Vec<HostPort>,
    /// Join token for the first certificate; redacted in `/config`.
    #[serde(serialize_with = "redact")]
    pub token: Option<String>,
    /// File holding the join token (e.g. written by `trellis-ca token create --out`), read at
    /// start when `token` is not set.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file with the mesh's root certificate(s) (the CA's `root.crt`). When set, only these
    /// roots are trusted and every certificate the control plane returns must chain to them;
    /// when unset, the roots are fetched from the control plane (trust on first use).
    pub trust_bundle: Option<std::path::PathBuf>,
    /// The same roots as PEM text instead of a file (for task definitions: an environment
    /// variable from an SSM parameter, no volume needed). At most one of the two.
    pub trust_bundle_pem: Option<String>,
    /// Reach the control plane over HTTPS (`trellis-discovery serve --api-tls`): its certificate
    /// must carry the control plane's SPIFFE id and chain to `trust_bundle` (required then).
    pub tls: bool,
    /// This instance's id in discovery (Cloud Map `InstanceId`). When set, SIGTERM deregisters it
    /// (`DeregisterInstance`) before the listeners stop accepting, so peers stop picking it.
    pub instance_id: Option<String>,
    /// The Cloud Map `ServiceId` of `identity.service`; looked up by namespace + service name
    /// (`ListNamespaces` + `ListServices`) when not set.
    pub service_id: Option<String>,
    /// How long one watch request is held by the server.
    #[serde(with = "humantime_serde")]
    pub watch_wait: Duration,
}

/// `host:port` of a server the proxy dials (the control plane): an IP address or a DNS name,
/// resolved at each connection (so a Cloud Map or compose service name follows its records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort(http::uri::Authority);

impl HostPort {
    pub fn authority(&self) -> &http::uri::Authority {
        &self.0
    }

    /// Whether the host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        let host = self.0.host().trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => host.eq_ignore_ascii_case("localhost"),
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not host:port (an IP address or DNS name, and a port)");
        let a: http::uri::Authority = s.parse().map_err(|_| bad())?;
        let host = a.host().trim_start_matches('[').trim_end_matches(']');
        let name_ok = host.parse::<std::net::IpAddr>().is_ok()
            || (!host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }));
        if s.contains('@') || !name_ok || !matches!(a.port_u16(), Some(p) if p > 0) {
            return Err(bad());
        }
        Ok(HostPort(a))
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.0.to_string()
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `[control_plane]` as written: `address` (one replica) and/or `addresses` (several).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneFile {
    #[serde(default)]
    address: Option<HostPort>,
    #[serde(default)]
    addresses: Vec<HostPort>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<std::path::PathBuf>,
    #[serde(default)]
    trust_bundle: Option<std::path::PathBuf>,
    #[serde(default)]
    trust_bundle_pem: Option<String>,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    service_id: Option<String>,
    #[serde(default = "default_watch_wait", with = "humantime_serde")]
    watch_wait: Duration,
}

impl TryFrom<ControlPlaneFile> for ControlPlaneConfig {
    type Error = String;
    fn try_from(f: ControlPlaneFile) -> Result<Self, String> {
        let mut addresses: Vec<HostPort> = f.address.into_iter().collect();
        for a in f.addresses {
            if !addresses.contains(&a) {
                addresses.push(a);
            }
        }
        let Some(address) = addresses.first().cloned() else {
            return Err("control_plane needs `address` or `addresses`".into());
        };
        if f.trust_bundle.is_some() && f.trust_bundle_pem.is_some() {
            return Err(
                "control_plane: give trust_bundle (a file) or trust_bundle_pem (the PEM text), not both"
                    .into(),
            );
        }
        if f.tls && f.trust_bundle.is_none() && f.trust_bundle_pem.is_none() {
            return Err(
                "control_plane.tls needs control_plane.trust_bundle (the mesh's root.crt) or trust_bundle_pem to verify the control plane"
                    .into(),
            );
        }
        Ok(ControlPlaneConfig {
            address,
            addresses,
            token: f.token,
            token_file: f.token_file,
            trust_bundle: f.trust_bundle,
            trust_bundle_pem: f.trust_bundle_pem,
            tls: f.tls,
            instance_id: f.instance_id,
            service_id: f.service_id,
            watch_wait: f.watch_wait,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Public address other sidecars connect to.
    pub listen: SocketAddr,
    /// The local app this sidecar fronts (loopback).
    pub app: SocketAddr,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Accept plaintext connections instead of requiring mTLS. Dangerous: only for local development
    /// and for tests of the plain hot path.
    #[serde(default)]
    pub danger_allow_plaintext: bool,
    /// Header carrying the verified peer identity to the app.
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
    #[serde(default)]
    pub intentions: Intentions,
}

/// Authorization of source services calling this one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Intentions {
    #[serde(default = "default_decision")]
    pub default: Decision,
    #[serde(default)]
    pub rules: Vec<IntentionRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IntentionRule {
    /// Source service name, or `*` for any.
    pub source: String,
    /// Source namespace; any when absent.
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
    pub action: Decision,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Egress listener that routes by `Host` (`api.my-app.local`, `api`).
    #[serde(default)]
    pub egress_listen: Option<SocketAddr>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// What the egress listener does with an intercepted connection (iptables `REDIRECT`) whose
    /// original destination is no known upstream: relay it there unchanged, refuse it, or serve
    /// it as HTTP routed by `Host`.
    #[serde(default)]
    pub unknown_destination: UnknownDestination,
    /// Routes that split one upstream's traffic over upstream clusters (App Mesh routes): checked
    /// in priority order; an upstream's traffic that no route matches goes to its own cluster.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDestination {
    /// Relay the bytes to the original destination (Envoy's `ORIGINAL_DST` passthrough).
    #[default]
    Passthrough,
    /// Close the connection.
    Refuse,
    /// Serve HTTP and route by `Host` like a direct connection.
    Host,
}

/// An address the app may dial for an upstream: `ip` (any port) or `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Destination {
    Socket(SocketAddr),
    Ip(std::net::IpAddr),
}

impl Destination {
    pub fn matches(self, addr: SocketAddr) -> bool {
        match self {
            Destination::Socket(s) => s == addr,
            Destination::Ip(ip) => ip == addr.ip(),
        }
    }
}

/// One outbound route (App Mesh `httpRoute` parity).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The upstream whose traffic this route takes (its `Host` names on the egress listener and
    /// its local port).
    pub upstream: ServiceName,
    /// Shown in logs; `routes[i]` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// 1–50000, lowest first; routes without one come after, in the order written.
    #[serde(default)]
    pub priority: Option<u32>,
    /// All given fields must match; none given matches every request.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Weighted clusters (each an upstream's service name), weights 0–999.
    pub targets: Vec<RouteTarget>,
}

pub use trellis_core::route_spec::{HeaderMatchConfig, RouteMatch, RouteTarget};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub service: ServiceName,
    /// Namespace of the service; the sidecar's own when absent.
    #[serde(default)]
    pub namespace: Option<NamespaceName>,
    /// Local port on 127.0.0.1 the app connects to for this upstream (0 = ephemeral, for tests).
    #[serde(default)]
    pub local_port: Option<u16>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub balancer: BalancerKind,
    /// Talk plaintext to the upstream endpoints (e.g. an app without a sidecar). Dangerous.
    #[serde(default)]
    pub danger_plaintext: bool,
    /// Service VIPs the app may dial (`"10.0.0.10"` any port, or `"10.0.0.10:80"`): an
    /// intercepted connection whose original destination is one of them goes to this upstream.
    /// The current endpoint IPs (the service's DNS answers) always count too.
    #[serde(default)]
    pub addresses: Vec<Destination>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    #[default]
    RoundRobin,
    LeastRequest,
    PeakEwma,
    Weighted,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCluster {
    pub service: ServiceName,
    pub endpoints: Vec<StaticEndpoint>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
    /// Instance attributes, for route targets that pick a subset.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads (the binary's runtime); 0 = one per core.
    #[serde(default = "one_usize")]
    pub worker_threads: usize,
    /// SO_REUSEPORT acceptors per listener.
    #[serde(default = "one_usize")]
    pub acceptors: usize,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// One JSON line per request on stdout.
    #[serde(default)]
    pub access_log: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_h2_max_streams")]
    pub h2_max_streams: u32,
    /// HTTP/2 rapid-reset protection: pending-accept resets tolerated per connection.
    #[serde(default = "default_h2_max_pending_resets")]
    pub h2_max_pending_resets: usize,
    /// Memory budget (resident MiB) of the overload guard; unset: no guard.
    #[serde(default)]
    pub max_rss_mb: Option<u64>,
    /// Budget (MiB) of bytes held in the proxy's own buffers ([`crate::buffered`]); past it the
    /// overload guard sheds as for RSS. Unset: not watched.
    #[serde(default)]
    pub max_buffered_mb: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResilienceConfig {
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_per_try_timeout", with = "humantime_serde")]
    pub per_try_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra attempts after the first, for idempotent requests without a body.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Retries may add this fraction of requests (0.2 = 20%) ...
    #[serde(default = "default_retry_ratio")]
    pub retry_budget_ratio: f64,
    /// ... plus this many per second regardless of traffic.
    #[serde(default = "default_retry_min_per_sec")]
    pub retry_budget_min_per_sec: u32,
    /// Circuit breaking: concurrent requests per cluster.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    #[serde(default = "default_consecutive_5xx")]
    pub outlier_consecutive_5xx: u32,
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub outlier_base_ejection_time: Duration,
    #[serde(default = "default_max_ejection_percent")]
    pub outlier_max_ejection_percent: u8,
    /// Below this percentage of available endpoints, ignore ejections (Envoy's panic threshold).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold_percent: u8,
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Config {
    /// Loads a file (when given) and overlays the `TRELLIS_*` environment.
    pub fn load(path: Option<&Path>, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        crate::env::overlay(&mut table, env)?;
        Config::from_table(table)
    }

    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        // Re-serialise so the parser's messages point at the offending key in a readable document.
        let text = toml::to_string(&table).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::from_toml(&text)
    }

    /// Cross-field checks that a type alone cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let mut ports = BTreeSet::new();
        let mut services = BTreeSet::new();
        for (i, u) in self.outbound.upstreams.iter().enumerate() {
            if let Some(p) = u.local_port
                && p != 0
                && !ports.insert(p)
            {
                return Err(ConfigError::Invalid {
                    key: format!("outbound.upstreams[{i}].local_port"),
                    problem: format!("port {p} is used by two upstreams"),
                });
            }
            if !services.insert(u.service.as_str().to_owned()) {
                return Err(ConfigError::Invalid {
                    key: format!("outbound.upstreams[{i}].service"),
                    problem: format!("upstream `{}` is listed twice", u.service),
                });
            }
            let is_static = self.clusters.iter().any(|c| c.service == u.service);
            if !is_static && self.control_plane.is_none() {
                return Err(ConfigError::Invalid {
                    key: format!("outbound.upstreams[{i}].service"),
                    problem: format!(
                        "upstream `{}` has no static cluster and no control_plane is configured",
                        u.service
                    ),
                });
            }
        }
        let mut claimed: Vec<(Destination, usize)> = Vec::new();
        for (i, u) in self.outbound.upstreams.iter().enumerate() {
            for (j, d) in u.addresses.iter().enumerate() {
                if let Some((_, other)) = claimed.iter().find(|(c, _)| c == d) {
                    return Err(ConfigError::Invalid {
                        key: format!("outbound.upstreams[{i}].addresses[{j}]"),
                        problem: format!("also claimed by outbound.upstreams[{other}]"),
                    });
                }
                claimed.push((*d, i));
            }
        }
        crate::outbound::compile(&self.outbound)?;
        for (i, c) in self.clusters.iter().enumerate() {
            if c.endpoints.is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("clusters[{i}].endpoints"),
                    problem: "a static cluster needs at least one endpoint".into(),
                });
            }
        }
        let r = &self.resilience;
        if !(0.0..=10.0).contains(&r.retry_budget_ratio) {
            return Err(ConfigError::Invalid {
                key: "resilience.retry_budget_ratio".into(),
                problem: "must be between 0.0 and 10.0".into(),
            });
        }
        if r.outlier_max_ejection_percent > 100 || r.panic_threshold_percent > 100 {
            return Err(ConfigError::Invalid {
                key: "resilience.outlier_max_ejection_percent / panic_threshold_percent".into(),
                problem: "percentages must be 0..=100".into(),
            });
        }
        for (key, mb) in [
            ("limits.max_rss_mb", self.limits.max_rss_mb),
            ("limits.max_buffered_mb", self.limits.max_buffered_mb),
        ] {
            crate::overload::check_budget_mb(mb).map_err(|problem| ConfigError::Invalid {
                key: key.into(),
                problem,
            })?;
        }
        if self.runtime.acceptors == 0 {
            return Err(ConfigError::Invalid {
                key: "runtime.acceptors".into(),
                problem: "must be at least 1".into(),
            });
        }
        if let Some(inb) = &self.inbound
            && http::HeaderName::from_bytes(inb.identity_header.as_bytes()).is_err()
        {
            return Err(ConfigError::Invalid {
                key: "inbound.identity_header".into(),
                problem: "not a valid HTTP header name".into(),
            });
        }
        Ok(())
    }

    /// The configuration as JSON with secrets redacted, for the admin `/config` page.
    pub fn redacted_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin(),
        }
    }
}
impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 1,
            acceptors: 1,
            drain_timeout: default_drain_timeout(),
            access_log: false,
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: default_max_header_bytes(),
            header_read_timeout: default_header_read_timeout(),
            max_connections: default_max_connections(),
            h2_max_streams: default_h2_max_streams(),
            h2_max_pending_resets: default_h2_max_pending_resets(),
            max_rss_mb: None,
            max_buffered_mb: None,
        }
    }
}
impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            connect_timeout: default_connect_timeout(),
            per_try_timeout: default_per_try_timeout(),
            request_timeout: default_request_timeout(),
            max_retries: default_max_retries(),
            retry_budget_ratio: default_retry_ratio(),
            retry_budget_min_per_sec: default_retry_min_per_sec(),
            max_requests: default_max_requests(),
            outlier_consecutive_5xx: default_consecutive_5xx(),
            outlier_base_ejection_time: default_base_ejection(),
            outlier_max_ejection_percent: default_max_ejection_percent(),
            panic_threshold_percent: default_panic_threshold(),
            pool_idle_timeout: default_pool_idle_timeout(),
        }
    }
}
impl Default for Intentions {
    fn default() -> Self {
        Intentions {
            default: default_decision(),
            rules: Vec::new(),
        }
    }
}

fn default_trust_domain() -> TrustDomain {
    // A literal that is a valid trust domain.
    "mesh.local"
        .parse()
        .unwrap_or_else(|_| unreachable!("constant trust domain is valid"))
}
fn default_watch_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_protocol() -> Protocol {
    Protocol::Http
}
fn default_identity_header() -> String {
    "x-forwarded-client-cert".into()
}
fn default_decision() -> Decision {
    Decision::Deny
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn one() -> u32 {
    1
}
fn one_usize() -> usize {
    1
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_h2_max_streams() -> u32 {
    256
}
fn default_h2_max_pending_resets() -> usize {
    20
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_per_try_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_ratio() -> f64 {
    0.2
}
fn default_retry_min_per_sec() -> u32 {
    10
}
fn default_max_requests() -> usize {
    1024
}
fn default_consecutive_5xx() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection_percent() -> u8 {
    50
}
fn default_panic_threshold() -> u8 {
    50
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    const MINIMAL: &str = r#"
[identity]
namespace = "my-app.local"
service = "web"

[inbound]
listen = "0.0.0.0:15000"
app = "127.0.0.1:8080"

[outbound]
upstreams = [{ service = "api", local_port = 9191, danger_plaintext = true }]

[[clusters]]
service = "api"
endpoints = [{ address = "127.0.0.1:8081" }]
"#;

    #[test]
    fn control_plane_tls_needs_a_trust_bundle() {
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\ntls = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("control_plane.tls needs control_plane.trust_bundle"),
            "{err}"
        );
        let ok = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\ntls = true\ntrust_bundle = \"/etc/trellis/root.crt\"\n"
        ))
        .unwrap();
        assert!(ok.control_plane.unwrap().tls);
        let pem = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\ntls = true\ntrust_bundle_pem = \"-----BEGIN CERTIFICATE-----\"\n"
        ))
        .unwrap();
        assert!(pem.control_plane.unwrap().trust_bundle_pem.is_some());
        let both = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\ntrust_bundle = \"/r.crt\"\ntrust_bundle_pem = \"x\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn control_plane_takes_one_address_or_several() {
        let one = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\n"
        ))
        .unwrap();
        let cp = one.control_plane.unwrap();
        assert_eq!(cp.addresses, vec![cp.address]);
        let several = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddresses = [\"127.0.0.1:9400\", \"127.0.0.2:9400\"]\n"
        ))
        .unwrap();
        let cp = several.control_plane.unwrap();
        assert_eq!(cp.address, "127.0.0.1:9400".parse().unwrap());
        assert_eq!(cp.addresses.len(), 2);
        let none = Config::from_toml(&format!("{MINIMAL}\n[control_plane]\ntoken = \"t\"\n"));
        assert!(none.unwrap_err().to_string().contains("addresses"));
        let unknown = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddress = \"127.0.0.1:9400\"\nadress = \"x\"\n"
        ));
        assert!(unknown.unwrap_err().to_string().contains("adress"));
    }

    #[test]
    fn control_plane_addresses_may_be_dns_names() {
        let named = Config::from_toml(&format!(
            "{MINIMAL}\n[control_plane]\naddresses = [\"trellis-cp.internal:9400\", \"[::1]:9400\", \"localhost:1\"]\n"
        ))
        .unwrap();
        let cp = named.control_plane.unwrap();
        assert_eq!(cp.address.to_string(), "trellis-cp.internal:9400");
        let loopback: Vec<bool> = cp.addresses.iter().map(HostPort::is_loopback).collect();
        assert_eq!(loopback, [false, true, true]);
        for bad in [
            "trellis-cp.internal",
            "host:0",
            "host:99999",
            "user@host:1",
            "-host:1",
            "a..b:1",
            "",
        ] {
            let e = Config::from_toml(&format!(
                "{MINIMAL}\n[control_plane]\naddress = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_file_loads_with_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.resilience.max_retries, 2);
        assert_eq!(c.outbound.upstreams[0].local_port, Some(9191));
        assert_eq!(c.inbound.unwrap().intentions.default, Decision::Deny);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[inbound]", "[inbound]\nlisten_port = 3");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let text = MINIMAL.replace("service = \"web\"", "service = \"Not_A_Name!\"");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("service"), "{err}");
        let text = MINIMAL.replace(
            "[identity]",
            "[limits]\nheader_read_timeout = \"soon\"\n[identity]",
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("header_read_timeout"), "{err}");
    }

    #[test]
    fn upstream_without_source_is_rejected() {
        let text = MINIMAL.replace(
            "service = \"api\"\nendpoints",
            "service = \"other\"\nendpoints",
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("outbound.upstreams[0].service"), "{err}");
    }

    #[test]
    fn environment_alone_configures_and_overrides() {
        let env = MapEnv::from([
            ("TRELLIS_IDENTITY__NAMESPACE", "my-app.local"),
            ("TRELLIS_IDENTITY__SERVICE", "web"),
            ("TRELLIS_CONTROL_PLANE__ADDRESS", "127.0.0.1:8500"),
            ("TRELLIS_CONTROL_PLANE__TOKEN", "s3cret"),
            (
                "TRELLIS_OUTBOUND__UPSTREAMS",
                r#"[{service="api",local_port=9191}]"#,
            ),
            ("TRELLIS_RESILIENCE__MAX_RETRIES", "4"),
            ("TRELLIS_LIMITS__HEADER_READ_TIMEOUT", "250ms"),
            ("HOME", "/root"),
        ]);
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.identity.service.as_str(), "web");
        assert_eq!(c.resilience.max_retries, 4);
        assert_eq!(c.limits.header_read_timeout, Duration::from_millis(250));
        let json = c.redacted_json();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("<redacted>"));
    }

    #[test]
    fn buffered_budget_from_file_and_env_is_checked() {
        let text = format!("{MINIMAL}\n[limits]\nmax_buffered_mb = 64\n");
        assert_eq!(
            Config::from_toml(&text).unwrap().limits.max_buffered_mb,
            Some(64)
        );
        let env = MapEnv::from([
            ("TRELLIS_IDENTITY__NAMESPACE", "my-app.local"),
            ("TRELLIS_IDENTITY__SERVICE", "web"),
            ("TRELLIS_LIMITS__MAX_BUFFERED_MB", "8"),
        ]);
        assert_eq!(
            Config::load(None, &env).unwrap().limits.max_buffered_mb,
            Some(8)
        );
        for bad in ["0", "99999999999"] {
            let text = format!("{MINIMAL}\n[limits]\nmax_buffered_mb = {bad}\n");
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains("limits.max_buffered_mb"), "{err}");
        }
        let text = format!("{MINIMAL}\n[limits]\nmax_buffered_mb = \"lots\"\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("max_buffered_mb"), "{err}");
    }

    #[test]
    fn environment_unknown_key_is_named() {
        let env = MapEnv::from([
            ("TRELLIS_IDENTITY__NAMESPACE", "my-app.local"),
            ("TRELLIS_IDENTITY__SERVICE", "web"),
            ("TRELLIS_IDENTITY__COLOUR", "blue"),
        ]);
        let err = Config::load(None, &env).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn example_config_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sidecar.example.toml");
        let c = Config::load(Some(Path::new(path)), &MapEnv::default()).unwrap();
        assert_eq!(c.identity.service.as_str(), "web");
        let text = std::fs::read_to_string(path).unwrap() + "\nsurprise = 1\n";
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
    }
}
