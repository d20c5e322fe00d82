//! Starting and stopping the LB: bind listeners and the admin port, spawn health checks,
//! discovery watches and deployments, serve HTTP/1.1 and HTTP/2 (cleartext or TLS), and drain on
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;
use std::future::Future;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admin::{self, Admin};
use super::config::{LbConfig, ListenerProtocol};
use super::deploy;
use super::error::LbError;
use super::listener::{self, LbBody, ListenerState, Shared};
use super::metrics::Metrics;
use super::target::TargetGroup;
use super::tls::listener_tls;
use super::{discovery, health};
use crate::ProxyBody;
use crate::buffered::{Held, TLS_BUFFER_BYTES};
use crate::server::{HttpMode, HttpServer, ServerSettings, serve_connection};

/// A running LB.
pub struct LbHandle {
    /// `(listener name, bound address)` in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    state: Arc<Admin>,
    stop: CancellationToken,
    tasks: TaskTracker,
    drain: Duration,
    /// Certificate renewals of CA-backed `https` listeners.
    renewals: Vec<tokio::task::JoinHandle<()>>,
}

/// Applies new configs to a running LB (SIGHUP, tests); cheap to clone.
#[derive(Clone)]
pub struct Reloader(Arc<Admin>);

impl Reloader {
    /// New rules and weights take effect for the next request; in-flight ones are untouched.
    /// Changes to listeners or target groups are refused (restart to apply).
    pub fn reload(&self, config: LbConfig) -> Result<(), LbError> {
        admin::reload(&self.0, config)
    }
}

impl LbHandle {
    pub fn reloader(&self) -> Reloader {
        Reloader(Arc::clone(&self.state))
    }

    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Stop accepting, let in-flight requests finish (up to the drain timeout), and return.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(self.drain, self.tasks.wait()).await;
        for r in &self.renewals {
            r.abort();
        }
    }

    /// Wait until `shutdown` (the token given to [`start`]) fires, then drain.
    pub async fn run_until_stopped(self) {
        self.stop.cancelled().await;
        self.shutdown().await;
    }
}

/// Validate `config`, bind everything (port 0 allowed) and start serving.
pub async fn start(config: LbConfig, shutdown: CancellationToken) -> Result<LbHandle, LbError> {
    let compiled = config.compile()?;
    let metrics = Metrics::new();
    let stop = shutdown;
    crate::overload::start(
        crate::overload::Budget::from_mib(config.limits.max_rss_mb, config.limits.max_buffered_mb),
        metrics.registry(),
        stop.clone(),
    );
    let tasks = TaskTracker::new();
    let probe_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
    // The sidecar's pooled upstream client (HTTP/1.1 to targets).
    let client = crate::UpstreamClient::plain(
        config.limits.connect_timeout,
        Duration::from_secs(30),
        false,
    );

    let window_of = |name: &str| {
        config
            .deployments
            .iter()
            .filter(|d| d.to == name)
            .map(|d| d.rollback.window)
            .min()
            .unwrap_or(Duration::from_secs(60))
    };
    let groups: Vec<Arc<TargetGroup>> = compiled
        .target_groups
        .into_iter()
        .map(|(cfg, matcher)| {
            let m = metrics.group(&cfg.name);
            let w = window_of(&cfg.name);
            Arc::new(TargetGroup::new(cfg, matcher, m, w))
        })
        .collect();
    for g in &groups {
        tasks.spawn(health::run(
            Arc::clone(g),
            probe_client.clone(),
            stop.clone(),
        ));
        if let Some(src) = g.config.discovery.clone() {
            let transport = discovery::transport(&src).map_err(|reason| LbError::Discovery {
                group: g.config.name.clone(),
                reason,
            })?;
            tasks.spawn(discovery::run(Arc::clone(g), src, transport, stop.clone()));
        }
    }
    let shared = Arc::new(Shared {
        groups: groups.clone(),
        client,
        limits: config.limits.clone(),
    });

    let builder = Arc::new(crate::server::server(&ServerSettings {
        max_header_bytes: config.limits.max_header_bytes,
        header_read_timeout: config.limits.header_read_timeout,
        h2_max_streams: MAX_STREAMS,
        h2_max_pending_resets: MAX_PENDING_RESETS,
        h2_keep_alive: Some(Duration::from_secs(30)),
        // Upgrades (WebSocket) are not forwarded by the LB.
        upgrades: false,
    }));
    let mut states = Vec::new();
    let mut bound = Vec::new();
    let mut sockets = Vec::new();
    let mut renewals = Vec::new();
    for cl in compiled.listeners {
        let addr = cl.config.listen;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| LbError::Bind { addr, source })?;
        let local = tcp
            .local_addr()
            .map_err(|source| LbError::Bind { addr, source })?;
        let tls = match (cl.config.protocol, &cl.config.tls) {
            (ListenerProtocol::Https, Some(t)) => {
                let lt = listener_tls(t).await.map_err(|reason| LbError::Tls {
                    listener: cl.config.name.clone(),
                    reason,
                })?;
                renewals.extend(lt.renewal);
                Some(lt.acceptor)
            }
            _ => None,
        };
        bound.push((cl.config.name.clone(), local));
        let state = Arc::new(ListenerState::new(cl.config, cl.index, &metrics, local));
        states.push(Arc::clone(&state));
        sockets.push((tcp, tls, state));
    }

    let mut deployments = Vec::new();
    for d in &config.deployments {
        let (Some(l), Some(g)) = (
            states.iter().find(|s| s.config.name == d.listener),
            groups.iter().find(|g| *g.name == *d.to),
        ) else {
            continue; // compile() already checked both exist
        };
        let dep = deploy::start(d.clone(), l, &metrics);
        tasks.spawn(deploy::run(
            Arc::clone(&dep),
            Arc::clone(l),
            Arc::clone(g),
            metrics.clone(),
            stop.clone(),
        ));
        deployments.push(dep);
    }

    let admin_tcp = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| LbError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = admin_tcp.local_addr().map_err(|source| LbError::Bind {
        addr: config.admin.listen,
        source,
    })?;

    for (tcp, tls, state) in sockets {
        let (shared, builder, stop2, tasks2) = (
            Arc::clone(&shared),
            Arc::clone(&builder),
            stop.clone(),
            tasks.clone(),
        );
        let admission = Admission {
            max_connections: config.limits.max_connections,
            shed_on_pressure: true,
        };
        tasks.spawn(accept_loop(
            tcp,
            tls,
            builder,
            stop2,
            tasks2,
            admission,
            move |peer| {
                let conn = Arc::new(listener::Downstream {
                    peer: listener::Peer::new(peer, state.scheme()),
                    shared: Arc::clone(&shared),
                    listener: Arc::clone(&state),
                });
                move |req| listener::handle(Arc::clone(&conn), req)
            },
        ));
    }
    let drain = config.limits.drain_timeout;
    let admin = Arc::new(Admin {
        config: arc_swap::ArcSwap::from_pointee(config),
        listeners: states,
        groups,
        deployments,
        metrics,
        stop: stop.clone(),
    });
    let state = Arc::clone(&admin);
    tasks.spawn(accept_loop(
        admin_tcp,
        None,
        Arc::clone(&builder),
        stop.clone(),
        tasks.clone(),
        Admission {
            max_connections: ADMIN_CONNECTIONS,
            shed_on_pressure: false,
        },
        move |_peer| {
            let admin = Arc::clone(&admin);
            move |req| admin::handle(Arc::clone(&admin), req)
        },
    ));
    tracing::info!(listeners = ?bound, admin = %admin_addr, "lb started");
    Ok(LbHandle {
        listeners: bound,
        admin: admin_addr,
        state,
        stop,
        tasks,
        drain,
        renewals,
    })
}

/// Most concurrent HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 256;
const MAX_PENDING_RESETS: usize = 64;

/// Concurrent connections to the admin port.
const ADMIN_CONNECTIONS: usize = 256;

/// Which connections an accept loop takes: at most `max_connections` at once, and none under
/// memory pressure when `shed_on_pressure` (the admin port stays reachable; its requests are
/// never shed either).
#[derive(Clone, Copy)]
struct Admission {
    max_connections: usize,
    shed_on_pressure: bool,
}

async fn accept_loop<F, H, Fut>(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    server: Arc<HttpServer>,
    stop: CancellationToken,
    tasks: TaskTracker,
    admission: Admission,
    make_handler: F,
) where
    F: Fn(SocketAddr) -> H,
    H: Fn(http::Request<ProxyBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<LbBody>, Infallible>> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(
        admission.max_connections.max(1),
    ));
    let shed_on_pressure = admission.shed_on_pressure;
    // New requests under memory pressure get 503 + `Retry-After` before any work is done for
    // them ([`crate::overload::shed_request`]).
    let shed = move || {
        shed_on_pressure
            .then(crate::overload::shed_request)
            .flatten()
            .map(|r| r.map(listener::local))
    };
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the cap, or under memory pressure: closed before any work is spent on it.
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(sock);
            continue;
        };
        if shed_on_pressure && !crate::overload::admit_connection() {
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        let handler = make_handler(peer);
        let (server, stop, tls) = (Arc::clone(&server), stop.clone(), tls.clone());
        tasks.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(sock, &server, HttpMode::Auto, stop, shed, handler).await,
                Some(acc) => {
                    let _tls_buffers = Held::new(TLS_BUFFER_BYTES);
                    let hs = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(sock)).await;
                    if let Ok(Ok(s)) = hs {
                        serve_connection(s, &server, HttpMode::Auto, stop, shed, handler).await;
                    }
                }
            }
        });
    }
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
