//! Milliseconds since process start on tokio's clock, so tests can pause and advance time.

use std::sync::OnceLock;

use tokio::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Monotonic milliseconds; fits an atomic, unlike `Instant`.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read (the request path reads the clock once per try).
pub fn ms_at(t: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}
