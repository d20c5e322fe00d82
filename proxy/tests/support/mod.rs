//! Fixtures: a real HTTP app, a TCP echo server, a fake control plane speaking the watch API, and
//! plain HTTP clients. Everything on 127.0.0.1 with ephemeral ports.
#![allow(dead_code)]
// Test fixtures: a failed setup should abort the test loudly.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_core::{Endpoint, EndpointSet, HealthStatus};
use trellis_proxy::{Config, Running};

pub mod cp_fixtures;
pub mod slow;

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A test app. Paths: `/echo` streams the body back, `/status/N`, `/slow` (400 ms), `/upgrade`
/// (101 then echo), anything else answers the app's name. `fail_with` overrides every status.
pub struct App {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn app(name: &'static str, fail_with: Option<u16>) -> App {
    app_at(name, fail_with, "127.0.0.1:0".parse().unwrap()).await
}

/// [`app`] on a given address.
pub async fn app_at(name: &'static str, fail_with: Option<u16>, at: SocketAddr) -> App {
    let l = TcpListener::bind(at).await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (h, s) = (hits.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) =
                tokio::select! { _ = s.cancelled() => return, r = l.accept() => r.unwrap() };
            let hits = h.clone();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    handle(name, fail_with, req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                tokio::select! { _ = conn => {}, _ = s.cancelled() => {} }
            });
        }
    });
    App { addr, hits, stop }
}

async fn handle(
    name: &'static str,
    fail_with: Option<u16>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut resp = match req.uri().path() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Response::new(full(name))
        }
        "/headers" => {
            let mut s = String::new();
            for (k, v) in req.headers() {
                s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Response::new(full(s))
        }
        "/upgrade" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            r
        }
        p if p.starts_with("/status/") => {
            let mut r = Response::new(full(name));
            *r.status_mut() = StatusCode::from_u16(p[8..].parse().unwrap()).unwrap();
            r
        }
        _ => Response::new(full(name)),
    };
    if let Some(code) = fail_with {
        *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    }
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    Ok(resp)
}

/// A fake control plane: the watch API over one service's endpoint set, which tests change.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub set: tokio::sync::watch::Sender<EndpointSet>,
    stop: CancellationToken,
}

impl ControlPlane {
    pub fn publish(&self, endpoints: &[(&str, SocketAddr, HealthStatus)]) {
        self.set.send_modify(|s| {
            s.revision += 1;
            s.endpoints = endpoints
                .iter()
                .map(|(id, a, h)| Endpoint {
                    instance_id: (*id).into(),
                    address: a.ip(),
                    port: a.port(),
                    weight: 1,
                    health: *h,
                    attributes: Default::default(),
                })
                .collect();
        });
    }

    /// Stops answering (the control plane is down).
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

pub async fn control_plane(namespace: &str, service: &str) -> ControlPlane {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(EndpointSet {
        namespace: namespace.into(),
        service: service.into(),
        revision: 0,
        endpoints: vec![],
        tags: Default::default(),
        attributes: Default::default(),
    });
    let stop = CancellationToken::new();
    let s = stop.clone();
    let path = format!("/v1/watch/{namespace}/{service}");
    tokio::spawn(async move {
        loop {
            let (stream, _) =
                tokio::select! { _ = s.cancelled() => return, r = l.accept() => r.unwrap() };
            let (rx, path, s) = (rx.clone(), path.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (mut rx, path) = (rx.clone(), path.clone());
                    async move {
                        if req.uri().path() != path {
                            let mut r = Response::new(full(r#"{"message":"unknown service"}"#));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            return Ok::<_, Infallible>(r);
                        }
                        let seen: Option<u64> = req
                            .uri()
                            .query()
                            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("revision=")))
                            .and_then(|v| v.parse().ok());
                        if Some(rx.borrow_and_update().revision) == seen {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
                        }
                        let body = serde_json::to_string(&*rx.borrow()).unwrap();
                        Ok(Response::new(full(body)))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! { _ = conn => {}, _ = s.cancelled() => {} }
            });
        }
    });
    ControlPlane {
        addr,
        set: tx,
        stop,
    }
}

pub fn h1_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET and return (status, x-backend, body).
pub async fn get(client: &Client<HttpConnector, Body>, url: &str) -> (u16, String, Bytes) {
    let resp = client
        .request(Request::get(url).body(full("")).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, backend, body)
}

pub fn body(b: impl Into<Bytes>) -> Body {
    full(b)
}

/// Starts a sidecar from TOML; shutting down is the caller's token.
pub async fn sidecar(toml: &str) -> (Running, CancellationToken) {
    let config = Config::from_toml(toml).unwrap();
    let token = CancellationToken::new();
    let running = trellis_proxy::start(config, token.clone()).await.unwrap();
    (running, token)
}

/// Config head every test shares: identity, admin on an ephemeral port, fast timeouts.
pub fn base() -> String {
    r#"
[identity]
namespace = "my-app.local"
service = "web"

[admin]
listen = "127.0.0.1:0"

[resilience]
connect_timeout = "500ms"
per_try_timeout = "2s"
request_timeout = "5s"
"#
    .to_owned()
}

/// Waits (up to 5 s) until `app` has seen at least `n` requests: "the request is in flight".
pub async fn wait_hits(app: &App, n: usize) {
    for _ in 0..500 {
        if app.hits.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "app saw {} requests, expected {n}",
        app.hits.load(Ordering::SeqCst)
    );
}

/// Waits (up to 10 s) for the overload guard's pressure level `want`.
pub async fn until_pressure(what: &str, want: trellis_proxy::overload::Pressure) {
    use trellis_proxy::overload::pressure;
    for _ in 0..200 {
        if pressure() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{what}: pressure stayed {:?}, rss {:?}, buffered {}",
        pressure(),
        trellis_proxy::overload::rss_bytes(),
        trellis_proxy::buffered::buffered_bytes()
    );
}

/// One GET on an open keep-alive connection; returns the response head.
pub async fn on(conn: &mut tokio::net::TcpStream, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// The admin port's `/metrics` text (the whole HTTP response).
pub async fn admin_metrics(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).await.unwrap();
    text
}

/// Asserts that a new connection to `port` is closed at accept, before any answer.
pub async fn assert_closed_at_accept(port: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut fresh = tokio::net::TcpStream::connect(port).await.unwrap();
    let _ = fresh.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a new connection is closed at accept");
}

/// Asserts that a new request on the open connection is shed: 503 with `Retry-After: 1`.
pub async fn assert_shed(open: &mut tokio::net::TcpStream, host: &str) {
    let shed = on(open, host).await;
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );
}

/// The value of one sample (`name` with its labels) in a Prometheus text page.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
}
