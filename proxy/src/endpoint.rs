//! One upstream endpoint and the mutable per-endpoint state balancers and outlier detection read.
//!
//! State lives in atomics so the request path never takes a lock; an endpoint keeps its state
//! across endpoint-set updates as long as its address stays.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// How fast peak-EWMA forgets a slow response.
const EWMA_DECAY_MS: f64 = 10_000.0;
/// Cost of an endpoint with no latency sample yet (1 ms), so fresh endpoints get tried.
const EWMA_DEFAULT_NS: f64 = 1_000_000.0;

#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `ip:port` as a URI authority, built once (not per request).
    pub authority: http::uri::Authority,
    pub instance_id: String,
    pub weight: u32,
    in_flight: AtomicU32,
    ewma_ns: AtomicU64,
    ewma_at_ms: AtomicU64,
    pub(crate) consecutive_failures: AtomicU32,
    pub(crate) ejected_until_ms: AtomicU64,
    pub(crate) ejections: AtomicU32,
    /// Active health-check verdict (the LB's target groups); endpoints start healthy.
    healthy: AtomicBool,
    /// Leaving (deregistration delay): no new requests.
    draining: AtomicBool,
    /// `now_ms` when the endpoint last joined or became healthy (slow start); 0 = from the start.
    healthy_since_ms: AtomicU64,
}

impl EndpointState {
    pub fn new(instance_id: impl Into<String>, addr: SocketAddr, weight: u32) -> Self {
        EndpointState {
            addr,
            authority: http::uri::Authority::try_from(addr.to_string())
                .unwrap_or_else(|_| http::uri::Authority::from_static("0.0.0.0")),
            instance_id: instance_id.into(),
            weight: weight.max(1),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(EWMA_DEFAULT_NS.to_bits()),
            ewma_at_ms: AtomicU64::new(now_ms()),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            healthy_since_ms: AtomicU64::new(0),
        }
    }

    /// A copy for a new snapshot that keeps this endpoint's load and outlier history.
    pub fn with_weight(&self, instance_id: &str, weight: u32) -> Self {
        let s = EndpointState::new(instance_id, self.addr, weight);
        s.in_flight.store(self.in_flight(), Ordering::Relaxed);
        s.ewma_ns
            .store(self.ewma_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        s.ewma_at_ms
            .store(self.ewma_at_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        s.consecutive_failures.store(
            self.consecutive_failures.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        s.ejected_until_ms.store(
            self.ejected_until_ms.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        s.ejections
            .store(self.ejections.load(Ordering::Relaxed), Ordering::Relaxed);
        s.healthy.store(self.is_healthy(), Ordering::Relaxed);
        s.draining.store(self.is_draining(), Ordering::Relaxed);
        s.healthy_since_ms
            .store(self.healthy_since_ms(), Ordering::Relaxed);
        s
    }

    /// A new endpoint that joins now (slow start counts from here).
    pub fn joining(instance_id: impl Into<String>, addr: SocketAddr, weight: u32) -> Self {
        let s = EndpointState::new(instance_id, addr, weight);
        s.healthy_since_ms.store(now_ms().max(1), Ordering::Relaxed);
        s
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a health verdict; true when it changed. Becoming healthy restarts slow start.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed && healthy {
            self.healthy_since_ms
                .store(now_ms().max(1), Ordering::Relaxed);
        }
        changed
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Returns the previous value.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::Relaxed)
    }

    pub fn healthy_since_ms(&self) -> u64 {
        self.healthy_since_ms.load(Ordering::Relaxed)
    }

    /// Marks one request started; the owned guard ends it (e.g. when a response body ends).
    pub fn start_owned(self: &Arc<Self>) -> OwnedInFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        OwnedInFlight(Arc::clone(self))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks one request started; the guard ends it.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn is_ejected_at(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(now_ms())
    }

    /// Peak-EWMA: a slower sample replaces the average at once; faster ones decay into it.
    pub fn observe_latency(&self, rtt: Duration) {
        self.observe_latency_at(rtt, now_ms());
    }

    /// [`EndpointState::observe_latency`] for a sample that ended at `now` (`now_ms` units).
    pub fn observe_latency_at(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let last = self.ewma_at_ms.swap(now, Ordering::Relaxed);
        let next = if sample > prev {
            sample
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / EWMA_DECAY_MS).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Peak-EWMA cost: expected latency scaled by the requests already waiting.
    pub fn ewma_cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        ewma * f64::from(self.in_flight() + 1)
    }
}

/// Ends an in-flight request when dropped (also on cancellation).
#[derive(Debug)]
pub struct InFlight<'a>(&'a EndpointState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends an in-flight request when dropped; owns its endpoint so it can outlive the pick.
#[derive(Debug)]
pub struct OwnedInFlight(Arc<EndpointState>);

impl OwnedInFlight {
    pub fn endpoint(&self) -> &EndpointState {
        &self.0
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_guard_counts() {
        let e = EndpointState::new("a", "127.0.0.1:1".parse().unwrap(), 1);
        let g = e.start();
        assert_eq!(e.in_flight(), 1);
        drop(g);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once() {
        let e = EndpointState::new("a", "127.0.0.1:1".parse().unwrap(), 1);
        e.observe_latency(Duration::from_millis(50));
        assert!(e.ewma_cost() >= 50_000_000.0);
        e.observe_latency(Duration::from_millis(1));
        // Little time passed: the peak still dominates.
        assert!(e.ewma_cost() > 40_000_000.0);
    }
}
