//! The sidecar against the real control plane (trellis-discovery, in-process): instances registered
//! through the Cloud Map API reach the sidecar through the watch API; a deregistered endpoint gets
//! no new requests 100 ms later.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use support::cp_fixtures;
use support::*;
use trellis_discovery::{Server, ServerConfig};

async fn api(addr: SocketAddr, action: &str, body: serde_json::Value) -> serde_json::Value {
    cp_fixtures::call(
        &trellis_ca::cp_client::Transport::plain(),
        addr,
        action,
        body,
    )
    .await
}

/// Waits (up to 5 s) until the sidecar's `/ready` answers 200.
async fn wait_ready(admin: SocketAddr) {
    let c = h1_client();
    for _ in 0..250 {
        if get(&c, &format!("http://{admin}/ready")).await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not ready within 5 s");
}

/// The backends `n` requests through a local upstream port reached.
async fn backends(port: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    let c = h1_client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        seen.insert(get(&c, &format!("http://{port}/")).await.1);
    }
    seen
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
    wait_ready(sc.admin_addr).await;
    let port = sc.upstream_addrs["api"];
    let seen = backends(port, 10).await;
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
    let seen = backends(port, 10).await;
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

/// `control_plane.tls`: the first certificate (token over HTTPS), the endpoint watch and the
/// deregistration at shutdown all go to a control plane serving `--api-tls`, verified by its
/// SPIFFE id against the pinned roots. A control plane the roots do not vouch for is refused at
/// start, and the TLS port does not answer plain HTTP.
#[tokio::test]
async fn the_whole_conversation_with_an_https_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let token = cp_fixtures::ca_with_tokens(dir.path(), &[("my-app.local", "web")]).remove(0);
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.api_tls = Some(trellis_discovery::ApiTls::default());
    let server = Server::start(cfg).await.unwrap();
    let cp = server.api_addr;
    assert_eq!(server.api_url(), format!("https://{cp}"));
    let root = dir.path().join("ca").join("root.crt");
    let https = cp_fixtures::https_transport(&root);

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = h1_client()
        .request(
            http::Request::get(format!("http://{cp}/v1/ca/roots"))
                .body(support::body(""))
                .unwrap(),
        )
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered: {:?}",
        plain.map(|r| r.status())
    );

    let svcs =
        cp_fixtures::namespace_with_services(&https, cp, "my-app.local", &["api", "web"]).await;
    let (api_id, web_id) = (svcs[0]["Id"].clone(), svcs[1]["Id"].clone());
    let a = app("a", None).await;
    let b = app("b", None).await;
    for (id, at) in [("a", a.addr), ("b", b.addr)] {
        cp_fixtures::call(
            &https,
            cp,
            "RegisterInstance",
            serde_json::json!({"ServiceId": api_id, "InstanceId": id,
                "Attributes": {"AWS_INSTANCE_IPV4": at.ip().to_string(), "AWS_INSTANCE_PORT": at.port().to_string()}}),
        )
        .await;
    }

    let web_app = app("web-app", None).await;
    let toml = |bundle: &std::path::Path| {
        format!(
            "{}\n[control_plane]\naddress = \"localhost:{}\"\ntls = true\ntrust_bundle = \"{}\"\ntoken = \"{token}\"\ninstance_id = \"web-1\"\nwatch_wait = \"5s\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{}\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
            base(),
            cp.port(),
            bundle.display(),
            web_app.addr
        )
    };

    // Roots of another CA: the control plane's certificate does not verify; the start fails.
    let impostor = trellis_ca::EphemeralCa::new("mesh.local").unwrap();
    let wrong = dir.path().join("other-root.pem");
    std::fs::write(&wrong, impostor.roots_pem()).unwrap();
    let err = trellis_proxy::start(
        trellis_proxy::Config::from_toml(&toml(&wrong)).unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("https://localhost") && err.contains("invalid peer certificate"),
        "{err}"
    );

    // The sidecar's own copy of the root, as an operator would place it.
    let pinned = dir.path().join("pinned.pem");
    std::fs::copy(&root, &pinned).unwrap();
    let (sc, stop) = sidecar(&toml(&pinned)).await;
    wait_ready(sc.admin_addr).await;
    // The endpoints came through the watch over HTTPS.
    let seen = backends(sc.upstream_addrs["api"], 10).await;
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Root rotation's first step: a second root added to the pinned file reaches the identity's
    // bundle on reload, and the HTTPS watch (checked against that bundle) goes on.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&root).unwrap(),
        impostor.roots_pem()
    );
    std::fs::write(&pinned, both).unwrap();
    sc.reload(&trellis_proxy::Config::from_toml(&toml(&pinned)).unwrap());
    assert_eq!(sc.identity().unwrap().trust_bundle().roots().len(), 2);
    let c = app("c", None).await;
    cp_fixtures::call(
        &https,
        cp,
        "RegisterInstance",
        serde_json::json!({"ServiceId": api_id, "InstanceId": "c",
            "Attributes": {"AWS_INSTANCE_IPV4": c.addr.ip().to_string(), "AWS_INSTANCE_PORT": c.addr.port().to_string()}}),
    )
    .await;
    let mut seen_c = false;
    for _ in 0..50 {
        if backends(sc.upstream_addrs["api"], 6).await.contains("c") {
            seen_c = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_c,
        "a registration after the reload reaches the sidecar"
    );

    // Deregistration at shutdown over HTTPS too.
    let inbound = sc.inbound_addr.unwrap();
    cp_fixtures::call(
        &https,
        cp,
        "RegisterInstance",
        serde_json::json!({"ServiceId": web_id, "InstanceId": "web-1",
            "Attributes": {"AWS_INSTANCE_IPV4": inbound.ip().to_string(), "AWS_INSTANCE_PORT": inbound.port().to_string()}}),
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), sc.wait())
        .await
        .unwrap();
    let left = cp_fixtures::call(
        &https,
        cp,
        "DiscoverInstances",
        serde_json::json!({"NamespaceName": "my-app.local", "ServiceName": "web"}),
    )
    .await;
    assert_eq!(left["Instances"].as_array().unwrap().len(), 0, "{left}");
    server.shutdown().await;
}

/// One request on a new mTLS connection to a sidecar's inbound listener, as `who`; the status.
async fn inbound_status(who: &std::sync::Arc<trellis_ca::Identity>, inbound: SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api: trellis_core::SpiffeId = "spiffe://mesh.local/ns/my-app.local/svc/api"
        .parse()
        .unwrap();
    let config = who.client_config(Some(api), &[b"http/1.1"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(inbound.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await.unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

/// Intentions pushed from the control plane: `trellis:intentions-*` tags on the destination
/// service, set with TagResource, replace the sidecar's configured intentions for new connections
/// within a watch round trip, and removing them restores the configured ones. Bad values are
/// refused by the API with InvalidInput.
#[tokio::test]
async fn intentions_pushed_as_service_tags() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = cp_fixtures::ca_with_tokens(
        dir.path(),
        &[("my-app.local", "api"), ("my-app.local", "web")],
    );
    let (api_token, web_token) = (&tokens[0], &tokens[1]);
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    let server = Server::start(cfg).await.unwrap();
    let cp = server.api_addr;
    let plain = trellis_ca::cp_client::Transport::plain();
    let svcs = cp_fixtures::namespace_with_services(&plain, cp, "my-app.local", &["api"]).await;
    let arn = svcs[0]["Arn"].as_str().unwrap().to_owned();

    // The api's sidecar: configured to let web in.
    let app = app("api-app", None).await;
    let toml = format!(
        "[identity]\nnamespace = \"my-app.local\"\nservice = \"api\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[control_plane]\naddress = \"{cp}\"\ntoken = \"{api_token}\"\nwatch_wait = \"5s\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{}\"\nintentions = {{ default = \"deny\", rules = [{{ source = \"web\", action = \"allow\" }}] }}\n",
        app.addr
    );
    let (sc, stop) = sidecar(&toml).await;
    let inbound = sc.inbound_addr.unwrap();
    let web = trellis_ca::Identity::bootstrap(
        &format!("http://{cp}"),
        web_token,
        "mesh.local".parse().unwrap(),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(inbound_status(&web, inbound).await, 200);

    let until = |want: u16| {
        let web = web.clone();
        async move {
            let mut last = 0;
            for _ in 0..100 {
                last = inbound_status(&web, inbound).await;
                if last == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("status {last}, expected {want} within 5 s");
        }
    };
    // The control plane denies web: new connections are refused.
    api(
        cp,
        "TagResource",
        serde_json::json!({"ResourceARN": arn, "Tags": [{"Key": "trellis:intentions-deny", "Value": "web"}]}),
    )
    .await;
    until(403).await;
    // Tags withdrawn: the configured intentions again.
    api(
        cp,
        "UntagResource",
        serde_json::json!({"ResourceARN": arn, "TagKeys": ["trellis:intentions-deny"]}),
    )
    .await;
    until(200).await;

    // A bad source is refused where it is set, naming the tag.
    let req = http::Request::post(format!("http://{cp}/"))
        .header("x-amz-target", "Route53AutoNaming_v20170314.TagResource")
        .header("content-type", "application/x-amz-json-1.1")
        .body(support::body(
            serde_json::json!({"ResourceARN": arn, "Tags": [{"Key": "trellis:intentions-allow", "Value": "web, not a name"}]})
                .to_string(),
        ))
        .unwrap();
    let resp = h1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("InvalidInput") && text.contains("trellis:intentions-allow"),
        "{text}"
    );
    stop.cancel();
    sc.wait().await;
    server.shutdown().await;
}

/// Routes pushed from the control plane: a `trellis:route:<name>` service attribute on `api`,
/// set with UpdateServiceAttributes, replaces the sidecar's routes for `api` within a watch round
/// trip; deleting it restores the configured ones. A route the control plane finds bad is refused
/// there (InvalidInput naming the attribute); one only this sidecar cannot apply (a target that is
/// not its upstream) is refused by the sidecar, counted, and the routes before it stay.
#[tokio::test]
async fn routes_pushed_as_service_attributes() {
    let server = Server::start(ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let cp = server.api_addr;
    let plain = trellis_ca::cp_client::Transport::plain();
    let svcs =
        cp_fixtures::namespace_with_services(&plain, cp, "my-app.local", &["api", "api-v2"]).await;
    let (api_id, v2_id) = (
        svcs[0]["Id"].as_str().unwrap().to_owned(),
        svcs[1]["Id"].as_str().unwrap().to_owned(),
    );
    let (v1, v2) = (app("v1", None).await, app("v2", None).await);
    register(cp, &api_id, "v1", v1.addr).await;
    register(cp, &v2_id, "v2", v2.addr).await;

    let toml = format!(
        "{}\n[control_plane]\naddress = \"{cp}\"\nwatch_wait = \"5s\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}, {{ service = \"api-v2\", danger_plaintext = true }}]\n",
        base()
    );
    let (sc, stop) = sidecar(&toml).await;
    wait_ready(sc.admin_addr).await;
    let port = sc.upstream_addrs["api"];
    let c = h1_client();
    let at = |path: &'static str| {
        let c = c.clone();
        async move { get(&c, &format!("http://{port}{path}")).await.1 }
    };
    let until = |path: &'static str, want: &'static str| async move {
        let mut last = String::new();
        for _ in 0..100 {
            last = at(path).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} answered by {last}, expected {want} within 5 s");
    };
    assert_eq!(at("/v2/x").await, "v1");

    // The control plane sends /v2 to api-v2.
    let route =
        r#"{"priority": 10, "match": {"prefix": "/v2"}, "targets": [{"cluster": "api-v2"}]}"#;
    api(
        cp,
        "UpdateServiceAttributes",
        serde_json::json!({"ServiceId": api_id, "Attributes": {"trellis:route:v2": route, "team": "core"}}),
    )
    .await;
    until("/v2/x", "v2").await;
    assert_eq!(at("/other").await, "v1");
    // The admin shows the routes in effect and where they came from.
    let routes_url = format!("http://{}/routes", sc.admin_addr);
    let view: serde_json::Value = serde_json::from_slice(&get(&c, &routes_url).await.2).unwrap();
    assert_eq!(view["api"]["source"], "pushed", "{view}");
    assert_eq!(view["api"]["routes"][0]["name"], "trellis:route:v2");
    assert_eq!(view["api"]["routes"][0]["match"]["prefix"], "/v2");
    assert_eq!(view["api-v2"]["source"], "configured");

    // Bad where it is set: refused by the API, naming the attribute and the field.
    let req = http::Request::post(format!("http://{cp}/"))
        .header(
            "x-amz-target",
            "Route53AutoNaming_v20170314.UpdateServiceAttributes",
        )
        .header("content-type", "application/x-amz-json-1.1")
        .body(support::body(
            serde_json::json!({"ServiceId": api_id, "Attributes": {"trellis:route:bad": r#"{"match": {"prefix": "v3"}, "targets": [{"cluster": "api"}]}"#}})
                .to_string(),
        ))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("InvalidInput") && text.contains("trellis:route:bad.match.prefix"),
        "{text}"
    );

    // Fine for the control plane, not for this sidecar (no such upstream): refused here, counted,
    // and /v2 keeps going to api-v2.
    let elsewhere = r#"{"match": {"prefix": "/v3"}, "targets": [{"cluster": "billing"}]}"#;
    api(
        cp,
        "UpdateServiceAttributes",
        serde_json::json!({"ServiceId": api_id, "Attributes": {"trellis:route:v3": elsewhere}}),
    )
    .await;
    let metrics = format!("http://{}/metrics", sc.admin_addr);
    let mut refused = false;
    for _ in 0..100 {
        let text = String::from_utf8_lossy(&get(&c, &metrics).await.2).into_owned();
        if text.contains("trellis_proxy_pushed_routes_rejected_total 1") {
            assert!(text.contains("trellis_proxy_pushed_routes 1"), "{text}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the push naming billing was not refused: {:?}",
        get(&c, &metrics).await.2
    );
    assert_eq!(at("/v2/x").await, "v2");
    assert_eq!(at("/v3/x").await, "v1");
    // A watch answer for another reason (a new api instance) does not re-report the same push.
    let v1b = app("v1", None).await;
    register(cp, &api_id, "v1b", v1b.addr).await;
    for _ in 0..100 {
        if v1b.hits.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        at("/other").await;
    }
    assert!(v1b.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let text = get(&c, &metrics).await.2;
    assert!(
        String::from_utf8_lossy(&text).contains("trellis_proxy_pushed_routes_rejected_total 1"),
        "{}",
        String::from_utf8_lossy(&text)
    );

    // Withdrawn: the configured routes (none) again.
    api(
        cp,
        "DeleteServiceAttributes",
        serde_json::json!({"ServiceId": api_id, "Attributes": ["trellis:route:v2", "trellis:route:v3"]}),
    )
    .await;
    until("/v2/x", "v1").await;
    let view: serde_json::Value = serde_json::from_slice(&get(&c, &routes_url).await.2).unwrap();
    assert_eq!(view["api"]["source"], "configured", "{view}");
    assert_eq!(view["api"]["routes"], serde_json::json!([]));
    let text = get(&c, &metrics).await.2;
    assert!(String::from_utf8_lossy(&text).contains("trellis_proxy_pushed_routes 0"));
    stop.cancel();
    sc.wait().await;
    server.shutdown().await;
}

/// A canary by instance attribute, decided centrally: routes pushed for `api` that target attribute
/// subsets its sidecar never had (`api[version=v2]`, `api[version=v1]`) get their clusters while
/// the sidecar runs, start from the endpoints it already knows (no request fails while they appear),
/// follow the service's later registrations, and are listed in `/clusters`.
#[tokio::test]
async fn pushed_routes_make_the_attribute_subsets_they_name() {
    let server = Server::start(ServerConfig::new("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let cp = server.api_addr;
    let plain = trellis_ca::cp_client::Transport::plain();
    let svcs = cp_fixtures::namespace_with_services(&plain, cp, "my-app.local", &["api"]).await;
    let api_id = svcs[0]["Id"].as_str().unwrap().to_owned();
    let register_version = |id: &'static str, at: SocketAddr, version: &'static str| {
        let api_id = api_id.clone();
        async move {
            api(
                cp,
                "RegisterInstance",
                serde_json::json!({"ServiceId": api_id, "InstanceId": id, "Attributes": {
                    "AWS_INSTANCE_IPV4": at.ip().to_string(),
                    "AWS_INSTANCE_PORT": at.port().to_string(),
                    "version": version}}),
            )
            .await;
        }
    };
    let (blue, green) = (app("blue", None).await, app("green", None).await);
    register_version("blue", blue.addr, "v1").await;
    register_version("green", green.addr, "v2").await;

    let toml = format!(
        "{}\n[control_plane]\naddress = \"{cp}\"\nwatch_wait = \"5s\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
        base()
    );
    let (sc, stop) = sidecar(&toml).await;
    wait_ready(sc.admin_addr).await;
    let port = sc.upstream_addrs["api"];
    assert_eq!(
        backends(port, 8).await.len(),
        2,
        "both versions before the push"
    );

    let c = h1_client();
    let canary = || {
        let req = http::Request::get(format!("http://{port}/"))
            .header("x-canary", "1")
            .body(support::body(""))
            .unwrap();
        let c = c.clone();
        async move {
            let resp = c.request(req).await.unwrap();
            let backend = resp.headers().get("x-backend").cloned();
            (
                resp.status().as_u16(),
                backend.map(|b| b.to_str().unwrap().to_owned()),
            )
        }
    };
    let stable = r#"{"priority": 20, "match": {"prefix": "/"}, "targets": [{"cluster": "api", "attributes": {"version": "v1"}}]}"#;
    let canaried = r#"{"priority": 10, "match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "targets": [{"cluster": "api", "attributes": {"version": "v2"}}]}"#;
    api(
        cp,
        "UpdateServiceAttributes",
        serde_json::json!({"ServiceId": api_id, "Attributes": {"trellis:route:stable": stable, "trellis:route:canary": canaried}}),
    )
    .await;
    // Until the push lands and after, every request is answered by an instance: none fails while
    // the subsets appear.
    let mut pinned = 0;
    for _ in 0..200 {
        let (status, backend, _) = get(&c, &format!("http://{port}/")).await;
        assert_eq!(status, 200, "a request failed while the subsets were made");
        pinned = if backend == "blue" { pinned + 1 } else { 0 };
        if pinned == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pinned, 10, "plain requests did not settle on version v1");
    for _ in 0..5 {
        assert_eq!(canary().await, (200, Some("green".to_owned())));
    }
    let clusters = String::from_utf8_lossy(
        &get(&c, &format!("http://{}/clusters", sc.admin_addr))
            .await
            .2,
    )
    .into_owned();
    assert!(
        clusters.contains("api[version=v1]") && clusters.contains("api[version=v2]"),
        "{clusters}"
    );
    assert_eq!(
        get(&c, &format!("http://{}/ready", sc.admin_addr)).await.0,
        200
    );

    // A new v2 instance joins the canary subset through the upstream's watch.
    let green2 = app("green2", None).await;
    register_version("green2", green2.addr, "v2").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        if let (200, Some(b)) = canary().await {
            seen.insert(b);
        }
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen,
        ["green".to_owned(), "green2".to_owned()].into(),
        "the canary subset did not follow the new registration"
    );
    assert!(blue.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
    stop.cancel();
    sc.wait().await;
    server.shutdown().await;
}
