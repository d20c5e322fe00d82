//! Retry policy: which requests may be retried, and a budget that caps retries at a fraction of
//! requests plus a minimum rate (as Linkerd and Finagle do), so retries cannot amplify an outage.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use http::Method;

use crate::clock::now_ms;

/// One retry costs this many milli-tokens.
const RETRY_COST: i64 = 1000;
/// The balance never grows beyond this many seconds of minimum rate plus deposits.
const MAX_BALANCE_SECONDS: i64 = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio_milli: i64,
    min_per_sec: i64,
    balance: AtomicI64,
    refilled_ms: AtomicU64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        let min_per_sec = i64::from(min_per_sec);
        RetryBudget {
            ratio_milli: (ratio * 1000.0) as i64,
            min_per_sec,
            balance: AtomicI64::new(min_per_sec * RETRY_COST),
            refilled_ms: AtomicU64::new(now_ms()),
        }
    }

    fn cap(&self) -> i64 {
        (self.min_per_sec * RETRY_COST + self.ratio_milli * 100).max(RETRY_COST)
            * MAX_BALANCE_SECONDS
    }

    /// Every original request adds `ratio` of a retry.
    pub fn deposit(&self) {
        let cap = self.cap();
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.ratio_milli).min(cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.refill();
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then_some(b - RETRY_COST)
            })
            .is_ok()
    }

    fn refill(&self) {
        let now = now_ms();
        let last = self.refilled_ms.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(last);
        if elapsed < 100
            || self
                .refilled_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let add =
            self.min_per_sec * RETRY_COST * i64::try_from(elapsed).unwrap_or(i64::MAX / 2) / 1000;
        let cap = self.cap();
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_add(add).min(cap))
            });
    }
}

/// Methods whose repetition has no extra effect (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_is_ratio_plus_min_rate() {
        let b = RetryBudget::new(0.2, 0);
        assert!(!b.withdraw());
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw());

        let b = RetryBudget::new(0.0, 5);
        let n = (0..20).filter(|_| b.withdraw()).count();
        assert_eq!(n, 5);
        tokio::time::advance(Duration::from_secs(1)).await;
        let n = (0..20).filter(|_| b.withdraw()).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
