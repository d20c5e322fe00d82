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

    // The control plane by name (resolved per connection), as a compose or ECS user would.
    let toml = format!(
        "{}\n[control_plane]\naddress = \"localhost:{}\"\nwatch_wait = \"5s\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
        base(),
        cp.port()
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

/// An app that holds every request until `release` is notified: "a request in flight" without timing.
async fn held_app(release: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                release.notified().await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nheld")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn shutdown_deregisters_from_discovery_before_draining() {
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
    // Another service first, so the lookup by name has something to skip.
    api(
        cp,
        "CreateService",
        serde_json::json!({"Name": "api", "NamespaceId": ns_id}),
    )
    .await;
    let svc = api(
        cp,
        "CreateService",
        serde_json::json!({"Name": "web", "NamespaceId": ns_id}),
    )
    .await;
    let svc_id = svc["Service"]["Id"].as_str().unwrap().to_owned();

    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let app_addr = held_app(release.clone()).await;
    // No service_id in the config: the sidecar looks it up by namespace + service name.
    let toml = format!(
        "{}\n[control_plane]\naddress = \"{cp}\"\ninstance_id = \"web-1\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app_addr}\"\ndanger_allow_plaintext = true\n",
        base()
    );
    let (sc, stop) = sidecar(&toml).await;
    let inbound = sc.inbound_addr.unwrap();
    register(cp, &svc_id, "web-1", inbound).await;
    let discover = || {
        api(
            cp,
            "DiscoverInstances",
            serde_json::json!({"NamespaceName": "my-app.local", "ServiceName": "web"}),
        )
    };
    assert_eq!(discover().await["Instances"].as_array().unwrap().len(), 1);

    // A request in flight through the inbound listener, held by the app.
    let inflight =
        tokio::spawn(async move { get(&h1_client(), &format!("http://{inbound}/")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!inflight.is_finished());

    stop.cancel();
    let mut gone = false;
    for _ in 0..250 {
        if discover().await["Instances"].as_array().unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "instance deregistered within 5 s of shutdown");
    // Still draining: the held request has not been answered yet and the sidecar has not finished.
    assert!(!inflight.is_finished(), "deregistered while draining");
    release.notify_waiters();
    let (status, _, body) = inflight.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"held"[..]));
    tokio::time::timeout(Duration::from_secs(5), sc.wait())
        .await
        .unwrap();
    server.shutdown().await;
}
