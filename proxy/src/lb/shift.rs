//! Traffic shifting as a pure state machine: all-at-once, canary, linear, each with automatic
//! rollback when the new group's window crosses a threshold. The runner feeds it the clock and
//! window stats and applies the percentage it returns.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::config::{RollbackConfig, StrategyConfig};
use super::window::WindowStats;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Moving traffic step by step.
    Shifting,
    /// At 100%, watched for one more window before success.
    Baking,
    Succeeded,
    RolledBack {
        reason: String,
    },
}

impl Phase {
    pub fn is_final(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack { .. })
    }

    /// Gauge encoding: 0 shifting, 1 baking, 2 succeeded, 3 rolled back.
    pub fn code(&self) -> i64 {
        match self {
            Phase::Shifting => 0,
            Phase::Baking => 1,
            Phase::Succeeded => 2,
            Phase::RolledBack { .. } => 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Shift {
    strategy: StrategyConfig,
    rollback: RollbackConfig,
    phase: Phase,
    percent: u8,
    step_started: Instant,
}

impl Shift {
    /// Starts the deployment: the first step's percentage is [`Shift::percent`].
    pub fn start(strategy: StrategyConfig, rollback: RollbackConfig, now: Instant) -> Self {
        let percent = match strategy {
            StrategyConfig::AllAtOnce => 100,
            StrategyConfig::Canary { percent, .. } => percent.min(100),
            StrategyConfig::Linear { step, .. } => step.min(100),
        };
        Self {
            strategy,
            rollback,
            phase: if percent == 100 {
                Phase::Baking
            } else {
                Phase::Shifting
            },
            percent,
            step_started: now,
        }
    }

    /// Share of traffic (0–100) the new group should get now.
    pub fn percent(&self) -> u8 {
        self.percent
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Advance with the clock and the new group's window; returns the new percentage when it
    /// changed.
    pub fn tick(&mut self, now: Instant, stats: &WindowStats) -> Option<u8> {
        if self.phase.is_final() {
            return None;
        }
        if let Some(reason) = self.breach(stats) {
            self.phase = Phase::RolledBack { reason };
            self.percent = 0;
            return Some(0);
        }
        let elapsed = now.saturating_duration_since(self.step_started);
        if self.phase == Phase::Baking {
            if elapsed >= self.rollback.window {
                self.phase = Phase::Succeeded;
            }
            return None;
        }
        let (interval, next) = match self.strategy {
            StrategyConfig::AllAtOnce => (Duration::ZERO, 100),
            StrategyConfig::Canary { interval, .. } => (interval, 100),
            StrategyConfig::Linear { step, interval } => {
                (interval, self.percent.saturating_add(step).min(100))
            }
        };
        if elapsed < interval {
            return None;
        }
        self.percent = next;
        self.step_started = now;
        if next == 100 {
            self.phase = Phase::Baking;
        }
        Some(next)
    }

    fn breach(&self, s: &WindowStats) -> Option<String> {
        if s.requests < self.rollback.min_requests.max(1) {
            return None;
        }
        if let Some(max) = self.rollback.max_5xx_rate
            && s.error_rate() > max
        {
            return Some(format!(
                "5xx rate {:.3} over {} requests exceeds {max}",
                s.error_rate(),
                s.requests
            ));
        }
        if let (Some(max), Some(p99)) = (self.rollback.max_p99, s.p99)
            && p99 > max
        {
            return Some(format!("p99 {p99:?} exceeds {max:?}"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn rollback() -> RollbackConfig {
        RollbackConfig {
            window: Duration::from_secs(60),
            max_5xx_rate: Some(0.05),
            max_p99: Some(Duration::from_millis(500)),
            min_requests: 10,
        }
    }

    fn ok(n: u64) -> WindowStats {
        WindowStats {
            requests: n,
            errors_5xx: 0,
            p99: Some(Duration::from_millis(20)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn canary_then_full_then_success() {
        let strategy = StrategyConfig::Canary {
            percent: 10,
            interval: Duration::from_secs(300),
        };
        let mut s = Shift::start(strategy, rollback(), Instant::now());
        assert_eq!(s.percent(), 10);
        advance(Duration::from_secs(299)).await;
        assert_eq!(s.tick(Instant::now(), &ok(100)), None);
        advance(Duration::from_secs(1)).await;
        assert_eq!(s.tick(Instant::now(), &ok(100)), Some(100));
        assert_eq!(s.phase(), &Phase::Baking);
        advance(Duration::from_secs(60)).await;
        assert_eq!(s.tick(Instant::now(), &ok(100)), None);
        assert_eq!(s.phase(), &Phase::Succeeded);
        // Final: nothing moves any more, even on bad stats.
        let bad = WindowStats {
            errors_5xx: 100,
            ..ok(100)
        };
        assert_eq!(s.tick(Instant::now(), &bad), None);
    }

    #[tokio::test(start_paused = true)]
    async fn linear_steps_up() {
        let strategy = StrategyConfig::Linear {
            step: 30,
            interval: Duration::from_secs(60),
        };
        let mut s = Shift::start(strategy, rollback(), Instant::now());
        let mut seen = vec![s.percent()];
        for _ in 0..5 {
            advance(Duration::from_secs(60)).await;
            if let Some(p) = s.tick(Instant::now(), &ok(0)) {
                seen.push(p);
            }
        }
        assert_eq!(seen, vec![30, 60, 90, 100]);
        assert_eq!(s.phase(), &Phase::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn rolls_back_on_errors_or_latency_but_not_on_few_requests() {
        let strategy = StrategyConfig::Linear {
            step: 10,
            interval: Duration::from_secs(60),
        };
        let mut s = Shift::start(strategy, rollback(), Instant::now());
        let few_bad = WindowStats {
            requests: 5,
            errors_5xx: 5,
            p99: None,
        };
        assert_eq!(s.tick(Instant::now(), &few_bad), None);
        let bad = WindowStats {
            errors_5xx: 6,
            ..ok(100)
        };
        assert_eq!(s.tick(Instant::now(), &bad), Some(0));
        assert!(matches!(s.phase(), Phase::RolledBack { reason } if reason.contains("5xx")));
        assert_eq!(s.percent(), 0);

        let mut s = Shift::start(StrategyConfig::AllAtOnce, rollback(), Instant::now());
        assert_eq!(s.percent(), 100);
        advance(Duration::from_secs(30)).await;
        let slow = WindowStats {
            p99: Some(Duration::from_secs(1)),
            ..ok(50)
        };
        assert_eq!(s.tick(Instant::now(), &slow), Some(0));
        assert!(matches!(s.phase(), Phase::RolledBack { reason } if reason.contains("p99")));
    }
}
