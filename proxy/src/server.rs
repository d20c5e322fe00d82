//! Serving HTTP/1.1 and HTTP/2 (auto-detected, or by ALPN) on one accepted connection, with the
//! limits from config, and graceful shutdown when draining starts.

use std::convert::Infallible;
use std::future::Future;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::buffered::{Held, HeldBody};
use crate::config::LimitsConfig;
use crate::h1::{Ended, ServerLimits};

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Sniff the HTTP/2 preface, else HTTP/1.1.
    Auto,
    Http1,
    Http2,
}

/// A configured connection builder, cheap to clone and shared by all connections of a listener,
/// with the cap of hyper's buffers that [`crate::buffered`] counts per connection and response.
#[derive(Clone)]
pub struct HttpServer {
    builder: auto::Builder<TokioExecutor>,
    buffer_cap: usize,
    /// The HTTP/1.1 loop's limits ([`crate::h1::serve`]): the same as hyper's, on the same timer.
    h1: ServerLimits,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("buffer_cap", &self.buffer_cap)
            .finish_non_exhaustive()
    }
}

/// hyper's smallest HTTP/1 buffer.
const MIN_BUF_SIZE: usize = 8192;

/// The connection builder for `limits`.
pub fn builder(limits: &LimitsConfig) -> HttpServer {
    let buffer_cap = limits.max_header_bytes.max(MIN_BUF_SIZE);
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The header-read timeout is armed for every request head: a shared timer makes that a
    // slot in one table instead of an entry in tokio's timer wheel (`shared_timer.rs`).
    let timer = crate::shared_timer::SharedTimer::new();
    b.http1()
        .timer(timer.clone())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(buffer_cap)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
        .max_local_error_reset_streams(limits.h2_max_pending_resets)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    HttpServer {
        builder: b,
        buffer_cap,
        h1: ServerLimits {
            max_head: buffer_cap,
            header_read_timeout: limits.header_read_timeout,
            timer,
        },
    }
}

/// Serves one connection until it closes, or until `stop` (then finishes in-flight requests).
/// Under memory pressure ([`crate::overload`]) new requests get 503 + `Retry-After`.
///
/// HTTP/1.1 (or sniffed as not HTTP/2) starts in the proxy's own loop ([`crate::h1::serve`]),
/// which hands the connection to hyper at the first request it does not take.
pub async fn serve<IO, H, Fut>(
    io: IO,
    builder: &HttpServer,
    mode: HttpMode,
    stop: CancellationToken,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<ProxyBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let h = handler.clone();
    let to_hyper = move |req: Request<Incoming>| h(req.map(ProxyBody::from));
    if mode == HttpMode::Http2 {
        return serve_with(io, builder, mode, stop, true, to_hyper).await;
    }
    let io = {
        // The read buffer, for the connection's lifetime.
        let _read_buf = Held::new(builder.buffer_cap);
        match crate::h1::serve(
            io,
            &builder.h1,
            &stop,
            crate::overload::shed_request,
            &handler,
        )
        .await
        {
            Ended::Closed => return,
            Ended::Handoff(io) => io,
        }
    };
    serve_with(io, builder, mode, stop, true, to_hyper).await;
}

/// [`serve`] for the admin port (HTTP/1.1): never shed, so health and metrics stay visible.
pub async fn serve_admin<IO, H, Fut>(
    io: IO,
    builder: &HttpServer,
    stop: CancellationToken,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_with(io, builder, HttpMode::Http1, stop, false, handler).await;
}

async fn serve_with<IO, H, Fut>(
    io: IO,
    builder: &HttpServer,
    mode: HttpMode,
    stop: CancellationToken,
    shed: bool,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // hyper's read buffer, for the connection's lifetime.
    let _read_buf = Held::new(builder.buffer_cap);
    let cap = builder.buffer_cap;
    let svc = service_fn(move |req| {
        // Under memory pressure new requests are refused before any work is done for them.
        // The request's future is boxed once here: hyper moves the service future into place
        // per request, and the forwarding future is kilobytes (callgrind: ~10k instructions of
        // memcpy per request unboxed).
        let fut = match shed.then(crate::overload::shed_request).flatten() {
            Some(shed) => futures_util::future::Either::Left(std::future::ready(shed)),
            None => futures_util::future::Either::Right(Box::pin(handler(req))),
        };
        // The write queue a streamed response may fill, while it streams.
        async move {
            let mut resp = fut.await;
            // hyper writes heads from the map only.
            crate::h1::materialize(&mut resp);
            Ok::<_, Infallible>(resp.map(|b| HeldBody::new(b, cap)))
        }
    });
    let mut b = builder.builder.clone();
    match mode {
        HttpMode::Auto => {}
        HttpMode::Http1 => b = b.http1_only(),
        HttpMode::Http2 => b = b.http2_only(),
    }
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
