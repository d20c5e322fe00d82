//! The memory-pressure guard, a small Envoy overload manager: a sampler reads the process RSS
//! every [`SAMPLE_EVERY`] and sets a process-wide pressure level (memory is per process, so the
//! level is too). At [`STOP_ACCEPTING`] of the budget new connections are closed at accept (the
//! lowest-priority work: nothing has been spent on them yet); at the full budget new requests on
//! open connections are answered `503` with `Retry-After` too, while requests in flight finish.
//! The admin listener is never shed. Metrics: `trellis_proxy_overload_level`,
//! `trellis_proxy_overload_rss_bytes`, `trellis_proxy_overload_shed_total{work}`.

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

/// Starts the sampler for a budget of `max_rss_bytes` (none: no guard), registering its metrics
/// in `registry`; it stops with `stop`.
pub fn start(max_rss_bytes: Option<u64>, registry: &Registry, stop: CancellationToken) {
    let Some(budget) = max_rss_bytes.filter(|b| *b > 0) else {
        return;
    };
    let level = IntGauge::new(
        "trellis_proxy_overload_level",
        "Memory pressure: 0 normal, 1 not accepting connections, 2 also shedding requests",
    );
    let rss = IntGauge::new(
        "trellis_proxy_overload_rss_bytes",
        "Resident memory of the proxy as the overload guard last sampled it",
    );
    let shed = IntCounterVec::new(
        Opts::new(
            "trellis_proxy_overload_shed_total",
            "Work refused under memory pressure, by kind (connection, request)",
        ),
        &["work"],
    );
    let (Ok(level), Ok(rss), Ok(shed)) = (level, rss, shed) else {
        return;
    };
    for c in [
        Box::new(level.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(rss.clone()),
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
            let Some(now) = rss_bytes() else { continue };
            rss.set(i64::try_from(now).unwrap_or(i64::MAX));
            let next = next_level(pressure(), now as f64 / budget as f64);
            LEVEL.store(next as u8, Ordering::Relaxed);
            level.set(next as i64);
        }
    });
}

/// The level for a fill ratio (RSS / budget), with hysteresis from `current`.
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
}
