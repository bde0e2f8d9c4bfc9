//! chgate: a ClickHouse-aware gateway.
//!
//! A tour, following a request through `chgate proxy`:
//!
//! - [`cli`] parses the command line; `main.rs` only calls [`cli::main`].
//! - [`config`] turns a TOML file into typed, fully validated settings ([`config::load`]);
//!   [`secret`] loads cluster account passwords from the environment or files.
//! - [`proxy::server`] binds the listeners and runs one task per client connection;
//!   the request handler takes each request through
//!   - [`auth`]: which credentials it carries, whether they are right, throttling failures;
//!   - policy: read-only users ([`proxy::sql`] tells reads from writes), allowed networks;
//!   - rewriting for the mapped cluster account, then the shard [`picker`] chooses a node
//!     by health and load, and [`upstream`] sends it over a pooled keep-alive connection
//!     (driven by the request's own task), retrying a read on the next best node;
//!   - streaming the response back ([`proxy::body`]), which also returns the connection to
//!     its pool and records the request's metrics and access log line.
//! - [`admin`] serves `/metrics`, `/healthz`, `/readyz` and the picker's `/v1` API on its
//!   own thread;
//!   [`metrics`] defines what is exported.
//! - [`tls`] builds the HTTPS listener's rustls config.
//! - [`ingest`]: `chgate ingest`, Kafka into the nodes' local tables through rings, parser
//!   workers and the picker, exactly once with ZooKeeper batch intents.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod ingest;
pub mod metrics;
pub mod picker;
pub mod proxy;
pub mod secret;
pub mod tls;
pub mod upstream;
