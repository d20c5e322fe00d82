//! Serving HTTP/1.1 and HTTP/2 (auto-detected, or by ALPN) on one accepted connection, with the
//! limits from config, and graceful shutdown when draining starts. The sidecar's listeners and
//! admin port and the LB's listeners and admin port all go through [`serve_connection`]; they
//! differ only in [`ServerSettings`], the handler and whether requests are shed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http_body::Body;
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
use crate::h1::{Answer, Ended, RawHeadSource, Rewind, ServerLimits};

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Sniff the HTTP/2 preface, else HTTP/1.1.
    Auto,
    Http1,
    Http2,
}

/// A configured connection builder, cheap to clone and shared by all connections of a listener
/// (the sidecar's and the LB's alike), with the cap of hyper's buffers that [`crate::buffered`]
/// counts per connection and response.
#[derive(Clone)]
pub struct HttpServer {
    builder: auto::Builder<TokioExecutor>,
    buffer_cap: usize,
    /// The HTTP/1.1 loop's limits ([`crate::h1::serve`]): the same as hyper's, on the same timer.
    h1: ServerLimits,
    /// Whether hyper serves HTTP upgrades (the sidecar relays them; the LB does not).
    upgrades: bool,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("buffer_cap", &self.buffer_cap)
            .field("upgrades", &self.upgrades)
            .finish_non_exhaustive()
    }
}

/// What the front ends choose about their listeners' protocol limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Largest request head (and hyper's buffer; at least 8 KiB, hyper's smallest).
    pub max_header_bytes: usize,
    /// Slowloris guard: a request head must arrive within this.
    pub header_read_timeout: Duration,
    pub h2_max_streams: u32,
    /// Rapid-reset guard: pending accept resets and local error resets allowed per connection.
    pub h2_max_pending_resets: usize,
    /// HTTP/2 PING interval, `None` for none.
    pub h2_keep_alive: Option<Duration>,
    pub upgrades: bool,
}

impl From<&LimitsConfig> for ServerSettings {
    /// The sidecar's listeners.
    fn from(limits: &LimitsConfig) -> Self {
        ServerSettings {
            max_header_bytes: limits.max_header_bytes,
            header_read_timeout: limits.header_read_timeout,
            h2_max_streams: limits.h2_max_streams,
            h2_max_pending_resets: limits.h2_max_pending_resets,
            h2_keep_alive: None,
            upgrades: true,
        }
    }
}

/// hyper's smallest HTTP/1 buffer.
const MIN_BUF_SIZE: usize = 8192;

/// Most request header fields per HTTP/1 request (hyper's default, stated).
const MAX_HEADERS: usize = 100;

/// The sidecar's connection builder for `limits`.
pub fn builder(limits: &LimitsConfig) -> HttpServer {
    server(&ServerSettings::from(limits))
}

/// The connection builder for `s`.
pub fn server(s: &ServerSettings) -> HttpServer {
    let buffer_cap = s.max_header_bytes.max(MIN_BUF_SIZE);
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The header-read timeout is armed for every request head: a shared timer makes that a
    // slot in one table instead of an entry in tokio's timer wheel (`shared_timer.rs`).
    let timer = crate::shared_timer::SharedTimer::new();
    b.http1()
        .timer(timer.clone())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size(buffer_cap)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_streams)
        .max_pending_accept_reset_streams(s.h2_max_pending_resets)
        .max_local_error_reset_streams(s.h2_max_pending_resets)
        .keep_alive_interval(s.h2_keep_alive)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
    HttpServer {
        builder: b,
        buffer_cap,
        h1: ServerLimits {
            max_head: buffer_cap,
            header_read_timeout: s.header_read_timeout,
            timer,
        },
        upgrades: s.upgrades,
    }
}

/// Serves one connection until it closes, or until `stop` (then finishes in-flight requests).
/// Under memory pressure ([`crate::overload`]) new requests get 503 + `Retry-After`.
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
    serve_connection(
        io,
        builder,
        mode,
        stop,
        crate::overload::shed_request,
        handler,
    )
    .await;
}

/// [`serve`] for the admin port (HTTP/1.1): never shed, so health and metrics stay visible.
pub async fn serve_admin<IO, H, Fut>(
    io: IO,
    builder: &HttpServer,
    stop: CancellationToken,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<ProxyBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_connection(io, builder, HttpMode::Http1, stop, || None, handler).await;
}

/// One connection of either front end. HTTP/1.1 (or sniffed as not HTTP/2) starts in the proxy's
/// own loop ([`crate::h1::serve`]), which hands the connection to hyper at the first request it
/// does not take; HTTP/2 goes to hyper at once. `shed` answers instead of `handler` under memory
/// pressure. Graceful: after `stop`, idle connections close and in-flight requests finish.
pub async fn serve_connection<IO, B, S, H, Fut>(
    io: IO,
    server: &HttpServer,
    mode: HttpMode,
    stop: CancellationToken,
    shed: S,
    handler: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body<Data = Bytes> + RawHeadSource + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: Fn() -> Option<Response<B>> + Clone + Send + Sync + 'static,
    H: Fn(Request<ProxyBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output: Answer<B>> + Send + 'static,
{
    let io = if mode == HttpMode::Http2 {
        Rewind::new(Bytes::new(), io)
    } else {
        // The read buffer, for the loop's part of the connection.
        let _read_buf = Held::new(server.buffer_cap);
        match crate::h1::serve(io, &server.h1, &stop, &shed, &handler).await {
            Ended::Closed => return,
            Ended::Handoff(io) => io,
        }
    };
    // hyper's read buffer, for the rest of the connection's lifetime.
    let _read_buf = Held::new(server.buffer_cap);
    let cap = server.buffer_cap;
    let svc = service_fn(move |req: Request<Incoming>| {
        // Under memory pressure new requests are refused before any work is done for them.
        // The request's future is boxed once here: hyper moves the service future into place
        // per request, and the forwarding future is kilobytes (callgrind: ~10k instructions of
        // memcpy per request unboxed).
        let fut = match shed() {
            Some(r) => Either::Left(r),
            None => Either::Right(Box::pin(handler(req.map(ProxyBody::from)))),
        };
        async move {
            let mut resp = match fut {
                Either::Left(r) => r,
                Either::Right(f) => f.await.into_response(),
            };
            // hyper writes heads from the map only.
            crate::h1::materialize(&mut resp);
            Ok::<_, Infallible>(resp.map(|b| HeldBody::new(b, cap)))
        }
    });
    let mut b = server.builder.clone();
    match mode {
        HttpMode::Auto => {}
        HttpMode::Http1 => b = b.http1_only(),
        HttpMode::Http2 => b = b.http2_only(),
    }
    let io = TokioIo::new(io);
    if server.upgrades {
        let conn = pin!(b.serve_connection_with_upgrades(io, svc));
        run_to_end(conn, &stop, |c| c.graceful_shutdown()).await;
    } else {
        let conn = pin!(b.serve_connection(io, svc));
        run_to_end(conn, &stop, |c| c.graceful_shutdown()).await;
    }
}

/// Drives a connection to its end; if `stop` comes first, shuts it down gracefully (idle ones
/// close, in-flight requests finish) and then drives it to its end.
async fn run_to_end<C>(
    mut conn: Pin<&mut C>,
    stop: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    tokio::select! {
        r = conn.as_mut() => log_end(r),
        _ = stop.cancelled() => {
            graceful(conn.as_mut());
            log_end(conn.await);
        }
    }
}

fn log_end(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with error");
    }
}
