//! The HTTP/1.1 server loop of the proxy listeners: one task per connection reads a request
//! head, awaits the handler in place and writes the response, with no dispatcher, no channel and
//! no box per request (hyper's server does all three).
//!
//! It serves what almost all proxied traffic is: bodiless HTTP/1.1 requests (GET, HEAD, DELETE,
//! OPTIONS...). The first request that is anything else — a body, an upgrade, `Expect`,
//! HTTP/1.0, HTTP/2, a malformed or oversized head — hands the connection, with every byte read
//! so far, to hyper for the rest of its life ([`Ended::Handoff`]); hyper then answers it exactly as
//! before (400, 414, 431, or serves it).
//!
//! Like hyper's: the header-read timeout runs from when a head is awaited (also on an idle
//! keep-alive connection) and closes the connection without a response; a client that resets the
//! connection while its request is in flight cancels it, one that only closes its side gets the
//! response and then the close; stopping closes idle connections at once and the others after
//! their in-flight response.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::raw_head::RawHeadSource;
use super::request_head::{self, Parsed};
use super::response_head::{self, BodyLen, Framing};
use super::rewind::Rewind;
use crate::body::ProxyBody;
use crate::shared_timer::SharedTimer;

/// Read buffer of a connection (it grows up to the head limit when a head needs it).
const READ_BUF: usize = 4096;
/// Body data up to this size is copied behind the head (one write); larger data is written from
/// its own buffer.
const COALESCE_MAX: usize = 8 * 1024;

/// The limits of the loop, shared by the connections of a listener.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Largest request head taken here (larger ones go to hyper, which answers 431).
    pub max_head: usize,
    pub header_read_timeout: Duration,
    pub timer: SharedTimer,
}

/// What a handler resolves to: a response, or a `Result` that cannot fail (a tower service's).
pub trait Answer<B> {
    fn into_response(self) -> Response<B>;
}

impl<B> Answer<B> for Response<B> {
    fn into_response(self) -> Response<B> {
        self
    }
}

impl<B> Answer<B> for Result<Response<B>, std::convert::Infallible> {
    fn into_response(self) -> Response<B> {
        match self {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// How a connection left the loop.
pub enum Ended<IO> {
    Closed,
    /// hyper's from here on, with the bytes read so far put back in front.
    Handoff(Rewind<IO>),
}

/// Serves `io` until it closes, `stop` is cancelled, or a request needs hyper. `shed` answers a
/// request instead of `handler` under memory pressure ([`crate::overload`]); it is asked apart
/// from the handler so that the handler's future is built where it is polled (a wrapper around
/// it would move its kilobytes once more per request).
pub async fn serve<IO, H, Fut, B>(
    mut io: IO,
    limits: &ServerLimits,
    stop: &CancellationToken,
    shed: impl Fn() -> Option<Response<B>>,
    handler: &H,
) -> Ended<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<ProxyBody>) -> Fut,
    Fut: Future<Output: Answer<B>>,
    B: Body<Data = Bytes> + RawHeadSource,
{
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut wbuf: Vec<u8> = Vec::with_capacity(1024);
    let mut stopped = pin!(stop.cancelled());
    let mut stop_waker: Option<std::task::Waker> = None;
    loop {
        // The head: parsed from what is buffered (pipelined), else read with the timeout.
        let mut deadline = None;
        let (req, close) = loop {
            // An empty buffer (the usual case between keep-alive requests) holds no head yet.
            if !rbuf.is_empty() {
                match request_head::parse(&mut rbuf, limits.max_head) {
                    Parsed::Request { req, close } => break (req, close),
                    Parsed::Handoff => return Ended::Handoff(Rewind::new(rbuf.freeze(), io)),
                    Parsed::Partial => {}
                }
            }
            let at = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::now().into_std() + limits.header_read_timeout
            });
            if rbuf.capacity() - rbuf.len() < READ_BUF / 4 {
                rbuf.reserve(READ_BUF);
            }
            // Stopping closes a connection that waits for its next request, not one that is
            // halfway through sending it.
            let idle = rbuf.is_empty();
            let read = pin!(tokio_util::io::read_buf(&mut io, &mut rbuf));
            let mut read = limits.timer.within(at, read);
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = Pin::new(&mut read).poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if idle {
                    // The token wakes the waker it was last polled with; polling it again takes
                    // its lock, so that happens only when the task's waker is a new one.
                    if stop_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        if stop.is_cancelled() {
                            return Poll::Ready(None);
                        }
                    } else {
                        if stopped.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(None);
                        }
                        stop_waker = Some(cx.waker().clone());
                    }
                }
                Poll::Pending
            })
            .await;
            match got {
                Some(Ok(Ok(n))) if n > 0 => {}
                // Closed, failed, too slow, or stopped while idle: no response is owed.
                _ => return Ended::Closed,
            }
        };
        let head_request = req.method() == Method::HEAD;

        // The response, while watching the client: one that resets the connection cancels the
        // request; one that only closes its side still gets the response (as with hyper).
        let mut read_closed = false;
        let resp = if let Some(r) = shed() {
            drop(req);
            Some(r)
        } else {
            let mut fut = pin!(handler(req));
            let max_head = limits.max_head;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Some(r.into_response()));
                }
                if !read_closed {
                    match watch_client(&mut io, &mut rbuf, max_head, cx) {
                        Client::Open => {}
                        Client::Closed => read_closed = true,
                        Client::Failed => return Poll::Ready(None),
                    }
                }
                Poll::Pending
            })
            .await
        };
        let Some(resp) = resp else {
            return Ended::Closed;
        };

        let close = close || read_closed || stop.is_cancelled();
        let (parts, mut body) = resp.into_parts();
        let raw = body.take_raw_head();
        let len = if body.is_end_stream() {
            BodyLen::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => BodyLen::Known(n),
                None => BodyLen::Unknown,
            }
        };
        wbuf.clear();
        let (framing, close) =
            response_head::encode(&parts, raw.as_deref(), len, head_request, close, &mut wbuf);
        drop(parts);
        let sent = if framing == Framing::None {
            drop(body);
            io.write_all(&wbuf).await.is_ok()
        } else {
            write_body(&mut io, &mut wbuf, pin!(body), framing).await
        };
        if !sent || close {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// What the client did while its request was in flight.
enum Client {
    Open,
    /// It closed its side (it may still read the response).
    Closed,
    /// The connection failed (reset): nobody is left to answer.
    Failed,
}

/// While a request is in flight: reads what the client sends meanwhile (a pipelined request,
/// kept for later, up to a head's worth) and tells whether it closed or failed.
fn watch_client<IO: AsyncRead + Unpin>(
    io: &mut IO,
    rbuf: &mut BytesMut,
    max_head: usize,
    cx: &mut Context<'_>,
) -> Client {
    while rbuf.len() < max_head {
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(READ_BUF);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
            Poll::Ready(Ok(0)) => return Client::Closed,
            Poll::Ready(Err(_)) => return Client::Failed,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Client::Open,
        }
    }
    Client::Open
}

/// Writes the head in `wbuf` and the body after it; small data rides in the same write as the
/// head, or as the data before it when the body has more ready at once. False when the client
/// or the body failed (the connection then closes).
async fn write_body<IO, B>(
    io: &mut IO,
    wbuf: &mut Vec<u8>,
    mut body: Pin<&mut B>,
    framing: Framing,
) -> bool
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
{
    let chunked = framing == Framing::Chunked;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        // Whatever is ready now joins the buffered bytes; only a wait flushes them first.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !flush(io, wbuf).await {
                    return false;
                }
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => return false,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                // Trailers are not sent on HTTP/1.1 (hyper does not either).
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let _ = std::io::Write::write_fmt(wbuf, format_args!("{:x}\r\n", data.len()));
        } else {
            let Some(l) = left.checked_sub(data.len() as u64) else {
                return false;
            };
            left = l;
        }
        if data.len() <= COALESCE_MAX {
            wbuf.extend_from_slice(&data);
        } else if !flush(io, wbuf).await || io.write_all(&data).await.is_err() {
            return false;
        }
        if chunked {
            wbuf.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        wbuf.extend_from_slice(b"0\r\n\r\n");
    } else if left != 0 {
        // Shorter than it said: the client cannot frame what follows.
        return false;
    }
    flush(io, wbuf).await
}

/// Writes what `wbuf` holds and empties it; false when the client failed.
async fn flush<IO: AsyncWrite + Unpin>(io: &mut IO, wbuf: &mut Vec<u8>) -> bool {
    if !wbuf.is_empty() && io.write_all(wbuf).await.is_err() {
        return false;
    }
    wbuf.clear();
    true
}
