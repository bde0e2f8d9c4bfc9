//! The proxy's shared state. Users and clusters live in a [`Runtime`] behind an `ArcSwap`:
//! a reload builds a whole new one from a validated config and swaps it in, so a request
//! sees either the old config or the new one, never a mix, and never waits on a lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use prometheus::{Histogram, IntCounter};

use crate::auth::{PasswordCheck, Throttle, Verifier};
use crate::config::Validated;
use crate::metrics::METRICS;
use crate::picker::state::Group;
use crate::picker::Cluster;
use crate::secret::Secret;
use crate::upstream::{Account, Node};

/// A client-facing user with everything a request needs, resolved once per config.
pub struct User {
    pub name: Arc<str>,
    pub password: PasswordCheck,
    pub readonly: bool,
    /// The `readonly` level sent upstream with read-only users' POSTs (1 or 2).
    pub upstream_readonly: u8,
    pub networks: Vec<IpNet>,
    pub cluster: Arc<Cluster>,
    pub account: Arc<Account>,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub duration: Histogram,
}

/// Users and clusters of one config generation.
pub struct Runtime {
    pub users: HashMap<String, Arc<User>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub admin_token: Option<Secret>,
}

impl Runtime {
    /// Builds from a validated config, reusing nodes of `previous` (their connection pools
    /// and health) where the same node is still configured.
    pub fn build(v: &Validated, previous: Option<&Runtime>) -> Self {
        let mut existing: HashMap<String, Arc<Node>> = HashMap::new();
        let mut groups: HashMap<(String, Vec<String>), Arc<Group>> = HashMap::new();
        for c in previous.iter().flat_map(|p| p.clusters.values()) {
            existing.extend(c.topology().node_map());
            for g in c.groups() {
                groups.insert((g.name.clone(), g.zookeeper.clone()), g);
            }
        }
        let clusters: HashMap<String, Arc<Cluster>> = v
            .config
            .clusters
            .iter()
            .map(|(name, c)| {
                let cluster = Cluster::new(
                    name,
                    c,
                    &v.secrets,
                    &v.config.upstream,
                    &v.config.picker,
                    &existing,
                    &groups,
                );
                cluster.start();
                (name.clone(), Arc::new(cluster))
            })
            .collect();
        let users = v
            .config
            .users
            .iter()
            .filter_map(|(name, u)| {
                // Validation guarantees both exist.
                let cluster = clusters.get(&u.cluster)?.clone();
                let account = cluster.accounts.get(&u.account)?.clone();
                let same_hash = previous
                    .and_then(|p| p.users.get(name))
                    .filter(|old| old.password.phc() == u.password_hash);
                let password = match same_hash {
                    // Keep the remembered verification when the hash did not change.
                    Some(old) => old.password.clone_for_reload(),
                    None => PasswordCheck::new(&u.password_hash),
                };
                let user = User {
                    name: name.as_str().into(),
                    password,
                    readonly: u.readonly,
                    upstream_readonly: u.upstream_readonly,
                    networks: u.networks.clone(),
                    cluster,
                    account,
                    request_bytes: METRICS.http_request_bytes.with_label_values(&[name]),
                    response_bytes: METRICS.http_response_bytes.with_label_values(&[name]),
                    duration: METRICS.http_request_duration.with_label_values(&[name]),
                };
                Some((name.clone(), Arc::new(user)))
            })
            .collect();
        Self {
            users,
            clusters,
            admin_token: v.admin_token.clone(),
        }
    }
}

/// Settings a request reads, fixed for the life of the process (listener-level config).
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_replay_body_bytes: usize,
    pub max_attempts: usize,
    pub access_log: bool,
}

pub struct Proxy {
    pub state: ArcSwap<Runtime>,
    pub verifier: Verifier,
    pub throttle: Throttle,
    pub settings: Settings,
    draining: AtomicBool,
}

impl Proxy {
    pub fn new(v: &Validated) -> Self {
        let c = &v.config;
        Self {
            state: ArcSwap::from_pointee(Runtime::build(v, None)),
            verifier: Verifier::new(c.auth.max_concurrent_verifications),
            throttle: Throttle::new(&c.auth),
            settings: Settings {
                max_replay_body_bytes: c.proxy.max_replay_body_bytes,
                max_attempts: c.upstream.max_attempts,
                access_log: c.proxy.access_log,
            },
            draining: AtomicBool::new(false),
        }
    }

    /// Swaps in users and clusters from a newly validated config.
    pub fn reload(&self, v: &Validated) {
        let next = Runtime::build(v, Some(&self.state.load()));
        self.state.store(Arc::new(next));
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready to serve: not draining, and every cluster has a node that can take reads.
    pub fn ready(&self) -> bool {
        !self.draining()
            && self
                .state
                .load()
                .clusters
                .values()
                .all(|c| c.view().readable())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::AccountConfig;
    use crate::secret::Secret;

    pub(crate) fn test_user(name: &str, readonly: bool) -> User {
        let cluster = Arc::new(Cluster::new(
            "c",
            &crate::config::ClusterConfig {
                shards: vec![],
                shard_groups: vec![],
                accounts: Default::default(),
                probe_account: None,
                discovery: None,
            },
            &Default::default(),
            &Default::default(),
            &Default::default(),
            &HashMap::new(),
            &HashMap::new(),
        ));
        let account = Arc::new(Account::new(
            &AccountConfig {
                user: "chgate".into(),
                password_env: None,
                password_file: None,
            },
            &Secret::new("pw".into()),
        ));
        User {
            name: name.into(),
            password: PasswordCheck::new("x"),
            readonly,
            upstream_readonly: 1,
            networks: vec![],
            cluster,
            account,
            request_bytes: METRICS.http_request_bytes.with_label_values(&[name]),
            response_bytes: METRICS.http_response_bytes.with_label_values(&[name]),
            duration: METRICS.http_request_duration.with_label_values(&[name]),
        }
    }
}
