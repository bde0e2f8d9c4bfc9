use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use http::HeaderValue;

use super::Node;
use crate::config::{AccountConfig, ClusterConfig, UpstreamConfig};
use crate::secret::Secret;

/// A real cluster account, ready to authenticate requests.
pub struct Account {
    pub user: String,
    /// `Basic base64(user:password)`, marked sensitive so it is never logged by hyper.
    pub authorization: HeaderValue,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Account {
    pub fn new(config: &AccountConfig, secret: &Secret) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            config.user,
            secret.expose()
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}"))
            .expect("base64 is a valid header value");
        authorization.set_sensitive(true);
        Self {
            user: config.user.clone(),
            authorization,
        }
    }
}

pub struct Cluster {
    pub name: String,
    pub nodes: Vec<Arc<Node>>,
    pub accounts: HashMap<String, Arc<Account>>,
    next: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

impl Cluster {
    /// Builds a cluster, reusing `existing` nodes (by label) so pools and health survive a
    /// config reload.
    pub fn new(
        name: &str,
        config: &ClusterConfig,
        secrets: &std::collections::BTreeMap<(String, String), Secret>,
        upstream: &UpstreamConfig,
        existing: &HashMap<String, Arc<Node>>,
    ) -> Self {
        let mut nodes = Vec::new();
        for (shard, s) in config.shards.iter().enumerate() {
            for r in &s.replicas {
                let node = Node::new(&r.host, r.http_port, shard, upstream);
                let node = match existing.get(&node.label) {
                    Some(old) if old.shard == shard => old.clone(),
                    _ => Arc::new(node),
                };
                nodes.push(node);
            }
        }
        let accounts = config
            .accounts
            .iter()
            .filter_map(|(acc_name, acc)| {
                let secret = secrets.get(&(name.to_string(), acc_name.clone()))?;
                Some((acc_name.clone(), Arc::new(Account::new(acc, secret))))
            })
            .collect();
        Self {
            name: name.to_string(),
            nodes,
            accounts,
            next: AtomicUsize::new(0),
            hasher: Default::default(),
        }
    }

    /// The order in which to try nodes for one request: nodes that are up first, then the
    /// ones being skipped (they may have recovered, and trying beats failing outright).
    /// Without a session the start rotates so load spreads; with one, rendezvous hashing
    /// keeps the session on one node for as long as that node is up.
    pub fn candidates(&self, session: Option<&str>) -> Vec<Arc<Node>> {
        let n = self.nodes.len();
        let mut order: Vec<Arc<Node>> = match session {
            Some(id) => {
                let mut scored: Vec<(u64, &Arc<Node>)> = self
                    .nodes
                    .iter()
                    .map(|node| {
                        let mut h = self.hasher.build_hasher();
                        id.hash(&mut h);
                        node.label.hash(&mut h);
                        (h.finish(), node)
                    })
                    .collect();
                scored.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
                scored.into_iter().map(|(_, node)| node.clone()).collect()
            }
            None => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| self.nodes[(start + i) % n].clone())
                    .collect()
            }
        };
        // Stable: keeps the rotation / rendezvous order within each group.
        order.sort_by_key(|node| node.is_down());
        order
    }

    /// True if at least one node is not being skipped.
    pub fn any_up(&self) -> bool {
        self.nodes.iter().any(|n| !n.is_down())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReplicaConfig, ShardConfig};
    use crate::upstream::UpstreamError;

    fn cluster() -> Cluster {
        let replica = |host: &str| ReplicaConfig {
            host: host.into(),
            http_port: 8123,
            native_port: 9000,
        };
        let config = ClusterConfig {
            shards: vec![
                ShardConfig {
                    replicas: vec![replica("10.0.0.1"), replica("10.0.0.2")],
                },
                ShardConfig {
                    replicas: vec![replica("10.0.0.3"), replica("10.0.0.4")],
                },
            ],
            accounts: Default::default(),
        };
        Cluster::new(
            "c",
            &config,
            &Default::default(),
            &UpstreamConfig::default(),
            &HashMap::new(),
        )
    }

    #[test]
    fn rotation_spreads_and_skips_down_nodes() {
        let c = cluster();
        let firsts: Vec<_> = (0..4)
            .map(|_| c.candidates(None)[0].label.clone())
            .collect();
        let unique: std::collections::HashSet<_> = firsts.iter().collect();
        assert_eq!(unique.len(), 4, "{firsts:?}");
        c.nodes[1].mark_down(&UpstreamError::ConnectTimeout);
        for _ in 0..8 {
            let order = c.candidates(None);
            assert_eq!(order.len(), 4);
            assert_eq!(order[3].label, "10.0.0.2:8123", "a down node goes last");
        }
    }

    #[test]
    fn sessions_stick_and_move_only_when_their_node_is_down() {
        let c = cluster();
        let home = c.candidates(Some("s1"))[0].label.clone();
        for _ in 0..10 {
            assert_eq!(c.candidates(Some("s1"))[0].label, home);
        }
        let homes: std::collections::HashSet<_> = (0..64)
            .map(|i| c.candidates(Some(&format!("s{i}")))[0].label.clone())
            .collect();
        assert!(homes.len() > 1, "sessions spread over nodes");
        let node = c.nodes.iter().find(|n| n.label == home).unwrap();
        node.mark_down(&UpstreamError::ConnectTimeout);
        assert_ne!(c.candidates(Some("s1"))[0].label, home);
        node.mark_up();
        assert_eq!(c.candidates(Some("s1"))[0].label, home);
    }
}
