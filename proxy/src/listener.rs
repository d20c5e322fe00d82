//! Listeners: `SO_REUSEPORT` acceptors (one socket per acceptor, the kernel spreads connections),
//! `TCP_NODELAY` on every accepted stream, a connection limit, the memory-pressure guard, and an accept loop that stops when
//! draining starts while connection tasks are tracked so drain can wait for them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

const BACKLOG: i32 = 1024;

/// Binds `n` listening sockets sharing one address; port 0 binds the first and reuses its port.
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let first = bind_one(addr)?;
    let local = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..n {
        out.push(bind_one(local)?);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Where an accepted connection was going before an iptables `REDIRECT` sent it here
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on an IPv6 socket). `None` when the kernel has no
/// NAT record for it (not redirected, or conntrack absent); a connection that was not redirected
/// may also report its own local address.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let orig = if local.is_ipv6() {
        sock.original_dst_v6()
    } else {
        sock.original_dst_v4()
    };
    orig.ok()?.as_socket()
}

/// What every accepted connection shares.
#[derive(Debug, Clone)]
pub struct AcceptContext {
    pub name: &'static str,
    pub limit: Arc<Semaphore>,
    pub stop: CancellationToken,
    pub tracker: TaskTracker,
    pub metrics: Metrics,
}

/// Runs an accept loop per listener until `ctx.stop`; each connection runs `handle` in a tracked task.
pub fn spawn_accept<F, Fut>(listeners: Vec<TcpListener>, ctx: AcceptContext, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let gauge = ctx.metrics.active_connections(ctx.name);
    for listener in listeners {
        let ctx = ctx.clone();
        let handle = handle.clone();
        let gauge = gauge.clone();
        ctx.tracker.clone().spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    _ = ctx.stop.cancelled() => break,
                    r = listener.accept() => r,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = ctx.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&ctx.limit).try_acquire_owned() else {
                    ctx.metrics.connections_rejected.inc();
                    drop(stream);
                    continue;
                };
                // Under memory pressure new connections go first (the admin port stays open).
                if ctx.name != "admin" && !crate::overload::admit_connection() {
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let handle = handle.clone();
                let gauge = gauge.clone();
                ctx.tracker.spawn(async move {
                    let _permit: OwnedSemaphorePermit = permit;
                    gauge.inc();
                    handle(stream, peer).await;
                    gauge.dec();
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuseport_shares_an_ephemeral_port() {
        let ls = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
        assert!(ports.iter().all(|p| *p == ports[0] && *p != 0));
    }
}
