//! The memory-pressure guard against a real sidecar in this process: with a budget just above
//! the current RSS, a burst of allocation first stops new connections (closed at accept), then
//! sheds new requests on open connections with 503 + Retry-After, while the admin port answers
//! and its metrics show the level; freeing the memory brings service back.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;
use tokio::net::TcpStream;
use trellis_proxy::overload::{Pressure, rss_bytes};

fn touch(mib: usize) -> Vec<u8> {
    // Written, so the pages are resident.
    vec![7u8; mib << 20]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_stops_accepting_then_sheds_requests() {
    let a = app("a", None).await;
    let now_mib = rss_bytes().unwrap() >> 20;
    let budget = now_mib + 200;
    let toml = format!(
        "{}\n[limits]\nmax_rss_mb = {budget}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{}\" }}]\n",
        base(),
        a.addr
    );
    let (sc, stop) = sidecar(&toml).await;
    let port = sc.upstream_addrs["api"];
    let mut open = TcpStream::connect(port).await.unwrap();
    assert!(on(&mut open, "api").await.starts_with("HTTP/1.1 200"));
    until_pressure("idle", Pressure::Normal).await;

    // ~92% of the budget: no new connections; the open one is still served.
    let headroom = (budget << 20).saturating_sub(rss_bytes().unwrap()) >> 20;
    let first = touch((headroom as usize).saturating_sub(budget as usize * 8 / 100));
    until_pressure("past 90%", Pressure::StopAccepting).await;
    assert_closed_at_accept(port).await;
    assert!(on(&mut open, "api").await.starts_with("HTTP/1.1 200"));

    // Over budget: new requests on open connections are shed with 503 + Retry-After.
    let second = touch(budget as usize * 12 / 100);
    until_pressure("over budget", Pressure::ShedRequests).await;
    assert_shed(&mut open, "api").await;

    // The admin port is never shed; its metrics show the guard.
    let text = admin_metrics(sc.admin_addr).await;
    assert!(text.contains("trellis_proxy_overload_level 2"), "{text}");
    assert!(text.contains(r#"trellis_proxy_overload_shed_total{work="connection"} 1"#));
    assert!(text.contains(r#"trellis_proxy_overload_shed_total{work="request"} 1"#));

    // Memory freed: service comes back.
    drop((first, second));
    until_pressure("relieved", Pressure::Normal).await;
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
    stop.cancel();
    sc.wait().await;
}
