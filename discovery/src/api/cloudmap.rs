//! The Cloud Map actions. Each parses its typed request, validates against the registry under the
//! writer lock, commits durably and renders the response.

use std::collections::BTreeMap;

use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use trellis_core::{HealthStatus, NamespaceName, ServiceName};

use super::input::{self, *};
use crate::error::ApiError;
use crate::model::{Instance, Namespace, NamespaceType, Operation, RecordType, Service, Tag, attr};
use crate::registry::{Change, Registry, ServiceEntry, State, now_epoch};

const MAX_ATTRIBUTES: usize = 30;

/// Attempts of one action that lost a race with another replica (each re-validates on a view that
/// includes the winner's write).
const CONFLICT_ATTEMPTS: usize = 16;

/// Runs one action (`X-Amz-Target` suffix) with its JSON body.
pub fn handle_action(reg: &Registry, action: &str, body: &[u8]) -> Result<Value, ApiError> {
    let mut attempt = 1;
    loop {
        match dispatch(reg, action, body) {
            Err(ApiError::Conflict(_)) if attempt < CONFLICT_ATTEMPTS => attempt += 1,
            r => return r,
        }
    }
}

fn dispatch(reg: &Registry, action: &str, body: &[u8]) -> Result<Value, ApiError> {
    match action {
        "CreateHttpNamespace" => create_namespace(reg, NamespaceType::Http, parse(body)?),
        "CreatePrivateDnsNamespace" => {
            create_namespace(reg, NamespaceType::DnsPrivate, parse(body)?)
        }
        "CreatePublicDnsNamespace" => create_namespace(reg, NamespaceType::DnsPublic, parse(body)?),
        "GetNamespace" => get_namespace(reg, parse(body)?),
        "ListNamespaces" => list_namespaces(reg, parse(body)?),
        "UpdateHttpNamespace" | "UpdatePrivateDnsNamespace" | "UpdatePublicDnsNamespace" => {
            update_namespace(reg, parse(body)?)
        }
        "DeleteNamespace" => delete_namespace(reg, parse(body)?),
        "CreateService" => create_service(reg, parse(body)?),
        "GetService" => get_service(reg, parse(body)?),
        "ListServices" => list_services(reg, parse(body)?),
        "UpdateService" => update_service(reg, parse(body)?),
        "GetServiceAttributes" => get_service_attributes(reg, parse(body)?),
        "UpdateServiceAttributes" => update_service_attributes(reg, parse(body)?),
        "DeleteServiceAttributes" => delete_service_attributes(reg, parse(body)?),
        "DeleteService" => delete_service(reg, parse(body)?),
        "RegisterInstance" => register_instance(reg, parse(body)?),
        "DeregisterInstance" => deregister_instance(reg, parse(body)?),
        "GetInstance" => get_instance(reg, parse(body)?),
        "ListInstances" => list_instances(reg, parse(body)?),
        "DiscoverInstances" => discover(reg, parse(body)?),
        "DiscoverInstancesRevision" => discover_revision(reg, parse(body)?),
        "GetInstancesHealthStatus" => health_status(reg, parse(body)?),
        "UpdateInstanceCustomHealthStatus" => custom_health(reg, parse(body)?),
        "GetOperation" => get_operation(reg, parse(body)?),
        "ListOperations" => list_operations(reg, parse(body)?),
        "TagResource" => tag_resource(reg, parse(body)?),
        "UntagResource" => untag_resource(reg, parse(body)?),
        "ListTagsForResource" => list_tags(reg, parse(body)?),
        other => Err(ApiError::UnknownOperation(format!(
            "unknown operation {other}"
        ))),
    }
}

fn random_id(prefix: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{s}")
}

fn arn(reg: &Registry, kind: &str, id: &str) -> String {
    let c = reg.config();
    format!(
        "arn:aws:servicediscovery:{}:{}:{kind}/{id}",
        c.region, c.account
    )
}

fn operation(kind: &str, targets: &[(&str, &str)]) -> Operation {
    let now = now_epoch();
    Operation {
        id: random_id("", 32),
        kind: kind.into(),
        status: "SUCCESS".into(),
        create_date: now,
        update_date: now,
        targets: targets
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        error_message: None,
        error_code: None,
    }
}

/// Accepts a bare id or an ARN ending in `/<id>`.
fn strip_arn(id: &str) -> &str {
    if id.starts_with("arn:") {
        id.rsplit('/').next().unwrap_or(id)
    } else {
        id
    }
}

fn namespace<'a>(st: &'a State, id: &str) -> Result<&'a Namespace, ApiError> {
    st.namespaces
        .get(strip_arn(id))
        .ok_or_else(|| ApiError::NamespaceNotFound(format!("Namespace {id} not found")))
}

fn service<'a>(st: &'a State, id: &str) -> Result<&'a ServiceEntry, ApiError> {
    st.services
        .get(strip_arn(id))
        .ok_or_else(|| ApiError::ServiceNotFound(format!("Service {id} not found")))
}

fn soa_ttl(p: &Option<NsProperties>) -> Result<Option<u32>, ApiError> {
    let ttl = p
        .as_ref()
        .and_then(|p| p.dns_properties.as_ref())
        .and_then(|d| d.soa.as_ref())
        .map(|s| s.ttl);
    range("SOA.TTL", ttl, 0, 2_147_483_647)?;
    Ok(ttl.map(|t| t as u32))
}

fn namespace_json(st: &State, n: &Namespace, full: bool) -> Value {
    let mut props = json!({});
    if n.kind.is_dns() {
        props["DnsProperties"] = json!({
            "HostedZoneId": format!("Z{}", n.id.trim_start_matches("ns-").to_ascii_uppercase()),
            "SOA": {"TTL": n.soa_ttl.unwrap_or(crate::dns::DEFAULT_SOA_TTL)},
        });
    }
    props["HttpProperties"] = json!({"HttpName": n.name});
    let mut v = json!({
        "Id": n.id, "Arn": n.arn, "Name": n.name, "Type": n.kind.as_str(),
        "ServiceCount": st.service_count(&n.id), "Properties": props, "CreateDate": n.create_date,
    });
    if let Some(d) = &n.description {
        v["Description"] = json!(d);
    }
    if full && let Some(c) = &n.creator_request_id {
        v["CreatorRequestId"] = json!(c);
    }
    v
}

fn create_namespace(
    reg: &Registry,
    kind: NamespaceType,
    req: CreateNamespace,
) -> Result<Value, ApiError> {
    let max = if kind == NamespaceType::Http {
        1024
    } else {
        253
    };
    max_len("Name", &req.name, max)?;
    opt_max_len("CreatorRequestId", &req.creator_request_id, 64)?;
    opt_max_len("Description", &req.description, 1024)?;
    input::tags(&req.tags)?;
    if kind.is_dns() {
        req.name
            .trim_end_matches('.')
            .parse::<NamespaceName>()
            .map_err(|e| ApiError::InvalidInput(e.to_string()))?;
    } else if req.name.is_empty()
        || req.name.starts_with("arn:")
        || !req.name.bytes().all(|b| (b'!'..=b'~').contains(&b))
    {
        return Err(ApiError::InvalidInput(format!(
            "Name {:?} is not valid",
            req.name
        )));
    }
    if kind == NamespaceType::DnsPrivate && req.vpc.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::InvalidInput("Vpc is required".into()));
    }
    let soa = soa_ttl(&req.properties)?;
    let name = req.name.trim_end_matches('.').to_owned();

    let _w = reg.writer();
    let st = reg.read();
    if let Some(existing) = st.namespace_by_name(&name) {
        if let Some(c) = &req.creator_request_id
            && existing.creator_request_id.as_ref() == Some(c)
            && let Some(op) = st.requests.get(&format!("ns/{c}"))
        {
            return Ok(json!({"OperationId": op}));
        }
        return Err(ApiError::NamespaceAlreadyExists(format!(
            "Namespace {name} already exists ({})",
            existing.id
        )));
    }
    if let Some(c) = &req.creator_request_id
        && st.requests.contains_key(&format!("ns/{c}"))
    {
        return Err(ApiError::DuplicateRequest(format!(
            "CreatorRequestId {c} was already used for another namespace"
        )));
    }
    drop(st);
    let id = random_id("ns-", 16);
    let ns = Namespace {
        arn: arn(reg, "namespace", &id),
        id: id.clone(),
        name,
        kind,
        description: req.description,
        soa_ttl: soa,
        create_date: now_epoch(),
        creator_request_id: req.creator_request_id.clone(),
    };
    let op = operation("CREATE_NAMESPACE", &[("NAMESPACE", &id)]);
    let op_id = op.id.clone();
    let mut changes = vec![Change::PutNamespace(ns.clone()), Change::PutOperation(op)];
    if let Some(c) = req.creator_request_id {
        changes.push(Change::PutRequest(format!("ns/{c}"), op_id.clone()));
    }
    if let Some(t) = req.tags.filter(|t| !t.is_empty()) {
        changes.push(Change::PutTags(ns.arn.clone(), t));
    }
    reg.commit(changes)?;
    Ok(json!({"OperationId": op_id}))
}

fn get_namespace(reg: &Registry, req: IdOnly) -> Result<Value, ApiError> {
    let st = reg.read();
    let n = namespace(&st, &req.id)?;
    Ok(json!({"Namespace": namespace_json(&st, n, true)}))
}

fn list_namespaces(reg: &Registry, req: List) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 100)?;
    let filters = req.filters.unwrap_or_default();
    for f in &filters {
        check_filter(f, &["TYPE", "NAME", "HTTP_NAME", "RESOURCE_OWNER"])?;
    }
    let st = reg.read();
    let account = reg.config().account.clone();
    let items: Vec<Value> = st
        .namespaces
        .values()
        .filter(|n| {
            filters.iter().all(|f| match f.name.as_str() {
                "TYPE" => filter_accepts(f, n.kind.as_str()),
                "NAME" | "HTTP_NAME" => filter_accepts(f, &n.name),
                _ => filter_accepts(f, &account),
            })
        })
        .map(|n| namespace_json(&st, n, false))
        .collect();
    let (page, next) = page(items, &req.next_token, req.max_results, 100)?;
    Ok(with_token(json!({"Namespaces": page}), next))
}

fn with_token(mut v: Value, next: Option<String>) -> Value {
    if let Some(t) = next {
        v["NextToken"] = json!(t);
    }
    v
}

fn update_namespace(reg: &Registry, req: UpdateNamespace) -> Result<Value, ApiError> {
    opt_max_len("Description", &req.namespace.description, 1024)?;
    opt_max_len("UpdaterRequestId", &req.updater_request_id, 64)?;
    let soa = soa_ttl(&req.namespace.properties)?;
    let _w = reg.writer();
    let mut ns = namespace(&reg.read(), &req.id)?.clone();
    if let Some(d) = req.namespace.description {
        ns.description = Some(d);
    }
    if soa.is_some() {
        ns.soa_ttl = soa;
    }
    let op = operation("UPDATE_NAMESPACE", &[("NAMESPACE", &ns.id)]);
    let op_id = op.id.clone();
    reg.commit(vec![Change::PutNamespace(ns), Change::PutOperation(op)])?;
    Ok(json!({"OperationId": op_id}))
}

fn delete_namespace(reg: &Registry, req: IdOnly) -> Result<Value, ApiError> {
    let _w = reg.writer();
    let st = reg.read();
    let ns = namespace(&st, &req.id)?.clone();
    if st.service_count(&ns.id) > 0 {
        return Err(ApiError::ResourceInUse(format!(
            "Namespace {} has services; delete them first",
            ns.id
        )));
    }
    drop(st);
    let op = operation("DELETE_NAMESPACE", &[("NAMESPACE", &ns.id)]);
    let op_id = op.id.clone();
    reg.commit(vec![
        Change::DeleteNamespace(ns.id.clone()),
        Change::DeleteTags(ns.arn.clone()),
        Change::PutOperation(op),
    ])?;
    Ok(json!({"OperationId": op_id}))
}

fn service_json(reg: &Registry, e: &ServiceEntry, full: bool) -> Value {
    let s = &e.service;
    let mut v = json!({
        "Id": s.id, "Arn": s.arn, "Name": s.name, "NamespaceId": s.namespace_id, "Type": s.kind,
        "InstanceCount": e.instances.len(), "CreateDate": s.create_date,
        "ResourceOwner": reg.config().account, "CreatedByAccount": reg.config().account,
    });
    if let Some(d) = &s.description {
        v["Description"] = json!(d);
    }
    if let Some(d) = &s.dns_config {
        v["DnsConfig"] = serde_json::to_value(d).unwrap_or(Value::Null);
    }
    if let Some(h) = &s.health_check_config {
        v["HealthCheckConfig"] = serde_json::to_value(h).unwrap_or(Value::Null);
    }
    if let Some(h) = &s.health_check_custom_config {
        v["HealthCheckCustomConfig"] = serde_json::to_value(h).unwrap_or(Value::Null);
    }
    if full && let Some(c) = &s.creator_request_id {
        v["CreatorRequestId"] = json!(c);
    }
    v
}

fn check_health_config(h: &Option<crate::model::HealthCheckConfig>) -> Result<(), ApiError> {
    if let Some(h) = h {
        range(
            "HealthCheckConfig.FailureThreshold",
            h.failure_threshold.map(i64::from),
            1,
            10,
        )?;
        opt_max_len("HealthCheckConfig.ResourcePath", &h.resource_path, 255)?;
        if let Some(p) = &h.resource_path
            && !p.starts_with('/')
        {
            return Err(ApiError::InvalidInput(
                "ResourcePath must start with '/'".into(),
            ));
        }
    }
    Ok(())
}

fn check_records(records: &[crate::model::DnsRecord]) -> Result<(), ApiError> {
    if records.is_empty() {
        return Err(ApiError::InvalidInput(
            "DnsRecords must not be empty".into(),
        ));
    }
    let has = |k| records.iter().any(|r| r.kind == k);
    if has(RecordType::Cname) && records.len() > 1 {
        return Err(ApiError::InvalidInput(
            "a CNAME record cannot be combined with others".into(),
        ));
    }
    for r in records {
        if r.ttl > 2_147_483_647 {
            return Err(ApiError::InvalidInput(
                "TTL must be at most 2147483647".into(),
            ));
        }
    }
    Ok(())
}

fn create_service(reg: &Registry, req: CreateService) -> Result<Value, ApiError> {
    req.name
        .parse::<ServiceName>()
        .map_err(|e| ApiError::InvalidInput(e.to_string()))?;
    opt_max_len("CreatorRequestId", &req.creator_request_id, 64)?;
    opt_max_len("Description", &req.description, 1024)?;
    input::tags(&req.tags)?;
    check_health_config(&req.health_check_config)?;
    if let Some(c) = &req.health_check_custom_config {
        range(
            "HealthCheckCustomConfig.FailureThreshold",
            c.failure_threshold.map(i64::from),
            1,
            10,
        )?;
        if req.health_check_config.is_some() {
            return Err(ApiError::InvalidInput(
                "HealthCheckConfig and HealthCheckCustomConfig are mutually exclusive".into(),
            ));
        }
    }
    if let Some(d) = &req.dns_config {
        check_records(&d.dns_records)?;
    }
    if let Some(k) = &req.kind
        && k != "HTTP"
    {
        return Err(ApiError::InvalidInput("Type must be HTTP".into()));
    }
    let ns_id = req
        .namespace_id
        .clone()
        .or_else(|| req.dns_config.as_ref().and_then(|d| d.namespace_id.clone()))
        .ok_or_else(|| ApiError::InvalidInput("NamespaceId is required".into()))?;

    let _w = reg.writer();
    let st = reg.read();
    let ns = namespace(&st, &ns_id)?.clone();
    if let Some(existing) = st.service_by_name(&ns.id, &req.name) {
        if req.creator_request_id.is_some()
            && existing.service.creator_request_id == req.creator_request_id
        {
            return Ok(json!({"Service": service_json(reg, existing, true)}));
        }
        return Err(ApiError::ServiceAlreadyExists(format!(
            "Service {} already exists in namespace {} ({})",
            req.name, ns.id, existing.service.id
        )));
    }
    if req.dns_config.is_some() && !ns.kind.is_dns() {
        return Err(ApiError::InvalidInput(
            "DnsConfig is only valid in a DNS namespace".into(),
        ));
    }
    drop(st);
    let kind = match (&req.dns_config, req.kind.as_deref()) {
        (_, Some("HTTP")) => "HTTP",
        (Some(_), _) => "DNS_HTTP",
        (None, _) => "HTTP",
    };
    let id = random_id("srv-", 16);
    let mut dns_config = req.dns_config;
    if let Some(d) = &mut dns_config {
        d.namespace_id = None;
        d.routing_policy
            .get_or_insert(crate::model::RoutingPolicy::Multivalue);
    }
    let svc = Service {
        arn: arn(reg, "service", &id),
        id,
        name: req.name,
        namespace_id: ns.id,
        description: req.description,
        dns_config,
        kind: kind.into(),
        health_check_config: req.health_check_config,
        health_check_custom_config: req.health_check_custom_config,
        create_date: now_epoch(),
        creator_request_id: req.creator_request_id,
        revision: 0,
        attributes: BTreeMap::new(),
    };
    let mut changes = vec![Change::PutService(svc.clone())];
    if let Some(t) = req.tags.filter(|t| !t.is_empty()) {
        changes.push(Change::PutTags(svc.arn.clone(), t));
    }
    reg.commit(changes)?;
    let st = reg.read();
    let e = service(&st, &svc.id)?;
    Ok(json!({"Service": service_json(reg, e, true)}))
}

fn get_service(reg: &Registry, req: IdOnly) -> Result<Value, ApiError> {
    let st = reg.read();
    let e = service(&st, &req.id)?;
    Ok(json!({"Service": service_json(reg, e, true)}))
}

fn list_services(reg: &Registry, req: List) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 100)?;
    let filters = req.filters.unwrap_or_default();
    for f in &filters {
        check_filter(f, &["NAMESPACE_ID", "RESOURCE_OWNER"])?;
    }
    let st = reg.read();
    let account = reg.config().account.clone();
    let items: Vec<Value> = st
        .services
        .values()
        .filter(|e| {
            filters.iter().all(|f| match f.name.as_str() {
                "NAMESPACE_ID" => filter_accepts(f, &e.service.namespace_id),
                _ => filter_accepts(f, &account),
            })
        })
        .map(|e| service_json(reg, e, false))
        .collect();
    let (page, next) = page(items, &req.next_token, req.max_results, 100)?;
    Ok(with_token(json!({"Services": page}), next))
}

fn update_service(reg: &Registry, req: UpdateService) -> Result<Value, ApiError> {
    opt_max_len("Description", &req.service.description, 1024)?;
    check_health_config(&req.service.health_check_config)?;
    if let Some(d) = &req.service.dns_config {
        check_records(&d.dns_records)?;
    }
    let _w = reg.writer();
    let mut svc = service(&reg.read(), &req.id)?.service.clone();
    if let Some(d) = req.service.description {
        svc.description = Some(d);
    }
    if let Some(d) = req.service.dns_config {
        match &mut svc.dns_config {
            Some(cfg) => cfg.dns_records = d.dns_records,
            None => {
                return Err(ApiError::InvalidInput(
                    "the service has no DnsConfig to update".into(),
                ));
            }
        }
    }
    if let Some(h) = req.service.health_check_config {
        svc.health_check_config = Some(h);
    }
    let op = operation("UPDATE_SERVICE", &[("SERVICE", &svc.id)]);
    let op_id = op.id.clone();
    reg.commit(vec![Change::PutService(svc), Change::PutOperation(op)])?;
    Ok(json!({"OperationId": op_id}))
}

/// At most this many attributes per service (Cloud Map's quota).
const MAX_SERVICE_ATTRIBUTES: usize = 30;

fn get_service_attributes(reg: &Registry, req: ServiceIdOnly) -> Result<Value, ApiError> {
    max_len("ServiceId", &req.service_id, 255)?;
    let st = reg.read();
    let s = &service(&st, &req.service_id)?.service;
    Ok(json!({"ServiceAttributes": {
        "ServiceArn": s.arn, "ResourceOwner": reg.config().account, "Attributes": s.attributes,
    }}))
}

/// The bounds an attributes update or delete shares: the service id, 1–30 entries.
fn attributes_request(service_id: &str, entries: usize) -> Result<(), ApiError> {
    max_len("ServiceId", service_id, 255)?;
    if entries == 0 || entries > MAX_SERVICE_ATTRIBUTES {
        return Err(ApiError::InvalidInput(format!(
            "Attributes must hold 1-{MAX_SERVICE_ATTRIBUTES} entries"
        )));
    }
    Ok(())
}

fn update_service_attributes(
    reg: &Registry,
    req: UpdateServiceAttributes,
) -> Result<Value, ApiError> {
    attributes_request(&req.service_id, req.attributes.len())?;
    for (k, v) in &req.attributes {
        if k.is_empty() || k.len() > 255 || v.len() > 1024 {
            return Err(ApiError::InvalidInput(format!(
                "attribute {k:?}: keys are 1-255 characters and values 0-1024"
            )));
        }
    }
    let _w = reg.writer();
    let mut svc = service(&reg.read(), &req.service_id)?.service.clone();
    svc.attributes.extend(req.attributes);
    // Pushed routes are checked as a whole (priorities are unique across them).
    trellis_core::route_spec::pushed_routes(
        svc.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(ApiError::InvalidInput)?;
    if svc.attributes.len() > MAX_SERVICE_ATTRIBUTES {
        return Err(ApiError::ServiceAttributesLimitExceeded(format!(
            "Service {} would have {} attributes; at most {MAX_SERVICE_ATTRIBUTES}",
            svc.id,
            svc.attributes.len()
        )));
    }
    reg.commit(vec![Change::PutService(svc)])?;
    Ok(json!({}))
}

fn delete_service_attributes(
    reg: &Registry,
    req: DeleteServiceAttributes,
) -> Result<Value, ApiError> {
    attributes_request(&req.service_id, req.attributes.len())?;
    let _w = reg.writer();
    let mut svc = service(&reg.read(), &req.service_id)?.service.clone();
    // Keys the service does not have are not an error (as in Cloud Map).
    let before = svc.attributes.len();
    for k in &req.attributes {
        svc.attributes.remove(k);
    }
    if svc.attributes.len() != before {
        reg.commit(vec![Change::PutService(svc)])?;
    }
    Ok(json!({}))
}

fn delete_service(reg: &Registry, req: IdOnly) -> Result<Value, ApiError> {
    let _w = reg.writer();
    let st = reg.read();
    let e = service(&st, &req.id)?;
    if !e.instances.is_empty() {
        return Err(ApiError::ResourceInUse(format!(
            "Service {} has registered instances; deregister them first",
            e.service.id
        )));
    }
    let (id, arn) = (e.service.id.clone(), e.service.arn.clone());
    drop(st);
    reg.commit(vec![Change::DeleteService(id), Change::DeleteTags(arn)])?;
    Ok(json!({}))
}

fn valid_instance_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_/:.@-".contains(&b))
    {
        return Err(ApiError::InvalidInput(format!(
            "InstanceId {id:?} must be 1-64 characters of [0-9a-zA-Z_/:.@-]"
        )));
    }
    Ok(())
}

fn register_instance(reg: &Registry, req: RegisterInstance) -> Result<Value, ApiError> {
    valid_instance_id(&req.instance_id)?;
    opt_max_len("CreatorRequestId", &req.creator_request_id, 64)?;
    if req.attributes.len() > MAX_ATTRIBUTES {
        return Err(ApiError::InvalidInput(format!(
            "at most {MAX_ATTRIBUTES} attributes"
        )));
    }
    for (k, v) in &req.attributes {
        if k.is_empty() || k.len() > 255 || v.len() > 1024 {
            return Err(ApiError::InvalidInput(
                "attribute keys are 1-255 characters and values at most 1024".into(),
            ));
        }
    }
    let a = &req.attributes;
    if let Some(ip) = a.get(attr::IPV4)
        && ip.parse::<std::net::Ipv4Addr>().is_err()
    {
        return Err(ApiError::InvalidInput(format!(
            "{} {ip:?} is not an IPv4 address",
            attr::IPV4
        )));
    }
    if let Some(ip) = a.get(attr::IPV6)
        && ip.parse::<std::net::Ipv6Addr>().is_err()
    {
        return Err(ApiError::InvalidInput(format!(
            "{} {ip:?} is not an IPv6 address",
            attr::IPV6
        )));
    }
    if let Some(p) = a.get(attr::PORT)
        && p.parse::<u16>().ok().filter(|p| *p > 0).is_none()
    {
        return Err(ApiError::InvalidInput(format!(
            "{} {p:?} is not a port",
            attr::PORT
        )));
    }
    if let Some(w) = a.get(attr::WEIGHT)
        && w.parse::<u32>().is_err()
    {
        return Err(ApiError::InvalidInput(format!(
            "{} {w:?} is not a weight",
            attr::WEIGHT
        )));
    }
    if let Some(t) = a.get(attr::HEALTH_TTL)
        && humantime::parse_duration(t)
            .ok()
            .filter(|d| !d.is_zero())
            .is_none()
    {
        return Err(ApiError::InvalidInput(format!(
            "{} {t:?} is not a duration",
            attr::HEALTH_TTL
        )));
    }

    let _w = reg.writer();
    let st = reg.read();
    let e = service(&st, &req.service_id)?;
    if let Some(c) = &req.creator_request_id
        && let Some(op) = st.requests.get(&format!("inst/{}/{c}", e.service.id))
    {
        return Ok(json!({"OperationId": op}));
    }
    if let Some(dns) = &e.service.dns_config {
        let needs = |k| dns.dns_records.iter().any(|r| r.kind == k);
        if needs(RecordType::A) && !a.contains_key(attr::IPV4) && !a.contains_key(attr::ALIAS) {
            return Err(ApiError::InvalidInput(format!(
                "the service has an A record: {} is required",
                attr::IPV4
            )));
        }
        if needs(RecordType::Aaaa) && !a.contains_key(attr::IPV6) && !a.contains_key(attr::ALIAS) {
            return Err(ApiError::InvalidInput(format!(
                "the service has an AAAA record: {} is required",
                attr::IPV6
            )));
        }
        if needs(RecordType::Srv) && !a.contains_key(attr::PORT) {
            return Err(ApiError::InvalidInput(format!(
                "the service has an SRV record: {} is required",
                attr::PORT
            )));
        }
        if needs(RecordType::Cname) && !a.contains_key(attr::CNAME) {
            return Err(ApiError::InvalidInput(format!(
                "the service has a CNAME record: {} is required",
                attr::CNAME
            )));
        }
    }
    let sid = e.service.id.clone();
    drop(st);
    let inst = Instance {
        id: req.instance_id.clone(),
        service_id: sid.clone(),
        creator_request_id: req.creator_request_id.clone(),
        attributes: req.attributes,
    };
    let op = operation(
        "REGISTER_INSTANCE",
        &[("SERVICE", &sid), ("INSTANCE", &req.instance_id)],
    );
    let op_id = op.id.clone();
    let mut changes = vec![Change::PutInstance(inst), Change::PutOperation(op)];
    if let Some(c) = req.creator_request_id {
        changes.push(Change::PutRequest(format!("inst/{sid}/{c}"), op_id.clone()));
    }
    reg.commit(changes)?;
    Ok(json!({"OperationId": op_id}))
}

fn deregister_instance(reg: &Registry, req: InstanceRef) -> Result<Value, ApiError> {
    let _w = reg.writer();
    let st = reg.read();
    let e = service(&st, &req.service_id)?;
    if !e.instances.contains_key(&req.instance_id) {
        return Err(ApiError::InstanceNotFound(format!(
            "Instance {} not found in service {}",
            req.instance_id, e.service.id
        )));
    }
    let sid = e.service.id.clone();
    drop(st);
    let op = operation(
        "DEREGISTER_INSTANCE",
        &[("SERVICE", &sid), ("INSTANCE", &req.instance_id)],
    );
    let op_id = op.id.clone();
    reg.commit(vec![
        Change::DeleteInstance {
            service_id: sid,
            id: req.instance_id,
        },
        Change::PutOperation(op),
    ])?;
    Ok(json!({"OperationId": op_id}))
}

fn get_instance(reg: &Registry, req: InstanceRef) -> Result<Value, ApiError> {
    let st = reg.read();
    let e = service(&st, &req.service_id)?;
    let i = e.instances.get(&req.instance_id).ok_or_else(|| {
        ApiError::InstanceNotFound(format!("Instance {} not found", req.instance_id))
    })?;
    let mut inst = json!({"Id": i.instance.id, "Attributes": i.instance.attributes,
        "CreatedByAccount": reg.config().account});
    if let Some(c) = &i.instance.creator_request_id {
        inst["CreatorRequestId"] = json!(c);
    }
    Ok(json!({"ResourceOwner": reg.config().account, "Instance": inst}))
}

fn list_instances(reg: &Registry, req: ListInstances) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 100)?;
    let st = reg.read();
    let e = service(&st, &req.service_id)?;
    let items: Vec<Value> = e
        .instances
        .values()
        .map(|i| {
            json!({"Id": i.instance.id, "Attributes": i.instance.attributes,
            "CreatedByAccount": reg.config().account})
        })
        .collect();
    let (page, next) = page(items, &req.next_token, req.max_results, 100)?;
    Ok(with_token(
        json!({"Instances": page, "ResourceOwner": reg.config().account}),
        next,
    ))
}

fn lookup<'a>(
    st: &'a State,
    ns: &str,
    svc: &str,
) -> Result<(&'a Namespace, &'a ServiceEntry), ApiError> {
    let n = st
        .namespace_by_name(ns)
        .ok_or_else(|| ApiError::NamespaceNotFound(format!("Namespace {ns} not found")))?;
    let e = st
        .service_by_name(&n.id, svc)
        .ok_or_else(|| ApiError::ServiceNotFound(format!("Service {svc} not found in {ns}")))?;
    Ok((n, e))
}

fn discover(reg: &Registry, req: Discover) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 1000)?;
    max_len("NamespaceName", &req.namespace_name, 1024)?;
    max_len("ServiceName", &req.service_name, 127)?;
    let mode = req.health_status.as_deref().unwrap_or("HEALTHY");
    if !["HEALTHY", "UNHEALTHY", "ALL", "HEALTHY_OR_ELSE_ALL"].contains(&mode) {
        return Err(ApiError::InvalidInput(format!(
            "HealthStatus {mode} is not valid"
        )));
    }
    if let Some(o) = &req.owner_account
        && o != &reg.config().account
    {
        return Err(ApiError::NamespaceNotFound(format!(
            "Namespace {} not found for account {o}",
            req.namespace_name
        )));
    }
    let st = reg.read();
    let (n, e) = lookup(&st, &req.namespace_name, &req.service_name)?;
    let matches = |attrs: &BTreeMap<String, String>, params: &BTreeMap<String, String>| {
        params.iter().all(|(k, v)| attrs.get(k) == Some(v))
    };
    let query = req.query_parameters.unwrap_or_default();
    let mut selected: Vec<_> = e
        .instances
        .values()
        .filter(|i| matches(&i.instance.attributes, &query))
        .filter(|i| match mode {
            "HEALTHY" => i.health.is_serving(),
            "UNHEALTHY" => i.health == HealthStatus::Unhealthy,
            _ => true,
        })
        .collect();
    if mode == "HEALTHY_OR_ELSE_ALL" && selected.iter().any(|i| i.health.is_serving()) {
        selected.retain(|i| i.health.is_serving());
    }
    if let Some(opt) = req.optional_parameters.filter(|o| !o.is_empty()) {
        let narrowed: Vec<_> = selected
            .iter()
            .copied()
            .filter(|i| matches(&i.instance.attributes, &opt))
            .collect();
        if !narrowed.is_empty() {
            selected = narrowed;
        }
    }
    selected.shuffle(&mut rand::rng());
    selected.truncate(req.max_results.map(|m| m as usize).unwrap_or(100));
    let instances: Vec<Value> = selected
        .into_iter()
        .map(|i| {
            json!({"InstanceId": i.instance.id, "NamespaceName": n.name,
            "ServiceName": e.service.name, "HealthStatus": i.health.as_str(),
            "Attributes": i.instance.attributes})
        })
        .collect();
    Ok(json!({"Instances": instances, "InstancesRevision": e.revision}))
}

fn discover_revision(reg: &Registry, req: Discover) -> Result<Value, ApiError> {
    let st = reg.read();
    let (_, e) = lookup(&st, &req.namespace_name, &req.service_name)?;
    Ok(json!({"InstancesRevision": e.revision}))
}

fn health_status(reg: &Registry, req: HealthStatusReq) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 100)?;
    let st = reg.read();
    let e = service(&st, &req.service_id)?;
    let mut items = Vec::new();
    match &req.instances {
        Some(ids) if !ids.is_empty() => {
            for id in ids {
                let i = e.instances.get(id).ok_or_else(|| {
                    ApiError::InstanceNotFound(format!("Instance {id} not found"))
                })?;
                items.push((id.clone(), i.health.as_str()));
            }
        }
        _ => items.extend(
            e.instances
                .iter()
                .map(|(id, i)| (id.clone(), i.health.as_str())),
        ),
    }
    let (page, next) = page(items, &req.next_token, req.max_results, 100)?;
    let status: serde_json::Map<String, Value> =
        page.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Ok(with_token(json!({"Status": status}), next))
}

fn custom_health(reg: &Registry, req: CustomHealth) -> Result<Value, ApiError> {
    let status = match req.status.as_str() {
        "HEALTHY" => HealthStatus::Healthy,
        "UNHEALTHY" => HealthStatus::Unhealthy,
        other => {
            return Err(ApiError::InvalidInput(format!(
                "Status {other} is not valid"
            )));
        }
    };
    let sid = {
        let st = reg.read();
        let e = service(&st, &req.service_id)?;
        if e.service.health_check_custom_config.is_none() {
            return Err(ApiError::CustomHealthNotFound(format!(
                "Service {} has no HealthCheckCustomConfig",
                e.service.id
            )));
        }
        if !e.instances.contains_key(&req.instance_id) {
            return Err(ApiError::InstanceNotFound(format!(
                "Instance {} not found",
                req.instance_id
            )));
        }
        e.service.id.clone()
    };
    reg.set_health(&sid, &req.instance_id, status);
    Ok(json!({}))
}

fn operation_json(o: &Operation) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

fn get_operation(reg: &Registry, req: GetOperation) -> Result<Value, ApiError> {
    let st = reg.read();
    let o = st.operations.get(&req.operation_id).ok_or_else(|| {
        ApiError::OperationNotFound(format!("Operation {} not found", req.operation_id))
    })?;
    Ok(json!({"Operation": operation_json(o)}))
}

fn list_operations(reg: &Registry, req: List) -> Result<Value, ApiError> {
    range("MaxResults", req.max_results, 1, 100)?;
    let filters = req.filters.unwrap_or_default();
    for f in &filters {
        check_filter(
            f,
            &[
                "NAMESPACE_ID",
                "SERVICE_ID",
                "STATUS",
                "TYPE",
                "UPDATE_DATE",
            ],
        )?;
        if f.name == "UPDATE_DATE"
            && (f.condition.as_deref() != Some("BETWEEN") || f.values.len() != 2)
        {
            return Err(ApiError::InvalidInput(
                "UPDATE_DATE takes BETWEEN with two values".into(),
            ));
        }
    }
    let between = |f: &input::Filter, t: f64| {
        let b: Vec<f64> = f.values.iter().filter_map(|v| v.parse().ok()).collect();
        b.len() == 2 && t >= b[0] && t <= b[1]
    };
    let st = reg.read();
    let mut ops: Vec<&Operation> = st
        .operations
        .values()
        .filter(|o| {
            filters.iter().all(|f| match f.name.as_str() {
                "NAMESPACE_ID" => o
                    .targets
                    .get("NAMESPACE")
                    .is_some_and(|v| filter_accepts(f, v)),
                "SERVICE_ID" => o
                    .targets
                    .get("SERVICE")
                    .is_some_and(|v| filter_accepts(f, v)),
                "STATUS" => filter_accepts(f, &o.status),
                "TYPE" => filter_accepts(f, &o.kind),
                _ => between(f, o.update_date),
            })
        })
        .collect();
    ops.sort_by(|a, b| {
        a.create_date
            .total_cmp(&b.create_date)
            .then(a.id.cmp(&b.id))
    });
    let items: Vec<Value> = ops
        .into_iter()
        .map(|o| json!({"Id": o.id, "Status": o.status}))
        .collect();
    let (page, next) = page(items, &req.next_token, req.max_results, 100)?;
    Ok(with_token(json!({"Operations": page}), next))
}

fn resource_exists(st: &State, arn: &str) -> bool {
    st.namespaces.values().any(|n| n.arn == arn)
        || st.services.values().any(|e| e.service.arn == arn)
}

fn tag_resource(reg: &Registry, req: TagResource) -> Result<Value, ApiError> {
    input::tags(&Some(req.tags.clone()))?;
    let _w = reg.writer();
    let st = reg.read();
    if !resource_exists(&st, &req.resource_arn) {
        return Err(ApiError::ResourceNotFound(format!(
            "Resource {} not found",
            req.resource_arn
        )));
    }
    let mut tags: Vec<Tag> = st.tags.get(&req.resource_arn).cloned().unwrap_or_default();
    drop(st);
    for t in req.tags {
        tags.retain(|x| x.key != t.key);
        tags.push(t);
    }
    if tags.len() > 200 {
        return Err(ApiError::TooManyTags(
            "at most 200 tags per resource".into(),
        ));
    }
    reg.commit(vec![Change::PutTags(req.resource_arn, tags)])?;
    Ok(json!({}))
}

fn untag_resource(reg: &Registry, req: UntagResource) -> Result<Value, ApiError> {
    let _w = reg.writer();
    let st = reg.read();
    if !resource_exists(&st, &req.resource_arn) {
        return Err(ApiError::ResourceNotFound(format!(
            "Resource {} not found",
            req.resource_arn
        )));
    }
    let mut tags: Vec<Tag> = st.tags.get(&req.resource_arn).cloned().unwrap_or_default();
    drop(st);
    tags.retain(|t| !req.tag_keys.contains(&t.key));
    reg.commit(vec![Change::PutTags(req.resource_arn, tags)])?;
    Ok(json!({}))
}

fn list_tags(reg: &Registry, req: ResourceArn) -> Result<Value, ApiError> {
    let st = reg.read();
    if !resource_exists(&st, &req.resource_arn) {
        return Err(ApiError::ResourceNotFound(format!(
            "Resource {} not found",
            req.resource_arn
        )));
    }
    let tags = st.tags.get(&req.resource_arn).cloned().unwrap_or_default();
    Ok(json!({"Tags": tags}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryConfig;
    use crate::store::MemoryStore;

    fn reg() -> std::sync::Arc<Registry> {
        Registry::open(Box::new(MemoryStore::default()), RegistryConfig::default()).unwrap()
    }

    fn call(r: &Registry, action: &str, body: Value) -> Result<Value, ApiError> {
        handle_action(r, action, body.to_string().as_bytes())
    }

    fn namespace(r: &Registry, name: &str) -> String {
        let op = call(r, "CreateHttpNamespace", json!({"Name": name})).unwrap();
        let got = call(r, "GetOperation", json!({"OperationId": op["OperationId"]})).unwrap();
        got["Operation"]["Targets"]["NAMESPACE"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn every_known_action_is_dispatched() {
        // The metrics' `action` label and the fuzzer take their names from this list.
        let r = reg();
        assert_eq!(
            crate::http::KNOWN_ACTIONS.len(),
            30,
            "botocore's model has 30"
        );
        for action in crate::http::KNOWN_ACTIONS {
            let got = call(&r, action, json!({}));
            assert!(
                !matches!(got, Err(ApiError::UnknownOperation(_))),
                "{action} is listed but not dispatched"
            );
        }
    }

    #[test]
    fn wrong_types_and_unknown_actions_are_invalid_input() {
        let r = reg();
        assert!(matches!(
            call(&r, "GetNamespace", json!({"Id": 5})),
            Err(ApiError::InvalidInput(_))
        ));
        assert!(matches!(
            call(&r, "GetNamespace", json!([])),
            Err(ApiError::InvalidInput(_))
        ));
        assert!(matches!(
            handle_action(&r, "ListNamespaces", b"\xff\xfe"),
            Err(ApiError::InvalidInput(_))
        ));
        assert!(matches!(
            call(&r, "Nope", json!({})),
            Err(ApiError::UnknownOperation(_))
        ));
        assert!(matches!(
            call(&r, "ListNamespaces", json!({"MaxResults": 0})),
            Err(ApiError::InvalidInput(_))
        ));
        assert!(matches!(
            call(
                &r,
                "ListNamespaces",
                json!({"Filters": [{"Name": "BOGUS", "Values": ["x"]}]})
            ),
            Err(ApiError::InvalidInput(_))
        ));
    }

    #[test]
    fn pagination_and_in_use_and_idempotent_services() {
        let r = reg();
        for i in 0..5 {
            namespace(&r, &format!("n{i}"));
        }
        let p1 = call(&r, "ListNamespaces", json!({"MaxResults": 2})).unwrap();
        assert_eq!(p1["Namespaces"].as_array().unwrap().len(), 2);
        let huge = json!({"MaxResults": 100, "NextToken": format!("trellis-{}", usize::MAX)});
        let empty = call(&r, "ListNamespaces", huge).unwrap();
        assert_eq!(empty["Namespaces"].as_array().unwrap().len(), 0);
        let p3 = call(
            &r,
            "ListNamespaces",
            json!({"MaxResults": 2, "NextToken": "trellis-4"}),
        )
        .unwrap();
        assert_eq!(p3["Namespaces"].as_array().unwrap().len(), 1);
        assert!(p3.get("NextToken").is_none());

        let ns = namespace(&r, "svcs");
        let req = json!({"Name": "a", "NamespaceId": ns, "CreatorRequestId": "c1"});
        let s1 = call(&r, "CreateService", req.clone()).unwrap();
        let s2 = call(&r, "CreateService", req).unwrap();
        assert_eq!(s1["Service"]["Id"], s2["Service"]["Id"]);
        assert!(matches!(
            call(&r, "DeleteNamespace", json!({"Id": ns})),
            Err(ApiError::ResourceInUse(_))
        ));
        let sid = s1["Service"]["Id"].clone();
        let reg_req = json!({"ServiceId": sid, "InstanceId": "i", "CreatorRequestId": "r1", "Attributes": {"k": "v"}});
        let o1 = call(&r, "RegisterInstance", reg_req.clone()).unwrap();
        let o2 = call(&r, "RegisterInstance", reg_req).unwrap();
        assert_eq!(o1["OperationId"], o2["OperationId"]);
        let too_many: serde_json::Map<String, Value> =
            (0..31).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(matches!(
            call(
                &r,
                "RegisterInstance",
                json!({"ServiceId": sid, "InstanceId": "j", "Attributes": too_many})
            ),
            Err(ApiError::InvalidInput(_))
        ));
        assert!(matches!(
            call(
                &r,
                "RegisterInstance",
                json!({"ServiceId": sid, "InstanceId": "bad id!", "Attributes": {}})
            ),
            Err(ApiError::InvalidInput(_))
        ));
        // Service ids may be given as ARNs.
        let arn = s1["Service"]["Arn"].clone();
        assert!(call(&r, "GetService", json!({"Id": arn})).is_ok());
    }
}
