//! HTTP/1.1 abuse against the sidecar's outbound listener over raw sockets: request smuggling
//! attempts (CL+TE, duplicate Content-Length, obs-fold), oversized headers, slowloris and
//! slow-read clients. Each gets the documented error (or a close), nothing reaches the app, memory
//! stays bounded and another client is still served.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_test_support::memory::rss_kib;

fn config(app: SocketAddr, limits: &str) -> String {
    format!(
        "{}\n[limits]\n{limits}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{app}\" }}]\n",
        base()
    )
}

/// Sends raw bytes, half-closes, returns everything the proxy answered (within 5 s).
async fn raw(port: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(port).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

/// RSS is per process: tests that measure it run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn served(port: SocketAddr) {
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
}

#[tokio::test]
async fn smuggling_attempts_and_oversized_headers_are_refused_and_not_forwarded() {
    let _serial = SERIAL.lock().await;
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "max_header_bytes = 8192")).await;
    let port = sc.upstream_addrs["api"];
    served(port).await;
    let before = a.hits.load(Ordering::SeqCst);
    let big = "x".repeat(16 * 1024);
    // CL+TE: framed by Transfer-Encoding as RFC 9112 §6.3 says (Content-Length dropped), forwarded
    // re-framed, and the client connection closed after the answer: the smuggled second request
    // is never parsed, so the app sees exactly one request, without a Content-Length.
    let answer = raw(
        port,
        b"POST /headers HTTP/1.1\r\nHost: api\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n",
    )
    .await;
    eprintln!("CL+TE: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        !answer.to_ascii_lowercase().contains("content-length: 6"),
        "{answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "one answer only: {answer}"
    );
    assert_eq!(a.hits.load(Ordering::SeqCst), before + 1);
    let before = before + 1;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "duplicate CL",
            "POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: api\r\nX-Folded: a\r\n b\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "TE not chunked",
            "POST /echo HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "oversized header",
            format!("GET / HTTP/1.1\r\nHost: api\r\nX-Big: {big}\r\n\r\n"),
            "HTTP/1.1 431",
        ),
    ];
    for (name, req, expect) in &cases {
        let answer = raw(port, req.as_bytes()).await;
        eprintln!("{name}: {:?}", answer.lines().next());
        assert!(
            answer.starts_with(expect),
            "{name}: expected {expect}, got {answer:?}"
        );
        assert!(!answer.contains("smuggled"), "{name}");
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        before,
        "no smuggling attempt may reach the app"
    );
    served(port).await;
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn slowloris_connections_time_out_and_others_are_served() {
    let _serial = SERIAL.lock().await;
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(
        a.addr,
        "header_read_timeout = \"1s\"\nmax_connections = 64",
    ))
    .await;
    let port = sc.upstream_addrs["api"];
    let rss = rss_kib();
    // 60 clients each dribble a request head one byte every 200 ms (never finishing it).
    let mut tasks = Vec::new();
    for _ in 0..60 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(port).await.unwrap();
            let head = b"GET / HTTP/1.1\r\nHost: api\r\nX-Slow: ";
            let started = tokio::time::Instant::now();
            for b in head.iter().chain(std::iter::repeat(&b'a')) {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Ok(Ok(_)) | Ok(Err(_)) => break, // answered (408) or closed
                    Err(_) => {}
                }
                if started.elapsed() > Duration::from_secs(8) {
                    return None;
                }
            }
            Some(started.elapsed())
        }));
    }
    // While they dribble, a normal client is served (60 < max_connections).
    tokio::time::sleep(Duration::from_millis(300)).await;
    served(port).await;
    for t in tasks {
        let took = t
            .await
            .unwrap()
            .expect("slowloris connection must be closed");
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }
    assert!(rss_kib() < rss + 32 * 1024);
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        1,
        "only the normal request reached the app"
    );
    served(port).await;
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_early() {
    let _serial = SERIAL.lock().await;
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "max_connections = 16")).await;
    let port = sc.upstream_addrs["api"];
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(port).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The 17th is closed at accept, before any byte is read.
    let answer = raw(port, b"GET / HTTP/1.1\r\nHost: api\r\n\r\n").await;
    assert!(answer.is_empty(), "{answer}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    served(port).await;
    stop.cancel();
    sc.wait().await;
}

#[tokio::test]
async fn slow_reader_does_not_make_the_proxy_buffer() {
    let _serial = SERIAL.lock().await;
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "")).await;
    let port = sc.upstream_addrs["api"];
    let rss = rss_kib();
    // Upload 64 MiB to /echo and never read the echoed response: flow control must push back
    // through the proxy to the uploader instead of buffering the body.
    let s = TcpStream::connect(port).await.unwrap();
    let (r, mut w) = s.into_split();
    let total: usize = 64 << 20;
    w.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(2), w.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break, // blocked: backpressure reached the client
        }
    }
    let grown = rss_kib().saturating_sub(rss);
    eprintln!(
        "slow reader: uploaded {} MiB before backpressure, rss +{grown} KiB",
        sent >> 20
    );
    assert!(
        sent < total,
        "the upload must block when nobody reads the response"
    );
    assert!(grown < 48 * 1024, "proxy buffered {grown} KiB");
    served(port).await;
    // Close the stalled exchange, or draining would wait for it.
    drop((r, w));
    stop.cancel();
    sc.wait().await;
}

/// The internal LB: connections over `[limits] max_connections` are closed at accept, smuggling
/// shapes get 400 without reaching a target, and a normal client is served again afterwards.
#[tokio::test]
async fn lb_refuses_connections_over_its_cap_and_smuggling() {
    let _serial = SERIAL.lock().await;
    let a = app("a", None).await;
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[limits]
header_read_timeout = "1s"
max_connections = 16

[[target_group]]
name = "app"
targets = ["{}"]
# No active checks: one landing mid-test would count as a hit on the app.
health_check = {{ enabled = false }}

[[listener]]
name = "web"
listen = "127.0.0.1:0"
protocol = "http"
default_action = {{ type = "forward", target_groups = [{{ name = "app", weight = 1 }}] }}
"#,
        a.addr
    );
    let cfg = trellis_proxy::lb::LbConfig::from_str(&toml).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let h = trellis_proxy::lb::start(cfg, stop.clone()).await.unwrap();
    let port = h.listeners[0].1;
    // Wait for the target's first health check.
    let mut ok = false;
    for _ in 0..100 {
        if get(&h1_client(), &format!("http://{port}/")).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "LB never served");
    let before = a.hits.load(Ordering::SeqCst);
    for req in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello",
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    ] {
        assert!(raw(port, req.as_bytes()).await.starts_with("HTTP/1.1 400"));
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), before);
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(port).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        raw(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .is_empty()
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    served(port).await;
    stop.cancel();
    h.shutdown().await;
}
