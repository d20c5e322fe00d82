//! The in-memory registry over a durable [`Store`]: namespaces, services, instances, operations,
//! tags, health state and per-service change notification (watch API, DNS).
//!
//! Writers are serialized by one lock; a write is persisted (fsync) before it becomes visible, so
//! every acknowledged change survives a crash. Readers (DNS, watch) take a short read lock.
//! Over a replicated store (etcd) the registry is a view: every change, this replica's own
//! included, arrives through the store's feed, and revisions derive from the store's revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use tokio::sync::{Notify, watch};
use trellis_core::{Endpoint, EndpointSet, HealthStatus};

use crate::error::ApiError;
use crate::model::{Instance, Namespace, Operation, Service, Tag, attr};
use crate::store::{FeedSink, RESYNC, Store, StoreError, Write};

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub region: String,
    pub account: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            region: "us-east-1".into(),
            account: "123456789012".into(),
        }
    }
}

pub struct InstanceEntry {
    pub instance: Instance,
    pub health: HealthStatus,
    pub last_heartbeat: Option<Instant>,
}

pub struct ServiceEntry {
    pub service: Service,
    pub instances: BTreeMap<String, InstanceEntry>,
    pub revision: u64,
    pub changes: watch::Sender<u64>,
}

#[derive(Default)]
pub struct State {
    pub namespaces: BTreeMap<String, Namespace>,
    pub services: BTreeMap<String, ServiceEntry>,
    pub operations: BTreeMap<String, Operation>,
    /// Idempotency: `<scope>/<CreatorRequestId>` → the id it produced.
    pub requests: HashMap<String, String>,
    pub tags: HashMap<String, Vec<Tag>>,
    ns_by_name: HashMap<String, String>,
    svc_by_name: HashMap<(String, String), String>,
    /// Replicated stores: revisions move to at least this (the store revision, shifted so local
    /// health flips fit below the next one). `None`: revisions follow the wall clock.
    floor: Option<u64>,
}

/// One durable change of the registry.
#[derive(Debug, Clone)]
pub enum Change {
    PutNamespace(Namespace),
    DeleteNamespace(String),
    PutService(Service),
    DeleteService(String),
    PutInstance(Instance),
    DeleteInstance {
        service_id: String,
        id: String,
    },
    PutOperation(Operation),
    PutRequest(String, String),
    PutTags(String, Vec<Tag>),
    DeleteTags(String),
    DeleteOperation(String),
    DeleteRequest(String),
    /// Replicated stores: a health flip published by the replica that checks the instance.
    SetHealth {
        service_id: String,
        id: String,
        health: HealthStatus,
    },
    /// Replicated stores: a TTL heartbeat received by any replica.
    Beat {
        service_id: String,
        id: String,
    },
    /// A record without effect on the view (a health record's deletion goes with its instance).
    Nothing,
}

pub struct Registry {
    cfg: RegistryConfig,
    store: Box<dyn Store>,
    writer: Mutex<()>,
    state: RwLock<State>,
    /// Woken when instances or services come and go (the health checker reconciles).
    pub topology: Notify,
    serial: std::sync::atomic::AtomicU32,
    /// Replicated stores: the view revision the current writer validated against.
    seen: std::sync::atomic::AtomicU64,
}

/// Bits of a service revision below the replicated store's revision (room for local flips).
const FLOOR_SHIFT: u32 = 16;

/// Wall-clock seconds as Cloud Map's JSON timestamps.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Revisions move forward across restarts too: at least the wall clock in milliseconds.
fn next_revision(current: u64) -> u64 {
    (current + 1).max(now_millis())
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn key(change: &Change) -> Write {
    match change {
        Change::PutNamespace(n) => Write::Put(format!("ns/{}", n.id), json(n)),
        Change::DeleteNamespace(id) => Write::Delete(format!("ns/{id}")),
        Change::PutService(s) => Write::Put(format!("svc/{}", s.id), json(s)),
        Change::DeleteService(id) => Write::Delete(format!("svc/{id}")),
        Change::PutInstance(i) => Write::Put(format!("inst/{}/{}", i.service_id, i.id), json(i)),
        Change::DeleteInstance { service_id, id } => {
            Write::Delete(format!("inst/{service_id}/{id}"))
        }
        Change::PutOperation(o) => Write::Put(format!("op/{}", o.id), json(o)),
        Change::PutRequest(k, v) => Write::Put(format!("req/{k}"), v.clone().into_bytes()),
        Change::PutTags(arn, t) => Write::Put(format!("tag/{arn}"), json(t)),
        Change::DeleteTags(arn) => Write::Delete(format!("tag/{arn}")),
        Change::DeleteOperation(id) => Write::Delete(format!("op/{id}")),
        Change::DeleteRequest(k) => Write::Delete(format!("req/{k}")),
        Change::SetHealth {
            service_id,
            id,
            health,
        } => Write::Put(
            format!("health/{service_id}/{id}"),
            health.as_str().as_bytes().to_vec(),
        ),
        Change::Beat { service_id, id } => {
            Write::Put(format!("beat/{service_id}/{id}"), Vec::new())
        }
        Change::Nothing => Write::Delete(String::new()),
    }
}

/// The change a stored record (or its deletion) stands for: the inverse of [`key`].
fn decode(write: Write) -> Result<Change, StoreError> {
    let k = match &write {
        Write::Put(k, _) | Write::Delete(k) => k.clone(),
    };
    let bad = |what: &str| StoreError::Io {
        path: "registry".into(),
        reason: format!("record {k:?} is not a valid {what}"),
    };
    let (kind, rest) = k.split_once('/').unwrap_or((k.as_str(), ""));
    let v = match write {
        Write::Put(_, v) => v,
        Write::Delete(_) => {
            return Ok(match kind {
                "ns" => Change::DeleteNamespace(rest.to_owned()),
                "svc" => Change::DeleteService(rest.to_owned()),
                "inst" => {
                    let (sid, id) = rest.split_once('/').ok_or_else(|| bad("instance key"))?;
                    Change::DeleteInstance {
                        service_id: sid.to_owned(),
                        id: id.to_owned(),
                    }
                }
                "op" => Change::DeleteOperation(rest.to_owned()),
                "req" => Change::DeleteRequest(rest.to_owned()),
                "tag" => Change::DeleteTags(rest.to_owned()),
                "health" | "beat" => Change::Nothing,
                _ => return Err(bad("record kind")),
            });
        }
    };
    Ok(match kind {
        "ns" => Change::PutNamespace(serde_json::from_slice(&v).map_err(|_| bad("namespace"))?),
        "svc" => Change::PutService(serde_json::from_slice(&v).map_err(|_| bad("service"))?),
        "inst" => Change::PutInstance(serde_json::from_slice(&v).map_err(|_| bad("instance"))?),
        "op" => Change::PutOperation(serde_json::from_slice(&v).map_err(|_| bad("operation"))?),
        "req" => Change::PutRequest(
            rest.to_owned(),
            String::from_utf8(v).map_err(|_| bad("request id"))?,
        ),
        "tag" => Change::PutTags(
            rest.to_owned(),
            serde_json::from_slice(&v).map_err(|_| bad("tag list"))?,
        ),
        "health" | "beat" => {
            let (sid, id) = rest.split_once('/').ok_or_else(|| bad("instance key"))?;
            let (service_id, id) = (sid.to_owned(), id.to_owned());
            if kind == "beat" {
                return Ok(Change::Beat { service_id, id });
            }
            let health = match v.as_slice() {
                b"HEALTHY" => HealthStatus::Healthy,
                b"UNHEALTHY" => HealthStatus::Unhealthy,
                _ => HealthStatus::Unknown,
            };
            Change::SetHealth {
                service_id,
                id,
                health,
            }
        }
        _ => return Err(bad("record kind")),
    })
}

/// Apply order within one batch: services before their instances, instances before their health.
fn apply_order(c: &Change) -> u8 {
    match c {
        Change::PutInstance(_) => 1,
        Change::SetHealth { .. } | Change::Beat { .. } => 2,
        _ => 0,
    }
}

fn is_topology(c: &Change) -> bool {
    matches!(
        c,
        Change::PutInstance(_)
            | Change::DeleteInstance { .. }
            | Change::PutService(_)
            | Change::DeleteService(_)
    )
}

impl State {
    pub fn namespace_by_name(&self, name: &str) -> Option<&Namespace> {
        self.ns_by_name
            .get(&name.to_ascii_lowercase())
            .and_then(|id| self.namespaces.get(id))
    }

    pub fn service_by_name(&self, ns_id: &str, name: &str) -> Option<&ServiceEntry> {
        self.svc_by_name
            .get(&(ns_id.to_owned(), name.to_ascii_lowercase()))
            .and_then(|id| self.services.get(id))
    }

    pub fn service_count(&self, ns_id: &str) -> usize {
        self.services
            .values()
            .filter(|s| s.service.namespace_id == ns_id)
            .count()
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::PutNamespace(n) => {
                self.ns_by_name
                    .insert(n.name.to_ascii_lowercase(), n.id.clone());
                self.namespaces.insert(n.id.clone(), n);
            }
            Change::DeleteNamespace(id) => {
                if let Some(n) = self.namespaces.remove(&id) {
                    self.ns_by_name.remove(&n.name.to_ascii_lowercase());
                }
            }
            Change::PutService(s) => {
                self.svc_by_name.insert(
                    (s.namespace_id.clone(), s.name.to_ascii_lowercase()),
                    s.id.clone(),
                );
                let floor = self.floor;
                match self.services.get_mut(&s.id) {
                    Some(e) => {
                        e.revision = e.revision.max(s.revision);
                        // Mesh attributes travel with the endpoint set: watchers hear of a change.
                        let moved = !mesh_attributes(&e.service.attributes)
                            .eq(mesh_attributes(&s.attributes));
                        e.service = s;
                        if moved {
                            bump(e, floor);
                        }
                    }
                    None => {
                        let revision = match self.floor {
                            Some(f) => f.max(s.revision),
                            None => next_revision(s.revision),
                        };
                        let (changes, _) = watch::channel(revision);
                        self.services.insert(
                            s.id.clone(),
                            ServiceEntry {
                                service: s,
                                instances: BTreeMap::new(),
                                revision,
                                changes,
                            },
                        );
                    }
                }
            }
            Change::DeleteService(id) => {
                if let Some(e) = self.services.remove(&id) {
                    self.svc_by_name.remove(&(
                        e.service.namespace_id.clone(),
                        e.service.name.to_ascii_lowercase(),
                    ));
                }
            }
            Change::PutInstance(i) => {
                if let Some(e) = self.services.get_mut(&i.service_id) {
                    let health = initial_health(&e.service, &i);
                    match e.instances.get_mut(&i.id) {
                        Some(existing) => existing.instance = i,
                        None => {
                            e.instances.insert(
                                i.id.clone(),
                                InstanceEntry {
                                    instance: i,
                                    health,
                                    last_heartbeat: None,
                                },
                            );
                        }
                    }
                    bump(e, self.floor);
                }
            }
            Change::DeleteInstance { service_id, id } => {
                if let Some(e) = self.services.get_mut(&service_id)
                    && e.instances.remove(&id).is_some()
                {
                    bump(e, self.floor);
                }
            }
            Change::PutOperation(o) => {
                self.operations.insert(o.id.clone(), o);
            }
            Change::PutRequest(k, v) => {
                self.requests.insert(k, v);
            }
            Change::PutTags(arn, t) => {
                self.tags.insert(arn.clone(), t);
                self.tags_changed(&arn);
            }
            Change::DeleteTags(arn) => {
                self.tags.remove(&arn);
                self.tags_changed(&arn);
            }
            Change::DeleteOperation(id) => {
                self.operations.remove(&id);
            }
            Change::DeleteRequest(k) => {
                self.requests.remove(&k);
            }
            Change::SetHealth {
                service_id,
                id,
                health,
            } => {
                let floor = self.floor;
                if let Some(e) = self.services.get_mut(&service_id)
                    && let Some(i) = e.instances.get_mut(&id)
                    && i.health != health
                {
                    i.health = health;
                    bump(e, floor);
                }
            }
            Change::Beat { service_id, id } => {
                if let Some(i) = self
                    .services
                    .get_mut(&service_id)
                    .and_then(|e| e.instances.get_mut(&id))
                {
                    i.last_heartbeat = Some(Instant::now());
                }
            }
            Change::Nothing => {}
        }
    }

    /// Drops every record whose key is not in `keep` (a replicated store's full re-read).
    fn retain_keys(&mut self, keep: &std::collections::HashSet<String>) {
        let mut gone = Vec::new();
        for id in self.namespaces.keys() {
            if !keep.contains(&format!("ns/{id}")) {
                gone.push(Change::DeleteNamespace(id.clone()));
            }
        }
        for (sid, e) in &self.services {
            if !keep.contains(&format!("svc/{sid}")) {
                gone.push(Change::DeleteService(sid.clone()));
                continue;
            }
            for id in e.instances.keys() {
                if !keep.contains(&format!("inst/{sid}/{id}")) {
                    gone.push(Change::DeleteInstance {
                        service_id: sid.clone(),
                        id: id.clone(),
                    });
                }
            }
        }
        for id in self.operations.keys() {
            if !keep.contains(&format!("op/{id}")) {
                gone.push(Change::DeleteOperation(id.clone()));
            }
        }
        for k in self.requests.keys() {
            if !keep.contains(&format!("req/{k}")) {
                gone.push(Change::DeleteRequest(k.clone()));
            }
        }
        for arn in self.tags.keys() {
            if !keep.contains(&format!("tag/{arn}")) {
                gone.push(Change::DeleteTags(arn.clone()));
            }
        }
        for c in gone {
            self.apply(c);
        }
    }

    /// A service's tags travel with its endpoint set (intentions): watchers hear of the change.
    fn tags_changed(&mut self, arn: &str) {
        let floor = self.floor;
        if let Some(e) = self.services.values_mut().find(|e| e.service.arn == arn) {
            bump(e, floor);
        }
    }
}

/// A service's `trellis:` attributes (pushed routes), which its endpoint set carries.
fn mesh_attributes(a: &BTreeMap<String, String>) -> impl Iterator<Item = (&String, &String)> {
    a.iter().filter(|(k, _)| k.starts_with("trellis:"))
}

fn bump(e: &mut ServiceEntry, floor: Option<u64>) {
    e.revision = match floor {
        Some(f) => (e.revision + 1).max(f),
        None => next_revision(e.revision),
    };
    e.service.revision = e.revision;
    e.changes.send_replace(e.revision);
}

fn initial_health(service: &Service, _instance: &Instance) -> HealthStatus {
    if service.health_check_custom_config.is_some() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Unknown
    }
}

impl Registry {
    /// Loads every record from the store.
    pub fn open(store: Box<dyn Store>, cfg: RegistryConfig) -> Result<Arc<Self>, StoreError> {
        let mut state = State {
            floor: store.replicated_at().map(|r| r << FLOOR_SHIFT),
            ..State::default()
        };
        let mut changes = Vec::new();
        for (k, v) in store.load()? {
            changes.push(decode(Write::Put(k, v))?);
        }
        changes.sort_by_key(apply_order);
        for c in changes {
            state.apply(c);
        }
        let replicated = store.replicated_at().is_some();
        let registry = Arc::new(Registry {
            cfg,
            store,
            writer: Mutex::new(()),
            state: RwLock::new(state),
            topology: Notify::new(),
            serial: std::sync::atomic::AtomicU32::new((now_millis() / 1000) as u32),
            seen: std::sync::atomic::AtomicU64::new(0),
        });
        if replicated {
            let sink: Arc<dyn FeedSink> = registry.clone();
            registry.store.start_feed(Arc::downgrade(&sink));
        }
        Ok(registry)
    }

    /// Whether this replica runs the health check of an instance (replicas share them out).
    pub fn owns_check(&self, service_id: &str, instance_id: &str) -> bool {
        self.store.owns(&format!("{service_id}/{instance_id}"))
    }

    /// Whether the view may be behind the replicated store (the `store_stale` gauge).
    pub fn store_stale(&self) -> bool {
        self.store.stale()
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Serializes writers: hold it from validation to commit.
    pub fn writer(&self) -> MutexGuard<'_, ()> {
        let guard = self.writer.lock();
        self.seen.store(
            self.store.view_revision(),
            std::sync::atomic::Ordering::Relaxed,
        );
        guard
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// SOA serial: moves on every committed change.
    pub fn serial(&self) -> u32 {
        self.serial.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Persists the changes (fsync), then applies them. Call with [`Registry::writer`] held.
    pub fn commit(&self, mut changes: Vec<Change>) -> Result<(), ApiError> {
        if self.store.replicated_at().is_some() {
            // The feed applies it (and every other replica's writes); revisions come from the store.
            let writes: Vec<Write> = changes.iter().map(key).collect();
            let seen = self.seen.load(std::sync::atomic::Ordering::Relaxed);
            return Ok(self.store.commit_checked(&writes, seen)?);
        }
        // Instance changes move their service's revision: persist it in the same batch.
        {
            let st = self.state.read();
            let mut touched: BTreeMap<String, Service> = BTreeMap::new();
            for c in &changes {
                let sid = match c {
                    Change::PutInstance(i) => &i.service_id,
                    Change::DeleteInstance { service_id, .. } => service_id,
                    _ => continue,
                };
                if let Some(e) = st.services.get(sid) {
                    let s = touched
                        .entry(sid.clone())
                        .or_insert_with(|| e.service.clone());
                    s.revision = next_revision(s.revision.max(e.revision));
                }
            }
            changes.extend(touched.into_values().map(Change::PutService));
        }
        let writes: Vec<Write> = changes.iter().map(key).collect();
        self.store.commit(&writes)?;
        let topology = changes.iter().any(is_topology);
        {
            let mut st = self.state.write();
            for c in changes {
                st.apply(c);
            }
        }
        self.applied(topology);
        Ok(())
    }

    /// After changes were applied: the SOA serial (and DNS answer cache) moves; the health checker
    /// reconciles when instances or services came or went.
    fn applied(&self, topology: bool) {
        self.serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if topology {
            self.topology.notify_one();
        }
    }

    /// Sets an instance's health; returns whether it changed (and so moved the revision).
    pub fn set_health(&self, service_id: &str, instance_id: &str, health: HealthStatus) -> bool {
        if self.store.replicated_at().is_some() {
            // Only flips reach etcd; the feed applies them on every replica, this one included.
            let current = self
                .state
                .read()
                .services
                .get(service_id)
                .and_then(|e| e.instances.get(instance_id))
                .map(|i| i.health);
            if current.is_none_or(|c| c == health) {
                return false;
            }
            let flip = Change::SetHealth {
                service_id: service_id.to_owned(),
                id: instance_id.to_owned(),
                health,
            };
            self.store
                .publish(key(&flip), &format!("inst/{service_id}/{instance_id}"));
            return true;
        }
        let mut st = self.state.write();
        let floor = st.floor;
        let Some(e) = st.services.get_mut(service_id) else {
            return false;
        };
        let Some(i) = e.instances.get_mut(instance_id) else {
            return false;
        };
        if i.health == health {
            return false;
        }
        i.health = health;
        bump(e, floor);
        drop(st);
        self.serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Records a TTL heartbeat: the instance is healthy until its TTL passes without another.
    pub fn heartbeat(&self, ns: &str, svc: &str, instance_id: &str) -> Result<(), ApiError> {
        let service_id = {
            let mut st = self.state.write();
            let ns_id = st
                .namespace_by_name(ns)
                .map(|n| n.id.clone())
                .ok_or_else(|| ApiError::NamespaceNotFound(format!("namespace {ns} not found")))?;
            let sid = st
                .service_by_name(&ns_id, svc)
                .map(|s| s.service.id.clone())
                .ok_or_else(|| ApiError::ServiceNotFound(format!("service {svc} not found")))?;
            let inst = st
                .services
                .get_mut(&sid)
                .and_then(|e| e.instances.get_mut(instance_id))
                .ok_or_else(|| {
                    ApiError::InstanceNotFound(format!("instance {instance_id} not found"))
                })?;
            inst.last_heartbeat = Some(Instant::now());
            sid
        };
        if self.store.replicated_at().is_some() {
            // The replica that owns this instance's TTL check may be another one.
            let beat = Change::Beat {
                service_id: service_id.clone(),
                id: instance_id.to_owned(),
            };
            self.store
                .publish(key(&beat), &format!("inst/{service_id}/{instance_id}"));
        }
        self.set_health(&service_id, instance_id, HealthStatus::Healthy);
        Ok(())
    }

    /// The watch API's view of a service, plus a receiver that fires when its revision moves.
    pub fn endpoint_set(
        &self,
        ns: &str,
        svc: &str,
        all: bool,
    ) -> Option<(EndpointSet, watch::Receiver<u64>)> {
        let st = self.state.read();
        let n = st.namespace_by_name(ns)?;
        let e = st.service_by_name(&n.id, svc)?;
        let rx = e.changes.subscribe();
        let mut endpoints: Vec<Endpoint> = e.instances.values().filter_map(endpoint).collect();
        if !all && endpoints.iter().any(|ep| ep.health.is_serving()) {
            endpoints.retain(|ep| ep.health.is_serving());
        }
        let tags = st
            .tags
            .get(&e.service.arn)
            .into_iter()
            .flatten()
            .filter(|t| t.key.starts_with("trellis:"))
            .map(|t| (t.key.clone(), t.value.clone()))
            .collect();
        Some((
            EndpointSet {
                namespace: n.name.clone(),
                service: e.service.name.clone(),
                revision: e.revision,
                endpoints,
                tags,
                attributes: mesh_attributes(&e.service.attributes)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
            rx,
        ))
    }
}

impl FeedSink for Registry {
    fn apply_feed(&self, revision: u64, events: Vec<Write>) {
        let resync = matches!(events.first(), Some(Write::Delete(k)) if k == RESYNC);
        let mut changes = Vec::with_capacity(events.len());
        let mut keep = std::collections::HashSet::new();
        for w in events {
            if resync && let Write::Put(k, _) = &w {
                keep.insert(k.clone());
            }
            if matches!(&w, Write::Delete(k) if k == RESYNC) {
                continue;
            }
            match decode(w) {
                Ok(c) => changes.push(c),
                Err(e) => tracing::warn!(error = %e, "ignoring a record from the store"),
            }
        }
        changes.sort_by_key(apply_order);
        let topology = resync || changes.iter().any(is_topology);
        {
            let mut st = self.state.write();
            st.floor = Some(revision << FLOOR_SHIFT);
            if resync {
                st.retain_keys(&keep);
            }
            for c in changes {
                st.apply(c);
            }
        }
        self.applied(topology);
    }
}

fn endpoint(i: &InstanceEntry) -> Option<Endpoint> {
    let a = &i.instance.attributes;
    let address = a
        .get(attr::IPV4)
        .or_else(|| a.get(attr::IPV6))
        .and_then(|s| s.parse().ok())?;
    let port = a.get(attr::PORT).and_then(|p| p.parse().ok())?;
    let weight = a
        .get(attr::WEIGHT)
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    Some(Endpoint {
        instance_id: i.instance.id.clone(),
        address,
        port,
        weight,
        health: i.health,
        attributes: a.clone(),
    })
}
