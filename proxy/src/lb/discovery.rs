//! Target-group membership from the discovery watch API:
//! `GET <url>/v1/watch/<ns>/<svc>?revision=N&wait=30s` → JSON `trellis_core::EndpointSet`,
//! answered when the revision moves past N (or at the wait timeout with the same set).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use trellis_core::EndpointSet;

use super::config::DiscoverySource;
use super::health::ProbeClient;
use super::target::TargetGroup;

/// Largest endpoint-set body accepted.
const MAX_BODY: usize = 4 << 20;
const WAIT: &str = "30s";
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(
    group: Arc<TargetGroup>,
    src: DiscoverySource,
    client: ProbeClient,
    stop: CancellationToken,
) {
    let base = src.url.trim_end_matches('/').to_owned();
    let mut revision = 0u64;
    loop {
        let url = format!(
            "{base}/v1/watch/{}/{}?revision={revision}&wait={WAIT}",
            src.namespace, src.service
        );
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = fetch(&client, &url) => r,
        };
        match result {
            Ok(set) => {
                revision = set.revision;
                let addrs: Vec<SocketAddr> = set.serving().map(|e| e.socket_addr()).collect();
                group.set_members(&addrs);
            }
            Err(e) => {
                tracing::warn!(group = %group.name, error = %e, "discovery watch failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

async fn fetch(client: &ProbeClient, url: &str) -> Result<EndpointSet, String> {
    let req = http::Request::get(url)
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(40), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
