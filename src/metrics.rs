//! The Prometheus metrics chgate exports on the admin listener's `/metrics`.
//!
//! Labels are bounded: `user` and `node` come from the config (an unauthenticated request
//! is labelled `user="-"`), `status` is an HTTP status code, `kind`/`reason`/`result` are
//! fixed sets named in the code.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_request_bytes: IntCounterVec,
    pub http_response_bytes: IntCounterVec,
    pub http_in_flight: IntGauge,
    pub http_errors: IntCounterVec,
    pub http_retries: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_node_down: IntGaugeVec,
    pub upstream_connections: IntCounterVec,
    pub config_reloads: IntCounterVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let http_requests = counter(
            "chgate_http_requests_total",
            "HTTP requests answered, by mapped user, HTTP status and upstream node (\"-\" when none was used).",
            &["user", "status", "node"],
        );
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "chgate_http_request_duration_seconds",
                "Time from receiving a request to the last byte of its response, by mapped user.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            &["user"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_request_duration.clone()))
            .expect("unique metric");
        let http_request_bytes = counter(
            "chgate_http_request_body_bytes_total",
            "Request body bytes received from clients and forwarded, by mapped user.",
            &["user"],
        );
        let http_response_bytes = counter(
            "chgate_http_response_body_bytes_total",
            "Response body bytes sent to clients from ClickHouse, by mapped user.",
            &["user"],
        );
        let http_in_flight = IntGauge::new(
            "chgate_http_in_flight_requests",
            "HTTP requests being handled now, including streaming responses.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_in_flight.clone()))
            .expect("unique metric");
        let http_errors = counter(
            "chgate_http_errors_total",
            "Requests the gateway answered with an error of its own, by kind.",
            &["kind"],
        );
        let http_retries = counter(
            "chgate_http_retries_total",
            "Reads retried on another node after the node tried failed before answering, by the failed node.",
            &["node"],
        );
        let auth_failures = counter(
            "chgate_auth_failures_total",
            "Failed client logins, by reason (unknown_user, bad_password, network_not_allowed, bad_credentials).",
            &["reason"],
        );
        let upstream_errors = counter(
            "chgate_upstream_errors_total",
            "Failures talking to ClickHouse nodes, by node and kind (connect, connect_timeout, handshake, send, stale_connection: a pooled connection the server had closed; the request went on a fresh one).",
            &["node", "kind"],
        );
        let upstream_in_flight = gauge_vec(
            "chgate_upstream_in_flight_requests",
            "Requests in flight to each ClickHouse node.",
            &["node"],
        );
        let upstream_node_down = gauge_vec(
            "chgate_upstream_node_down",
            "1 while a node is being skipped after refusing connections, else 0.",
            &["node"],
        );
        let upstream_connections = counter(
            "chgate_upstream_connections_opened_total",
            "New TCP connections opened to each ClickHouse node (a low rate means keep-alive reuse works).",
            &["node"],
        );
        let config_reloads = counter(
            "chgate_config_reloads_total",
            "Config reloads on SIGHUP, by result (ok, rejected).",
            &["result"],
        );
        let build = IntGaugeVec::new(
            Opts::new(
                "chgate_build_info",
                "Always 1; labelled with the chgate version.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            http_requests,
            http_request_duration,
            http_request_bytes,
            http_response_bytes,
            http_in_flight,
            http_errors,
            http_retries,
            auth_failures,
            upstream_errors,
            upstream_in_flight,
            upstream_node_down,
            upstream_connections,
            config_reloads,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding in-memory metric families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
