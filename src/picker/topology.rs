//! A cluster's shape: shard groups (each with its own ZooKeeper ensemble, or none), shards
//! numbered from 1 like `system.clusters.shard_num`, and replicas. Built from the config,
//! and optionally rebuilt from a node's `system.clusters`; immutable once built.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::backend::Backend;
use super::figures::ClusterRow;
use super::state::Group;
use crate::config::{ClusterConfig, ReplicaConfig, UpstreamConfig};
use crate::upstream::{self, Node};

/// A replica's place in the topology. Index-aligned with [`Topology::nodes`].
#[derive(Debug, Clone)]
pub struct Replica {
    /// Index into [`Topology::shards`].
    pub shard: usize,
    /// 1-based within its shard.
    pub replica_num: u32,
    pub weight: f64,
    pub priority: u32,
}

#[derive(Debug, Clone)]
pub struct Shard {
    /// 1-based, as in `system.clusters`.
    pub number: u32,
    /// Index into [`Topology::groups`]; `None` for a discovered shard the config does not
    /// place in a group.
    pub group: Option<usize>,
    pub weight: u32,
    /// Indices into [`Topology::nodes`].
    pub nodes: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Config,
    SystemClusters { seed: String, at: SystemTime },
}

pub struct Topology {
    pub nodes: Vec<Arc<Backend>>,
    pub replicas: Vec<Replica>,
    pub shards: Vec<Shard>,
    pub groups: Vec<Arc<Group>>,
    pub source: Source,
}

impl Topology {
    /// The configured topology. Backends already known (by label) are reused, so their
    /// connection pools and health carry over, with `upstream`'s settings applied.
    pub fn from_config(
        config: &ClusterConfig,
        groups: &[Arc<Group>],
        upstream: &UpstreamConfig,
        existing: &HashMap<String, Arc<Backend>>,
    ) -> Self {
        let mut b = Builder::new(groups, upstream, existing);
        for (g, group) in config.groups().iter().enumerate() {
            for shard in &group.shards {
                b.shard(Some(g), shard.weight, shard.replicas.iter().cloned());
            }
        }
        b.finish(Source::Config)
    }

    /// The topology `system.clusters` describes, with what the config knows layered on:
    /// shard N stays in the group the config places shard N in, and a replica the config
    /// lists (same host and native port) keeps its HTTP port, weight and priority.
    /// Returns `None` when the rows describe no shard.
    pub fn from_rows(
        rows: &[ClusterRow],
        config: &ClusterConfig,
        http_port: u16,
        groups: &[Arc<Group>],
        upstream: &UpstreamConfig,
        existing: &HashMap<String, Arc<Backend>>,
        seed: String,
    ) -> Option<Self> {
        let configured: Vec<(usize, Vec<ReplicaConfig>)> = config
            .groups()
            .iter()
            .enumerate()
            .flat_map(|(g, group)| group.shards.iter().map(move |s| (g, s.replicas.clone())))
            .collect();
        let known = |host: &str, native: u16| {
            configured
                .iter()
                .flat_map(|(_, rs)| rs.iter())
                .find(|r| r.host == host && r.native_port == native)
                .cloned()
        };
        let mut b = Builder::new(groups, upstream, existing);
        let mut numbers: Vec<u32> = rows.iter().map(|r| r.shard_num).collect();
        numbers.dedup();
        for number in numbers {
            let shard_rows: Vec<&ClusterRow> =
                rows.iter().filter(|r| r.shard_num == number).collect();
            let group = configured
                .get(number.saturating_sub(1) as usize)
                .map(|(g, _)| *g);
            let replicas = shard_rows.iter().map(|r| {
                known(&r.host_name, r.port).unwrap_or(ReplicaConfig {
                    host: r.host_name.clone(),
                    http_port,
                    native_port: r.port,
                    weight: 1.0,
                    priority: 0,
                })
            });
            b.shard_numbered(number, group, shard_rows[0].shard_weight, replicas);
        }
        if b.shards.is_empty() {
            return None;
        }
        Some(b.finish(Source::SystemClusters {
            seed,
            at: SystemTime::now(),
        }))
    }

    /// True if both describe the same nodes in the same places (where they came from and
    /// when aside).
    pub fn same_shape(&self, other: &Topology) -> bool {
        self.nodes.len() == other.nodes.len()
            && self
                .nodes
                .iter()
                .zip(&other.nodes)
                .all(|(a, b)| a.label() == b.label() && a.node.native_port == b.node.native_port)
            && self.replicas.iter().zip(&other.replicas).all(|(a, b)| {
                a.shard == b.shard && a.weight == b.weight && a.priority == b.priority
            })
            && self.shards.len() == other.shards.len()
            && self
                .shards
                .iter()
                .zip(&other.shards)
                .all(|(a, b)| a.number == b.number && a.group == b.group && a.weight == b.weight)
    }

    /// Backends by label, to carry over into the next topology.
    pub fn node_map(&self) -> HashMap<String, Arc<Backend>> {
        self.nodes
            .iter()
            .map(|n| (n.label().to_string(), n.clone()))
            .collect()
    }

    /// The shard index for a 1-based shard number.
    pub fn shard_index(&self, number: u32) -> Option<usize> {
        self.shards.iter().position(|s| s.number == number)
    }
}

struct Builder<'a> {
    groups: &'a [Arc<Group>],
    upstream: &'a UpstreamConfig,
    existing: &'a HashMap<String, Arc<Backend>>,
    nodes: Vec<Arc<Backend>>,
    replicas: Vec<Replica>,
    shards: Vec<Shard>,
}

impl<'a> Builder<'a> {
    fn new(
        groups: &'a [Arc<Group>],
        upstream: &'a UpstreamConfig,
        existing: &'a HashMap<String, Arc<Backend>>,
    ) -> Self {
        Self {
            groups,
            upstream,
            existing,
            nodes: Vec::new(),
            replicas: Vec::new(),
            shards: Vec::new(),
        }
    }

    fn shard(
        &mut self,
        group: Option<usize>,
        weight: u32,
        replicas: impl Iterator<Item = ReplicaConfig>,
    ) {
        let number = self.shards.len() as u32 + 1;
        self.shard_numbered(number, group, weight, replicas);
    }

    fn shard_numbered(
        &mut self,
        number: u32,
        group: Option<usize>,
        weight: u32,
        replicas: impl Iterator<Item = ReplicaConfig>,
    ) {
        let shard = self.shards.len();
        let mut members = Vec::new();
        for (i, r) in replicas.enumerate() {
            let label = upstream::label(&r.host, r.http_port);
            let node = match self.existing.get(&label) {
                Some(old) if old.node.native_port == r.native_port => {
                    old.node.apply(self.upstream);
                    old.clone()
                }
                _ => Arc::new(Backend::new(Node::new(
                    &r.host,
                    r.http_port,
                    r.native_port,
                    self.upstream,
                ))),
            };
            members.push(self.nodes.len());
            self.nodes.push(node);
            self.replicas.push(Replica {
                shard,
                replica_num: i as u32 + 1,
                weight: r.weight,
                priority: r.priority,
            });
        }
        self.shards.push(Shard {
            number,
            group: group.filter(|&g| g < self.groups.len()),
            weight,
            nodes: members,
        });
    }

    fn finish(self, source: Source) -> Topology {
        Topology {
            nodes: self.nodes,
            replicas: self.replicas,
            shards: self.shards,
            groups: self.groups.to_vec(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        toml::from_str(
            r#"
            [[shard_groups]]
            name = "a"
            zookeeper = ["127.0.0.1:2181"]
            shards = [{ replicas = [{ host = "h1", http_port = 8124, weight = 2.0 }] }]
            [[shard_groups]]
            zookeeper = ["127.0.0.1:2182"]
            shards = [{ replicas = [{ host = "h3" }, { host = "h4", priority = 1 }] }]
            "#,
        )
        .unwrap()
    }

    fn groups(c: &ClusterConfig) -> Vec<Arc<Group>> {
        c.groups()
            .into_iter()
            .map(|g| Arc::new(Group::new(g.name.unwrap(), g.zookeeper)))
            .collect()
    }

    #[test]
    fn numbers_shards_across_groups() {
        let c = config();
        let g = groups(&c);
        assert_eq!(g[1].name, "group2");
        let t = Topology::from_config(&c, &g, &Default::default(), &HashMap::new());
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(
            t.shards.iter().map(|s| s.number).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(t.shards[1].group, Some(1));
        assert_eq!(t.shards[1].nodes, [1, 2]);
        assert_eq!(t.replicas[2].replica_num, 2);
        assert_eq!(t.replicas[2].priority, 1);
        assert_eq!(t.nodes[0].label(), "h1:8124");
        assert_eq!(t.shard_index(2), Some(1));
    }

    #[test]
    fn discovered_replicas_keep_what_the_config_says_about_them() {
        let c = config();
        let g = groups(&c);
        let current = Topology::from_config(&c, &g, &Default::default(), &HashMap::new());
        let row = |shard, replica, host: &str| ClusterRow {
            shard_num: shard,
            shard_weight: 1,
            replica_num: replica,
            host_name: host.into(),
            port: 9000,
        };
        let rows = [
            row(1, 1, "h1"),
            row(1, 2, "h2"),
            row(2, 1, "h3"),
            row(2, 2, "h4"),
            row(3, 1, "h5"),
        ];
        let t = Topology::from_rows(
            &rows,
            &c,
            8123,
            &g,
            &Default::default(),
            &current.node_map(),
            "h1:8124".into(),
        )
        .unwrap();
        let labels: Vec<_> = t.nodes.iter().map(|n| n.label()).collect();
        assert_eq!(
            labels,
            ["h1:8124", "h2:8123", "h3:8123", "h4:8123", "h5:8123"]
        );
        assert!(
            Arc::ptr_eq(&t.nodes[0], &current.nodes[0]),
            "known nodes are reused"
        );
        assert_eq!(t.replicas[0].weight, 2.0);
        assert_eq!(t.replicas[3].priority, 1);
        assert_eq!(t.shards[0].group, Some(0));
        assert_eq!(t.shards[1].group, Some(1));
        assert_eq!(t.shards[2].group, None, "shard 3 is in no configured group");
        assert!(!t.same_shape(&current));
        let again = Topology::from_rows(
            &rows,
            &c,
            8123,
            &g,
            &Default::default(),
            &t.node_map(),
            "x".into(),
        )
        .unwrap();
        assert!(again.same_shape(&t));
        assert!(Topology::from_rows(
            &[],
            &c,
            8123,
            &g,
            &Default::default(),
            &HashMap::new(),
            "x".into()
        )
        .is_none());
    }
}
