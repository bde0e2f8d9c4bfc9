//! Every cluster of one config generation, and the step from one generation to the next.
//!
//! [`Clusters::reconcile`] is the one way clusters come to be, for every app and every
//! reload source: it builds the clusters a config describes, taking over from the current
//! generation every backend still configured (same label: its connection pool, health and
//! passive figures, with the new `[upstream]` settings applied) and every shard group with
//! the same name and ensemble (its ZooKeeper health), and starts their probes. The
//! generation it is called on stops probing ([`Cluster::retire_probes`]): callers adopt
//! the new one at once, and whoever still holds an old cluster sees its view follow the
//! shared nodes' state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::cluster::{Carry, Cluster};
use crate::config::{ClusterConfig, PickerConfig, UpstreamConfig};
use crate::secret::Secret;

/// What a generation of clusters is built from: a validated config's sections.
#[derive(Clone, Copy)]
pub struct ClusterConfigs<'a> {
    pub clusters: &'a BTreeMap<String, ClusterConfig>,
    /// Account secrets by (cluster, account).
    pub secrets: &'a BTreeMap<(String, String), Secret>,
    pub upstream: &'a UpstreamConfig,
    pub picker: &'a PickerConfig,
}

/// The clusters of one generation, by name.
#[derive(Default)]
pub struct Clusters {
    by_name: HashMap<String, Arc<Cluster>>,
}

impl Clusters {
    /// The next generation: `configs`' clusters, reusing what this one has (see the module
    /// docs), started on the current runtime (outside one, e.g. in unit tests, they stay as
    /// configured).
    pub fn reconcile(&self, configs: &ClusterConfigs<'_>) -> Clusters {
        let mut carry = Carry::default();
        for c in self.by_name.values() {
            carry.backends.extend(c.topology().node_map());
            for g in c.groups() {
                carry
                    .groups
                    .insert((g.name.clone(), g.zookeeper.clone()), g);
            }
        }
        let by_name = configs
            .clusters
            .iter()
            .map(|(name, c)| {
                let cluster = Cluster::build(
                    name,
                    c,
                    configs.secrets,
                    configs.upstream,
                    configs.picker,
                    &carry,
                );
                cluster.start();
                (name.clone(), Arc::new(cluster))
            })
            .collect();
        for old in self.by_name.values() {
            old.retire_probes();
        }
        Clusters { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The clusters, by name in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Cluster>)> {
        self.by_name.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.by_name.values()
    }

    /// True if every cluster has a node that can take reads.
    pub fn readable(&self) -> bool {
        self.by_name.values().all(|c| c.view().readable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cluster_configs(text: &str) -> BTreeMap<String, ClusterConfig> {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_new_generation_keeps_what_is_still_configured() {
        let first = cluster_configs(
            r#"
            [c]
            shards = [{ replicas = [{ host = "h1" }, { host = "h2" }] }]
            "#,
        );
        let secrets = BTreeMap::new();
        let upstream = UpstreamConfig::default();
        let picker = PickerConfig::default();
        let one = Clusters::default().reconcile(&ClusterConfigs {
            clusters: &first,
            secrets: &secrets,
            upstream: &upstream,
            picker: &picker,
        });
        let old = one.get("c").unwrap().topology();
        let second = cluster_configs(
            r#"
            [c]
            shards = [{ replicas = [{ host = "h2" }, { host = "h3" }] }]
            [d]
            shards = [{ replicas = [{ host = "h1" }] }]
            "#,
        );
        let tighter = UpstreamConfig {
            down_backoff_min: Duration::from_secs(9),
            down_backoff_max: Duration::from_secs(9),
            ..UpstreamConfig::default()
        };
        let two = one.reconcile(&ClusterConfigs {
            clusters: &second,
            secrets: &secrets,
            upstream: &tighter,
            picker: &picker,
        });
        let c = two.get("c").unwrap().topology();
        assert!(Arc::ptr_eq(&c.nodes[0], &old.nodes[1]), "h2 carries over");
        assert!(!Arc::ptr_eq(&c.nodes[1], &old.nodes[0]));
        let d = two.get("d").unwrap().topology();
        assert!(
            Arc::ptr_eq(&d.nodes[0], &old.nodes[0]),
            "h1 carries over into another cluster"
        );
        // The reused node took the new [upstream] settings.
        let h2 = &c.nodes[0].node;
        h2.back_off(&crate::upstream::UpstreamError::ConnectTimeout);
        assert!(h2.backoff_left() > Duration::from_secs(8));
        assert_eq!(two.len(), 2);
    }
}
