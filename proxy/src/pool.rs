//! HTTP/1.1 keep-alive connections to plaintext endpoints (the sidecar → local app hop, and
//! plaintext upstreams), driven inline by the downstream task ([`crate::h1`]).
//!
//! hyper's client puts every request through a dispatch channel to a connection task and the
//! response back through a oneshot: several task wake-ups per request. Here the task serving the
//! downstream request writes to and reads from the upstream socket itself. A connection goes back
//! to its endpoint's idle list when the response body ends, the key is the endpoint's
//! `SocketAddr` under a cheap FNV hash, and checkout is a pop under a lock held for a few
//! instructions. Connections that closed while idle are skipped; a request that could not be
//! written to a reused connection is retried on a fresh one (it was never sent).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use hyper::Response;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::h1::{self, Conn, SendError};

/// Idle connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// Reused connections tried before opening a new one.
const MAX_STALE_RETRIES: usize = 4;

struct Idle {
    conn: Conn,
    /// When it stops being reusable (the idle timeout after it went idle): comparing instants
    /// is cheaper than subtracting them, twice per request. `None`: a timeout past the clock's
    /// range, never.
    expires: Option<Instant>,
}

pub struct H1Pool {
    /// Per endpoint, oldest first: checkout takes the newest, expiry drops from the front.
    idle: Mutex<HashMap<SocketAddr, VecDeque<Idle>, crate::fnv::FnvBuild>>,
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

/// Where a connection goes back to when the response body that used it ends.
pub struct Release {
    pool: Arc<H1Pool>,
    addr: SocketAddr,
}

impl Release {
    pub fn release(self, conn: Conn) {
        self.pool.put(self.addr, conn);
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

    /// Sends the request `parts` + `body` to `addr` over a pooled (or new) HTTP/1.1 connection.
    /// The head is written from `parts` as they are (its URI's path and query, its headers),
    /// then the `added` field lines.
    pub async fn send_parts(
        self: &Arc<Self>,
        addr: SocketAddr,
        parts: &Parts,
        added: &[u8],
        mut body: ProxyBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut stale = 0;
        loop {
            let (conn, reused) = match self.checkout(addr) {
                Some(conn) => (conn, true),
                // Boxed: connecting is the rare path; its state stays out of every request's
                // future, which hyper moves into place per request.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            let release = Release {
                pool: Arc::clone(self),
                addr,
            };
            match h1::exchange(conn, parts, added, body, release).await {
                Ok(resp) => return Ok(resp),
                // Never written: the idle connection had closed. Try another one.
                Err(SendError::NotSent(back)) if reused && stale < MAX_STALE_RETRIES => {
                    stale += 1;
                    body = *back;
                }
                Err(SendError::NotSent(_)) => return Err(ProxyError::UpstreamReset),
                Err(SendError::Failed(e)) => {
                    tracing::debug!(endpoint = %addr, error = %e, "upstream exchange failed");
                    return Err(e);
                }
            }
        }
    }

    /// The newest live idle connection to `addr`.
    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(Idle { mut conn, expires }) = list.pop_back() {
            if expires.is_some_and(|e| now > e) {
                // Everything older is expired too.
                list.clear();
                return None;
            }
            if conn.is_idle_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, conn: Conn) {
        let now = Instant::now();
        let expires = now.checked_add(self.idle_timeout);
        let mut idle = self.idle.lock();
        let list = idle.entry(addr).or_default();
        // Expired connections leave from the front (oldest first), closing their sockets.
        while list
            .front()
            .is_some_and(|e| e.expires.is_some_and(|at| now > at))
        {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            // Full: drop the closed ones, else refuse this one (it closes when dropped).
            list.retain_mut(|e| e.conn.is_idle_usable());
            if list.len() >= MAX_IDLE_PER_ENDPOINT {
                return;
            }
        }
        list.push_back(Idle { conn, expires });
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, ProxyError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Err(ProxyError::ConnectFailed),
            Err(_) => return Err(ProxyError::ConnectTimeout),
        };
        let _ = tcp.set_nodelay(true);
        Ok(Conn::new(tcp))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::Request;
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
        let (parts, body) = req.into_parts();
        let resp = pool.send_parts(addr, &parts, b"", body).await?;
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
