//! One upstream HTTP/1.1 connection and one request/response exchange on it, polled by the
//! downstream task itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use super::head::{self, ReqFraming, RespFraming};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::pool::Release;

/// Bytes read from the upstream socket at a time (at least a quarter of it is free per read).
const READ_CHUNK: usize = 16 * 1024;
/// Initial capacity of the request-head buffer (it grows to the largest head and stays).
const WRITE_BUF: usize = 1024;
/// Request body data up to this size is copied behind the head or its chunk framing (one write
/// syscall); larger data is written from its own buffer.
const COALESCE_MAX: usize = 8 * 1024;

/// A plaintext upstream connection with its reused buffers, boxed once per connection so that
/// futures and bodies holding it stay small.
pub struct Conn(Box<State>);

pub(super) struct State {
    pub(super) wire: Wire,
    /// The current request's writer.
    pub(super) writer: Writer,
}

/// The socket and its buffers.
pub(super) struct Wire {
    io: TcpStream,
    pub(super) rbuf: BytesMut,
    wbuf: Vec<u8>,
    wpos: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.0.wire.io.peer_addr().ok())
            .finish()
    }
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Conn(Box::new(State {
            wire: Wire {
                io,
                rbuf: BytesMut::with_capacity(READ_CHUNK),
                wbuf: Vec::with_capacity(WRITE_BUF),
                wpos: 0,
            },
            writer: Writer::new(None, ReqFraming::Empty),
        }))
    }

    pub(super) fn state(&mut self) -> &mut State {
        &mut self.0
    }

    /// Whether an idle connection can carry another request: the upstream has neither closed it
    /// nor sent anything since the last response. Usually answered from tokio's readiness cache
    /// without a syscall.
    pub fn is_idle_usable(&mut self) -> bool {
        let wire = &mut self.0.wire;
        if !wire.rbuf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(wire.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether the connection can carry another request once the current response ended.
    pub(super) fn is_reusable(&self) -> bool {
        self.0.writer.is_done() && self.0.wire.rbuf.is_empty()
    }
}

impl Wire {
    /// Reads more of the response into `rbuf`; `Ok(0)` is the end of the stream.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Writes some of the unwritten part of `wbuf`.
    fn poll_write_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.wpos += n;
        Poll::Ready(Ok(()))
    }

    /// Writes some of `data` and advances it.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Why an exchange failed.
pub enum SendError {
    /// Nothing of the request reached the connection (it had closed): it may go on another one.
    /// The body comes back; the head is the caller's still.
    NotSent(Box<ProxyBody>),
    Failed(ProxyError),
}

/// Sends the request `parts` + `body` on `conn` and resolves to the response once its head has
/// arrived; the body follows from the same socket and hands the connection to `release` at its
/// end. The head is written into the connection's buffer here, so `parts` is only borrowed for
/// this call: a caller that may retry keeps its request head without copying it.
pub fn exchange(
    mut conn: Conn,
    parts: &Parts,
    added: &[u8],
    body: ProxyBody,
    release: Release,
) -> Exchange {
    let ended = body.is_end_stream();
    let (framing, add_length) = head::request_framing(parts, ended, body.size_hint().exact());
    let state = conn.state();
    state.wire.wbuf.clear();
    state.wire.wpos = 0;
    head::encode_request(parts, added, framing, add_length, &mut state.wire.wbuf);
    let body = (!ended).then(|| match body {
        ProxyBody::Streamed { body } => ReqBody::Incoming(body),
        other => ReqBody::Other(Box::new(other)),
    });
    state.writer = Writer::new(body, framing);
    Exchange {
        conn: Some(conn),
        method: parts.method.clone(),
        release: Some(release),
    }
}

/// The future of [`exchange`].
pub struct Exchange {
    conn: Option<Conn>,
    /// The request's method: it decides whether the response has a body.
    method: Method,
    release: Option<Release>,
}

impl Future for Exchange {
    type Output = Result<Response<ProxyBody>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(Err(SendError::Failed(ProxyError::UpstreamReset)));
        };
        let State { wire: conn, writer } = conn.state();
        loop {
            // A write failure is not final yet: the response may already be on its way.
            writer.poll_progress(conn, cx);
            // Nothing read yet (the usual case right after the request is written): no parse.
            if !conn.rbuf.is_empty() {
                match head::parse_response_raw(&mut conn.rbuf) {
                    Ok(Some(head)) => return Poll::Ready(this.respond(head)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "upstream response rejected");
                        return Poll::Ready(Err(SendError::Failed(ProxyError::UpstreamReset)));
                    }
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(n) if n > 0 => {}
                _ if !writer.started() && conn.rbuf.is_empty() => {
                    return Poll::Ready(Err(this.not_sent()));
                }
                _ => return Poll::Ready(Err(SendError::Failed(ProxyError::UpstreamReset))),
            }
        }
    }
}

impl Exchange {
    fn not_sent(&mut self) -> SendError {
        let body = match self
            .conn
            .take()
            .and_then(|mut c| c.state().writer.body.take())
        {
            Some(ReqBody::Incoming(b)) => ProxyBody::from(b),
            Some(ReqBody::Other(b)) => *b,
            None => ProxyBody::empty(),
        };
        SendError::NotSent(Box::new(body))
    }

    fn respond(&mut self, head: head::ResponseHead) -> Result<Response<ProxyBody>, SendError> {
        let failed = || SendError::Failed(ProxyError::UpstreamReset);
        let (Some(conn), Some(release)) = (self.conn.take(), self.release.take()) else {
            return Err(failed());
        };
        let (framing, keep_alive) = head.framing(&self.method).map_err(|e| {
            tracing::debug!(error = %e, "upstream response rejected");
            failed()
        })?;
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        match framing {
            RespFraming::Empty => {
                if keep_alive && conn.is_reusable() {
                    release.release(conn);
                }
                if let Some(raw) = head.raw {
                    *resp.body_mut() = ProxyBody::from(UpstreamBody::empty_with(raw));
                }
            }
            _ => {
                *resp.body_mut() = ProxyBody::from(
                    UpstreamBody::new(conn, framing, keep_alive, release).with_raw(head.raw),
                );
            }
        }
        Ok(resp)
    }
}

/// The request body as it is written: the downstream's body as is, or (never on the proxy's own
/// paths) any other body, boxed.
enum ReqBody {
    Incoming(Incoming),
    Other(Box<ProxyBody>),
}

impl ReqBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ()>>> {
        match self {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(drop),
            ReqBody::Other(b) => Pin::new(b.as_mut()).poll_frame(cx).map_err(drop),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Writing,
    Done,
    Failed,
}

/// Writes the request: the head already in the connection's write buffer, then the body frames
/// in the framing chosen for them.
pub(super) struct Writer {
    body: Option<ReqBody>,
    framing: ReqFraming,
    /// Body bytes still owed under `Length`.
    left: u64,
    /// Large data written after the write buffer.
    pending: Bytes,
    /// A chunk's data was written and its CRLF is still owed.
    chunk_open: bool,
    /// Every frame is encoded (only buffers are left to write).
    encoded_all: bool,
    /// Something left: a byte on the socket, or a frame out of the body.
    started: bool,
    state: WriteState,
}

impl Writer {
    fn new(body: Option<ReqBody>, framing: ReqFraming) -> Self {
        Writer {
            encoded_all: body.is_none() || framing == ReqFraming::Empty,
            body,
            framing,
            left: match framing {
                ReqFraming::Length(n) => n,
                _ => 0,
            },
            pending: Bytes::new(),
            chunk_open: false,
            started: false,
            state: WriteState::Writing,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.state == WriteState::Done
    }

    fn started(&self) -> bool {
        self.started
    }

    /// Writes what it can without waiting; remembers a failure (the connection is then not
    /// reused).
    pub(super) fn poll_progress(&mut self, conn: &mut Wire, cx: &mut Context<'_>) {
        if self.state == WriteState::Writing
            && let Poll::Ready(Err(())) = self.poll_write(conn, cx)
        {
            self.state = WriteState::Failed;
            self.body = None;
        }
    }

    fn poll_write(&mut self, conn: &mut Wire, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        loop {
            let mut body_pending = false;
            if !self.encoded_all
                && self.pending.is_empty()
                && conn.wbuf.len() - conn.wpos < COALESCE_MAX
            {
                match self.body.as_mut().map(|b| b.poll_frame(cx)) {
                    Some(Poll::Ready(Some(Ok(frame)))) => {
                        self.started = true;
                        self.encode(frame, conn)?;
                        continue;
                    }
                    Some(Poll::Ready(Some(Err(())))) => return Poll::Ready(Err(())),
                    Some(Poll::Ready(None)) | None => {
                        self.end(conn)?;
                        continue;
                    }
                    Some(Poll::Pending) => body_pending = true,
                }
            }
            if conn.wpos < conn.wbuf.len() {
                ready!(conn.poll_write_buffered(cx)).map_err(drop)?;
                self.started = true;
                continue;
            }
            conn.wbuf.clear();
            conn.wpos = 0;
            if !self.pending.is_empty() {
                ready!(conn.poll_write_bytes(cx, &mut self.pending)).map_err(drop)?;
                continue;
            }
            if self.encoded_all {
                self.state = WriteState::Done;
                self.body = None;
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                return Poll::Pending;
            }
        }
    }

    fn encode(&mut self, frame: Frame<Bytes>, conn: &mut Wire) -> Result<(), ()> {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), ReqFraming::Chunked) = (frame.into_trailers(), self.framing) {
                    self.close_chunk(conn);
                    conn.wbuf.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        conn.wbuf.extend_from_slice(name.as_str().as_bytes());
                        conn.wbuf.extend_from_slice(b": ");
                        conn.wbuf.extend_from_slice(value.as_bytes());
                        conn.wbuf.extend_from_slice(b"\r\n");
                    }
                    conn.wbuf.extend_from_slice(b"\r\n");
                    self.encoded_all = true;
                    self.body = None;
                }
                return Ok(());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            ReqFraming::Length(_) => {
                // More than the declared length would desynchronise the connection.
                self.left = self.left.checked_sub(data.len() as u64).ok_or(())?;
            }
            ReqFraming::Chunked => {
                use std::io::Write as _;
                self.close_chunk(conn);
                let _ = write!(conn.wbuf, "{:x}\r\n", data.len());
                self.chunk_open = true;
            }
            ReqFraming::Empty => return Ok(()),
        }
        if data.len() <= COALESCE_MAX {
            conn.wbuf.extend_from_slice(&data);
        } else {
            self.pending = data;
        }
        Ok(())
    }

    fn end(&mut self, conn: &mut Wire) -> Result<(), ()> {
        match self.framing {
            ReqFraming::Length(_) if self.left != 0 => return Err(()),
            ReqFraming::Chunked => {
                self.close_chunk(conn);
                conn.wbuf.extend_from_slice(b"0\r\n\r\n");
            }
            _ => {}
        }
        self.encoded_all = true;
        self.body = None;
        Ok(())
    }

    fn close_chunk(&mut self, conn: &mut Wire) {
        if std::mem::take(&mut self.chunk_open) {
            conn.wbuf.extend_from_slice(b"\r\n");
        }
    }
}
