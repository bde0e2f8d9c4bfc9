//! Client-facing users, resolved once per config generation with everything a query needs:
//! the password check, the policy, the cluster and the real account it maps to, and the
//! per-user traffic counters.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use prometheus::{Histogram, IntCounter};

use super::quota::{Fleet, Limiter};
use crate::auth::PasswordCheck;
use crate::config::{QuotaConfig, UserConfig};
use crate::metrics::METRICS;
use crate::picker::{Cluster, Clusters};
use crate::upstream::Account;

pub struct User {
    pub name: Arc<str>,
    pub password: PasswordCheck,
    pub readonly: bool,
    /// The `readonly` level sent upstream with read-only users' queries that the server does
    /// not already treat as read-only (1 or 2).
    pub upstream_readonly: u8,
    pub networks: Vec<IpNet>,
    pub cluster: Arc<Cluster>,
    pub account: Arc<Account>,
    pub traffic: Traffic,
    /// The user's quota counters, if it has a quota.
    pub quota: Option<Arc<Limiter>>,
}

/// A user's traffic counters, resolved once (a label lookup per query is a hash and a lock).
/// Exported as `chgate_http_*`: the HTTP interface is the only frontend so far.
pub struct Traffic {
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub duration: Histogram,
}

impl Traffic {
    pub fn of(user: &str) -> Self {
        Self {
            request_bytes: METRICS.http_request_bytes.with_label_values(&[user]),
            response_bytes: METRICS.http_response_bytes.with_label_values(&[user]),
            duration: METRICS.http_request_duration.with_label_values(&[user]),
        }
    }
}

/// Builds the users of a generation. A user whose password hash did not change keeps what
/// its check remembers (a password that verified once is checked in about a microsecond);
/// a user with a quota keeps its counters (running queries, waiters, the rate bucket), with
/// the new limits. Validation guarantees each user's cluster, account and quota exist; one
/// that does not is left out rather than guessed.
pub fn build(
    configs: &std::collections::BTreeMap<String, UserConfig>,
    quotas: &std::collections::BTreeMap<String, QuotaConfig>,
    clusters: &Clusters,
    previous: Option<&HashMap<String, Arc<User>>>,
    fleet: &Arc<Fleet>,
) -> HashMap<String, Arc<User>> {
    configs
        .iter()
        .filter_map(|(name, u)| {
            let quota = match &u.quota {
                None => None,
                Some(q) => {
                    let config = quotas.get(q)?;
                    let kept = previous
                        .and_then(|p| p.get(name))
                        .and_then(|old| old.quota.clone());
                    Some(match kept {
                        Some(limiter) => {
                            limiter.configure(config);
                            limiter
                        }
                        None => Arc::new(Limiter::new(name, config, fleet.clone())),
                    })
                }
            };
            let cluster = clusters.get(&u.cluster)?.clone();
            let account = cluster.accounts.get(&u.account)?.clone();
            let same_hash = previous
                .and_then(|p| p.get(name))
                .filter(|old| old.password.phc() == u.password_hash);
            let password = match same_hash {
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
                traffic: Traffic::of(name),
                quota,
            };
            Some((name.clone(), Arc::new(user)))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::AccountConfig;
    use crate::secret::Secret;

    /// A user on an empty cluster, for frontends' unit tests.
    pub(crate) fn test_user(name: &str, readonly: bool) -> User {
        let cluster = Arc::new(Cluster::new(
            "c",
            &crate::config::ClusterConfig {
                shards: vec![],
                shard_groups: vec![],
                accounts: Default::default(),
                probe_account: None,
                discovery: None,
                remote_servers: None,
            },
            &Default::default(),
            &Default::default(),
            &Default::default(),
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
            traffic: Traffic::of(name),
            quota: None,
        }
    }
}
