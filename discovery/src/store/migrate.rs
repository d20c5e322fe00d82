//! `trellis-discovery migrate`: copies a registry between stores (embedded → etcd to grow from one
//! node to replicas, etcd → embedded for a backup). The target must be empty.

use std::path::PathBuf;
use std::str::FromStr;

use super::{EtcdConfig, EtcdStore, EtcdTls, RedbStore, Store, StoreError, Write};

/// One side of a migration: `embedded:DIR` or `etcd:URL[,URL...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
    Etcd(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?}: expected embedded:DIR or etcd:URL[,URL...]")]
pub struct StoreSpecError(String);

impl FromStr for StoreSpec {
    type Err = StoreSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("embedded", dir)) if !dir.is_empty() => Ok(StoreSpec::Embedded(dir.into())),
            Some(("etcd", urls)) if !urls.is_empty() => Ok(StoreSpec::Etcd(
                urls.split(',').map(str::to_owned).collect(),
            )),
            _ => Err(StoreSpecError(s.to_owned())),
        }
    }
}

impl StoreSpec {
    async fn open(
        &self,
        etcd_prefix: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreSpec::Embedded(dir) => Box::new(RedbStore::open(dir)?),
            StoreSpec::Etcd(urls) => {
                let mut config = EtcdConfig::new(urls.clone(), etcd_prefix);
                config.tls = tls.cloned();
                Box::new(EtcdStore::connect(&config).await?)
            }
        })
    }
}

/// Copies every record from `from` into the empty `to`; returns how many. TTL heartbeats are
/// not copied (they are only meaningful while they are fresh). `tls` applies to the etcd side.
pub async fn migrate(
    from: &StoreSpec,
    to: &StoreSpec,
    etcd_prefix: &str,
    tls: Option<&EtcdTls>,
) -> Result<usize, StoreError> {
    let source = from.open(etcd_prefix, tls).await?;
    let target = to.open(etcd_prefix, tls).await?;
    let records = source.load()?;
    if !target.load()?.is_empty() {
        return Err(StoreError::Incompatible(format!(
            "the target {to:?} already holds a registry: migrate only into an empty store"
        )));
    }
    let batch: Vec<Write> = records
        .into_iter()
        .filter(|(k, _)| !k.starts_with("beat/"))
        .map(|(k, v)| Write::Put(k, v))
        .collect();
    let n = batch.len();
    // Blocking calls (etcd waits on its runtime from this thread): off the async workers.
    tokio::task::spawn_blocking(move || target.commit(&batch))
        .await
        .map_err(|e| StoreError::Unavailable(format!("migration task failed: {e}")))??;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "embedded:/var/lib/trellis".parse(),
            Ok(StoreSpec::Embedded("/var/lib/trellis".into()))
        );
        assert_eq!(
            "etcd:http://a:2379,http://b:2379".parse(),
            Ok(StoreSpec::Etcd(vec![
                "http://a:2379".into(),
                "http://b:2379".into()
            ]))
        );
        assert!("etcd:".parse::<StoreSpec>().is_err());
        assert!("redis:x".parse::<StoreSpec>().is_err());
    }
}
