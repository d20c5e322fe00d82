//! Target groups: membership (static or from discovery), health state and deregistration drain.
//! Targets are the sidecar's [`EndpointState`]s and the pick is the sidecar's [`Pick`] balancers
//! (round robin; least outstanding requests = power-of-two-choices least request); this module
//! only decides which targets are usable: healthy (or all of them, fail open), not draining, and
//! admitted by slow start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::config::{Algorithm, HealthCheckConfig, Matcher, TargetGroupConfig};
use super::metrics::GroupMetrics;
use super::window::Window;
use crate::balance::{LeastRequest, Pick, RoundRobin};
use crate::clock::now_ms;
use crate::endpoint::{EndpointState, OwnedInFlight};

/// One target: its endpoint state (what balancers read) and health-check streaks.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub endpoint: Arc<EndpointState>,
    /// Consecutive passes / failures, written by the health checker only.
    pub(crate) passes: AtomicU64,
    pub(crate) failures: AtomicU64,
}

impl Target {
    fn new(endpoint: EndpointState) -> Self {
        Self {
            addr: endpoint.addr,
            endpoint: Arc::new(endpoint),
            passes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.endpoint.is_healthy()
    }

    pub fn is_draining(&self) -> bool {
        self.endpoint.is_draining()
    }

    pub fn outstanding(&self) -> usize {
        self.endpoint.in_flight() as usize
    }
}

/// Holds one in-flight request against a target; dropping it (when the response body ends)
/// releases it.
#[derive(Debug)]
pub struct InFlight(OwnedInFlight);

impl InFlight {
    pub fn target(&self) -> &EndpointState {
        self.0.endpoint()
    }
}

#[derive(Debug, Serialize)]
pub struct TargetView {
    pub addr: SocketAddr,
    pub healthy: bool,
    pub draining: bool,
    pub outstanding: usize,
}

/// The members, and their endpoints in the same order (the slice balancers pick from).
#[derive(Debug, Default)]
struct Members {
    targets: Vec<Arc<Target>>,
    endpoints: Vec<Arc<EndpointState>>,
}

impl Members {
    fn new(targets: Vec<Arc<Target>>) -> Self {
        let endpoints = targets.iter().map(|t| Arc::clone(&t.endpoint)).collect();
        Self { targets, endpoints }
    }
}

pub struct TargetGroup {
    pub name: Arc<str>,
    pub config: TargetGroupConfig,
    pub matcher: Matcher,
    pub metrics: GroupMetrics,
    /// Outcomes for deployment rollback checks.
    pub window: Window,
    members: ArcSwap<Members>,
    writer: Mutex<()>,
    balancer: Box<dyn Pick>,
}

impl TargetGroup {
    pub fn new(
        config: TargetGroupConfig,
        matcher: Matcher,
        metrics: GroupMetrics,
        window: Duration,
    ) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|a| Arc::new(Target::new(EndpointState::new(a.to_string(), *a, 1))))
            .collect();
        let balancer: Box<dyn Pick> = match config.algorithm {
            Algorithm::RoundRobin => Box::new(RoundRobin::default()),
            Algorithm::LeastOutstandingRequests => Box::new(LeastRequest),
        };
        let g = Self {
            name: Arc::from(config.name.as_str()),
            matcher,
            metrics,
            window: Window::new(window, Instant::now()),
            members: ArcSwap::from_pointee(Members::new(targets)),
            writer: Mutex::new(()),
            balancer,
            config,
        };
        g.publish_health();
        g
    }

    pub fn health_check(&self) -> &HealthCheckConfig {
        &self.config.health_check
    }

    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.members.load().targets.clone()
    }

    pub fn view(&self) -> Vec<TargetView> {
        self.members
            .load()
            .targets
            .iter()
            .map(|t| TargetView {
                addr: t.addr,
                healthy: t.is_healthy(),
                draining: t.is_draining(),
                outstanding: t.outstanding(),
            })
            .collect()
    }

    /// Health checker verdict for `t`.
    pub fn set_healthy(&self, t: &Target, healthy: bool) {
        if t.endpoint.set_healthy(healthy) {
            tracing::info!(group = %self.name, target = %t.addr, healthy, "target health changed");
            self.publish_health();
        }
    }

    fn publish_health(&self) {
        let n = self
            .members
            .load()
            .endpoints
            .iter()
            .filter(|e| e.is_healthy() && !e.is_draining())
            .count();
        self.metrics.healthy_targets.set(n as i64);
    }

    /// Choose a target and count it in flight. Unhealthy targets are skipped unless all are
    /// (then all non-draining ones are used and `fail_open` counted). `rnd` drives slow start.
    /// `avoid` (a target that just refused a connection) is skipped unless it is the only one.
    pub fn pick(&self, rnd: u32, avoid: Option<SocketAddr>) -> Option<InFlight> {
        let m = self.members.load();
        let eps = &m.endpoints;
        let others = eps
            .iter()
            .any(|e| Some(e.addr) != avoid && !e.is_draining());
        let live = |e: &EndpointState| !(e.is_draining() || others && Some(e.addr) == avoid);
        let any_healthy = eps.iter().any(|e| live(e) && e.is_healthy());
        if !any_healthy {
            self.metrics.fail_open.inc();
        }
        let eligible = |e: &EndpointState| live(e) && (!any_healthy || e.is_healthy());
        // The clock matters only to slow start.
        let now = if self.config.slow_start.is_some() {
            now_ms()
        } else {
            0
        };
        let i = self
            .balancer
            .pick(eps, &|e| eligible(e) && self.ramp_admits(e, now, rnd))
            .or_else(|| self.balancer.pick(eps, &eligible))?;
        Some(InFlight(eps.get(i)?.start_owned()))
    }

    /// Slow start: a target that became healthy `e` ago takes `e / slow_start` of its share.
    fn ramp_admits(&self, e: &EndpointState, now: u64, rnd: u32) -> bool {
        let Some(ss) = self.config.slow_start else {
            return true;
        };
        let since = e.healthy_since_ms();
        if since == 0 {
            return true; // present from the start
        }
        let elapsed = now.saturating_sub(since) as f64;
        let frac = (elapsed / (ss.as_millis().max(1) as f64)).clamp(0.05, 1.0);
        f64::from(rnd) / f64::from(u32::MAX) < frac
    }

    /// Replace membership (discovery). New addresses join (in slow start when configured);
    /// missing ones drain: no new requests, removed when idle or after the deregistration delay.
    pub fn set_members(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let _w = self.writer.lock();
        let cur = self.members.load_full();
        let mut next: Vec<Arc<Target>> = Vec::with_capacity(addrs.len());
        for a in addrs {
            match cur.targets.iter().find(|t| t.addr == *a) {
                Some(t) => {
                    t.endpoint.set_draining(false);
                    next.push(Arc::clone(t));
                }
                None => next.push(Arc::new(Target::new(EndpointState::joining(
                    a.to_string(),
                    *a,
                    1,
                )))),
            }
        }
        for t in cur.targets.iter().filter(|t| !addrs.contains(&t.addr)) {
            if !t.endpoint.set_draining(true) {
                let (g, t2) = (Arc::clone(self), Arc::clone(t));
                tokio::spawn(async move { g.drain_then_remove(t2).await });
            }
            next.push(Arc::clone(t));
        }
        self.members.store(Arc::new(Members::new(next)));
        drop(_w);
        self.publish_health();
    }

    async fn drain_then_remove(self: Arc<Self>, t: Arc<Target>) {
        let deadline = Instant::now() + self.config.deregistration_delay;
        while t.outstanding() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _w = self.writer.lock();
        if !t.is_draining() {
            return; // re-registered meanwhile
        }
        let cur = self.members.load_full();
        let next: Vec<_> = cur
            .targets
            .iter()
            .filter(|x| !Arc::ptr_eq(x, &t))
            .cloned()
            .collect();
        self.members.store(Arc::new(Members::new(next)));
        tracing::info!(group = %self.name, target = %t.addr, "target deregistered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::metrics::Metrics;

    fn group(addrs: &[&str], algorithm: Algorithm) -> Arc<TargetGroup> {
        group_with(addrs, algorithm, "")
    }

    fn group_with(addrs: &[&str], algorithm: Algorithm, extra: &str) -> Arc<TargetGroup> {
        let cfg: TargetGroupConfig = toml::from_str(&format!(
            "name = \"g\"\ntargets = [{}]\nalgorithm = \"{}\"\nderegistration_delay = \"1s\"\n{extra}",
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(","),
            match algorithm {
                Algorithm::RoundRobin => "round-robin",
                Algorithm::LeastOutstandingRequests => "least-outstanding-requests",
            }
        ))
        .unwrap();
        let m = Metrics::new();
        Arc::new(TargetGroup::new(
            cfg,
            Matcher::parse("200").unwrap(),
            m.group("g"),
            Duration::from_secs(10),
        ))
    }

    #[tokio::test]
    async fn round_robin_skips_unhealthy_and_fails_open() {
        let g = group(&["127.0.0.1:1", "127.0.0.1:2"], Algorithm::RoundRobin);
        let seen: Vec<u16> = (0..4)
            .map(|_| g.pick(0, None).unwrap().target().addr.port())
            .collect();
        assert_eq!(seen.iter().filter(|p| **p == 1).count(), 2);
        let ts = g.targets();
        g.set_healthy(&ts[0], false);
        assert!((0..4).all(|_| g.pick(0, None).unwrap().target().addr.port() == 2));
        assert_eq!(g.metrics.fail_open.get(), 0);
        g.set_healthy(&ts[1], false);
        assert!(g.pick(0, None).is_some());
        assert_eq!(g.metrics.fail_open.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_recovered_target() {
        let g = group_with(
            &["127.0.0.1:1", "127.0.0.1:2"],
            Algorithm::RoundRobin,
            "slow_start = \"10s\"",
        );
        let ts = g.targets();
        g.set_healthy(&ts[1], false);
        g.set_healthy(&ts[1], true);
        let share_of_2 = |g: &TargetGroup| {
            let n = 2000u32;
            let hits = (0..n)
                .filter(|i| {
                    let rnd = i.wrapping_mul(2_654_435_761); // spread over u32
                    g.pick(rnd, None).unwrap().target().addr.port() == 2
                })
                .count();
            hits as f64 / f64::from(n)
        };
        let early = share_of_2(&g);
        assert!(early < 0.15, "just recovered: {early}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let mid = share_of_2(&g);
        assert!(mid > early && mid < 0.45, "half way: {mid}");
        tokio::time::advance(Duration::from_secs(6)).await;
        let late = share_of_2(&g);
        assert!((late - 0.5).abs() < 0.05, "ramped: {late}");
    }

    #[tokio::test]
    async fn least_outstanding_prefers_idle() {
        let g = group(
            &["127.0.0.1:1", "127.0.0.1:2"],
            Algorithm::LeastOutstandingRequests,
        );
        let a = g.pick(0, None).unwrap();
        let b = g.pick(0, None).unwrap();
        assert_ne!(a.target().addr, b.target().addr);
        let busy = a.target().addr;
        drop(b);
        for _ in 0..5 {
            assert_ne!(g.pick(0, None).unwrap().target().addr, busy);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn removed_target_drains_then_leaves() {
        let g = group(&["127.0.0.1:1", "127.0.0.1:2"], Algorithm::RoundRobin);
        let held = loop {
            let f = g.pick(0, None).unwrap();
            if f.target().addr.port() == 1 {
                break f;
            }
        };
        g.set_members(&["127.0.0.1:2".parse().unwrap()]);
        assert!((0..4).all(|_| g.pick(0, None).unwrap().target().addr.port() == 2));
        assert_eq!(g.targets().len(), 2, "still draining its in-flight request");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(g.targets().len(), 2);
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(g.targets().len(), 1);
    }
}
