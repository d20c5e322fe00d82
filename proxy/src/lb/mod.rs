//! `trellis-proxy lb`: the path-based internal load balancer. Listeners route with the shared
//! [`crate::route`] engine to health-checked target groups (static or from discovery), shift
//! traffic live (admin API, deployments with automatic rollback) and expose `/metrics`,
//! `/ready`, `/config`.

mod admin;
pub mod config;
mod deploy;
mod discovery;
mod error;
mod health;
mod listener;
mod metrics;
mod server;
pub mod shift;
mod target;
mod tls;
pub mod window;

pub use config::{ConfigError, LbConfig};
pub use error::{ForwardError, LbError, WeightError};
pub use server::{LbHandle, Reloader, start};
