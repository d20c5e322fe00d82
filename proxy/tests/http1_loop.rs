//! The proxy's own HTTP/1.1 loop (`h1::serve`) over raw sockets: pipelined requests, the hand-off
//! to hyper in the middle of a connection, HEAD framing, `Connection: close`, a client that closes
//! its side or resets while its request is in flight, and the `Date` of local answers.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(app: SocketAddr) -> String {
    format!(
        "{}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{app}\" }}]\n",
        base()
    )
}

/// Writes `bytes` in one go and reads until the proxy closes (within 5 s).
async fn exchange(port: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes after `Connection: close`")
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

/// Starts an app and a sidecar in front of it, then [`exchange`] with the sidecar.
async fn through_sidecar(bytes: &[u8]) -> String {
    let a = app("a", None).await;
    let (sc, _stop) = sidecar(&config(a.addr)).await;
    exchange(sc.upstream_addrs["api"], bytes).await
}

/// Where each of `needles` first occurs in `hay`, asserting they come in this order.
fn in_order(hay: &str, needles: &[&str]) {
    let mut from = 0;
    for n in needles {
        let at = hay[from..]
            .find(n)
            .unwrap_or_else(|| panic!("{n:?} after byte {from} in {hay:?}"));
        from += at + n.len();
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let out = through_sidecar(
        b"GET /status/201 HTTP/1.1\r\nHost: api\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: api\r\n\r\nGET /status/203 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    in_order(
        &out,
        &[
            "HTTP/1.1 201 Created\r\n",
            "HTTP/1.1 202 Accepted\r\n",
            "HTTP/1.1 203 ",
        ],
    );
    assert_eq!(out.matches("HTTP/1.1 ").count(), 3, "{out}");
    let last = &out[out.rfind("HTTP/1.1 ").unwrap()..];
    assert!(last.contains("connection: close\r\n"), "{last}");
}

#[tokio::test]
async fn a_request_with_a_body_goes_to_hyper_on_the_same_connection() {
    // The first request is the loop's; the POST hands the connection (and the GET behind it,
    // already read) to hyper, which serves both.
    let out = through_sidecar(
        b"GET /status/201 HTTP/1.1\r\nHost: api\r\n\r\nPOST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhelloGET /status/202 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    in_order(
        &out,
        &[
            "HTTP/1.1 201 ",
            "HTTP/1.1 200 OK\r\n",
            "\r\n\r\nhello",
            "HTTP/1.1 202 ",
        ],
    );
}

#[tokio::test]
async fn head_keeps_the_length_and_sends_no_body() {
    let out = through_sidecar(
        b"HEAD / HTTP/1.1\r\nHost: api\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, rest) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        head.lines().any(|l| l == "content-length: 1"),
        "the app's body is `a`: {out}"
    );
    assert!(
        rest.starts_with("HTTP/1.1 202 "),
        "no body after a HEAD answer: {out}"
    );
}

#[tokio::test]
async fn a_client_that_closes_its_side_still_gets_its_response() {
    let a = app("a", None).await;
    let (sc, _stop) = sidecar(&config(a.addr)).await;
    let mut s = TcpStream::connect(sc.upstream_addrs["api"]).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains("connection: close\r\n") && out.ends_with("\r\n\r\na"),
        "{out}"
    );
}

#[tokio::test]
async fn a_client_that_resets_mid_request_leaves_the_proxy_serving() {
    let a = app("a", None).await;
    let (sc, _stop) = sidecar(&config(a.addr)).await;
    let port = sc.upstream_addrs["api"];
    for _ in 0..20 {
        let s = TcpStream::connect(port).await.unwrap();
        let mut s = s.into_std().unwrap();
        std::io::Write::write_all(&mut s, b"GET /slow HTTP/1.1\r\nHost: api\r\n\r\n").unwrap();
        // SO_LINGER 0: close() sends a reset.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    let (status, _, body) = get(&h1_client(), &format!("http://{port}/")).await;
    assert_eq!((status, &body[..]), (200, &b"a"[..]));
}

#[tokio::test]
async fn local_answers_carry_a_date() {
    // Nothing listens at the endpoint: the proxy answers itself.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (sc, _stop) = sidecar(&config(dead)).await;
    let out = exchange(
        sc.upstream_addrs["api"],
        b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, _) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 50"), "{out}");
    let date = head
        .lines()
        .find_map(|l| l.strip_prefix("date: "))
        .unwrap_or_else(|| panic!("no date: {out}"));
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
}
