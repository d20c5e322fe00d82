//! The LB admin API: `/metrics`, `/ready`, `/config`, `/v1/deployments`, `/v1/target_groups`
//! and `PUT /v1/listeners/<l>/rules/<r>/weights` with a JSON object `{"<group>": <weight>}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use crate::ProxyBody;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::config::LbConfig;
use super::deploy::Deployment;
use super::error::{LbError, WeightError};
use super::listener::{LbBody, ListenerState, full};
use super::metrics::Metrics;
use super::target::TargetGroup;
use crate::route::{Action, Weight};

/// Largest config accepted by `POST /v1/reload`.
const MAX_CONFIG: usize = 8 << 20;

/// Apply a new config's rules and weights to the running listeners. Listeners (names, addresses,
/// TLS), target groups and deployments need a restart; a reload that changes them is refused.
pub fn reload(admin: &Admin, next: LbConfig) -> Result<(), LbError> {
    let compiled = next.compile()?;
    let same_groups = compiled.target_groups.len() == admin.groups.len()
        && compiled
            .target_groups
            .iter()
            .zip(&admin.groups)
            .all(|((c, _), g)| c.name == *g.name);
    if !same_groups {
        return Err(LbError::Reload(
            "target groups changed; restart to apply".into(),
        ));
    }
    let same_listeners = compiled.listeners.len() == admin.listeners.len()
        && compiled
            .listeners
            .iter()
            .zip(&admin.listeners)
            .all(|(c, l)| {
                c.config.name == l.config.name
                    && (c.config.listen == l.config.listen || c.config.listen == l.local)
                    && c.config.protocol == l.config.protocol
            });
    if !same_listeners {
        return Err(LbError::Reload(
            "listeners changed; restart to apply".into(),
        ));
    }
    for (c, l) in compiled.listeners.into_iter().zip(&admin.listeners) {
        l.replace_rules(c.index, &admin.metrics);
    }
    admin.metrics.weight_changes.inc();
    admin.config.store(Arc::new(next));
    tracing::info!("config reloaded");
    Ok(())
}

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    pub config: arc_swap::ArcSwap<LbConfig>,
    pub listeners: Vec<Arc<ListenerState>>,
    pub groups: Vec<Arc<TargetGroup>>,
    pub deployments: Vec<Arc<Deployment>>,
    pub metrics: Metrics,
    pub stop: CancellationToken,
}

pub async fn handle(
    admin: Arc<Admin>,
    req: Request<ProxyBody>,
) -> Result<Response<LbBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (req.method(), segs.as_slice()) {
        (&Method::GET, ["metrics"]) => text(StatusCode::OK, admin.metrics.render()),
        (&Method::GET, ["ready"]) => {
            if admin.stop.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else {
                text(StatusCode::OK, "ready\n".into())
            }
        }
        (&Method::GET, ["config"]) => json_resp(StatusCode::OK, &config_view(&admin)),
        (&Method::POST, ["v1", "reload"]) => {
            let text = http_body_util::Limited::new(req.into_body(), MAX_CONFIG)
                .collect()
                .await
                .map(|b| b.to_bytes());
            let result = match text {
                Ok(b) => match std::str::from_utf8(&b) {
                    Ok(t) => LbConfig::from_str(t)
                        .map_err(LbError::from)
                        .and_then(|c| reload(&admin, c)),
                    Err(e) => Err(LbError::Reload(format!("body is not UTF-8: {e}"))),
                },
                Err(e) => Err(LbError::Reload(format!("reading body: {e}"))),
            };
            match result {
                Ok(()) => json_resp(StatusCode::OK, &json!({ "reloaded": true })),
                Err(e) => json_resp(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() })),
            }
        }
        (&Method::GET, ["v1", "deployments"]) => {
            let v: Vec<_> = admin.deployments.iter().map(|d| d.view()).collect();
            json_resp(StatusCode::OK, &json!(v))
        }
        (&Method::GET, ["v1", "target_groups"]) => {
            let v: BTreeMap<_, _> = admin
                .groups
                .iter()
                .map(|g| (g.name.to_string(), g.view()))
                .collect();
            json_resp(StatusCode::OK, &json!(v))
        }
        (&Method::PUT, ["v1", "listeners", l, "rules", r, "weights"]) => {
            let (l, r) = ((*l).to_owned(), (*r).to_owned());
            put_weights(&admin, &l, &r, req).await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Ok(resp)
}

async fn put_weights(admin: &Admin, l: &str, r: &str, req: Request<ProxyBody>) -> Response<LbBody> {
    let result = async {
        let listener = admin
            .listeners
            .iter()
            .find(|x| x.config.name == l)
            .ok_or_else(|| WeightError::UnknownListener(l.to_owned()))?;
        let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| WeightError::Invalid(format!("reading body: {e}")))?
            .to_bytes();
        let map: BTreeMap<String, u32> = serde_json::from_slice(&body).map_err(|e| {
            WeightError::Invalid(format!(
                "body must be a JSON object {{\"group\": weight}}: {e}"
            ))
        })?;
        let mut weights = Vec::new();
        for (name, w) in &map {
            let w =
                Weight::try_from(*w).map_err(|e| WeightError::Invalid(format!("{name}: {e}")))?;
            weights.push((name.as_str(), w));
        }
        let out = listener.set_weights(r, &weights)?;
        admin.metrics.weight_changes.inc();
        Ok::<_, WeightError>(out)
    }
    .await;
    match result {
        Ok(out) => {
            let m: BTreeMap<_, _> = out.into_iter().collect();
            json_resp(StatusCode::OK, &json!({ "weights": m }))
        }
        Err(e) => json_resp(e.status(), &json!({ "error": e.to_string() })),
    }
}

fn config_view(admin: &Admin) -> serde_json::Value {
    let live: Vec<_> = admin
        .listeners
        .iter()
        .map(|l| {
            let routes = l.routes.load();
            let idx = &routes.index;
            let rules: Vec<_> = idx
                .rules()
                .iter()
                .map(|r| {
                    let weights: Option<BTreeMap<_, _>> = match &r.action {
                        Action::Forward(f) => Some(
                            f.groups()
                                .iter()
                                .map(|g| (g.name.to_string(), g.weight.get()))
                                .collect(),
                        ),
                        _ => None,
                    };
                    json!({ "name": &*r.name, "priority": r.priority.get(), "weights": weights })
                })
                .collect();
            json!({ "name": l.config.name, "address": l.local.to_string(), "rules": rules })
        })
        .collect();
    json!({ "config": *admin.config.load_full(), "live": live })
}

fn text(status: StatusCode, body: String) -> Response<LbBody> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn json_resp(status: StatusCode, v: &serde_json::Value) -> Response<LbBody> {
    let mut r = Response::new(full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
