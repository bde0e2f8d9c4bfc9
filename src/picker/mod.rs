//! The shard picker (issue 3, in progress). Done so far: the two pure parts every other
//! piece builds on.
//!
//! - [`health`]: hysteresis on probe results and the slow-start ramp after recovery.
//! - [`select`]: lock-free, allocation-free weighted power-of-two-choices over a published
//!   snapshot of weights, and weighted rendezvous for sticky sessions.
//! - [`probe`]: one-round-trip node probes over system tables (feature-detected per server)
//!   and ZooKeeper `ruok`/`mntr`.
//!
//! Not yet: the per-node probe tasks and their schedule, the score from load, latency and
//! errors, exclusions by purpose, wiring into the proxy's routing (which still uses
//! [`crate::upstream::Cluster::candidates`]), the retry budget, the pick API and metrics.

pub mod health;
pub mod probe;
pub mod select;
