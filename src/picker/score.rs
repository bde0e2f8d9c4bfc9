//! From what is known about a node to its weight for each purpose, or the reason it is
//! excluded.
//!
//! Hard exclusions (the node gets no traffic of that kind, and the pick API says why):
//! - down (health hysteresis): everything;
//! - reads: replication delay above `max_replica_delay`;
//! - writes: a read-only replicated table, an expired ZooKeeper session, the shard's
//!   ZooKeeper ensemble unhealthy, or a partition at `max_parts_in_partition` (ClickHouse
//!   itself starts refusing inserts there).
//!
//! Otherwise the weight is the configured weight scaled down by, each in (0, 1]:
//! slow start, load (`1 / (1 + load / load_scale)`), probe latency
//! (`1 / (1 + rtt / latency_scale)`), passive errors (`(1 - error_rate)^2`) and, for
//! writes, how close the fullest partition is to the parts limit.

use std::fmt;
use std::time::Duration;

use super::figures::NodeFigures;

/// Weights are published as integers; this is the weight of a configured weight of 1 with
/// every factor at 1.
pub const WEIGHT_SCALE: f64 = 1000.0;

#[derive(Debug, Clone, Copy)]
pub struct ScoreConfig {
    pub max_replica_delay: Duration,
    pub max_parts_in_partition: u64,
    /// Running queries + background tasks at which a node's weight halves.
    pub load_scale: f64,
    /// Probe round trip at which a node's weight halves.
    pub latency_scale: Duration,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            max_replica_delay: Duration::from_secs(30),
            max_parts_in_partition: 300,
            load_scale: 16.0,
            latency_scale: Duration::from_millis(50),
        }
    }
}

/// Everything the score looks at for one node.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Configured relative weight (replica `weight`, default 1).
    pub configured_weight: f64,
    pub down: bool,
    /// The slow-start factor from [`super::health::Health::ramp`].
    pub ramp: f64,
    /// The last successful probe; `None` before the first.
    pub figures: Option<NodeFigures>,
    /// Passive error rate seen on real traffic, 0..1 (an EWMA).
    pub error_rate: f64,
    /// Health of the ZooKeeper ensemble behind this node's shard.
    pub zookeeper_healthy: bool,
    /// Skipped by the proxy after failed connections, for this much longer.
    pub refused_for: Option<Duration>,
}

/// Why a node takes no traffic of some kind. Shown to operators by the pick API.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    Down,
    /// The proxy's own connections failed; skipped for a backoff.
    Refused {
        retry_in_ms: u64,
    },
    ReplicaDelay {
        seconds: u64,
        max: u64,
    },
    ReadonlyReplica {
        tables: u64,
    },
    SessionExpired,
    ZooKeeperUnhealthy,
    TooManyParts {
        parts: u64,
        max: u64,
    },
}

impl Exclusion {
    /// A few words for a client-facing summary (no figures, no addresses).
    pub fn short(&self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Refused { .. } => "unreachable",
            Self::ReplicaDelay { .. } => "lagging",
            Self::ReadonlyReplica { .. } => "read-only",
            Self::SessionExpired => "without a ZooKeeper session",
            Self::ZooKeeperUnhealthy => "behind an unhealthy ZooKeeper",
            Self::TooManyParts { .. } => "with too many parts",
        }
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Down => write!(f, "node is down (failed its last health probes)"),
            Self::Refused { retry_in_ms } => write!(
                f,
                "connections to the node failed; skipped for another {retry_in_ms} ms"
            ),
            // Right after a restart ClickHouse reports the delay since the epoch until the
            // replica has loaded its queue.
            Self::ReplicaDelay { seconds, .. } if *seconds > 10 * 365 * 86_400 => write!(
                f,
                "the replica has not synced since it started (no replication queue update yet)"
            ),
            Self::ReplicaDelay { seconds, max } => {
                write!(f, "replication delay {seconds} s exceeds {max} s")
            }
            Self::ReadonlyReplica { tables } => {
                write!(f, "{tables} replicated table(s) are read-only")
            }
            Self::SessionExpired => write!(f, "the node's ZooKeeper session expired"),
            Self::ZooKeeperUnhealthy => {
                write!(f, "the shard's ZooKeeper ensemble is unhealthy")
            }
            Self::TooManyParts { parts, max } => {
                write!(f, "a partition has {parts} active parts (limit {max})")
            }
        }
    }
}

/// The node's standing for reads and for writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub read: Result<u32, Exclusion>,
    pub write: Result<u32, Exclusion>,
}

pub fn score(node: &NodeView, config: &ScoreConfig) -> Score {
    if node.down {
        return Score {
            read: Err(Exclusion::Down),
            write: Err(Exclusion::Down),
        };
    }
    if let Some(d) = node.refused_for {
        let e = Exclusion::Refused {
            retry_in_ms: d.as_millis() as u64,
        };
        return Score {
            read: Err(e.clone()),
            write: Err(e),
        };
    }
    let figures = node.figures.clone().unwrap_or_default();
    let load = (figures.running_queries + figures.background_pool_tasks) as f64;
    let load_factor = 1.0 / (1.0 + load / config.load_scale.max(f64::MIN_POSITIVE));
    let latency_factor = 1.0
        / (1.0
            + figures.round_trip.as_secs_f64()
                / config.latency_scale.as_secs_f64().max(f64::MIN_POSITIVE));
    let error_factor = (1.0 - node.error_rate.clamp(0.0, 1.0)).powi(2);
    let common = node.configured_weight.max(0.0)
        * node.ramp.clamp(0.0, 1.0)
        * load_factor
        * latency_factor
        * error_factor;

    let max_delay = config.max_replica_delay.as_secs();
    let read = if figures.replica_delay_s > max_delay {
        Err(Exclusion::ReplicaDelay {
            seconds: figures.replica_delay_s,
            max: max_delay,
        })
    } else {
        Ok(to_weight(common))
    };

    // The ensemble first: when it is down, read-only tables and expired sessions follow,
    // and the operator wants the cause.
    let write = if !node.zookeeper_healthy {
        Err(Exclusion::ZooKeeperUnhealthy)
    } else if figures.readonly_replicas > 0 {
        Err(Exclusion::ReadonlyReplica {
            tables: figures.readonly_replicas,
        })
    } else if figures.session_expired {
        Err(Exclusion::SessionExpired)
    } else if figures.max_parts_in_partition >= config.max_parts_in_partition {
        Err(Exclusion::TooManyParts {
            parts: figures.max_parts_in_partition,
            max: config.max_parts_in_partition,
        })
    } else {
        let headroom = 1.0
            - figures.max_parts_in_partition as f64 / config.max_parts_in_partition.max(1) as f64;
        Ok(to_weight(common * headroom))
    };
    Score { read, write }
}

/// An eligible node never rounds down to 0: 0 means excluded.
fn to_weight(w: f64) -> u32 {
    ((w * WEIGHT_SCALE).round() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> NodeView {
        NodeView {
            configured_weight: 1.0,
            down: false,
            ramp: 1.0,
            figures: Some(NodeFigures::default()),
            error_rate: 0.0,
            zookeeper_healthy: true,
            refused_for: None,
        }
    }

    fn cfg() -> ScoreConfig {
        ScoreConfig::default()
    }

    #[test]
    fn an_idle_healthy_node_gets_its_configured_weight() {
        assert_eq!(
            score(&healthy(), &cfg()),
            Score {
                read: Ok(1000),
                write: Ok(1000)
            }
        );
        let heavy = NodeView {
            configured_weight: 3.0,
            ..healthy()
        };
        assert_eq!(score(&heavy, &cfg()).read, Ok(3000));
    }

    #[test]
    fn exclusions_by_purpose() {
        let down = NodeView {
            down: true,
            ..healthy()
        };
        assert_eq!(score(&down, &cfg()).read, Err(Exclusion::Down));
        assert_eq!(score(&down, &cfg()).write, Err(Exclusion::Down));

        let with = |f: NodeFigures| NodeView {
            figures: Some(f),
            ..healthy()
        };
        let lagging = score(
            &with(NodeFigures {
                replica_delay_s: 31,
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!(
            lagging.read,
            Err(Exclusion::ReplicaDelay {
                seconds: 31,
                max: 30
            })
        );
        assert!(
            lagging.write.is_ok(),
            "a lagging replica still takes writes"
        );

        let readonly = score(
            &with(NodeFigures {
                readonly_replicas: 2,
                ..Default::default()
            }),
            &cfg(),
        );
        assert!(
            readonly.read.is_ok(),
            "a read-only replica still serves reads"
        );
        assert_eq!(
            readonly.write,
            Err(Exclusion::ReadonlyReplica { tables: 2 })
        );

        let expired = score(
            &with(NodeFigures {
                session_expired: true,
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!(expired.write, Err(Exclusion::SessionExpired));

        let no_zk = NodeView {
            zookeeper_healthy: false,
            ..healthy()
        };
        let s = score(&no_zk, &cfg());
        assert!(s.read.is_ok());
        assert_eq!(s.write, Err(Exclusion::ZooKeeperUnhealthy));
        assert_eq!(
            s.write.unwrap_err().to_string(),
            "the shard's ZooKeeper ensemble is unhealthy"
        );

        let parts = score(
            &with(NodeFigures {
                max_parts_in_partition: 300,
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!(
            parts.write,
            Err(Exclusion::TooManyParts {
                parts: 300,
                max: 300
            })
        );
    }

    #[test]
    fn weight_math() {
        let with = |f: NodeFigures| NodeView {
            figures: Some(f),
            ..healthy()
        };
        // Load equal to load_scale halves the weight.
        let busy = score(
            &with(NodeFigures {
                running_queries: 10,
                background_pool_tasks: 6,
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!(busy.read, Ok(500));
        // A round trip equal to latency_scale halves it.
        let slow = score(
            &with(NodeFigures {
                round_trip: Duration::from_millis(50),
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!(slow.read, Ok(500));
        // Half the requests failing quarters it.
        let flaky = NodeView {
            error_rate: 0.5,
            ..healthy()
        };
        assert_eq!(score(&flaky, &cfg()).read, Ok(250));
        // Slow start scales linearly.
        let warming = NodeView {
            ramp: 0.1,
            ..healthy()
        };
        assert_eq!(score(&warming, &cfg()).read, Ok(100));
        // Parts headroom only affects writes.
        let parts = score(
            &with(NodeFigures {
                max_parts_in_partition: 150,
                ..Default::default()
            }),
            &cfg(),
        );
        assert_eq!((parts.read, parts.write), (Ok(1000), Ok(500)));
        // Factors multiply, and an eligible node never reaches 0.
        let awful = NodeView {
            error_rate: 0.999,
            ramp: 0.1,
            ..with(NodeFigures {
                running_queries: 1000,
                ..Default::default()
            })
        };
        assert_eq!(score(&awful, &cfg()).read, Ok(1));
    }

    #[test]
    fn more_load_never_means_more_weight() {
        let mut last = u32::MAX;
        for running in 0..200 {
            let v = NodeView {
                figures: Some(NodeFigures {
                    running_queries: running,
                    ..Default::default()
                }),
                ..healthy()
            };
            let w = score(&v, &cfg()).read.unwrap();
            assert!(w <= last, "running {running}: {w} > {last}");
            last = w;
        }
    }
}
