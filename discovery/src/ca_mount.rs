//! Mounting the CA issuance API (`trellis-ca`) on the control plane's HTTP front.

use crate::http::Mount;
use crate::server::{ServerConfig, ServerError};

/// The CA mount for this configuration (none until the CA API lands).
pub fn mounts(_config: &ServerConfig) -> Result<Vec<Box<dyn Mount>>, ServerError> {
    Ok(Vec::new())
}
