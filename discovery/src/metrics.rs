//! Prometheus metrics of the control plane (`trellis_discovery_*`), served on `/metrics`.

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use trellis_core::HealthStatus;

use crate::registry::Registry as ServiceRegistry;

pub struct Metrics {
    registry: Registry,
    pub api_requests: IntCounterVec,
    pub api_latency: HistogramVec,
    pub dns_queries: IntCounterVec,
    pub dns_fail_open: IntCounter,
    /// Work refused by a DNS limit (`tcp_connections`, `rate_limit`).
    pub dns_limited: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub instances: IntGaugeVec,
    pub watchers: prometheus::IntGauge,
    pub store_stale: prometheus::IntGauge,
    /// TLS handshakes on the HTTPS API that failed or timed out.
    pub api_tls_handshake_failures: IntCounter,
    /// With `--api-tls`: the API certificate's holder, read for its expiry at scrape time.
    api_identity: std::sync::OnceLock<(Arc<trellis_ca::Identity>, prometheus::IntGauge)>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let api_requests = IntCounterVec::new(
            Opts::new(
                "trellis_discovery_api_requests_total",
                "Cloud Map API requests by action and error code (OK on success).",
            ),
            &["action", "code"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let api_latency = HistogramVec::new(
            HistogramOpts::new(
                "trellis_discovery_api_request_duration_seconds",
                "Cloud Map API latency by action.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["action"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "trellis_discovery_dns_queries_total",
                "DNS queries by query type and response code.",
            ),
            &["qtype", "rcode"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let dns_fail_open = IntCounter::new(
            "trellis_discovery_dns_fail_open_total",
            "DNS answers given with every instance because none was healthy.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let dns_limited = IntCounterVec::new(
            Opts::new(
                "trellis_discovery_dns_limited_total",
                "DNS work refused by a limit: TCP connections over the cap, responses over the rate.",
            ),
            &["limit"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let health_checks = IntCounterVec::new(
            Opts::new(
                "trellis_discovery_health_checks_total",
                "Active health check results by type and result.",
            ),
            &["type", "result"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let instances = IntGaugeVec::new(
            Opts::new(
                "trellis_discovery_instances",
                "Registered instances by health state.",
            ),
            &["health"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let watchers = prometheus::IntGauge::new(
            "trellis_discovery_watchers",
            "Watch API long-polls currently waiting.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let store_stale = prometheus::IntGauge::new(
            "trellis_discovery_store_stale",
            "1 while the replicated store has no quorum (reads served from the last view).",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let api_tls_handshake_failures = IntCounter::new(
            "trellis_discovery_api_tls_handshake_failures_total",
            "TLS handshakes on the HTTPS API (--api-tls) that failed or timed out.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        for c in [
            Box::new(store_stale.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(api_tls_handshake_failures.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_latency.clone()),
            Box::new(dns_queries.clone()),
            Box::new(dns_fail_open.clone()),
            Box::new(dns_limited.clone()),
            Box::new(health_checks.clone()),
            Box::new(instances.clone()),
            Box::new(watchers.clone()),
        ] {
            // Names are constants and distinct: registration cannot collide.
            let _ = registry.register(c);
        }
        Arc::new(Metrics {
            registry,
            api_requests,
            api_latency,
            dns_queries,
            dns_fail_open,
            dns_limited,
            health_checks,
            instances,
            watchers,
            store_stale,
            api_tls_handshake_failures,
            api_identity: std::sync::OnceLock::new(),
        })
    }

    /// With `--api-tls`: exports `trellis_discovery_api_certificate_expiry_timestamp_seconds`
    /// from now on (the current certificate's `notAfter`, read at each scrape).
    pub fn set_api_identity(&self, identity: Arc<trellis_ca::Identity>) {
        let gauge = prometheus::IntGauge::new(
            "trellis_discovery_api_certificate_expiry_timestamp_seconds",
            "notAfter of the HTTPS API's current certificate (renewed at ~2/3 of its lifetime).",
        )
        .unwrap_or_else(|_| unreachable_metric());
        if self.api_identity.set((identity, gauge.clone())).is_ok() {
            // Set once: the name cannot be registered twice.
            let _ = self.registry.register(Box::new(gauge));
        }
    }

    /// Text exposition; instance gauges are computed at scrape time.
    pub fn render(&self, reg: &ServiceRegistry) -> Vec<u8> {
        let (mut h, mut u, mut k) = (0, 0, 0);
        for e in reg.read().services.values() {
            for i in e.instances.values() {
                match i.health {
                    HealthStatus::Healthy => h += 1,
                    HealthStatus::Unhealthy => u += 1,
                    HealthStatus::Unknown => k += 1,
                }
            }
        }
        self.instances.with_label_values(&["HEALTHY"]).set(h);
        self.instances.with_label_values(&["UNHEALTHY"]).set(u);
        self.instances.with_label_values(&["UNKNOWN"]).set(k);
        self.store_stale.set(i64::from(reg.store_stale()));
        if let Some((identity, gauge)) = self.api_identity.get() {
            gauge.set(identity.not_after().unix_timestamp());
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

#[allow(clippy::panic)]
fn unreachable_metric<T>() -> T {
    // Metric options are compile-time constants; invalid ones are a programming error.
    panic!("invalid metric definition")
}
