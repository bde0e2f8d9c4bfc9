//! Whole-config validation: every problem is reported with its key, none is fatal alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use argon2::PasswordHash;

use super::{ClusterConfig, Config, ConfigSourceConfig, HedgeAfter, PickerConfig, UpstreamConfig};
use crate::secret::Secret;

/// One thing wrong with a config: where (a dotted key path) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A TOML parse error as one line with the position a person can go to.
    pub fn from_toml(e: &toml::de::Error, text: &str) -> Self {
        // toml's Display draws a caret diagram over several lines; keep one line with the
        // position a person can go to.
        let location = e
            .span()
            .map(|span| {
                let start = span.start.min(text.len());
                let before = text.get(..start).unwrap_or("");
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before.len() - line_start + 1;
                // The key whose value is wrong, when the error points into `key = value`
                // (serde's message names the type it wanted, not the key).
                let key = text
                    .get(line_start..start)
                    .and_then(|head| head.split_once('='))
                    .map(|(k, _)| k.trim())
                    .filter(|k| !k.is_empty() && !k.contains(['[', '"', '\'']))
                    .map(|k| format!("key {k}: "))
                    .unwrap_or_default();
                format!("line {line}, column {column}: {key}")
            })
            .unwrap_or_default();
        Self::new("", format!("{location}{}", e.message().trim_end()))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// A config that passed validation, with what validation had to load to be sure: the
/// cluster account secrets and the TLS server config.
#[derive(Clone)]
pub struct Validated {
    pub config: Config,
    /// Keyed by (cluster, account).
    pub secrets: BTreeMap<(String, String), Secret>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The native-protocol TLS listener's server config.
    pub native_tls: Option<Arc<rustls::ServerConfig>>,
    /// The admin listener's bearer token, if one is configured.
    pub admin_token: Option<Secret>,
}

impl fmt::Debug for Validated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("config", &self.config)
            .field("secrets", &self.secrets.len())
            .field("tls", &self.tls.is_some())
            .field("native_tls", &self.native_tls.is_some())
            .field("admin_token", &self.admin_token.is_some())
            .finish()
    }
}

/// Names of users, clusters and accounts appear in URLs, metric labels and upstream session
/// ids: keep them to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

pub(super) fn validate(config: Config, base: &Path) -> Result<Validated, Vec<Problem>> {
    validate_with(config, base, true)
}

/// [`validate`]; `require_users` false for a bootstrap file on its own (its users come from
/// ZooKeeper).
pub(super) fn validate_with(
    config: Config,
    base: &Path,
    require_users: bool,
) -> Result<Validated, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));

    // Listeners.
    let proxy = &config.proxy;
    if proxy.http_listen.is_none()
        && proxy.tls.is_none()
        && proxy.native_listen.is_none()
        && proxy.native_tls.is_none()
    {
        p(
            "proxy".into(),
            "no client listener: set proxy.http_listen, [proxy.tls], proxy.native_listen and/or [proxy.native_tls]".into(),
        );
    }
    // Every listener's address, by key, each once (port 0 picks a free port: no clash).
    let listeners = [
        ("proxy.http_listen", proxy.http_listen),
        ("proxy.tls.listen", proxy.tls.as_ref().map(|t| t.listen)),
        ("proxy.native_listen", proxy.native_listen),
        (
            "proxy.native_tls.listen",
            proxy.native_tls.as_ref().map(|t| t.listen),
        ),
        ("admin.listen", config.admin.listen),
    ];
    for (i, (key, addr)) in listeners.iter().enumerate() {
        let Some(addr) = addr.filter(|a| a.port() != 0) else {
            continue;
        };
        if let Some((earlier, _)) = listeners[..i].iter().find(|(_, a)| *a == Some(addr)) {
            p((*key).into(), format!("{addr} is already {earlier}"));
        }
    }
    if proxy.native_send_timeout.is_zero() {
        p(
            "proxy.native_send_timeout".into(),
            "must be greater than zero".into(),
        );
    }
    if proxy.native_idle_timeout.is_zero() {
        p(
            "proxy.native_idle_timeout".into(),
            "must be greater than zero".into(),
        );
    }
    if proxy.native_max_query_bytes < 1024 {
        p(
            "proxy.native_max_query_bytes".into(),
            "must be at least 1024".into(),
        );
    }
    if config.proxy.drain_timeout.is_zero() {
        p(
            "proxy.drain_timeout".into(),
            "must be greater than zero".into(),
        );
    }
    if config.proxy.keep_alive_timeout < Duration::from_secs(1) {
        p(
            "proxy.keep_alive_timeout".into(),
            "must be at least 1s (it is advertised in whole seconds)".into(),
        );
    }
    if config.proxy.header_read_timeout.is_zero() {
        p(
            "proxy.header_read_timeout".into(),
            "must be greater than zero".into(),
        );
    }
    if config.proxy.http_receive_timeout.is_zero() {
        p(
            "proxy.http_receive_timeout".into(),
            "must be greater than zero".into(),
        );
    }

    let tls = config.proxy.tls.as_ref().and_then(|tls| {
        crate::tls::server_config(
            &base.join(&tls.cert_file),
            &base.join(&tls.key_file),
            &[b"http/1.1"],
        )
        .map_err(|e| p("proxy.tls".into(), e.to_string()))
        .ok()
    });
    let native_tls = config.proxy.native_tls.as_ref().and_then(|tls| {
        crate::tls::server_config(&base.join(&tls.cert_file), &base.join(&tls.key_file), &[])
            .map_err(|e| p("proxy.native_tls".into(), e.to_string()))
            .ok()
    });

    let admin = &config.admin;
    let admin_token = match (&admin.token_env, &admin.token_file) {
        (None, None) => None,
        (env, file) => crate::secret::load(env.as_deref(), file.as_deref(), base)
            .map_err(|e| p("admin".into(), e.to_string().replace("password_", "token_")))
            .ok(),
    };

    // Auth policy.
    let auth = &config.auth;
    if auth.failure_window.is_zero() {
        p(
            "auth.failure_window".into(),
            "must be greater than zero".into(),
        );
    }
    if auth.base_delay > auth.max_delay {
        p(
            "auth.base_delay".into(),
            "must not exceed auth.max_delay".into(),
        );
    }
    if auth.max_concurrent_verifications == 0 {
        p(
            "auth.max_concurrent_verifications".into(),
            "must be at least 1".into(),
        );
    }

    validate_upstream(&config.upstream, &mut problems);
    validate_picker(&config.picker, &mut problems);
    if let Some(source) = &config.config_source {
        validate_config_source(source, &mut problems);
    }
    let secrets = validate_clusters(&config.clusters, base, &mut problems);
    validate_remote_servers(&config.clusters, &mut problems);
    if !require_users {
        // A bootstrap file on its own: its clusters come from ZooKeeper.
        problems.retain(|p| p.key != "clusters" || !config.clusters.is_empty());
    }
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));

    // Users.
    if config.users.is_empty() && require_users {
        p("users".into(), "at least one user is required".into());
    }
    for (name, user) in &config.users {
        let key = format!("users.{name}");
        if !valid_name(name) {
            p(
                key.clone(),
                "user names use letters, digits, '_', '-', '.', '@' (at most 64)".into(),
            );
        }
        match PasswordHash::new(&user.password_hash) {
            Ok(h) if h.algorithm.as_str().starts_with("argon2") => {}
            Ok(h) => p(
                format!("{key}.password_hash"),
                format!(
                    "algorithm {} is not accepted; use an Argon2 hash from `chgate passwd`",
                    h.algorithm
                ),
            ),
            Err(e) => p(
                format!("{key}.password_hash"),
                format!("not a PHC password hash ({e}); make one with `chgate passwd`"),
            ),
        }
        if !(1..=2).contains(&user.upstream_readonly) {
            p(
                format!("{key}.upstream_readonly"),
                format!("must be 1 or 2, not {}", user.upstream_readonly),
            );
        }
        match config.clusters.get(&user.cluster) {
            None => p(
                format!("{key}.cluster"),
                format!(
                    "unknown cluster {:?} (known: {})",
                    user.cluster,
                    join_keys(&config.clusters)
                ),
            ),
            Some(cluster) if !cluster.accounts.contains_key(&user.account) => p(
                format!("{key}.account"),
                format!(
                    "cluster {} has no account {:?} (known: {})",
                    user.cluster,
                    user.account,
                    join_keys(&cluster.accounts)
                ),
            ),
            Some(_) => {}
        }
        if let Some(q) = user
            .quota
            .as_ref()
            .filter(|q| !config.quotas.contains_key(*q))
        {
            p(
                format!("{key}.quota"),
                format!("unknown quota {q:?} (known: {})", join_keys(&config.quotas)),
            );
        }
    }
    validate_quotas(&config.quotas, &mut problems);

    if problems.is_empty() {
        Ok(Validated {
            config,
            secrets,
            tls,
            native_tls,
            admin_token,
        })
    } else {
        Err(problems)
    }
}

/// The `[quotas]` section.
fn validate_quotas(quotas: &BTreeMap<String, super::QuotaConfig>, problems: &mut Vec<Problem>) {
    let mut p = |key: String, message: &str| problems.push(Problem::new(key, message));
    for (name, q) in quotas {
        let key = format!("quotas.{name}");
        if !valid_name(name) {
            p(
                key.clone(),
                "quota names use letters, digits, '_', '-', '.', '@' (at most 64)",
            );
        }
        if q.max_concurrent_queries == Some(0) {
            p(
                format!("{key}.max_concurrent_queries"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if q.max_concurrent_queries.is_none() && q.max_queue_size > 0 {
            p(
                format!("{key}.max_queue_size"),
                "a queue needs max_concurrent_queries",
            );
        }
        if q.max_queue_size > 0 && q.max_queue_wait.is_zero() {
            p(
                format!("{key}.max_queue_wait"),
                "must be greater than zero when there is a queue",
            );
        }
        if q.requests_per_minute == Some(0) {
            p(
                format!("{key}.requests_per_minute"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        match (q.requests_per_minute, q.requests_burst) {
            (_, Some(0)) => p(format!("{key}.requests_burst"), "must be at least 1"),
            (None, Some(_)) => p(
                format!("{key}.requests_burst"),
                "a burst needs requests_per_minute",
            ),
            _ => {}
        }
        if q.max_execution_time
            .is_some_and(|t| t < Duration::from_secs(1))
        {
            p(
                format!("{key}.max_execution_time"),
                "must be at least 1s (ClickHouse takes it in whole seconds)",
            );
        }
        // A deadline is the admission instant plus the limit: absurd limits would not fit.
        if q.max_execution_time
            .is_some_and(|t| t > Duration::from_secs(366 * 86_400))
        {
            p(
                format!("{key}.max_execution_time"),
                "must be at most a year (leave it out for no limit)",
            );
        }
        if q.max_result_bytes == Some(0) {
            p(
                format!("{key}.max_result_bytes"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
}

/// The `[upstream]` section, for every app.
/// `[config_source]`: an ensemble, an absolute root of its own, and digest credentials
/// whole (a password without a user would connect unauthenticated and create every znode
/// open to anyone, while the operator believes it is protected).
pub fn validate_config_source(cs: &ConfigSourceConfig, problems: &mut Vec<Problem>) {
    let mut p = |key: &str, message: String| problems.push(Problem::new(key, message));
    if cs.zookeeper.is_empty() {
        p(
            "config_source.zookeeper",
            "names no ZooKeeper server".into(),
        );
    }
    for server in &cs.zookeeper {
        let port = server
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
            p(
                "config_source.zookeeper",
                format!("{server:?} is not host:port"),
            );
        }
    }
    let root = cs.root.trim_end_matches('/');
    if !cs.root.starts_with('/') || root.is_empty() || root.contains("//") {
        p(
            "config_source.root",
            format!(
                "{:?} is not an absolute ZooKeeper path below / (such as \"/chgate/prod\")",
                cs.root
            ),
        );
    }
    let password = cs.digest_password_env.is_some() || cs.digest_password_file.is_some();
    match (&cs.digest_user, password) {
        (None, true) => p(
            "config_source.digest_user",
            "a digest password is set without a user: set digest_user, or the instance would connect without authentication".into(),
        ),
        (Some(_), false) => p(
            "config_source.digest_user",
            "set digest_password_env or digest_password_file".into(),
        ),
        _ => {}
    }
    if cs.digest_password_env.is_some() && cs.digest_password_file.is_some() {
        p(
            "config_source.digest_password_env",
            "set one of digest_password_env and digest_password_file".into(),
        );
    }
}

pub fn validate_upstream(up: &UpstreamConfig, problems: &mut Vec<Problem>) {
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));
    // Upstream.
    for (key, value) in [
        ("upstream.connect_timeout", up.connect_timeout),
        ("upstream.down_backoff_min", up.down_backoff_min),
    ] {
        if value.is_zero() {
            p(key.into(), "must be greater than zero".into());
        }
    }
    if up.down_backoff_min > up.down_backoff_max {
        p(
            "upstream.down_backoff_min".into(),
            "must not exceed upstream.down_backoff_max".into(),
        );
    }
    if up.max_attempts == 0 {
        p("upstream.max_attempts".into(), "must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&up.retry_budget_ratio) {
        p(
            "upstream.retry_budget_ratio".into(),
            format!("must be between 0 and 1, not {}", up.retry_budget_ratio),
        );
    }
    if up.hedge_after_min.is_zero() {
        p(
            "upstream.hedge_after_min".into(),
            "must be greater than zero".into(),
        );
    }
    if up.hedge_after_min > up.hedge_after_max {
        p(
            "upstream.hedge_after_min".into(),
            "must not exceed upstream.hedge_after_max".into(),
        );
    }
    if up.hedge_after == HedgeAfter::Fixed(Duration::ZERO) {
        p(
            "upstream.hedge_after".into(),
            "must be greater than zero (use hedge = \"off\" to turn hedging off)".into(),
        );
    }
    if up.first_byte_timeout.is_some_and(|t| t.is_zero()) {
        p(
            "upstream.first_byte_timeout".into(),
            "must be greater than zero (leave it out for no limit)".into(),
        );
    }
}

/// The `[picker]` section, for every app.
pub fn validate_picker(pk: &PickerConfig, problems: &mut Vec<Problem>) {
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));
    // Picker.
    for (key, value) in [
        ("picker.probe_interval", pk.probe_interval),
        ("picker.probe_retry_interval", pk.probe_retry_interval),
        ("picker.probe_timeout", pk.probe_timeout),
        ("picker.latency_scale", pk.latency_scale),
    ] {
        if value.is_zero() {
            p(key.into(), "must be greater than zero".into());
        }
    }
    if pk.probe_timeout > pk.probe_interval {
        p(
            "picker.probe_timeout".into(),
            "must not exceed picker.probe_interval".into(),
        );
    }
    if pk.fall == 0 {
        p("picker.fall".into(), "must be at least 1".into());
    }
    if pk.rise == 0 {
        p("picker.rise".into(), "must be at least 1".into());
    }
    if pk.max_parts_in_partition == 0 {
        p(
            "picker.max_parts_in_partition".into(),
            "must be at least 1".into(),
        );
    }
    if !(pk.load_scale > 0.0 && pk.load_scale.is_finite()) {
        p(
            "picker.load_scale".into(),
            "must be a positive number".into(),
        );
    }
}

/// The `[clusters]` sections, for every app: shapes, names, accounts and their secrets
/// (loaded, and returned by (cluster, account)). `base` is where relative secret files
/// are found.
pub fn validate_clusters(
    clusters: &BTreeMap<String, ClusterConfig>,
    base: &Path,
    problems: &mut Vec<Problem>,
) -> BTreeMap<(String, String), Secret> {
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));
    // Clusters and their accounts.
    let mut secrets = BTreeMap::new();
    if clusters.is_empty() {
        p("clusters".into(), "at least one cluster is required".into());
    }
    for (name, cluster) in clusters {
        let key = format!("clusters.{name}");
        if !valid_name(name) {
            p(
                key.clone(),
                "cluster names use letters, digits, '_', '-', '.', '@' (at most 64)".into(),
            );
        }
        if cluster.shards.is_empty() && cluster.shard_groups.is_empty() {
            p(
                format!("{key}.shards"),
                "at least one shard is required (in shards or shard_groups)".into(),
            );
        }
        if !cluster.shards.is_empty() && !cluster.shard_groups.is_empty() {
            p(
                format!("{key}.shards"),
                "use shards (one group without ZooKeeper) or shard_groups, not both".into(),
            );
        }
        let mut seen = HashSet::new();
        let mut group_names = HashSet::new();
        let mut shard_number = 0;
        let sections: Vec<(String, &[crate::config::ShardConfig])> =
            if cluster.shard_groups.is_empty() {
                vec![(key.clone(), &cluster.shards)]
            } else {
                cluster
                    .shard_groups
                    .iter()
                    .enumerate()
                    .map(|(g, group)| (format!("{key}.shard_groups[{g}]"), &group.shards[..]))
                    .collect()
            };
        for (g, group) in cluster.shard_groups.iter().enumerate() {
            let gkey = format!("{key}.shard_groups[{g}]");
            let name = group
                .name
                .clone()
                .unwrap_or_else(|| format!("group{}", g + 1));
            if !valid_name(&name) {
                p(
                    format!("{gkey}.name"),
                    "group names use letters, digits, '_', '-', '.', '@' (at most 64)".into(),
                );
            }
            if !group_names.insert(name.clone()) {
                p(
                    format!("{gkey}.name"),
                    format!("group {name} appears twice"),
                );
            }
            if group.shards.is_empty() {
                p(
                    format!("{gkey}.shards"),
                    "at least one shard is required".into(),
                );
            }
            for (z, member) in group.zookeeper.iter().enumerate() {
                if !valid_host_port(member) {
                    p(
                        format!("{gkey}.zookeeper[{z}]"),
                        format!("{member:?} is not host:port"),
                    );
                }
            }
        }
        for (skey_base, shards) in sections {
            for (i, shard) in shards.iter().enumerate() {
                shard_number += 1;
                let skey = format!("{skey_base}.shards[{i}]");
                if shard.replicas.is_empty() {
                    p(
                        format!("{skey}.replicas"),
                        format!("at least one replica is required (shard {shard_number})"),
                    );
                }
                for (j, r) in shard.replicas.iter().enumerate() {
                    let rkey = format!("{skey}.replicas[{j}]");
                    if r.host.trim().is_empty() {
                        p(format!("{rkey}.host"), "must not be empty".into());
                    }
                    if r.http_port == 0 {
                        p(format!("{rkey}.http_port"), "must not be 0".into());
                    }
                    if !(r.weight > 0.0 && r.weight.is_finite()) {
                        p(format!("{rkey}.weight"), "must be a positive number".into());
                    }
                    if !seen.insert((r.host.clone(), r.http_port)) {
                        p(
                            rkey,
                            format!("{}:{} appears twice in cluster {name}", r.host, r.http_port),
                        );
                    }
                }
            }
        }
        if let Some(d) = &cluster.discovery {
            if d.interval.is_zero() {
                p(
                    format!("{key}.discovery.interval"),
                    "must be greater than zero".into(),
                );
            }
            if d.http_port == 0 {
                p(format!("{key}.discovery.http_port"), "must not be 0".into());
            }
        }
        match &cluster.probe_account {
            Some(acc) if !cluster.accounts.contains_key(acc) => p(
                format!("{key}.probe_account"),
                format!(
                    "no account {acc:?} in this cluster (known: {})",
                    join_keys(&cluster.accounts)
                ),
            ),
            None if cluster.accounts.len() > 1 => p(
                format!("{key}.probe_account"),
                format!(
                    "required with more than one account: which one probes the nodes? ({})",
                    join_keys(&cluster.accounts)
                ),
            ),
            _ => {}
        }
        if cluster.accounts.is_empty() {
            p(
                format!("{key}.accounts"),
                "at least one account is required".into(),
            );
        }
        for (acc_name, acc) in &cluster.accounts {
            let akey = format!("{key}.accounts.{acc_name}");
            if acc.user.is_empty() {
                p(format!("{akey}.user"), "must not be empty".into());
            }
            match crate::secret::load(
                acc.password_env.as_deref(),
                acc.password_file.as_deref(),
                base,
            ) {
                Ok(secret) => {
                    secrets.insert((name.clone(), acc_name.clone()), secret);
                }
                Err(e) => p(akey, e.to_string()),
            }
        }
    }

    secrets
}

/// `host:port` with a non-empty host and a port number.
fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.trim().is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

fn join_keys<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Checks the `[clusters.NAME.remote_servers]` sections (the nodes' published cluster,
/// see [`super::remote_servers`]). A file config may carry them (`chgate config check` of a
/// file meant for a push), but only a push publishes them.
pub(super) fn validate_remote_servers(
    clusters: &BTreeMap<String, ClusterConfig>,
    problems: &mut Vec<Problem>,
) {
    let mut p = |key: String, message: String| problems.push(Problem::new(key, message));
    let mut names: HashMap<&str, &str> = HashMap::new();
    for (key, cluster) in clusters {
        let Some(r) = &cluster.remote_servers else {
            continue;
        };
        let name = r.name.as_deref().unwrap_or(key);
        let k = format!("clusters.{key}.remote_servers");
        if !xml_name(name) {
            p(
                format!("{k}.name"),
                format!("{name:?} cannot be a cluster name in remote_servers (letters, digits, '_', '-', not starting with a digit or '-')"),
            );
        }
        if let Some(other) = names.insert(name, key) {
            p(
                format!("{k}.name"),
                format!("cluster {other} is published as {name} too"),
            );
        }
        if r.user.is_empty() || r.user.chars().any(|c| c.is_control()) {
            p(format!("{k}.user"), "must be a ClickHouse user name".into());
        }
        for (field, env) in [
            ("password_from_env", &r.password_from_env),
            ("secret_from_env", &r.secret_from_env),
        ] {
            if let Some(env) = env {
                if !env_name(env) {
                    p(
                        format!("{k}.{field}"),
                        format!("{env:?} is not an environment variable name"),
                    );
                }
            }
        }
        for (field, d) in [
            ("remove_after", r.remove_after),
            ("restore_after", r.restore_after),
        ] {
            if d < Duration::from_secs(1) {
                p(format!("{k}.{field}"), "must be at least 1s".into());
            }
        }
        let mut replicas = HashSet::new();
        for r in cluster
            .groups()
            .iter()
            .flat_map(|g| &g.shards)
            .flat_map(|s| &s.replicas)
        {
            if !replicas.insert((r.host.as_str(), r.native_port)) {
                p(
                    k.clone(),
                    format!(
                        "{}:{} appears twice: each replica of a published cluster needs its own host and native_port",
                        r.host, r.native_port
                    ),
                );
            }
        }
        if cluster.discovery.is_some() {
            p(
                k.clone(),
                "cannot be used with discovery: the replicas would be read back from the system.clusters this publishes (a replica taken out could never be seen healthy again)".into(),
            );
        }
    }
}

fn xml_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 64
}

fn env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_servers_mistakes_are_named() {
        let clusters: BTreeMap<String, ClusterConfig> = toml::from_str(
            r#"
            [demo]
            shards = [{ replicas = [{ host = "h" }] }]
            discovery = {}
            [demo.remote_servers]
            name = "1bad"
            password_from_env = "A-B"
            remove_after = "0s"
            [other]
            shards = [{ replicas = [{ host = "h" }] }]
            [other.remote_servers]
            name = "dup"
            [third]
            shards = [{ replicas = [{ host = "h" }] }]
            [third.remote_servers]
            name = "dup"
            "#,
        )
        .unwrap();
        let mut problems = Vec::new();
        validate_remote_servers(&clusters, &mut problems);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        for expected in [
            "clusters.demo.remote_servers.name",
            "clusters.demo.remote_servers.password_from_env",
            "clusters.demo.remote_servers.remove_after",
            "cannot be used with discovery",
            "cluster other is published as dup too",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        let fine: BTreeMap<String, ClusterConfig> = toml::from_str(
            r#"
            [demo]
            shards = [{ replicas = [{ host = "h" }] }]
            [demo.remote_servers]
            password_from_env = "INTERSERVER"
            "#,
        )
        .unwrap();
        let mut problems = Vec::new();
        validate_remote_servers(&fine, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0Q0cBJqm8bGZ0c2r0l1f0mYvSxQ2nM+4rW3W1QqkQ3E";

    fn parse(text: &str) -> Result<Validated, Vec<Problem>> {
        super::super::parse(text, Path::new("."))
    }

    fn good() -> String {
        format!(
            r#"
            [clusters.demo]
            shards = [{{ replicas = [{{ host = "127.0.0.11" }}, {{ host = "127.0.0.12" }}] }}]
            [clusters.demo.accounts.chgate]
            user = "chgate"
            password_env = "CHGATE_TEST_SECRET_VALIDATE"
            [users.bi]
            password_hash = "{HASH}"
            cluster = "demo"
            account = "chgate"
            readonly = true
            networks = ["127.0.0.0/8"]
            "#
        )
    }

    #[test]
    fn a_config_source_is_checked_whole() {
        let check = |text: &str| {
            let cs: ConfigSourceConfig = toml::from_str(text).unwrap();
            let mut problems = Vec::new();
            validate_config_source(&cs, &mut problems);
            problems
                .into_iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect::<Vec<_>>()
        };
        assert!(check("zookeeper = [\"zk-0.zk:2181\"]\nroot = \"/chgate/prod/\"").is_empty());
        let open = check(
            "zookeeper = [\"127.0.0.1:2181\"]\nroot = \"/chgate\"\ndigest_password_env = \"ZK_PW\"",
        );
        assert!(
            open[0].contains("without a user") && open.len() == 1,
            "{open:?}"
        );
        for root in ["/", "", "chgate/prod", "/a//b"] {
            let bad = check(&format!("zookeeper = [\"h:1\"]\nroot = \"{root}\""));
            assert!(bad[0].starts_with("config_source.root"), "{root}: {bad:?}");
        }
        let bad = check("zookeeper = [\"h\", \":2181\"]\nroot = \"/x\"");
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(!check("zookeeper = []\nroot = \"/x\"").is_empty());
    }

    #[test]
    fn accepts_a_good_config() {
        std::env::set_var("CHGATE_TEST_SECRET_VALIDATE", "s3cret");
        let v = parse(&good()).expect("valid");
        assert_eq!(v.config.users["bi"].networks.len(), 1);
        assert_eq!(v.secrets.len(), 1);
        // The secret never shows in Debug output.
        assert!(!format!("{v:?}").contains("s3cret"));
    }

    #[test]
    fn a_quota_execution_limit_is_at_least_a_second_and_at_most_a_year() {
        std::env::set_var("CHGATE_TEST_SECRET_VALIDATE", "s3cret");
        for (limit, ok) in [
            ("500ms", false),
            ("1s", true),
            ("30d", true),
            ("400d", false),
        ] {
            let text = format!(
                "{}\nquota = \"q\"\n[quotas.q]\nmax_execution_time = \"{limit}\"\n",
                good()
            );
            let result = parse(&text);
            assert_eq!(result.is_ok(), ok, "{limit}: {:?}", result.err());
        }
    }

    #[test]
    fn reports_every_problem_with_its_key() {
        std::env::set_var("CHGATE_TEST_SECRET_VALIDATE", "s3cret");
        let text = good()
            .replace("cluster = \"demo\"", "cluster = \"dmo\"")
            .replace(HASH, "plaintext")
            .replace("[{ host = \"127.0.0.12\" }]", "[]");
        let problems = parse(&text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"users.bi.password_hash"), "{problems:?}");
        assert!(keys.contains(&"users.bi.cluster"), "{problems:?}");
        let cluster = problems
            .iter()
            .find(|p| p.key == "users.bi.cluster")
            .unwrap();
        assert!(cluster.message.contains("known: demo"), "{cluster}");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let problems = parse("[proxy]\nhttp_listen = \"nope\"\n").unwrap_err();
        assert!(
            problems[0].message.contains("invalid socket address"),
            "{problems:?}"
        );
        let problems = parse("[proxy]\nlisten_http = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(
            problems[0].message.contains("unknown field"),
            "{problems:?}"
        );
    }

    #[test]
    fn picker_and_shard_group_problems_name_their_keys() {
        std::env::set_var("CHGATE_TEST_SECRET_VALIDATE", "s3cret");
        let text = good()
            .replace(
                "shards = [{ replicas = [{ host = \"127.0.0.11\" }, { host = \"127.0.0.12\" }] }]",
                r#"[[clusters.demo.shard_groups]]
            name = "a"
            zookeeper = ["127.0.0.1:2181", "nope"]
            shards = [{ replicas = [{ host = "127.0.0.11", weight = 0.0 }] }]
            [[clusters.demo.shard_groups]]
            name = "a"
            shards = []"#,
            )
            .replace(
                "[clusters.demo.accounts.chgate]",
                "[clusters.demo.accounts.other]\nuser = \"u\"\npassword_env = \"CHGATE_TEST_SECRET_VALIDATE\"\n[clusters.demo.accounts.chgate]",
            )
            + "\n[picker]\nprobe_timeout = \"5s\"\nfall = 0\n";
        let problems = parse(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "clusters.demo.shard_groups[0].zookeeper[1]",
            "clusters.demo.shard_groups[0].shards[0].replicas[0].weight",
            "clusters.demo.shard_groups[1].name",
            "clusters.demo.shard_groups[1].shards",
            "clusters.demo.probe_account",
            "picker.probe_timeout",
            "picker.fall",
        ] {
            assert!(keys.contains(&key), "{key} not in {problems:#?}");
        }
    }

    #[test]
    fn missing_secret_is_a_problem_not_a_panic() {
        let text = good().replace(
            "password_env = \"CHGATE_TEST_SECRET_VALIDATE\"",
            "password_env = \"CHGATE_TEST_SECRET_NOT_SET\"",
        );
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems[0].key, "clusters.demo.accounts.chgate");
        assert!(problems[0].message.contains("CHGATE_TEST_SECRET_NOT_SET"));
    }
}
