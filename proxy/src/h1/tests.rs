//! The inline client against scripted upstreams on loopback: framing, reuse and failures.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::{Decoder, Step};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::pool::H1Pool;

/// What the scripted upstream saw of one request.
struct Seen {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

/// What it answers: raw response bytes, and whether to close the connection afterwards.
type Script = fn(&Seen) -> (Vec<u8>, bool);

/// An upstream that answers each request on a connection with `script`; counts connections.
async fn upstream(script: Script) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while let Some(seen) = read_request(&mut s, &mut buf).await {
                    let (bytes, close) = script(&seen);
                    if s.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> Option<()> {
    buf.reserve(64 * 1024);
    match s.read_buf(buf).await {
        Ok(n) if n > 0 => Some(()),
        _ => None,
    }
}

async fn read_request(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Seen> {
    let (len, method, path, head, length, chunked) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if let httparse::Status::Complete(len) = req.parse(buf).ok()? {
            let head = String::from_utf8_lossy(&buf[..len]).to_lowercase();
            let length = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
            let chunked = head.contains("transfer-encoding: chunked");
            break (
                len,
                req.method?.to_owned(),
                req.path?.to_owned(),
                head,
                length,
                chunked,
            );
        }
        fill(s, buf).await?;
    };
    let _ = buf.split_to(len);
    let mut body = Vec::new();
    if chunked {
        let mut dec = Decoder::new();
        loop {
            match dec.step(buf).ok()? {
                Step::Data(n) => {
                    body.extend_from_slice(&buf.split_to(n));
                    dec.consumed(n);
                }
                Step::NeedMore => fill(s, buf).await?,
                Step::Trailers(_) | Step::End => break,
            }
        }
    } else if let Some(n) = length {
        while buf.len() < n {
            fill(s, buf).await?;
        }
        body = buf.split_to(n).to_vec();
    }
    Some(Seen {
        method,
        path,
        head,
        body,
    })
}

fn pool() -> Arc<H1Pool> {
    H1Pool::new(Duration::from_secs(1), Duration::from_secs(30))
}

async fn send(
    pool: &Arc<H1Pool>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: ProxyBody,
) -> Result<(StatusCode, http::HeaderMap, Result<Bytes, String>), ProxyError> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .body(body)
        .unwrap();
    let (parts, body) = req.into_parts();
    let mut resp = pool.send_parts(addr, &parts, b"", body).await?;
    super::materialize(&mut resp);
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Ok((parts.status, parts.headers, body))
}

async fn get(pool: &Arc<H1Pool>, addr: SocketAddr, path: &str) -> (StatusCode, Bytes) {
    let (status, _, body) = send(pool, addr, Method::GET, path, ProxyBody::empty())
        .await
        .unwrap();
    (status, body.unwrap())
}

#[tokio::test]
async fn chunked_responses_are_decoded_and_the_connection_reused() {
    let (addr, accepted) = upstream(|_| {
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
                .to_vec(),
            false,
        )
    })
    .await;
    let pool = pool();
    for _ in 0..3 {
        assert_eq!(
            get(&pool, addr, "/").await,
            (StatusCode::OK, "abcde".into())
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodiless_responses_keep_the_connection() {
    let (addr, accepted) = upstream(|seen| {
        let r: &[u8] = match (seen.method.as_str(), seen.path.as_str()) {
            ("HEAD", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            (_, "/204") => b"HTTP/1.1 204 No Content\r\n\r\n",
            (_, "/304") => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            (_, "/100") => {
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            }
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        };
        (r.to_vec(), false)
    })
    .await;
    let pool = pool();
    let (status, headers, body) = send(&pool, addr, Method::HEAD, "/", ProxyBody::empty())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "10", "HEAD keeps the length");
    assert!(body.unwrap().is_empty());
    assert_eq!(get(&pool, addr, "/204").await.0, StatusCode::NO_CONTENT);
    assert_eq!(get(&pool, addr, "/304").await.0, StatusCode::NOT_MODIFIED);
    assert_eq!(
        get(&pool, addr, "/100").await,
        (StatusCode::OK, "ok".into())
    );
    assert_eq!(
        get(&pool, addr, "/empty").await,
        (StatusCode::OK, "".into())
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn close_and_read_to_eof_bodies_are_not_reused() {
    let (addr, accepted) = upstream(|seen| match seen.path.as_str() {
        "/close" => (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            true,
        ),
        _ => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true),
    })
    .await;
    let pool = pool();
    for _ in 0..2 {
        assert_eq!(
            get(&pool, addr, "/close").await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(
            get(&pool, addr, "/eof").await,
            (StatusCode::OK, "until the end".into())
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    // Echoes the request body with a content-length, in one write.
    let (addr, accepted) = upstream(|seen| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            seen.body.len()
        )
        .into_bytes();
        r.extend_from_slice(&seen.body);
        (r, false)
    })
    .await;
    let pool = pool();
    let big: Bytes = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        let (status, _, body) = send(&pool, addr, Method::POST, "/", ProxyBody::full(big.clone()))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.unwrap() == big, "the echo matches");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_heads_are_forwarded_as_given() {
    let (addr, _) = upstream(|seen| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            seen.head.len() + seen.body.len()
        )
        .into_bytes();
        r.extend_from_slice(seen.head.as_bytes());
        r.extend_from_slice(&seen.body);
        (r, false)
    })
    .await;
    let pool = pool();
    let (_, _, body) = send(
        &pool,
        addr,
        Method::PUT,
        "/a/b?c=d",
        ProxyBody::full("ping"),
    )
    .await
    .unwrap();
    let echoed = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(echoed.starts_with("put /a/b?c=d http/1.1\r\n"), "{echoed}");
    assert!(echoed.contains("content-length: 4\r\n"), "{echoed}");
    assert!(echoed.ends_with("\r\n\r\nping"), "{echoed}");
}

#[tokio::test]
async fn broken_upstreams_fail_the_request_or_the_body() {
    let (addr, _) = upstream(|seen| match seen.path.as_str() {
        "/garbage" => (b"SMTP ready\r\n\r\n".to_vec(), true),
        "/silent" => (Vec::new(), true),
        "/short" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab".to_vec(),
            true,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            true,
        ),
        _ => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
            true,
        ),
    })
    .await;
    let pool = pool();
    for path in ["/garbage", "/silent", "/conflict"] {
        let r = send(&pool, addr, Method::GET, path, ProxyBody::empty()).await;
        assert!(matches!(r, Err(ProxyError::UpstreamReset)), "{path}: {r:?}");
    }
    for path in ["/short", "/bad-chunk"] {
        let (status, _, body) = send(&pool, addr, Method::GET, path, ProxyBody::empty())
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_err(), "{path}");
    }
}
