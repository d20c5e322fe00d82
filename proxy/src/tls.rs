//! mTLS for the sidecar, from the `ca` crate's rotating [`Identity`]: the inbound acceptor (client
//! certificates required, ALPN h2/http1.1) and the outbound connector for hyper's pooled client
//! (verifies the upstream's exact SPIFFE id, negotiates HTTP/2 for multiplexing between sidecars).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_ca::Identity;
use trellis_core::SpiffeId;

use crate::buffered::{Held, TLS_BUFFER_BYTES};
use crate::error::StartError;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Inbound acceptors built once; the identity's resolver picks up rotated certificates.
#[derive(Clone)]
pub struct InboundTls {
    /// With ALPN h2 + http/1.1 (HTTP listeners).
    pub http: TlsAcceptor,
    /// Without ALPN (TCP listeners).
    pub tcp: TlsAcceptor,
}

impl std::fmt::Debug for InboundTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboundTls")
    }
}

impl InboundTls {
    pub fn new(identity: &Arc<Identity>) -> Result<Self, StartError> {
        let http = identity
            .server_config(&[ALPN_H2, ALPN_HTTP1])
            .map_err(|e| StartError::Identity(e.to_string()))?;
        let tcp = identity
            .server_config(&[])
            .map_err(|e| StartError::Identity(e.to_string()))?;
        Ok(InboundTls {
            http: TlsAcceptor::from(Arc::new(http)),
            tcp: TlsAcceptor::from(Arc::new(tcp)),
        })
    }
}

/// Client configs for one upstream service: each verifies exactly that service's SPIFFE id.
pub fn client_config(
    identity: &Arc<Identity>,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, StartError> {
    identity
        .client_config(Some(expected), alpn)
        .map(Arc::new)
        .map_err(|e| StartError::Identity(e.to_string()))
}

/// Connects TCP (nodelay, timeout) and runs the mTLS handshake; used by hyper's pool and TCP relays.
#[derive(Clone)]
pub struct MtlsConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl std::fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MtlsConnector")
    }
}

impl MtlsConnector {
    pub fn new(config: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        MtlsConnector {
            tls: TlsConnector::from(config),
            connect_timeout,
        }
    }

    pub async fn connect_addr(&self, addr: SocketAddr) -> io::Result<TlsStream<TcpStream>> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        // Peers are verified by SPIFFE id, not by name; the IP only fills the SNI-less ServerName.
        let name = ServerName::IpAddress(addr.ip().into());
        tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}

impl tower::Service<Uri> for MtlsConnector {
    type Response = MtlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<MtlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "upstream URI is not ip:port")
                })?;
            let stream = this.connect_addr(addr).await?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            Ok(MtlsIo {
                io: TokioIo::new(stream),
                h2,
                _buffers: Held::new(TLS_BUFFER_BYTES),
            })
        })
    }
}

/// A client mTLS stream as hyper's pool wants it.
#[derive(Debug)]
pub struct MtlsIo {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
    /// rustls' buffers, counted by their cap while the connection lives.
    _buffers: Held,
}

impl Connection for MtlsIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for MtlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
