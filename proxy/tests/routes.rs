//! The sidecar's outbound routes over real sockets: the shared route engine picks the cluster for
//! both the egress (Host) listener and an upstream's local port.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use http::Request;
use support::*;

fn cluster(service: &str, addr: SocketAddr) -> String {
    format!("[[clusters]]\nservice = \"{service}\"\nendpoints = [{{ address = \"{addr}\" }}]\n")
}

/// `api` (own cluster: app "api") split by routes over `api-v1` and `api-v2`.
fn config(api: SocketAddr, v1: SocketAddr, v2: SocketAddr, routes: &str) -> String {
    format!(
        "{}\n[outbound]\negress_listen = \"127.0.0.1:0\"\nupstreams = [\n  {{ service = \"api\", local_port = 0, danger_plaintext = true }},\n  {{ service = \"api-v1\", danger_plaintext = true }},\n  {{ service = \"api-v2\", danger_plaintext = true }},\n]\n{routes}\n{}{}{}",
        base(),
        cluster("api", api),
        cluster("api-v1", v1),
        cluster("api-v2", v2),
    )
}

const MATCH_ROUTES: &str = r#"
[[outbound.routes]]
upstream = "api"
name = "exact"
priority = 1
match = { path = "/exact" }
targets = [{ cluster = "api-v1" }]

[[outbound.routes]]
upstream = "api"
name = "regex"
priority = 2
match = { path_regex = "/users/[0-9]+" }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
name = "prefix"
priority = 3
match = { prefix = "/v1/" }
targets = [{ cluster = "api-v1" }]

[[outbound.routes]]
upstream = "api"
name = "canary-header"
priority = 4
match = { headers = [{ name = "x-canary", exact = "yes" }] }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
name = "beta-users"
priority = 5
match = { headers = [{ name = "x-user", regex = "beta-[a-z]+" }] }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
name = "debug"
priority = 6
match = { headers = [{ name = "x-debug", present = true }] }
targets = [{ cluster = "api-v1" }]

[[outbound.routes]]
upstream = "api"
name = "deletes"
priority = 7
match = { method = "DELETE", prefix = "/items" }
targets = [{ cluster = "api-v2" }]
"#;

async fn backend_of(
    url: &str,
    host: Option<&str>,
    method: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = h1_client()
        .request(b.body(body("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{method} {url} {headers:?}");
    resp.headers()["x-backend"].to_str().unwrap().to_owned()
}

/// (method, path, headers, expected backend)
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[tokio::test]
async fn routes_match_path_header_and_method_on_both_listeners() {
    let (api, v1, v2) = (
        app("api", None).await,
        app("v1", None).await,
        app("v2", None).await,
    );
    let (sc, stop) = sidecar(&config(api.addr, v1.addr, v2.addr, MATCH_ROUTES)).await;
    let local = sc.upstream_addrs["api"];
    let egress = sc.egress_addr.unwrap();
    let cases: &[Case] = &[
        // path: exact vs prefix vs regex
        ("GET", "/exact", &[], "v1"),
        ("GET", "/exact/more", &[], "api"),
        ("GET", "/users/42", &[], "v2"),
        ("GET", "/users/42/edit", &[], "api"),
        ("GET", "/users/me", &[], "api"),
        ("GET", "/v1/anything", &[], "v1"),
        ("GET", "/v1", &[], "api"),
        // headers: exact (case-sensitive), regex, present
        ("GET", "/", &[("x-canary", "yes")], "v2"),
        ("GET", "/", &[("x-canary", "YES")], "api"),
        ("GET", "/", &[("x-user", "beta-anna")], "v2"),
        ("GET", "/", &[("x-user", "beta-42")], "api"),
        ("GET", "/", &[("x-debug", "")], "v1"),
        // method (with a prefix)
        ("DELETE", "/items/7", &[], "v2"),
        ("GET", "/items/7", &[], "api"),
        // priority: the exact-path route (1) wins over the header route (4)
        ("GET", "/exact", &[("x-canary", "yes")], "v1"),
        // default route: the upstream's own cluster
        ("GET", "/nothing/special", &[], "api"),
    ];
    for (method, path, headers, want) in cases {
        let via_port = backend_of(&format!("http://{local}{path}"), None, method, headers).await;
        assert_eq!(via_port, *want, "local port: {method} {path} {headers:?}");
        let via_host = backend_of(
            &format!("http://{egress}{path}"),
            Some("api.my-app.local"),
            method,
            headers,
        )
        .await;
        assert_eq!(via_host, *want, "egress: {method} {path} {headers:?}");
    }
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn weighted_split_follows_weights_and_reloads_live() {
    let (api, v1, v2) = (
        app("api", None).await,
        app("v1", None).await,
        app("v2", None).await,
    );
    let routes = r#"
[[outbound.routes]]
upstream = "api"
match = { prefix = "/" }
targets = [{ cluster = "api-v1", weight = 90 }, { cluster = "api-v2", weight = 10 }]
"#;
    let text = config(api.addr, v1.addr, v2.addr, routes);
    let (sc, stop) = sidecar(&text).await;
    let local = sc.upstream_addrs["api"];
    const N: usize = 3000;
    let count_v2 = |local: SocketAddr| async move {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            tasks.push(tokio::spawn(async move {
                let c = h1_client();
                let mut v2 = 0;
                for _ in 0..N / 4 {
                    let (s, backend, _) = get(&c, &format!("http://{local}/")).await;
                    assert_eq!(s, 200);
                    v2 += usize::from(backend == "v2");
                }
                v2
            }));
        }
        let mut v2 = 0;
        for t in tasks {
            v2 += t.await.unwrap();
        }
        v2
    };
    let v2 = count_v2(local).await;
    let share = v2 as f64 / N as f64;
    eprintln!("weighted 90/10 by service: v2 share {share:.3} of {N}");
    assert!((share - 0.10).abs() <= 0.05, "v2 share {share} ({v2}/{N})");
    assert_eq!(api.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Live change of weights (config reload): the route table is swapped, nothing restarts.
    let flipped = text
        .replace("weight = 90", "weight = 0")
        .replace("weight = 10", "weight = 1");
    sc.reload(&trellis_proxy::Config::from_toml(&flipped).unwrap());
    let v2 = count_v2(local).await;
    assert_eq!(v2, N, "all traffic on api-v2 after the reload");
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn environment_configures_routes() {
    let (api, v2) = (app("api", None).await, app("v2", None).await);
    let env = trellis_proxy::MapEnv::from([
        ("TRELLIS_IDENTITY__NAMESPACE", "my-app.local"),
        ("TRELLIS_IDENTITY__SERVICE", "web"),
        ("TRELLIS_ADMIN__LISTEN", "127.0.0.1:0"),
        (
            "TRELLIS_OUTBOUND__UPSTREAMS",
            r#"[{service="api",local_port=0,danger_plaintext=true},{service="api-v2",danger_plaintext=true}]"#,
        ),
        (
            "TRELLIS_OUTBOUND__ROUTES",
            r#"[{upstream="api",match={headers=[{name="x-canary",present=true}]},targets=[{cluster="api-v2"}]}]"#,
        ),
        (
            "TRELLIS_CLUSTERS",
            &format!(
                r#"[{{service="api",endpoints=[{{address="{}"}}]}},{{service="api-v2",endpoints=[{{address="{}"}}]}}]"#,
                api.addr, v2.addr
            ),
        ),
    ]);
    let config = trellis_proxy::Config::load(None, &env).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let sc = trellis_proxy::start(config, stop.clone()).await.unwrap();
    let local = sc.upstream_addrs["api"];
    let url = format!("http://{local}/");
    assert_eq!(
        backend_of(&url, None, "GET", &[("x-canary", "1")]).await,
        "v2"
    );
    assert_eq!(backend_of(&url, None, "GET", &[]).await, "api");

    // A bad route from the environment names the key.
    let env = trellis_proxy::MapEnv::from([
        ("TRELLIS_IDENTITY__NAMESPACE", "my-app.local"),
        ("TRELLIS_IDENTITY__SERVICE", "web"),
        (
            "TRELLIS_OUTBOUND__UPSTREAMS",
            r#"[{service="api",danger_plaintext=true}]"#,
        ),
        (
            "TRELLIS_CLUSTERS",
            r#"[{service="api",endpoints=[{address="127.0.0.1:1"}]}]"#,
        ),
        (
            "TRELLIS_OUTBOUND__ROUTES",
            r#"[{upstream="api",match={path_regex="/("},targets=[{cluster="api"}]}]"#,
        ),
    ]);
    let err = trellis_proxy::Config::load(None, &env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outbound.routes[0].match.path_regex"), "{err}");
    stop.cancel();
    sc.wait().await;
}

/// Share of `n` requests to `url` answered by backend `name` (4 concurrent keep-alive clients).
async fn share_of(url: String, name: &'static str, n: usize) -> f64 {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = h1_client();
            let mut hits = 0;
            for _ in 0..n / 4 {
                let (s, backend, _) = get(&c, &url).await;
                assert_eq!(s, 200);
                hits += usize::from(backend == name);
            }
            hits
        }));
    }
    let mut hits = 0;
    for t in tasks {
        hits += t.await.unwrap();
    }
    hits as f64 / (n / 4 * 4) as f64
}

const BY_VERSION: &str = r#"
[[outbound.routes]]
upstream = "api"
match = { prefix = "/canary" }
targets = [
  { cluster = "api", attributes = { version = "v1" }, weight = 90 },
  { cluster = "api", attributes = { version = "v2" }, weight = 10 },
]
"#;

#[tokio::test]
async fn weighted_split_by_instance_attribute_static_and_from_discovery() {
    let (v1, v2) = (app("v1", None).await, app("v2", None).await);
    // Static endpoints with attributes.
    let text = format!(
        "{}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n{BY_VERSION}\n[[clusters]]\nservice = \"api\"\nendpoints = [\n  {{ address = \"{}\", attributes = {{ version = \"v1\" }} }},\n  {{ address = \"{}\", attributes = {{ version = \"v2\" }} }},\n]\n",
        base(),
        v1.addr,
        v2.addr
    );
    let (sc, stop) = sidecar(&text).await;
    let local = sc.upstream_addrs["api"];
    let share = share_of(format!("http://{local}/canary"), "v2", 2000).await;
    eprintln!("weighted 90/10 by attribute (static): v2 share {share:.3} of 2000");
    assert!((share - 0.10).abs() <= 0.05, "v2 share {share}");
    // Unmatched traffic goes to the whole cluster (both versions, round robin).
    let share = share_of(format!("http://{local}/other"), "v2", 400).await;
    assert!(
        (share - 0.5).abs() <= 0.1,
        "whole cluster: v2 share {share}"
    );
    // A reload whose routes name a subset the sidecar does not have yet makes it, from the
    // reloaded static endpoints.
    let zoned = text
        .replace(
            "attributes = { version = \"v2\" } }",
            "attributes = { version = \"v2\", zone = \"b\" } }",
        )
        .replace(
            BY_VERSION,
            &format!(
                "{BY_VERSION}\n[[outbound.routes]]\nupstream = \"api\"\nmatch = {{ prefix = \"/zone-b\" }}\ntargets = [{{ cluster = \"api\", attributes = {{ zone = \"b\" }} }}]\n"
            ),
        );
    assert_ne!(zoned, text);
    sc.reload(&trellis_proxy::Config::from_toml(&zoned).unwrap());
    let share = share_of(format!("http://{local}/zone-b"), "v2", 40).await;
    assert_eq!(share, 1.0, "zone b is v2 only");
    stop.cancel();
    sc.wait().await;

    // The same from the discovery watch API: instance attributes pick the subset.
    let cp = control_plane("my-app.local", "api").await;
    cp.set.send_modify(|s| {
        s.revision += 1;
        s.endpoints = [("i1", v1.addr, "v1"), ("i2", v2.addr, "v2")]
            .into_iter()
            .map(|(id, a, version)| trellis_core::Endpoint {
                instance_id: id.into(),
                address: a.ip(),
                port: a.port(),
                weight: 1,
                health: trellis_core::HealthStatus::Healthy,
                attributes: [("version".to_owned(), version.to_owned())].into(),
            })
            .collect();
    });
    let text = format!(
        "{}\n[control_plane]\naddress = \"{}\"\nwatch_wait = \"2s\"\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n{BY_VERSION}",
        base(),
        cp.addr
    );
    let (sc, stop) = sidecar(&text).await;
    let admin = sc.admin_addr;
    let mut ready = false;
    for _ in 0..100 {
        if get(&h1_client(), &format!("http://{admin}/ready")).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "subset clusters loaded from the watch");
    let (_, _, clusters) = get(&h1_client(), &format!("http://{admin}/clusters")).await;
    let clusters = String::from_utf8_lossy(&clusters);
    assert!(clusters.contains("api[version=v2]"), "{clusters}");
    let local = sc.upstream_addrs["api"];
    let share = share_of(format!("http://{local}/canary"), "v2", 2000).await;
    assert!((share - 0.10).abs() <= 0.05, "v2 share {share}");
    stop.cancel();
    sc.wait().await;
}
