//! The sidecar against the real control plane (trellis-discovery, in-process): instances registered
//! through the Cloud Map API reach the sidecar through the watch API; a deregistered endpoint gets
//! no new requests 100 ms later.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use trellis_discovery::{Server, ServerConfig};

async fn api(addr: SocketAddr, action: &str, body: serde_json::Value) -> serde_json::Value {
    let req = http::Request::post(format!("http://{addr}/"))
        .header(
            "x-amz-target",
            format!("Route53AutoNaming_v20170314.{action}"),
        )
        .header("content-type", "application/x-amz-json-1.1")
        .body(support::body(body.to_string()))
        .unwrap();
    let resp = h1_client().request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    assert_eq!(status, 200, "{action}: {v}");
    v
}

async fn register(cp: SocketAddr, svc: &str, id: &str, at: SocketAddr) {
    api(
        cp,
        "RegisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": id,
            "Attributes": {"AWS_INSTANCE_IPV4": at.ip().to_string(), "AWS_INSTANCE_PORT": at.port().to_string()}}),
    )
    .await;
}

#[tokio::test]
async fn endpoints_follow_the_real_control_plane() {
    let server = Server::start(ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let cp = server.api_addr;
    let op = api(
        cp,
        "CreateHttpNamespace",
        serde_json::json!({"Name": "my-app.local"}),
    )
    .await;
    let got = api(
        cp,
        "GetOperation",
        serde_json::json!({"OperationId": op["OperationId"]}),
    )
    .await;
    let ns_id = got["Operation"]["Targets"]["NAMESPACE"]
        .as_str()
        .unwrap()
        .to_owned();
    let svc = api(
        cp,
        "CreateService",
        serde_json::json!({"Name": "api", "NamespaceId": ns_id}),
    )
    .await;
    let svc_id = svc["Service"]["Id"].as_str().unwrap().to_owned();
    let a = app("a", None).await;
    let b = app("b", None).await;
    register(cp, &svc_id, "a", a.addr).await;
    register(cp, &svc_id, "b", b.addr).await;

    let toml = format!(
        "{}\n[control_plane]\naddress = \"{cp}\"\nwatch_wait = \"5s\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
        base()
    );
    let (sc, stop) = sidecar(&toml).await;
    let c = h1_client();
    let ready = format!("http://{}/ready", sc.admin_addr);
    let mut ok = false;
    for _ in 0..100 {
        if get(&c, &ready).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "ready within 2 s");
    let port = sc.upstream_addrs["api"];
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(get(&c, &format!("http://{port}/")).await.1);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    api(
        cp,
        "DeregisterInstance",
        serde_json::json!({"ServiceId": svc_id, "InstanceId": "b"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = b.hits.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{port}/")).await.1, "a");
    }
    assert_eq!(b.hits.load(std::sync::atomic::Ordering::SeqCst), before);

    // A new instance is picked up too.
    let c2 = app("c", None).await;
    register(cp, &svc_id, "c", c2.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(get(&c, &format!("http://{port}/")).await.1);
    }
    assert!(seen.contains("c"), "{seen:?}");

    stop.cancel();
    sc.wait().await;
    server.shutdown().await;
}
