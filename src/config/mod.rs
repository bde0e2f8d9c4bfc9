//! Typed configuration: parsed from TOML with serde, then validated as a whole.
//!
//! Loading never stops at the first mistake: every problem is collected as a [`Problem`]
//! naming the key and the reason, so `chgate config check` can print them all at once.
//! Nothing binds or connects until [`load`] has returned a [`Validated`] config.

mod load;
pub mod publish;
pub mod remote_servers;
pub mod source;
mod validate;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use load::{check, load, parse, read};
pub use validate::{
    validate_clusters, validate_config_source, validate_picker, validate_upstream, Problem,
    Validated,
};

/// The root of a chgate config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub picker: PickerConfig,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
    /// Named quotas users refer to with `quota = "NAME"`.
    #[serde(default)]
    pub quotas: BTreeMap<String, QuotaConfig>,
    /// Where the dynamic part (clusters, users, quotas, picker, upstream) comes from when it
    /// is not in this file: a ZooKeeper root. This file is then a bootstrap file.
    pub config_source: Option<ConfigSourceConfig>,
}

/// The dynamic config in ZooKeeper (see [`zookeeper`] for the znode layout).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSourceConfig {
    /// The ensemble's members, `host:port`.
    pub zookeeper: Vec<String>,
    /// The root of this environment's config, e.g. `/chgate/prod`.
    pub root: String,
    /// Digest authentication: the user, and its password from exactly one of an
    /// environment variable or a file.
    pub digest_user: Option<String>,
    pub digest_password_env: Option<String>,
    pub digest_password_file: Option<PathBuf>,
    /// The ZooKeeper session timeout: how soon a stopped instance leaves the fleet (its
    /// members znode goes) when it could not say goodbye.
    #[serde(default = "default_zk_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// The last good config, written atomically on every apply, read at start when
    /// ZooKeeper cannot be reached. Default: the bootstrap file's path with
    /// `.cache.toml` added.
    pub cache_file: Option<PathBuf>,
    /// Pushed versions kept under `<root>/history` for `chgate config rollback`.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
}

fn default_zk_session_timeout() -> Duration {
    Duration::from_secs(6)
}

fn default_keep_versions() -> u32 {
    20
}

/// The client-facing HTTP(S) listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Plain HTTP listener (ClickHouse's HTTP interface). `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// Optional HTTPS listener.
    pub tls: Option<TlsConfig>,
    /// A read whose body is at most this many bytes is kept in memory so it can be retried
    /// on another node; larger bodies are streamed and never retried.
    pub max_replay_body_bytes: usize,
    /// An idle client connection (between requests) is closed after this long; chgate
    /// advertises it in `Keep-Alive: timeout=N` like ClickHouse does with its own
    /// `keep_alive_timeout` (10 s in its shipped config), so clients do not reuse a
    /// connection that is being closed. Whole seconds.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// How long a client may take to send its request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send the part of a request's body chgate reads
    /// before forwarding: the start that says what the statement is (before admission),
    /// and the rest of a read small enough to be kept whole (after admission, holding a
    /// query slot). Past it: HTTP 400, code 33. ClickHouse's `http_receive_timeout` (30 s).
    #[serde(with = "humantime_serde")]
    pub http_receive_timeout: Duration,
    /// On SIGTERM, how long in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Log one line per request (user, node, status, duration, bytes, query id), and one
    /// per native-protocol query.
    pub access_log: bool,
    /// Native-protocol listener (ClickHouse's `tcp_port`: clickhouse-client, drivers, BI
    /// tools). `None` (the default) disables it.
    pub native_listen: Option<SocketAddr>,
    /// Optional native protocol over TLS (ClickHouse's `tcp_port_secure`).
    pub native_tls: Option<TlsConfig>,
    /// A native connection with no query running is closed after this long (ClickHouse's
    /// `idle_connection_timeout`, 3600 s by default).
    #[serde(with = "humantime_serde")]
    pub native_idle_timeout: Duration,
    /// How long a write to a native client may wait for it to read (ClickHouse's
    /// `send_timeout`, 300 s): past it, its query is killed and the connection closed, so a
    /// client that stopped reading does not hold its query slot and node connection.
    #[serde(with = "humantime_serde")]
    pub native_send_timeout: Duration,
    /// The largest native Query packet (query text and settings) accepted, in bytes; a
    /// larger one is refused with `QUERY_IS_TOO_LARGE`. INSERT data travels in Data
    /// packets, not here.
    pub native_max_query_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8123))),
            tls: None,
            max_replay_body_bytes: 1 << 20,
            header_read_timeout: Duration::from_secs(30),
            http_receive_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            access_log: true,
            native_listen: None,
            native_tls: None,
            native_idle_timeout: Duration::from_secs(3600),
            native_send_timeout: Duration::from_secs(300),
            native_max_query_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The admin listener: metrics and health endpoints, on its own small runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// A bearer token every admin request except `/healthz` and `/readyz` must carry
    /// (`Authorization: Bearer ...`), from an environment variable or a file.
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9188))),
            token_env: None,
            token_file: None,
        }
    }
}

/// Client authentication policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Failed logins from one address allowed within `failure_window` before every further
    /// attempt from it is delayed.
    pub free_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// The first delay once `free_failures` is exceeded; it doubles per further failure.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Password hash verifications (deliberately expensive) running at once.
    pub max_concurrent_verifications: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            free_failures: 5,
            failure_window: Duration::from_secs(60),
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            max_concurrent_verifications: 2,
        }
    }
}

/// How chgate talks to ClickHouse nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle keep-alive connections older than this are not reused. Keep it below the
    /// servers' `keep_alive_timeout` (3 s by default on ClickHouse 18-22, 10 s later) so a
    /// request never races the server closing the connection.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_idle_per_node: usize,
    /// A node that refused a connection is skipped for this long, doubling per further
    /// failure up to `down_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub down_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub down_backoff_max: Duration,
    /// Nodes tried for one read before giving up.
    pub max_attempts: usize,
    /// Failovers (a request sent again to another node) allowed per cluster, as a share of
    /// its requests, so a sick cluster is not stormed with retries ...
    pub retry_budget_ratio: f64,
    /// ... plus this many per second, so a quiet cluster can still fail over.
    pub retry_budget_min_per_second: u32,
    /// When a read that has had no answer yet is sent to a second node as well (a hedge):
    /// `degraded` (the default) while a node of its cluster is down or unreachable (the
    /// case where a waiting read is most likely stuck behind it), `always`, or `off`.
    /// Hedges are retries: they draw on the retry budget.
    pub hedge: HedgeMode,
    /// How long a read waits for the first byte of its answer before it is hedged: `auto`
    /// (twice the 95th percentile of the cluster's recent first-byte times, within
    /// `hedge_after_min` and `hedge_after_max`) or a fixed duration.
    pub hedge_after: HedgeAfter,
    #[serde(with = "humantime_serde")]
    pub hedge_after_min: Duration,
    #[serde(with = "humantime_serde")]
    pub hedge_after_max: Duration,
    /// A query whose answer has not begun within this long (over every node tried) is
    /// given up: the client gets `Code: 159` (TIMEOUT_EXCEEDED), HTTP 504, and its query is
    /// killed. Unset (the default): no limit but the client's own.
    #[serde(with = "humantime_serde::option")]
    pub first_byte_timeout: Option<Duration>,
    /// While a replica is down or unreachable, and the first replica of each shard that has
    /// one down is up, reads carry ClickHouse's `load_balancing=in_order` (unless the client
    /// set it): a node fanning a Distributed query out then reads every shard from its
    /// first healthy replica in `remote_servers` order instead of a random one, so it never
    /// waits on a replica that accepts connections but does not answer (18.16 waits for it
    /// for `receive_timeout`, 300 s, even with the query's own `receive_timeout` lowered,
    /// on the connections it has pooled). chgate takes the order from its own config, or
    /// from `system.clusters` with discovery: keep them alike.
    pub avoid_down_replicas: bool,
}

/// See [`UpstreamConfig::hedge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HedgeMode {
    Off,
    Degraded,
    Always,
}

/// See [`UpstreamConfig::hedge_after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeAfter {
    Auto,
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for HedgeAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "auto" {
            return Ok(Self::Auto);
        }
        humantime_serde::re::humantime::parse_duration(&text)
            .map(Self::Fixed)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "expected \"auto\" or a duration like \"500ms\", not {text:?}: {e}"
                ))
            })
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            max_idle_per_node: 128,
            down_backoff_min: Duration::from_millis(500),
            down_backoff_max: Duration::from_secs(30),
            max_attempts: 3,
            retry_budget_ratio: 0.1,
            retry_budget_min_per_second: 10,
            hedge: HedgeMode::Degraded,
            hedge_after: HedgeAfter::Auto,
            hedge_after_min: Duration::from_millis(300),
            hedge_after_max: Duration::from_secs(5),
            first_byte_timeout: None,
            avoid_down_replicas: true,
        }
    }
}

/// The shard picker: how nodes and ZooKeeper ensembles are probed, and how the results
/// become weights.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickerConfig {
    /// Every node (and every shard group's ZooKeeper ensemble) is probed this often.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// After a failed probe the next one starts this soon after it (but not before it
    /// ended), so a node goes down within about `probe_interval + fall x probe_timeout`.
    #[serde(with = "humantime_serde")]
    pub probe_retry_interval: Duration,
    /// A probe without an answer within this long has failed.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes that take a node down.
    pub fall: u32,
    /// Consecutive good probes that bring it back.
    pub rise: u32,
    /// A node that came back ramps from 10% to its full weight over this long.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// Replicas lagging more than this take no reads.
    #[serde(with = "humantime_serde")]
    pub max_replica_delay: Duration,
    /// A node whose fullest partition has this many active parts takes no writes
    /// (ClickHouse's `parts_to_throw_insert`, 300 by default before 23.6, 3000 since).
    pub max_parts_in_partition: u64,
    /// Running queries + background tasks at which a node's weight halves.
    pub load_scale: f64,
    /// Probe round trip at which a node's weight halves.
    #[serde(with = "humantime_serde")]
    pub latency_scale: Duration,
    /// While a shard has a replica down or unreachable, reads (which may be Distributed
    /// queries the node fans out) are coordinated by the other replicas of that shard: a
    /// coordinator reads its own shard locally (`prefer_localhost_replica`), so it never
    /// sends that shard's part to the down replica. It concentrates reads on those
    /// replicas; with many shards, turn it off and rely on hedging.
    pub coordinate_from_degraded_shards: bool,
}

impl Default for PickerConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(2),
            probe_retry_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(800),
            fall: 2,
            rise: 2,
            slow_start: Duration::from_secs(30),
            max_replica_delay: Duration::from_secs(30),
            max_parts_in_partition: 300,
            load_scale: 16.0,
            latency_scale: Duration::from_millis(50),
            coordinate_from_degraded_shards: true,
        }
    }
}

/// A ClickHouse cluster: shard groups of shards of replicas, and the accounts chgate may
/// use on it. Shards are numbered from 1 in the order they appear, across groups, like
/// `shard_num` in `system.clusters`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Shorthand for one shard group without a ZooKeeper ensemble of its own.
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub shard_groups: Vec<ShardGroupConfig>,
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountConfig>,
    /// The account the picker probes with; may be left out when there is one account.
    pub probe_account: Option<String>,
    /// Refresh the replicas of each shard from a node's `system.clusters`.
    pub discovery: Option<DiscoveryConfig>,
    /// Publish this cluster to the nodes' own `remote_servers` (ZooKeeper source only).
    pub remote_servers: Option<RemoteServersConfig>,
}

impl ClusterConfig {
    /// The shard groups, the `shards` shorthand included (as group `default`).
    pub fn groups(&self) -> Vec<ShardGroupConfig> {
        let mut groups = Vec::new();
        if !self.shards.is_empty() {
            groups.push(ShardGroupConfig {
                name: Some("default".into()),
                zookeeper: Vec::new(),
                shards: self.shards.clone(),
            });
        }
        for (i, g) in self.shard_groups.iter().enumerate() {
            let mut g = g.clone();
            if g.name.is_none() {
                g.name = Some(format!("group{}", i + 1));
            }
            groups.push(g);
        }
        groups
    }
}

/// Shards that share a ZooKeeper ensemble: when the ensemble is unhealthy, they take no
/// writes into replicated tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardGroupConfig {
    /// Defaults to `groupN` (N counted from 1).
    pub name: Option<String>,
    /// The ensemble's members, `host:port` (client port).
    #[serde(default)]
    pub zookeeper: Vec<String>,
    pub shards: Vec<ShardConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub replicas: Vec<ReplicaConfig>,
    /// How much of a write load spread over shards this shard takes (like `<weight>` in
    /// `remote_servers`).
    #[serde(default = "default_shard_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub host: String,
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    #[serde(default = "default_native_port")]
    pub native_port: u16,
    /// Relative weight against the other replicas (e.g. 2 for a node twice as big).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Lower is preferred: replicas of a higher priority number only take traffic when no
    /// replica with a lower one can.
    #[serde(default)]
    pub priority: u32,
}

/// Refreshing a cluster's replicas from `system.clusters` on one of its nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// The cluster's name in the servers' `remote_servers`; defaults to this cluster's name.
    pub system_cluster: Option<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// `system.clusters` lists native ports only: discovered replicas get this HTTP port,
    /// unless the replica is also in the config.
    pub http_port: u16,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            system_cluster: None,
            interval: Duration::from_secs(60),
            http_port: 8123,
        }
    }
}

/// The cluster as its nodes see it: `chgate config push` renders it into the
/// `remote_servers` element the nodes include from ZooKeeper (`from_zk`), and the elected
/// proxy takes failed replicas out of it and puts them back (see [`crate::config::remote_servers`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteServersConfig {
    /// The cluster's name in `remote_servers` (what `Distributed(...)` names); defaults to
    /// this cluster's key.
    pub name: Option<String>,
    /// The account a node uses to reach the others (it must exist on every node).
    pub user: String,
    /// The environment variable, on the nodes, holding that account's password: published
    /// as `<password from_env="..."/>`, so no secret is stored in ZooKeeper. Unset: no
    /// password.
    pub password_from_env: Option<String>,
    /// The environment variable, on the nodes, holding the cluster's interserver `secret`
    /// (ClickHouse 20.10 and later; 18.16 refuses the element). Unset: none.
    pub secret_from_env: Option<String>,
    /// Nodes reach each other over TLS (`<secure>1</secure>`).
    pub secure: bool,
    /// Each shard's replicas replicate themselves (ReplicatedMergeTree): a Distributed
    /// insert writes one replica.
    pub internal_replication: bool,
    /// Take a failed replica out of the published cluster and put it back once healthy.
    pub remove_failed: bool,
    /// A replica failing this long (down, hung, or without its ZooKeeper session) is taken out.
    #[serde(with = "humantime_serde")]
    pub remove_after: Duration,
    /// A taken-out replica healthy this long is put back.
    #[serde(with = "humantime_serde")]
    pub restore_after: Duration,
    /// At most one replica of the cluster is taken out per this interval.
    #[serde(with = "humantime_serde")]
    pub min_removal_interval: Duration,
}

impl Default for RemoteServersConfig {
    fn default() -> Self {
        Self {
            name: None,
            user: "default".into(),
            password_from_env: None,
            secret_from_env: None,
            secure: false,
            internal_replication: true,
            remove_failed: true,
            remove_after: Duration::from_secs(10),
            restore_after: Duration::from_secs(30),
            min_removal_interval: Duration::from_secs(30),
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

fn default_shard_weight() -> u32 {
    1
}

fn default_upstream_readonly() -> u8 {
    1
}

fn default_http_port() -> u16 {
    8123
}

fn default_native_port() -> u16 {
    9000
}

/// A real cluster account. Its secret comes from an environment variable or a file, never
/// from the config text.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub user: String,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// A client-facing user, mapped to one cluster account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// A PHC-format Argon2 hash, as printed by `chgate passwd`.
    pub password_hash: String,
    pub cluster: String,
    pub account: String,
    #[serde(default)]
    pub readonly: bool,
    /// For read-only users: the `readonly` level sent to the server with POSTs. 1 (the
    /// default) also refuses queries that change settings (`SETTINGS` clauses, `SET`); 2
    /// allows them and still refuses every write.
    #[serde(default = "default_upstream_readonly")]
    pub upstream_readonly: u8,
    /// Client networks allowed to log in as this user; empty means any.
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// The `[quotas.NAME]` this user's queries are held to (each user its own counters).
    pub quota: Option<String>,
}

/// Limits on one user's queries, enforced by the gateway for every frontend. Users that
/// name the same quota each get their own counters. With several chgate instances on one
/// ZooKeeper root, the concurrency and rate limits are shared out among the live ones (see
/// the README).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Queries of the user running at once; beyond it they wait in a FIFO queue, or are
    /// refused with `TOO_MANY_SIMULTANEOUS_QUERIES` (202; HTTP 429).
    pub max_concurrent_queries: Option<u32>,
    /// Queries that may wait for a slot; 0 (the default) refuses at once.
    #[serde(default)]
    pub max_queue_size: u32,
    /// How long a query waits in the queue before it is refused.
    #[serde(default = "default_queue_wait", with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// Queries started per minute (a token bucket), refused beyond it with
    /// `QUOTA_EXCEEDED` (201; HTTP 429 with `Retry-After`).
    pub requests_per_minute: Option<u32>,
    /// Queries that may start at once after a quiet spell; defaults to
    /// `requests_per_minute` (a minute's worth).
    pub requests_burst: Option<u32>,
    /// A query still running after this long is killed on its node and ends with
    /// `TIMEOUT_EXCEEDED` (159); the limit also goes upstream as `max_execution_time`.
    #[serde(default, with = "humantime_serde::option")]
    pub max_execution_time: Option<Duration>,
    /// Response bytes (as sent on the wire) a query may return; a result that grows past
    /// it is cut and ends with `TOO_MANY_ROWS_OR_BYTES` (396), never silently.
    pub max_result_bytes: Option<u64>,
}

fn default_queue_wait() -> Duration {
    Duration::from_secs(10)
}
