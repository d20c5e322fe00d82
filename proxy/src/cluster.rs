//! A cluster: the endpoints of one upstream service (swapped whole with `arc-swap`, read without a
//! lock), its balancer, outlier detection, retry budget, circuit breaker and metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::balance::Pick;
use crate::circuit::Breaker;
use crate::clock::now_ms;
use crate::config::ResilienceConfig;
use crate::endpoint::EndpointState;
use crate::metrics::UpstreamMetrics;
use crate::outlier::{OutlierPolicy, Verdict};
use crate::retry::RetryBudget;

/// The endpoints a cluster balances over.
pub type Snapshot = Arc<Vec<Arc<EndpointState>>>;

#[derive(Debug)]
pub struct Cluster {
    name: String,
    endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    balancer: Box<dyn Pick>,
    pub outlier: OutlierPolicy,
    pub budget: RetryBudget,
    pub breaker: Breaker,
    pub metrics: UpstreamMetrics,
    panic_threshold_percent: u8,
    loaded: AtomicBool,
    revision: AtomicU64,
    /// Only endpoints whose attributes include all of these belong here (a route subset).
    subset: BTreeMap<String, String>,
}

/// One endpoint as an update names it.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub instance_id: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

impl Cluster {
    pub fn new(
        name: impl Into<String>,
        balancer: Box<dyn Pick>,
        r: &ResilienceConfig,
        metrics: UpstreamMetrics,
    ) -> Self {
        Cluster {
            name: name.into(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            balancer,
            outlier: OutlierPolicy {
                consecutive_failures: r.outlier_consecutive_5xx,
                base_ejection: r.outlier_base_ejection_time,
                max_ejection_percent: r.outlier_max_ejection_percent,
            },
            budget: RetryBudget::new(r.retry_budget_ratio, r.retry_budget_min_per_sec),
            breaker: Breaker::new(r.max_requests),
            metrics,
            panic_threshold_percent: r.panic_threshold_percent,
            loaded: AtomicBool::new(false),
            revision: AtomicU64::new(0),
            subset: BTreeMap::new(),
        }
    }

    /// The same cluster restricted to endpoints carrying every attribute of `subset`.
    pub fn with_subset(mut self, subset: BTreeMap<String, String>) -> Self {
        self.subset = subset;
        self
    }

    /// Whether an endpoint with `attributes` belongs to this cluster (always, without a subset).
    pub fn accepts(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.subset
            .iter()
            .all(|(k, v)| attributes.get(k).is_some_and(|a| a == v))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the endpoint set; endpoints whose address stays keep their load and outlier state.
    pub fn update(&self, specs: impl IntoIterator<Item = EndpointSpec>, revision: u64) {
        let old = self.endpoints.load();
        let next: Vec<Arc<EndpointState>> = specs
            .into_iter()
            .map(|s| match old.iter().find(|e| e.addr == s.addr) {
                Some(e) if e.weight == s.weight.max(1) && e.instance_id == s.instance_id => {
                    Arc::clone(e)
                }
                Some(e) => Arc::new(e.with_weight(&s.instance_id, s.weight)),
                None => Arc::new(EndpointState::new(s.instance_id, s.addr, s.weight)),
            })
            .collect();
        self.endpoints.store(Arc::new(next));
        self.revision.store(revision, Ordering::Relaxed);
        self.loaded.store(true, Ordering::Release);
    }

    /// Whether a first endpoint snapshot has arrived (readiness).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.endpoints.load_full()
    }

    /// Picks an endpoint, skipping ejected ones unless too few remain (panic mode), and `avoid`
    /// (the endpoint that just failed) when another is usable.
    pub fn pick(
        &self,
        snapshot: &[Arc<EndpointState>],
        avoid: Option<SocketAddr>,
    ) -> Option<Arc<EndpointState>> {
        self.pick_at(snapshot, avoid, now_ms())
    }

    /// [`Cluster::pick`] at `now` ([`crate::clock::now_ms`] of a clock read the caller made).
    pub fn pick_at(
        &self,
        snapshot: &[Arc<EndpointState>],
        avoid: Option<SocketAddr>,
        now: u64,
    ) -> Option<Arc<EndpointState>> {
        let total = snapshot.len();
        let available = snapshot.iter().filter(|e| !e.is_ejected_at(now)).count();
        let panic = available * 100 < total * usize::from(self.panic_threshold_percent);
        let usable = |e: &EndpointState| (panic || !e.is_ejected_at(now)) && Some(e.addr) != avoid;
        let i = self.balancer.pick(snapshot, &usable).or_else(|| {
            avoid.and_then(|_| {
                self.balancer
                    .pick(snapshot, &|e| panic || !e.is_ejected_at(now))
            })
        })?;
        snapshot.get(i).cloned()
    }

    /// Records a result for outlier detection.
    pub fn record(&self, ep: &EndpointState, failure: bool, snapshot: &[Arc<EndpointState>]) {
        if self.outlier.record(ep, failure, snapshot) == Verdict::Eject {
            self.metrics.ejections.inc();
            tracing::warn!(cluster = %self.name, endpoint = %ep.addr, "outlier ejected");
        }
    }

    /// What `/clusters` shows.
    pub fn status(&self) -> ClusterStatus {
        let now = now_ms();
        ClusterStatus {
            name: self.name.clone(),
            revision: self.revision(),
            loaded: self.is_loaded(),
            active_requests: self.breaker.active(),
            endpoints: self
                .snapshot()
                .iter()
                .map(|e| EndpointStatus {
                    instance_id: e.instance_id.clone(),
                    address: e.addr,
                    weight: e.weight,
                    in_flight: e.in_flight(),
                    ejected: e.is_ejected_at(now),
                    ejections: e.ejections.load(Ordering::Relaxed),
                    consecutive_failures: e.consecutive_failures.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub revision: u64,
    pub loaded: bool,
    pub active_requests: usize,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    pub instance_id: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub in_flight: u32,
    pub ejected: bool,
    pub ejections: u32,
    pub consecutive_failures: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::RoundRobin;
    use crate::metrics::Metrics;

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec {
            instance_id: format!("i{port}"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
        }
    }

    fn cluster() -> Cluster {
        let r = ResilienceConfig {
            outlier_consecutive_5xx: 1,
            ..ResilienceConfig::default()
        };
        Cluster::new(
            "api",
            Box::new(RoundRobin::default()),
            &r,
            Metrics::new().upstream("api"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn update_keeps_state_and_pick_skips_ejected() {
        let c = cluster();
        assert!(!c.is_loaded());
        c.update([spec(1), spec(2), spec(3)], 1);
        let snap = c.snapshot();
        c.record(&snap[0], true, &snap);
        assert!(snap[0].is_ejected());
        c.update([spec(1), spec(2), spec(3), spec(4)], 2);
        let snap = c.snapshot();
        assert!(snap[0].is_ejected(), "state survives the update");
        for _ in 0..8 {
            assert_ne!(c.pick(&snap, None).unwrap().addr.port(), 1);
        }
        // Removed endpoints are never picked again.
        c.update([spec(2)], 3);
        let snap = c.snapshot();
        for _ in 0..4 {
            assert_eq!(c.pick(&snap, None).unwrap().addr.port(), 2);
        }
        // `avoid` is honoured only while another endpoint is usable.
        assert_eq!(c.pick(&snap, Some(spec(2).addr)).unwrap().addr.port(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn panic_threshold_uses_all_endpoints() {
        let r = ResilienceConfig {
            outlier_consecutive_5xx: 1,
            outlier_max_ejection_percent: 100,
            ..ResilienceConfig::default()
        };
        let c = Cluster::new(
            "api",
            Box::new(RoundRobin::default()),
            &r,
            Metrics::new().upstream("api"),
        );
        c.update([spec(1), spec(2)], 1);
        let snap = c.snapshot();
        c.record(&snap[0], true, &snap);
        c.record(&snap[1], true, &snap);
        assert!(snap[0].is_ejected() && snap[1].is_ejected());
        assert!(
            c.pick(&snap, None).is_some(),
            "panic mode routes to ejected endpoints"
        );
    }
}
