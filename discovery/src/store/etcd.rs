//! The etcd v3 store: several control-plane replicas share one registry.
//!
//! Layout under the prefix (e.g. `/trellis/`): `version` (the schema marker), `data/<record key>`
//! (the same `kind/id` records as the embedded store, plus `health/<svc>/<inst>` flips and
//! `beat/<svc>/<inst>` TTL heartbeats), `meta/topology` (touched by every namespace or service
//! change, so name uniqueness holds across replicas) and `replicas/<id>` (one key per live replica,
//! bound to its lease: health checks are shared out over these by rendezvous hashing).
//!
//! Each replica keeps its registry in memory, fed by one etcd watch on `data/` (the Kubernetes API
//! server's pattern): reads never touch etcd. A write is one transaction that compares the
//! revisions it was validated against; a commit returns once the feed has applied it, so a client
//! reads its own writes on the replica that acknowledged them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use parking_lot::{Condvar, Mutex};

use super::{FeedSink, Store, StoreError, Write};

/// The schema marker this version writes and accepts at `<prefix>version`.
pub const SCHEMA: &str = "trellis-registry/1";
/// How long a write may wait for etcd before it is refused (HTTP 503, nothing acknowledged).
const TXN_TIMEOUT: Duration = Duration::from_secs(3);
/// One attempt of a transaction (a dead member or an election fails it; the next may succeed).
const TXN_ATTEMPT: Duration = Duration::from_millis(700);
const TXN_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a commit waits for the watch to bring its own write into the view.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Quorum probe period (a linearizable read): drives the `store_stale` gauge.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Pause before re-establishing a broken watch.
const REWATCH_DELAY: Duration = Duration::from_millis(200);
/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// Where the registry lives in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` client URLs of the members.
    pub endpoints: Vec<String>,
    /// Key prefix of this registry (several registries can share one etcd); ends with `/`.
    pub prefix: String,
    /// TTL of this replica's lease: a dead replica's health checks move within about this long.
    pub lease_ttl: Duration,
    /// `https://` endpoints: how to trust the members (and who we are to them).
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd (rustls with ring, through tonic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM of the CA that signed the members' certificates.
    pub ca: std::path::PathBuf,
    /// Client certificate and key (PEM), for members run with `--client-cert-auth`.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Client options shared by the store and the CRL share: fail fast without a leader, TLS if set.
pub(super) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(TXN_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // Requests to a member that lost its leader fail fast instead of hanging.
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StoreError::Io {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.client {
            t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(t);
    }
    Ok(options)
}

/// Default [`EtcdConfig::lease_ttl`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the live replica set is re-read.
const MEMBERS_INTERVAL: Duration = Duration::from_millis(500);

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        EtcdConfig {
            endpoints,
            prefix,
            lease_ttl: DEFAULT_LEASE_TTL,
            tls: None,
        }
    }
}

/// Records as `Store::load` returns them.
type Records = Vec<(String, Vec<u8>)>;

/// The revision the feed has applied, with a wake-up for commits waiting on it.
#[derive(Default)]
struct Applied {
    revision: Mutex<u64>,
    moved: Condvar,
    /// Mirror of `revision` for lock-free reads.
    fast: AtomicU64,
}

impl Applied {
    fn set(&self, revision: u64) {
        let mut r = self.revision.lock();
        if revision > *r {
            *r = revision;
            self.fast.store(revision, Ordering::Release);
            self.moved.notify_all();
        }
    }

    /// Blocks (a blocking thread, never the runtime) until `revision` is applied or `timeout`.
    fn wait(&self, revision: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut r = self.revision.lock();
        while *r < revision {
            if self.moved.wait_until(&mut r, deadline).timed_out() {
                return *r >= revision;
            }
        }
        true
    }
}

#[derive(Default)]
struct Health {
    watch_ok: AtomicBool,
    quorum_ok: AtomicBool,
}

pub struct EtcdStore {
    client: Client,
    handle: tokio::runtime::Handle,
    keys: Keys,
    /// The records read at connect, handed to the first `load`.
    snapshot: Mutex<Option<Records>>,
    loaded_at: u64,
    applied: Arc<Applied>,
    health: Arc<Health>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// This replica's id under `replicas/`.
    replica: String,
    lease_ttl: Duration,
    /// Live replica ids (this one included until etcd says otherwise).
    live: Arc<parking_lot::RwLock<Vec<String>>>,
}

#[derive(Clone)]
struct Keys {
    version: String,
    data: String,
    topology: String,
    replicas: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            version: format!("{prefix}version"),
            data: format!("{prefix}data/"),
            topology: format!("{prefix}meta/topology"),
            replicas: format!("{prefix}replicas/"),
        }
    }
    fn data(&self, record: &str) -> String {
        format!("{}{record}", self.data)
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

pub(super) async fn bounded<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(TXN_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(unavailable(format!(
            "no answer within {TXN_TIMEOUT:?} (quorum lost?)"
        ))),
    }
}

/// Runs `fut` on `handle`'s runtime and waits for it from this (blocking) thread.
pub(super) fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv_timeout(TXN_TIMEOUT + Duration::from_secs(1))
        .map_err(|_| unavailable("no answer (quorum lost?)"))?
}

/// Runs `txn` until it answers or [`TXN_TIMEOUT`] passes: (compares held, store revision).
pub(super) async fn txn_retrying(
    mut kv: etcd_client::KvClient,
    txn: Txn,
) -> Result<(bool, u64), StoreError> {
    let deadline = tokio::time::Instant::now() + TXN_TIMEOUT;
    loop {
        let attempt = tokio::time::timeout(TXN_ATTEMPT, kv.txn(txn.clone())).await;
        let error = match attempt {
            Ok(Ok(r)) => {
                let revision = r.header().map(|h| h.revision()).unwrap_or(0).max(0);
                return Ok((r.succeeded(), revision as u64));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {TXN_ATTEMPT:?}"),
        };
        if tokio::time::Instant::now() + TXN_RETRY_PAUSE >= deadline {
            return Err(unavailable(format!(
                "{error}; gave up after {TXN_TIMEOUT:?} (quorum lost?)"
            )));
        }
        tokio::time::sleep(TXN_RETRY_PAUSE).await;
    }
}

/// Checks the schema marker at `<prefix>version`: initialises an empty prefix, refuses one written
/// by another version (or holding keys without a marker). The registry store and the CA's shared
/// state both call it first, whichever starts first initialises.
pub(super) async fn check_schema(
    kv: &mut etcd_client::KvClient,
    prefix: &str,
) -> Result<(), StoreError> {
    let version = format!("{prefix}version");
    let marker = bounded(kv.get(version.as_str(), None)).await?;
    match marker.kvs().first() {
        Some(m) if m.value() == SCHEMA.as_bytes() => {}
        Some(m) => {
            return Err(StoreError::Incompatible(format!(
                "etcd prefix {} was written by an incompatible version ({:?}); this binary \
                 speaks {SCHEMA}: use a new --etcd-prefix or the matching trellis version",
                prefix,
                String::from_utf8_lossy(m.value())
            )));
        }
        None => {
            let existing = bounded(kv.get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .await?;
            if existing.count() > 0 {
                return Err(StoreError::Incompatible(format!(
                    "etcd prefix {} holds {} keys but no {SCHEMA} marker: refusing to use it",
                    prefix,
                    existing.count()
                )));
            }
            // Initialise, unless another replica did it first.
            let init = Txn::new()
                .when([Compare::version(version.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(version.as_str(), SCHEMA, None)]);
            bounded(kv.txn(init)).await?;
            tracing::info!(prefix = %prefix, "initialised an empty etcd prefix");
        }
    }
    Ok(())
}

impl EtcdStore {
    /// Connects, initialises an empty prefix (or refuses an incompatible one) and reads the
    /// registry. Call inside the runtime the feed should run on.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(unavailable("no endpoints given"));
        }
        let options = connect_options(config)?;
        let client = bounded(Client::connect(&config.endpoints, Some(options))).await?;
        let keys = Keys::new(&config.prefix);
        let mut kv = client.kv_client();

        check_schema(&mut kv, &config.prefix).await?;

        let all =
            bounded(kv.get(keys.data.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let loaded_at = all.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
        let mut records = Vec::with_capacity(all.kvs().len());
        for r in all.kvs() {
            if let Some(k) = r.key().strip_prefix(keys.data.as_bytes())
                && let Ok(k) = std::str::from_utf8(k)
            {
                records.push((k.to_owned(), r.value().to_vec()));
            }
        }
        let applied = Arc::new(Applied::default());
        applied.set(loaded_at);
        let health = Arc::new(Health::default());
        health.quorum_ok.store(true, Ordering::Relaxed);
        health.watch_ok.store(true, Ordering::Relaxed);
        let replica = uuid::Uuid::new_v4().simple().to_string();
        tracing::info!(records = records.len(), revision = loaded_at, endpoints = ?config.endpoints, %replica, "etcd store loaded");
        Ok(EtcdStore {
            live: Arc::new(parking_lot::RwLock::new(vec![replica.clone()])),
            replica,
            lease_ttl: config.lease_ttl.max(Duration::from_secs(1)),
            client,
            handle: tokio::runtime::Handle::current(),
            keys,
            snapshot: Mutex::new(Some(records)),
            loaded_at,
            applied,
            health,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Runs `fut` on the store's runtime and waits for it from this (blocking) thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(&self.handle, fut)
    }

    /// Runs `txn`, retrying transient failures (a member going away, an election) until
    /// [`TXN_TIMEOUT`]. Retrying is safe: a guarded transaction that did commit fails its compares
    /// the second time, and the action re-validates.
    fn txn(&self, txn: Txn) -> Result<(bool, u64), StoreError> {
        self.run(txn_retrying(self.client.kv_client(), txn))
    }

    /// The compares that make `batch` safe to apply on top of a view at revision `seen`.
    fn guarded(&self, batch: &[Write], seen: u64) -> Txn {
        let below = (seen as i64).saturating_add(1);
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut topology = false;
        for w in batch {
            let record = match w {
                Write::Put(k, _) | Write::Delete(k) => k.as_str(),
            };
            let key = self.keys.data(record);
            // Nobody changed this record since the view we validated against.
            compares.push(Compare::mod_revision(key.as_str(), CompareOp::Less, below));
            topology |= record.starts_with("ns/") || record.starts_with("svc/");
            match w {
                Write::Put(_, v) => {
                    // An instance only goes into a service that still exists.
                    if let Some(sid) = record
                        .strip_prefix("inst/")
                        .and_then(|r| r.split_once('/'))
                        .map(|(sid, _)| sid)
                    {
                        compares.push(Compare::version(
                            self.keys.data(&format!("svc/{sid}")),
                            CompareOp::Greater,
                            0,
                        ));
                    }
                    ops.push(TxnOp::put(key, v.clone(), None));
                }
                Write::Delete(_) => {
                    // An instance's health and heartbeat records go with it.
                    if let Some(rest) = record.strip_prefix("inst/") {
                        for kind in ["health", "beat"] {
                            ops.push(TxnOp::delete(
                                self.keys.data(&format!("{kind}/{rest}")),
                                None,
                            ));
                        }
                    }
                    // A service is deleted only while it has no instances.
                    if let Some(sid) = record.strip_prefix("svc/") {
                        compares.push(
                            Compare::version(
                                self.keys.data(&format!("inst/{sid}/")),
                                CompareOp::Equal,
                                0,
                            )
                            .with_prefix(),
                        );
                    }
                    ops.push(TxnOp::delete(key, None));
                }
            }
        }
        if topology {
            // Names are unique per kind: serialise namespace and service changes.
            compares.push(Compare::mod_revision(
                self.keys.topology.as_str(),
                CompareOp::Less,
                below,
            ));
            ops.push(TxnOp::put(self.keys.topology.as_str(), "", None));
        }
        Txn::new().when(compares).and_then(ops)
    }

    fn wait_applied(&self, revision: u64) {
        if !self.applied.wait(revision, APPLY_TIMEOUT) {
            tracing::warn!(
                revision,
                "committed, but the watch has not delivered it yet (view lags)"
            );
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

impl Store for EtcdStore {
    fn stale(&self) -> bool {
        !(self.health.watch_ok.load(Ordering::Relaxed)
            && self.health.quorum_ok.load(Ordering::Relaxed))
    }

    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self.snapshot.lock().take() {
            Some(s) => Ok(s),
            None => {
                // A second load reads the store afresh (the migrate command).
                let mut kv = self.client.kv_client();
                let prefix = self.keys.data.clone();
                self.run(async move {
                    let all =
                        bounded(kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
                            .await?;
                    Ok(all
                        .kvs()
                        .iter()
                        .filter_map(|r| {
                            let k = r.key().strip_prefix(prefix.as_bytes())?;
                            Some((std::str::from_utf8(k).ok()?.to_owned(), r.value().to_vec()))
                        })
                        .collect())
                })
            }
        }
    }

    /// Unconditional writes in chunks of etcd's transaction limit (the migrate command).
    fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        let mut last = 0;
        for chunk in batch.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|w| match w {
                    Write::Put(k, v) => TxnOp::put(self.keys.data(k), v.clone(), None),
                    Write::Delete(k) => TxnOp::delete(self.keys.data(k), None),
                })
                .collect();
            last = self.txn(Txn::new().and_then(ops))?.1;
        }
        if !self.tasks.lock().is_empty() {
            self.wait_applied(last);
        }
        Ok(())
    }

    fn replicated_at(&self) -> Option<u64> {
        Some(self.loaded_at)
    }

    fn view_revision(&self) -> u64 {
        self.applied.fast.load(Ordering::Acquire)
    }

    fn commit_checked(&self, batch: &[Write], seen: u64) -> Result<(), StoreError> {
        let (ok, revision) = self.txn(self.guarded(batch, seen))?;
        // Either way, bring the view up to the store's revision before answering or retrying.
        self.wait_applied(revision);
        if ok {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    fn start_feed(&self, sink: Weak<dyn FeedSink>) {
        let feed = Feed {
            client: self.client.clone(),
            keys: self.keys.clone(),
            applied: self.applied.clone(),
            health: self.health.clone(),
            sink,
        };
        let probe = Probe {
            client: self.client.clone(),
            key: self.keys.version.clone(),
            health: self.health.clone(),
        };
        let membership = Membership {
            client: self.client.clone(),
            keys: self.keys.clone(),
            replica: self.replica.clone(),
            ttl: self.lease_ttl,
            live: self.live.clone(),
        };
        let mut tasks = self.tasks.lock();
        tasks.push(self.handle.spawn(feed.run()));
        tasks.push(self.handle.spawn(probe.run()));
        tasks.push(self.handle.spawn(membership.clone().announce()));
        tasks.push(self.handle.spawn(membership.follow()));
    }

    fn owns(&self, item: &str) -> bool {
        rendezvous(&self.live.read(), item).is_none_or(|owner| owner == self.replica)
    }

    fn publish(&self, write: Write, requires: &str) {
        let op = match &write {
            Write::Put(k, v) => TxnOp::put(self.keys.data(k), v.clone(), None),
            Write::Delete(k) => TxnOp::delete(self.keys.data(k), None),
        };
        let txn = Txn::new()
            .when([Compare::version(
                self.keys.data(requires),
                CompareOp::Greater,
                0,
            )])
            .and_then([op]);
        let mut kv = self.client.kv_client();
        self.handle.spawn(async move {
            if let Err(e) = bounded(kv.txn(txn)).await {
                tracing::warn!(error = %e, "health update not written to etcd");
            }
        });
    }
}

/// The one watch on `data/` that keeps this replica's view current.
struct Feed {
    client: Client,
    keys: Keys,
    applied: Arc<Applied>,
    health: Arc<Health>,
    sink: Weak<dyn FeedSink>,
}

impl Feed {
    async fn run(self) {
        loop {
            if self.sink.strong_count() == 0 {
                return;
            }
            let from = self.applied.fast.load(Ordering::Acquire) + 1;
            match self.watch(from).await {
                Ok(Resume::Compacted) => self.resync().await,
                Ok(Resume::Broken) | Err(_) => {}
            }
            self.health.watch_ok.store(false, Ordering::Relaxed);
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }

    async fn watch(&self, from: u64) -> Result<Resume, etcd_client::Error> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64)
            .with_progress_notify();
        let mut stream = self
            .client
            .watch_client()
            .watch(self.keys.data.as_str(), Some(options))
            .await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Ok(if resp.compact_revision() > 0 {
                    Resume::Compacted
                } else {
                    Resume::Broken
                });
            }
            self.health.watch_ok.store(true, Ordering::Relaxed);
            let Some(sink) = self.sink.upgrade() else {
                return Ok(Resume::Broken);
            };
            // One response may span several revisions: apply them one revision at a time.
            let mut by_revision: BTreeMap<u64, Vec<Write>> = BTreeMap::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(record) = kv
                    .key()
                    .strip_prefix(self.keys.data.as_bytes())
                    .and_then(|k| std::str::from_utf8(k).ok())
                else {
                    continue;
                };
                let w = match ev.event_type() {
                    EventType::Put => Write::Put(record.to_owned(), kv.value().to_vec()),
                    EventType::Delete => Write::Delete(record.to_owned()),
                };
                by_revision
                    .entry(kv.mod_revision().max(0) as u64)
                    .or_default()
                    .push(w);
            }
            for (revision, events) in by_revision {
                sink.apply_feed(revision, events);
                self.applied.set(revision);
            }
            if resp.events().is_empty()
                && let Some(h) = resp.header()
            {
                // A progress notification: every change up to this revision has been delivered.
                self.applied.set(h.revision().max(0) as u64);
            }
        }
        Ok(Resume::Broken)
    }

    /// The watch fell behind compaction: read everything and replace the view.
    async fn resync(&self) {
        let mut kv = self.client.kv_client();
        let Ok(all) = bounded(kv.get(
            self.keys.data.as_str(),
            Some(GetOptions::new().with_prefix()),
        ))
        .await
        else {
            return;
        };
        let Some(sink) = self.sink.upgrade() else {
            return;
        };
        let revision = all.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
        let mut events = vec![Write::Delete(RESYNC.to_owned())];
        events.extend(all.kvs().iter().filter_map(|r| {
            let k = r.key().strip_prefix(self.keys.data.as_bytes())?;
            Some(Write::Put(
                std::str::from_utf8(k).ok()?.to_owned(),
                r.value().to_vec(),
            ))
        }));
        tracing::warn!(
            revision,
            records = events.len() - 1,
            "watch compacted away: resynchronised from a full read"
        );
        sink.apply_feed(revision, events);
        self.applied.set(revision);
    }
}

/// A pseudo-record leading a feed batch that is a full read: records not in it are gone.
pub const RESYNC: &str = "\0resync";

enum Resume {
    Broken,
    Compacted,
}

/// The replica that owns `item`: highest hash of (replica, item). Every replica computes the same
/// answer from the same live set; when a replica leaves, only its items move.
pub fn rendezvous<'a>(live: &'a [String], item: &str) -> Option<&'a str> {
    live.iter()
        .max_by_key(|r| fnv1a(r.as_bytes(), item.as_bytes()))
        .map(String::as_str)
}

/// FNV-1a over `a`, a separator and `b`: stable across processes and builds.
fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in a.iter().chain(&[0xff]).chain(b) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys: finish with a murmur-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// This replica's lease-bound key under `replicas/`, and the live set read back.
#[derive(Clone)]
struct Membership {
    client: Client,
    keys: Keys,
    replica: String,
    ttl: Duration,
    live: Arc<parking_lot::RwLock<Vec<String>>>,
}

impl Membership {
    /// Grants a lease, puts `replicas/<id>` on it and keeps it alive; starts over on failure.
    async fn announce(self) {
        let key = format!("{}{}", self.keys.replicas, self.replica);
        loop {
            if let Err(e) = self.announce_once(&key).await {
                tracing::warn!(error = %e, "replica lease lost; announcing again");
            }
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }

    async fn announce_once(&self, key: &str) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        let granted = bounded(lease.grant(self.ttl.as_secs() as i64, None)).await?;
        let id = granted.id();
        let mut kv = self.client.kv_client();
        bounded(kv.put(key, "", Some(etcd_client::PutOptions::new().with_lease(id)))).await?;
        let (mut keeper, mut responses) = bounded(lease.keep_alive(id)).await?;
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            bounded(keeper.keep_alive()).await?;
            match bounded(responses.message()).await? {
                Some(r) if r.ttl() > 0 => {}
                _ => return Err(unavailable("lease expired")),
            }
        }
    }

    /// Re-reads the live set; keeps the last one while etcd cannot answer.
    async fn follow(self) {
        let mut kv = self.client.kv_client();
        loop {
            let read = bounded(kv.get(
                self.keys.replicas.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ))
            .await;
            if let Ok(r) = read {
                let mut live: Vec<String> = r
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        let id = kv.key().strip_prefix(self.keys.replicas.as_bytes())?;
                        Some(String::from_utf8_lossy(id).into_owned())
                    })
                    .collect();
                if !live.contains(&self.replica) {
                    // Not announced yet (or the lease is being renewed): still check our share.
                    live.push(self.replica.clone());
                }
                live.sort();
                let mut current = self.live.write();
                if *current != live {
                    tracing::info!(replicas = live.len(), "live control-plane replicas changed");
                    *current = live;
                }
            }
            tokio::time::sleep(MEMBERS_INTERVAL).await;
        }
    }
}

/// Linearizable reads of the version key: fail while there is no quorum.
struct Probe {
    client: Client,
    key: String,
    health: Arc<Health>,
}

impl Probe {
    async fn run(self) {
        let mut kv = self.client.kv_client();
        loop {
            let ok = bounded(kv.get(self.key.as_str(), None)).await.is_ok();
            if ok != self.health.quorum_ok.swap(ok, Ordering::Relaxed) {
                if ok {
                    tracing::info!("etcd quorum is back");
                } else {
                    tracing::warn!(
                        "etcd quorum lost: serving reads from the view, refusing writes"
                    );
                }
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_dead_replicas_checks() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let two: Vec<String> = ["a", "c"].iter().map(|s| s.to_string()).collect();
        let items: Vec<String> = (0..300).map(|i| format!("srv-x/i-{i}")).collect();
        let mut per = std::collections::HashMap::new();
        for item in &items {
            let before = rendezvous(&three, item).unwrap();
            *per.entry(before).or_insert(0) += 1;
            let after = rendezvous(&two, item).unwrap();
            if before != "b" {
                assert_eq!(before, after, "{item} moved although its owner lives");
            }
            assert_ne!(after, "b");
        }
        // Spread: each replica owns a fair share.
        assert!(per.values().all(|n| *n > 60), "{per:?}");
        assert_eq!(rendezvous(&[], "x"), None);
    }
}
