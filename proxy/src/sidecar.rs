//! Assembling the sidecar from its config: clusters and watchers, the inbound listener (to the local
//! app), the outbound listeners (egress by Host, per-upstream local ports), the admin listener, and
//! the drain sequence. Requests flow, top to bottom:
//! accept → (TLS → authz) → route → circuit breaker → balance → retry → timeout → connect.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, Health};
use crate::balance::{RoundRobin, balancer};
use crate::body::ProxyBody;
use crate::client::UpstreamClient;
use crate::cluster::{Cluster, EndpointSpec};
use crate::config::{Config, Protocol, ResilienceConfig, StaticCluster};
use crate::error::{ProxyError, StartError};
use crate::forward::{ForwardPolicy, Target, error_response, forward};
use crate::listener::{AcceptContext, bind_reuseport, spawn_accept};
use crate::metrics::Metrics;
use crate::server::{HttpMode, serve};
use crate::watch::{self, WatchTarget};

/// Name of the cluster holding the local app behind the inbound listener.
pub const APP_CLUSTER: &str = "local_app";

/// A started sidecar: where it listens, and a handle to reload or wait for it.
#[derive(Debug)]
pub struct Running {
    pub admin_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub egress_addr: Option<SocketAddr>,
    /// Per-upstream local listener, by service name.
    pub upstream_addrs: BTreeMap<String, SocketAddr>,
    admin: Arc<Admin>,
    clusters: HashMap<String, Arc<Cluster>>,
    done: JoinHandle<()>,
}

impl Running {
    /// Resolves once shutdown was requested and the drain finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// Applies what can change without restarting: static cluster endpoints, the `/config` view.
    /// Listeners and identity need a restart (reported in the log).
    pub fn reload(&self, config: &Config) {
        for c in &config.clusters {
            if let Some(cluster) = self.clusters.get(c.service.as_str()) {
                cluster.update(static_specs(c), cluster.revision() + 1);
            }
        }
        self.admin
            .config_json
            .store(Arc::new(config.redacted_json()));
        tracing::info!("configuration reloaded (static clusters); listener changes need a restart");
    }
}

/// Runs the sidecar until `shutdown` is cancelled and the drain is done.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Binds everything and starts serving; returns the bound addresses (tests bind port 0).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let watch_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let admin_tracker = TaskTracker::new();
    let limits = &config.limits;
    let builder = crate::server::builder(limits);
    let ctx = |name: &'static str| AcceptContext {
        name,
        limit: Arc::new(Semaphore::new(limits.max_connections)),
        stop: stop.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
    };
    let r = &config.resilience;
    let policy = ForwardPolicy {
        per_try_timeout: r.per_try_timeout,
        request_timeout: r.request_timeout,
        max_retries: r.max_retries,
    };
    let plain_h1 = UpstreamClient::new(r.connect_timeout, r.pool_idle_timeout, false);

    // TODO(mtls): inbound and sidecar-to-sidecar TLS land with the `ca` crate's Identity.
    if let Some(inb) = &config.inbound
        && !inb.danger_allow_plaintext
    {
        return Err(StartError::Identity(
            "inbound mTLS needs a certificate; set inbound.danger_allow_plaintext for plaintext"
                .into(),
        ));
    }
    health.set_identity_loaded();

    // Outbound clusters.
    let mut clusters: HashMap<String, Arc<Cluster>> = HashMap::new();
    let mut targets: HashMap<String, Target> = HashMap::new();
    for u in &config.outbound.upstreams {
        let name = u.service.as_str().to_owned();
        let cluster = Arc::new(Cluster::new(
            &name,
            balancer(u.balancer),
            r,
            metrics.upstream(&name),
        ));
        if let Some(sc) = config.clusters.iter().find(|c| c.service == u.service) {
            cluster.update(static_specs(sc), 1);
        } else if let Some(cp) = &config.control_plane {
            let target = WatchTarget {
                control_plane: cp.address,
                namespace: u
                    .namespace
                    .clone()
                    .unwrap_or_else(|| config.identity.namespace.clone()),
                service: u.service.clone(),
                wait: cp.watch_wait,
            };
            tokio::spawn(watch::run(target, Arc::clone(&cluster), watch_stop.clone()));
        }
        clusters.insert(name.clone(), Arc::clone(&cluster));
        targets.insert(
            name,
            Target {
                cluster,
                client: plain_h1.clone(),
                policy,
            },
        );
    }

    // Per-upstream local listeners.
    let mut upstream_addrs = BTreeMap::new();
    for u in &config.outbound.upstreams {
        let Some(port) = u.local_port else { continue };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listeners =
            bind_reuseport(addr, config.runtime.acceptors).map_err(|source| StartError::Bind {
                what: "upstream listener",
                addr,
                source,
            })?;
        upstream_addrs.insert(u.service.to_string(), local_addr(&listeners, addr));
        let Some(target) = targets.get(u.service.as_str()).cloned() else {
            continue;
        };
        match u.protocol {
            Protocol::Http => {
                let (builder, stop, log) =
                    (builder.clone(), stop.clone(), config.runtime.access_log);
                spawn_accept(listeners, ctx("outbound"), move |stream, _peer| {
                    let target = target.clone();
                    let (builder, stop) = (builder.clone(), stop.clone());
                    async move {
                        serve(stream, &builder, HttpMode::Auto, stop, move |req| {
                            let target = target.clone();
                            async move { proxy_logged(&target, req, log, None).await }
                        })
                        .await;
                    }
                });
            }
            Protocol::Tcp => {
                let connect_timeout = r.connect_timeout;
                spawn_accept(listeners, ctx("outbound"), move |stream, _peer| {
                    let target = target.clone();
                    async move { relay_to_cluster(stream, &target, connect_timeout).await }
                });
            }
        }
    }

    // Egress listener: route by Host.
    let mut egress_addr = None;
    if let Some(addr) = config.outbound.egress_listen {
        let listeners =
            bind_reuseport(addr, config.runtime.acceptors).map_err(|source| StartError::Bind {
                what: "egress listener",
                addr,
                source,
            })?;
        egress_addr = Some(local_addr(&listeners, addr));
        let mut routes: HashMap<String, Target> = HashMap::new();
        for (name, t) in &targets {
            let u = config
                .outbound
                .upstreams
                .iter()
                .find(|u| u.service.as_str() == name);
            let ns = u
                .and_then(|u| u.namespace.clone())
                .unwrap_or_else(|| config.identity.namespace.clone());
            routes.insert(name.clone(), t.clone());
            routes.insert(format!("{name}.{ns}"), t.clone());
        }
        let routes = Arc::new(routes);
        let (builder, stop, log) = (builder.clone(), stop.clone(), config.runtime.access_log);
        spawn_accept(listeners, ctx("egress"), move |stream, _peer| {
            let routes = Arc::clone(&routes);
            let (builder, stop) = (builder.clone(), stop.clone());
            async move {
                serve(stream, &builder, HttpMode::Auto, stop, move |req| {
                    let routes = Arc::clone(&routes);
                    async move {
                        match route_by_host(&routes, &req) {
                            Some(t) => proxy_logged(t, req, log, None).await,
                            None => error_response(&ProxyError::NoRoute),
                        }
                    }
                })
                .await;
            }
        });
    }

    // Inbound listener: to the local app.
    let mut inbound_addr = None;
    if let Some(inb) = &config.inbound {
        let app = Arc::new(Cluster::new(
            APP_CLUSTER,
            Box::new(RoundRobin::default()),
            &ResilienceConfig {
                outlier_consecutive_5xx: 0,
                ..r.clone()
            },
            metrics.upstream(APP_CLUSTER),
        ));
        app.update(
            [EndpointSpec {
                instance_id: "app".into(),
                addr: inb.app,
                weight: 1,
            }],
            1,
        );
        clusters.insert(APP_CLUSTER.into(), Arc::clone(&app));
        let target = Target {
            cluster: app,
            client: plain_h1.clone(),
            policy,
        };
        let listeners = bind_reuseport(inb.listen, config.runtime.acceptors).map_err(|source| {
            StartError::Bind {
                what: "inbound listener",
                addr: inb.listen,
                source,
            }
        })?;
        inbound_addr = Some(local_addr(&listeners, inb.listen));
        let identity_header = HeaderName::from_bytes(inb.identity_header.as_bytes())
            .map_err(|e| StartError::Identity(format!("inbound.identity_header: {e}")))?;
        match inb.protocol {
            Protocol::Http => {
                let (builder, stop, log) =
                    (builder.clone(), stop.clone(), config.runtime.access_log);
                spawn_accept(listeners, ctx("inbound"), move |stream, _peer| {
                    let target = target.clone();
                    let (builder, stop) = (builder.clone(), stop.clone());
                    let header = identity_header.clone();
                    async move {
                        // Plaintext: no verified peer, so a client-supplied identity header is dropped.
                        serve(stream, &builder, HttpMode::Auto, stop, move |mut req| {
                            let target = target.clone();
                            req.headers_mut().remove(&header);
                            async move { proxy_logged(&target, req, log, None).await }
                        })
                        .await;
                    }
                });
            }
            Protocol::Tcp => {
                let connect_timeout = r.connect_timeout;
                spawn_accept(listeners, ctx("inbound"), move |stream, _peer| {
                    let target = target.clone();
                    async move { relay_to_cluster(stream, &target, connect_timeout).await }
                });
            }
        }
    }

    // Admin listener.
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        health: Arc::clone(&health),
        config_json: ArcSwap::from_pointee(config.redacted_json()),
        clusters: ArcSwap::from_pointee(clusters.values().cloned().collect()),
    });
    let listeners = bind_reuseport(config.admin.listen, 1).map_err(|source| StartError::Bind {
        what: "admin listener",
        addr: config.admin.listen,
        source,
    })?;
    let admin_addr = local_addr(&listeners, config.admin.listen);
    {
        let admin = Arc::clone(&admin);
        let admin_ctx = AcceptContext {
            name: "admin",
            limit: Arc::new(Semaphore::new(64)),
            stop: admin_stop.clone(),
            tracker: admin_tracker.clone(),
            metrics: metrics.clone(),
        };
        let (builder, admin_stop) = (builder.clone(), admin_stop.clone());
        spawn_accept(listeners, admin_ctx, move |stream, _peer| {
            let admin = Arc::clone(&admin);
            let (builder, stop) = (builder.clone(), admin_stop.clone());
            async move {
                serve(stream, &builder, HttpMode::Http1, stop, move |req| {
                    let admin = Arc::clone(&admin);
                    async move { admin.handle(&req) }
                })
                .await;
            }
        });
    }

    // Drain: fail /ready, stop accepting, finish in-flight up to the drain timeout, then stop the rest.
    let drain_timeout = config.runtime.drain_timeout;
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("draining");
        health.set_draining();
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout: closing remaining connections");
        }
        watch_stop.cancel();
        admin_stop.cancel();
        admin_tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin_tracker.wait()).await;
        tracing::info!("drained");
    });

    Ok(Running {
        admin_addr,
        inbound_addr,
        egress_addr,
        upstream_addrs,
        admin,
        clusters,
        done,
    })
}

fn static_specs(c: &StaticCluster) -> impl Iterator<Item = EndpointSpec> + '_ {
    c.endpoints.iter().map(|e| EndpointSpec {
        instance_id: e.address.to_string(),
        addr: e.address,
        weight: e.weight,
    })
}

fn local_addr(listeners: &[tokio::net::TcpListener], fallback: SocketAddr) -> SocketAddr {
    listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(fallback)
}

/// The target for a request's `Host` (or `:authority`), port ignored.
fn route_by_host<'a>(
    routes: &'a HashMap<String, Target>,
    req: &Request<Incoming>,
) -> Option<&'a Target> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    routes
        .get(host)
        .or_else(|| routes.get(&host.to_ascii_lowercase()))
}

async fn proxy_logged(
    target: &Target,
    req: Request<Incoming>,
    access_log: bool,
    identity: Option<(&HeaderName, &HeaderValue)>,
) -> Response<ProxyBody> {
    let mut req = req;
    if let Some((name, value)) = identity {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    if !access_log {
        return forward(&target.client, &target.cluster, target.policy, req).await;
    }
    let start = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = forward(&target.client, &target.cluster, target.policy, req).await;
    tracing::info!(
        target: "trellis_proxy::access",
        upstream = target.cluster.name(),
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Raw TCP to a cluster: pick, connect (another endpoint on connect failure), then relay.
async fn relay_to_cluster(down: TcpStream, target: &Target, connect_timeout: std::time::Duration) {
    let cluster = &target.cluster;
    let mut avoid = None;
    for _ in 0..=target.policy.max_retries {
        let snapshot = cluster.snapshot();
        let Some(ep) = cluster.pick(&snapshot, avoid) else {
            break;
        };
        let _guard = ep.start();
        match tokio::time::timeout(connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(up)) => {
                let _ = up.set_nodelay(true);
                cluster.record(&ep, false, &snapshot);
                cluster.metrics.response(Some(200));
                if let Err(e) = crate::relay::relay_tcp(down, up).await {
                    tracing::debug!(error = %e, "tcp relay ended with error");
                }
                return;
            }
            _ => {
                cluster.record(&ep, true, &snapshot);
                avoid = Some(ep.addr);
            }
        }
    }
    cluster.metrics.response(None);
}
