//! The shard picker: it knows every cluster's topology and the live health and load of
//! every node, and answers "which node should take this" for the gateway's requests, the
//! sinks' batches and, over the admin API, other components'.
//!
//! - [`figures`]: what the probes learn, as plain data.
//! - [`probe`]: one-round-trip node probes over system tables (feature-detected per server),
//!   `/ping`, ZooKeeper `ruok`/`mntr`, `system.clusters`.
//! - [`health`]: hysteresis on probe results and the slow-start ramp after recovery.
//! - [`state`]: what is known per node and per ZooKeeper ensemble.
//! - [`backend`]: a node as the picker tracks it, and how callers report on it.
//! - [`score`]: a node's weight per purpose, or the reason it is excluded.
//! - [`topology`]: shard groups, shards, replicas; from the config or `system.clusters`.
//! - [`purpose`], [`view`]: what a pick is for; the published weights and the picks drawn
//!   from them.
//! - [`select`]: lock-free, allocation-free weighted power-of-two-choices and weighted
//!   rendezvous for sessions.
//! - [`budget`]: how many failovers a cluster may spend.
//! - [`hedge`]: when a read still waiting for its answer goes to a second node too.
//! - [`cluster`]: a cluster's accounts, view, retry budget and background tasks.
//! - [`clusters`]: every cluster of a config generation, and reconciling the next one.
//! - [`removal`]: which failed replicas the published `remote_servers` leaves out.
//! - [`api`]: `/v1/pick` and `/v1/topology`.

pub mod api;
pub mod backend;
pub mod budget;
pub mod cluster;
pub mod clusters;
pub mod figures;
pub mod health;
pub mod hedge;
pub mod probe;
pub mod purpose;
pub mod removal;
pub mod score;
pub mod select;
pub mod series;
pub mod state;
pub mod topology;
pub mod view;

pub use backend::Backend;
pub use cluster::Cluster;
pub use clusters::{ClusterConfigs, Clusters};
pub use purpose::Purpose;
pub use state::NodeState;
pub use view::View;
