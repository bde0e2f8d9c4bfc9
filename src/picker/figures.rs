//! What the probes learn, as plain data with no I/O: a server's capabilities, a node's
//! figures, a ZooKeeper member's, and a row of `system.clusters`. The probes fill them in;
//! health, scores and the API read them.

use std::time::Duration;

/// What a server offers, asked once per node (and again after it restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `system.disks` (19.15+): free space per disk.
    pub disks: bool,
    /// `system.replicas` is readable (replication figures).
    pub replicas: bool,
    /// `KILL QUERY` cancels while holding the server's process list: before 22.9
    /// (ClickHouse PR #41467, "possible hung/deadlock on query cancellation"). A killed
    /// query that waits on a node which does not answer (a Distributed read and a stopped
    /// replica) then holds every new query of the server until its `receive_timeout`, and
    /// nodes whose queries wait on that server stall in turn. True when the version could
    /// not be read.
    pub kill_holds_process_list: bool,
}

impl Capabilities {
    /// Whether `KILL QUERY` holds the process list on a server of `version` (`version()`).
    pub fn kill_holds_process_list(version: &str) -> bool {
        let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor) < (22, 9),
            _ => true,
        }
    }
}

/// One probe's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFigures {
    pub round_trip: Duration,
    pub running_queries: u64,
    pub merges: u64,
    pub background_pool_tasks: u64,
    /// Replicated tables in read-only mode (lost ZooKeeper, or a readonly replica).
    pub readonly_replicas: u64,
    pub session_expired: bool,
    /// Seconds the most delayed replicated table lags behind.
    pub replica_delay_s: u64,
    pub replica_queue: u64,
    /// Active parts in the fullest partition: the "too many parts" risk.
    pub max_parts_in_partition: u64,
    /// Free bytes on the emptiest disk; `None` if the server cannot tell.
    pub free_disk_bytes: Option<u64>,
}

/// What `mntr` says about an ensemble member.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZooKeeperFigures {
    pub round_trip: Duration,
    pub server_state: String,
    pub avg_latency_ms: f64,
    pub outstanding_requests: u64,
}

/// What `system.clusters` on a node says a cluster is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRow {
    pub shard_num: u32,
    pub shard_weight: u32,
    pub replica_num: u32,
    pub host_name: String,
    pub port: u16,
}
