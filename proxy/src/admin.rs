//! The admin listener (default 127.0.0.1:9901): `/metrics`, `/ready`, `/live`, `/config` (secrets
//! redacted), `/clusters` (endpoints, health, outlier state), `/routes` (the outbound routes in
//! effect, configured or pushed, by upstream).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::ProxyBody;
use crate::cluster::Cluster;
use crate::metrics::Metrics;

/// Process health as `/ready` and `/live` report it.
#[derive(Debug, Default)]
pub struct Health {
    draining: AtomicBool,
    identity_loaded: AtomicBool,
}

impl Health {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    pub fn set_identity_loaded(&self) {
        self.identity_loaded.store(true, Ordering::Release);
    }
    pub fn identity_loaded(&self) -> bool {
        self.identity_loaded.load(Ordering::Acquire)
    }
}

/// What the admin pages read.
#[derive(Debug)]
pub struct Admin {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// The running config, redacted, as JSON.
    pub config_json: ArcSwap<String>,
    /// Shared with the live routes, which add attribute subsets as they make them.
    pub clusters: Arc<ArcSwap<Vec<Arc<Cluster>>>>,
    /// The outbound routes in effect, as JSON (kept by [`crate::live_routes::LiveRoutes`]).
    pub routes_json: Arc<ArcSwap<String>>,
}

impl Admin {
    /// Ready once the identity is loaded and every cluster has its first endpoint snapshot, and
    /// until draining starts.
    pub fn is_ready(&self) -> bool {
        !self.health.is_draining()
            && self.health.identity_loaded()
            && self.clusters.load().iter().all(|c| c.is_loaded())
    }

    pub fn handle<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.is_ready() => text(StatusCode::OK, "ready\n"),
            "/ready" if self.health.is_draining() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                let mut r = Response::new(ProxyBody::full(self.metrics.render()));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            "/config" => json(self.config_json.load().as_str().to_owned()),
            "/routes" => json(self.routes_json.load().as_str().to_owned()),
            "/clusters" => {
                let status: Vec<_> = self.clusters.load().iter().map(|c| c.status()).collect();
                json(serde_json::to_string_pretty(&status).unwrap_or_default())
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn json(body: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_identity_clusters_and_drain() {
        let admin = Admin {
            metrics: Metrics::new(),
            health: Arc::new(Health::default()),
            config_json: ArcSwap::from_pointee("{}".into()),
            clusters: Arc::default(),
            routes_json: Arc::new(ArcSwap::from_pointee("{}".into())),
        };
        let get = |p: &str| admin.handle(&Request::get(p).body(()).unwrap()).status();
        assert_eq!(get("/live"), StatusCode::OK);
        assert_eq!(get("/ready"), StatusCode::SERVICE_UNAVAILABLE);
        admin.health.set_identity_loaded();
        assert_eq!(get("/ready"), StatusCode::OK);
        admin.health.set_draining();
        assert_eq!(get("/ready"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get("/metrics"), StatusCode::OK);
        assert_eq!(get("/nope"), StatusCode::NOT_FOUND);
    }
}
