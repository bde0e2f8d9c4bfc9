//! The picker's per-node and per-ensemble metric series, kept to the topology: a series is
//! exported while some cluster of the running config has its node (or shard group), and
//! removed when the last one lets go of it. Without this a node taken out of the topology,
//! by a reload or by discovery, would leave its `chgate_node_up` at its last value for the
//! life of the process, and an alert on it would never clear.
//!
//! Each cluster holds its keys in a [`Held`]; a process-wide count says how many clusters
//! hold each key (a node may be in two clusters, and a reload builds the new generation
//! before the old one goes). Every write of a keyed series goes through
//! [`Held::write`], under the cluster's lock and only for a key it still holds, so a probe
//! that finishes after its node left cannot bring the series back.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex, MutexGuard};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use crate::metrics::METRICS;

/// What a group of series is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A node in a cluster's shard: `chgate_node_up`, `chgate_node_weight`.
    Member {
        cluster: String,
        shard: String,
        node: String,
    },
    /// A node wherever it is: probe round trip, replication delay, probe failures, picks,
    /// its connections' gauges and counters, failovers and declined reads. (Requests by
    /// user, status and node stay: they are the clients' history, not the node's state.)
    Node(String),
    /// A shard group's ensemble: `chgate_zookeeper_healthy`.
    Group { cluster: String, group: String },
    /// A cluster as a whole: `chgate_hedge_after_seconds`. (Its counters of hedges, steered
    /// reads and spent retry budgets stay, as history: a read still in flight on a cluster
    /// a reload removed may count after it is gone.)
    Cluster(String),
}

/// How many clusters hold each key.
static HOLDERS: LazyLock<Mutex<HashMap<Key, usize>>> = LazyLock::new(Default::default);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The keys one cluster holds; `None` once it has let go of all of them (dropped).
#[derive(Debug)]
pub struct Held(Mutex<Option<HashSet<Key>>>);

/// A holder of nothing yet (not one already let go, which would write nothing).
impl Default for Held {
    fn default() -> Self {
        Self(Mutex::new(Some(HashSet::new())))
    }
}

impl Held {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds exactly `wanted` from now on (the cluster's current topology): takes the new
    /// keys, lets go of the departed ones (removing their series if no other cluster holds
    /// them); then runs `write` under the same lock. Does nothing once released.
    pub fn hold_only(&self, wanted: HashSet<Key>, write: impl FnOnce()) {
        let mut held = lock(&self.0);
        let Some(held) = held.as_mut() else { return };
        let mut holders = lock(&HOLDERS);
        for key in wanted.difference(held) {
            *holders.entry(key.clone()).or_default() += 1;
        }
        for key in held.difference(&wanted) {
            let_go(&mut holders, key);
        }
        drop(holders);
        *held = wanted;
        write();
    }

    /// Runs `write` (a write of `key`'s series) if the cluster still holds `key`.
    pub fn write(&self, key: &Key, write: impl FnOnce()) {
        let held = lock(&self.0);
        if held.as_ref().is_some_and(|h| h.contains(key)) {
            write();
        }
    }

    /// Lets go of every key, for good.
    pub fn release(&self) {
        let mut held = lock(&self.0);
        if let Some(keys) = held.take() {
            let mut holders = lock(&HOLDERS);
            for key in &keys {
                let_go(&mut holders, key);
            }
        }
    }
}

fn let_go(holders: &mut HashMap<Key, usize>, key: &Key) {
    let Some(n) = holders.get_mut(key) else {
        return;
    };
    *n -= 1;
    if *n == 0 {
        holders.remove(key);
        remove(key);
    }
}

/// Removes every series of `key`.
fn remove(key: &Key) {
    let m = &*METRICS;
    match key {
        Key::Member {
            cluster,
            shard,
            node,
        } => {
            let labels = [("cluster", cluster), ("shard", shard), ("node", node)];
            remove_matching(&m.node_health, &labels);
            remove_matching(&m.node_weight, &labels);
        }
        Key::Node(node) => {
            let labels = [("node", node)];
            remove_matching(&m.node_probe_seconds, &labels);
            remove_matching(&m.node_replication_delay, &labels);
            remove_matching(&m.node_probe_failures, &labels);
            remove_matching(&m.picks, &labels);
            remove_matching(&m.upstream_errors, &labels);
            remove_matching(&m.upstream_in_flight, &labels);
            remove_matching(&m.upstream_node_down, &labels);
            remove_matching(&m.upstream_connections, &labels);
            remove_matching(&m.failovers, &labels);
            remove_matching(&m.declined_reads, &labels);
        }
        Key::Group { cluster, group } => {
            remove_matching(
                &m.zookeeper_healthy,
                &[("cluster", cluster), ("group", group)],
            );
        }
        Key::Cluster(cluster) => {
            remove_matching(&m.hedge_after, &[("cluster", cluster)]);
        }
    }
}

/// Removes the series of `vec` whose labels include every pair of `labels` (whatever
/// their other labels: every purpose, every failure reason).
fn remove_matching<T: MetricVecBuilder>(vec: &MetricVec<T>, labels: &[(&str, &String)]) {
    let Some(names) = vec.desc().first().map(|d| d.variable_labels.clone()) else {
        return;
    };
    let mut doomed: Vec<Vec<String>> = Vec::new();
    for family in vec.collect() {
        for metric in family.get_metric() {
            let value = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|p| p.name() == name)
                    .map(|p| p.value().to_string())
            };
            if labels
                .iter()
                .all(|(name, want)| value(name).as_deref() == Some(want.as_str()))
            {
                doomed.push(names.iter().map(|n| value(n).unwrap_or_default()).collect());
            }
        }
    }
    for values in doomed {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let _ = vec.remove_label_values(&values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(node: &str) -> usize {
        METRICS
            .node_health
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|p| p.name() == "node" && p.value() == node)
            })
            .count()
    }

    fn member(node: &str) -> Key {
        Key::Member {
            cluster: "series-test".into(),
            shard: "1".into(),
            node: node.into(),
        }
    }

    fn set(node: &str) {
        METRICS
            .node_health
            .with_label_values(&["series-test", "1", node])
            .set(1);
    }

    #[test]
    fn a_series_goes_with_the_last_cluster_that_holds_it() {
        let (old, new) = (Held::new(), Held::new());
        let both: HashSet<Key> = [member("st-a:8123"), member("st-b:8123")].into();
        old.hold_only(both, || {
            set("st-a:8123");
            set("st-b:8123")
        });
        // The next generation keeps a and drops b.
        new.hold_only([member("st-a:8123")].into(), || set("st-a:8123"));
        assert_eq!((exported("st-a:8123"), exported("st-b:8123")), (1, 1));
        old.release();
        assert_eq!((exported("st-a:8123"), exported("st-b:8123")), (1, 0));
        // A late write of the old generation does not bring b back.
        old.write(&member("st-b:8123"), || set("st-b:8123"));
        new.write(&member("st-b:8123"), || set("st-b:8123"));
        assert_eq!(exported("st-b:8123"), 0);
        // Discovery drops a from the new generation's topology.
        new.hold_only(HashSet::new(), || {});
        assert_eq!(exported("st-a:8123"), 0);
    }

    #[test]
    fn a_clusters_hedge_bound_goes_with_the_cluster() {
        let gauge = |c: &str| {
            METRICS
                .hedge_after
                .collect()
                .iter()
                .flat_map(|f| f.get_metric())
                .filter(|m| m.get_label().iter().any(|p| p.value() == c))
                .count()
        };
        let (old, new) = (Held::new(), Held::new());
        let key = Key::Cluster("series-gone".into());
        old.hold_only([key.clone()].into(), || {
            METRICS
                .hedge_after
                .with_label_values(&["series-gone"])
                .set(0.5)
        });
        // A reload: the next generation of the same cluster holds it too.
        new.hold_only([key].into(), || {});
        old.release();
        assert_eq!(gauge("series-gone"), 1);
        // The cluster leaves the config.
        new.release();
        assert_eq!(gauge("series-gone"), 0);
    }

    #[test]
    fn every_purpose_and_reason_of_a_node_goes() {
        let held = Held::new();
        let node = Key::Node("st-c:8123".into());
        held.hold_only([node.clone()].into(), || {
            for reason in ["timeout", "refused"] {
                METRICS
                    .node_probe_failures
                    .with_label_values(&["st-c:8123", reason])
                    .inc();
            }
            METRICS
                .node_probe_failures
                .with_label_values(&["st-d:8123", "timeout"])
                .inc();
        });
        held.release();
        let left: Vec<String> = METRICS
            .node_probe_failures
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .flat_map(|m| {
                m.get_label()
                    .iter()
                    .filter(|p| p.name() == "node" && p.value().starts_with("st-"))
                    .map(|p| p.value().to_string())
            })
            .collect();
        assert_eq!(left, ["st-d:8123"]);
    }
}
