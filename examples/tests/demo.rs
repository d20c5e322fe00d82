//! The README's main job, tested: the demo mesh starts on loopback, a request through the LB crosses
//! web → api → users over mTLS with SPIFFE identities, the canary gets about 10% of /api, DNS answers
//! healthy instances, and a killed instance leaves DNS and the endpoint sets while requests succeed.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use trellis_examples::demo::{self, DemoOptions, NAMESPACE, http_get};
use trellis_test_support::tools;

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn dig(dns: SocketAddr, name: &str) -> Option<Vec<String>> {
    let dig = tools::require("dig", "DNS answers of the demo")?;
    let out = Command::new(dig)
        .args([
            &format!("@{}", dns.ip()),
            "-p",
            &dns.port().to_string(),
            name,
            "A",
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .output()
        .expect("run dig");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    Some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mesh_end_to_end() {
    let mut mesh = demo::start(DemoOptions {
        api_listen: any_port(),
        dns_listen: any_port(),
        lb_listen: any_port(),
        data_dir: None,
        progress: false,
    })
    .await
    .expect("demo starts");
    assert!(mesh.banner().contains(&format!("http://{}/", mesh.lb_addr)));

    // web → api → users, each hop authenticated by SPIFFE id.
    let (status, body) = http_get(mesh.lb_addr, "/").await.expect("LB answers");
    assert_eq!(status, 200, "{body}");
    for hop in [
        "By=spiffe://mesh.local/ns/my-app.local/svc/web;URI=spiffe://mesh.local/ns/my-app.local/svc/lb",
        "URI=spiffe://mesh.local/ns/my-app.local/svc/web",
        "\"service\":\"users\"",
    ] {
        assert!(body.contains(hop), "missing {hop} in {body}");
    }

    // The 90/10 canary split at the LB.
    let mut canary = 0;
    for _ in 0..200 {
        let (status, body) = http_get(mesh.lb_addr, "/api/orders").await.expect("LB");
        assert_eq!(status, 200, "{body}");
        if body.contains("\"version\":\"v2\"") {
            canary += 1;
        }
    }
    assert!((5..=40).contains(&canary), "canary got {canary}/200");

    // DNS answers the healthy api instances (all on loopback; SRV carries their ports).
    let dns = mesh.dns_addr().expect("dns");
    if let Some(a) = dig(dns, &format!("api.{NAMESPACE}")) {
        assert!(
            !a.is_empty() && a.iter().all(|ip| ip == "127.0.0.1"),
            "{a:?}"
        );
    }

    // Kill api-2: it leaves Cloud Map's healthy set and the watch set; requests keep succeeding.
    let t0 = Instant::now();
    mesh.kill("api-2").expect("api-2 exists");
    let mut failed = 0;
    loop {
        for _ in 0..4 {
            if !matches!(http_get(mesh.lb_addr, "/api/x").await, Some((200, _))) {
                failed += 1;
            }
        }
        let healthy = mesh
            .cloudmap()
            .healthy_instances(NAMESPACE, "api")
            .await
            .unwrap();
        let watch = http_get(mesh.api_addr(), &format!("/v1/watch/{NAMESPACE}/api"))
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if healthy == ["api-1"] && !watch.contains("api-2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "api-2 still listed: {healthy:?} {watch}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed, 0, "requests failed while api-2 died");
    mesh.shutdown().await;
}
