//! The CA's state in etcd, shared by every replica: issued serials, revocations, scoped tokens
//! and the audit log (the [`trellis_ca::CaState`] of a replica on `--store etcd`).
//!
//! Keys under `<prefix>ca/`: `issued/<serial>` and `revoked/<serial>` (the CA's index records,
//! each created once by a transaction: a serial collision across replicas is detected, a
//! certificate is revoked once), `tokens/<id>` (scope and the secret's SHA-256, never the secret),
//! `audit/<unix nanos>-<intermediate>-<seq>` (one audit record each, written in the same
//! transaction as the record it audits). Each replica reads `issued/`, `revoked/` and `tokens/`
//! at start and then follows one watch on them, feeding its [`Authority`] and [`Tokens`]: a token
//! created on one replica is accepted by all, a certificate issued by one can be revoked through
//! any, and its issuer's CRL lists it one watch event later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use trellis_ca::{AuditRecord, Authority, CaError, CaState, IndexRecord, TokenRecord, Tokens};

use super::EtcdConfig;
use super::etcd::{bounded, check_schema, run_on, txn_retrying, unavailable};

/// Pause before re-establishing a broken watch.
const REWATCH_DELAY: Duration = Duration::from_millis(200);

/// Key names under `<prefix>ca/`.
#[derive(Clone)]
struct Keys {
    issued: String,
    revoked: String,
    tokens: String,
    audit: String,
    /// The range watched and read at start: `issued/` up to the end of `tokens/`.
    watched: (String, String),
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let ca = format!("{prefix}ca/");
        Keys {
            issued: format!("{ca}issued/"),
            revoked: format!("{ca}revoked/"),
            tokens: format!("{ca}tokens/"),
            audit: format!("{ca}audit/"),
            // '0' is the byte after '/': the end of every key starting with `tokens/`.
            watched: (format!("{ca}issued/"), format!("{ca}tokens0")),
        }
    }
}

/// One replica's handle on the shared CA state.
pub struct EtcdCaState {
    client: Client,
    handle: tokio::runtime::Handle,
    keys: Keys,
    /// Names this replica in audit keys: a short hash of its intermediate.
    replica: String,
    seq: AtomicU64,
}

fn ca_error(e: super::StoreError) -> CaError {
    CaError::Unavailable(e.to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, CaError> {
    serde_json::to_vec(v).map_err(|e| CaError::Internal(e.to_string()))
}

impl EtcdCaState {
    /// Connects, publishes the tokens of this replica's CA directory (so credentials made with
    /// `trellis-ca token create` before the start work on every replica), loads what the other
    /// replicas recorded into `authority` and `tokens` and moves both to etcd. The returned watch
    /// keeps them current while it runs. Call inside the runtime the watch will run on.
    pub async fn start(
        config: &EtcdConfig,
        authority: &Authority,
        tokens: &Tokens,
    ) -> Result<CaFeed, super::StoreError> {
        let options = super::etcd::connect_options(config)?;
        let client = bounded(Client::connect(&config.endpoints, Some(options))).await?;
        let keys = Keys::new(&config.prefix);
        let mut kv = client.kv_client();
        // The CA may start before the registry store: either initialises the prefix.
        check_schema(&mut kv, &config.prefix).await?;
        for t in tokens.own_records() {
            let key = format!("{}{}", keys.tokens, t.id);
            let value = serde_json::to_vec(&t).map_err(unavailable)?;
            let put = Txn::new()
                .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            bounded(kv.txn(put)).await?;
        }
        let (from, to) = &keys.watched;
        let all = bounded(kv.get(
            from.as_str(),
            Some(GetOptions::new().with_range(to.as_str())),
        ))
        .await?;
        let revision = all.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
        let feed = Feed {
            client: client.clone(),
            keys: keys.clone(),
            authority: authority.clone(),
            tokens: tokens.clone(),
        };
        // Key order puts every `issued/` before its `revoked/`.
        feed.apply(all.kvs().iter().map(|r| (r.key(), r.value())));
        let replica = format!(
            "{:08x}",
            super::crl_share::fingerprint(authority.intermediate().as_ref()) as u32
        );
        let state = Arc::new(EtcdCaState {
            client,
            handle: tokio::runtime::Handle::current(),
            keys,
            replica,
            seq: AtomicU64::new(0),
        });
        authority.share_state(state.clone());
        tokens.share_state(state);
        tracing::info!(
            records = all.kvs().len(),
            revision,
            "CA state shared through etcd"
        );
        Ok(CaFeed { feed, revision })
    }

    fn audit_key(&self, audit: &AuditRecord) -> String {
        let nanos = audit.time.unix_timestamp_nanos().max(0);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{nanos:020}-{}-{seq:08}", self.keys.audit, self.replica)
    }

    fn txn(&self, txn: Txn) -> Result<bool, CaError> {
        run_on(&self.handle, txn_retrying(self.client.kv_client(), txn))
            .map(|(ok, _)| ok)
            .map_err(ca_error)
    }
}

impl CaState for EtcdCaState {
    fn record(&self, record: &IndexRecord, audit: &AuditRecord) -> Result<(), CaError> {
        let audit_put = TxnOp::put(self.audit_key(audit), to_json(audit)?, None);
        let (key, refused) = match record {
            IndexRecord::Issued { serial, .. } => (
                format!("{}{serial}", self.keys.issued),
                CaError::SerialTaken(serial.clone()),
            ),
            IndexRecord::Revoked { serial, .. } => (
                format!("{}{serial}", self.keys.revoked),
                CaError::AlreadyRevoked(serial.clone()),
            ),
        };
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), to_json(record)?, None), audit_put]);
        if self.txn(txn)? { Ok(()) } else { Err(refused) }
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), CaError> {
        let key = format!("{}{}", self.keys.tokens, token.id);
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), to_json(token)?, None)]);
        if self.txn(txn)? {
            Ok(())
        } else {
            Err(CaError::Internal(format!(
                "credential id {} already recorded",
                token.id
            )))
        }
    }

    fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError> {
        let mut kv = self.client.kv_client();
        let prefix = self.keys.audit.clone();
        let all = run_on(&self.handle, async move {
            bounded(kv.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await
        })
        .map_err(ca_error)?;
        // Keys sort by time: the log comes back oldest first.
        Ok(all
            .kvs()
            .iter()
            .filter_map(|r| match serde_json::from_slice(r.value()) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(r.key()), error = %e, "unreadable audit record skipped");
                    None
                }
            })
            .collect())
    }
}

/// The watch on `issued/`, `revoked/` and `tokens/` that keeps this replica's CA current.
pub struct CaFeed {
    feed: Feed,
    revision: u64,
}

impl CaFeed {
    /// Follows the watch (re-established after errors) until the task is aborted.
    pub async fn run(self) {
        self.feed.run(self.revision).await;
    }
}

struct Feed {
    client: Client,
    keys: Keys,
    authority: Authority,
    tokens: Tokens,
}

impl Feed {
    async fn run(self, mut applied: u64) {
        loop {
            // Compacted past our revision: read everything again (learning is idempotent).
            if let Ok(true) = self.watch(&mut applied).await
                && let Ok(r) = self.reread().await
            {
                applied = r;
            }
            tokio::time::sleep(REWATCH_DELAY).await;
        }
    }

    /// Follows the watch from `applied + 1`; `Ok(true)` when it was compacted away.
    async fn watch(&self, applied: &mut u64) -> Result<bool, etcd_client::Error> {
        let (from, to) = &self.keys.watched;
        let options = WatchOptions::new()
            .with_range(to.as_str())
            .with_start_revision(*applied as i64 + 1);
        let mut stream = self
            .client
            .watch_client()
            .watch(from.as_str(), Some(options))
            .await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Ok(resp.compact_revision() > 0);
            }
            let puts = resp
                .events()
                .iter()
                .filter(|ev| ev.event_type() == EventType::Put)
                .filter_map(|ev| ev.kv());
            for kv in puts.clone() {
                *applied = (*applied).max(kv.mod_revision().max(0) as u64);
            }
            self.apply(puts.map(|kv| (kv.key(), kv.value())));
        }
        Ok(false)
    }

    async fn reread(&self) -> Result<u64, super::StoreError> {
        let (from, to) = &self.keys.watched;
        let mut kv = self.client.kv_client();
        let all = bounded(kv.get(
            from.as_str(),
            Some(GetOptions::new().with_range(to.as_str())),
        ))
        .await?;
        self.apply(all.kvs().iter().map(|r| (r.key(), r.value())));
        Ok(all.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64)
    }

    /// Feeds records (key, value) to the CA, in order; one that does not parse is logged and
    /// skipped.
    fn apply<'a>(&self, records: impl Iterator<Item = (&'a [u8], &'a [u8])>) {
        let skipped = |key: &[u8], e: &dyn std::fmt::Display| {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "CA record from etcd skipped");
        };
        let mut index = Vec::new();
        for (key, value) in records {
            if key.starts_with(self.keys.tokens.as_bytes()) {
                match serde_json::from_slice::<TokenRecord>(value) {
                    Ok(t) => self.tokens.learn(t),
                    Err(e) => skipped(key, &e),
                }
            } else if key.starts_with(self.keys.issued.as_bytes())
                || key.starts_with(self.keys.revoked.as_bytes())
            {
                match serde_json::from_slice::<IndexRecord>(value) {
                    Ok(r) => index.push(r),
                    Err(e) => skipped(key, &e),
                }
            }
        }
        if let Err(e) = self.authority.learn(index) {
            tracing::warn!(error = %e, "CA records from etcd partly skipped");
        }
    }
}
