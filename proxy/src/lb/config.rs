//! `lb.toml`: listeners with rules, target groups, deployments and limits.
//!
//! Parsing is strict (`deny_unknown_fields`); [`LbConfig::compile`] turns the text into routing
//! types and every error names where it is (`listener "web" rule "api"`) and which field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::HostPort;

use crate::route::{
    Action, Condition, FixedResponse, Forward, IndexError, MAX_VALUES, Priority, QueryMatch,
    Redirect, RedirectParts, Rule, RuleIndex, Weight, WeightedGroup,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config: {0}")]
    Parse(#[from] toml::de::Error),
    /// `at` names the object (`listener "web" rule "api"`), `field` the offending field.
    #[error("{at}: field `{field}`: {reason}")]
    Invalid {
        at: String,
        field: String,
        reason: String,
    },
}

fn invalid(at: impl Into<String>, field: impl Into<String>, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        at: at.into(),
        field: field.into(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "target_group")]
    pub target_groups: Vec<TargetGroupConfig>,
    #[serde(default, rename = "deployment")]
    pub deployments: Vec<DeploymentConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// Protocol limits against slowloris and oversized requests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time a client has to send the complete request head.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer, HTTP/2 header list).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Time to connect to a target.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time for the upstream to answer before the LB sends 504.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Concurrent connections per listener; beyond it new ones are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Memory budget (resident MiB) of the overload guard ([`crate::overload`]); unset: none.
    #[serde(default)]
    pub max_rss_mb: Option<u64>,
    /// Budget (MiB) of bytes held in the LB's own buffers ([`crate::buffered`]); unset: none.
    #[serde(default)]
    pub max_buffered_mb: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            drain_timeout: default_drain_timeout(),
            max_connections: default_max_connections(),
            max_rss_mb: None,
            max_buffered_mb: None,
        }
    }
}

/// hyper's smallest HTTP/1 read buffer.
pub const MIN_HEADER_BYTES: usize = 8192;

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    Http,
    Https,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default = "default_protocol")]
    pub protocol: ListenerProtocol,
    /// The certificate for `https`: PEM files, or issued by the built-in CA.
    pub tls: Option<TlsConfig>,
    pub default_action: ActionConfig,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

fn default_protocol() -> ListenerProtocol {
    ListenerProtocol::Http
}

/// Where an `https` listener's certificate comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSource {
    /// `cert` and `key` PEM files, read at start.
    #[default]
    Files,
    /// The built-in CA: a key generated here (it never leaves the process) certified through the
    /// control plane's sign API with a join token, renewed before expiry (new handshakes get the
    /// new certificate, open connections are untouched).
    Ca,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub source: TlsSource,
    /// `source = "files"`: certificate chain and key (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `source = "ca"`: `ip:port` of the control plane (sign API), or a list of its replicas
    /// (tried in order; the certificate and each renewal come from whichever answers).
    #[serde(default)]
    pub control_plane: Option<Replicas>,
    /// `source = "ca"`: join token (redacted in `/config`), or a file holding it.
    #[serde(default, serialize_with = "redact")]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `source = "ca"`: names clients will verify; the issued certificate must carry each (the CA
    /// names certificates `<service>.<namespace>` after the token's scope), else start fails.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// `source = "ca"`: trust domain of the CA.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: trellis_core::TrustDomain,
    /// `source = "ca"`: requested certificate lifetime (the CA's policy default when absent);
    /// renewal happens at about 2/3 of it.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// `source = "ca"`: the mesh's root certificate(s) (PEM, the CA's `root.crt`). Set: every
    /// certificate the control plane returns must chain to them. Unset: the roots are fetched
    /// from the control plane (trust on first use).
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// `source = "ca"`: reach the control plane over HTTPS (`--api-tls`), verified by its SPIFFE
    /// id against `trust_bundle` (required then).
    #[serde(default)]
    pub control_plane_tls: bool,
}

/// One `host:port` or a list of them (control-plane replicas, in order of preference; IP
/// addresses or DNS names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Replicas(pub Vec<HostPort>);

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Replicas;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"host:port\" or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Replicas, E> {
                Ok(Replicas(vec![v.parse().map_err(E::custom)?]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Replicas, A::Error> {
                let mut all: Vec<HostPort> = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    let a: HostPort = v.parse().map_err(serde::de::Error::custom)?;
                    if !all.contains(&a) {
                        all.push(a);
                    }
                }
                if all.is_empty() {
                    return Err(serde::de::Error::custom("the list of replicas is empty"));
                }
                Ok(Replicas(all))
            }
        }
        d.deserialize_any(V)
    }
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn default_trust_domain() -> trellis_core::TrustDomain {
    "mesh.local"
        .parse()
        .unwrap_or_else(|_| unreachable!("constant trust domain is valid"))
}

impl TlsConfig {
    /// Field-level checks; `(field, reason)` on error.
    fn check(&self) -> Result<(), (&'static str, &'static str)> {
        match self.source {
            TlsSource::Files => {
                if self.cert.is_none() || self.key.is_none() {
                    return Err(("tls", "https listener needs tls.cert and tls.key"));
                }
                if self.control_plane.is_some()
                    || self.token.is_some()
                    || !self.dns_names.is_empty()
                    || self.trust_bundle.is_some()
                    || self.control_plane_tls
                {
                    return Err((
                        "tls.source",
                        "control_plane, token, dns_names, trust_bundle and control_plane_tls need source = \"ca\"",
                    ));
                }
            }
            TlsSource::Ca => {
                if self.cert.is_some() || self.key.is_some() {
                    return Err(("tls.source", "cert and key need source = \"files\""));
                }
                if self.control_plane.is_none() {
                    return Err((
                        "tls.control_plane",
                        "source = \"ca\" needs the control plane address",
                    ));
                }
                if self.token.is_none() && self.token_file.is_none() {
                    return Err(("tls.token", "source = \"ca\" needs token or token_file"));
                }
                if self.dns_names.is_empty() {
                    return Err((
                        "tls.dns_names",
                        "name at least one DNS name clients will verify",
                    ));
                }
                if self.control_plane_tls && self.trust_bundle.is_none() {
                    return Err((
                        "tls.control_plane_tls",
                        "needs tls.trust_bundle (the mesh's root.crt) to verify the control plane",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub priority: u32,
    #[serde(default)]
    pub conditions: Vec<ConditionConfig>,
    pub action: ActionConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "field", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConditionConfig {
    PathPattern { values: Vec<String> },
    HostHeader { values: Vec<String> },
    HttpHeader { name: String, values: Vec<String> },
    HttpRequestMethod { values: Vec<String> },
    QueryString { values: Vec<QueryValueConfig> },
    SourceIp { values: Vec<String> },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryValueConfig {
    pub key: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActionConfig {
    Forward {
        target_groups: Vec<GroupWeightConfig>,
        #[serde(default, with = "humantime_serde")]
        stickiness: Option<Duration>,
    },
    FixedResponse {
        status: u16,
        content_type: Option<String>,
        #[serde(default)]
        body: String,
    },
    Redirect {
        status: u16,
        protocol: Option<String>,
        host: Option<String>,
        port: Option<String>,
        path: Option<String>,
        query: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupWeightConfig {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastOutstandingRequests,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroupConfig {
    pub name: String,
    /// Static targets.
    #[serde(default)]
    pub targets: Vec<SocketAddr>,
    /// Targets from the discovery watch API instead.
    pub discovery: Option<DiscoverySource>,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// New or recovered targets ramp from 0 to full share over this time.
    #[serde(default, with = "humantime_serde")]
    pub slow_start: Option<Duration>,
    /// How long a removed target keeps its in-flight requests (no new ones).
    #[serde(default = "default_dereg", with = "humantime_serde")]
    pub deregistration_delay: Duration,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
}

fn default_dereg() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySource {
    /// One control-plane replica, `http://host:port`.
    #[serde(default)]
    pub url: Option<String>,
    /// Every control-plane replica (`host:port`), in order of preference, as the sidecar's
    /// `control_plane.addresses`: on error the watch moves to the next and resumes from the last
    /// revision it saw. With `url`, that one comes first.
    #[serde(default)]
    pub addresses: Vec<String>,
    pub namespace: String,
    pub service: String,
    /// Watch over HTTPS (`--api-tls`), verified by the control plane's SPIFFE id against
    /// `trust_bundle`; an `https://` `url` implies it.
    #[serde(default)]
    pub tls: bool,
    /// The mesh's root certificate(s) (PEM, the CA's `root.crt`), for `tls`.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// Trust domain of the mesh, for `tls` (the control plane's SPIFFE id is in it).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: trellis_core::TrustDomain,
}

impl DiscoverySource {
    /// `url` then `addresses`, without repeats (at least one).
    pub fn control_planes(&self) -> Result<Vec<http::uri::Authority>, String> {
        let mut out: Vec<http::uri::Authority> = Vec::new();
        if let Some(url) = &self.url {
            let uri: http::Uri = url
                .parse()
                .map_err(|_| format!("url {url:?} is not a URL"))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            if !scheme_ok || !uri.path().trim_end_matches('/').is_empty() {
                return Err(format!("url {url:?}: expected http(s)://host:port"));
            }
            let a = uri
                .authority()
                .ok_or_else(|| format!("url {url:?}: expected http(s)://host:port"))?;
            out.push(a.clone());
        }
        for a in &self.addresses {
            let a: http::uri::Authority = a
                .parse()
                .ok()
                .filter(|a: &http::uri::Authority| a.port_u16().is_some())
                .ok_or_else(|| format!("address {a:?}: expected host:port"))?;
            if !out.contains(&a) {
                out.push(a);
            }
        }
        if out.is_empty() {
            return Err("give `url` or `addresses`".into());
        }
        if self.https() && self.trust_bundle.is_none() {
            return Err(
                "tls (or an https:// url) needs trust_bundle (the mesh's root.crt) to verify the control plane"
                    .into(),
            );
        }
        Ok(out)
    }

    /// Whether the watch goes over HTTPS: `tls`, or an `https://` url.
    pub fn https(&self) -> bool {
        self.tls
            || self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
    }
}

/// ALB-like health checks; defaults are ALB's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only `http` is supported.
    #[serde(default = "default_hc_protocol")]
    pub protocol: String,
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Port to probe; the target's traffic port when absent.
    pub port: Option<u16>,
    #[serde(default = "default_hc_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Status codes counted as healthy: `200`, `200,204`, `200-399`.
    #[serde(default = "default_matcher")]
    pub matcher: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            protocol: default_hc_protocol(),
            path: default_hc_path(),
            port: None,
            interval: default_hc_interval(),
            timeout: default_hc_timeout(),
            healthy_threshold: default_healthy(),
            unhealthy_threshold: default_unhealthy(),
            matcher: default_matcher(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_hc_protocol() -> String {
    "http".into()
}
fn default_hc_path() -> String {
    "/".into()
}
fn default_hc_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_healthy() -> u32 {
    5
}
fn default_unhealthy() -> u32 {
    2
}
fn default_matcher() -> String {
    "200".into()
}

/// Status ranges a health check accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher(Vec<(u16, u16)>);

impl Matcher {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let p = |x: &str| -> Result<u16, String> {
                x.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (200..=599).contains(c))
                    .ok_or_else(|| format!("{x:?} is not a status code 200-599"))
            };
            let (lo, hi) = (p(lo)?, p(hi)?);
            if lo > hi {
                return Err(format!("range {part:?} is reversed"));
            }
            ranges.push((lo, hi));
        }
        Ok(Self(ranges))
    }

    pub fn accepts(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub name: String,
    pub listener: String,
    pub rule: String,
    /// The target group serving now.
    pub from: String,
    /// The new target group traffic shifts to.
    pub to: String,
    pub strategy: StrategyConfig,
    #[serde(default)]
    pub rollback: RollbackConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StrategyConfig {
    AllAtOnce,
    /// `percent` to the new group for `interval`, then 100%.
    Canary {
        percent: u8,
        #[serde(with = "humantime_serde")]
        interval: Duration,
    },
    /// `+step` percent every `interval` until 100%.
    Linear {
        step: u8,
        #[serde(with = "humantime_serde")]
        interval: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackConfig {
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// Roll back when the new group's 5xx share over the window exceeds this (0.0–1.0).
    pub max_5xx_rate: Option<f64>,
    /// Roll back when the new group's p99 over the window exceeds this.
    #[serde(default, with = "humantime_serde")]
    pub max_p99: Option<Duration>,
    /// Below this many requests in the window, no verdict.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        Self {
            window: default_window(),
            max_5xx_rate: None,
            max_p99: None,
            min_requests: default_min_requests(),
        }
    }
}

fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_min_requests() -> u64 {
    10
}

/// A listener's rules compiled.
#[derive(Debug, Clone)]
pub struct CompiledListener {
    pub config: ListenerConfig,
    pub index: RuleIndex,
}

/// The whole config after validation.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub listeners: Vec<CompiledListener>,
    /// Target groups in the order `WeightedGroup::slot` refers to.
    pub target_groups: Vec<(TargetGroupConfig, Matcher)>,
}

impl LbConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(&text)
    }

    /// [`LbConfig::load`], then `TRELLIS_LIMITS__*` variables override `[limits]` (e.g.
    /// `TRELLIS_LIMITS__MAX_BUFFERED_MB=64`). Only limits: other `TRELLIS_*` variables belong to
    /// a sidecar that may share the environment.
    pub fn load_with_env(path: &Path, env: &dyn crate::EnvSource) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str_with_env(&text, env)
    }

    /// [`LbConfig::from_str`] with the `TRELLIS_LIMITS__*` overlay of [`LbConfig::load_with_env`].
    pub fn from_str_with_env(text: &str, env: &dyn crate::EnvSource) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse()?;
        let limits = crate::MapEnv(
            env.vars()
                .into_iter()
                .filter(|(k, _)| k.starts_with("TRELLIS_LIMITS__"))
                .collect(),
        );
        crate::env::overlay(&mut table, &limits)
            .map_err(|e| invalid("environment", "TRELLIS_LIMITS__*", e))?;
        // Through text again, so errors point at the offending key like a file's would.
        let text = toml::to_string(&table).map_err(|e| invalid("environment", "limits", e))?;
        Self::from_str(&text)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Validate everything and compile the rules.
    pub fn compile(&self) -> Result<Compiled, ConfigError> {
        if self.limits.max_header_bytes < MIN_HEADER_BYTES {
            return Err(invalid(
                "limits",
                "max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            ));
        }
        for (field, mb) in [
            ("max_rss_mb", self.limits.max_rss_mb),
            ("max_buffered_mb", self.limits.max_buffered_mb),
        ] {
            crate::overload::check_budget_mb(mb)
                .map_err(|reason| invalid("limits", field, reason))?;
        }
        let mut groups = Vec::new();
        let mut seen = HashSet::new();
        for tg in &self.target_groups {
            let at = format!("target_group {:?}", tg.name);
            if !seen.insert(tg.name.as_str()) {
                return Err(invalid(at, "name", "duplicate target group name"));
            }
            if tg.targets.is_empty() == tg.discovery.is_none() {
                return Err(invalid(
                    at,
                    "targets",
                    "give either a static `targets` list or `discovery`",
                ));
            }
            if let Some(d) = &tg.discovery {
                d.control_planes()
                    .map_err(|e| invalid(at.as_str(), "discovery", e))?;
                if d.namespace.parse::<trellis_core::NamespaceName>().is_err() {
                    return Err(invalid(at, "discovery.namespace", "not a namespace name"));
                }
                if d.service.parse::<trellis_core::ServiceName>().is_err() {
                    return Err(invalid(at, "discovery.service", "not a service name"));
                }
            }
            let hc = &tg.health_check;
            if hc.protocol != "http" {
                return Err(invalid(
                    at,
                    "health_check.protocol",
                    "only \"http\" is supported",
                ));
            }
            if !hc.path.starts_with('/') {
                return Err(invalid(at, "health_check.path", "must start with '/'"));
            }
            if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                return Err(invalid(at, "health_check", "thresholds must be at least 1"));
            }
            if hc.interval.is_zero() || hc.timeout.is_zero() || hc.timeout > hc.interval {
                return Err(invalid(
                    at,
                    "health_check.timeout",
                    "timeout must be non-zero and not longer than interval",
                ));
            }
            let m = Matcher::parse(&hc.matcher)
                .map_err(|e| invalid(at.clone(), "health_check.matcher", e))?;
            groups.push((tg.clone(), m));
        }
        let slot_of = |name: &str| groups.iter().position(|(g, _)| g.name == name);

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        for l in &self.listeners {
            let at_l = format!("listener {:?}", l.name);
            if !names.insert(l.name.as_str()) {
                return Err(invalid(at_l, "name", "duplicate listener name"));
            }
            match &l.tls {
                None if l.protocol == ListenerProtocol::Https => {
                    return Err(invalid(
                        at_l,
                        "tls",
                        "https listener needs tls.cert and tls.key, or tls.source = \"ca\"",
                    ));
                }
                Some(t) => t.check().map_err(|(f, e)| invalid(at_l.clone(), f, e))?,
                None => {}
            }
            let default = compile_action(&l.default_action, &slot_of)
                .map_err(|(f, e)| invalid(at_l.clone(), format!("default_action.{f}"), e))?;
            let mut rules = Vec::new();
            let mut rule_names = HashSet::new();
            for r in &l.rules {
                let at = format!("listener {:?} rule {:?}", l.name, r.name);
                if !rule_names.insert(r.name.as_str()) {
                    return Err(invalid(at, "name", "duplicate rule name"));
                }
                let priority = Priority::try_from(r.priority)
                    .map_err(|e| invalid(at.clone(), "priority", e))?;
                let mut conditions = Vec::new();
                for (i, c) in r.conditions.iter().enumerate() {
                    conditions.push(compile_condition(c).map_err(|(f, e)| {
                        invalid(at.clone(), format!("conditions[{i}].{f}"), e)
                    })?);
                }
                let action = compile_action(&r.action, &slot_of)
                    .map_err(|(f, e)| invalid(at.clone(), format!("action.{f}"), e))?;
                rules.push(Rule {
                    name: Arc::from(r.name.as_str()),
                    priority,
                    conditions,
                    action,
                });
            }
            let index = RuleIndex::new(rules, default).map_err(|e| match &e {
                IndexError::DuplicatePriority { second, .. } => invalid(
                    format!("listener {:?} rule {second:?}", l.name),
                    "priority",
                    &e,
                ),
                #[allow(unreachable_patterns)] // IndexError is non_exhaustive
                _ => invalid(at_l.clone(), "rule", &e),
            })?;
            listeners.push(CompiledListener {
                config: l.clone(),
                index,
            });
        }

        let mut dep_names = HashSet::new();
        for d in &self.deployments {
            let at = format!("deployment {:?}", d.name);
            if !dep_names.insert(d.name.as_str()) {
                return Err(invalid(at, "name", "duplicate deployment name"));
            }
            let Some(l) = listeners.iter().find(|l| l.config.name == d.listener) else {
                return Err(invalid(
                    at,
                    "listener",
                    format!("unknown listener {:?}", d.listener),
                ));
            };
            let Some(pos) = l.index.position(&d.rule) else {
                return Err(invalid(at, "rule", format!("unknown rule {:?}", d.rule)));
            };
            let Action::Forward(f) = &l.index.rules()[pos].action else {
                return Err(invalid(at, "rule", "the rule's action is not forward"));
            };
            for (field, g) in [("from", &d.from), ("to", &d.to)] {
                if !f.groups().iter().any(|w| &*w.name == g.as_str()) {
                    return Err(invalid(
                        at,
                        field,
                        format!(
                            "target group {g:?} is not forwarded to by rule {:?}",
                            d.rule
                        ),
                    ));
                }
            }
            if d.from == d.to {
                return Err(invalid(at, "to", "from and to are the same group"));
            }
            match d.strategy {
                StrategyConfig::Canary { percent, interval }
                    if !(1..=99).contains(&percent) || interval.is_zero() =>
                {
                    return Err(invalid(
                        at,
                        "strategy",
                        "canary needs percent 1-99 and an interval",
                    ));
                }
                StrategyConfig::Linear { step, interval }
                    if !(1..=100).contains(&step) || interval.is_zero() =>
                {
                    return Err(invalid(
                        at,
                        "strategy",
                        "linear needs step 1-100 and an interval",
                    ));
                }
                _ => {}
            }
            if let Some(r) = d.rollback.max_5xx_rate
                && !(0.0..=1.0).contains(&r)
            {
                return Err(invalid(
                    at,
                    "rollback.max_5xx_rate",
                    "must be within 0.0-1.0",
                ));
            }
        }
        Ok(Compiled {
            listeners,
            target_groups: groups,
        })
    }
}

type FieldError = (String, String);

fn field_err(field: &str, e: impl ToString) -> FieldError {
    (field.to_owned(), e.to_string())
}

fn check_count(n: usize) -> Result<(), FieldError> {
    if n == 0 || n > MAX_VALUES {
        return Err(field_err("values", format!("give 1-{MAX_VALUES} values")));
    }
    Ok(())
}

fn compile_condition(c: &ConditionConfig) -> Result<Condition, FieldError> {
    let each = |vals: &[String]| -> Result<(), FieldError> { check_count(vals.len()) };
    Ok(match c {
        ConditionConfig::PathPattern { values } => {
            each(values)?;
            Condition::PathPattern(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.parse()
                            .map_err(|e| field_err(&format!("values[{i}]"), format!("{v:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        ConditionConfig::HostHeader { values } => {
            each(values)?;
            Condition::HostHeader(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.parse()
                            .map_err(|e| field_err(&format!("values[{i}]"), format!("{v:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        ConditionConfig::HttpHeader { name, values } => {
            each(values)?;
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| field_err("name", format!("{name:?}: {e}")))?;
            Condition::HttpHeader {
                name,
                values: values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        Condition::value_pattern(v)
                            .map_err(|e| field_err(&format!("values[{i}]"), format!("{v:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            }
        }
        ConditionConfig::HttpRequestMethod { values } => {
            each(values)?;
            Condition::HttpRequestMethod(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        if v.is_empty()
                            || !v
                                .bytes()
                                .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
                        {
                            return Err(field_err(
                                &format!("values[{i}]"),
                                format!("{v:?} is not an uppercase method"),
                            ));
                        }
                        http::Method::from_bytes(v.as_bytes())
                            .map_err(|e| field_err(&format!("values[{i}]"), e))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        ConditionConfig::QueryString { values } => {
            check_count(values.len())?;
            Condition::QueryString(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        let f = format!("values[{i}]");
                        Ok::<_, FieldError>(QueryMatch {
                            key: q
                                .key
                                .as_deref()
                                .map(Condition::value_pattern)
                                .transpose()
                                .map_err(|e| field_err(&format!("{f}.key"), e))?,
                            value: Condition::value_pattern(&q.value)
                                .map_err(|e| field_err(&format!("{f}.value"), e))?,
                        })
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        ConditionConfig::SourceIp { values } => {
            each(values)?;
            Condition::SourceIp(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.parse::<ipnet::IpNet>()
                            .map_err(|e| field_err(&format!("values[{i}]"), format!("{v:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

fn compile_action(
    a: &ActionConfig,
    slot_of: &dyn Fn(&str) -> Option<usize>,
) -> Result<Action, FieldError> {
    Ok(match a {
        ActionConfig::Forward {
            target_groups,
            stickiness,
        } => {
            let mut groups = Vec::new();
            for (i, g) in target_groups.iter().enumerate() {
                let f = format!("target_groups[{i}]");
                let slot = slot_of(&g.name).ok_or_else(|| {
                    field_err(
                        &format!("{f}.name"),
                        format!("unknown target group {:?}", g.name),
                    )
                })?;
                let weight =
                    Weight::try_from(g.weight).map_err(|e| field_err(&format!("{f}.weight"), e))?;
                groups.push(WeightedGroup {
                    name: Arc::from(g.name.as_str()),
                    slot,
                    weight,
                });
            }
            Action::Forward(
                Forward::new(groups, *stickiness).map_err(|e| field_err("target_groups", e))?,
            )
        }
        ActionConfig::FixedResponse {
            status,
            content_type,
            body,
        } => Action::FixedResponse(
            FixedResponse::new(*status, content_type.as_deref(), body)
                .map_err(|e| field_err("status", e))?,
        ),
        ActionConfig::Redirect {
            status,
            protocol,
            host,
            port,
            path,
            query,
        } => Action::Redirect(
            Redirect::new(
                *status,
                RedirectParts {
                    protocol: protocol.as_deref(),
                    host: host.as_deref(),
                    port: port.as_deref(),
                    path: path.as_deref(),
                    query: query.as_deref(),
                },
            )
            .map_err(|e| field_err("redirect", e))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[target_group]]
name = "blue"
targets = ["127.0.0.1:9001"]
health_check = { path = "/health", interval = "5s", timeout = "2s", matcher = "200-399" }

[[target_group]]
name = "green"
targets = ["127.0.0.1:9002"]

[[listener]]
name = "web"
listen = "127.0.0.1:0"
default_action = { type = "fixed-response", status = 404, content_type = "text/plain", body = "no route" }

[[listener.rule]]
name = "api"
priority = 10
conditions = [
  { field = "path-pattern", values = ["/api/*"] },
  { field = "query-string", values = [{ key = "v", value = "1*" }] },
]
action = { type = "forward", target_groups = [{ name = "blue", weight = 90 }, { name = "green", weight = 10 }], stickiness = "1h" }

[[listener.rule]]
name = "old"
priority = 20
conditions = [{ field = "host-header", values = ["old.*"] }]
action = { type = "redirect", status = 301, host = "new.example.com" }

[[deployment]]
name = "api-rollout"
listener = "web"
rule = "api"
from = "blue"
to = "green"
strategy = { type = "canary", percent = 10, interval = "5m" }
rollback = { window = "1m", max_5xx_rate = 0.05, max_p99 = "500ms" }
"#;

    #[test]
    fn overload_budgets_from_file_and_env_are_checked() {
        let env = crate::MapEnv::from([
            ("TRELLIS_LIMITS__MAX_BUFFERED_MB", "32"),
            // A sidecar's variable in a shared environment is not the LB's business.
            ("TRELLIS_IDENTITY__SERVICE", "web"),
        ]);
        let text = format!("[limits]\nmax_rss_mb = 512\n{EXAMPLE}");
        let c = LbConfig::from_str_with_env(&text, &env).unwrap();
        assert_eq!(c.limits.max_buffered_mb, Some(32));
        assert_eq!(c.limits.max_rss_mb, Some(512));
        c.compile().unwrap();
        let zero = crate::MapEnv::from([("TRELLIS_LIMITS__MAX_BUFFERED_MB", "0")]);
        let err = LbConfig::from_str_with_env(EXAMPLE, &zero)
            .unwrap()
            .compile()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_buffered_mb"), "{err}");
        let typo = crate::MapEnv::from([("TRELLIS_LIMITS__MAX_BUFERED_MB", "1")]);
        let err = LbConfig::from_str_with_env(EXAMPLE, &typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bufered_mb"), "{err}");
    }

    fn err(text: &str) -> String {
        let cfg = match LbConfig::from_str(text) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        cfg.compile().unwrap_err().to_string()
    }

    #[test]
    fn example_loads_and_compiles() {
        let c = LbConfig::from_str(EXAMPLE).unwrap().compile().unwrap();
        assert_eq!(c.listeners[0].index.rules().len(), 2);
        assert_eq!(c.target_groups.len(), 2);
        assert!(c.target_groups[0].1.accepts(302));
        assert!(!c.target_groups[1].1.accepts(302));
    }

    #[test]
    fn example_file_in_repo_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lb/example.toml");
        LbConfig::load(&path).unwrap().compile().unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(&EXAMPLE.replace("[admin]", "[admin]\nbogus_key = 1"));
        assert!(e.contains("bogus_key"), "{e}");
        let e = err(&EXAMPLE.replace("priority = 10", "priority = 10\nprioritee = 3"));
        assert!(e.contains("prioritee"), "{e}");
    }

    #[test]
    fn validation_names_rule_and_field() {
        let e = err(&EXAMPLE.replace("priority = 20", "priority = 10"));
        assert!(
            e.contains(r#"rule "old""#)
                && e.contains("`priority`")
                && e.contains("share priority 10"),
            "{e}"
        );
        let e = err(&EXAMPLE.replace(r#"["/api/*"]"#, r#"["api x"]"#));
        assert!(
            e.contains(r#"rule "api""#) && e.contains("conditions[0].values[0]"),
            "{e}"
        );
        let e = err(&EXAMPLE
            .replace("weight = 90", "weight = 0")
            .replace("weight = 10", "weight = 0"));
        assert!(
            e.contains(r#"rule "api""#)
                && e.contains("action.target_groups")
                && e.contains("all target group weights are zero"),
            "{e}"
        );
        let e = err(&EXAMPLE.replace(
            r#"{ name = "green", weight = 10 }"#,
            r#"{ name = "purple", weight = 10 }"#,
        ));
        assert!(
            e.contains(r#"rule "api""#)
                && e.contains("target_groups[1].name")
                && e.contains("unknown target group \"purple\""),
            "{e}"
        );
        let e = err(&EXAMPLE.replace("priority = 20", "priority = 50001"));
        assert!(
            e.contains(r#"rule "old""#) && e.contains("`priority`"),
            "{e}"
        );
        let e = err(&EXAMPLE.replace("weight = 90", "weight = 1000"));
        assert!(e.contains("target_groups[0].weight"), "{e}");
        let e = err(&EXAMPLE.replace("200-399", "399-200"));
        assert!(e.contains("health_check.matcher"), "{e}");
        let e = err(&EXAMPLE.replace(r#"to = "green""#, r#"to = "red""#));
        assert!(
            e.contains(r#"deployment "api-rollout""#) && e.contains("`to`"),
            "{e}"
        );
    }

    #[test]
    fn https_tls_sources_are_checked() {
        let https = |tls: &str| {
            EXAMPLE.replace(
                "name = \"web\"\nlisten = \"127.0.0.1:0\"\n",
                &format!("name = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n{tls}\n"),
            )
        };
        let ok = https(
            r#"tls = { source = "ca", control_plane = "127.0.0.1:8500", token = "t", dns_names = ["lb.my-app.local"] }"#,
        );
        let c = LbConfig::from_str(&ok).unwrap();
        c.compile().unwrap();
        let shown = serde_json::to_string(&c).unwrap();
        assert!(
            !shown.contains("\"t\"") && shown.contains("<redacted>"),
            "{shown}"
        );
        let cases = [
            ("", "`tls`"),
            (r#"tls = { cert = "c.pem" }"#, "`tls`"),
            (
                r#"tls = { source = "ca", token = "t", dns_names = ["a"] }"#,
                "`tls.control_plane`",
            ),
            (
                r#"tls = { source = "ca", control_plane = "127.0.0.1:1", dns_names = ["a"] }"#,
                "`tls.token`",
            ),
            (
                r#"tls = { source = "ca", control_plane = "127.0.0.1:1", token = "t" }"#,
                "`tls.dns_names`",
            ),
            (
                r#"tls = { source = "ca", cert = "c", control_plane = "127.0.0.1:1", token = "t", dns_names = ["a"] }"#,
                "`tls.source`",
            ),
        ];
        for (tls, want) in cases {
            let e = err(&https(tls));
            assert!(e.contains(want) && e.contains("listener"), "{tls} → {e}");
        }
        // Several control-plane replicas, or one: both read as a list.
        let replicas = https(
            r#"tls = { source = "ca", control_plane = ["127.0.0.1:8500", "127.0.0.2:8500"], token = "t", dns_names = ["a"] }"#,
        );
        let c = LbConfig::from_str(&replicas).unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.control_plane.as_ref().unwrap().0.len(), 2);
        // DNS names are resolved when connecting (e.g. a compose or Cloud Map service name).
        let named = https(
            r#"tls = { source = "ca", control_plane = "cp.local:8500", token = "t", dns_names = ["a"] }"#,
        );
        let c = LbConfig::from_str(&named).unwrap();
        let cp = &c.listeners[0].tls.as_ref().unwrap().control_plane;
        assert_eq!(cp.as_ref().unwrap().0[0].to_string(), "cp.local:8500");
        for (bad, want) in [
            (r#"control_plane = []"#, "empty"),
            (
                r#"control_plane = ["cp.local"]"#,
                "`cp.local` is not host:port",
            ),
            (
                r#"control_plane = ["-cp-.local:1"]"#,
                "`-cp-.local:1` is not host:port",
            ),
            (r#"control_plane = 8500"#, "host:port"),
        ] {
            let e = err(&https(&format!(
                r#"tls = {{ source = "ca", {bad}, token = "t", dns_names = ["a"] }}"#
            )));
            assert!(e.contains(want), "{bad} → {e}");
        }
        let e = err(&https(r#"tls = { source = "vault" }"#));
        assert!(e.contains("vault") && e.contains("source"), "{e}");
    }

    #[test]
    fn discovery_lists_control_plane_replicas() {
        let with = |src: &str| {
            EXAMPLE.replace(
                r#"targets = ["127.0.0.1:9002"]"#,
                &format!(
                    r#"discovery = {{ {src}, namespace = "my-app.local", service = "green" }}"#
                ),
            )
        };
        let c = LbConfig::from_str(&with(
            r#"url = "http://127.0.0.1:8500", addresses = ["127.0.0.1:8500", "cp-b:9400"]"#,
        ))
        .unwrap();
        c.compile().unwrap();
        let d = c
            .target_groups
            .iter()
            .find_map(|g| g.discovery.as_ref())
            .unwrap();
        let cps: Vec<String> = d
            .control_planes()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cps, ["127.0.0.1:8500", "cp-b:9400"]);
        LbConfig::from_str(&with(r#"addresses = ["10.0.0.1:9400"]"#))
            .unwrap()
            .compile()
            .unwrap();
        for (bad, named) in [
            ("addresses = []", "give `url` or `addresses`"),
            (r#"addresses = ["no-port"]"#, "no-port"),
            (r#"url = "ftp://127.0.0.1:1""#, "http(s)://host:port"),
            (r#"url = "https://127.0.0.1:1""#, "needs trust_bundle"),
            (
                r#"addresses = ["cp:9400"], tls = true"#,
                "needs trust_bundle",
            ),
        ] {
            let e = err(&with(bad));
            assert!(e.contains("discovery") && e.contains(named), "{e}");
        }
        let c = LbConfig::from_str(&with(
            r#"url = "https://cp:9400", trust_bundle = "/etc/trellis/root.crt""#,
        ))
        .unwrap();
        c.compile().unwrap();
        let d = c.target_groups.iter().find_map(|g| g.discovery.as_ref());
        assert!(d.unwrap().https());
    }

    #[test]
    fn matcher_forms() {
        let m = Matcher::parse("200,204,300-399").unwrap();
        assert!(m.accepts(200) && m.accepts(204) && m.accepts(301) && !m.accepts(201));
        assert!(Matcher::parse("abc").is_err());
        assert!(Matcher::parse("100").is_err());
    }
}
