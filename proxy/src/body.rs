//! The one body type of the proxy: a streamed hyper body passed through untouched, an upstream
//! HTTP/1.1 response body read straight from its pooled connection ([`crate::h1`]), or a small
//! local one (error pages, admin). An enum instead of a boxed trait object: no allocation per
//! request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::BodyError;
use crate::h1::UpstreamBody;

pin_project_lite::pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Streamed { #[pin] body: Incoming },
        Full { data: Option<Bytes> },
        /// A response body from a pooled HTTP/1.1 connection, which goes back to its pool when
        /// the body ends (dropped unfinished, the connection closes instead).
        Upstream { #[pin] body: UpstreamBody },
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
}

impl crate::h1::RawHeadSource for ProxyBody {
    fn take_raw_head(&mut self) -> Option<Box<crate::h1::RawHead>> {
        match self {
            ProxyBody::Upstream { body } => body.take_raw_head(),
            _ => None,
        }
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        ProxyBody::Streamed { body }
    }
}

impl From<UpstreamBody> for ProxyBody {
    fn from(body: UpstreamBody) -> Self {
        ProxyBody::Upstream { body }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ProxyBodyProj::Streamed { body } => body.poll_frame(cx).map_err(BodyError::from),
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Upstream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streamed { body } => body.is_end_stream(),
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streamed { body } => body.size_hint(),
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
