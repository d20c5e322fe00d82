//! The body of an upstream response, read straight from the upstream socket by whoever polls it
//! (the downstream connection), which also finishes writing a request body still in flight. At the
//! end of a reusable body the connection goes back to its pool; dropped early, it closes.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::chunked::{Decoder, Step};
use super::conn::{Conn, State as ConnState};
use super::head::RespFraming;
use super::raw_head::RawHead;
use crate::error::BodyError;
use crate::pool::Release;

enum State {
    Length(u64),
    Chunked(Decoder),
    UntilEof,
    Done,
}

pub struct UpstreamBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    release: Option<Release>,
    /// The response's forwarded header lines, when kept raw (taken by whoever writes the head).
    /// Boxed: every move of a response body would otherwise copy them along.
    raw: Option<Box<RawHead>>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    pub(super) fn new(
        conn: Conn,
        framing: RespFraming,
        keep_alive: bool,
        release: Release,
    ) -> Self {
        let state = match framing {
            RespFraming::Empty | RespFraming::Length(0) => State::Length(0),
            RespFraming::Length(n) => State::Length(n),
            RespFraming::Chunked => State::Chunked(Decoder::new()),
            RespFraming::UntilEof => State::UntilEof,
        };
        UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive,
            release: Some(release),
            raw: None,
        }
    }

    /// An empty body that only carries the response's raw head.
    pub(super) fn empty_with(raw: RawHead) -> Self {
        UpstreamBody {
            conn: None,
            state: State::Done,
            keep_alive: false,
            release: None,
            raw: Some(Box::new(raw)),
        }
    }

    pub(super) fn with_raw(mut self, raw: Option<RawHead>) -> Self {
        self.raw = raw.map(Box::new);
        self
    }

    pub fn take_raw_head(&mut self) -> Option<Box<RawHead>> {
        self.raw.take()
    }

    /// The body ended: the connection goes back to the pool if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.keep_alive
            && conn.is_reusable()
            && let Some(r) = self.release.take()
        {
            r.release(conn);
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let ConnState { wire: conn, writer } = conn.state();
            writer.poll_progress(conn, cx);
            match &mut this.state {
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(left) if !conn.rbuf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.rbuf.len());
                    let data = conn.rbuf.split_to(n).freeze();
                    *left -= n as u64;
                    if *left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(dec) => match dec.step(&mut conn.rbuf) {
                    Ok(Step::Data(n)) => {
                        let data = conn.rbuf.split_to(n).freeze();
                        dec.consumed(n);
                        // The last chunk usually arrives with the data: end now, so the
                        // downstream knows without another poll.
                        if dec.try_finish(&mut conn.rbuf) {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::NeedMore) => {}
                    Ok(Step::Trailers(t)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e.into()),
                },
                State::UntilEof if !conn.rbuf.is_empty() => {
                    let n = conn.rbuf.len();
                    return Poll::Ready(Some(Ok(Frame::data(conn.rbuf.split_to(n).freeze()))));
                }
                State::Done => return Poll::Ready(None),
                State::Length(_) | State::UntilEof => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::UntilEof) => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(BodyError::UpstreamClosed),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
