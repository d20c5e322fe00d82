//! The memory-pressure guard, a small Envoy overload manager: a sampler reads the process RSS
//! and the bytes held in the proxy's own buffers ([`crate::buffered`]) every [`SAMPLE_EVERY`] and
//! sets a process-wide pressure level (memory is per process, so the level is too) from the
//! fuller of the two budgets. At [`STOP_ACCEPTING`] of a budget new connections are closed at
//! accept (the lowest-priority work: nothing has been spent on them yet); at the full budget new
//! requests on open connections are answered `503` with `Retry-After` too, while requests in
//! flight finish. The admin listener is never shed. Metrics: `trellis_proxy_overload_level`,
//! `trellis_proxy_overload_rss_bytes`, `trellis_proxy_overload_buffered_bytes`,
//! `trellis_proxy_overload_shed_total{work}`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;

/// How often RSS is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Fraction of the budget where new connections stop being accepted.
pub const STOP_ACCEPTING: f64 = 0.9;
/// Fractions below which a level is left again (hysteresis, so the level does not flap).
const RELAX_ACCEPTING: f64 = 0.85;
const RELAX_SHEDDING: f64 = 0.95;
/// Seconds a shed client is told to wait.
pub const RETRY_AFTER_SECS: u32 = 1;

/// How hard the process is pressed for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    Normal = 0,
    /// New connections are closed at accept.
    StopAccepting = 1,
    /// Also new requests get 503 + Retry-After.
    ShedRequests = 2,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);
static SHED: OnceLock<IntCounterVec> = OnceLock::new();

/// The current level (Normal when no guard runs).
pub fn pressure() -> Pressure {
    match LEVEL.load(Ordering::Relaxed) {
        0 => Pressure::Normal,
        1 => Pressure::StopAccepting,
        _ => Pressure::ShedRequests,
    }
}

/// Whether a just-accepted connection may be served; counts it when shed.
pub fn admit_connection() -> bool {
    let ok = pressure() < Pressure::StopAccepting;
    if !ok {
        count("connection");
    }
    ok
}

/// `None` when a new request may proceed, else the 503 to answer it with.
pub fn shed_request() -> Option<http::Response<ProxyBody>> {
    if pressure() < Pressure::ShedRequests {
        return None;
    }
    count("request");
    let mut r = http::Response::new(ProxyBody::full("overloaded: retry later\n"));
    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    Some(r)
}

fn count(work: &str) {
    if let Some(c) = SHED.get() {
        c.with_label_values(&[work]).inc();
    }
}

/// What the guard protects: either budget may be unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Resident memory of the process, bytes.
    pub rss_bytes: Option<u64>,
    /// Bytes in the proxy's own buffers ([`crate::buffered`]).
    pub buffered_bytes: Option<u64>,
}

impl Budget {
    /// From the config's MiB values (`limits.max_rss_mb`, `limits.max_buffered_mb`).
    pub fn from_mib(max_rss_mb: Option<u64>, max_buffered_mb: Option<u64>) -> Budget {
        let bytes = |mb: Option<u64>| mb.filter(|m| *m > 0).map(|m| m.saturating_mul(1 << 20));
        Budget {
            rss_bytes: bytes(max_rss_mb),
            buffered_bytes: bytes(max_buffered_mb),
        }
    }

    /// How full the fuller budget is (1.0 = at the budget), given RSS and buffered bytes.
    pub fn fill(&self, rss: Option<u64>, buffered: u64) -> f64 {
        let ratio = |now: u64, budget: u64| now as f64 / budget as f64;
        let r = self
            .rss_bytes
            .zip(rss)
            .map_or(0.0, |(b, now)| ratio(now, b));
        let b = self.buffered_bytes.map_or(0.0, |b| ratio(buffered, b));
        r.max(b)
    }
}

/// Largest budget accepted in config, MiB (16 TiB: beyond any machine; keeps the bytes in range).
pub const MAX_BUDGET_MB: u64 = 1 << 24;

/// Checks a configured budget in MiB: unset is fine (no budget); zero and absurd values are not.
pub fn check_budget_mb(mb: Option<u64>) -> Result<(), String> {
    match mb {
        Some(0) => Err("must be at least 1 (leave it unset for no budget)".into()),
        Some(m) if m > MAX_BUDGET_MB => Err(format!("must be at most {MAX_BUDGET_MB}")),
        _ => Ok(()),
    }
}

/// Starts the sampler for `budget` (neither set: no guard), registering its metrics in
/// `registry`; it stops with `stop`.
pub fn start(budget: Budget, registry: &Registry, stop: CancellationToken) {
    if budget.rss_bytes.is_none() && budget.buffered_bytes.is_none() {
        return;
    }
    let level = IntGauge::new(
        "trellis_proxy_overload_level",
        "Memory pressure: 0 normal, 1 not accepting connections, 2 also shedding requests",
    );
    let rss = IntGauge::new(
        "trellis_proxy_overload_rss_bytes",
        "Resident memory of the proxy as the overload guard last sampled it",
    );
    let buffered = IntGauge::new(
        "trellis_proxy_overload_buffered_bytes",
        "Bytes held in the proxy's own buffers (copy buffers, splice pipes, HTTP and TLS \
         buffers by their cap) as the overload guard last sampled them",
    );
    let shed = IntCounterVec::new(
        Opts::new(
            "trellis_proxy_overload_shed_total",
            "Work refused under memory pressure, by kind (connection, request)",
        ),
        &["work"],
    );
    let (Ok(level), Ok(rss), Ok(buffered), Ok(shed)) = (level, rss, buffered, shed) else {
        return;
    };
    for c in [
        Box::new(level.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(rss.clone()),
        Box::new(buffered.clone()),
        Box::new(shed.clone()),
    ] {
        let _ = registry.register(c);
    }
    let _ = SHED.set(shed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    LEVEL.store(0, Ordering::Relaxed);
                    return;
                }
                _ = tick.tick() => {}
            }
            let now = rss_bytes();
            if let Some(now) = now {
                rss.set(i64::try_from(now).unwrap_or(i64::MAX));
            }
            let held = crate::buffered::buffered_bytes() as u64;
            buffered.set(i64::try_from(held).unwrap_or(i64::MAX));
            let next = next_level(pressure(), budget.fill(now, held));
            LEVEL.store(next as u8, Ordering::Relaxed);
            level.set(next as i64);
        }
    });
}

/// The level for a fill ratio (used / budget), with hysteresis from `current`.
pub fn next_level(current: Pressure, fill: f64) -> Pressure {
    if fill >= 1.0 || (current == Pressure::ShedRequests && fill >= RELAX_SHEDDING) {
        Pressure::ShedRequests
    } else if fill >= STOP_ACCEPTING
        || (current >= Pressure::StopAccepting && fill >= RELAX_ACCEPTING)
    {
        Pressure::StopAccepting
    } else {
        Pressure::Normal
    }
}

/// Resident set size of this process (Linux `/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_with_hysteresis() {
        use Pressure::*;
        assert_eq!(next_level(Normal, 0.5), Normal);
        assert_eq!(next_level(Normal, 0.92), StopAccepting);
        assert_eq!(next_level(StopAccepting, 0.87), StopAccepting);
        assert_eq!(next_level(StopAccepting, 0.8), Normal);
        assert_eq!(next_level(Normal, 1.2), ShedRequests);
        assert_eq!(next_level(ShedRequests, 0.97), ShedRequests);
        assert_eq!(next_level(ShedRequests, 0.93), StopAccepting);
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn the_fuller_budget_decides() {
        let b = Budget::from_mib(Some(100), Some(1));
        assert_eq!(b.rss_bytes, Some(100 << 20));
        assert!((b.fill(Some(50 << 20), 0) - 0.5).abs() < 1e-9);
        assert!((b.fill(Some(50 << 20), 2 << 20) - 2.0).abs() < 1e-9);
        let only_buffered = Budget::from_mib(None, Some(4));
        assert!((only_buffered.fill(Some(u64::MAX), 1 << 20) - 0.25).abs() < 1e-9);
        assert_eq!(Budget::from_mib(Some(0), None), Budget::default());
    }
}
