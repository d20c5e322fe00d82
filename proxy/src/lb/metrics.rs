//! The LB's Prometheus metrics. Handles are resolved once per rule and per target group when the
//! LB starts, never looked up by label per request.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Seconds; covers a fast loopback hop to a slow upstream.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rule_requests: IntCounterVec,
    rule_latency: HistogramVec,
    group_requests: IntCounterVec,
    group_latency: HistogramVec,
    fail_open: IntCounterVec,
    healthy_targets: IntGaugeVec,
    pub deployment_percent: IntGaugeVec,
    pub deployment_phase: IntGaugeVec,
    pub deployment_rollbacks: IntCounterVec,
    pub weight_changes: IntCounter,
}

/// Per-rule handles.
#[derive(Clone)]
pub struct RuleMetrics {
    pub requests: IntCounter,
    pub latency: prometheus::Histogram,
}

/// Per-target-group handles; `responses[0..5]` are 1xx..5xx, `errors` are LB-generated 5xx.
#[derive(Clone)]
pub struct GroupMetrics {
    pub responses: [IntCounter; 5],
    pub latency: prometheus::Histogram,
    pub fail_open: IntCounter,
    pub healthy_targets: IntGauge,
}

impl GroupMetrics {
    pub fn record_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].inc();
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and label sets below are static and valid; a failure is a programming error.
    #[allow(clippy::expect_used)]
    r.expect("static metric definition is valid")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let h = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            ));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let weight_changes = must(IntCounter::new(
            "trellis_lb_weight_changes_total",
            "Live weight changes applied (admin API or deployments).",
        ));
        must(registry.register(Box::new(weight_changes.clone())));
        Self {
            rule_requests: counter(
                "trellis_lb_rule_requests_total",
                "Requests matched per listener rule (rule=\"default\" for the default action).",
                &["listener", "rule"],
            ),
            rule_latency: hist(
                "trellis_lb_rule_request_duration_seconds",
                "Time to response headers per listener rule.",
                &["listener", "rule"],
            ),
            group_requests: counter(
                "trellis_lb_target_group_responses_total",
                "Responses per target group by status class.",
                &["target_group", "class"],
            ),
            group_latency: hist(
                "trellis_lb_target_group_request_duration_seconds",
                "Upstream time to response headers per target group.",
                &["target_group"],
            ),
            fail_open: counter(
                "trellis_lb_target_group_fail_open_total",
                "Picks made while every target was unhealthy (sent to all).",
                &["target_group"],
            ),
            healthy_targets: gauge(
                "trellis_lb_target_group_healthy_targets",
                "Targets currently passing health checks.",
                &["target_group"],
            ),
            deployment_percent: gauge(
                "trellis_lb_deployment_percent",
                "Share of traffic (0-100) on the deployment's new target group.",
                &["deployment"],
            ),
            deployment_phase: gauge(
                "trellis_lb_deployment_phase",
                "0 shifting, 1 baking, 2 succeeded, 3 rolled back.",
                &["deployment"],
            ),
            deployment_rollbacks: counter(
                "trellis_lb_deployment_rollbacks_total",
                "Automatic rollbacks.",
                &["deployment"],
            ),
            weight_changes,
            registry,
        }
    }

    pub fn rule(&self, listener: &str, rule: &str) -> RuleMetrics {
        RuleMetrics {
            requests: self.rule_requests.with_label_values(&[listener, rule]),
            latency: self.rule_latency.with_label_values(&[listener, rule]),
        }
    }

    pub fn group(&self, name: &str) -> GroupMetrics {
        let class = |c: &str| self.group_requests.with_label_values(&[name, c]);
        GroupMetrics {
            responses: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self.group_latency.with_label_values(&[name]),
            fail_open: self.fail_open.with_label_values(&[name]),
            healthy_targets: self.healthy_targets.with_label_values(&[name]),
        }
    }

    /// Where the overload guard registers its metrics.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
