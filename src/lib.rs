//! chgate: a ClickHouse-aware gateway.
//!
//! A tour, bottom up: every module uses only the ones listed before it (the order is
//! checked by `tests/layers.rs`).
//!
//! - Foundations: [`secret`] (cluster passwords from the environment or files), [`tls`],
//!   [`metrics`] (everything exported), [`backoff`], [`signals`], [`wake`] (a task's
//!   wakes of itself as another pass of its poll), [`failpoint`] (a crash or a wait put
//!   where a test needs it, from `CHGATE_FAILPOINTS`), and [`config`] (typed, fully validated
//!   settings, shared sections validated alike for every app).
//! - [`auth`]: client password hashes and throttling, protocol-free. [`clickhouse`]: what
//!   chgate knows about ClickHouse with no I/O (error codes, column types, RowBinary, the
//!   compressed block format, the insert statement). [`kafka`]: librdkafka as the apps use
//!   it (zero-copy messages, the batch queue, re-reads, dead letters).
//! - [`upstream`]: nodes over HTTP: keep-alive pools, one send with the stale-connection
//!   retry, SQL for chgate's own use, inserts.
//! - [`picker`]: probes, health, weights and the lock-free picks; clusters reconciled from
//!   config generation to generation.
//! - [`gateway`]: the core every frontend shares: users, authentication, policy,
//!   admission, routing with failover, and protocol-free errors. [`sink`]: a part of rows
//!   to a picked node of its shard, for the apps that write.
//! - Frontends: [`http`] (ClickHouse's HTTP interface), [`native`] (ClickHouse's native
//!   TCP protocol, relayed packet by packet) and [`admin`] (`/metrics`,
//!   `/readyz`, the `/v1` pick API), the latter behind a small trait both apps implement.
//! - Apps: [`proxy`] (`chgate proxy`: gateway, frontends, reload, drain), [`ingest`]
//!   (`chgate ingest`: Kafka into the nodes' local tables, exactly once) and [`cdc`]
//!   (`chgate cdc`: PostgreSQL changes into Kafka in Debezium's envelope).
//! - [`cli`] parses the command line; `main.rs` only calls [`cli::main`].
//!
//! One HTTP query: `http::server` accepts the connection; `http::handler` reads the
//! credentials (`http::credentials`) and has the gateway log the client in, rewrites the
//! request (`http::rewrite`), sniffs the statement (`http::sniff`); the gateway applies
//! policy, admits and routes it (`gateway::route`: the picker's choice, failover within the
//! retry budget), `upstream` sends it on a pooled connection, and `http::body` streams the
//! answer back, returning the connection to its pool and accounting for the request.

pub mod net;
pub mod secret;
pub mod tls;

pub mod backoff;
pub mod config;
pub mod failpoint;
pub mod metrics;
pub mod signals;
pub mod wake;

pub mod auth;
pub mod clickhouse;
pub mod kafka;

pub mod upstream;

pub mod picker;

pub mod gateway;
pub mod sink;

pub mod admin;
pub mod http;
pub mod native;

pub mod cdc;
pub mod ingest;
pub mod proxy;

pub mod cli;
