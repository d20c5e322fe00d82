//! Target groups: membership (static or from discovery), health state, the pick (round robin or
//! least outstanding requests, slow start, fail open) and deregistration drain.
//!
//! TODO(merge): replace the pick with the sidecar's `Pick` balancers once they land; the health
//! and drain state here is what they would read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::config::{Algorithm, HealthCheckConfig, Matcher, TargetGroupConfig};
use super::metrics::GroupMetrics;
use super::window::Window;

#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once.
    pub authority: http::uri::Authority,
    healthy: AtomicBool,
    draining: AtomicBool,
    outstanding: AtomicUsize,
    /// Nanoseconds after the group's epoch when the target last became healthy.
    healthy_since: AtomicU64,
    /// Consecutive passes / failures, written by the health checker only.
    pub(crate) passes: AtomicU64,
    pub(crate) failures: AtomicU64,
}

impl Target {
    fn new(addr: SocketAddr, since: u64) -> Self {
        Self {
            addr,
            authority: addr_authority(addr),
            // Targets start in rotation; a failing one leaves after `unhealthy_threshold` checks.
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            healthy_since: AtomicU64::new(since),
            passes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Relaxed)
    }
}

fn addr_authority(addr: SocketAddr) -> http::uri::Authority {
    // A socket address always renders as a valid authority (`1.2.3.4:80`, `[::1]:80`).
    http::uri::Authority::try_from(addr.to_string())
        .unwrap_or_else(|_| http::uri::Authority::from_static("invalid.invalid"))
}

/// Holds one in-flight request against a target; dropping it (when the response body ends)
/// releases it.
#[derive(Debug)]
pub struct InFlight(Arc<Target>);

impl InFlight {
    pub fn target(&self) -> &Target {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Serialize)]
pub struct TargetView {
    pub addr: SocketAddr,
    pub healthy: bool,
    pub draining: bool,
    pub outstanding: usize,
}

pub struct TargetGroup {
    pub name: Arc<str>,
    pub config: TargetGroupConfig,
    pub matcher: Matcher,
    pub metrics: GroupMetrics,
    /// Outcomes for deployment rollback checks.
    pub window: Window,
    epoch: Instant,
    targets: ArcSwap<Vec<Arc<Target>>>,
    writer: Mutex<()>,
    rr: AtomicUsize,
}

impl TargetGroup {
    pub fn new(
        config: TargetGroupConfig,
        matcher: Matcher,
        metrics: GroupMetrics,
        window: Duration,
    ) -> Self {
        let epoch = Instant::now();
        let targets = config
            .targets
            .iter()
            .map(|a| Arc::new(Target::new(*a, 0)))
            .collect();
        let g = Self {
            name: Arc::from(config.name.as_str()),
            matcher,
            metrics,
            window: Window::new(window, epoch),
            epoch,
            targets: ArcSwap::from_pointee(targets),
            writer: Mutex::new(()),
            rr: AtomicUsize::new(0),
            config,
        };
        g.publish_health();
        g
    }

    pub fn health_check(&self) -> &HealthCheckConfig {
        &self.config.health_check
    }

    pub fn targets(&self) -> Arc<Vec<Arc<Target>>> {
        self.targets.load_full()
    }

    pub fn view(&self) -> Vec<TargetView> {
        self.targets
            .load()
            .iter()
            .map(|t| TargetView {
                addr: t.addr,
                healthy: t.is_healthy(),
                draining: t.is_draining(),
                outstanding: t.outstanding(),
            })
            .collect()
    }

    fn now_nanos(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64
    }

    /// Health checker verdict for `t`.
    pub fn set_healthy(&self, t: &Target, healthy: bool) {
        if t.healthy.swap(healthy, Relaxed) != healthy {
            if healthy {
                t.healthy_since.store(self.now_nanos().max(1), Relaxed);
            }
            tracing::info!(group = %self.name, target = %t.addr, healthy, "target health changed");
            self.publish_health();
        }
    }

    fn publish_health(&self) {
        let n = self
            .targets
            .load()
            .iter()
            .filter(|t| t.is_healthy() && !t.is_draining())
            .count();
        self.metrics.healthy_targets.set(n as i64);
    }

    /// Choose a target and count it in flight. Unhealthy targets are skipped unless all are
    /// (then all non-draining ones are used and `fail_open` counted). `rnd` drives slow start.
    /// `avoid` (a target that just refused a connection) is skipped unless it is the only one.
    pub fn pick(&self, rnd: u32, avoid: Option<SocketAddr>) -> Option<InFlight> {
        let ts = self.targets.load();
        let others = ts.iter().any(|t| Some(t.addr) != avoid && !t.is_draining());
        let live = |t: &&Arc<Target>| !(t.is_draining() || others && Some(t.addr) == avoid);
        let any_healthy = ts.iter().filter(live).any(|t| t.is_healthy());
        if !any_healthy {
            self.metrics.fail_open.inc();
        }
        let eligible = |t: &&Arc<Target>| live(t) && (!any_healthy || t.is_healthy());
        let n = ts.iter().filter(eligible).count();
        if n == 0 {
            return None;
        }
        let start = self.rr.fetch_add(1, Relaxed);
        let chosen = match self.config.algorithm {
            Algorithm::RoundRobin => {
                let now = self.now_nanos();
                let mut pick = None;
                for k in 0..n {
                    let t = ts.iter().filter(eligible).nth((start + k) % n);
                    if let Some(t) = t {
                        pick.get_or_insert(t);
                        if self.ramp_admits(t, now, rnd) {
                            pick = Some(t);
                            break;
                        }
                    }
                }
                pick
            }
            Algorithm::LeastOutstandingRequests => ts
                .iter()
                .filter(eligible)
                .cycle()
                .skip(start % n)
                .take(n)
                .min_by_key(|t| t.outstanding()),
        }?;
        chosen.outstanding.fetch_add(1, Relaxed);
        Some(InFlight(Arc::clone(chosen)))
    }

    /// Slow start: a target that became healthy `e` ago takes `e / slow_start` of its share.
    fn ramp_admits(&self, t: &Target, now: u64, rnd: u32) -> bool {
        let Some(ss) = self.config.slow_start else {
            return true;
        };
        let since = t.healthy_since.load(Relaxed);
        if since == 0 {
            return true; // present from the start
        }
        let elapsed = now.saturating_sub(since) as f64;
        let frac = (elapsed / ss.as_nanos().max(1) as f64).clamp(0.05, 1.0);
        f64::from(rnd) / f64::from(u32::MAX) < frac
    }

    /// Replace membership (discovery). New addresses join (in slow start when configured);
    /// missing ones drain: no new requests, removed when idle or after the deregistration delay.
    pub fn set_members(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let _w = self.writer.lock();
        let cur = self.targets.load_full();
        let since = self.now_nanos().max(1);
        let mut next: Vec<Arc<Target>> = Vec::with_capacity(addrs.len());
        for a in addrs {
            match cur.iter().find(|t| t.addr == *a) {
                Some(t) => {
                    t.draining.store(false, Relaxed);
                    next.push(Arc::clone(t));
                }
                None => next.push(Arc::new(Target::new(*a, since))),
            }
        }
        for t in cur.iter().filter(|t| !addrs.contains(&t.addr)) {
            if !t.draining.swap(true, Relaxed) {
                let (g, t2) = (Arc::clone(self), Arc::clone(t));
                tokio::spawn(async move { g.drain_then_remove(t2).await });
            }
            next.push(Arc::clone(t));
        }
        self.targets.store(Arc::new(next));
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
        let cur = self.targets.load_full();
        let next: Vec<_> = cur
            .iter()
            .filter(|x| !Arc::ptr_eq(x, &t))
            .cloned()
            .collect();
        self.targets.store(Arc::new(next));
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
