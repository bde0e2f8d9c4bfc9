use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::metrics::METRICS;
use crate::picker::NodeState;
use crate::proxy::body::ReqBody;

/// Why talking to a node failed, and so whether the request may go elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection refused or unreachable: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connection timed out")]
    ConnectTimeout,
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("request failed: {0}")]
    Send(#[source] hyper::Error),
    /// The connection closed before the request was written: the node is not at fault and
    /// the request can go anywhere.
    #[error("connection closed before the request was sent")]
    Stale,
}

impl UpstreamError {
    /// True if this says something about the node's health (a stale pooled connection
    /// does not).
    pub fn node_at_fault(&self) -> bool {
        !matches!(self, Self::Stale)
    }

    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handshake(_) => "handshake",
            Self::Send(_) => "send",
            Self::Stale => "stale_connection",
        }
    }
}

type UpstreamConnection = Connection<TokioIo<TcpStream>, ReqBody>;

/// One HTTP/1.1 connection to a node, driven by whichever task is using it.
///
/// hyper's usual pattern spawns the connection as its own task and passes response bodies
/// through a channel. Here the request's task polls the connection itself, right before it
/// polls the body: a small response's data and its end then arrive in the same turn and
/// leave in one write to the client, with no cross-task wake-up in between (measured: one
/// `writev` and ~10% CPU less per `SELECT 1`). Idle pooled connections are polled by no
/// one; checkout polls them once, which notices a connection the server closed meanwhile.
pub struct Upstream {
    sender: SendRequest<ReqBody>,
    /// `None` once the connection has ended. Invariant: it is dropped right then, which
    /// cancels whatever waits on it (readiness, a response): keeping a completed
    /// connection around would leave those futures pending forever.
    conn: Option<Pin<Box<UpstreamConnection>>>,
}

impl Upstream {
    /// Drives reads and writes on the connection; false once it has ended.
    pub fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match conn.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                self.conn = None;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "Upstream connection ended with an error");
                }
                false
            }
        }
    }

    /// Sends a request and waits for the response head, driving the connection meanwhile.
    /// If the request was never written, it comes back with the error, body untouched.
    pub async fn send(
        &mut self,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        let ready = std::future::poll_fn(|cx| {
            self.poll_conn(cx);
            self.sender.poll_ready(cx)
        })
        .await;
        if ready.is_err() {
            return Err(SendFailure::unsent(UpstreamError::Stale, req));
        }
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        std::future::poll_fn(|cx| {
            self.poll_conn(cx);
            response.as_mut().poll(cx)
        })
        .await
        .map_err(|mut e| match e.take_message() {
            Some(req) => SendFailure::unsent(UpstreamError::Stale, req),
            None => SendFailure {
                error: UpstreamError::Send(e.into_error()),
                unsent: None,
            },
        })
    }

    /// Reads a whole (small) response body, driving the connection meanwhile: this task
    /// owns it. For the picker's probes and ingest's inserts, not for proxied responses
    /// (those stream).
    pub async fn read_body(&mut self, body: Incoming) -> Result<bytes::Bytes, hyper::Error> {
        use http_body::Body as _;
        let mut body = body;
        let mut out = bytes::BytesMut::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                self.poll_conn(cx);
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                None => return Ok(out.freeze()),
                Some(Err(e)) => return Err(e),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        out.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// True if another request can go on this connection.
    pub fn reusable(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }
}

/// A failed send: why, and the request if it never left.
pub struct SendFailure {
    pub error: UpstreamError,
    pub unsent: Option<http::Request<ReqBody>>,
}

impl SendFailure {
    /// The request never reached the node and comes back whole.
    pub fn unsent(error: UpstreamError, req: http::Request<ReqBody>) -> Self {
        Self {
            error,
            unsent: Some(req),
        }
    }
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// One ClickHouse node: its HTTP endpoint with a connection pool, and what the picker
/// knows about it. A node outlives config generations (reloads reuse it by label), so its
/// pool and health carry over.
pub struct Node {
    /// `host:port` (HTTP), used in logs and as the metric label; never shown to clients.
    pub label: String,
    pub host: String,
    pub port: u16,
    pub native_port: u16,
    /// Probe results, health and passive figures, kept by the picker.
    pub state: NodeState,
    /// Picks by purpose (read, write): the proxy's and the pick API's.
    pub picks: [IntCounter; 2],
    pub authority: HeaderValue,
    idle: ArrayQueue<Idle>,
    idle_timeout: Duration,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    /// Consecutive failures; 0 means up.
    failures: AtomicU32,
    /// Milliseconds since [`epoch`] until which the node is skipped.
    down_until: AtomicU64,
    pub in_flight: IntGauge,
    down_gauge: IntGauge,
    connections_opened: IntCounter,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Node {
    pub fn new(host: &str, port: u16, native_port: u16, config: &UpstreamConfig) -> Self {
        let label = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let authority = HeaderValue::from_str(&label)
            .unwrap_or_else(|_| HeaderValue::from_static("clickhouse"));
        Self {
            in_flight: METRICS.upstream_in_flight.with_label_values(&[&label]),
            down_gauge: METRICS.upstream_node_down.with_label_values(&[&label]),
            connections_opened: METRICS.upstream_connections.with_label_values(&[&label]),
            picks: [
                METRICS.picks.with_label_values(&[&label, "read"]),
                METRICS.picks.with_label_values(&[&label, "write"]),
            ],
            state: NodeState::default(),
            label,
            host: host.to_string(),
            port,
            native_port,
            authority,
            idle: ArrayQueue::new(config.max_idle_per_node.max(1)),
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            backoff_min: config.down_backoff_min,
            backoff_max: config.down_backoff_max,
            failures: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
        }
    }

    /// True while the node is being skipped after failures.
    pub fn is_down(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) > now_ms()
    }

    /// How much longer the node is skipped after failures.
    pub fn down_for(&self) -> Duration {
        Duration::from_millis(
            self.down_until
                .load(Ordering::Relaxed)
                .saturating_sub(now_ms()),
        )
    }

    /// Requests in flight to this node now.
    pub fn load(&self) -> u64 {
        self.in_flight.get().max(0) as u64
    }

    /// Records a failure: the node is skipped for a backoff that doubles per consecutive
    /// failure. Only the transition from up to down is logged.
    pub fn mark_down(&self, error: &UpstreamError) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let factor = 1u32 << (failures - 1).min(16);
        let backoff = self
            .backoff_min
            .saturating_mul(factor)
            .min(self.backoff_max);
        self.down_until
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        self.down_gauge.set(1);
        if failures == 1 {
            tracing::warn!(node = %self.label, error = %error, backoff_ms = backoff.as_millis() as u64, "Node marked down");
        }
        // Idle connections to a failing node are not worth keeping.
        while self.idle.pop().is_some() {}
    }

    /// Records a success; logs once if the node was down.
    pub fn mark_up(&self) {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            self.down_until.store(0, Ordering::Relaxed);
            self.down_gauge.set(0);
            tracing::info!(node = %self.label, "Node back up");
        }
    }

    /// A connection ready to take a request: a pooled idle one if a fresh enough one
    /// exists, else a new one.
    pub async fn checkout(&self) -> Result<Upstream, UpstreamError> {
        if let Some(upstream) = self.pooled() {
            return Ok(upstream);
        }
        self.connect().await
    }

    fn pooled(&self) -> Option<Upstream> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while let Some(Idle {
            mut upstream,
            since,
        }) = self.idle.pop()
        {
            // One poll reads a FIN the server sent while the connection sat idle.
            if since.elapsed() < self.idle_timeout
                && upstream.poll_conn(&mut cx)
                && upstream.reusable()
            {
                return Some(upstream);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, upstream: Upstream) {
        if !upstream.reusable() {
            return;
        }
        // A full pool drops the connection, which closes it.
        let _ = self.idle.push(Idle {
            upstream,
            since: Instant::now(),
        });
    }

    /// A new connection for requests, bypassing the pool (counted in
    /// `chgate_upstream_connections_opened_total`).
    pub async fn connect(&self) -> Result<Upstream, UpstreamError> {
        let upstream = self.open().await?;
        self.connections_opened.inc();
        Ok(upstream)
    }

    /// A new connection not counted as the request path's (the picker's probes).
    pub async fn open(&self) -> Result<Upstream, UpstreamError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
        // Small queries are latency-bound: do not wait to coalesce segments.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        Ok(Upstream {
            sender,
            conn: Some(Box::pin(conn)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_recovers() {
        let config = UpstreamConfig {
            down_backoff_min: Duration::from_secs(10),
            down_backoff_max: Duration::from_secs(25),
            ..UpstreamConfig::default()
        };
        let node = Node::new("127.0.0.250", 1, 9000, &config);
        assert!(!node.is_down());
        let err = UpstreamError::ConnectTimeout;
        node.mark_down(&err);
        assert!(node.is_down());
        let first = node.down_until.load(Ordering::Relaxed);
        node.mark_down(&err);
        node.mark_down(&err);
        let third = node.down_until.load(Ordering::Relaxed);
        assert!(third >= first + 14_000, "backoff grows, capped at 25 s");
        assert!(third <= now_ms() + 25_000);
        node.mark_up();
        assert!(!node.is_down());
    }
}
