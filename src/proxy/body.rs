//! Request and response bodies that stream through the proxy with bounded memory.
//!
//! [`ReqBody`] is what goes to ClickHouse: nothing, a small buffered body (kept so a read
//! can be replayed on another node), or the client's body streamed through after the head
//! the proxy had to look at. [`RespBody`] is what goes back to the client: a message of the
//! proxy's own, or ClickHouse's response streamed frame by frame; when the stream ends the
//! upstream connection goes back to its pool and the request is accounted for.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::IntCounter;

use super::state::User;
use crate::metrics::METRICS;
use crate::upstream::{Node, Upstream};

/// A request body on its way to ClickHouse.
pub enum ReqBody {
    Empty,
    /// Buffered bytes, sent as one frame.
    Full(Full<Bytes>),
    /// The part already read, then the rest of the client's body as it arrives.
    Stream {
        head: Option<Bytes>,
        rest: Incoming,
        counted: IntCounter,
    },
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ReqBody::Stream {
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
            ReqBody::Empty => true,
            ReqBody::Full(full) => full.is_end_stream(),
            ReqBody::Stream { head, rest, .. } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(full) => full.size_hint(),
            ReqBody::Stream { head, rest, .. } => {
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

/// What the proxy learns about a request as it is served, for metrics and the access log.
pub struct Exchange {
    pub user: Arc<User>,
    pub node: Arc<Node>,
    pub status: u16,
    pub query_id: String,
    pub started: Instant,
    pub bytes_out: u64,
    pub access_log: bool,
    pub attempts: u32,
}

impl Drop for Exchange {
    // Runs when the response body finished or the client went away, whichever is first.
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.user.duration.observe(elapsed.as_secs_f64());
        self.user.response_bytes.inc_by(self.bytes_out);
        self.node.in_flight.dec();
        METRICS.http_in_flight.dec();
        if self.access_log {
            tracing::info!(
                target: "chgate::access",
                user = %self.user.name,
                node = %self.node.label,
                status = self.status,
                query_id = %self.query_id,
                duration_ms = format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0),
                bytes_out = self.bytes_out,
                attempts = self.attempts,
                "Request served"
            );
        }
    }
}

/// ClickHouse's response body, streamed to the client.
pub struct UpstreamBody {
    inner: Incoming,
    /// The connection: driven from here, and returned to its node's pool once the body was
    /// read to the end.
    upstream: Option<Upstream>,
    exchange: Exchange,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, upstream: Upstream, exchange: Exchange) -> Self {
        Self {
            inner,
            upstream: Some(upstream),
            exchange,
        }
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Twice: taking a frame lets the connection decode the next one (often the end of
        // the body), which it does when polled again.
        for _ in 0..2 {
            if let Some(up) = self.upstream.as_mut() {
                up.poll_conn(cx);
            }
            if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
                return Poll::Ready(frame);
            }
        }
        Poll::Pending
    }
}

/// A response body on its way to the client.
pub enum RespBody {
    Full(Full<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl RespBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        RespBody::Full(Full::new(data.into()))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            RespBody::Upstream(up) => {
                let frame = ready!(up.poll_inner(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            up.exchange.bytes_out += d.len() as u64;
                        }
                    }
                    None => {
                        if let Some(upstream) = up.upstream.take() {
                            up.exchange.node.checkin(upstream);
                        }
                    }
                    // The connection is broken: drop it rather than pool it.
                    Some(Err(_)) => up.upstream = None,
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(full) => full.is_end_stream(),
            RespBody::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(full) => full.size_hint(),
            RespBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}
