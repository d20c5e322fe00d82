//! A tiny demo HTTP service. `GET /` answers JSON naming the service, version and instance and, when
//! the service has downstream calls configured, the answers of those calls (made through the sidecar's
//! local upstream ports, in plain HTTP: the sidecar adds mTLS). `GET /health` is the health check.
//! `POST /fail` and `POST /recover` flip it into answering 500, for failure demos.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What one demo service instance is.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub service: String,
    pub version: String,
    pub instance: String,
    /// Downstream calls made on `GET /`: (name, base URL), e.g. ("api", "http://127.0.0.1:9191").
    pub calls: Vec<(String, String)>,
}

struct State {
    config: DemoConfig,
    failing: AtomicBool,
    requests: AtomicU64,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Serves until `shutdown` turns true. Returns once the listener is closed.
pub async fn serve(
    listener: TcpListener,
    config: DemoConfig,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let state = Arc::new(State {
        config,
        failing: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` and serves; returns the bound address and the task.
pub async fn spawn(
    addr: SocketAddr,
    config: DemoConfig,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, tokio::spawn(serve(listener, config, shutdown))))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let cfg = &state.config;
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/fail") => {
            state.failing.store(true, Ordering::Relaxed);
            text(StatusCode::OK, "failing\n")
        }
        (&Method::POST, "/recover") => {
            state.failing.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "recovered\n")
        }
        _ if state.failing.load(Ordering::Relaxed) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, "failing on purpose\n")
        }
        (&Method::GET, path) => {
            let peer = req
                .headers()
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut calls = serde_json::Map::new();
            for (name, base) in &cfg.calls {
                calls.insert(name.clone(), call(&state.client, base).await);
            }
            let body = json!({
                "service": cfg.service,
                "version": cfg.version,
                "instance": cfg.instance,
                "path": path,
                "request": n,
                "peer": peer,
                "calls": calls,
            });
            let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    };
    Ok(resp)
}

async fn call(client: &Client<HttpConnector, Full<Bytes>>, base: &str) -> serde_json::Value {
    let Ok(uri) = base.parse::<http::Uri>() else {
        return json!({ "error": format!("bad URL {base}") });
    };
    match client.get(uri).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(body) => {
                    let bytes = body.to_bytes();
                    serde_json::from_slice(&bytes).unwrap_or_else(
                        |_| json!({ "status": status, "body": String::from_utf8_lossy(&bytes) }),
                    )
                }
                Err(e) => json!({ "status": status, "error": e.to_string() }),
            }
        }
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}
