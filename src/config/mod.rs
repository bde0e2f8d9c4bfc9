//! Typed configuration: parsed from TOML with serde, then validated as a whole.
//!
//! Loading never stops at the first mistake: every problem is collected as a [`Problem`]
//! naming the key and the reason, so `chgate config check` can print them all at once.
//! Nothing binds or connects until [`load`] has returned a [`Validated`] config.

mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use validate::{Problem, Validated};

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
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
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
    /// How long a client may take to send its request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// On SIGTERM, how long in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Log one line per request (user, node, status, duration, bytes, query id).
    pub access_log: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8123))),
            tls: None,
            max_replay_body_bytes: 1 << 20,
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            access_log: true,
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9188))),
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
        }
    }
}

/// A ClickHouse cluster: shards of replicas, and the accounts chgate may use on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub replicas: Vec<ReplicaConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub host: String,
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    #[serde(default = "default_native_port")]
    pub native_port: u16,
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
#[derive(Debug, Clone, Deserialize)]
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
}

/// Reads, parses and validates the config at `path`; relative paths inside it are resolved
/// against the file's directory.
pub fn load(path: &Path) -> Result<Validated, Vec<Problem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![Problem::new("", format!("cannot read the file: {e}"))])?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    parse(&text, base)
}

/// Parses and validates config text; `base` is the directory relative paths are taken from.
pub fn parse(text: &str, base: &Path) -> Result<Validated, Vec<Problem>> {
    let config: Config = toml::from_str(text).map_err(|e| vec![Problem::from_toml(&e, text)])?;
    validate::validate(config, base)
}
