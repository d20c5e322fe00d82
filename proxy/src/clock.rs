//! Milliseconds since process start on tokio's clock, so tests can pause and advance time.

use std::sync::OnceLock;

use tokio::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Monotonic milliseconds; fits an atomic, unlike `Instant`.
pub fn now_ms() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}
