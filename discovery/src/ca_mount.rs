//! Mounting the CA issuance API (`trellis-ca`) on the control plane's HTTP front, so one process
//! is the whole control plane. The CA lives in `<data-dir>/ca`, initialised on first start.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use trellis_ca::api::CaApi;
use trellis_ca::{CaDir, Policy};

use crate::http::Mount;
use crate::server::{ServerConfig, ServerError};

/// Sub-directory of the data directory holding the CA.
pub const CA_DIR: &str = "ca";

struct CaMount(CaApi);

impl Mount for CaMount {
    fn matches(&self, parts: &http::request::Parts) -> bool {
        CaApi::matches(parts)
    }
    fn handle(
        &self,
        req: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send + '_>> {
        Box::pin(self.0.handle(req))
    }
    fn metrics(&self) -> Option<Vec<u8>> {
        Some(self.0.authority().metrics().render().into_bytes())
    }
    fn spawn_maintenance(&self) -> Option<tokio::task::JoinHandle<()>> {
        Some(self.0.spawn_maintenance())
    }
}

/// The CA mount: none without a data directory (in-memory tests), else the CA opened (or
/// created on first start) in `<data-dir>/ca`.
pub fn mounts(config: &ServerConfig) -> Result<Vec<Box<dyn Mount>>, ServerError> {
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
    Ok(vec![Box::new(CaMount(api))])
}

/// The CA's config file name: its presence means "initialised".
fn trellis_ca_config_file() -> &'static str {
    "ca.json"
}
