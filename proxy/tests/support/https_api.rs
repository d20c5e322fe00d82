//! Cloud Map calls to a control plane serving `--api-tls`, verified like trellis clients do.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use http_body_util::BodyExt;

/// One Cloud Map call over HTTPS, checked against the mesh's roots like the sidecar does.
pub async fn call(
    transport: &trellis_ca::cp_client::Transport,
    addr: SocketAddr,
    action: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let client = transport.client::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("{}/", transport.base_url(addr)))
        .header(
            "x-amz-target",
            format!("Route53AutoNaming_v20170314.{action}"),
        )
        .header("content-type", "application/x-amz-json-1.1")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    assert_eq!(status, 200, "{action}: {v}");
    v
}
