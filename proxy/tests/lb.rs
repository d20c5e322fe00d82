//! The load balancer over real loopback sockets: real upstream servers, real clients.
#![allow(clippy::unwrap_used)] // test fixtures outside #[test] fns; a panic is a test failure

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_proxy::lb::{LbConfig, LbHandle, start};

#[path = "support/cp_fixtures.rs"]
mod cp_fixtures;

/// A demo upstream: answers its name, `/health` by its health flag, `/slow` after 400 ms.
struct Upstream {
    name: String,
    addr: SocketAddr,
    hits: AtomicUsize,
    health_checks: AtomicUsize,
    healthy: AtomicBool,
    status: AtomicU16,
}

async fn upstream(name: &str) -> Arc<Upstream> {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Arc::new(Upstream {
        name: name.to_owned(),
        addr: tcp.local_addr().unwrap(),
        hits: AtomicUsize::new(0),
        health_checks: AtomicUsize::new(0),
        healthy: AtomicBool::new(true),
        status: AtomicU16::new(200),
    });
    let u = Arc::clone(&up);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = tcp.accept().await else {
                return;
            };
            let u = Arc::clone(&u);
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let u = Arc::clone(&u);
                    async move {
                        let path = req.uri().path().to_owned();
                        let status = if path == "/health" {
                            u.health_checks.fetch_add(1, SeqCst);
                            if u.healthy.load(SeqCst) { 200 } else { 500 }
                        } else {
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            u.hits.fetch_add(1, SeqCst);
                            u.status.load(SeqCst)
                        };
                        let body = if path == "/forwarded" {
                            // What the LB said about the client, as the target saw it.
                            let all = |name: &str| {
                                req.headers()
                                    .get_all(name)
                                    .iter()
                                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            };
                            format!("{} | {}", all("x-forwarded-for"), all("x-forwarded-proto"))
                        } else {
                            u.name.clone()
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    up
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

async fn send(
    c: &TestClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(c: &TestClient, url: &str) -> Reply {
    send(c, "GET", url, &[], "").await
}

async fn lb(config: &str) -> (LbHandle, String, String) {
    let cfg = LbConfig::from_str(config).unwrap();
    let h = start(cfg, CancellationToken::new()).await.unwrap();
    let base = format!("http://{}", h.listeners[0].1);
    let admin = format!("http://{}", h.admin);
    (h, base, admin)
}

fn group(name: &str, targets: &[&Upstream], extra: &str) -> String {
    let extra = if extra.is_empty() {
        r#"health_check = { path = "/health" }"#
    } else {
        extra
    };
    let t: Vec<String> = targets.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!(
        "[[target_group]]\nname = \"{name}\"\ntargets = [{}]\nderegistration_delay = \"1s\"\n{extra}\n",
        t.join(", ")
    )
}

const LISTENER: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
default_action = { type = "fixed-response", status = 404, content_type = "text/plain", body = "no route" }
"#;

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn priority_fixed_response_and_redirect() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let cfg = format!(
        r#"{}{}{LISTENER}
[[listener.rule]]
name = "broad"
priority = 20
conditions = [{{ field = "path-pattern", values = ["/api/*"] }}]
action = {{ type = "forward", target_groups = [{{ name = "b" }}] }}

[[listener.rule]]
name = "narrow"
priority = 10
conditions = [{{ field = "path-pattern", values = ["/api/users*"] }}, {{ field = "http-request-method", values = ["GET"] }}]
action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}

[[listener.rule]]
name = "teapot"
priority = 5
conditions = [{{ field = "query-string", values = [{{ key = "tea", value = "y*" }}] }}]
action = {{ type = "fixed-response", status = 418, content_type = "application/json", body = "{{\"tea\":true}}" }}

[[listener.rule]]
name = "moved"
priority = 30
conditions = [{{ field = "host-header", values = ["OLD.example.com"] }}]
action = {{ type = "redirect", status = 301, host = "new.example.com", path = "/v2#{{path}}", protocol = "https", port = "443" }}
"#,
        group("a", &[&a], ""),
        group("b", &[&b], "")
    );
    let (h, base, _) = lb(&cfg).await;
    let c = client();
    assert_eq!(get(&c, &format!("{base}/api/users/7")).await.body, "a");
    let r = send(&c, "POST", &format!("{base}/api/users/7"), &[], "x").await;
    assert_eq!(r.body, "b", "method condition fails, next priority wins");
    assert_eq!(get(&c, &format!("{base}/api/orders")).await.body, "b");
    let r = get(&c, &format!("{base}/api/users?tea=Yes")).await;
    assert_eq!((r.status, r.body.as_str()), (418, "{\"tea\":true}"));
    assert_eq!(r.headers["content-type"], "application/json");
    let r = get(&c, &format!("{base}/nothing")).await;
    assert_eq!((r.status, r.body.as_str()), (404, "no route"));
    let r = send(
        &c,
        "GET",
        &format!("{base}/a/b?q=1"),
        &[("host", "old.example.com:8080")],
        "",
    )
    .await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://new.example.com/v2/a/b?q=1");
    h.shutdown().await;
}

#[tokio::test]
async fn weighted_split_within_three_percent() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let cfg = format!(
        r#"{}{}{LISTENER}
[[listener.rule]]
name = "split"
priority = 1
conditions = [{{ field = "path-pattern", values = ["/*"] }}]
action = {{ type = "forward", target_groups = [{{ name = "a", weight = 70 }}, {{ name = "b", weight = 30 }}] }}
"#,
        group("a", &[&a], ""),
        group("b", &[&b], "")
    );
    let (h, base, admin) = lb(&cfg).await;
    let c = client();
    const N: usize = 10_000;
    const WORKERS: usize = 16;
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (c, url) = (c.clone(), format!("{base}/x"));
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..N / WORKERS {
                if get(&c, &url).await.status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, N);
    let share_a = a.hits.load(SeqCst) as f64 / N as f64;
    assert!((share_a - 0.70).abs() <= 0.03, "share of a = {share_a}");
    assert_eq!(a.hits.load(SeqCst) + b.hits.load(SeqCst), N);
    let m = get(&c, &format!("{admin}/metrics")).await.body;
    assert!(
        m.contains(r#"trellis_lb_rule_requests_total{listener="web",rule="split"} 10000"#),
        "{m}"
    );
    assert!(m.contains(r#"trellis_lb_target_group_responses_total{class="2xx",target_group="a"}"#));
    assert!(m.contains("trellis_lb_target_group_request_duration_seconds_bucket"));
    h.shutdown().await;
}

#[tokio::test]
async fn failing_target_leaves_after_unhealthy_threshold_and_returns() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let hc = r#"health_check = { path = "/health", interval = "100ms", timeout = "100ms", healthy_threshold = 3, unhealthy_threshold = 2, matcher = "200-399" }"#;
    let cfg = format!(
        r#"{}{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "g" }}] }}
"#,
        group("g", &[&a, &b], hc)
    );
    let (h, base, admin) = lb(&cfg).await;
    let c = client();
    let healthy = |name: &'static str| {
        let (c, admin) = (c.clone(), admin.clone());
        async move {
            let v: serde_json::Value =
                serde_json::from_str(&get(&c, &format!("{admin}/v1/target_groups")).await.body)
                    .unwrap();
            v["g"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["healthy"].as_bool().unwrap())
                .collect::<Vec<_>>()[if name == "a" { 0 } else { 1 }]
        }
    };
    // Both serve while healthy.
    for _ in 0..10 {
        get(&c, &format!("{base}/")).await;
    }
    assert!(a.hits.load(SeqCst) > 0 && b.hits.load(SeqCst) > 0);

    b.healthy.store(false, SeqCst);
    let checks_before = b.health_checks.load(SeqCst);
    wait_until("b marked unhealthy", || {
        let f = healthy("b");
        async move { !f.await }
    })
    .await;
    let failed_checks = b.health_checks.load(SeqCst) - checks_before;
    assert!(
        failed_checks >= 2,
        "left after {failed_checks} failed checks, threshold is 2"
    );
    let hits_b = b.hits.load(SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("{base}/")).await.body, "a");
    }
    assert_eq!(b.hits.load(SeqCst), hits_b);

    b.healthy.store(true, SeqCst);
    let checks_before = b.health_checks.load(SeqCst);
    wait_until("b healthy again", || healthy("b")).await;
    let passed = b.health_checks.load(SeqCst) - checks_before;
    assert!(
        passed >= 3,
        "returned after {passed} passed checks, threshold is 3"
    );
    let mut seen_b = false;
    for _ in 0..20 {
        seen_b |= get(&c, &format!("{base}/")).await.body == "b";
    }
    assert!(seen_b);

    // All unhealthy: fail open to all and count it.
    a.healthy.store(false, SeqCst);
    b.healthy.store(false, SeqCst);
    wait_until("both unhealthy", || {
        let (fa, fb) = (healthy("a"), healthy("b"));
        async move { !fa.await && !fb.await }
    })
    .await;
    assert_eq!(get(&c, &format!("{base}/")).await.status, 200);
    let m = get(&c, &format!("{admin}/metrics")).await.body;
    assert!(
        m.contains(r#"trellis_lb_target_group_fail_open_total{target_group="g"} "#),
        "{m}"
    );
    assert!(!m.contains(r#"trellis_lb_target_group_fail_open_total{target_group="g"} 0"#));
    h.shutdown().await;
}

#[tokio::test]
async fn canary_crossing_error_threshold_rolls_back_by_itself() {
    let blue = upstream("blue").await;
    let green = upstream("green").await;
    green.status.store(503, SeqCst);
    let cfg = format!(
        r#"{}{}{LISTENER}
[[listener.rule]]
name = "api"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "blue", weight = 100 }}, {{ name = "green", weight = 0 }}] }}

[[deployment]]
name = "green-canary"
listener = "web"
rule = "api"
from = "blue"
to = "green"
strategy = {{ type = "canary", percent = 30, interval = "1h" }}
rollback = {{ window = "5s", max_5xx_rate = 0.1, min_requests = 10 }}
"#,
        group("blue", &[&blue], ""),
        group("green", &[&green], "")
    );
    let (h, base, admin) = lb(&cfg).await;
    let c = client();
    let deployment = || {
        let (c, admin) = (c.clone(), admin.clone());
        async move {
            let v: serde_json::Value =
                serde_json::from_str(&get(&c, &format!("{admin}/v1/deployments")).await.body)
                    .unwrap();
            v[0].clone()
        }
    };
    let d = deployment().await;
    assert_eq!(
        (d["percent"].as_u64(), d["phase"].as_str()),
        (Some(30), Some("shifting"))
    );
    // Traffic flows; green answers 503 and the deployment rolls itself back.
    let mut statuses = HashMap::new();
    for _ in 0..300 {
        *statuses
            .entry(get(&c, &format!("{base}/")).await.status)
            .or_insert(0) += 1;
        if deployment().await["phase"] == "rolled-back" {
            break;
        }
    }
    wait_until("rollback", || {
        let f = deployment();
        async move { f.await["phase"] == "rolled-back" }
    })
    .await;
    let d = deployment().await;
    assert_eq!(d["percent"].as_u64(), Some(0));
    assert!(d["reason"].as_str().unwrap().contains("5xx"), "{d}");
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 10,
        "{statuses:?}"
    );
    let green_hits = green.hits.load(SeqCst);
    for _ in 0..50 {
        assert_eq!(get(&c, &format!("{base}/")).await.body, "blue");
    }
    assert_eq!(green.hits.load(SeqCst), green_hits);
    let m = get(&c, &format!("{admin}/metrics")).await.body;
    assert!(
        m.contains(r#"trellis_lb_deployment_rollbacks_total{deployment="green-canary"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"trellis_lb_deployment_percent{deployment="green-canary"} 0"#));
    assert!(m.contains(r#"trellis_lb_deployment_phase{deployment="green-canary"} 3"#));
    h.shutdown().await;
}

#[tokio::test]
async fn live_weight_changes_under_load_fail_zero_requests() {
    let blue = upstream("blue").await;
    let green = upstream("green").await;
    let cfg = format!(
        r#"{}{}{LISTENER}
[[listener.rule]]
name = "api"
priority = 1
conditions = [{{ field = "path-pattern", values = ["/api/*"] }}]
action = {{ type = "forward", target_groups = [{{ name = "blue", weight = 100 }}, {{ name = "green", weight = 0 }}] }}
"#,
        group("blue", &[&blue], ""),
        group("green", &[&green], "")
    );
    let (h, base, admin) = lb(&cfg).await;
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (c, url, stop) = (c.clone(), format!("{base}/api/x"), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0usize, 0usize);
            while !stop.load(SeqCst) {
                if get(&c, &url).await.status == 200 {
                    ok += 1
                } else {
                    bad += 1
                }
            }
            (ok, bad)
        }));
    }
    let url = format!("{admin}/v1/listeners/web/rules/api/weights");
    for i in 0..=20u32 {
        let g = i * 5;
        let body = format!(r#"{{"blue": {}, "green": {g}}}"#, 100 - g);
        let r = send(
            &c,
            "PUT",
            &url,
            &[("content-type", "application/json")],
            &body,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, SeqCst);
    let (mut ok, mut bad) = (0, 0);
    for t in load {
        let (o, b) = t.await.unwrap();
        ok += o;
        bad += b;
    }
    assert_eq!(bad, 0, "{ok} ok, {bad} failed");
    assert!(ok > 100);
    assert!(blue.hits.load(SeqCst) > 0 && green.hits.load(SeqCst) > 0);
    // Now all on green.
    assert_eq!(get(&c, &format!("{base}/api/x")).await.body, "green");
    let cfg: serde_json::Value =
        serde_json::from_str(&get(&c, &format!("{admin}/config")).await.body).unwrap();
    assert_eq!(cfg["live"][0]["rules"][0]["weights"]["green"], 100);

    // Bad weight updates get their status and change nothing.
    let put = |u: String, b: &'static str| {
        let c = c.clone();
        async move { send(&c, "PUT", &u, &[], b).await.status }
    };
    assert_eq!(put(url.clone(), r#"{"blue": 0, "green": 0}"#).await, 400);
    assert_eq!(put(url.clone(), r#"{"blue": 1000}"#).await, 400);
    assert_eq!(put(url.clone(), r#"{"purple": 1}"#).await, 400);
    assert_eq!(put(url.clone(), "not json").await, 400);
    assert_eq!(
        put(
            format!("{admin}/v1/listeners/web/rules/nope/weights"),
            r#"{"blue": 1}"#
        )
        .await,
        404
    );
    assert_eq!(
        put(
            format!("{admin}/v1/listeners/nope/rules/api/weights"),
            r#"{"blue": 1}"#
        )
        .await,
        404
    );
    assert_eq!(get(&c, &format!("{base}/api/x")).await.body, "green");
    h.shutdown().await;
}

#[tokio::test]
async fn refused_connect_goes_to_another_target() {
    let a = upstream("a").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = format!(
        r#"
[[target_group]]
name = "g"
targets = ["{dead}", "{}"]
health_check = {{ path = "/health", interval = "1h", timeout = "1s" }}
{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "g" }}] }}
"#,
        a.addr
    );
    let (h, base, _) = lb(&cfg).await;
    let c = client();
    for _ in 0..20 {
        let r = get(&c, &format!("{base}/")).await;
        assert_eq!((r.status, r.body.as_str()), (200, "a"));
    }
    // A request with a body is not replayed: it may fail, but gets the gateway's status.
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..4 {
        statuses.insert(
            send(&c, "POST", &format!("{base}/"), &[], "payload")
                .await
                .status,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 502),
        "{statuses:?}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn config_reload_swaps_rules_and_refuses_structural_changes() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let rules = |listen: &str, path: &str, wa: u32, wb: u32| {
        format!(
            r#"{}{}
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "{listen}"
default_action = {{ type = "fixed-response", status = 404 }}

[[listener.rule]]
name = "r"
priority = 1
conditions = [{{ field = "path-pattern", values = ["{path}"] }}]
action = {{ type = "forward", target_groups = [{{ name = "a", weight = {wa} }}, {{ name = "b", weight = {wb} }}] }}
"#,
            group("a", &[&a], ""),
            group("b", &[&b], "")
        )
    };
    let (h, base, admin) = lb(&rules("127.0.0.1:0", "/one/*", 1, 0)).await;
    let bound = h.listeners[0].1.to_string();
    let c = client();
    assert_eq!(get(&c, &format!("{base}/one/x")).await.body, "a");
    assert_eq!(get(&c, &format!("{base}/two/x")).await.status, 404);
    // A reload that moves the listener is refused; one that keeps it applies.
    let cfg = |s: &str| LbConfig::from_str(s).unwrap();
    let err = h
        .reloader()
        .reload(cfg(&rules("127.0.0.1:1", "/two/*", 0, 1)))
        .unwrap_err();
    assert!(err.to_string().contains("listeners changed"), "{err}");
    h.reloader()
        .reload(cfg(&rules(&bound, "/two/*", 0, 1)))
        .unwrap();
    assert_eq!(get(&c, &format!("{base}/two/x")).await.body, "b");
    assert_eq!(get(&c, &format!("{base}/one/x")).await.status, 404);
    // Over the admin API; a bad config is refused with its message and changes nothing.
    let url = format!("{admin}/v1/reload");
    let r = send(&c, "POST", &url, &[], &rules(&bound, "/two/*", 0, 0)).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("weights are zero"), "{}", r.body);
    assert_eq!(get(&c, &format!("{base}/two/x")).await.body, "b");
    let r = send(&c, "POST", &url, &[], &rules(&bound, "/three/*", 1, 0)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(&c, &format!("{base}/three/x")).await.body, "a");
    let renamed = rules(&bound, "/three/*", 1, 0)
        .replace("name = \"b\"", "name = \"c\"")
        .replace("{ name = \"b\",", "{ name = \"c\",");
    let r = send(&c, "POST", &url, &[], &renamed).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("target groups changed"), "{}", r.body);
    h.shutdown().await;
}

#[tokio::test]
async fn admin_ready_and_drain_on_shutdown() {
    let a = upstream("a").await;
    let cfg = format!(
        r#"{}{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}
"#,
        group("a", &[&a], "")
    );
    let (h, base, admin) = lb(&cfg).await;
    let c = client();
    assert_eq!(get(&c, &format!("{admin}/ready")).await.status, 200);
    assert_eq!(get(&c, &format!("{admin}/nope")).await.status, 404);
    // An in-flight request finishes while the LB drains.
    let slow = {
        let (c, url) = (c.clone(), format!("{base}/slow"));
        tokio::spawn(async move { get(&c, &url).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lb_addr = h.listeners[0].1;
    h.shutdown().await;
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
    assert!(
        tokio::net::TcpStream::connect(lb_addr).await.is_err(),
        "listener closed after drain"
    );
}

/// One listener whose only rule forwards everything to group `a` (target `a`), with `limits`.
fn all_to_a(a: &Upstream, limits: &str) -> String {
    format!(
        r#"{}
[limits]
{limits}
{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}
"#,
        group("a", &[a], "")
    )
}

#[tokio::test]
async fn forwarded_for_appends_and_forwarded_proto_replaces() {
    let a = upstream("a").await;
    let (_h, base, _) = lb(&all_to_a(&a, "")).await;
    let c = client();
    let url = format!("{base}/forwarded");
    // Bodiless (the LB's own HTTP/1.1 loop) and with a body (handed to hyper) alike.
    for (method, body) in [("GET", ""), ("POST", "x")] {
        let plain = send(&c, method, &url, &[], body).await;
        assert_eq!(plain.body, "127.0.0.1 | http", "{method}");
        let spoofed = send(
            &c,
            method,
            &url,
            &[
                ("x-forwarded-for", "10.0.0.1"),
                ("X-Forwarded-Proto", "https"),
            ],
            body,
        )
        .await;
        assert_eq!(spoofed.body, "10.0.0.1,127.0.0.1 | http", "{method}");
    }
}

#[tokio::test]
async fn a_slow_target_gets_504_at_the_request_timeout() {
    let a = upstream("a").await;
    let cfg = all_to_a(&a, "request_timeout = \"100ms\"");
    let (_h, base, _) = lb(&cfg).await;
    let c = client();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        // The target answers `/slow` after 400 ms.
        assert_eq!(get(&c, &format!("{base}/slow")).await.status, 504);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(390), "answered after {took:?}");
        assert_eq!(get(&c, &format!("{base}/")).await.status, 200);
    }
}

#[tokio::test]
async fn header_limits_and_slowloris() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = upstream("a").await;
    let cfg = all_to_a(
        &a,
        "header_read_timeout = \"300ms\"\nmax_header_bytes = 8192",
    );
    let (h, base, _) = lb(&cfg).await;
    let addr = h.listeners[0].1;
    // Oversized head: refused with 431, not forwarded.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let big = "x".repeat(20_000);
    let req = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Slowloris: a head that never completes is cut off after the header read timeout.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "slow client not disconnected");
    assert_eq!(a.hits.load(SeqCst), 0);
    // The LB still serves.
    assert_eq!(get(&client(), &format!("{base}/")).await.body, "a");
    h.shutdown().await;
}

#[tokio::test]
async fn http2_cleartext_and_sticky_cookie() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let cfg = format!(
        r#"{}{}{LISTENER}
[[listener.rule]]
name = "sticky"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "a", weight = 1 }}, {{ name = "b", weight = 1 }}], stickiness = "10m" }}
"#,
        group("a", &[&a], ""),
        group("b", &[&b], "")
    );
    let (h, base, _) = lb(&cfg).await;
    let h2: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let r = get(&h2, &format!("{base}/")).await;
    assert_eq!(r.status, 200);
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("TRELLISTG={}", r.body)),
        "{cookie}"
    );
    assert!(cookie.contains("Max-Age=600"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    for _ in 0..20 {
        let again = send(&h2, "GET", &format!("{base}/"), &[("cookie", &pair)], "").await;
        assert_eq!(again.body, r.body);
        assert!(!again.headers.contains_key("set-cookie"));
    }
    h.shutdown().await;
}

fn tool(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || std::process::Command::new(name)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("TRELLIS_REQUIRE_TOOLS").is_some() {
        panic!("{name} is required (TRELLIS_REQUIRE_TOOLS=1) but missing");
    }
    found
}

#[tokio::test]
async fn https_listener_with_files_serves_h2_to_curl() {
    if !tool("openssl") || !tool("curl") {
        eprintln!("skipping: openssl or curl not on PATH");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=lb.test",
            "-addext",
            "subjectAltName=DNS:lb.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let a = upstream("a").await;
    let cfg = format!(
        r#"{}
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
protocol = "https"
tls = {{ cert = "{}", key = "{}" }}
default_action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}
"#,
        group("a", &[&a], ""),
        cert.display(),
        key.display()
    );
    let h = start(LbConfig::from_str(&cfg).unwrap(), CancellationToken::new())
        .await
        .unwrap();
    let port = h.listeners[0].1.port();
    assert_eq!(curl_h2(&cert, "lb.test", port).await, "a 2");
    h.shutdown().await;
}

/// `curl --http2` to `https://<name>:<port>/hello` on loopback trusting `cacert`: body and
/// HTTP version.
async fn curl_h2(cacert: &Path, name: &str, port: u16) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert"])
        .arg(cacert)
        .args([
            "--resolve",
            &format!("{name}:{port}:127.0.0.1"),
            "-w",
            " %{http_version}",
        ])
        .arg(format!("https://{name}:{port}/hello"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn targets_from_discovery_watch() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    // A fake discovery server: revision 1 → a; any later watch → b (revision 2).
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let disc = tcp.local_addr().unwrap();
    let (aa, ba) = (a.addr, b.addr);
    let watches = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&watches);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = tcp.accept().await else {
                return;
            };
            let w = Arc::clone(&w);
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let w = Arc::clone(&w);
                    async move {
                        assert!(req.uri().path() == "/v1/watch/my-app.local/api");
                        let q = req.uri().query().unwrap_or("").to_owned();
                        w.fetch_add(1, SeqCst);
                        let (rev, addr) = if q.contains("revision=0") {
                            (1, aa)
                        } else {
                            if q.contains("revision=2") {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            (2, ba)
                        };
                        let body = format!(
                            r#"{{"namespace":"my-app.local","service":"api","revision":{rev},"endpoints":[{{"instance_id":"i","address":"{}","port":{},"health":"HEALTHY"}}]}}"#,
                            addr.ip(),
                            addr.port()
                        );
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    let cfg = format!(
        r#"
[[target_group]]
name = "api"
discovery = {{ url = "http://{disc}", namespace = "my-app.local", service = "api" }}
deregistration_delay = "100ms"
{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "api" }}] }}
"#
    );
    let (h, base, _) = lb(&cfg).await;
    let c = client();
    wait_until("b from discovery serves", || {
        let (c, base) = (c.clone(), base.clone());
        async move { get(&c, &format!("{base}/")).await.body == "b" }
    })
    .await;
    assert!(watches.load(SeqCst) >= 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(get(&c, &format!("{base}/")).await.body, "b");
    }
    h.shutdown().await;
}

#[test]
fn cli_check_names_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        r#"
[[target_group]]
name = "a"
targets = ["127.0.0.1:1"]
[[listener]]
name = "web"
listen = "127.0.0.1:0"
default_action = { type = "fixed-response", status = 404 }
[[listener.rule]]
name = "r1"
priority = 3
action = { type = "forward", target_groups = [{ name = "a", weight = 0 }] }
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args(["lb", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"listener "web" rule "r1""#) && err.contains("weights are zero"),
        "{err}"
    );
    let ok = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lb/example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args(["lb", "--check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn binary_serves_then_drains_on_sigterm() {
    serves_then_drains(None).await;
}

/// `TOKIO_WORKER_THREADS=1`: the LB runs on a current-thread runtime; it serves and drains alike.
#[tokio::test]
async fn binary_on_one_worker_serves_then_drains_on_sigterm() {
    serves_then_drains(Some("1")).await;
}

async fn serves_then_drains(workers: Option<&str>) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let a = upstream("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.toml");
    let cfg = format!(
        r#"{}{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}
"#,
        group("a", &[&a], "")
    );
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"));
    cmd.args(["lb", "--config"])
        .arg(&path)
        .env("TRELLIS_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("TOKIO_WORKER_THREADS");
    if let Some(n) = workers {
        cmd.env("TOKIO_WORKER_THREADS", n);
    }
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("lb started") {
                return line;
            }
        }
        panic!("exited before starting");
    })
    .await
    .unwrap();
    // `... listeners=[("web", 127.0.0.1:P)] admin=127.0.0.1:Q lb started`
    let addr_after = |key: &str| -> String {
        let rest = &started[started.find(key).unwrap() + key.len()..];
        rest.chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect()
    };
    let admin = format!("http://{}", addr_after("admin="));
    let base = format!("http://{}", addr_after("\"web\", "));
    let c = client();
    assert_eq!(get(&c, &format!("{admin}/ready")).await.status, 200);
    assert_eq!(get(&c, &format!("{base}/x")).await.body, "a");
    let slow = {
        let (c, url) = (c.clone(), format!("{base}/slow"));
        tokio::spawn(async move { get(&c, &url).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = slow.await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "a"),
        "in-flight request finished"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A TLS connection to the LB that trusts only `roots`; returns it and the leaf it was shown.
async fn tls_to_lb(
    port: u16,
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    rustls_pki_types::CertificateDer<'static>,
) {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("lb.my-app.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (send, leaf)
}

async fn get_on(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> String {
    let req = http::Request::get("/hello")
        .header("host", "lb.my-app.local")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test]
async fn https_listener_with_a_certificate_from_the_built_in_ca() {
    if !tool("openssl") || !tool("curl") {
        eprintln!("skipping: openssl or curl not on PATH");
        return;
    }
    // The real control plane with its CA, and a join token scoped to the LB's workload name.
    let dir = tempfile::tempdir().unwrap();
    let token = cp_fixtures::ca_with_tokens(dir.path(), &[("my-app.local", "lb")]).remove(0);
    let mut cp_cfg = trellis_discovery::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cp_cfg.data_dir = Some(dir.path().to_owned());
    let cp = trellis_discovery::Server::start(cp_cfg).await.unwrap();
    let cp_addr = cp.api_addr;
    // A replica listed first that is down: the certificate comes from the next one.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let a = upstream("a").await;
    let listener = |dns: &str, extra: &str| {
        format!(
            r#"{}
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
protocol = "https"
tls = {{ source = "ca", control_plane = ["{dead}", "{cp_addr}"], token = "{token}", dns_names = ["{dns}"]{extra} }}
default_action = {{ type = "forward", target_groups = [{{ name = "a" }}] }}
"#,
            group("a", &[&a], ""),
        )
    };

    // A name the CA will not certify fails the start, naming the listener and the field.
    let err = start(
        LbConfig::from_str(&listener("lb.example.com", "")).unwrap(),
        CancellationToken::new(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("tls") && err.contains("dns_names"), "{err}");

    // Short-lived certificates so the test sees a renewal.
    let h = start(
        LbConfig::from_str(&listener("lb.my-app.local", r#", ttl = "3s""#)).unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let port = h.listeners[0].1.port();

    // The CA's bundle, as a user would fetch it.
    let roots_pem = {
        let resp = Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>()
            .request(
                http::Request::get(format!("http://{cp_addr}/v1/ca/roots"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    };
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &roots_pem).unwrap();

    // curl verifies the chain and the name against the bundle.
    assert_eq!(curl_h2(&bundle, "lb.my-app.local", port).await, "a 2");

    // openssl shows the chain: leaf (SPIFFE id + DNS name) signed by the CA's intermediate.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-showcerts", "-verify_return_error", "-CAfile"])
        .arg(&bundle)
        .args([
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "lb.my-app.local",
            "-verify_hostname",
            "lb.my-app.local",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let chain_len = text.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(chain_len >= 2, "leaf and intermediate expected:\n{text}");

    // Rotation: a connection opened on the first certificate keeps working after new handshakes
    // get a renewed one.
    let roots = trellis_ca::parse_certs(&roots_pem).unwrap();
    let (mut old_conn, first_leaf) = tls_to_lb(port, &roots).await;
    assert_eq!(get_on(&mut old_conn).await, "a");
    let mut renewed = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut c, leaf) = tls_to_lb(port, &roots).await;
        if leaf != first_leaf {
            assert_eq!(get_on(&mut c).await, "a");
            renewed = true;
            break;
        }
    }
    assert!(renewed, "no renewed certificate within 8 s");
    assert_eq!(get_on(&mut old_conn).await, "a", "open connection survives");
    h.shutdown().await;
    cp.shutdown().await;
}

/// An HTTPS control plane (`--api-tls`) for both of the LB's uses of it: the listener's
/// certificate (token over HTTPS, `tls.control_plane_tls`) and a target group's watch (an
/// `https://` url); both verify the control plane against the pinned `root.crt`.
#[tokio::test]
async fn https_control_plane_for_the_listener_certificate_and_the_watch() {
    if !tool("curl") {
        eprintln!("skipping: curl not on PATH");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = cp_fixtures::ca_with_tokens(dir.path(), &[("my-app.local", "lb")]).remove(0);
    let mut cp_cfg = trellis_discovery::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cp_cfg.data_dir = Some(dir.path().to_owned());
    cp_cfg.api_tls = Some(trellis_discovery::ApiTls::default());
    let cp = trellis_discovery::Server::start(cp_cfg).await.unwrap();
    let cp_addr = cp.api_addr;
    let root = dir.path().join("ca").join("root.crt");
    let https = cp_fixtures::https_transport(&root);
    let svc = cp_fixtures::namespace_with_services(&https, cp_addr, "my-app.local", &["api"]).await
        [0]["Id"]
        .clone();
    let a = upstream("a").await;
    cp_fixtures::call(
        &https,
        cp_addr,
        "RegisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": "a", "Attributes": {
            "AWS_INSTANCE_IPV4": a.addr.ip().to_string(), "AWS_INSTANCE_PORT": a.addr.port().to_string()}}),
    )
    .await;

    let root_s = root.display();
    let cfg = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[target_group]]
name = "api"
discovery = {{ url = "https://{cp_addr}", trust_bundle = "{root_s}", namespace = "my-app.local", service = "api" }}
health_check = {{ enabled = false }}

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
protocol = "https"
tls = {{ source = "ca", control_plane = "localhost:{port}", control_plane_tls = true, trust_bundle = "{root_s}", token = "{token}", dns_names = ["lb.my-app.local"] }}
default_action = {{ type = "forward", target_groups = [{{ name = "api" }}] }}
"#,
        port = cp_addr.port()
    );
    let h = start(LbConfig::from_str(&cfg).unwrap(), CancellationToken::new())
        .await
        .unwrap();
    let port = h.listeners[0].1.port();
    let mut served = String::new();
    for _ in 0..100 {
        served = curl_h2(&root, "lb.my-app.local", port).await;
        if served.starts_with("a ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, "a 2");
    h.shutdown().await;

    // Without the pinned roots, an https:// watch is refused at start, naming the group.
    let unpinned = cfg.replace(
        &format!(r#", trust_bundle = "{root_s}", namespace"#),
        ", namespace",
    );
    let err = LbConfig::from_str(&unpinned).unwrap().compile().err();
    let err = format!("{err:?}");
    assert!(err.contains("trust_bundle"), "{err}");
    cp.shutdown().await;
}

/// `trellis-discovery serve --store etcd` as a process, SIGKILLed by `kill` or on drop.
struct Replica {
    child: std::process::Child,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(etcd: &trellis_test_support::etcd::EtcdCluster, prefix: &str) -> Replica {
        use trellis_test_support::bins;
        let dir = tempfile::tempdir().unwrap();
        let (child, line) = bins::spawn_reading_first_line(
            std::process::Command::new(bins::binary("trellis-discovery", "trellis-discovery"))
                .args(["serve", "--api-listen", "127.0.0.1:0", "--dns-listen"])
                .args(["127.0.0.1:0", "--store", "etcd", "--etcd-prefix", prefix])
                .arg("--etcd-endpoints")
                .arg(etcd.endpoints())
                .arg("--data-dir")
                .arg(dir.path())
                .env("RUST_LOG", "error")
                .stderr(std::process::Stdio::null()),
        )
        .unwrap();
        Replica {
            api: bins::discovery_api(&line).unwrap(),
            child,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One Cloud Map call that must succeed.
async fn cloud_map(
    c: &TestClient,
    at: SocketAddr,
    action: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let target = format!("Route53AutoNaming_v20170314.{action}");
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target.as_str()),
    ];
    let r = send(
        c,
        "POST",
        &format!("http://{at}/"),
        &headers,
        &body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{action}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_target_group_fails_over_between_control_plane_replicas() {
    use serde_json::json;
    let Some(etcd) = trellis_test_support::etcd::EtcdCluster::start(1) else {
        return;
    };
    let (mut a, b) = (Replica::start(&etcd, "/lb/"), Replica::start(&etcd, "/lb/"));
    let c = client();
    let op = cloud_map(
        &c,
        a.api,
        "CreateHttpNamespace",
        json!({"Name": "lb.local"}),
    )
    .await;
    let got = cloud_map(
        &c,
        a.api,
        "GetOperation",
        json!({"OperationId": op["OperationId"]}),
    )
    .await;
    let ns = &got["Operation"]["Targets"]["NAMESPACE"];
    let svc = cloud_map(
        &c,
        a.api,
        "CreateService",
        json!({"Name": "api", "NamespaceId": ns}),
    )
    .await["Service"]["Id"]
        .clone();
    let register = |via: SocketAddr, id: &'static str, at: SocketAddr| {
        let c = c.clone();
        let body = json!({"ServiceId": svc, "InstanceId": id, "Attributes": {
            "AWS_INSTANCE_IPV4": at.ip().to_string(), "AWS_INSTANCE_PORT": at.port().to_string()}});
        async move { cloud_map(&c, via, "RegisterInstance", body).await }
    };
    let one = upstream("one").await;
    register(a.api, "one", one.addr).await;

    let cfg = format!(
        r#"
[[target_group]]
name = "api"
discovery = {{ addresses = ["{}", "{}"], namespace = "lb.local", service = "api" }}
deregistration_delay = "100ms"
health_check = {{ enabled = false }}
{LISTENER}
[[listener.rule]]
name = "all"
priority = 1
action = {{ type = "forward", target_groups = [{{ name = "api" }}] }}
"#,
        a.api, b.api
    );
    let (h, base, _) = lb(&cfg).await;
    wait_until("the LB serves the registered target", || {
        let (c, base) = (c.clone(), base.clone());
        async move { get(&c, &format!("{base}/")).await.body == "one" }
    })
    .await;

    // Replica A dies: every request is still served (last snapshot, then B).
    a.kill();
    let t = std::time::Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(2) {
        let r = get(&c, &format!("{base}/")).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "one"),
            "request {served}"
        );
        served += 1;
    }
    // The watch resumed on B: a registration made there reaches the LB.
    let two = upstream("two").await;
    register(b.api, "two", two.addr).await;
    wait_until("the LB follows replica B", || {
        let (c, base) = (c.clone(), base.clone());
        async move { get(&c, &format!("{base}/")).await.body == "two" }
    })
    .await;
    eprintln!("{served} requests served while replica A was down");
    h.shutdown().await;
}
