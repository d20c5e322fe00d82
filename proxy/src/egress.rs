//! The egress listener. A connection the app made to it directly is HTTP routed by `Host`
//! (`api`, `api.<namespace>`). A connection iptables redirected here (transparent interception)
//! is routed by where it was going, read with `SO_ORIGINAL_DST`: to an upstream when the original
//! address is one of its configured `addresses` or a current endpoint IP (what its DNS name
//! resolves to), served as that upstream's protocol (HTTP through its routes, or a raw TCP relay);
//! anything else follows `outbound.unknown_destination` (relayed to the original destination
//! unchanged, refused, or routed by `Host`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::body::ProxyBody;
use futures_util::future::Either;
use http::Request;
use http::header::HOST;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{Destination, OutboundConfig, Protocol, UnknownDestination};
use crate::error::ProxyError;
use crate::forward::error_response;
use crate::listener::original_dst;
use crate::outbound::Router;
use crate::server::{HttpMode, serve};
use crate::sidecar::{relay_to_cluster, route_and_proxy};
use trellis_core::NamespaceName;

type Builder = crate::server::HttpServer;

/// Where an accepted connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Made to the listener itself: HTTP by `Host`.
    ByHost,
    /// Intercepted, bound for upstream `usize`.
    Upstream(usize),
    /// Intercepted, bound for an address no upstream claims.
    Unknown(SocketAddr),
}

/// Everything the egress listener needs; shared by its connections.
pub struct Egress {
    pub router: Arc<Router>,
    /// `Host` name → upstream position.
    hosts: HashMap<String, usize>,
    /// Configured upstream addresses → upstream position.
    addresses: Vec<(Destination, usize)>,
    protocols: Vec<Protocol>,
    unknown: UnknownDestination,
    pub builder: Builder,
    pub stop: CancellationToken,
    pub access_log: bool,
    pub connect_timeout: Duration,
}

impl Egress {
    pub fn new(
        outbound: &OutboundConfig,
        own_namespace: &NamespaceName,
        router: Arc<Router>,
        builder: Builder,
        stop: CancellationToken,
        access_log: bool,
        connect_timeout: Duration,
    ) -> Self {
        let mut hosts = HashMap::new();
        let mut addresses = Vec::new();
        for (pos, u) in outbound.upstreams.iter().enumerate() {
            let ns = u.namespace.as_ref().unwrap_or(own_namespace);
            let name = u.service.as_str();
            hosts.insert(name.to_owned(), pos);
            hosts.insert(format!("{name}.{ns}"), pos);
            addresses.extend(u.addresses.iter().map(|d| (*d, pos)));
        }
        Self {
            router,
            hosts,
            addresses,
            protocols: outbound.upstreams.iter().map(|u| u.protocol).collect(),
            unknown: outbound.unknown_destination,
            builder,
            stop,
            access_log,
            connect_timeout,
        }
    }

    /// Serves one accepted connection to its end.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = stream.local_addr().ok();
        let decision = match original_dst(&stream) {
            Some(orig) if Some(orig) != local => self.classify(orig),
            _ => Dispatch::ByHost,
        };
        tracing::debug!(?decision, %peer, "egress connection");
        match decision {
            Dispatch::ByHost => self.serve_http(stream, peer, None).await,
            Dispatch::Upstream(pos) => match self.protocols.get(pos) {
                Some(Protocol::Tcp) => {
                    if let Some(t) = self.router.route_tcp(pos, peer.ip()) {
                        relay_to_cluster(stream, t, self.connect_timeout).await;
                    }
                }
                _ => self.serve_http(stream, peer, Some(pos)).await,
            },
            Dispatch::Unknown(orig) => match self.unknown {
                UnknownDestination::Passthrough => self.passthrough(stream, orig).await,
                UnknownDestination::Refuse => {
                    tracing::debug!(%orig, "refusing an intercepted connection to an unknown destination");
                }
                UnknownDestination::Host => self.serve_http(stream, peer, None).await,
            },
        }
    }

    /// The upstream an original destination belongs to: a configured address (exact `ip:port`
    /// first), else an upstream whose current endpoints include the IP.
    pub fn classify(&self, orig: SocketAddr) -> Dispatch {
        let configured = |exact: bool| {
            self.addresses
                .iter()
                .find(|(d, _)| matches!(d, Destination::Socket(_)) == exact && d.matches(orig))
                .map(|(_, pos)| *pos)
        };
        if let Some(pos) = configured(true).or_else(|| configured(false)) {
            return Dispatch::Upstream(pos);
        }
        let by_endpoint = |exact: bool| {
            (0..self.protocols.len()).find(|&pos| {
                self.router.target(pos).is_some_and(|t| {
                    t.cluster.snapshot().iter().any(|e| {
                        if exact {
                            e.addr == orig
                        } else {
                            e.addr.ip() == orig.ip()
                        }
                    })
                })
            })
        };
        match by_endpoint(true).or_else(|| by_endpoint(false)) {
            Some(pos) => Dispatch::Upstream(pos),
            None => Dispatch::Unknown(orig),
        }
    }

    /// HTTP on this connection: every request to upstream `fixed`, or (when `None`) to the
    /// upstream its `Host` names; then through that upstream's routes.
    async fn serve_http(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        fixed: Option<usize>,
    ) {
        let me = Arc::clone(self);
        serve(
            stream,
            &self.builder,
            HttpMode::Auto,
            self.stop.clone(),
            // The upstream is known before any await: the request's future is the routing
            // future itself, with no async layer around it.
            move |req| match fixed.or_else(|| upstream_by_host(&me.hosts, &req)) {
                Some(pos) => Either::Left(route_and_proxy(
                    Arc::clone(&me.router),
                    pos,
                    req,
                    peer,
                    me.access_log,
                )),
                None => Either::Right(std::future::ready(error_response(&ProxyError::NoRoute))),
            },
        )
        .await;
    }

    /// The bytes, unchanged, to where the app was going (the sidecar's own uid is not redirected,
    /// so this does not loop back here).
    async fn passthrough(&self, down: TcpStream, orig: SocketAddr) {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(orig)).await {
            Ok(Ok(up)) => {
                let _ = up.set_nodelay(true);
                if let Err(e) = crate::relay::relay_tcp(down, up).await {
                    tracing::debug!(%orig, error = %e, "passthrough relay ended with error");
                }
            }
            Ok(Err(e)) => tracing::debug!(%orig, error = %e, "passthrough connect failed"),
            Err(_) => tracing::debug!(%orig, "passthrough connect timed out"),
        }
    }
}

/// The upstream position for a request's `Host` (or `:authority`), port ignored.
fn upstream_by_host(routes: &HashMap<String, usize>, req: &Request<ProxyBody>) -> Option<usize> {
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
        .copied()
}
