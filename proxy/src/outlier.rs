//! Outlier ejection: consecutive 5xx / gateway errors eject an endpoint for a time that grows with
//! each ejection, never more than a maximum percentage of the cluster at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clock::now_ms;
use crate::endpoint::EndpointState;

/// Longest ejection regardless of backoff.
const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u8,
}

/// What a result did to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Eject,
}

impl OutlierPolicy {
    /// Records one result for `ep`; `failure` means 5xx or a gateway error (reset, timeout, refused).
    pub fn record(&self, ep: &EndpointState, failure: bool, all: &[Arc<EndpointState>]) -> Verdict {
        if !failure {
            ep.consecutive_failures.store(0, Ordering::Relaxed);
            return Verdict::Keep;
        }
        if self.consecutive_failures == 0 {
            return Verdict::Keep;
        }
        let n = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        if n < self.consecutive_failures || ep.is_ejected_at(now) {
            return Verdict::Keep;
        }
        let ejected = all.iter().filter(|e| e.is_ejected_at(now)).count();
        // At least one endpoint may always be ejected (as Envoy does), whatever the percentage.
        let allowed = (all.len() * usize::from(self.max_ejection_percent) / 100).max(1);
        if ejected >= allowed {
            return Verdict::Keep;
        }
        let times = ep.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = self.base_ejection.saturating_mul(times).min(MAX_EJECTION);
        let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        ep.ejected_until_ms.store(until, Ordering::Relaxed);
        ep.consecutive_failures.store(0, Ordering::Relaxed);
        Verdict::Eject
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::endpoints;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_with_backoff() {
        let eps = endpoints(4);
        let p = policy();
        assert_eq!(p.record(&eps[0], true, &eps), Verdict::Keep);
        assert_eq!(p.record(&eps[0], false, &eps), Verdict::Keep);
        for _ in 0..2 {
            assert_eq!(p.record(&eps[0], true, &eps), Verdict::Keep);
        }
        assert_eq!(p.record(&eps[0], true, &eps), Verdict::Eject);
        assert!(eps[0].is_ejected());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!eps[0].is_ejected());
        for _ in 0..2 {
            p.record(&eps[0], true, &eps);
        }
        assert_eq!(p.record(&eps[0], true, &eps), Verdict::Eject);
        // Second ejection lasts twice as long.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(eps[0].is_ejected());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!eps[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_is_honoured() {
        let eps = endpoints(4);
        let p = policy();
        let mut ejected = 0;
        for e in &eps {
            for _ in 0..3 {
                if p.record(e, true, &eps) == Verdict::Eject {
                    ejected += 1;
                }
            }
        }
        assert_eq!(ejected, 2);
    }
}
