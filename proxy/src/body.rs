//! The one body type of the proxy: a streamed hyper body passed through untouched, or a small local
//! one (error pages, admin). An enum instead of a boxed trait object: no allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::Release;

pin_project_lite::pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Streamed { #[pin] body: Incoming },
        Full { data: Option<Bytes> },
        /// A response body from a pooled HTTP/1.1 connection, which goes back to its pool when
        /// the body ends (dropped unfinished, the connection closes instead).
        Pooled { #[pin] body: Incoming, release: Option<Release> },
    }
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full { data: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub(crate) fn pooled(body: Incoming, release: Release) -> Self {
        ProxyBody::Pooled {
            body,
            release: Some(release),
        }
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        ProxyBody::Streamed { body }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Streamed { body } => body.poll_frame(cx),
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Pooled { mut body, release } => {
                let frame = body.as_mut().poll_frame(cx);
                match &frame {
                    Poll::Ready(None) => release.take().map(Release::release),
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        release.take().map(Release::release)
                    }
                    // An error: the connection is not reusable.
                    Poll::Ready(Some(Err(_))) => release.take().map(drop),
                    _ => None,
                };
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streamed { body } | ProxyBody::Pooled { body, .. } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streamed { body } | ProxyBody::Pooled { body, .. } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
