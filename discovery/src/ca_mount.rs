//! Mounting the CA issuance API (`trellis-ca`) on the control plane's HTTP front, so one process
//! is the whole control plane. The CA lives in `<data-dir>/ca`, initialised on first start; on
//! etcd its serials, revocations, tokens and audit log are shared by every replica.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use parking_lot::Mutex;
use trellis_ca::api::CaApi;
use trellis_ca::{CaDir, Policy};

use crate::http::Mount;
use crate::server::{ServerConfig, ServerError};
use crate::store::{CaFeed, CrlShare, EtcdCaState};

/// Sub-directory of the data directory holding the CA.
pub const CA_DIR: &str = "ca";

/// The CA API; on etcd also the CRL share and the watch on the shared CA state (run by the
/// maintenance task, so shutdown stops it).
struct CaMount(CaApi, Option<(CrlShare, Mutex<Option<CaFeed>>)>);

impl Mount for CaMount {
    fn matches(&self, parts: &http::request::Parts) -> bool {
        CaApi::matches(parts)
    }
    fn handle(
        &self,
        req: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send + '_>> {
        if let Some((share, _)) = &self.1
            && req.method() == http::Method::GET
            && req.uri().path() == "/v1/ca/crl"
        {
            // Replicas on etcd: every replica's CRL (one per intermediate), this one's if etcd is away.
            return Box::pin(async move {
                let pem = match share.all().await {
                    Ok(all) if !all.is_empty() => all,
                    _ => self.0.authority().crl_pem().to_string(),
                };
                let mut r = Response::new(Full::new(Bytes::from(pem)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-pem-file"),
                );
                r
            });
        }
        Box::pin(self.0.handle(req))
    }
    fn metrics(&self) -> Option<Vec<u8>> {
        Some(self.0.authority().metrics().render().into_bytes())
    }
    fn authority(&self) -> Option<&trellis_ca::Authority> {
        Some(self.0.authority())
    }
    fn spawn_maintenance(&self) -> Option<tokio::task::JoinHandle<()>> {
        let own = self.0.spawn_maintenance();
        let Some((share, feed)) = &self.1 else {
            return Some(own);
        };
        let share = share.clone();
        let feed = feed.lock().take().map(|f| tokio::spawn(f.run()));
        let authority = self.0.authority().clone();
        Some(tokio::spawn(async move {
            // Aborting this task (shutdown) aborts the CA's own maintenance and the feed with it.
            let own = AbortOnDrop(own);
            let _feed = feed.map(AbortOnDrop);
            // Publish this replica's CRL whenever it changes (revocations, periodic re-signing).
            let mut published = String::new();
            loop {
                let crl = authority.crl_pem();
                if *crl != published
                    && share
                        .publish(authority.intermediate_pem(), &crl)
                        .await
                        .is_ok()
                {
                    published = crl.to_string();
                }
                if own.0.is_finished() {
                    return;
                }
                tokio::time::sleep(crate::store::CRL_PUBLISH_INTERVAL).await;
            }
        }))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The CA mount: none without a data directory (in-memory tests), else the CA opened (or
/// created on first start) in `<data-dir>/ca`. On etcd, CRLs are shared across replicas.
pub async fn mounts(config: &ServerConfig) -> Result<Vec<Box<dyn Mount>>, ServerError> {
    let Some(data) = &config.data_dir else {
        return Ok(Vec::new());
    };
    let path = data.join(CA_DIR);
    let dir = CaDir::new(&path);
    let err = |e: trellis_ca::CaError| ServerError::Ca(format!("{}: {e}", path.display()));
    let authority = if path.join(trellis_ca_config_file()).exists() {
        dir.open().map_err(err)?
    } else {
        tracing::info!(dir = %path.display(), trust_domain = %config.trust_domain, "initialising the CA");
        dir.init(config.trust_domain.clone(), Policy::default())
            .map_err(err)?
    };
    let tokens = dir.tokens().map_err(err)?;
    let api = CaApi::new(authority, tokens, &config.registry.region);
    let share = match &config.etcd {
        Some(etcd) => {
            // Serials, revocations, tokens and the audit log move to etcd, shared by all replicas.
            let feed = EtcdCaState::start(etcd, api.authority(), api.tokens()).await?;
            Some((CrlShare::connect(etcd).await?, Mutex::new(Some(feed))))
        }
        None => None,
    };
    Ok(vec![Box::new(CaMount(api, share))])
}

/// The CA's config file name: its presence means "initialised".
fn trellis_ca_config_file() -> &'static str {
    "ca.json"
}
