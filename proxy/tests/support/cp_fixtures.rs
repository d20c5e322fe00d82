//! Control-plane fixtures: a CA with join tokens in a data directory, and Cloud Map calls over
//! HTTP or HTTPS (verified like trellis clients do).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use http_body_util::BodyExt;

/// One Cloud Map call that must succeed, over `transport` (HTTPS is checked against the mesh's
/// roots like the sidecar does).
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

/// A CA in `dir/ca` (where the control plane with data directory `dir` finds it) and a join token
/// for each `(namespace, service)`.
pub fn ca_with_tokens(dir: &std::path::Path, workloads: &[(&str, &str)]) -> Vec<String> {
    let ca_dir = trellis_ca::CaDir::new(dir.join("ca"));
    ca_dir
        .init("mesh.local".parse().unwrap(), trellis_ca::Policy::default())
        .unwrap();
    let tokens = ca_dir.tokens().unwrap();
    workloads
        .iter()
        .map(|(ns, svc)| {
            tokens
                .create(trellis_ca::Scope::Workload {
                    namespace: ns.parse().unwrap(),
                    service: svc.parse().unwrap(),
                })
                .unwrap()
                .bearer()
        })
        .collect()
}

/// Creates an HTTP namespace and `services` in it; the `Service` objects, in order.
pub async fn namespace_with_services(
    transport: &trellis_ca::cp_client::Transport,
    addr: SocketAddr,
    namespace: &str,
    services: &[&str],
) -> Vec<serde_json::Value> {
    let op = call(
        transport,
        addr,
        "CreateHttpNamespace",
        serde_json::json!({"Name": namespace}),
    )
    .await;
    let got = call(
        transport,
        addr,
        "GetOperation",
        serde_json::json!({"OperationId": op["OperationId"]}),
    )
    .await;
    let ns_id = got["Operation"]["Targets"]["NAMESPACE"].clone();
    let mut out = Vec::new();
    for name in services {
        let svc = call(
            transport,
            addr,
            "CreateService",
            serde_json::json!({"Name": name, "NamespaceId": ns_id}),
        )
        .await;
        out.push(svc["Service"].clone());
    }
    out
}

/// HTTPS to a control plane, verified against the roots in `root` (its `ca/root.crt`).
pub fn https_transport(root: &std::path::Path) -> trellis_ca::cp_client::Transport {
    let bundle = trellis_ca::TrustBundle::from_pem(
        "mesh.local".parse().unwrap(),
        &std::fs::read_to_string(root).unwrap(),
    )
    .unwrap();
    trellis_ca::cp_client::Transport::https(&bundle).unwrap()
}
