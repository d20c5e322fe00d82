//! How trellis components reach the control plane's HTTP API: `http://` as before, or `https://`
//! where the server must present the control plane's own SPIFFE id
//! (`spiffe://<td>/ns/trellis-system/svc/control-plane`) chained to the mesh's trust bundle.
//! Host names are not what is checked (as with SPIRE agents and their server): replicas are
//! dialled by IP, compose name or Cloud Map name alike, and only the control plane can hold that
//! id, since no token may obtain it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_core::SpiffeId;

use crate::error::CaError;
use crate::trust::{TrustBundle, crypto_provider};

/// Bound on the TCP connect and, separately, on the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The message for an `https://` control plane without a trust bundle to check it against.
pub const NEEDS_BUNDLE: &str = "an https:// control plane is verified against the mesh's root certificates: set the trust bundle (control_plane.trust_bundle)";

/// Connects to a control-plane replica: plain for `http://` URIs, TLS for `https://` ones.
#[derive(Clone)]
pub struct ControlPlaneConnector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for ControlPlaneConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneConnector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ControlPlaneConnector {
    /// Plain HTTP only: an `https://` URI fails to connect with [`NEEDS_BUNDLE`].
    pub fn plain() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        Self { http, tls: None }
    }

    /// `http://` and `https://`; the latter verified against `bundle` (which follows root
    /// rotations when the bundle is updated).
    pub fn with_bundle(bundle: &Arc<TrustBundle>) -> Result<Self, CaError> {
        let expected = SpiffeId::control_plane(bundle.trust_domain().clone());
        let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Internal(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(bundle.server_verifier(Some(expected)))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: Some(TlsConnector::from(Arc::new(cfg))),
            ..Self::plain()
        })
    }
}

impl tower::Service<Uri> for ControlPlaneConnector {
    type Response = ControlPlaneIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ControlPlaneIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let tls = match (https, tls) {
                (false, _) => None,
                (true, Some(tls)) => Some(tls),
                (true, None) => return Err(io::Error::other(NEEDS_BUNDLE)),
            };
            let name = server_name(&uri)?;
            let tcp = tower::Service::call(&mut http, uri)
                .await
                .map_err(io::Error::other)?;
            let Some(tls) = tls else {
                return Ok(ControlPlaneIo::Plain(tcp));
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp.into_inner()))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(ControlPlaneIo::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// The SNI name: the URI's host (an IP address is sent as none, as rustls does).
fn server_name(uri: &Uri) -> io::Result<ServerName<'static>> {
    let host = uri.host().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "control-plane URI has no host")
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("control-plane host {host:?}: {e}"),
        )
    })
}

/// A connection to a control-plane replica, as hyper's client wants it.
#[derive(Debug)]
pub enum ControlPlaneIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for ControlPlaneIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ControlPlaneIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlPlaneIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ControlPlaneIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ControlPlaneIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ControlPlaneIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            ControlPlaneIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlPlaneIo::Plain(io) => Pin::new(io).poll_flush(cx),
            ControlPlaneIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ControlPlaneIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ControlPlaneIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether any of `urls` is an `https://` one.
pub fn any_https(urls: &[impl AsRef<str>]) -> bool {
    urls.iter().any(|u| u.as_ref().starts_with("https://"))
}

/// A client's way to the control plane: the connector and the scheme its URLs take.
#[derive(Clone, Debug)]
pub struct Transport {
    connector: ControlPlaneConnector,
    https: bool,
}

impl Transport {
    /// Plain HTTP (the default on loopback and trusted networks).
    pub fn plain() -> Self {
        Self {
            connector: ControlPlaneConnector::plain(),
            https: false,
        }
    }

    /// HTTPS, the server verified as the control plane of `bundle`'s trust domain.
    pub fn https(bundle: &Arc<TrustBundle>) -> Result<Self, CaError> {
        Ok(Self {
            connector: ControlPlaneConnector::with_bundle(bundle)?,
            https: true,
        })
    }

    /// `"http"` or `"https"`.
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// `<scheme>://<authority>`.
    pub fn base_url(&self, authority: impl std::fmt::Display) -> String {
        format!("{}://{authority}", self.scheme())
    }

    /// A pooled hyper client over this transport.
    pub fn client<B>(&self) -> hyper_util::client::legacy::Client<ControlPlaneConnector, B>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
    {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(self.connector.clone())
    }
}

/// An error and its sources on one line (`client error (Connect): invalid peer certificate: ...`):
/// hyper's client error alone hides why a connection failed.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
