//! Which replicas a cluster's published `remote_servers` leaves out: a replica failing for
//! `remove_after` is taken out, one that has been healthy for `restore_after` is put back.
//! Pure decisions over what the picker sees, made by the elected proxy once per tick.
//!
//! Rules, in the order they apply:
//! - a replica no longer configured is forgotten;
//! - a taken-out replica healthy for `restore_after` is put back, and as soon as it is
//!   healthy if its shard has fewer than two healthy replicas in the published cluster (one
//!   more failure would leave the shard with none: every Distributed query would fail with
//!   ALL_CONNECTION_TRIES_FAILED until the next tick noticed; `min_removal_interval` still
//!   bounds how often a flapping replica is taken out);
//! - a replica failing for `remove_after` is taken out only if its shard keeps a healthy
//!   published replica (never the last), at most one per `min_removal_interval` per
//!   cluster, the longest failing first;
//! - with `remove_failed` off, every taken-out replica is put back.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::remote_servers::{replica_key, Removed, RemovedReplica};

/// What is published to the nodes, as one instance knows it: shown in `/v1/topology`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Publication {
    /// The clusters (keys in `[clusters]`) published as `remote_servers`.
    pub clusters: Vec<String>,
    /// The replicas the elected instance has taken out of them.
    pub removed: Removed,
    /// The elected instance's name, if one leads.
    pub leader: Option<String>,
    pub this_instance_leads: bool,
    /// The elected instance's last publication, per ensemble: `ok` or the error.
    pub ensembles: BTreeMap<String, String>,
    /// Why the last round could not run (ZooKeeper unreachable, ...).
    pub last_error: Option<String>,
    /// Nodes whose own `system.clusters` still differs from the published cluster on two
    /// checks in a row (the elected instance looks every 10 s): cluster -> node -> what
    /// differs.
    pub stale_nodes: BTreeMap<String, BTreeMap<String, String>>,
}

/// A cluster's removal settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub remove_failed: bool,
    pub remove_after: Duration,
    pub restore_after: Duration,
    pub min_removal_interval: Duration,
}

/// One replica as the picker sees it now.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `host:native_port`.
    pub key: String,
    /// Shard number, from 1.
    pub shard: u32,
    /// Why it is failing; `None` when healthy.
    pub failing: Option<String>,
}

/// Every replica of `cluster` as its probes see it now: failing when down (probe failures
/// or hung) or when its ZooKeeper session has expired.
pub fn observe(cluster: &super::Cluster) -> Vec<Seen> {
    let view = cluster.view();
    let t = &view.topology;
    let mut out = Vec::new();
    for shard in &t.shards {
        for &i in &shard.nodes {
            let node = &t.nodes[i].node;
            let probed = t.nodes[i].state.snapshot();
            let failing = if view.standings[i].state == super::health::State::Down {
                Some(match &probed.last_error {
                    Some(e) => format!("down: {e}"),
                    None => "down".to_string(),
                })
            } else if probed.figures.as_ref().is_some_and(|f| f.session_expired) {
                Some("its ZooKeeper session expired".to_string())
            } else {
                None
            };
            out.push(Seen {
                key: replica_key(&node.host, node.native_port),
                shard: shard.number,
                failing,
            });
        }
    }
    out
}

/// A decision, for the log and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Removed {
        key: String,
        shard: u32,
        reason: String,
    },
    Restored {
        key: String,
        shard: u32,
        after: Duration,
    },
    /// No longer configured: dropped from the list.
    Forgotten { key: String },
}

/// One cluster's memory between ticks: since when each replica has been failing or
/// healthy, and when the last replica was taken out.
#[derive(Debug, Default)]
pub struct Tracker {
    since: HashMap<String, (bool, Instant)>,
    last_removal: Option<Instant>,
}

impl Tracker {
    /// Updates `removed` (this cluster's taken-out replicas) from what is `seen` now.
    pub fn step(
        &mut self,
        now: Instant,
        unix_now: u64,
        seen: &[Seen],
        removed: &mut BTreeMap<String, RemovedReplica>,
        s: &Settings,
    ) -> Vec<Change> {
        for r in seen {
            let failing = r.failing.is_some();
            match self.since.get(&r.key) {
                Some((f, _)) if *f == failing => {}
                _ => {
                    self.since.insert(r.key.clone(), (failing, now));
                }
            }
        }
        self.since.retain(|k, _| seen.iter().any(|r| &r.key == k));
        let mut changes = Vec::new();
        let gone: Vec<String> = removed
            .keys()
            .filter(|k| !seen.iter().any(|r| &r.key == *k))
            .cloned()
            .collect();
        for key in gone {
            removed.remove(&key);
            changes.push(Change::Forgotten { key });
        }
        self.restore(now, seen, removed, s, &mut changes);
        if s.remove_failed {
            self.remove(now, unix_now, seen, removed, s, &mut changes);
        }
        changes
    }

    fn held_for(&self, key: &str, now: Instant) -> Duration {
        self.since
            .get(key)
            .map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at))
    }

    fn restore(
        &self,
        now: Instant,
        seen: &[Seen],
        removed: &mut BTreeMap<String, RemovedReplica>,
        s: &Settings,
        changes: &mut Vec<Change>,
    ) {
        for r in seen {
            if !removed.contains_key(&r.key) {
                continue;
            }
            let healthy_for = self.held_for(&r.key, now);
            let restore = !s.remove_failed
                || (r.failing.is_none()
                    && (healthy_for >= s.restore_after
                        || healthy_published(seen, removed, r.shard, &r.key) < 2));
            if restore {
                removed.remove(&r.key);
                changes.push(Change::Restored {
                    key: r.key.clone(),
                    shard: r.shard,
                    after: healthy_for,
                });
            }
        }
    }

    fn remove(
        &mut self,
        now: Instant,
        unix_now: u64,
        seen: &[Seen],
        removed: &mut BTreeMap<String, RemovedReplica>,
        s: &Settings,
        changes: &mut Vec<Change>,
    ) {
        if self
            .last_removal
            .is_some_and(|at| now.saturating_duration_since(at) < s.min_removal_interval)
        {
            return;
        }
        let mut candidates: Vec<(&Seen, Duration)> = seen
            .iter()
            .filter(|r| r.failing.is_some() && !removed.contains_key(&r.key))
            .map(|r| (r, self.held_for(&r.key, now)))
            .filter(|(_, d)| *d >= s.remove_after)
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.key.cmp(&b.0.key)));
        for (r, _) in candidates {
            if !has_healthy_published(seen, removed, r.shard, &r.key) {
                continue;
            }
            let reason = r.failing.clone().unwrap_or_default();
            removed.insert(
                r.key.clone(),
                RemovedReplica {
                    shard: r.shard,
                    reason: reason.clone(),
                    since: unix_now,
                },
            );
            self.last_removal = Some(now);
            changes.push(Change::Removed {
                key: r.key.clone(),
                shard: r.shard,
                reason,
            });
            return;
        }
    }
}

/// Whether `shard` has a healthy replica, other than `except`, in the published cluster.
/// How many replicas of `shard`, other than `except`, are healthy and published.
fn healthy_published(
    seen: &[Seen],
    removed: &BTreeMap<String, RemovedReplica>,
    shard: u32,
    except: &str,
) -> usize {
    seen.iter()
        .filter(|o| {
            o.shard == shard
                && o.key != except
                && o.failing.is_none()
                && !removed.contains_key(&o.key)
        })
        .count()
}

fn has_healthy_published(
    seen: &[Seen],
    removed: &BTreeMap<String, RemovedReplica>,
    shard: u32,
    except: &str,
) -> bool {
    healthy_published(seen, removed, shard, except) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        remove_failed: true,
        remove_after: Duration::from_secs(5),
        restore_after: Duration::from_secs(10),
        min_removal_interval: Duration::from_secs(30),
    };

    fn seen(states: &[(&str, u32, bool)]) -> Vec<Seen> {
        states
            .iter()
            .map(|(k, shard, failing)| Seen {
                key: k.to_string(),
                shard: *shard,
                failing: failing.then(|| "down".to_string()),
            })
            .collect()
    }

    #[test]
    fn a_replica_failing_long_enough_is_taken_out_then_put_back_after_holding_healthy() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let mut removed = BTreeMap::new();
        let down = seen(&[("a", 1, false), ("b", 1, true), ("e", 1, false)]);
        assert!(t.step(t0, 0, &down, &mut removed, &S).is_empty());
        assert!(t
            .step(t0 + Duration::from_secs(4), 0, &down, &mut removed, &S)
            .is_empty());
        let c = t.step(t0 + Duration::from_secs(5), 7, &down, &mut removed, &S);
        assert_eq!(
            c,
            vec![Change::Removed {
                key: "b".into(),
                shard: 1,
                reason: "down".into()
            }]
        );
        assert_eq!(removed["b"].since, 7);
        let up = seen(&[("a", 1, false), ("b", 1, false), ("e", 1, false)]);
        let t1 = t0 + Duration::from_secs(20);
        assert!(t.step(t1, 0, &up, &mut removed, &S).is_empty());
        // Flapping resets the clock.
        t.step(t1 + Duration::from_secs(5), 0, &down, &mut removed, &S);
        assert!(t
            .step(t1 + Duration::from_secs(6), 0, &up, &mut removed, &S)
            .is_empty());
        assert!(t
            .step(t1 + Duration::from_secs(15), 0, &up, &mut removed, &S)
            .is_empty());
        let c = t.step(t1 + Duration::from_secs(16), 0, &up, &mut removed, &S);
        assert!(
            matches!(&c[..], [Change::Restored { key, .. }] if key == "b"),
            "{c:?}"
        );
        assert!(removed.is_empty());
    }

    #[test]
    fn a_shard_left_with_one_healthy_replica_takes_its_spare_back_at_once() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let mut removed = BTreeMap::new();
        let down = seen(&[("a", 1, false), ("b", 1, true)]);
        t.step(t0, 0, &down, &mut removed, &S);
        let c = t.step(t0 + Duration::from_secs(5), 0, &down, &mut removed, &S);
        assert_eq!(c.len(), 1, "{c:?}");
        // Healthy again: a two-replica shard does not wait restore_after with one left.
        let up = seen(&[("a", 1, false), ("b", 1, false)]);
        let c = t.step(t0 + Duration::from_secs(7), 0, &up, &mut removed, &S);
        assert!(
            matches!(&c[..], [Change::Restored { key, .. }] if key == "b"),
            "{c:?}"
        );
    }

    #[test]
    fn never_the_last_healthy_replica_of_a_shard() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let mut removed = BTreeMap::new();
        let both = seen(&[("a", 1, true), ("b", 1, true), ("c", 2, false)]);
        t.step(t0, 0, &both, &mut removed, &S);
        let c = t.step(t0 + Duration::from_secs(60), 0, &both, &mut removed, &S);
        assert!(c.is_empty(), "{c:?}");
        let alone = seen(&[("a", 1, true)]);
        let mut t = Tracker::default();
        t.step(t0, 0, &alone, &mut removed, &S);
        assert!(t
            .step(t0 + Duration::from_secs(60), 0, &alone, &mut removed, &S)
            .is_empty());
    }

    #[test]
    fn one_removal_per_interval_and_the_shards_only_healthy_one_comes_back_at_once() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let mut removed = BTreeMap::new();
        let two = seen(&[
            ("a", 1, false),
            ("b", 1, true),
            ("c", 2, false),
            ("d", 2, true),
        ]);
        t.step(t0, 0, &two, &mut removed, &S);
        let c = t.step(t0 + Duration::from_secs(6), 0, &two, &mut removed, &S);
        assert_eq!(c.len(), 1, "{c:?}");
        let c = t.step(t0 + Duration::from_secs(20), 0, &two, &mut removed, &S);
        assert!(c.is_empty(), "rate limited: {c:?}");
        let c = t.step(t0 + Duration::from_secs(36), 0, &two, &mut removed, &S);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(removed.len(), 2);
        // Shard 1's published replica fails, the taken-out one is healthy: it comes back now.
        let swapped = seen(&[
            ("a", 1, true),
            ("b", 1, false),
            ("c", 2, false),
            ("d", 2, true),
        ]);
        let c = t.step(t0 + Duration::from_secs(37), 0, &swapped, &mut removed, &S);
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::Restored { key, .. } if key == "b")),
            "{c:?}"
        );
    }

    #[test]
    fn unconfigured_replicas_are_forgotten_and_switching_off_restores_all() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let mut removed = BTreeMap::new();
        let r = RemovedReplica {
            shard: 1,
            reason: "down".into(),
            since: 0,
        };
        removed.insert("x".to_string(), r.clone());
        removed.insert("b".to_string(), r);
        let now = seen(&[("a", 1, false), ("b", 1, true)]);
        let off = Settings {
            remove_failed: false,
            ..S
        };
        let c = t.step(t0, 0, &now, &mut removed, &off);
        assert!(c.contains(&Change::Forgotten { key: "x".into() }), "{c:?}");
        assert!(removed.is_empty(), "{removed:?}");
    }
}
