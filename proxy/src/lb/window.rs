//! A sliding window of request outcomes (count, 5xx, latency histogram) for one target group,
//! read by deployment rollback checks. Lock-free: relaxed atomics, approximate at bucket edges.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// Upper bounds (ms) of the latency buckets; the last is open.
const BOUNDS_MS: [u64; 16] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    300,
    500,
    750,
    1000,
    2000,
    5000,
    10_000,
    u64::MAX,
];
/// Sub-windows per window.
const SLOTS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowStats {
    pub requests: u64,
    pub errors_5xx: u64,
    /// Upper bound of the bucket holding the 99th percentile; `None` without requests.
    pub p99: Option<Duration>,
}

impl WindowStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.errors_5xx as f64 / self.requests as f64
    }
}

#[derive(Debug, Default)]
struct Slot {
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    hist: [AtomicU64; BOUNDS_MS.len()],
}

#[derive(Debug)]
pub struct Window {
    start: Instant,
    /// Length of a slot in nanoseconds (at least a millisecond).
    slot_ns: u64,
    slots: Vec<Slot>,
}

impl Window {
    pub fn new(window: Duration, now: Instant) -> Self {
        let slot_len = (window / SLOTS as u32).max(Duration::from_millis(1));
        // In u64 (a 128-bit division per request is a library call); 2^64 ns is 584 years.
        let slot_ns = u64::try_from(slot_len.as_nanos()).unwrap_or(u64::MAX);
        Self {
            start: now,
            slot_ns,
            // One spare slot so the current, partly filled one never evicts the window's oldest.
            slots: (0..=SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = u64::try_from(now.saturating_duration_since(self.start).as_nanos());
        // +1 so epoch 0 means "never used".
        since.unwrap_or(u64::MAX) / self.slot_ns + 1
    }

    pub fn record(&self, now: Instant, status: u16, latency: Duration) {
        let e = self.epoch(now);
        let slot = &self.slots[(e % self.slots.len() as u64) as usize];
        let old = slot.epoch.load(Relaxed);
        if old != e
            && slot
                .epoch
                .compare_exchange(old, e, Relaxed, Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Relaxed);
            slot.errors.store(0, Relaxed);
            for h in &slot.hist {
                h.store(0, Relaxed);
            }
        }
        slot.requests.fetch_add(1, Relaxed);
        if status >= 500 {
            slot.errors.fetch_add(1, Relaxed);
        }
        let ms = latency.as_millis() as u64;
        let b = BOUNDS_MS
            .iter()
            .position(|&u| ms <= u)
            .unwrap_or(BOUNDS_MS.len() - 1);
        slot.hist[b].fetch_add(1, Relaxed);
    }

    /// Outcomes within the last window before `now`.
    pub fn stats(&self, now: Instant) -> WindowStats {
        let e = self.epoch(now);
        let oldest = e.saturating_sub(SLOTS - 1).max(1);
        let mut out = WindowStats::default();
        let mut hist = [0u64; BOUNDS_MS.len()];
        for s in &self.slots {
            let se = s.epoch.load(Relaxed);
            if se < oldest || se > e {
                continue;
            }
            out.requests += s.requests.load(Relaxed);
            out.errors_5xx += s.errors.load(Relaxed);
            for (acc, h) in hist.iter_mut().zip(&s.hist) {
                *acc += h.load(Relaxed);
            }
        }
        let total: u64 = hist.iter().sum();
        if total > 0 {
            let want = (total * 99).div_ceil(100);
            let mut cum = 0;
            for (i, n) in hist.iter().enumerate() {
                cum += n;
                if cum >= want {
                    out.p99 = Some(Duration::from_millis(BOUNDS_MS[i].min(60_000)));
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_expire_after_the_window() {
        let w = Window::new(Duration::from_secs(10), Instant::now());
        for i in 0..100 {
            let status = if i < 5 { 503 } else { 200 };
            let lat = if i == 0 {
                Duration::from_millis(900)
            } else {
                Duration::from_millis(3)
            };
            w.record(Instant::now(), status, lat);
        }
        let s = w.stats(Instant::now());
        assert_eq!((s.requests, s.errors_5xx), (100, 5));
        assert!((s.error_rate() - 0.05).abs() < 1e-9);
        assert_eq!(s.p99, Some(Duration::from_millis(5)));
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            w.record(Instant::now(), 200, Duration::from_millis(400));
        }
        let s = w.stats(Instant::now());
        assert_eq!(s.requests, 110);
        assert_eq!(s.p99, Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_secs(6)).await;
        let s = w.stats(Instant::now());
        assert_eq!((s.requests, s.errors_5xx), (10, 0));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(w.stats(Instant::now()), WindowStats::default());
    }
}
