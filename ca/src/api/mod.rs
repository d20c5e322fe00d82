//! The CA's HTTP API: the native issuance API (`/v1/ca/...`), the AWS Private CA JSON 1.1 API
//! (`X-Amz-Target: ACMPrivateCA.*`) and `/metrics`. [`CaApi`] is a cheap handle that a host
//! server (the control plane) mounts next to its own routes; [`serve`] runs it alone.

pub(crate) mod aws;
mod native;
mod sigv4;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::authority::Authority;
use crate::token::Tokens;

pub use wire::WireError;

/// Largest request body the API reads.
pub const MAX_BODY: usize = 1024 * 1024;
/// How often the CRL is re-signed (its lifetime is 7 days).
pub const CRL_REFRESH: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How often `bundle.pem` is re-read.
pub const BUNDLE_RELOAD: std::time::Duration = std::time::Duration::from_secs(30);
/// AWS account id shown in ARNs.
pub const ACCOUNT_ID: &str = "000000000000";

/// The CA API handle. Clone freely.
#[derive(Clone, Debug)]
pub struct CaApi {
    inner: Arc<ApiInner>,
}

#[derive(Debug)]
struct ApiInner {
    authority: Authority,
    tokens: Tokens,
    region: String,
    ca_arn: String,
}

impl CaApi {
    /// `region` appears in the CA's ARN (`arn:aws:acm-pca:<region>:000000000000:certificate-authority/<id>`).
    pub fn new(authority: Authority, tokens: Tokens, region: &str) -> Self {
        use sha2::Digest;
        let h = hex::encode(sha2::Sha256::digest(authority.intermediate()));
        let id = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        let ca_arn = format!("arn:aws:acm-pca:{region}:{ACCOUNT_ID}:certificate-authority/{id}");
        Self {
            inner: Arc::new(ApiInner {
                authority,
                tokens,
                region: region.to_owned(),
                ca_arn,
            }),
        }
    }

    pub fn authority(&self) -> &Authority {
        &self.inner.authority
    }
    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }
    /// The CA's ARN for the AWS-compatible API.
    pub fn ca_arn(&self) -> &str {
        &self.inner.ca_arn
    }
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// Whether a request is for this API: a path under `/v1/ca/`, or an `X-Amz-Target` header
    /// starting with `ACMPrivateCA.`.
    pub fn matches(parts: &http::request::Parts) -> bool {
        parts.uri.path().starts_with("/v1/ca/")
            || parts
                .headers
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("ACMPrivateCA."))
    }

    /// Answers one request whose body the caller has already read (at most [`MAX_BODY`]).
    pub async fn handle(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        if let Some(target) = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.strip_prefix("ACMPrivateCA."))
        {
            let target = target.to_owned();
            return aws::handle(self, &target, &parts, body).await;
        }
        native::handle(self, &parts, body).await
    }

    /// Re-reads the trust bundle (`root.crt` + `bundle.pem`) of a file-backed CA, so
    /// `trellis-ca bundle add|remove` takes effect without a restart. Returns the root count.
    pub fn reload_trust_bundle(&self) -> Result<usize, crate::CaError> {
        let Some(dir) = self.inner.authority.dir() else {
            return Ok(self.inner.authority.roots().len());
        };
        let roots = crate::CaDir::new(dir).trust_roots()?;
        let n = roots.len();
        if *self.inner.authority.roots() != roots {
            tracing::info!(roots = n, "trust bundle reloaded");
            self.inner.authority.set_roots(roots);
        }
        Ok(n)
    }

    /// Background upkeep a host must run once per CA: re-reads the trust bundle every
    /// [`BUNDLE_RELOAD`] and re-signs the CRL every [`CRL_REFRESH`] so it never expires (it is
    /// also re-signed on every revocation).
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        let api = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BUNDLE_RELOAD);
            tick.tick().await;
            let mut last_crl = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let a = api.clone();
                let crl_due = last_crl.elapsed() >= CRL_REFRESH;
                let res = tokio::task::spawn_blocking(move || {
                    a.reload_trust_bundle()?;
                    if crl_due {
                        a.authority().regenerate_crl()?;
                    }
                    Ok::<(), crate::CaError>(())
                })
                .await;
                match res {
                    Ok(Ok(())) => {
                        if crl_due {
                            last_crl = tokio::time::Instant::now();
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "CA maintenance failed"),
                    Err(e) => tracing::error!(error = %e, "CA maintenance task failed"),
                }
            }
        })
    }

    /// `/metrics` in Prometheus text format.
    pub fn metrics_response(&self) -> Response<Full<Bytes>> {
        self.inner.authority.update_expiry_gauges();
        wire::text_response(
            StatusCode::OK,
            self.inner.authority.metrics().render(),
            "text/plain; version=0.0.4",
        )
    }
}

/// `CaApi` as a tower service over already-read bodies (for hosts that compose tower layers).
impl tower::Service<Request<Bytes>> for CaApi {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move { Ok(api.handle(req).await) })
    }
}

/// Reads a body with the [`MAX_BODY`] limit.
async fn read_body(body: Incoming) -> Result<Bytes, ()> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| ())
}

/// Bound on one client's TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the API (plus `GET /metrics`) on `listener` until `shutdown` resolves.
/// With `tls`, each connection is a TLS one first (handshakes bounded to 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    api: CaApi,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    let maintenance = api.spawn_maintenance();
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(route(&api, req).await) }
        });
        let Some(tls) = &tls else {
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
            continue;
        };
        // The handshake runs in the connection's task: a slow client does not hold up accepts.
        let accept = tls.accept(stream);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await else {
                return;
            };
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    maintenance.abort();
    graceful.shutdown().await;
    Ok(())
}

async fn route(api: &CaApi, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if parts.method == http::Method::GET && parts.uri.path() == "/metrics" {
        return api.metrics_response();
    }
    if !CaApi::matches(&parts) {
        return WireError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "UnknownOperationException",
            "no such route",
        )
        .native();
    }
    let Ok(body) = read_body(body).await else {
        return WireError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "ValidationException",
            format!("request body larger than {MAX_BODY} bytes"),
        )
        .native();
    };
    api.handle(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn api() -> CaApi {
        let a = Authority::in_memory("mesh.local".parse().unwrap(), Default::default()).unwrap();
        CaApi::new(a, Tokens::in_memory(), "us-east-1")
    }

    #[tokio::test]
    async fn oneshot_routes() {
        let r = api()
            .oneshot(Request::get("/v1/ca/roots").body(Bytes::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = api()
            .oneshot(Request::post("/v1/ca/sign").body(Bytes::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = api()
            .oneshot(
                Request::post("/")
                    .header("x-amz-target", "ACMPrivateCA.DescribeCertificateAuthority")
                    .body(Bytes::from_static(b"{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            r.headers().get("x-amzn-errortype").unwrap(),
            "MissingAuthenticationTokenException"
        );
    }

    #[test]
    fn matches_paths_and_targets() {
        let (p, _) = Request::get("/v1/ca/roots").body(()).unwrap().into_parts();
        assert!(CaApi::matches(&p));
        let (p, _) = Request::post("/")
            .header("X-Amz-Target", "ACMPrivateCA.IssueCertificate")
            .body(())
            .unwrap()
            .into_parts();
        assert!(CaApi::matches(&p));
        let (p, _) = Request::post("/")
            .header("X-Amz-Target", "Route53AutoNaming_v20170314.ListServices")
            .body(())
            .unwrap()
            .into_parts();
        assert!(!CaApi::matches(&p));
    }

    #[tokio::test]
    async fn admin_creates_tokens_and_reads_the_audit_log() {
        let api = api();
        let admin = api.tokens().create(crate::Scope::Admin).unwrap().bearer();
        let call = |method: &str, path: &str, token: &str, body: &'static str| {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .body(Bytes::from_static(body.as_bytes()))
                .unwrap();
            api.clone().oneshot(req)
        };
        let r = call(
            "POST",
            "/v1/ca/tokens",
            &admin,
            r#"{"namespace":"n","service":"s"}"#,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let token = v["token"].as_str().unwrap().to_owned();
        let scope = api.tokens().check_bearer(&token).unwrap();
        assert!(scope.allows(&"n".parse().unwrap(), &"s".parse().unwrap()));
        // Only admins; a body naming half a scope is refused.
        for (token, body, status) in [
            (&token, r#"{"admin":true}"#, StatusCode::FORBIDDEN),
            (&admin, r#"{"namespace":"n"}"#, StatusCode::BAD_REQUEST),
            (
                &admin,
                r#"{"admin":true,"service":"s"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (&admin, "not json", StatusCode::BAD_REQUEST),
        ] {
            let r = call("POST", "/v1/ca/tokens", token, body).await.unwrap();
            assert_eq!(r.status(), status, "{body}");
        }
        assert_eq!(
            call("GET", "/v1/ca/audit", &token, "")
                .await
                .unwrap()
                .status(),
            StatusCode::FORBIDDEN
        );
        let r = call("GET", "/v1/ca/audit", &admin, "").await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            call("DELETE", "/v1/ca/audit", &admin, "")
                .await
                .unwrap()
                .status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
