//! Durable storage of the registry behind a small trait: an embedded redb file by default, or etcd
//! for several replicas ([`EtcdStore`]). Every `commit` is durable (fsync, or a quorum) before it
//! returns.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use redb::{Database, ReadableTable, TableDefinition};
use std::sync::Weak;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// File name of the embedded store inside the data directory.
pub const STORE_FILE: &str = "registry.redb";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "cannot open store {path}: {reason} (refusing to start; move the file away to start empty)"
    )]
    Open { path: PathBuf, reason: String },
    #[error("store {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// A replicated store cannot reach a quorum: nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another replica changed what this write was validated against: re-validate and retry.
    #[error("concurrent change; retry")]
    Conflict,
    /// The replicated store holds data this version does not understand.
    #[error("{0}")]
    Incompatible(String),
}

/// One write of a batch: keys are `kind/id` strings, values JSON records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

pub trait Store: Send + Sync + 'static {
    /// Every record, in key order.
    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Apply a batch atomically and durably.
    fn commit(&self, batch: &[Write]) -> Result<(), StoreError>;

    /// Replicated stores only: the store revision `load` was read at. `None` means this process is
    /// the only writer, so the registry applies its own commits.
    fn replicated_at(&self) -> Option<u64> {
        None
    }
    /// Replicated stores only: the revision of the last change fed to the registry.
    fn view_revision(&self) -> u64 {
        0
    }
    /// Replicated stores only: commit `batch` if nothing it depends on changed after revision
    /// `seen` (else [`StoreError::Conflict`]), then return once the feed has applied it.
    fn commit_checked(&self, batch: &[Write], _seen: u64) -> Result<(), StoreError> {
        self.commit(batch)
    }
    /// Replicated stores only: start feeding every change after `load` (from any replica) to `sink`.
    fn start_feed(&self, _sink: Weak<dyn FeedSink>) {}
    /// Whether the view may be behind the store (quorum lost, watch broken).
    fn stale(&self) -> bool {
        false
    }
    /// Replicated stores only: whether this replica runs the health check named `item` (checks
    /// are shared out over the live replicas). A single node runs them all.
    fn owns(&self, _item: &str) -> bool {
        true
    }
    /// Replicated stores only: write `write` in the background if record `requires` exists (health
    /// flips and heartbeats: the feed brings them back to every replica, this one included).
    fn publish(&self, _write: Write, _requires: &str) {}
}

/// Receives the changes of a replicated store, in revision order.
pub trait FeedSink: Send + Sync {
    /// `events` all committed at store revision `revision`.
    fn apply_feed(&self, revision: u64, events: Vec<Write>);
}

/// The embedded, crash-safe store (redb: copy-on-write B-trees, fsync on commit).
pub struct RedbStore {
    path: PathBuf,
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) `<dir>/registry.redb`. A corrupt or truncated file is an error naming it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STORE_FILE);
        let open_err = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        if let Ok(meta) = std::fs::metadata(&path) {
            // redb would treat an empty file as a fresh database: only a file we never wrote is empty.
            if meta.len() == 0 {
                return Err(open_err("file is empty (truncated)".into()));
            }
        }
        // redb asserts (panics) on some truncated files instead of returning an error: contain it.
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Database::create(&path)));
        let db = match opened {
            Ok(r) => r.map_err(|e| open_err(e.to_string()))?,
            Err(_) => return Err(open_err("file is truncated or corrupt".into())),
        };
        let store = RedbStore {
            path: path.clone(),
            db,
        };
        // Read everything once so a damaged tree fails here, at start, not later (redb can panic
        // on a damaged tree too: contained like the open above).
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.load())) {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(open_err(format!("verification failed: {e}"))),
            Err(_) => Err(open_err("file is corrupt (reading it failed)".into())),
        }
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let table = match txn.open_table(RECORDS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.io(e))? {
            let (k, v) = row.map_err(|e| self.io(e))?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.io(e))?;
            for w in batch {
                match w {
                    Write::Put(k, v) => {
                        table
                            .insert(k.as_str(), v.as_slice())
                            .map_err(|e| self.io(e))?;
                    }
                    Write::Delete(k) => {
                        table.remove(k.as_str()).map_err(|e| self.io(e))?;
                    }
                }
            }
        }
        // Durability::Immediate is redb's default: commit returns after fsync.
        txn.commit().map_err(|e| self.io(e))
    }
}

mod ca_state;
mod crl_share;
mod etcd;
mod migrate;
pub use ca_state::{CaFeed, EtcdCaState};
pub use crl_share::{CrlShare, PUBLISH_INTERVAL as CRL_PUBLISH_INTERVAL};
pub use etcd::{DEFAULT_LEASE_TTL, EtcdConfig, EtcdStore, EtcdTls, RESYNC, SCHEMA};
pub use migrate::{StoreSpec, StoreSpecError, migrate};

/// A volatile store for unit tests and `--data-dir ''`-less embedding.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .records
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn commit(&self, batch: &[Write]) -> Result<(), StoreError> {
        let mut r = self.records.lock();
        for w in batch {
            match w {
                Write::Put(k, v) => {
                    r.insert(k.clone(), v.clone());
                }
                Write::Delete(k) => {
                    r.remove(k);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.commit(&[
                Write::Put("a".into(), b"1".to_vec()),
                Write::Put("b".into(), b"2".to_vec()),
            ])
            .unwrap();
            s.commit(&[Write::Delete("a".into())]).unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(s.load().unwrap(), vec![("b".to_owned(), b"2".to_vec())]);
    }

    #[test]
    fn corrupt_or_truncated_refuses_to_start_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.commit(&[Write::Put("a".into(), vec![7; 5000])]).unwrap();
        }
        let path = dir.path().join(STORE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        // Truncated to half.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let err = RedbStore::open(dir.path())
            .err()
            .expect("truncated store must not open");
        assert!(err.to_string().contains(STORE_FILE), "{err}");
        // Garbage.
        std::fs::write(&path, vec![0xAB; 8192]).unwrap();
        let err = RedbStore::open(dir.path())
            .err()
            .expect("garbage store must not open");
        assert!(err.to_string().contains(STORE_FILE), "{err}");
        // Empty.
        std::fs::write(&path, b"").unwrap();
        let err = RedbStore::open(dir.path())
            .err()
            .expect("empty store must not open");
        assert!(err.to_string().contains(STORE_FILE), "{err}");
    }
}
