//! The sidecar over real sockets on loopback: apps, a fake control plane, real HTTP clients.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_core::HealthStatus;

fn static_upstream(extra_resilience: &str, endpoints: &[std::net::SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "{}{extra_resilience}\n[outbound]\negress_listen = \"127.0.0.1:0\"\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{}]\n",
        base(),
        eps.join(", ")
    )
}

#[tokio::test]
async fn http1_and_http2_stream_large_and_chunked_bodies() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("", &[a.addr])).await;
    let port = sc.upstream_addrs["api"];

    // HTTP/1.1 with a chunked (streamed, unknown length) 4 MiB body.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let chunks: Vec<Result<http_body::Frame<Bytes>, hyper::Error>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let stream = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let req = Request::post(format!("http://{port}/echo"))
        .body(stream.boxed())
        .unwrap();
    let resp = h1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(back.len(), data.len());
    assert!(back == data);

    // HTTP/2 (prior knowledge) with a sized body.
    let req = Request::post(format!("http://{port}/echo"))
        .body(body(data.clone()))
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), data);

    // Many small keep-alive requests over both.
    for c in [h1_client(), h2_client()] {
        for _ in 0..20 {
            let (s, backend, _) = get(&c, &format!("http://{port}/")).await;
            assert_eq!((s, backend.as_str()), (200, "a"));
        }
    }
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn egress_routes_by_host() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("", &[a.addr])).await;
    let egress = sc.egress_addr.unwrap();
    let c = h1_client();
    for host in ["api", "api.my-app.local", "API.my-app.local:80"] {
        let req = Request::get(format!("http://{egress}/"))
            .header("host", host)
            .body(body(""))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{host}");
    }
    let req = Request::get(format!("http://{egress}/"))
        .header("host", "nope.local")
        .body(body(""))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().status(), 404);
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn upgrade_is_relayed() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("", &[a.addr])).await;
    let port = sc.upstream_addrs["api"];
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(b"hello through the tunnel").await.unwrap();
    let mut echo = vec![0u8; 24];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello through the tunnel");
    drop(s);
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn tcp_upstream_relays_large_streams() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let toml = format!(
        "{}\n[outbound]\nupstreams = [{{ service = \"db\", local_port = 0, protocol = \"tcp\", danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"db\"\nendpoints = [{{ address = \"{echo_addr}\" }}]\n",
        base()
    );
    let (sc, stop) = sidecar(&toml).await;
    let port = sc.upstream_addrs["db"];
    let data: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 249) as u8).collect();
    let (mut r, mut w) = TcpStream::connect(port).await.unwrap().into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(
        back == data,
        "relayed {} of {} bytes",
        back.len(),
        data.len()
    );
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn retries_hide_a_failing_endpoint() {
    let good = app("good", None).await;
    let bad = app("bad", Some(503)).await;
    // A closed port: connect refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // Outlier ejection off, so every request meets the bad endpoints and must be retried.
    let (sc, stop) = sidecar(&static_upstream(
        "outlier_consecutive_5xx = 0\nretry_budget_min_per_sec = 1000",
        &[good.addr, bad.addr, closed],
    ))
    .await;
    let port = sc.upstream_addrs["api"];
    let c = h1_client();
    for _ in 0..30 {
        let (s, backend, _) = get(&c, &format!("http://{port}/")).await;
        assert_eq!((s, backend.as_str()), (200, "good"));
    }
    assert!(
        bad.hits.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the bad endpoint was tried"
    );
    // A retried request arrives whole: the same path, query and headers as the first try (two
    // of three first tries meet the bad or the closed endpoint).
    for _ in 0..12 {
        let req = Request::get(format!("http://{port}/headers?q=1"))
            .header("x-probe", "kept")
            .body(body(""))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let echoed = resp.into_body().collect().await.unwrap().to_bytes();
        let echoed = String::from_utf8_lossy(&echoed);
        assert!(echoed.contains("x-probe: kept"), "{echoed}");
    }
    // Non-idempotent requests are not retried.
    let mut saw_failure = false;
    for _ in 0..6 {
        let req = Request::post(format!("http://{port}/"))
            .body(body("x"))
            .unwrap();
        saw_failure |= c.request(req).await.unwrap().status() != 200;
    }
    assert!(saw_failure, "POST must not be retried");
    let metrics = get(&c, &format!("http://{}/metrics", sc.admin_addr))
        .await
        .2;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("trellis_proxy_upstream_retries_total{upstream=\"api\"}"),
        "{metrics}"
    );
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn a_slow_upstream_gets_504_at_the_per_try_timeout_and_the_next_request_is_served() {
    let a = app("a", None).await;
    // The shared test config's per-try timeout is 2 s: 100 ms here.
    let config = static_upstream("max_retries = 0", &[a.addr])
        .replace("per_try_timeout = \"2s\"", "per_try_timeout = \"100ms\"");
    assert!(config.contains("per_try_timeout = \"100ms\""));
    let (sc, stop) = sidecar(&config).await;
    let port = sc.upstream_addrs["api"];
    let c = h1_client();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        // The app answers `/slow` after 400 ms.
        assert_eq!(get(&c, &format!("http://{port}/slow")).await.0, 504);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(390),
            "answered after {took:?}"
        );
        // The abandoned exchange's connection is not reused for the next request.
        assert_eq!(get(&c, &format!("http://{port}/")).await.0, 200);
    }
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn outlier_ejection_removes_a_5xx_endpoint() {
    let good = app("good", None).await;
    let bad = app("bad", Some(500)).await;
    let (sc, stop) = sidecar(&static_upstream(
        "max_retries = 0\noutlier_consecutive_5xx = 3",
        &[good.addr, bad.addr],
    ))
    .await;
    let port = sc.upstream_addrs["api"];
    let c = h1_client();
    let mut failures = 0;
    for _ in 0..10 {
        if get(&c, &format!("http://{port}/")).await.0 != 200 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "ejected after three consecutive 5xx");
    let hits_before = bad.hits.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{port}/")).await.0, 200);
    }
    assert_eq!(
        bad.hits.load(std::sync::atomic::Ordering::SeqCst),
        hits_before
    );
    let clusters = String::from_utf8(
        get(&c, &format!("http://{}/clusters", sc.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(clusters.contains("\"ejected\": true"), "{clusters}");
    let metrics = String::from_utf8(
        get(&c, &format!("http://{}/metrics", sc.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("trellis_proxy_upstream_ejections_total{upstream=\"api\"} 1"),
        "{metrics}"
    );
    stop.cancel();
    sc.wait().await;
}

fn discovery_config(cp: std::net::SocketAddr) -> String {
    format!(
        "{}\n[control_plane]\naddress = \"{cp}\"\nwatch_wait = \"2s\"\n\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
        base()
    )
}

#[tokio::test]
async fn discovery_endpoints_ready_removal_and_control_plane_down() {
    let a = app("a", None).await;
    let b = app("b", None).await;
    let cp = control_plane("my-app.local", "api").await;
    let (sc, stop) = sidecar(&discovery_config(cp.addr)).await;
    let c = h1_client();
    let ready = format!("http://{}/ready", sc.admin_addr);
    let port = sc.upstream_addrs["api"];

    // The first poll is answered at once (no revision yet): ready, with an empty set.
    wait_until(|| async { get(&c, &ready).await.0 == 200 }).await;
    cp.publish(&[
        ("a", a.addr, HealthStatus::Healthy),
        ("b", b.addr, HealthStatus::Healthy),
    ]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.insert(get(&c, &format!("http://{port}/")).await.1);
    }
    assert_eq!(seen.len(), 2);

    // Deregistered (unhealthy) endpoint: no new requests 100 ms after the change.
    cp.publish(&[
        ("a", a.addr, HealthStatus::Healthy),
        ("b", b.addr, HealthStatus::Unhealthy),
    ]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{port}/")).await.1, "a");
    }
    cp.publish(&[("b", b.addr, HealthStatus::Healthy)]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://{port}/")).await.1, "b");
    }

    // Control plane down: the last snapshot keeps serving.
    cp.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(get(&c, &format!("http://{port}/")).await.1, "b");
    }
    assert_eq!(get(&c, &ready).await.0, 200);
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_proxy_stays_up() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("", &[a.addr])).await;
    let port = sc.upstream_addrs["api"];
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(
            out.starts_with(b"HTTP/1.1 400"),
            "{:?} -> {}",
            garbage,
            String::from_utf8_lossy(&out)
        );
    }
    // Oversized headers are refused too.
    let mut s = TcpStream::connect(port).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        out.starts_with(b"HTTP/1.1 431") || out.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn sigterm_drain_finishes_in_flight_requests() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("", &[a.addr])).await;
    let port = sc.upstream_addrs["api"];
    let admin = sc.admin_addr;
    let mut inflight = Vec::new();
    for i in 0..10 {
        // Alternate protocols; each request is in flight (the app sleeps 400 ms) when drain starts.
        let c = if i % 2 == 0 { h1_client() } else { h2_client() };
        inflight.push(tokio::spawn(async move {
            get(&c, &format!("http://{port}/slow")).await.0
        }));
    }
    wait_hits(&a, 10).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        get(&h1_client(), &format!("http://{admin}/ready")).await.0,
        503,
        "ready fails while draining"
    );
    assert!(
        TcpStream::connect(port).await.is_err() || {
            // The socket may still accept at the kernel level for a moment; it must not be served.
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                h1_client().request(
                    Request::get(format!("http://{port}/"))
                        .body(body(""))
                        .unwrap(),
                ),
            )
            .await;
            !matches!(r, Ok(Ok(_)))
        },
        "no new connections while draining"
    );
    for h in inflight {
        assert_eq!(h.await.unwrap(), 200);
    }
    tokio::time::timeout(Duration::from_secs(5), sc.wait())
        .await
        .unwrap();
}

#[test]
fn example_config_and_env_only_config_load() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sidecar.example.toml");
    trellis_proxy::Config::load(
        Some(std::path::Path::new(path)),
        &trellis_proxy::MapEnv::default(),
    )
    .unwrap();
}

async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met in 2 s");
}

#[tokio::test]
async fn slowloris_headers_time_out_and_max_connections_is_enforced() {
    let a = app("a", None).await;
    let limits = "\n[limits]\nheader_read_timeout = \"300ms\"\nmax_connections = 2\n";
    let (sc, stop) = sidecar(&static_upstream(limits, &[a.addr])).await;
    let port = sc.upstream_addrs["api"];

    // A client that never finishes its headers is cut off.
    let mut slow = TcpStream::connect(port).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "slow client still connected after 5 s");

    // Two open connections fill the limit; a third is closed at once and counted.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(port).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = TcpStream::connect(port).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let metrics = String::from_utf8(
        get(&h1_client(), &format!("http://{}/metrics", sc.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("trellis_proxy_connections_rejected_total 1"),
        "{metrics}"
    );
    drop(held);
    // Slots free again once those connections close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn not_ready_until_the_first_endpoint_snapshot() {
    // A control plane that is not there: the watcher keeps retrying and /ready stays 503.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (sc, stop) = sidecar(&discovery_config(closed)).await;
    let c = h1_client();
    for _ in 0..3 {
        assert_eq!(
            get(&c, &format!("http://{}/ready", sc.admin_addr)).await.0,
            503
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(&c, &format!("http://{}/live", sc.admin_addr)).await.0,
        200
    );
    // No endpoints yet: requests get 503 from the proxy, not a hang.
    assert_eq!(
        get(&c, &format!("http://{}/", sc.upstream_addrs["api"]))
            .await
            .0,
        503
    );
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn circuit_breaker_fails_fast_beyond_max_requests() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&static_upstream("max_requests = 1", &[a.addr])).await;
    let port = sc.upstream_addrs["api"];
    let slow =
        tokio::spawn(async move { get(&h1_client(), &format!("http://{port}/slow")).await.0 });
    wait_hits(&a, 1).await;
    let c = h1_client();
    let (s, _, _) = get(&c, &format!("http://{port}/")).await;
    assert_eq!(s, 503, "second concurrent request overflows");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        get(&c, &format!("http://{port}/")).await.0,
        200,
        "slot released"
    );
    let metrics = String::from_utf8(
        get(&c, &format!("http://{}/metrics", sc.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("trellis_proxy_upstream_overflow_total{upstream=\"api\"} 1"),
        "{metrics}"
    );
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn weighted_balancer_splits_by_weight() {
    let stable = app("stable", None).await;
    let canary = app("canary", None).await;
    let toml = format!(
        "{}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true, balancer = \"weighted\" }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{}\", weight = 9 }}, {{ address = \"{}\", weight = 1 }}]\n",
        base(),
        stable.addr,
        canary.addr
    );
    let (sc, stop) = sidecar(&toml).await;
    let port = sc.upstream_addrs["api"];
    let c = h1_client();
    let mut canaries = 0;
    for _ in 0..300 {
        if get(&c, &format!("http://{port}/")).await.1 == "canary" {
            canaries += 1;
        }
    }
    // Expected 30; generous bounds for a random split.
    assert!((8..=60).contains(&canaries), "{canaries}");
    stop.cancel();
    sc.wait().await;
}
