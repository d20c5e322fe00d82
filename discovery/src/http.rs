//! The HTTP front of the control plane: the Cloud Map API (`POST /`), the watch API, TTL
//! heartbeats, `/metrics` and the CA. Limits: 1 MiB bodies, header read timeout, bounded
//! connections, and a per-client request rate on the AWS APIs (`ThrottlingException`).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::sigv4::{self, Credentials};
use crate::throttle::{RateLimit, Throttle};

/// Largest request body accepted (AWS JSON and CSRs are far smaller).
pub const MAX_BODY: usize = 1 << 20;
/// Time a client has to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections; further accepts wait (in the kernel's bounded backlog).
pub const MAX_CONNECTIONS: usize = 4096;
/// Default per-client rate of AWS API calls (Cloud Map and AWS Private CA), by client address.
pub const DEFAULT_CLIENT_RATE: RateLimit = RateLimit {
    per_second: 200.0,
    burst: 400,
};
/// Watch long-poll bounds.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
pub const MAX_WAIT: Duration = Duration::from_secs(300);

const AMZ_JSON: &str = "application/x-amz-json-1.1";
const TARGET_PREFIX: &str = "Route53AutoNaming_v20170314.";

/// Who may call the Cloud Map API.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub credentials: Option<Credentials>,
    /// Require a valid SigV4 signature (the default off loopback).
    pub require_signature: bool,
}

/// Optional extra handler mounted on the front (the CA issuance API).
pub trait Mount: Send + Sync + 'static {
    fn matches(&self, parts: &http::request::Parts) -> bool;
    fn handle(
        &self,
        req: Request<Bytes>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send + '_>>;
    /// Extra Prometheus text appended to `/metrics`.
    fn metrics(&self) -> Option<Vec<u8>> {
        None
    }
    /// The built-in CA, when this mount is it (the API's own certificate comes from it).
    fn authority(&self) -> Option<&trellis_ca::Authority> {
        None
    }
    /// Background upkeep started with the server and stopped with it.
    fn spawn_maintenance(&self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

pub struct Front {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub mounts: Vec<Box<dyn Mount>>,
    /// Per-client limit on AWS API calls; `None`: unlimited.
    pub throttle: Option<Throttle>,
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn api_error(e: &ApiError) -> Resp {
    let (code, status) = e.wire();
    let mut r = respond(status, AMZ_JSON, e.body());
    if let Ok(v) = code.parse() {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

fn native_error(status: StatusCode, error: &str, message: &str) -> Resp {
    let body = serde_json::json!({"error": error, "message": message}).to_string();
    respond(status, "application/json", body)
}

impl Front {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: IpAddr) -> Resp {
        let (parts, body) = req.into_parts();
        if let (Some(t), Some(target)) = (&self.throttle, parts.headers.get("x-amz-target"))
            && !t.admit(peer)
        {
            let label = target
                .to_str()
                .ok()
                .and_then(|t| t.strip_prefix(TARGET_PREFIX))
                .filter(|a| KNOWN_ACTIONS.contains(a))
                .unwrap_or("unknown");
            let e = ApiError::Throttling("Rate exceeded".into());
            self.metrics
                .api_requests
                .with_label_values(&[label, e.code()])
                .inc();
            return api_error(&e);
        }
        if parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return api_error(&ApiError::PayloadTooLarge(format!(
                "request body exceeds {MAX_BODY} bytes"
            )));
        }
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return api_error(&ApiError::PayloadTooLarge(format!(
                    "request body exceeds {MAX_BODY} bytes or was cut short"
                )));
            }
        };
        for m in &self.mounts {
            if m.matches(&parts) {
                return m.handle(Request::from_parts(parts, body)).await;
            }
        }
        let path = parts.uri.path().to_owned();
        match (&parts.method, path.as_str()) {
            (&Method::POST, "/") => self.cloud_map(parts, body).await,
            (&Method::GET, "/metrics") => {
                let mut text = self.metrics.render(&self.registry);
                for m in &self.mounts {
                    text.extend(m.metrics().unwrap_or_default());
                }
                respond(StatusCode::OK, "text/plain; version=0.0.4", text)
            }
            (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, p) if p.starts_with("/v1/watch/") => {
                self.watch(&p["/v1/watch/".len()..], parts.uri.query())
                    .await
            }
            (&Method::POST | &Method::PUT, p) if p.starts_with("/v1/heartbeat/") => {
                self.heartbeat(&p["/v1/heartbeat/".len()..])
            }
            _ => native_error(StatusCode::NOT_FOUND, "NotFound", "no such route"),
        }
    }

    async fn cloud_map(&self, parts: http::request::Parts, body: Bytes) -> Resp {
        let start = Instant::now();
        let action = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.strip_prefix(TARGET_PREFIX))
            .map(str::to_owned);
        let result = match (&action, self.check_auth(&parts, &body)) {
            (_, Err(e)) => Err(e),
            (None, _) => Err(ApiError::UnknownOperation(
                "X-Amz-Target must be Route53AutoNaming_v20170314.<Action>".into(),
            )),
            (Some(a), Ok(())) => {
                let reg = self.registry.clone();
                let a = a.clone();
                // Writes fsync: keep them off the async workers.
                match tokio::task::spawn_blocking(move || {
                    crate::api::handle_action(&reg, &a, &body)
                })
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::Internal("request handler failed".into())),
                }
            }
        };
        let label = action
            .as_deref()
            .filter(|a| KNOWN_ACTIONS.contains(a))
            .unwrap_or("unknown");
        self.metrics
            .api_latency
            .with_label_values(&[label])
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                self.metrics
                    .api_requests
                    .with_label_values(&[label, "OK"])
                    .inc();
                respond(StatusCode::OK, AMZ_JSON, v.to_string())
            }
            Err(e) => {
                self.metrics
                    .api_requests
                    .with_label_values(&[label, e.code()])
                    .inc();
                api_error(&e)
            }
        }
    }

    fn check_auth(&self, parts: &http::request::Parts, body: &[u8]) -> Result<(), ApiError> {
        match (&self.auth.credentials, self.auth.require_signature) {
            (Some(c), true) => sigv4::verify(parts, body, c),
            (None, true) => Err(ApiError::UnrecognizedClient(
                "signatures are required but no access key is configured".into(),
            )),
            // Off the hook: signed requests are accepted, signatures not checked.
            (_, false) => Ok(()),
        }
    }

    fn heartbeat(&self, rest: &str) -> Resp {
        let mut it = rest.split('/');
        let (Some(ns), Some(svc), Some(inst), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return native_error(
                StatusCode::BAD_REQUEST,
                "InvalidInput",
                "path must be /v1/heartbeat/<namespace>/<service>/<instance-id>",
            );
        };
        match self.registry.heartbeat(ns, svc, inst) {
            Ok(()) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap_or_default(),
            Err(e) => native_error(e.wire().1, e.code(), &e.to_string()),
        }
    }

    async fn watch(&self, rest: &str, query: Option<&str>) -> Resp {
        let mut it = rest.split('/');
        let (Some(ns), Some(svc), None) = (it.next(), it.next(), it.next()) else {
            return native_error(
                StatusCode::BAD_REQUEST,
                "InvalidInput",
                "path must be /v1/watch/<namespace>/<service>",
            );
        };
        let mut revision = None;
        let mut wait = DEFAULT_WAIT;
        let mut all = false;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "revision" => match v.parse::<u64>() {
                    Ok(r) => revision = Some(r),
                    Err(_) => {
                        return native_error(
                            StatusCode::BAD_REQUEST,
                            "InvalidInput",
                            "revision must be an unsigned integer",
                        );
                    }
                },
                "wait" => match humantime::parse_duration(v) {
                    Ok(d) => wait = d.min(MAX_WAIT),
                    Err(_) => {
                        return native_error(
                            StatusCode::BAD_REQUEST,
                            "InvalidInput",
                            "wait must be a duration such as 30s",
                        );
                    }
                },
                "health" => all = v == "all",
                _ => {}
            }
        }
        let not_found = || {
            native_error(
                StatusCode::NOT_FOUND,
                "ServiceNotFound",
                &format!("service {svc} not found in namespace {ns}"),
            )
        };
        let Some((mut set, mut rx)) = self.registry.endpoint_set(ns, svc, all) else {
            return not_found();
        };
        if revision == Some(set.revision) {
            self.metrics.watchers.inc();
            let changed = tokio::time::timeout(wait, rx.changed()).await;
            self.metrics.watchers.dec();
            if matches!(changed, Ok(Ok(())))
                && let Some((now, _)) = self.registry.endpoint_set(ns, svc, all)
            {
                set = now;
            } else if matches!(changed, Ok(Err(_))) {
                return not_found();
            }
        }
        respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&set).unwrap_or_default(),
        )
    }
}

pub(crate) const KNOWN_ACTIONS: &[&str] = &[
    "CreateHttpNamespace",
    "CreatePrivateDnsNamespace",
    "CreatePublicDnsNamespace",
    "GetNamespace",
    "ListNamespaces",
    "UpdateHttpNamespace",
    "UpdatePrivateDnsNamespace",
    "UpdatePublicDnsNamespace",
    "DeleteNamespace",
    "CreateService",
    "GetService",
    "ListServices",
    "UpdateService",
    "DeleteService",
    "RegisterInstance",
    "DeregisterInstance",
    "GetInstance",
    "ListInstances",
    "DiscoverInstances",
    "DiscoverInstancesRevision",
    "GetInstancesHealthStatus",
    "UpdateInstanceCustomHealthStatus",
    "GetOperation",
    "ListOperations",
    "TagResource",
    "UntagResource",
    "ListTagsForResource",
    // Appended, not sorted in: a fuzz input's first byte picks the action by position.
    "GetServiceAttributes",
    "UpdateServiceAttributes",
    "DeleteServiceAttributes",
];

/// Accepts connections until `shutdown` flips to true, then returns once every connection has
/// ended (each ends on the same signal).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    front: Arc<Front>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connections end with the server: none may outlive it holding the registry (and its store).
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            let Some(tls) = tls else {
                return serve_conn(stream, front, peer.ip(), stop).await;
            };
            // The handshake is bounded like a request head: a silent client holds nothing long.
            match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_conn(stream, front, peer.ip(), stop).await,
                Ok(Err(e)) => {
                    front.metrics.api_tls_handshake_failures.inc();
                    tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                }
                Err(_) => {
                    front.metrics.api_tls_handshake_failures.inc();
                    tracing::debug!(%peer, "API TLS handshake timed out");
                }
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// One HTTP/1.1 connection (plain or TLS) until it ends or the server stops.
async fn serve_conn<IO>(io: IO, front: Arc<Front>, peer: IpAddr, mut stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let front = front.clone();
        async move { Ok::<_, Infallible>(front.handle(req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {}
    }
}
