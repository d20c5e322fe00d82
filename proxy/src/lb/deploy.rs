//! Runs each configured deployment: feeds its [`Shift`] the clock and the new group's window,
//! applies the percentage as live weights, and publishes progress.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{DeploymentConfig, StrategyConfig};
use super::listener::ListenerState;
use super::metrics::Metrics;
use super::shift::{Phase, Shift};
use super::target::TargetGroup;
use crate::route::Weight;

pub struct Deployment {
    pub config: DeploymentConfig,
    shift: Mutex<Shift>,
}

#[derive(Debug, Serialize)]
pub struct DeploymentView {
    pub name: String,
    pub listener: String,
    pub rule: String,
    pub from: String,
    pub to: String,
    pub percent: u8,
    #[serde(flatten)]
    pub phase: Phase,
}

impl Deployment {
    pub fn view(&self) -> DeploymentView {
        let s = self.shift.lock();
        DeploymentView {
            name: self.config.name.clone(),
            listener: self.config.listener.clone(),
            rule: self.config.rule.clone(),
            from: self.config.from.clone(),
            to: self.config.to.clone(),
            percent: s.percent(),
            phase: s.phase().clone(),
        }
    }
}

/// How often the runner looks: a tenth of the shortest period, within 10 ms–1 s.
fn tick_period(c: &DeploymentConfig) -> Duration {
    let step = match c.strategy {
        StrategyConfig::AllAtOnce => c.rollback.window,
        StrategyConfig::Canary { interval, .. } | StrategyConfig::Linear { interval, .. } => {
            interval.min(c.rollback.window)
        }
    };
    (step / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Start the deployment now: applies the first step and returns the handle the runner drives.
pub fn start(
    config: DeploymentConfig,
    listener: &ListenerState,
    metrics: &Metrics,
) -> Arc<Deployment> {
    let shift = Shift::start(config.strategy, config.rollback, Instant::now());
    let d = Arc::new(Deployment {
        shift: Mutex::new(shift),
        config,
    });
    apply(&d, listener, metrics);
    d
}

fn apply(d: &Deployment, listener: &ListenerState, metrics: &Metrics) {
    let (percent, phase) = {
        let s = d.shift.lock();
        (s.percent(), s.phase().clone())
    };
    let to = u16::from(percent.min(100));
    let weights = [
        (
            d.config.from.as_str(),
            Weight::try_from(u32::from(100 - to)),
        ),
        (d.config.to.as_str(), Weight::try_from(u32::from(to))),
    ];
    if let [(f, Ok(fw)), (t, Ok(tw))] = weights {
        match listener.set_weights(&d.config.rule, &[(f, fw), (t, tw)]) {
            Ok(_) => metrics.weight_changes.inc(),
            Err(e) => tracing::error!(deployment = %d.config.name, error = %e, "applying weights"),
        }
    }
    let name = d.config.name.as_str();
    metrics
        .deployment_percent
        .with_label_values(&[name])
        .set(i64::from(percent));
    metrics
        .deployment_phase
        .with_label_values(&[name])
        .set(phase.code());
}

pub async fn run(
    d: Arc<Deployment>,
    listener: Arc<ListenerState>,
    to_group: Arc<TargetGroup>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(tick_period(&d.config));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let stats = to_group.window.stats(now);
        let (changed, phase) = {
            let mut s = d.shift.lock();
            (s.tick(now, &stats), s.phase().clone())
        };
        let name = d.config.name.as_str();
        if changed.is_some() {
            if let Phase::RolledBack { reason } = &phase {
                tracing::warn!(deployment = name, reason, "rolling back");
                metrics
                    .deployment_rollbacks
                    .with_label_values(&[name])
                    .inc();
            } else {
                tracing::info!(deployment = name, percent = changed, "shifting traffic");
            }
            apply(&d, &listener, &metrics);
        }
        metrics
            .deployment_phase
            .with_label_values(&[name])
            .set(phase.code());
        if phase.is_final() {
            return;
        }
    }
}
