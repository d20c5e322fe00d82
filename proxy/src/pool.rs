//! HTTP/1.1 keep-alive connections to plaintext endpoints (the sidecar → local app hop, and
//! plaintext upstreams), on hyper's connection API directly.
//!
//! hyper-util's legacy client costs, per request, a SipHash of the pool key, several boxed
//! futures, a oneshot and a spawned task that waits for the connection to become idle again
//! (callgrind: ~8k instructions of a ~45k-instruction proxied request). Here a connection goes
//! back to its endpoint's idle list when the response body ends ([`ProxyBody::Pooled`]), the key
//! is the endpoint's `SocketAddr` under a cheap FNV hash, and checkout is a pop under a lock held
//! for a few instructions. Connections that closed while idle are skipped; a request that could
//! not be written to a reused connection is retried on a fresh one (it was never sent).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body::Body as _;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::error::ProxyError;

/// Idle connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// Reused connections tried before opening a new one.
const MAX_STALE_RETRIES: usize = 4;

struct Idle {
    tx: SendRequest<ProxyBody>,
    since: Instant,
}

pub struct H1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, crate::fnv::FnvBuild>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("endpoints", &self.idle.lock().len())
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// Gives a connection back to its pool when the response body that used it ends.
pub struct Release {
    pool: Arc<H1Pool>,
    addr: SocketAddr,
    tx: SendRequest<ProxyBody>,
}

impl Release {
    pub fn release(self) {
        self.pool.put(self.addr, self.tx);
    }
}

impl H1Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(H1Pool {
            idle: Mutex::new(HashMap::default()),
            connect_timeout,
            idle_timeout,
        })
    }

    /// Sends `req` to `addr` over a pooled (or new) HTTP/1.1 connection.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut stale = 0;
        loop {
            let (mut tx, reused) = match self.checkout(addr, &mut stale).await {
                Some(tx) => (tx, true),
                // Boxed: connecting is the rare path; its state stays out of every request's
                // future, which hyper moves into place per request.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    if resp.body().is_end_stream() {
                        self.put(addr, tx);
                        return Ok(resp.map(ProxyBody::from));
                    }
                    let release = Release {
                        pool: Arc::clone(self),
                        addr,
                        tx,
                    };
                    return Ok(resp.map(|body| ProxyBody::pooled(body, release)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the idle connection had closed. Try another one.
                    Some(back) if reused && stale < MAX_STALE_RETRIES => {
                        stale += 1;
                        req = back;
                    }
                    _ => {
                        tracing::debug!(endpoint = %addr, error = %e.error(), "upstream connection failed");
                        return Err(ProxyError::UpstreamReset);
                    }
                },
            }
        }
    }

    /// A live idle connection to `addr`, waiting briefly for one whose last response just ended.
    async fn checkout(
        &self,
        addr: SocketAddr,
        stale: &mut usize,
    ) -> Option<SendRequest<ProxyBody>> {
        while *stale <= MAX_STALE_RETRIES {
            let entry = {
                let mut idle = self.idle.lock();
                idle.get_mut(&addr).and_then(Vec::pop)
            }?;
            let Idle { mut tx, since } = entry;
            if tx.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            if tx.is_ready() || tx.ready().await.is_ok() {
                return Some(tx);
            }
            *stale += 1;
        }
        None
    }

    fn put(&self, addr: SocketAddr, tx: SendRequest<ProxyBody>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            // Full: drop the closed ones, else refuse this one (it closes when dropped).
            list.retain(|e| !e.tx.is_closed());
            if list.len() >= MAX_IDLE_PER_ENDPOINT {
                return;
            }
        }
        list.push(Idle {
            tx,
            since: Instant::now(),
        });
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, ProxyError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Err(ProxyError::ConnectFailed),
            Err(_) => return Err(ProxyError::ConnectTimeout),
        };
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|_| ProxyError::ConnectFailed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection closed");
            }
        });
        Ok(tx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server answering `hi` to each request; `one_shot` closes the connection after
    /// the first response without saying so (as an app whose keep-alive timer fired). Counts
    /// accepted connections.
    async fn server(one_shot: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    loop {
                        let Ok(n) = s.read(&mut buf[have..]).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have += n;
                        // Requests here are bodiless or carry a 4-byte body.
                        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let body = if head.contains("content-length: 4") {
                            4
                        } else {
                            0
                        };
                        if have < end + 4 + body {
                            continue;
                        }
                        have = 0;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                            .await;
                        if one_shot {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn post(pool: &Arc<H1Pool>, addr: SocketAddr) -> Result<String, ProxyError> {
        let req = Request::post(format!("http://{addr}/"))
            .header("host", addr.to_string())
            .body(ProxyBody::full("ping"))
            .unwrap();
        let resp = pool.send(addr, req).await?;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn keep_alive_reuses_one_connection() {
        let (addr, accepted) = server(false).await;
        let pool = H1Pool::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(post(&pool, addr).await.unwrap(), "hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_closed_while_idle_are_not_used() {
        let (addr, accepted) = server(true).await;
        let pool = H1Pool::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..5 {
            // A POST is not replayable by the retry layer: the pool must never write it to a
            // connection the app already closed.
            assert_eq!(post(&pool, addr).await.unwrap(), "hi");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn refused_is_a_connect_error() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = H1Pool::new(Duration::from_millis(200), Duration::from_secs(30));
        assert!(matches!(
            post(&pool, closed).await,
            Err(ProxyError::ConnectFailed)
        ));
    }
}
