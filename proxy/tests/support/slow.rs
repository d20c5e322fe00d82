//! Slow readers and the upstream that feeds them, for the buffered-bytes budget tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use trellis_proxy::overload::{Pressure, pressure};

/// Body size the blaster announces: more than every buffer on the path can absorb, so a
/// response to a client that does not read never ends.
const BODY: usize = 64 << 20;

/// An upstream that answers anything with a huge body (`http`) or just streams bytes (raw TCP),
/// writing until the peer stops taking them.
pub async fn blaster(http: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = socket2::SockRef::from(&s).set_send_buffer_size(64 * 1024);
            tokio::spawn(async move {
                if http {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
                    if s.write_all(h.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let chunk = vec![0u8; 64 * 1024];
                let mut sent = 0;
                while sent < BODY && s.write_all(&chunk).await.is_ok() {
                    sent += chunk.len();
                }
            });
        }
    });
    addr
}

/// A client that asks for the big body and never reads it (tiny receive buffer).
pub async fn slow_h1_reader(port: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(port).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n")
        .await
        .unwrap();
    s
}

/// HTTP/2 streams a client never reads (a 16 KiB window each), on one connection; dropping it
/// closes the connection.
pub struct StalledH2 {
    _send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    _stalled: Vec<http::Response<Incoming>>,
}

impl StalledH2 {
    /// Opens streams for `/big` on `addr`, one at a time, until the overload guard sheds
    /// requests (or `max` streams).
    pub async fn until_shed(addr: SocketAddr, max: usize) -> StalledH2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(8 << 20)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let mut stalled = Vec::new();
        for _ in 0..max {
            if pressure() == Pressure::ShedRequests {
                break;
            }
            let req = http::Request::get(format!("http://{addr}/big"))
                .body(Empty::new())
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
                .await
                .unwrap()
                .unwrap();
            if resp.status() == 200 {
                stalled.push(resp); // body never read
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        StalledH2 {
            _send: send,
            conn,
            _stalled: stalled,
        }
    }
}

impl Drop for StalledH2 {
    fn drop(&mut self) {
        self.conn.abort();
    }
}
