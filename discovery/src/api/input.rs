//! Request parsing: JSON bodies become typed requests once; constraints from botocore's model.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::model::{DnsConfig, HealthCheckConfig, HealthCheckCustomConfig, Tag};

pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidInput(format!("invalid request: {e}")))
}

pub fn max_len(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.len() > max {
        return Err(ApiError::InvalidInput(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(())
}

pub fn opt_max_len(field: &str, v: &Option<String>, max: usize) -> Result<(), ApiError> {
    v.as_deref().map_or(Ok(()), |v| max_len(field, v, max))
}

pub fn range(field: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<(), ApiError> {
    match v {
        Some(v) if v < lo || v > hi => Err(ApiError::InvalidInput(format!(
            "{field} must be between {lo} and {hi}"
        ))),
        _ => Ok(()),
    }
}

pub fn tags(t: &Option<Vec<Tag>>) -> Result<(), ApiError> {
    let Some(t) = t else { return Ok(()) };
    if t.len() > 200 {
        return Err(ApiError::TooManyTags("at most 200 tags".into()));
    }
    for tag in t {
        if tag.key.is_empty() || tag.key.len() > 128 || tag.value.len() > 256 {
            return Err(ApiError::InvalidInput(
                "tag keys are 1-128 characters and values 0-256".into(),
            ));
        }
        crate::health_settings::validate_tag(tag).map_err(ApiError::InvalidInput)?;
    }
    trellis_core::intentions::from_tags(t.iter().map(|t| (t.key.as_str(), t.value.as_str())))
        .map_err(ApiError::InvalidInput)?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateNamespace {
    pub name: String,
    pub creator_request_id: Option<String>,
    pub description: Option<String>,
    pub vpc: Option<String>,
    pub tags: Option<Vec<Tag>>,
    pub properties: Option<NsProperties>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NsProperties {
    pub dns_properties: Option<DnsProperties>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DnsProperties {
    #[serde(rename = "SOA")]
    pub soa: Option<Soa>,
}

#[derive(Deserialize)]
pub struct Soa {
    #[serde(rename = "TTL")]
    pub ttl: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IdOnly {
    pub id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateNamespace {
    pub id: String,
    pub updater_request_id: Option<String>,
    pub namespace: NamespaceChange,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NamespaceChange {
    pub description: Option<String>,
    pub properties: Option<NsProperties>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
    pub condition: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct List {
    pub next_token: Option<String>,
    pub max_results: Option<i64>,
    pub filters: Option<Vec<Filter>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateService {
    pub name: String,
    pub namespace_id: Option<String>,
    pub creator_request_id: Option<String>,
    pub description: Option<String>,
    pub dns_config: Option<DnsConfig>,
    pub health_check_config: Option<HealthCheckConfig>,
    pub health_check_custom_config: Option<HealthCheckCustomConfig>,
    pub tags: Option<Vec<Tag>>,
    #[serde(rename = "Type")]
    pub kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIdOnly {
    pub service_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateServiceAttributes {
    pub service_id: String,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeleteServiceAttributes {
    pub service_id: String,
    pub attributes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateService {
    pub id: String,
    pub service: ServiceChange,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceChange {
    pub description: Option<String>,
    pub dns_config: Option<DnsConfigChange>,
    pub health_check_config: Option<HealthCheckConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DnsConfigChange {
    pub dns_records: Vec<crate::model::DnsRecord>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterInstance {
    pub service_id: String,
    pub instance_id: String,
    pub creator_request_id: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceRef {
    pub service_id: String,
    pub instance_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListInstances {
    pub service_id: String,
    pub next_token: Option<String>,
    pub max_results: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Discover {
    pub namespace_name: String,
    pub service_name: String,
    pub max_results: Option<i64>,
    pub query_parameters: Option<BTreeMap<String, String>>,
    pub optional_parameters: Option<BTreeMap<String, String>>,
    pub health_status: Option<String>,
    pub owner_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthStatusReq {
    pub service_id: String,
    pub instances: Option<Vec<String>>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CustomHealth {
    pub service_id: String,
    pub instance_id: String,
    pub status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetOperation {
    pub operation_id: String,
}

#[derive(Deserialize)]
pub struct TagResource {
    #[serde(rename = "ResourceARN")]
    pub resource_arn: String,
    #[serde(rename = "Tags")]
    pub tags: Vec<Tag>,
}

#[derive(Deserialize)]
pub struct UntagResource {
    #[serde(rename = "ResourceARN")]
    pub resource_arn: String,
    #[serde(rename = "TagKeys")]
    pub tag_keys: Vec<String>,
}

#[derive(Deserialize)]
pub struct ResourceArn {
    #[serde(rename = "ResourceARN")]
    pub resource_arn: String,
}

/// Pagination: the token is the offset of the next item.
pub fn page<T>(
    items: Vec<T>,
    token: &Option<String>,
    max: Option<i64>,
    default: usize,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let start: usize = match token {
        None => 0,
        Some(t) => t
            .strip_prefix("trellis-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ApiError::InvalidInput("NextToken is not valid".into()))?,
    };
    let max = max.map(|m| m as usize).unwrap_or(default);
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(max).collect();
    let end = start.saturating_add(max);
    let next = (end < total).then(|| format!("trellis-{end}"));
    Ok((page, next))
}

/// Whether a filter accepts a value (EQ/IN/BEGINS_WITH; BETWEEN handled by the caller).
pub fn filter_accepts(f: &Filter, value: &str) -> bool {
    match f.condition.as_deref().unwrap_or("EQ") {
        "BEGINS_WITH" => f.values.iter().any(|p| value.starts_with(p.as_str())),
        _ => f.values.iter().any(|v| v == value),
    }
}

pub fn check_filter(f: &Filter, names: &[&str]) -> Result<(), ApiError> {
    if !names.contains(&f.name.as_str()) {
        return Err(ApiError::InvalidInput(format!(
            "filter name {} is not one of {}",
            f.name,
            names.join(", ")
        )));
    }
    match f.condition.as_deref().unwrap_or("EQ") {
        "EQ" if f.values.len() != 1 => Err(ApiError::InvalidInput(
            "condition EQ takes exactly one value".into(),
        )),
        "EQ" | "IN" | "BEGINS_WITH" | "BETWEEN" => Ok(()),
        other => Err(ApiError::InvalidInput(format!(
            "condition {other} is not valid"
        ))),
    }
}
