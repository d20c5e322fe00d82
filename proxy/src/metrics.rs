//! Prometheus metrics with handles resolved once per cluster/listener, never per request.
//! Names follow `trellis_proxy_<what>_<unit>`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Response classes: index 0 is "error" (no response), 1..=5 are 1xx..5xx.
const CLASSES: [&str; 6] = ["error", "1xx", "2xx", "3xx", "4xx", "5xx"];
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric family of one proxy process.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    overflow: IntCounterVec,
    active: IntGaugeVec,
    pub tls_handshake_failures: IntCounter,
    pub authz_denied: IntCounter,
    pub connections_rejected: IntCounter,
    pub cert_expiry: IntGauge,
    pub pushed_routes: IntGauge,
    pub pushed_routes_rejected: IntCounter,
}

/// Handles for one upstream cluster (or the inbound app), resolved once.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    by_class: [IntCounter; 6],
    pub latency: Histogram,
    pub retries: IntCounter,
    pub ejections: IntCounter,
    pub overflow: IntCounter,
}

impl UpstreamMetrics {
    /// Counts one response by status code, or an error when `status` is `None`.
    pub fn response(&self, status: Option<u16>) {
        let i = status.map_or(0, |s| usize::from(s / 100)).min(5);
        self.by_class[i].inc();
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "trellis_proxy_upstream_requests_total",
                "Requests by upstream and response class",
            ),
            &["upstream", "class"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "trellis_proxy_upstream_request_duration_seconds",
                "Time to response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )
        .unwrap_or_else(|_| unreachable!("static metric definition"));
        let counter_vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|_| unreachable!("static metric definition"))
        };
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).unwrap_or_else(|_| unreachable!("static metric definition"))
        };
        let m = Metrics {
            requests,
            latency,
            retries: counter_vec(
                "trellis_proxy_upstream_retries_total",
                "Retries sent",
                "upstream",
            ),
            ejections: counter_vec(
                "trellis_proxy_upstream_ejections_total",
                "Outlier ejections",
                "upstream",
            ),
            overflow: counter_vec(
                "trellis_proxy_upstream_overflow_total",
                "Requests refused by circuit breaking",
                "upstream",
            ),
            active: IntGaugeVec::new(
                Opts::new(
                    "trellis_proxy_active_connections",
                    "Open downstream connections",
                ),
                &["listener"],
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            tls_handshake_failures: counter(
                "trellis_proxy_tls_handshake_failures_total",
                "Inbound TLS handshakes that failed",
            ),
            authz_denied: counter(
                "trellis_proxy_authz_denied_total",
                "Inbound connections refused by intentions",
            ),
            connections_rejected: counter(
                "trellis_proxy_connections_rejected_total",
                "Connections refused at max_connections",
            ),
            cert_expiry: IntGauge::new(
                "trellis_proxy_cert_expiry_timestamp_seconds",
                "Expiry of the current leaf certificate",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            pushed_routes: IntGauge::new(
                "trellis_proxy_pushed_routes",
                "Outbound routes pushed from the control plane (service attributes) in effect",
            )
            .unwrap_or_else(|_| unreachable!("static metric definition")),
            pushed_routes_rejected: counter(
                "trellis_proxy_pushed_routes_rejected_total",
                "Route pushes this sidecar refused (the routes before them stay)",
            ),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.latency.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.ejections.clone()),
            Box::new(m.overflow.clone()),
            Box::new(m.active.clone()),
            Box::new(m.tls_handshake_failures.clone()),
            Box::new(m.authz_denied.clone()),
            Box::new(m.connections_rejected.clone()),
            Box::new(m.cert_expiry.clone()),
            Box::new(m.pushed_routes.clone()),
            Box::new(m.pushed_routes_rejected.clone()),
        ] {
            // Names are unique by construction; a duplicate would be a programming error caught by tests.
            let _ = m.registry.register(c);
        }
        m
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            by_class: CLASSES.map(|c| self.requests.with_label_values(&[name, c])),
            latency: self.latency.with_label_values(&[name]),
            retries: self.retries.with_label_values(&[name]),
            ejections: self.ejections.with_label_values(&[name]),
            overflow: self.overflow.with_label_values(&[name]),
        }
    }

    pub fn active_connections(&self, listener: &str) -> IntGauge {
        self.active.with_label_values(&[listener])
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pre_resolved_handles() {
        let m = Metrics::new();
        let u = m.upstream("api");
        u.response(Some(204));
        u.response(Some(503));
        u.response(None);
        let text = m.render();
        assert!(
            text.contains(r#"trellis_proxy_upstream_requests_total{class="2xx",upstream="api"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"class="error""#));
        assert!(text.contains("trellis_proxy_tls_handshake_failures_total 0"));
    }
}
