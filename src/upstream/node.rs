//! One ClickHouse node as chgate talks to it: its HTTP endpoint, a pool of keep-alive
//! connections, and a short backoff after connections to it fail.
//!
//! A node outlives config generations (a reload reuses it by label), so its pool carries
//! over; [`Node::apply`] gives it the new generation's `[upstream]` settings.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Context;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;

use super::body::Body;
use super::connection::{SendFailure, Upstream, UpstreamError};
use crate::config::UpstreamConfig;
use crate::metrics::METRICS;

/// The `[upstream]` settings a node uses, swapped whole by [`Node::apply`].
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    idle_timeout: Duration,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    max_idle: usize,
}

impl From<&UpstreamConfig> for Settings {
    fn from(c: &UpstreamConfig) -> Self {
        Self {
            idle_timeout: c.idle_timeout,
            connect_timeout: c.connect_timeout,
            backoff_min: c.down_backoff_min,
            backoff_max: c.down_backoff_max,
            max_idle: c.max_idle_per_node.max(1),
        }
    }
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// A whole answer: for queries, inserts and API calls, not for proxied responses (those
/// stream).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Node {
    /// `host:port` (HTTP), used in logs and as the metric label; never shown to clients.
    pub label: String,
    pub host: String,
    pub port: u16,
    pub native_port: u16,
    pub authority: HeaderValue,
    settings: ArcSwap<Settings>,
    idle: ArcSwap<ArrayQueue<Idle>>,
    /// Consecutive failures; 0 means no backoff.
    failures: AtomicU32,
    /// Milliseconds since [`epoch`] until which the node is skipped.
    down_until: AtomicU64,
    /// Requests in flight to this node now (see [`crate::metrics::GaugeGuard`]).
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

/// `host:port`, with IPv6 hosts in brackets: a node's label.
pub fn label(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Node {
    pub fn new(host: &str, port: u16, native_port: u16, config: &UpstreamConfig) -> Self {
        let label = label(host, port);
        let authority = HeaderValue::from_str(&label)
            .unwrap_or_else(|_| HeaderValue::from_static("clickhouse"));
        let settings = Settings::from(config);
        Self {
            in_flight: METRICS.upstream_in_flight.with_label_values(&[&label]),
            down_gauge: METRICS.upstream_node_down.with_label_values(&[&label]),
            connections_opened: METRICS.upstream_connections.with_label_values(&[&label]),
            label,
            host: host.to_string(),
            port,
            native_port,
            authority,
            idle: ArcSwap::from_pointee(ArrayQueue::new(settings.max_idle)),
            settings: ArcSwap::from_pointee(settings),
            failures: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
        }
    }

    /// Takes on a new generation's `[upstream]` settings. A different pool size starts a
    /// new pool (the idle connections of the old one close); the rest applies from the
    /// next connection or backoff on.
    pub fn apply(&self, config: &UpstreamConfig) {
        let next = Settings::from(config);
        let current = self.settings.load();
        if **current == next {
            return;
        }
        if current.max_idle != next.max_idle {
            self.idle.store(Arc::new(ArrayQueue::new(next.max_idle)));
        }
        self.settings.store(Arc::new(next));
    }

    /// True while the node is skipped after failed connections.
    pub fn backing_off(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) > now_ms()
    }

    /// How much longer the node is skipped after failed connections.
    pub fn backoff_left(&self) -> Duration {
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
    /// failure. Only the transition into backoff is logged.
    pub fn back_off(&self, error: &UpstreamError) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let factor = 1u32 << (failures - 1).min(16);
        let settings = self.settings.load();
        let backoff = settings
            .backoff_min
            .saturating_mul(factor)
            .min(settings.backoff_max);
        self.down_until
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        self.down_gauge.set(1);
        if failures == 1 {
            tracing::warn!(node = %self.label, error = %error, backoff_ms = backoff.as_millis() as u64, "Node marked down");
        }
        // Idle connections to a failing node are not worth keeping.
        let idle = self.idle.load();
        while idle.pop().is_some() {}
    }

    /// Records a success; logs once if the node was backing off.
    pub fn recovered(&self) {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            self.down_until.store(0, Ordering::Relaxed);
            self.down_gauge.set(0);
            tracing::info!(node = %self.label, "Node back up");
        }
    }

    /// Counts a failed request on this node in `chgate_upstream_errors_total`.
    pub fn count_error(&self, error: &UpstreamError) {
        METRICS
            .upstream_errors
            .with_label_values(&[&self.label, error.kind()])
            .inc();
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
        let idle_timeout = self.settings.load().idle_timeout;
        let idle = self.idle.load();
        while let Some(Idle {
            mut upstream,
            since,
        }) = idle.pop()
        {
            // One poll reads a FIN the server sent while the connection sat idle.
            if since.elapsed() < idle_timeout && upstream.poll_conn(&mut cx) && upstream.reusable()
            {
                upstream.reused = true;
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
        let _ = self.idle.load().push(Idle {
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

    /// A new TCP connection to the node's native port (counted in
    /// `chgate_upstream_connections_opened_total` like HTTP's), for the native frontend,
    /// which speaks the protocol over it.
    pub async fn connect_native(&self) -> Result<TcpStream, UpstreamError> {
        let connect_timeout = self.settings.load().connect_timeout;
        let stream = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((self.host.as_str(), self.native_port)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        self.connections_opened.inc();
        Ok(stream)
    }

    /// A new connection not counted as the request path's (the picker's probes).
    pub async fn open(&self) -> Result<Upstream, UpstreamError> {
        let connect_timeout = self.settings.load().connect_timeout;
        let stream = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
        // Small queries are latency-bound: do not wait to coalesce segments.
        let _ = stream.set_nodelay(true);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        // Header names reach the client in the server's case (hyper keeps them per response).
        let (sender, conn) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        Ok(Upstream::new(sender, conn, fd))
    }

    /// Sends a request on a pooled (or new) connection and returns the response head with
    /// the connection it came on (the caller streams the body, then checks it back in).
    ///
    /// A pooled connection that turns out to have closed before the request left is not
    /// the node's fault: the request goes once more on a fresh connection to the same node
    /// (counted as `stale_connection` in `chgate_upstream_errors_total`). A failure that
    /// hands the request back never reached the node and may go anywhere.
    pub async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Upstream), SendFailure> {
        let mut upstream = match self.checkout().await {
            Ok(u) => u,
            Err(error) => return Err(SendFailure::unsent(error, req)),
        };
        let req = match upstream.send(req).await {
            Ok(resp) => return Ok((resp, upstream)),
            Err(SendFailure {
                error: UpstreamError::Stale,
                unsent: Some(req),
            }) => {
                self.count_error(&UpstreamError::Stale);
                req
            }
            Err(failure) => return Err(failure),
        };
        let mut fresh = match self.connect().await {
            Ok(u) => u,
            Err(error) => return Err(SendFailure::unsent(error, req)),
        };
        let resp = fresh.send(req).await?;
        Ok((resp, fresh))
    }

    /// One whole exchange within `timeout`, for a request that is safe to send twice to
    /// this node (a query, or an insert the node deduplicates): `make` builds it, once or
    /// twice. A pooled connection that closed before the request left, or that closed after
    /// it left and before any answer (the server ending an idle keep-alive connection just
    /// as the request came), gets one more try on a fresh connection to the same node: a
    /// stale connection is never taken for the node failing.
    pub async fn exchange(
        &self,
        make: impl Fn() -> Request<Body>,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        let work = async {
            let mut upstream = self.checkout().await?;
            match self.round_trip(&mut upstream, make()).await {
                Ok(answer) => {
                    self.checkin(upstream);
                    return Ok(answer);
                }
                Err(e) if upstream.worth_a_fresh_try(&e) => {
                    tracing::debug!(node = %self.label, error = %e, "Pooled connection was stale; sending again on a fresh one");
                    self.count_error(&UpstreamError::Stale);
                }
                Err(e) => return Err(e),
            }
            let mut fresh = self.connect().await?;
            let answer = self.round_trip(&mut fresh, make()).await?;
            self.checkin(fresh);
            Ok(answer)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))?
    }

    async fn round_trip(
        &self,
        upstream: &mut Upstream,
        req: Request<Body>,
    ) -> Result<Answer, UpstreamError> {
        let resp = upstream.send(req).await.map_err(|f| f.error)?;
        let (parts, body) = resp.into_parts();
        let body = upstream
            .read_body(body)
            .await
            .map_err(UpstreamError::Body)?;
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
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
        assert!(!node.backing_off());
        let err = UpstreamError::ConnectTimeout;
        node.back_off(&err);
        assert!(node.backing_off());
        let first = node.down_until.load(Ordering::Relaxed);
        node.back_off(&err);
        node.back_off(&err);
        let third = node.down_until.load(Ordering::Relaxed);
        assert!(third >= first + 14_000, "backoff grows, capped at 25 s");
        assert!(third <= now_ms() + 25_000);
        node.recovered();
        assert!(!node.backing_off());
    }

    #[test]
    fn a_reload_reaches_a_reused_node() {
        let node = Node::new("127.0.0.250", 1, 9000, &UpstreamConfig::default());
        let before = Arc::as_ptr(&node.idle.load_full());
        node.apply(&UpstreamConfig {
            connect_timeout: Duration::from_millis(1234),
            down_backoff_min: Duration::from_secs(7),
            ..UpstreamConfig::default()
        });
        assert_eq!(
            node.settings.load().connect_timeout,
            Duration::from_millis(1234)
        );
        assert_eq!(
            Arc::as_ptr(&node.idle.load_full()),
            before,
            "same pool size: same pool"
        );
        node.back_off(&UpstreamError::ConnectTimeout);
        assert!(
            node.backoff_left() > Duration::from_secs(6),
            "the new backoff applies"
        );
        node.apply(&UpstreamConfig {
            max_idle_per_node: 3,
            ..UpstreamConfig::default()
        });
        assert_eq!(node.idle.load().capacity(), 3);
    }
}
