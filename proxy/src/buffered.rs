//! How many bytes the proxy holds in buffers it owns: one process-wide atomic gauge that the
//! overload guard ([`crate::overload`]) compares with `limits.max_buffered_mb`.
//!
//! A buffer is counted by a [`Held`] guard taken when the buffer is acquired and given back on
//! drop: one relaxed atomic add and one sub, no lock, no allocation, never per chunk of a
//! streamed body. What is counted, and how exactly:
//!
//! - relay copy buffers (TLS relays and the copy fallback of plaintext relays:
//!   [`COPY_BUF_SIZE`](crate::COPY_BUF_SIZE) per direction; upgraded connections: 8 KiB) while
//!   the relay runs — exact, those are allocated;
//! - bytes sitting in a `splice(2)` pipe (read from one socket, not yet written to the other,
//!   e.g. because the reader is slow): exact, adjusted per splice call (a syscall anyway);
//! - hyper's buffers, which the proxy cannot see into, by their configured cap
//!   (`max_buf_size`, from `limits.max_header_bytes`): per HTTP connection its read buffer,
//!   and per response being streamed to a client its write queue (HTTP/1 queues at most
//!   `max_buf_size` before it stops polling the body). HTTP/2 connections are counted the same
//!   way, which under-counts them: h2 may hold up to its flow-control windows per connection;
//! - per TLS connection, rustls' buffers by their cap ([`TLS_BUFFER_BYTES`]).
//!
//! Not counted: kernel socket buffers, and hyper's buffers on the upstream side (the read buffer
//! of the connection a response streams from holds one read, 8 KiB growing towards hyper's
//! ~400 KiB cap only while reads fill it; idle pooled connections hold nothing unread). So the
//! gauge is a floor for HTTP/2 and the upstream side, and a ceiling for HTTP/1 client sides.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

/// rustls' default limit on queued plaintext/ciphertext (64 KiB) plus one maximal incoming
/// record (16 KiB of payload and its overhead), per TLS connection.
pub const TLS_BUFFER_BYTES: usize = 64 * 1024 + 18 * 1024;

static BUFFERED: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently held in counted buffers, process-wide.
pub fn buffered_bytes() -> usize {
    BUFFERED.load(Ordering::Relaxed)
}

/// A count of held bytes, given back when dropped.
#[derive(Debug)]
#[must_use = "the bytes are given back when the guard drops"]
pub struct Held(usize);

impl Held {
    /// Holds `bytes` (zero costs nothing).
    pub fn new(bytes: usize) -> Held {
        if bytes > 0 {
            BUFFERED.fetch_add(bytes, Ordering::Relaxed);
        }
        Held(bytes)
    }

    /// Holds `bytes` more.
    pub fn grow(&mut self, bytes: usize) {
        BUFFERED.fetch_add(bytes, Ordering::Relaxed);
        self.0 += bytes;
    }

    /// Gives back up to `bytes` now.
    pub fn shrink(&mut self, bytes: usize) {
        let n = bytes.min(self.0);
        BUFFERED.fetch_sub(n, Ordering::Relaxed);
        self.0 -= n;
    }

    /// Bytes this guard holds.
    pub fn bytes(&self) -> usize {
        self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.0 > 0 {
            BUFFERED.fetch_sub(self.0, Ordering::Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds `held` bytes (the write queue it may fill) until it ends or
    /// is dropped; frames pass through untouched.
    pub struct HeldBody<B> {
        #[pin]
        body: B,
        held: Held,
    }
}

impl<B: Body> HeldBody<B> {
    /// Wraps `body`, holding `cap` bytes unless the body is already complete.
    pub fn new(body: B, cap: usize) -> Self {
        let cap = if body.is_end_stream() { 0 } else { cap };
        HeldBody {
            body,
            held: Held::new(cap),
        }
    }
}

impl<B: Body> Body for HeldBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            // Ended: nothing more will be queued.
            this.held.shrink(usize::MAX);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The gauge is process-wide and other tests in this binary move it: check deltas of guards
    // this test owns only through their own `bytes()`, and the gauge's lower bound.
    #[test]
    fn guards_count_and_give_back() {
        let mut h = Held::new(1000);
        assert!(buffered_bytes() >= 1000);
        h.grow(24);
        assert_eq!(h.bytes(), 1024);
        h.shrink(2000);
        assert_eq!(h.bytes(), 0);
        assert_eq!(Held::new(0).bytes(), 0);
    }

    #[tokio::test]
    async fn body_holds_until_it_ends() {
        use http_body_util::{BodyExt, Full};
        let empty = HeldBody::new(Full::new(bytes::Bytes::new()), 4096);
        assert_eq!(empty.held.bytes(), 0, "a complete body holds nothing");
        let body = HeldBody::new(Full::new(bytes::Bytes::from_static(b"hi")), 4096);
        assert_eq!(body.held.bytes(), 4096);
        let mut body = Box::pin(body);
        while body.frame().await.is_some() {}
        assert_eq!(body.held.bytes(), 0);
    }
}
