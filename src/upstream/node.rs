use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use http::HeaderValue;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::metrics::METRICS;
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
}

impl UpstreamError {
    /// True if the request was never handed to the node, so any request may be retried.
    pub fn before_send(&self) -> bool {
        !matches!(self, Self::Send(_))
    }

    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handshake(_) => "handshake",
            Self::Send(_) => "send",
        }
    }
}

struct Idle {
    sender: SendRequest<ReqBody>,
    since: Instant,
}

/// One ClickHouse node's HTTP endpoint.
pub struct Node {
    /// `host:port`, used in logs and as the metric label; never shown to clients.
    pub label: String,
    pub shard: usize,
    host: String,
    port: u16,
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
    pub fn new(host: &str, port: u16, shard: usize, config: &UpstreamConfig) -> Self {
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
            label,
            shard,
            host: host.to_string(),
            port,
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
    pub async fn checkout(&self) -> Result<SendRequest<ReqBody>, UpstreamError> {
        while let Some(mut idle) = self.idle.pop() {
            if idle.since.elapsed() >= self.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            // Racing: the previous response's end may not have been processed by the
            // connection task yet; readiness arrives promptly, or the connection is dead.
            if idle.sender.ready().await.is_ok() {
                return Ok(idle.sender);
            }
        }
        self.connect().await
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        // A full pool drops the connection, which closes it.
        let _ = self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<SendRequest<ReqBody>, UpstreamError> {
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
        let label = self.label.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(node = %label, error = %e, "Upstream connection ended with an error");
            }
        });
        self.connections_opened.inc();
        Ok(sender)
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
        let node = Node::new("127.0.0.250", 1, 0, &config);
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
