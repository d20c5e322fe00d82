//! Prometheus metrics of one CA instance (its own registry, so tests and several CAs in one
//! process never collide). Handles are resolved once; nothing is looked up per request.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use prometheus::{Gauge, GaugeVec};

/// The CA's metric handles.
#[derive(Clone)]
pub struct CaMetrics {
    registry: Registry,
    pub(crate) issued: IntCounter,
    pub(crate) latency: Histogram,
    pub(crate) errors: IntCounterVec,
    pub(crate) revoked: IntCounter,
    pub(crate) root_expiry: Gauge,
    pub(crate) intermediate_expiry: Gauge,
    /// Unix times the expiry gauges count down to (0 = unknown); refreshed at every render.
    pub(crate) root_not_after: std::sync::Arc<std::sync::atomic::AtomicI64>,
    pub(crate) intermediate_not_after: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaMetrics")
    }
}

impl CaMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let issued = IntCounter::new(
            "trellis_ca_certificates_issued_total",
            "Workload certificates issued.",
        )
        .expect("static metric definition is valid");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "trellis_ca_issue_duration_seconds",
                "Time to verify a CSR, sign and durably record a certificate.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .expect("static metric definition is valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "trellis_ca_issue_errors_total",
                "Rejected or failed issuance requests by reason.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let revoked = IntCounter::new(
            "trellis_ca_certificates_revoked_total",
            "Certificates revoked.",
        )
        .expect("static metric definition is valid");
        let expiry = GaugeVec::new(
            Opts::new(
                "trellis_ca_cert_expiry_seconds",
                "Seconds until the CA certificate expires (negative once expired).",
            ),
            &["cert"],
        )
        .expect("static metric definition is valid");
        let root_expiry = expiry.with_label_values(&["root"]);
        let intermediate_expiry = expiry.with_label_values(&["intermediate"]);
        for c in [
            Box::new(issued.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(errors.clone()),
            Box::new(revoked.clone()),
            Box::new(expiry),
        ] {
            registry
                .register(c)
                .expect("metric names are unique within this registry");
        }
        Self {
            registry,
            issued,
            latency,
            errors,
            revoked,
            root_expiry,
            intermediate_expiry,
            root_not_after: Default::default(),
            intermediate_not_after: Default::default(),
        }
    }

    /// Sets the expiry gauges from the recorded not-after times and the current clock.
    pub fn refresh_expiry(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for (at, g) in [
            (&self.root_not_after, &self.root_expiry),
            (&self.intermediate_not_after, &self.intermediate_expiry),
        ] {
            let t = at.load(Relaxed);
            if t != 0 {
                g.set((t - now) as f64);
            }
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition format (expiry gauges refreshed first).
    pub fn render(&self) -> String {
        self.refresh_expiry();
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}
