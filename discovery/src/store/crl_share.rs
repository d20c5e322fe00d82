//! The CA's revocations across replicas: each replica signs with its own intermediate, so each has
//! its own CRL. Every replica publishes its current CRL under `<prefix>ca/crl/<intermediate hash>`
//! and `GET /v1/ca/crl` on any replica answers all of them (one PEM file, one CRL per issuer), so a
//! revocation on one replica appears in every replica's answer.

use std::time::Duration;

use etcd_client::{Client, GetOptions};

use super::{EtcdConfig, StoreError};

/// How often a replica re-publishes its CRL when it changed.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct CrlShare {
    client: Client,
    prefix: String,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

impl CrlShare {
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let options = super::etcd::connect_options(config)?;
        let client =
            tokio::time::timeout(TIMEOUT, Client::connect(&config.endpoints, Some(options)))
                .await
                .map_err(|_| unavailable("no answer"))?
                .map_err(unavailable)?;
        Ok(CrlShare {
            client,
            prefix: format!("{}ca/crl/", config.prefix),
        })
    }

    /// Publishes this replica's CRL; `issuer` names the intermediate that signs it.
    pub async fn publish(&self, issuer: &str, crl_pem: &str) -> Result<(), StoreError> {
        let key = format!("{}{:016x}", self.prefix, fingerprint(issuer.as_bytes()));
        let mut kv = self.client.kv_client();
        tokio::time::timeout(TIMEOUT, kv.put(key, crl_pem, None))
            .await
            .map_err(|_| unavailable("no answer"))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// Every replica's CRL, concatenated.
    pub async fn all(&self) -> Result<String, StoreError> {
        let mut kv = self.client.kv_client();
        let r = tokio::time::timeout(
            TIMEOUT,
            kv.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| unavailable("no answer"))?
        .map_err(unavailable)?;
        Ok(r.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .collect())
    }
}

/// FNV-1a: a short stable name for an intermediate certificate.
pub(super) fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
