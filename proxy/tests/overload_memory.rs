//! The memory-pressure guard against a real sidecar in this process: with a budget just above
//! the current RSS, a burst of allocation first stops new connections (closed at accept), then
//! sheds new requests on open connections with 503 + Retry-After, while the admin port answers
//! and its metrics show the level; freeing the memory brings service back.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::overload::{Pressure, pressure, rss_bytes};

async fn until(what: &str, want: Pressure) {
    for _ in 0..100 {
        if pressure() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{what}: pressure stayed {:?}, rss {:?}",
        pressure(),
        rss_bytes()
    );
}

/// One request on an open keep-alive connection; returns the response head.
async fn on(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

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
    assert!(on(&mut open).await.starts_with("HTTP/1.1 200"));
    until("idle", Pressure::Normal).await;

    // ~92% of the budget: no new connections; the open one is still served.
    let headroom = (budget << 20).saturating_sub(rss_bytes().unwrap()) >> 20;
    let first = touch((headroom as usize).saturating_sub(budget as usize * 8 / 100));
    until("past 90%", Pressure::StopAccepting).await;
    let mut fresh = TcpStream::connect(port).await.unwrap();
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a new connection is closed at accept");
    assert!(on(&mut open).await.starts_with("HTTP/1.1 200"));

    // Over budget: new requests on open connections are shed with 503 + Retry-After.
    let second = touch(budget as usize * 12 / 100);
    until("over budget", Pressure::ShedRequests).await;
    let shed = on(&mut open).await;
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );

    // The admin port is never shed; its metrics show the guard.
    let mut admin = TcpStream::connect(sc.admin_addr).await.unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    admin.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("trellis_proxy_overload_level 2"), "{text}");
    assert!(text.contains(r#"trellis_proxy_overload_shed_total{work="connection"} 1"#));
    assert!(text.contains(r#"trellis_proxy_overload_shed_total{work="request"} 1"#));

    // Memory freed: service comes back.
    drop((first, second));
    until("relieved", Pressure::Normal).await;
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
    stop.cancel();
    sc.wait().await;
}
