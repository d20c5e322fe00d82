//! The registry's records, spelled as Cloud Map spells them (PascalCase JSON) so the store and the
//! API share one shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceType {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "DNS_PRIVATE")]
    DnsPrivate,
    #[serde(rename = "DNS_PUBLIC")]
    DnsPublic,
}

impl NamespaceType {
    pub fn as_str(self) -> &'static str {
        match self {
            NamespaceType::Http => "HTTP",
            NamespaceType::DnsPrivate => "DNS_PRIVATE",
            NamespaceType::DnsPublic => "DNS_PUBLIC",
        }
    }
    pub fn is_dns(self) -> bool {
        !matches!(self, NamespaceType::Http)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Namespace {
    pub id: String,
    pub arn: String,
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: NamespaceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// SOA TTL (DNS namespaces), also the negative-caching TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soa_ttl: Option<u32>,
    pub create_date: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_request_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RoutingPolicy {
    Multivalue,
    Weighted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordType {
    A,
    #[serde(rename = "AAAA")]
    Aaaa,
    #[serde(rename = "SRV")]
    Srv,
    #[serde(rename = "CNAME")]
    Cname,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct DnsRecord {
    #[serde(rename = "Type")]
    pub kind: RecordType,
    #[serde(rename = "TTL")]
    pub ttl: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_policy: Option<RoutingPolicy>,
    pub dns_records: Vec<DnsRecord>,
}

impl DnsConfig {
    pub fn ttl(&self, kind: RecordType) -> Option<u32> {
        self.dns_records
            .iter()
            .find(|r| r.kind == kind)
            .map(|r| r.ttl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckType {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(rename = "Type")]
    pub kind: CheckType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HealthCheckCustomConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    pub id: String,
    pub arn: String,
    pub name: String,
    pub namespace_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DnsConfig>,
    /// HTTP (API only), DNS_HTTP (DNS + API) or DNS.
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_config: Option<HealthCheckConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_custom_config: Option<HealthCheckCustomConfig>,
    pub create_date: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_request_id: Option<String>,
    /// Persisted instances revision (bumped on every register/deregister).
    #[serde(default)]
    pub revision: u64,
    /// Service-level attributes (`UpdateServiceAttributes`), at most 30.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    pub id: String,
    pub service_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_request_id: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Operation {
    pub id: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub status: String,
    pub create_date: f64,
    pub update_date: f64,
    pub targets: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// Well-known instance attributes.
pub mod attr {
    pub const IPV4: &str = "AWS_INSTANCE_IPV4";
    pub const IPV6: &str = "AWS_INSTANCE_IPV6";
    pub const PORT: &str = "AWS_INSTANCE_PORT";
    pub const CNAME: &str = "AWS_INSTANCE_CNAME";
    pub const ALIAS: &str = "AWS_ALIAS_DNS_NAME";
    /// Trellis: relative weight for the watch API (default 1).
    pub const WEIGHT: &str = "TRELLIS_WEIGHT";
    /// Trellis: TTL health check; the instance must heartbeat within this duration (e.g. `10s`).
    pub const HEALTH_TTL: &str = "TRELLIS_HEALTH_TTL";
}
