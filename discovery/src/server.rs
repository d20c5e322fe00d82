//! Assembles the control plane: store → registry → HTTP front, DNS, health checker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dns::DnsHandler;
use crate::health::{HealthChecker, HealthConfig};
use crate::http::{Auth, Front, Mount};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};
use crate::sigv4::Credentials;
use crate::store::{EtcdConfig, EtcdStore, MemoryStore, RedbStore, Store, StoreError};
use crate::throttle::{RateLimit, Throttle};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("CA: {0}")]
    Ca(String),
    #[error("API TLS: {0}")]
    ApiTls(String),
}

/// Everything `trellis-discovery serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub api_listen: SocketAddr,
    /// UDP and TCP; `None` disables DNS.
    pub dns_listen: Option<SocketAddr>,
    /// Where the store (and the CA) live; `None` keeps state in memory only (tests).
    pub data_dir: Option<PathBuf>,
    /// Resolver for names outside our zones; `None` answers REFUSED.
    pub dns_forward: Option<SocketAddr>,
    pub credentials: Option<Credentials>,
    /// Require SigV4; `None` means "when the API listens on a non-loopback address".
    pub require_signature: Option<bool>,
    pub health: HealthConfig,
    pub registry: RegistryConfig,
    /// Per-client rate of AWS API calls (`None`: unlimited).
    pub api_rate_limit: Option<RateLimit>,
    /// DNS response-rate limiting per client subnet (`None`: off, the default).
    pub dns_rate_limit: Option<RateLimit>,
    /// Concurrent DNS-over-TCP connections.
    pub dns_max_tcp_connections: usize,
    /// Trust domain of the CA created on first start (`<data-dir>/ca`).
    pub trust_domain: trellis_core::TrustDomain,
    /// Keep the registry in etcd (several replicas) instead of `<data-dir>` (one node).
    pub etcd: Option<EtcdConfig>,
    /// Serve the API over TLS with a certificate from the built-in CA (needs `data_dir`).
    pub api_tls: Option<ApiTls>,
}

/// The HTTPS API's certificate: the control plane's reserved SPIFFE id, plus host names and
/// addresses for clients that check them (the `aws` CLI, curl); renewed by the CA at ~2/3 of its
/// lifetime.
#[derive(Debug, Clone, Default)]
pub struct ApiTls {
    /// DNS names and IP addresses besides `localhost`, `127.0.0.1`, `::1`, the listen address
    /// (when not a wildcard) and the host name.
    pub names: Vec<String>,
}

impl ApiTls {
    /// Every name the certificate carries for an API bound to `listen`.
    pub fn all_names(&self, listen: SocketAddr) -> Vec<String> {
        let mut names = trellis_ca::Identity::local_api_names(listen);
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let h = h.trim();
            if !h.is_empty() {
                names.push(h.to_owned());
            }
        }
        names.extend(self.names.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }
}

impl ServerConfig {
    pub fn new(api_listen: SocketAddr) -> Self {
        ServerConfig {
            api_listen,
            dns_listen: None,
            data_dir: None,
            dns_forward: None,
            credentials: None,
            require_signature: None,
            health: HealthConfig::default(),
            registry: RegistryConfig::default(),
            api_rate_limit: Some(crate::http::DEFAULT_CLIENT_RATE),
            dns_rate_limit: None,
            dns_max_tcp_connections: crate::dns_tcp::MAX_TCP_CONNECTIONS,
            trust_domain: default_trust_domain(),
            etcd: None,
            api_tls: None,
        }
    }
}

fn default_trust_domain() -> trellis_core::TrustDomain {
    // A constant that satisfies the trust-domain grammar.
    match "mesh.local".parse() {
        Ok(t) => t,
        Err(_) => unreachable!("mesh.local is a valid trust domain"),
    }
}

/// A running control plane.
pub struct Server {
    pub api_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    maintenance: Vec<tokio::task::JoinHandle<()>>,
    api_identity: Option<Arc<trellis_ca::Identity>>,
}

/// The API's TLS acceptor: a certificate for the control plane's identity from the built-in CA,
/// kept fresh by the identity's renewal task.
async fn api_tls(
    tls: &ApiTls,
    listen: SocketAddr,
    mounts: &[Box<dyn Mount>],
) -> Result<(tokio_rustls::TlsAcceptor, Arc<trellis_ca::Identity>), ServerError> {
    let err = |e: trellis_ca::CaError| ServerError::ApiTls(e.to_string());
    let authority = mounts.iter().find_map(|m| m.authority()).ok_or_else(|| {
        ServerError::ApiTls(
            "the API's certificate comes from the built-in CA: set a data directory".into(),
        )
    })?;
    let identity = trellis_ca::Identity::control_plane(authority, tls.all_names(listen))
        .await
        .map_err(err)?;
    let config = identity.public_server_config(&[b"http/1.1"]).map_err(err)?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), identity))
}

impl Server {
    /// Opens the store, binds every listener and starts serving. Bound addresses are on the result.
    /// The CA issuance API is mounted when a data directory is set.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let mounts = crate::ca_mount::mounts(&config).await?;
        Self::start_with(config, mounts).await
    }

    /// As [`Server::start`], with extra handlers mounted on the HTTP front (the CA).
    pub async fn start_with(
        config: ServerConfig,
        mounts: Vec<Box<dyn Mount>>,
    ) -> Result<Server, ServerError> {
        let store: Box<dyn Store> = match (&config.etcd, &config.data_dir) {
            (Some(etcd), _) => Box::new(EtcdStore::connect(etcd).await?),
            (None, Some(dir)) => Box::new(RedbStore::open(dir)?),
            (None, None) => Box::new(MemoryStore::default()),
        };
        let registry = Registry::open(store, config.registry.clone())?;
        let metrics = Metrics::new();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut maintenance: Vec<_> = mounts
            .iter()
            .filter_map(|m| m.spawn_maintenance())
            .collect();

        let bind = |addr| move |source| ServerError::Bind { addr, source };
        let listener = TcpListener::bind(config.api_listen)
            .await
            .map_err(bind(config.api_listen))?;
        let api_addr = listener.local_addr().map_err(bind(config.api_listen))?;
        let (tls, api_identity) = match &config.api_tls {
            Some(t) => {
                let (acceptor, identity) = api_tls(t, api_addr, &mounts).await?;
                (Some(acceptor), Some(identity))
            }
            None => {
                if !api_addr.ip().is_loopback() {
                    tracing::warn!(%api_addr, "the API serves plain HTTP off loopback: join tokens and the watch cross the network in clear; --api-tls serves HTTPS");
                }
                (None, None)
            }
        };
        let front = Arc::new(Front {
            registry: registry.clone(),
            metrics: metrics.clone(),
            auth: Auth {
                credentials: config.credentials.clone(),
                require_signature: config
                    .require_signature
                    .unwrap_or(!api_addr.ip().is_loopback()),
            },
            mounts,
            throttle: config.api_rate_limit.map(Throttle::new),
        });
        tasks.spawn(crate::http::serve(listener, tls, front, stop_rx.clone()));

        let mut dns_addr = None;
        if let Some(addr) = config.dns_listen {
            let (udp, tcp, bound) = bind_dns(addr).await?;
            dns_addr = Some(bound);
            let handler = Arc::new(DnsHandler::new(
                registry.clone(),
                metrics.clone(),
                config.dns_forward,
            ));
            // One rate limiter shared by every socket: a client's budget does not grow with them.
            let rrl = config.dns_rate_limit.map(|l| Arc::new(Throttle::new(l)));
            for udp in udp {
                tasks.spawn(crate::dns_udp::serve(
                    Arc::new(udp),
                    handler.clone(),
                    rrl.clone(),
                    stop_rx.clone(),
                ));
            }
            tasks.spawn(crate::dns_tcp::serve(
                tcp,
                handler,
                config.dns_max_tcp_connections,
                stop_rx.clone(),
            ));
        }

        let checker = HealthChecker::new(registry.clone(), metrics.clone(), config.health.clone());
        tasks.spawn(checker.run(stop_rx));

        if let Some(identity) = &api_identity {
            maintenance.push(identity.spawn_renewal());
            metrics.set_api_identity(Arc::clone(identity));
        }
        let scheme = if api_identity.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(%api_addr, ?dns_addr, scheme, "trellis-discovery serving");
        Ok(Server {
            api_addr,
            dns_addr,
            registry,
            metrics,
            stop,
            tasks,
            maintenance,
            api_identity,
        })
    }

    /// `http://addr` or, with API TLS, `https://addr`.
    pub fn api_url(&self) -> String {
        let scheme = if self.api_identity.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.api_addr)
    }

    /// The API's own certificate holder (with API TLS).
    pub fn api_identity(&self) -> Option<&Arc<trellis_ca::Identity>> {
        self.api_identity.as_ref()
    }

    /// Stops accepting, ends connections and background tasks.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        // Aborting only asks; awaiting makes sure every task (and the store handle it holds) is
        // gone when this returns.
        for m in self.maintenance.drain(..) {
            m.abort();
            let _ = m.await;
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start(config).await?;
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

/// UDP and TCP on the same port. With port 0 the UDP port the kernel picks may be taken for TCP:
/// try a few ports. One UDP socket per runtime worker thread (`SO_REUSEPORT`, the kernel spreads
/// clients over them), so DNS over UDP scales with the workers; one worker: one exclusive socket.
async fn bind_dns(
    addr: SocketAddr,
) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), ServerError> {
    let bind = |addr| move |source| ServerError::Bind { addr, source };
    let workers = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    let mut attempts = 0;
    loop {
        let udp = udp_socket(addr, workers > 1).map_err(bind(addr))?;
        let bound = udp.local_addr().map_err(bind(addr))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => {
                let mut socks = vec![udp];
                for _ in 1..workers {
                    socks.push(udp_socket(bound, true).map_err(bind(bound))?);
                }
                return Ok((socks, tcp, bound));
            }
            Err(e) if addr.port() == 0 && attempts < 16 => {
                tracing::debug!(error = %e, %bound, "TCP port taken, trying another");
                attempts += 1;
            }
            Err(e) => return Err(bind(bound)(e)),
        }
    }
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}
