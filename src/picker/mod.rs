//! The shard picker: it knows every cluster's topology and the live health and load of
//! every node, and answers "which node should take this" for the proxy's requests and, over
//! the admin API, for other components' batches.
//!
//! - [`probe`]: one-round-trip node probes over system tables (feature-detected per server),
//!   `/ping`, ZooKeeper `ruok`/`mntr`, `system.clusters`.
//! - [`health`]: hysteresis on probe results and the slow-start ramp after recovery.
//! - [`state`]: what is known per node and per ZooKeeper ensemble.
//! - [`score`]: a node's weight per purpose, or the reason it is excluded.
//! - [`topology`]: shard groups, shards, replicas; from the config or `system.clusters`.
//! - [`view`]: the published weights and the picks drawn from them.
//! - [`select`]: lock-free, allocation-free weighted power-of-two-choices and weighted
//!   rendezvous for sessions.
//! - [`cluster`]: a cluster's accounts, view, retry budget and background tasks.
//! - [`api`]: `/v1/pick` and `/v1/topology`.

pub mod api;
pub mod budget;
pub mod cluster;
pub mod health;
pub mod probe;
pub mod score;
pub mod select;
pub mod state;
pub mod topology;
pub mod view;

pub use cluster::Cluster;
pub use state::NodeState;
pub use view::{Purpose, View};
