//! The body of a request on its way to a node: nothing, a buffered body (kept so it can be
//! sent again, to another node or on a fresh connection), or a client's body streamed
//! through after the part a frontend had to look at.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::IntCounter;

pub enum Body {
    Empty,
    /// Buffered bytes, sent as one frame.
    Full(Full<Bytes>),
    /// The part already read, then the rest of the client's body as it arrives; what
    /// passes is added to `counted` (the client's request bytes).
    Stream {
        head: Option<Bytes>,
        rest: Incoming,
        counted: IntCounter,
    },
}

impl Body {
    /// A buffered body (empty if `bytes` is).
    pub fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Full::new(bytes))
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Stream {
                head,
                rest,
                counted,
            } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                let frame = ready!(Pin::new(rest).poll_frame(cx));
                if let Some(Ok(f)) = &frame {
                    if let Some(d) = f.data_ref() {
                        counted.inc_by(d.len() as u64);
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(full) => full.is_end_stream(),
            Body::Stream { head, rest, .. } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(full) => full.size_hint(),
            Body::Stream { head, rest, .. } => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}
