//! DNS over TCP (RFC 7766), bounded: at most [`MAX_TCP_CONNECTIONS`] at once (further
//! connections are closed at accept), an idle/read timeout per message, and a cap on queries
//! per connection. Answers come from the same logic as the UDP path, without the UDP size limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::dns::DnsHandler;
use crate::dns_udp::{Reply, decide_within, encode};

/// Concurrent DNS-over-TCP connections; beyond it new ones are closed immediately.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A connection that sends no complete message for this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries answered on one connection before it is closed.
pub const MAX_QUERIES_PER_CONNECTION: usize = 1000;
/// Largest DNS message over TCP.
const MAX_TCP_MESSAGE: usize = 65_535;

pub async fn serve(
    listener: TcpListener,
    handler: Arc<DnsHandler>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    // Connections end with the server: none may outlive it holding the registry.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.changed() => {
                conns.shutdown().await;
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            handler.count_tcp_refused();
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            let _permit = permit;
            connection(stream, peer, &handler).await;
        });
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, handler: &Arc<DnsHandler>) {
    let mut buf = vec![0u8; 512];
    for _ in 0..MAX_QUERIES_PER_CONNECTION {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            if buf.len() < len {
                buf.resize(len, 0);
            }
            stream.read_exact(&mut buf[..len]).await.map(|_| len)
        };
        let len = match tokio::time::timeout(TCP_IDLE_TIMEOUT, read).await {
            Ok(Ok(len)) => len,
            _ => return,
        };
        let Some(answer) = answer(handler, &buf[..len]).await else {
            continue;
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            return;
        };
        let write = async {
            stream.write_u16(n).await?;
            stream.write_all(&answer).await
        };
        if tokio::time::timeout(TCP_IDLE_TIMEOUT, write).await.is_err() {
            tracing::debug!(%peer, "dns tcp client does not read: closed");
            return;
        }
    }
}

async fn answer(handler: &Arc<DnsHandler>, msg: &[u8]) -> Option<Vec<u8>> {
    match decide_within(handler, msg, Some(MAX_TCP_MESSAGE)) {
        Reply::Now(bytes, _) => Some(bytes),
        Reply::Nothing => None,
        Reply::Foreign(req) => {
            let query = req.queries().first()?;
            let (answer, ra) = handler.foreign(query, req.recursion_desired()).await;
            handler.count(query.query_type(), &answer);
            encode(&req, answer, ra, msg.len(), MAX_TCP_MESSAGE)
        }
    }
}
