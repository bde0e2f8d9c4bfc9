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

use std::future::Future as _;

use crate::gateway::{kill_query as kill, Abandoned, Admission, GatewayError};
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::Backend;
use crate::upstream::Upstream;

use super::stall::Watchdog;

/// How long past a query's execution limit a body may go unread before the watchdog acts
/// (a client reading normally gets the cut in band at the limit).
const STALLED_CLIENT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What the frontend learns about a request as it is served, for metrics and the access
/// log; what it holds while the response streams (the query's admission, the node's and
/// the frontend's in-flight counts) is let go with it.
pub struct Exchange {
    pub admission: Admission,
    pub backend: Arc<Backend>,
    pub status: http::StatusCode,
    pub query_id: String,
    pub started: Instant,
    pub bytes_out: u64,
    pub access_log: bool,
    pub attempts: u32,
    pub node_in_flight: GaugeGuard,
    pub http_in_flight: GaugeGuard,
    /// Accounted for (see [`Self::finish`]).
    pub done: bool,
}

impl Exchange {
    /// Accounts for the request once, as it ends: `served` when the whole response went
    /// out (called before its last bytes are written, so a client that reads the metrics
    /// right after sees its request), otherwise `client_closed`.
    pub fn finish(&mut self, served: bool) {
        let status = self.status;
        let status = if served {
            status.as_str()
        } else {
            CLIENT_CLOSED
        };
        let what = if served {
            "Request served"
        } else {
            "Client went away before the response ended"
        };
        self.account(status, what);
    }

    /// Accounts for the request once, under the status label `status`.
    fn account(&mut self, status: &str, what: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let user = self.admission.user();
        METRICS
            .http_requests
            .with_label_values(&[&user.name, status, self.backend.label()])
            .inc();
        user.traffic.duration.observe(elapsed.as_secs_f64());
        user.traffic.response_bytes.inc_by(self.bytes_out);
        if self.access_log {
            tracing::info!(
                target: "chgate::access",
                user = %user.name,
                node = %self.backend.label(),
                status,
                query_id = %self.query_id,
                duration_ms = format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0),
                bytes_out = self.bytes_out,
                attempts = self.attempts,
                "{what}"
            );
        }
    }
}

impl Drop for Exchange {
    // Runs when the response body finished or the client went away, whichever is first.
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// The status label and access-log status of a request whose client went away before its
/// response ended (nginx logs these as 499).
pub const CLIENT_CLOSED: &str = "client_closed";

/// The status label and access-log status of a response the user's quota cut (execution
/// time or result bytes) after it had begun.
pub const QUOTA_CUT: &str = "quota_cut";

/// A request not yet answered: if it is dropped so (the client went away while it was
/// authenticated, read or routed), it is still counted and logged, as `client_closed`.
pub struct Unanswered {
    pub user: Option<Arc<str>>,
    pub query_id: Option<String>,
    pub started: Instant,
    pub access_log: bool,
    armed: bool,
}

impl Unanswered {
    pub fn new(started: Instant, access_log: bool) -> Self {
        Self {
            user: None,
            query_id: None,
            started,
            access_log,
            armed: true,
        }
    }

    /// The request was answered (and is accounted for by whoever answered it).
    pub fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let user = self.user.as_deref().unwrap_or("-");
        METRICS
            .http_requests
            .with_label_values(&[user, CLIENT_CLOSED, "-"])
            .inc();
        if self.access_log {
            tracing::info!(
                target: "chgate::access",
                user = %user,
                status = CLIENT_CLOSED,
                query_id = %self.query_id.as_deref().unwrap_or("-"),
                duration_ms = format_args!("{:.3}", self.started.elapsed().as_secs_f64() * 1000.0),
                "Client went away before the answer began"
            );
        }
    }
}

/// ClickHouse's response body, streamed to the client, within the user's quota: at its
/// `max_execution_time` or `max_result_bytes` the stream is cut, the query killed on its
/// node, and the body ends with ClickHouse's exception text, as ClickHouse ends a body
/// whose query failed after its answer began (clients look for that text); a compressed
/// body, which cannot carry the text, is broken off instead.
pub struct UpstreamBody {
    inner: Incoming,
    /// The connection: driven from here, and returned to its node's pool once the body was
    /// read to the end.
    upstream: Option<Upstream>,
    exchange: Exchange,
    /// When the quota's execution time runs out.
    deadline_at: Option<tokio::time::Instant>,
    /// A timer for it, made only when the body waits on the node (most small answers
    /// never do, and pay for no timer).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the watchdog acts, if armed: it is armed with the body's second frame (a body
    /// of one frame has all of its answer read from the node already, and small answers,
    /// most of them, pay nothing for it).
    watch_at: Option<tokio::time::Instant>,
    /// Kills the query and frees the node should the client stop reading past that time.
    watchdog: Option<Watchdog>,
    /// Data frames relayed so far.
    frames: u32,
    /// The stream was cut and its exception text sent: it ends.
    cut: bool,
    /// The body is compressed (`Content-Encoding`, or ClickHouse's own `compress=1`): text
    /// cannot be appended, so a cut breaks the transfer instead.
    encoded: bool,
}

/// The error a response body can end with: the upstream connection's, or a quota's cut of
/// a body that cannot carry the exception text.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A quota cut a compressed body: the transfer is broken off (the client sees an incomplete
/// response, never a shorter one that looks whole).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CutByQuota(String);

impl UpstreamBody {
    pub fn new(inner: Incoming, upstream: Upstream, exchange: Exchange, encoded: bool) -> Self {
        let limit = exchange.admission.execution_limit();
        let at =
            limit.map(|limit| tokio::time::Instant::from(exchange.admission.admitted_at() + limit));
        Self {
            inner,
            upstream: Some(upstream),
            exchange,
            deadline_at: at,
            deadline: None,
            watch_at: at,
            watchdog: None,
            frames: 0,
            cut: false,
            encoded,
        }
    }

    /// Arms the watchdog (once, with an execution limit, while the connection is held).
    fn arm_watchdog(&mut self) {
        let (Some(at), None, Some(upstream)) = (self.watch_at, &self.watchdog, &self.upstream)
        else {
            return;
        };
        // A connection that has ended has nothing left to free.
        let Some(socket) = upstream.socket_duplicate() else {
            return;
        };
        let exchange = &self.exchange;
        let (backend, user) = (exchange.backend.clone(), exchange.admission.user().clone());
        let query_id = exchange.query_id.clone();
        self.watchdog = Some(Watchdog::arm(
            socket,
            at + STALLED_CLIENT_GRACE,
            move || {
                METRICS
                    .quota_kills
                    .with_label_values(&[&user.name, "execution_time"])
                    .inc();
                tracing::info!(user = %user.name, query_id, "Query past its execution limit with a client that stopped reading: killed, its answer drained");
                kill(&backend, &user, &query_id, Abandoned::Ended);
            },
        ));
    }

    /// Lets go of the upstream connection (dropped, or back to its pool by the caller);
    /// the watchdog stops using it first.
    fn take_upstream(&mut self) -> Option<Upstream> {
        if let Some(w) = &self.watchdog {
            w.release();
        }
        self.upstream.take()
    }

    /// Ends the stream early with `e`: the query is killed on its node and the connection
    /// dropped (it is mid-answer).
    fn cut(&mut self, e: GatewayError, reason: &str) -> Bytes {
        let user = self.exchange.admission.user().clone();
        if !self.watchdog.as_ref().is_some_and(Watchdog::fired) {
            METRICS
                .quota_kills
                .with_label_values(&[&user.name, reason])
                .inc();
            kill(
                &self.exchange.backend,
                &user,
                &self.exchange.query_id,
                Abandoned::Ended,
            );
        }
        drop(self.take_upstream());
        self.cut = true;
        let code = e.code();
        self.exchange.account(
            QUOTA_CUT,
            "Response cut by the user's quota; the query was killed",
        );
        Bytes::from(format!(
            "\nCode: {}. DB::Exception: {e}. ({}) (version chgate {})\n",
            code.number,
            code.name,
            env!("CARGO_PKG_VERSION")
        ))
    }

    /// The next frame, unless the quota cuts the stream first.
    fn poll_limited(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cut {
            return Poll::Ready(None);
        }
        if self
            .deadline_at
            .is_some_and(|at| tokio::time::Instant::now() >= at)
        {
            return Poll::Ready(Some(self.timed_out()));
        }
        let frame = match self.poll_inner(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Waiting on the node: be woken at the deadline too.
                if let Some(at) = self.deadline_at {
                    let timer = self
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(self.timed_out()));
                    }
                }
                return Poll::Pending;
            }
        };
        if let (Some(Ok(f)), Some(limit)) = (&frame, self.exchange.admission.result_limit()) {
            let len = f.data_ref().map_or(0, |d| d.len() as u64);
            if self.exchange.bytes_out + len > limit {
                let e = GatewayError::ResultTooLarge {
                    user: self.exchange.admission.user().name.to_string(),
                    limit,
                    bytes: self.exchange.bytes_out + len,
                };
                return Poll::Ready(Some(self.cut_frame(e, "result_bytes")));
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
    }

    /// The cut at the quota's execution limit.
    fn timed_out(&mut self) -> Result<Frame<Bytes>, BoxError> {
        self.deadline_at = None;
        self.deadline = None;
        let limit = self
            .exchange
            .admission
            .execution_limit()
            .unwrap_or_default();
        let e = GatewayError::ExecutionTimeout {
            user: self.exchange.admission.user().name.to_string(),
            elapsed: self.exchange.admission.admitted_at().elapsed(),
            limit,
        };
        self.cut_frame(e, "execution_time")
    }

    /// The frame a cut ends the body with: the exception text, or (for a compressed body)
    /// an error that breaks the transfer off.
    fn cut_frame(&mut self, e: GatewayError, reason: &str) -> Result<Frame<Bytes>, BoxError> {
        let text = self.cut(e, reason);
        if self.encoded {
            let message = String::from_utf8_lossy(&text).trim().to_string();
            return Err(Box::new(CutByQuota(message)));
        }
        Ok(Frame::data(text))
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let inner = &mut self.inner;
        let Some(up) = self.upstream.as_mut() else {
            return Pin::new(inner).poll_frame(cx);
        };
        // Twice: taking a frame lets the connection decode the next one (often the end of
        // the body), which it does when polled again.
        up.drive(cx, |up, cx| {
            for _ in 0..2 {
                up.poll_conn(cx);
                if let Poll::Ready(frame) = Pin::new(&mut *inner).poll_frame(cx) {
                    return Poll::Ready(frame);
                }
            }
            Poll::Pending
        })
    }
}

impl Drop for UpstreamBody {
    /// The watchdog lets go of the connection before the fields (the connection among
    /// them) are dropped.
    fn drop(&mut self) {
        drop(self.take_upstream());
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            RespBody::Upstream(up) => {
                let frame = ready!(up.poll_limited(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            up.exchange.bytes_out += d.len() as u64;
                            up.frames += 1;
                            if up.frames == 2 {
                                up.arm_watchdog();
                            }
                        }
                    }
                    None => {
                        if let Some(upstream) = up.take_upstream() {
                            up.exchange.backend.node.checkin(upstream);
                        }
                        up.exchange.finish(true);
                    }
                    // The connection is broken: drop it rather than pool it.
                    Some(Err(_)) => drop(up.take_upstream()),
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(full) => full.is_end_stream(),
            RespBody::Upstream(up) => !up.cut && up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(full) => full.size_hint(),
            RespBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}
