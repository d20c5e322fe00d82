//! The one body type of the proxy: a streamed hyper body passed through untouched, or a small local
//! one (error pages, admin). An enum instead of a boxed trait object: no allocation per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pin_project_lite::pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Streamed { #[pin] body: Incoming },
        Full { data: Option<Bytes> },
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streamed { body } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streamed { body } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
