//! The buffered-bytes budget of the overload guard against a real sidecar in this process:
//! slow-reading clients (HTTP/1 clients that stop reading, HTTP/2 streams stalled at a zero
//! window) make the proxy hold response bytes past a 1 MiB budget; new connections are then
//! closed at accept and new requests answered 503 + Retry-After, the admin port still answers
//! with the gauge, and once the slow readers go a well-behaved client is served again. A raw TCP
//! relay's splice pipe counts the exact bytes it holds for a reader that does not read.
//! (Its own test binary: the pressure level and the gauge are process-wide.)

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::slow::{StalledH2, blaster, slow_h1_reader};
use support::*;
use tokio::net::{TcpSocket, TcpStream};
use trellis_proxy::buffered::buffered_bytes;
use trellis_proxy::overload::Pressure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_past_the_buffered_budget_are_shed_then_service_returns() {
    let small = app("small", None).await;
    let (big_http, big_tcp) = (blaster(true).await, blaster(false).await);
    let toml = format!(
        "{}\n[limits]\nmax_buffered_mb = 1\n\n[outbound]\nupstreams = [\
         {{ service = \"small\", local_port = 0, danger_plaintext = true }}, \
         {{ service = \"big\", local_port = 0, danger_plaintext = true }}, \
         {{ service = \"stream\", local_port = 0, danger_plaintext = true, protocol = \"tcp\" }}]\n\n\
         [[clusters]]\nservice = \"small\"\nendpoints = [{{ address = \"{}\" }}]\n\n\
         [[clusters]]\nservice = \"big\"\nendpoints = [{{ address = \"{big_http}\" }}]\n\n\
         [[clusters]]\nservice = \"stream\"\nendpoints = [{{ address = \"{big_tcp}\" }}]\n",
        base(),
        small.addr
    );
    let (sc, stop) = sidecar(&toml).await;
    let (small_port, big_port) = (sc.upstream_addrs["small"], sc.upstream_addrs["big"]);
    let mut open = TcpStream::connect(small_port).await.unwrap();
    assert!(on(&mut open, "small").await.starts_with("HTTP/1.1 200"));
    until_pressure("idle", Pressure::Normal).await;
    let idle = buffered_bytes();

    // HTTP/1 clients that stop reading: each holds its connection's buffers and its response's
    // write queue (64 KiB each at the default max_header_bytes) while the response cannot end.
    let mut h1 = Vec::new();
    for _ in 0..3 {
        h1.push(slow_h1_reader(big_port).await);
    }
    // HTTP/2 streams stalled at the client's small window: one connection, many responses.
    let h2 = StalledH2::until_shed(big_port, 40).await;
    until_pressure("past the buffered budget", Pressure::ShedRequests).await;
    assert!(buffered_bytes() >= 1 << 20, "{}", buffered_bytes());

    // New work is refused: a new connection is closed at accept, a new request on an open
    // connection gets 503 + Retry-After.
    assert_closed_at_accept(small_port).await;
    assert_shed(&mut open, "small").await;

    // The process is up; its admin port answers with the gauge and the shedding.
    let text = admin_metrics(sc.admin_addr).await;
    assert!(metric(&text, "trellis_proxy_overload_buffered_bytes") >= (1 << 20) as f64);
    assert_eq!(metric(&text, "trellis_proxy_overload_level"), 2.0);
    assert!(
        metric(
            &text,
            r#"trellis_proxy_overload_shed_total{work="connection"}"#
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            r#"trellis_proxy_overload_shed_total{work="request"}"#
        ) >= 1.0
    );

    // The slow readers go: their buffers are given back and a well-behaved client is served.
    drop((h1, h2));
    until_pressure("budget freed", Pressure::Normal).await;
    assert_eq!(
        get(&h1_client(), &format!("http://{small_port}/")).await.0,
        200
    );
    let mut settled = buffered_bytes();
    for _ in 0..100 {
        if settled <= idle + (64 << 10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        settled = buffered_bytes();
    }
    assert!(settled <= idle + (64 << 10), "idle {idle}, now {settled}");

    // A raw TCP relay to a reader that does not read: the splice pipe holds exact bytes. The
    // baseline is taken once the count is steady: the slow readers' connections may still be
    // giving back their last buffers, which would hide the pipe's bytes.
    let before = steady_buffered_bytes().await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let reader = sock.connect(sc.upstream_addrs["stream"]).await.unwrap();
    // The relay drains each splice read before the next one, so once the reader's buffers are
    // full the pipe holds what was left of the last read: more than nothing, but how much depends
    // on how many bytes that read found waiting (10 KiB to 64 KiB seen).
    let mut held = 0;
    for _ in 0..20 {
        held = steady_buffered_bytes().await.saturating_sub(before);
        if held > 0 {
            break;
        }
    }
    assert!(held > 0, "the pipe holds nothing");
    drop(reader);
    for _ in 0..100 {
        if buffered_bytes() <= before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        buffered_bytes() <= before,
        "{} > {before}",
        buffered_bytes()
    );
    stop.cancel();
    sc.wait().await;
}

/// [`buffered_bytes`] once it has not changed for 200 ms (or after 5 s).
async fn steady_buffered_bytes() -> usize {
    let mut last = buffered_bytes();
    let mut same = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = buffered_bytes();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 4 {
            break;
        }
    }
    last
}
