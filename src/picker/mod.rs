//! The shard picker (issue 3, in progress). Done so far: the two pure parts every other
//! piece builds on.
//!
//! - [`health`]: hysteresis on probe results and the slow-start ramp after recovery.
//! - [`select`]: lock-free, allocation-free weighted power-of-two-choices over a published
//!   snapshot of weights, and weighted rendezvous for sticky sessions.
//! - [`probe`]: one-round-trip node probes over system tables (feature-detected per server)
//!   and ZooKeeper `ruok`/`mntr`.
//! - [`score`]: figures, health and passive errors to a weight per purpose, or the reason
//!   the node is excluded.
//!
//! Not yet: the config (probe schedule, thresholds, a ZooKeeper ensemble per shard group),
//! the per-node probe tasks that feed `health` and `score` and publish `select` snapshots,
//! wiring into the proxy's reads (which still use [`crate::upstream::Cluster::candidates`]),
//! the retry budget, `/v1/pick` and `/v1/topology`, the admin token and the per-node metrics.

pub mod health;
pub mod probe;
pub mod score;
pub mod select;
