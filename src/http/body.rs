//! What goes back to an HTTP client, with bounded memory: a message of chgate's own, or
//! ClickHouse's response streamed frame by frame. When the stream ends the upstream
//! connection goes back to its pool, and the request is accounted for (metrics, access
//! log) when the response is done or the client gone, whichever is first.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::gateway::Admission;
use crate::metrics::GaugeGuard;
use crate::picker::Backend;
use crate::upstream::Upstream;

/// What the frontend learns about a request as it is served, for metrics and the access
/// log; what it holds while the response streams (the query's admission, the node's and
/// the frontend's in-flight counts) is let go with it.
pub struct Exchange {
    pub admission: Admission,
    pub backend: Arc<Backend>,
    pub status: u16,
    pub query_id: String,
    pub started: Instant,
    pub bytes_out: u64,
    pub access_log: bool,
    pub attempts: u32,
    pub node_in_flight: GaugeGuard,
    pub http_in_flight: GaugeGuard,
}

impl Drop for Exchange {
    // Runs when the response body finished or the client went away, whichever is first.
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let user = self.admission.user();
        user.traffic.duration.observe(elapsed.as_secs_f64());
        user.traffic.response_bytes.inc_by(self.bytes_out);
        if self.access_log {
            tracing::info!(
                target: "chgate::access",
                user = %user.name,
                node = %self.backend.label(),
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
                            up.exchange.backend.node.checkin(upstream);
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
