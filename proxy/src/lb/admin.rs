//! The LB admin API: `/metrics`, `/ready`, `/config`, `/v1/deployments`, `/v1/target_groups`
//! and `PUT /v1/listeners/<l>/rules/<r>/weights` with a JSON object `{"<group>": <weight>}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::config::LbConfig;
use super::deploy::Deployment;
use super::error::WeightError;
use super::listener::{LbBody, ListenerState, full};
use super::metrics::Metrics;
use super::target::TargetGroup;
use crate::route::{Action, Weight};

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    pub config: LbConfig,
    pub listeners: Vec<Arc<ListenerState>>,
    pub groups: Vec<Arc<TargetGroup>>,
    pub deployments: Vec<Arc<Deployment>>,
    pub metrics: Metrics,
    pub stop: CancellationToken,
}

pub async fn handle(
    admin: Arc<Admin>,
    req: Request<Incoming>,
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

async fn put_weights(admin: &Admin, l: &str, r: &str, req: Request<Incoming>) -> Response<LbBody> {
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
            let idx = l.index.load();
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
    json!({ "config": admin.config, "live": live })
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
