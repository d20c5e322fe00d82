//! Following one service's endpoints through the discovery watch API:
//! `GET /v1/watch/<namespace>/<service>?revision=N&wait=30s` → `trellis_core::EndpointSet`,
//! answered when the revision moves (long poll). On errors the last snapshot stays in use and the
//! watcher moves to the next control-plane replica, resuming from the last revision it saw
//! (replicas on one etcd share revisions); after a full round of failures it backs off. The sidecar
//! feeds its [`Cluster`]s with it, the internal LB its target groups (anything [`WatchSink`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use tokio_util::sync::CancellationToken;
use trellis_ca::cp_client::{ControlPlaneConnector, Transport};
use trellis_core::{EndpointSet, NamespaceName, ServiceName};

use crate::cluster::{Cluster, EndpointSpec};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest watch answer accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Where and what to watch.
#[derive(Debug, Clone)]
pub struct WatchTarget {
    /// Control-plane replicas (`host:port`), in order of preference (at least one).
    pub control_planes: Vec<Authority>,
    pub namespace: NamespaceName,
    pub service: ServiceName,
    pub wait: Duration,
    /// HTTP, or HTTPS verified against the mesh's roots.
    pub transport: Transport,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("unexpected status {0}")]
    Status(StatusCode),
    #[error("service not known to the control plane")]
    NotFound,
    #[error("bad endpoint set: {0}")]
    Decode(String),
}

/// What a watch feeds.
pub trait WatchSink: Send + Sync + 'static {
    /// A new endpoint set.
    fn apply(&self, set: &EndpointSet);
    /// Whether a set has been applied yet (until then every answer is applied).
    fn is_loaded(&self) -> bool;
    /// The control plane does not know the service (yet).
    fn unknown(&self);
}

impl WatchSink for Cluster {
    fn apply(&self, set: &EndpointSet) {
        apply(self, set);
    }
    fn is_loaded(&self) -> bool {
        Cluster::is_loaded(self)
    }
    fn unknown(&self) {
        // An empty set (so readiness is not blocked).
        if !Cluster::is_loaded(self) {
            self.update([], 0);
        }
    }
}

/// Watches until `stop`, applying every new endpoint set to `cluster`.
pub async fn run<S: WatchSink>(target: WatchTarget, cluster: Arc<S>, stop: CancellationToken) {
    let client: Client<ControlPlaneConnector, Empty<Bytes>> = target.transport.client();
    // No revision on the first poll: the server answers at once, so readiness does not wait.
    let mut revision: Option<u64> = None;
    let mut backoff = BACKOFF_MIN;
    let mut current = 0;
    // Consecutive failures; every replica tried once → back off before the next round.
    let mut failures = 0;
    loop {
        let Some(cp) = target
            .control_planes
            .get(current % target.control_planes.len().max(1))
        else {
            return;
        };
        let once = poll_once(&client, cp, &target, revision);
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(target.wait + Duration::from_secs(5), once) => r,
        };
        match result {
            Ok(Ok(Some(set))) => {
                backoff = BACKOFF_MIN;
                failures = 0;
                if Some(set.revision) != revision || !cluster.is_loaded() {
                    revision = Some(set.revision);
                    cluster.apply(&set);
                }
            }
            Ok(Ok(None)) => {
                backoff = BACKOFF_MIN;
                failures = 0;
            }
            Ok(Err(WatchError::NotFound)) => {
                // Unknown service: ask again later.
                cluster.unknown();
                revision = None;
                sleep_or_stop(BACKOFF_MAX.min(target.wait), &stop).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(service = %target.service, control_plane = %cp, error = %e, "watch failed; keeping last endpoints, trying the next replica");
                current += 1;
                failures += 1;
                if failures >= target.control_planes.len() {
                    failures = 0;
                    sleep_or_stop(backoff, &stop).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            Err(_) => {
                tracing::warn!(service = %target.service, control_plane = %cp, "watch timed out; keeping last endpoints, trying the next replica");
                current += 1;
                failures += 1;
                if failures >= target.control_planes.len() {
                    failures = 0;
                    sleep_or_stop(backoff, &stop).await;
                }
            }
        }
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// One long poll: `Some(set)` on 200, `None` when the server answered "no change" (304/204).
async fn poll_once(
    client: &Client<ControlPlaneConnector, Empty<Bytes>>,
    cp: &Authority,
    t: &WatchTarget,
    revision: Option<u64>,
) -> Result<Option<EndpointSet>, WatchError> {
    let wait = t.wait.as_secs().max(1);
    let (ns, svc) = (&t.namespace, &t.service);
    let base = t.transport.base_url(cp);
    let uri: Uri = match revision {
        Some(r) => format!("{base}/v1/watch/{ns}/{svc}?revision={r}&wait={wait}s"),
        None => format!("{base}/v1/watch/{ns}/{svc}?wait={wait}s"),
    }
    .parse()
    .map_err(|e: http::uri::InvalidUri| WatchError::Http(e.to_string()))?;
    let req = Request::get(uri)
        .body(Empty::new())
        .map_err(|e| WatchError::Http(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| WatchError::Http(trellis_ca::cp_client::error_chain(&e)))?;
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED || status == StatusCode::NO_CONTENT {
        return Ok(None);
    }
    if status == StatusCode::NOT_FOUND {
        return Err(WatchError::NotFound);
    }
    if status != StatusCode::OK {
        return Err(WatchError::Status(status));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| WatchError::Http(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| WatchError::Decode(e.to_string()))
}

/// Applies a set: serving endpoints only (all of them when none is, fail open).
pub fn apply(cluster: &Cluster, set: &EndpointSet) {
    cluster.update(
        set.serving()
            .filter(|e| cluster.accepts(&e.attributes))
            .map(|e| EndpointSpec {
                instance_id: e.instance_id.clone(),
                addr: e.socket_addr(),
                weight: e.weight,
            }),
        set.revision,
    );
}
