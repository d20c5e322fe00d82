//! Assembling the sidecar from its config: clusters and watchers, the inbound listener (to the local
//! app), the outbound listeners (egress by Host, per-upstream local ports), the admin listener, and
//! the drain sequence. Requests flow, top to bottom:
//! accept → (TLS → authz) → route → circuit breaker → balance → retry → timeout → connect.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use rustls_pki_types::CertificateDer;
use trellis_ca::cp_client::Transport;
use trellis_ca::{Identity, TrustBundle};
use trellis_core::SpiffeId;

use crate::admin::{Admin, Health};
use crate::authz::authorize;
use crate::balance::{RoundRobin, balancer};
use crate::body::ProxyBody;
use crate::client::UpstreamClient;
use crate::cluster::{Cluster, EndpointSpec};
use crate::config::{
    Config, ControlPlaneConfig, Decision, HostPort, Protocol, ResilienceConfig, StaticCluster,
    UpstreamConfig,
};
use crate::deregister::Deregistration;
use crate::egress::Egress;
use crate::error::{ProxyError, StartError};
use crate::forward::{ForwardPolicy, Target, error_response, forward};
use crate::listener::{AcceptContext, bind_reuseport, spawn_accept};
use crate::live_intentions::{LiveIntentions, OwnServiceSink};
use crate::live_routes::{LiveRoutes, SubsetClusters, UpstreamSink};
use crate::metrics::Metrics;
use crate::outbound::{Router, Subset, subset_name};
use crate::server::{HttpMode, serve};
use crate::tls::{ALPN_H2, ALPN_HTTP1, InboundTls, MtlsConnector, client_config};
use crate::watch::{self, WatchSink, WatchTarget};

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
    intentions: Arc<LiveIntentions>,
    identity: Option<Arc<Identity>>,
    routes: Arc<LiveRoutes>,
    /// The static clusters as last loaded (attribute subsets made later start from them).
    static_clusters: Arc<ArcSwap<Vec<StaticCluster>>>,
    /// Upstream service names in config order.
    upstreams: Vec<String>,
    /// Cancelled when the drain has finished (or its task ended any other way).
    drained: CancellationToken,
}

/// What a caller may hand in instead of what the config would fetch.
#[derive(Debug, Default, Clone)]
pub struct StartOptions {
    /// Use this identity instead of bootstrapping one from the control plane (tests, embedding).
    pub identity: Option<Arc<Identity>>,
}

impl Running {
    /// Resolves once shutdown was requested and the drain finished. Borrows, so a handle shared
    /// with a reload in flight can be waited on without polling for the other owners to let go.
    pub async fn wait(&self) {
        self.drained.cancelled().await;
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The workload identity in use (when mTLS is on).
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    /// Applies what can change without restarting: static cluster endpoints, intentions, outbound
    /// routes (same upstreams), the `/config` view.
    /// Listeners and identity need a restart (reported in the log).
    pub fn reload(&self, config: &Config) {
        self.static_clusters
            .store(Arc::new(config.clusters.clone()));
        let subsets = self.routes.subset_clusters();
        for c in &config.clusters {
            let service = c.service.as_str();
            let own = self.clusters.get(service);
            let subsets = subsets
                .iter()
                .filter(|(u, _)| self.upstreams.get(*u).map(String::as_str) == Some(service))
                .map(|(_, c)| c);
            for cluster in own.into_iter().chain(subsets) {
                update_static(cluster, c, cluster.revision() + 1);
            }
        }
        if let Some(inb) = &config.inbound {
            self.intentions.set_configured(inb.intentions.clone());
        }
        // Pinned roots follow their file: the identity's bundle checks peers, renewals and the
        // HTTPS control plane alike.
        if let (Some(id), Some(cp)) = (&self.identity, &config.control_plane) {
            match read_trust_bundle(cp) {
                Ok(Some(roots)) => {
                    if let Err(e) = id.trust_bundle().update(roots) {
                        tracing::warn!(error = %e, "control_plane.trust_bundle not reloaded");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "control_plane.trust_bundle not reloaded"),
            }
        }
        if let Err(e) = self.routes.set_configured(&config.outbound) {
            tracing::warn!(error = %e, "outbound.routes not reloaded");
        }
        self.admin
            .config_json
            .store(Arc::new(config.redacted_json()));
        tracing::info!(
            "configuration reloaded (static clusters, intentions, routes, pinned roots); listener and identity changes need a restart"
        );
    }
}

/// Runs the sidecar until `shutdown` is cancelled and the drain is done.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Binds everything and starts serving; returns the bound addresses (tests bind port 0).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    start_with(config, StartOptions::default(), shutdown).await
}

/// [`start`] with an identity (or other pieces) supplied by the caller.
pub async fn start_with(
    config: Config,
    options: StartOptions,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let watch_stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let admin_tracker = TaskTracker::new();
    let limits = &config.limits;
    let builder = crate::server::builder(limits);
    crate::overload::start(
        crate::overload::Budget::from_mib(limits.max_rss_mb, limits.max_buffered_mb),
        &metrics.registry,
        stop.clone(),
    );
    let ctx = |name: &'static str| AcceptContext {
        name,
        limit: Arc::new(Semaphore::new(limits.max_connections)),
        stop: stop.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
    };
    let r = &config.resilience;
    let policy = ForwardPolicy {
        connect_timeout: r.connect_timeout,
        per_try_timeout: r.per_try_timeout,
        request_timeout: r.request_timeout,
        max_retries: r.max_retries,
    };
    let plain_h1 = UpstreamClient::plain(r.connect_timeout, r.pool_idle_timeout, false);

    // Identity: needed unless every hop is (dangerously) plaintext.
    let needs_tls = config
        .inbound
        .as_ref()
        .is_some_and(|i| !i.danger_allow_plaintext)
        || config
            .outbound
            .upstreams
            .iter()
            .any(|u| !u.danger_plaintext);
    let mut renewal = None;
    let identity = match (needs_tls, options.identity) {
        (false, _) => None,
        (true, Some(id)) => Some(id),
        (true, None) => {
            let id = bootstrap_identity(&config).await?;
            renewal = Some(id.spawn_renewal());
            Some(id)
        }
    };
    if let Some(id) = &identity {
        let own = SpiffeId::new(
            config.identity.trust_domain.clone(),
            config.identity.namespace.clone(),
            config.identity.service.clone(),
        );
        if id.spiffe_id() != &own {
            tracing::warn!(have = %id.spiffe_id(), configured = %own, "identity differs from the configured service");
        }
        spawn_cert_expiry(
            Arc::clone(id),
            metrics.cert_expiry.clone(),
            watch_stop.clone(),
        );
    }
    health.set_identity_loaded();
    let cp_transport = control_plane_transport(&config, identity.as_ref())?;

    // Outbound clusters, one per upstream, in config order (route tables index them).
    let mut clusters: HashMap<String, Arc<Cluster>> = HashMap::new();
    let mut targets: Vec<Target> = Vec::with_capacity(config.outbound.upstreams.len());
    for u in &config.outbound.upstreams {
        let name = u.service.as_str().to_owned();
        let cluster = Arc::new(Cluster::new(
            &name,
            balancer(u.balancer),
            r,
            metrics.upstream(&name),
        ));
        clusters.insert(name.clone(), Arc::clone(&cluster));
        let (client, tcp_tls) = match (&identity, u.danger_plaintext) {
            (Some(id), false) => {
                let ns = u
                    .namespace
                    .clone()
                    .unwrap_or_else(|| config.identity.namespace.clone());
                let expected =
                    SpiffeId::new(config.identity.trust_domain.clone(), ns, u.service.clone());
                let any = client_config(id, expected.clone(), &[ALPN_H2, ALPN_HTTP1])?;
                let h1 = client_config(id, expected.clone(), &[ALPN_HTTP1])?;
                let raw = client_config(id, expected, &[])?;
                (
                    UpstreamClient::mtls(any, h1, r.connect_timeout, r.pool_idle_timeout),
                    Some(MtlsConnector::new(raw, r.connect_timeout)),
                )
            }
            _ => (plain_h1.clone(), None),
        };
        targets.push(Target {
            cluster,
            client,
            policy,
            tcp_tls,
        });
    }
    let upstream_clusters: Vec<Arc<Cluster>> =
        targets.iter().map(|t| Arc::clone(&t.cluster)).collect();
    let router = Arc::new(Router::new(targets));
    // The admin's `/clusters` (and readiness): the upstreams', the app's, and subsets as made.
    let cluster_list: Arc<ArcSwap<Vec<Arc<Cluster>>>> = Arc::default();
    // Static clusters as the latest reload has them: a subset made later starts from these.
    let static_clusters = Arc::new(ArcSwap::from_pointee(config.clusters.clone()));
    let make_cluster = subset_clusters(
        &config.outbound.upstreams,
        r,
        &metrics,
        &cluster_list,
        &static_clusters,
    );
    // Each upstream's watch also brings the routes its service pushes.
    let routes_json = Arc::new(ArcSwap::from_pointee(String::new()));
    let routes = Arc::new(LiveRoutes::new(
        config.outbound.clone(),
        Arc::clone(&router),
        metrics.clone(),
        Arc::clone(&routes_json),
        make_cluster,
    )?);
    for (pos, (u, cluster)) in config
        .outbound
        .upstreams
        .iter()
        .zip(&upstream_clusters)
        .enumerate()
    {
        let sink = || {
            Arc::new(UpstreamSink {
                cluster: Arc::clone(cluster),
                routes: Arc::clone(&routes),
                upstream: pos,
            })
        };
        feed(cluster, sink, u, &config, &cp_transport, &watch_stop);
    }

    // Per-upstream local listeners.
    let mut upstream_addrs = BTreeMap::new();
    for (pos, u) in config.outbound.upstreams.iter().enumerate() {
        let Some(port) = u.local_port else { continue };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listeners =
            bind_reuseport(addr, config.runtime.acceptors).map_err(|source| StartError::Bind {
                what: "upstream listener",
                addr,
                source,
            })?;
        upstream_addrs.insert(u.service.to_string(), local_addr(&listeners, addr));
        let router = Arc::clone(&router);
        match u.protocol {
            Protocol::Http => {
                let (builder, stop, log) =
                    (builder.clone(), stop.clone(), config.runtime.access_log);
                spawn_accept(listeners, ctx("outbound"), move |stream, peer| {
                    let router = Arc::clone(&router);
                    let (builder, stop) = (builder.clone(), stop.clone());
                    async move {
                        serve(stream, &builder, HttpMode::Auto, stop, move |req| {
                            route_and_proxy(Arc::clone(&router), pos, req, peer, log)
                        })
                        .await;
                    }
                });
            }
            Protocol::Tcp => {
                let connect_timeout = r.connect_timeout;
                spawn_accept(listeners, ctx("outbound"), move |stream, peer| {
                    let router = Arc::clone(&router);
                    async move {
                        if let Some(target) = router.route_tcp(pos, peer.ip()) {
                            relay_to_cluster(stream, target, connect_timeout).await;
                        }
                    }
                });
            }
        }
    }

    // Egress listener: direct connections by Host, intercepted ones by original destination.
    let mut egress_addr = None;
    if let Some(addr) = config.outbound.egress_listen {
        let listeners =
            bind_reuseport(addr, config.runtime.acceptors).map_err(|source| StartError::Bind {
                what: "egress listener",
                addr,
                source,
            })?;
        egress_addr = Some(local_addr(&listeners, addr));
        let egress = Arc::new(Egress::new(
            &config.outbound,
            &config.identity.namespace,
            Arc::clone(&router),
            builder.clone(),
            stop.clone(),
            config.runtime.access_log,
            r.connect_timeout,
        ));
        spawn_accept(listeners, ctx("egress"), move |stream, peer| {
            Arc::clone(&egress).handle(stream, peer)
        });
    }

    // Inbound listener: to the local app.
    let mut inbound_addr = None;
    let intentions = LiveIntentions::new(
        config
            .inbound
            .as_ref()
            .map(|i| i.intentions.clone())
            .unwrap_or_default(),
    );
    // Intentions the control plane pushes as tags of this service win over the configured ones.
    if let (Some(_), Some(cp)) = (&config.inbound, &config.control_plane) {
        let own = WatchTarget {
            control_planes: cp.addresses.iter().map(|a| a.authority().clone()).collect(),
            namespace: config.identity.namespace.clone(),
            service: config.identity.service.clone(),
            wait: cp.watch_wait,
            transport: cp_transport.clone(),
        };
        let sink = Arc::new(OwnServiceSink(Arc::clone(&intentions)));
        tokio::spawn(watch::run(own, sink, watch_stop.clone()));
    }
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
            tcp_tls: None,
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
        let tls = match (&identity, inb.danger_allow_plaintext) {
            (Some(id), false) => Some((InboundTls::new(id)?, id.spiffe_id().to_uri())),
            _ => None,
        };
        let (builder, stop, log) = (builder.clone(), stop.clone(), config.runtime.access_log);
        let (protocol, intentions, metrics) =
            (inb.protocol, Arc::clone(&intentions), metrics.clone());
        let handshake_timeout = limits.header_read_timeout;
        spawn_accept(listeners, ctx("inbound"), move |stream, _peer| {
            let conn = InboundConn {
                target: target.clone(),
                builder: builder.clone(),
                stop: stop.clone(),
                header: identity_header.clone(),
                intentions: Arc::clone(&intentions),
                metrics: metrics.clone(),
                access_log: log,
                protocol,
                connect_timeout: target.policy.connect_timeout,
            };
            let tls = tls.clone();
            async move {
                match tls {
                    None => conn.serve_plain(stream).await,
                    Some((tls, own)) => conn.serve_tls(stream, &tls, &own, handshake_timeout).await,
                }
            }
        });
    }

    // Admin listener.
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        health: Arc::clone(&health),
        config_json: ArcSwap::from_pointee(config.redacted_json()),
        clusters: {
            cluster_list.rcu(|subsets| {
                clusters
                    .values()
                    .chain(subsets.iter())
                    .cloned()
                    .collect::<Vec<_>>()
            });
            cluster_list
        },
        routes_json,
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
                crate::server::serve_admin(stream, &builder, stop, move |req| {
                    let admin = Arc::clone(&admin);
                    async move { admin.handle(&req) }
                })
                .await;
            }
        });
    }

    // Drain: fail /ready, leave discovery (so peers stop picking us while we still accept), stop
    // accepting, finish in-flight up to the drain timeout, then stop the rest.
    let drain_timeout = config.runtime.drain_timeout;
    let leave = deregistration(&config, &cp_transport);
    let drained = CancellationToken::new();
    let drained_guard = drained.clone().drop_guard();
    tokio::spawn(async move {
        let _drained = drained_guard;
        shutdown.cancelled().await;
        tracing::info!("draining");
        health.set_draining();
        if let Some(d) = leave {
            match tokio::time::timeout(DEREGISTER_TIMEOUT, d.run()).await {
                Ok(Ok(())) => {
                    tracing::info!(instance = %d.instance_id, "deregistered from discovery")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "deregistration failed; draining anyway"),
                Err(_) => tracing::warn!("deregistration timed out; draining anyway"),
            }
        }
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout: closing remaining connections");
        }
        watch_stop.cancel();
        if let Some(r) = renewal {
            r.abort();
        }
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
        intentions,
        identity,
        routes,
        static_clusters,
        upstreams: config
            .outbound
            .upstreams
            .iter()
            .map(|u| u.service.as_str().to_owned())
            .collect(),
        drained,
    })
}

/// Upper bound on leaving discovery at shutdown (the drain goes on either way).
const DEREGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What to deregister at shutdown: only with a control plane and an `instance_id`.
fn deregistration(config: &Config, transport: &Transport) -> Option<Deregistration> {
    let cp = config.control_plane.as_ref()?;
    Some(Deregistration {
        transport: transport.clone(),
        control_plane: cp.address.clone(),
        namespace: config.identity.namespace.clone(),
        service: config.identity.service.clone(),
        service_id: cp.service_id.clone(),
        instance_id: cp.instance_id.clone()?,
    })
}

/// Gives `cluster` (upstream `u`'s, or a subset of it) its endpoints: the static cluster's (those
/// the cluster accepts), or a discovery watch into `sink` until `stop`.
fn feed<S: WatchSink>(
    cluster: &Arc<Cluster>,
    sink: impl FnOnce() -> Arc<S>,
    u: &UpstreamConfig,
    config: &Config,
    transport: &Transport,
    stop: &CancellationToken,
) {
    if let Some(sc) = config.clusters.iter().find(|c| c.service == u.service) {
        update_static(cluster, sc, 1);
    } else if let Some(cp) = &config.control_plane {
        let target = WatchTarget {
            control_planes: cp.addresses.iter().map(|a| a.authority().clone()).collect(),
            namespace: u
                .namespace
                .clone()
                .unwrap_or_else(|| config.identity.namespace.clone()),
            service: u.service.clone(),
            wait: cp.watch_wait,
            transport: transport.clone(),
        };
        tokio::spawn(watch::run(target, sink(), stop.clone()));
    }
}

/// How the live routes make an attribute subset's cluster: named `api[version=v2]`, with its
/// upstream's balancer (the subset's target reuses the upstream's client and identity), holding the
/// static endpoints that carry the attributes, seeded, then listed in `list` (`/clusters`).
fn subset_clusters(
    upstreams: &[UpstreamConfig],
    r: &ResilienceConfig,
    metrics: &Metrics,
    list: &Arc<ArcSwap<Vec<Arc<Cluster>>>>,
    statics: &Arc<ArcSwap<Vec<StaticCluster>>>,
) -> SubsetClusters {
    let (upstreams, r, metrics) = (upstreams.to_vec(), r.clone(), metrics.clone());
    let (list, statics) = (Arc::clone(list), Arc::clone(statics));
    Box::new(move |sub: &Subset, seed: &dyn Fn(&Cluster)| {
        let u = upstreams.get(sub.upstream);
        let service = u.map_or("", |u| u.service.as_str());
        let name = subset_name(service, &sub.attributes);
        let kind = u.map_or_else(Default::default, |u| u.balancer);
        let cluster = Arc::new(
            Cluster::new(&name, balancer(kind), &r, metrics.upstream(&name))
                .with_subset(sub.attributes.clone()),
        );
        if let Some(sc) = statics
            .load()
            .iter()
            .find(|c| c.service.as_str() == service)
        {
            update_static(&cluster, sc, 1);
        }
        seed(&cluster);
        list.rcu(|l| {
            let mut l = Vec::clone(l);
            l.push(Arc::clone(&cluster));
            l
        });
        cluster
    })
}

/// Installs a static cluster's endpoints that `cluster` accepts.
fn update_static(cluster: &Cluster, sc: &StaticCluster, revision: u64) {
    let specs = static_specs(sc).filter(|(_, attrs)| cluster.accepts(attrs));
    cluster.update(specs.map(|(s, _)| s), revision);
}

/// A static cluster's endpoints, each with its attributes (for subsets).
fn static_specs(
    c: &StaticCluster,
) -> impl Iterator<Item = (EndpointSpec, &BTreeMap<String, String>)> + '_ {
    c.endpoints.iter().map(|e| {
        (
            EndpointSpec {
                instance_id: e.address.to_string(),
                addr: e.address,
                weight: e.weight,
            },
            &e.attributes,
        )
    })
}

fn local_addr(listeners: &[tokio::net::TcpListener], fallback: SocketAddr) -> SocketAddr {
    listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(fallback)
}

/// An outbound request for upstream `pos`: its routes pick the cluster, then forward. The router
/// is taken by value (an `Arc` or a reference) so that a per-request handler can return this
/// future as it is: an `async` block around it would be one more layer, and one more copy of
/// the forwarding future, per request.
pub(crate) async fn route_and_proxy(
    router: impl std::ops::Deref<Target = Router>,
    pos: usize,
    req: Request<ProxyBody>,
    peer: SocketAddr,
    access_log: bool,
) -> Response<ProxyBody> {
    let Some(t) = router.route(pos, &req, peer.ip()) else {
        return error_response(&ProxyError::NoRoute);
    };
    // `forward` awaited right here rather than through `proxy`: one async layer (and one more
    // copy of the request in the state hyper moves) fewer on the outbound path.
    if access_log {
        return Box::pin(logged(t, req)).await;
    }
    forward(&t.client, &t.cluster, t.policy, req).await
}

/// Forwards `req` through `target`. The forwarding future is awaited directly (its size is what
/// hyper's service and our box move per request); the access-log path boxes it instead, so no
/// logging state rides along on the common path. `target` by value (an `Arc` or a reference),
/// as for [`route_and_proxy`].
async fn proxy(
    target: impl std::ops::Deref<Target = Target>,
    req: Request<ProxyBody>,
    access_log: bool,
) -> Response<ProxyBody> {
    if access_log {
        return Box::pin(logged(&target, req)).await;
    }
    forward(&target.client, &target.cluster, target.policy, req).await
}

async fn logged(target: &Target, req: Request<ProxyBody>) -> Response<ProxyBody> {
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
pub(crate) async fn relay_to_cluster(
    down: TcpStream,
    target: &Target,
    connect_timeout: std::time::Duration,
) {
    let cluster = &target.cluster;
    let mut avoid = None;
    for _ in 0..=target.policy.max_retries {
        let snapshot = cluster.snapshot();
        let Some(ep) = cluster.pick(&snapshot, avoid) else {
            break;
        };
        let _guard = ep.start();
        if let Some(tls) = &target.tcp_tls {
            match tls.connect_addr(ep.addr).await {
                Ok(mut up) => {
                    let _tls_buffers =
                        crate::buffered::Held::new(crate::buffered::TLS_BUFFER_BYTES);
                    cluster.record(&ep, false, &snapshot);
                    cluster.metrics.response(Some(200));
                    let mut down = down;
                    if let Err(e) = crate::relay::relay_copy(&mut down, &mut up).await {
                        tracing::debug!(error = %e, "tcp relay ended with error");
                    }
                    return;
                }
                Err(_) => {
                    cluster.record(&ep, true, &snapshot);
                    avoid = Some(ep.addr);
                }
            }
            continue;
        }
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

/// Everything one inbound connection needs.
struct InboundConn {
    target: Target,
    builder: crate::server::HttpServer,
    stop: CancellationToken,
    header: HeaderName,
    intentions: Arc<LiveIntentions>,
    metrics: Metrics,
    access_log: bool,
    protocol: Protocol,
    connect_timeout: std::time::Duration,
}

impl InboundConn {
    /// Plaintext (dangerous mode): no verified peer, so a client-supplied identity header is dropped.
    async fn serve_plain(self, stream: TcpStream) {
        match self.protocol {
            Protocol::Tcp => relay_to_cluster(stream, &self.target, self.connect_timeout).await,
            Protocol::Http => {
                let (target, header, log) = (Arc::new(self.target), self.header, self.access_log);
                serve(
                    stream,
                    &self.builder,
                    HttpMode::Auto,
                    self.stop,
                    move |mut req| {
                        req.headers_mut().remove(&header);
                        proxy(Arc::clone(&target), req, log)
                    },
                )
                .await;
            }
        }
    }

    /// mTLS: handshake (client certificate required), authorize the peer's SPIFFE id, then relay
    /// with the verified identity in a header.
    async fn serve_tls(
        self,
        stream: TcpStream,
        tls: &InboundTls,
        own: &str,
        timeout: std::time::Duration,
    ) {
        let acceptor = match self.protocol {
            Protocol::Http => &tls.http,
            Protocol::Tcp => &tls.tcp,
        };
        // rustls' buffers, by their cap, while the connection lives.
        let _tls_buffers = crate::buffered::Held::new(crate::buffered::TLS_BUFFER_BYTES);
        let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.tls_handshake_failures.inc();
                tracing::debug!(error = %e, "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls_handshake_failures.inc();
                return;
            }
        };
        let peer = trellis_ca::peer_spiffe_id(stream.get_ref().1);
        let decision = authorize(&self.intentions.load(), peer.as_ref());
        if decision == Decision::Deny {
            self.metrics.authz_denied.inc();
            tracing::debug!(peer = ?peer.as_ref().map(|p| p.to_uri()), "inbound peer denied by intentions");
        }
        let mode = if stream.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
            HttpMode::Http2
        } else {
            HttpMode::Http1
        };
        match (self.protocol, decision) {
            (Protocol::Tcp, Decision::Deny) => {}
            (Protocol::Tcp, Decision::Allow) => {
                let Some(mut app) = self.connect_app().await else {
                    self.target.cluster.metrics.response(None);
                    return;
                };
                self.target.cluster.metrics.response(Some(200));
                let mut down = stream;
                let _ = crate::relay::relay_copy(&mut down, &mut app).await;
            }
            (Protocol::Http, Decision::Deny) => {
                serve(stream, &self.builder, mode, self.stop, |_req| async {
                    error_response(&ProxyError::Forbidden)
                })
                .await;
            }
            (Protocol::Http, Decision::Allow) => {
                let peer_uri = peer.map(|p| p.to_uri()).unwrap_or_default();
                let value = HeaderValue::from_str(&format!("By={own};URI={peer_uri}")).ok();
                let (target, header, log) = (Arc::new(self.target), self.header, self.access_log);
                serve(stream, &self.builder, mode, self.stop, move |mut req| {
                    req.headers_mut().remove(&header);
                    if let Some(v) = &value {
                        req.headers_mut().insert(header.clone(), v.clone());
                    }
                    proxy(Arc::clone(&target), req, log)
                })
                .await;
            }
        }
    }

    async fn connect_app(&self) -> Option<TcpStream> {
        let addr = self.target.cluster.snapshot().first()?.addr;
        let app = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let _ = app.set_nodelay(true);
        Some(app)
    }
}

/// The control plane's sign API with the join token; the key is generated here and never leaves.
async fn bootstrap_identity(config: &Config) -> Result<Arc<Identity>, StartError> {
    let cp = config.control_plane.as_ref().ok_or_else(|| {
        StartError::Identity(
            "mTLS needs a certificate: configure control_plane (address + token)".into(),
        )
    })?;
    let token = match (&cp.token, &cp.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                StartError::Identity(format!("control_plane.token_file {}: {e}", path.display()))
            })?,
        (None, None) => {
            return Err(StartError::Identity(
                "control_plane.token or control_plane.token_file is required to fetch a certificate"
                    .into(),
            ));
        }
    };
    let pinned = match read_trust_bundle(cp)? {
        Some(roots) => Some(roots),
        None => {
            if !cp.addresses.iter().all(HostPort::is_loopback) {
                tracing::warn!(
                    control_plane = ?cp.addresses,
                    "control_plane.trust_bundle is not set: the mesh's root certificates are taken from the control plane unverified (trust on first use); set it when the network to the control plane is not trusted"
                );
            }
            None
        }
    };
    // Every replica serves the CA: the first certificate and each renewal come from whichever
    // answers, as the watch does.
    let scheme = if cp.tls { "https" } else { "http" };
    let urls: Vec<String> = cp
        .addresses
        .iter()
        .map(|a| format!("{scheme}://{a}"))
        .collect();
    Identity::bootstrap_replicas(
        &urls,
        &token,
        config.identity.trust_domain.clone(),
        None,
        pinned,
    )
    .await
    .map_err(|e| StartError::Identity(format!("bootstrap from {}: {e}", urls.join(", "))))
}

/// `control_plane.trust_bundle`'s (or `trust_bundle_pem`'s) certificates, when set.
fn read_trust_bundle(
    cp: &ControlPlaneConfig,
) -> Result<Option<Vec<CertificateDer<'static>>>, StartError> {
    if let Some(pem) = &cp.trust_bundle_pem {
        return trellis_ca::parse_certs(pem)
            .map(Some)
            .map_err(|e| StartError::Identity(format!("control_plane.trust_bundle_pem: {e}")));
    }
    let Some(path) = &cp.trust_bundle else {
        return Ok(None);
    };
    trellis_ca::read_certs(path)
        .map(Some)
        .map_err(|e| StartError::Identity(format!("control_plane.trust_bundle {e}")))
}

/// How the watch and deregistration reach the control plane: HTTPS verified against the
/// trust bundle with `control_plane.tls`, else plain HTTP. With an identity, its bundle (the
/// pinned roots, updated by reloads) is the one checked.
fn control_plane_transport(
    config: &Config,
    identity: Option<&Arc<Identity>>,
) -> Result<Transport, StartError> {
    let Some(cp) = config.control_plane.as_ref() else {
        return Ok(Transport::plain());
    };
    if !cp.tls {
        if !cp.addresses.iter().all(HostPort::is_loopback) {
            tracing::warn!(
                control_plane = ?cp.addresses,
                "control_plane.tls is off: the join token and the watch cross the network in clear; serve the control plane with --api-tls and set control_plane.tls"
            );
        }
        return Ok(Transport::plain());
    }
    if let Some(id) = identity {
        return Transport::https(id.trust_bundle())
            .map_err(|e| StartError::Identity(format!("control_plane.trust_bundle: {e}")));
    }
    // The config refuses `tls` without a trust bundle.
    let roots = read_trust_bundle(cp)?.unwrap_or_default();
    TrustBundle::new(config.identity.trust_domain.clone(), roots)
        .and_then(|b| Transport::https(&b))
        .map_err(|e| StartError::Identity(format!("control_plane.trust_bundle: {e}")))
}

/// Keeps the cert-expiry gauge current across rotations.
fn spawn_cert_expiry(
    identity: Arc<Identity>,
    gauge: prometheus::IntGauge,
    stop: CancellationToken,
) {
    gauge.set(identity.not_after().unix_timestamp());
    tokio::spawn(async move {
        loop {
            gauge.set(identity.not_after().unix_timestamp());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            }
        }
    });
}
