//! `chgate cdc`'s config file: the PostgreSQL source, what to capture, where the local
//! state lives, and the Kafka topics events go to. Validated whole before anything starts;
//! every problem is reported with its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::pg::tls::{PgTls, SslMode};
use crate::config::Problem;
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    pub postgres: PostgresConfig,
    pub capture: CaptureConfig,
    pub kafka: CdcKafkaConfig,
    #[serde(default)]
    pub admin: CdcAdminConfig,
    /// Active/standby through ZooKeeper (see `cdc/leader.rs`); without it, one instance.
    pub coordination: Option<CoordinationConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    /// The ensemble's members, `host:port`.
    pub zookeeper: Vec<String>,
    /// The election znode is `<root>/<slot>/leader`.
    #[serde(default = "default_coordination_root")]
    pub root: String,
    /// How long after a leader dies a standby takes over.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Each instance has a `state_dir` of its own: a standby keeps its store current by
    /// folding the topics while it waits (`cdc/follow.rs`), so taking over reads only what
    /// came since. Never with a `state_dir` the instances share.
    #[serde(default)]
    pub follow: bool,
}

fn default_coordination_root() -> String {
    "/chgate/cdc".into()
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(6)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub user: String,
    /// The password: from an environment variable or a file (never in the config).
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    pub dbname: String,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS, as libpq's `sslmode` (`disable`, `prefer`: the default, `require`,
    /// `verify-ca`, `verify-full`; see `cdc::pg::tls`).
    #[serde(default)]
    pub sslmode: SslMode,
    /// The CA certificates (PEM) the server's must lead to: needed by `verify-ca` and
    /// `verify-full`; with `require` it makes it `verify-ca`, as in libpq.
    pub sslrootcert: Option<PathBuf>,
}

fn default_pg_port() -> u16 {
    5432
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Snapshot the existing rows once (resumed after a crash), then stream.
    Initial,
    /// Stream only; existing rows are not published.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// The logical server name: Debezium's `source.name`, and the default topic prefix.
    pub name: String,
    /// The replication slot (created if missing, plugin pgoutput).
    pub slot: String,
    /// The publication (created if missing; tables added to it).
    pub publication: String,
    /// `schema.table`, or a pattern with `*` (`public.*`). Tables need a primary key.
    pub tables: Vec<String>,
    /// The key-state store and the snapshot's progress.
    pub state_dir: PathBuf,
    #[serde(default = "default_snapshot")]
    pub snapshot: SnapshotMode,
    /// Rows per snapshot chunk (one chunk is one query, resumable after a crash).
    #[serde(default = "default_chunk_rows")]
    pub snapshot_chunk_rows: u32,
    /// Tables snapshotted at once.
    #[serde(default = "default_snapshot_parallel")]
    pub snapshot_parallel: usize,
    /// A `pg_logical_emit_message` this often keeps the slot advancing while the captured
    /// tables are idle; 0 turns it off.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Protocol v2 streaming of large in-progress transactions (PostgreSQL 14+).
    #[serde(default = "yes")]
    pub streaming: bool,
    /// What a TRUNCATE publishes: `delete_rows` (a delete event, with its complete before
    /// image, for every row the key-state store holds, then the `t` event: consumers that
    /// only apply row events, ClickHouse tables among them, end up empty too) or
    /// `event_only` (just Debezium's `t` event).
    #[serde(default = "default_truncate")]
    pub truncate: TruncateMode,
    /// The key-state store's page cache (redb), in MiB: what of the store stays in memory.
    #[serde(default = "default_store_cache_mib")]
    pub store_cache_mib: usize,
    /// A transaction the server streams before its commit is kept in memory up to this
    /// many bytes, then in a file under `state_dir/spill` until it commits.
    #[serde(default = "default_spill_bytes")]
    pub spill_bytes: usize,
    /// Status updates to the server at least this often.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncateMode {
    DeleteRows,
    EventOnly,
}

fn default_truncate() -> TruncateMode {
    TruncateMode::DeleteRows
}

fn default_spill_bytes() -> usize {
    16 << 20
}

fn default_store_cache_mib() -> usize {
    64
}

fn default_snapshot() -> SnapshotMode {
    SnapshotMode::Initial
}
fn default_chunk_rows() -> u32 {
    20_000
}
fn default_snapshot_parallel() -> usize {
    2
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_status_interval() -> Duration {
    Duration::from_secs(1)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcKafkaConfig {
    pub brokers: String,
    /// Topics are `<prefix>.<schema>.<table>`; default: `capture.name`.
    pub topic_prefix: Option<String>,
    /// Wrap each key and value in Debezium's `{"schema": ..., "payload": ...}`.
    #[serde(default)]
    pub with_schema: bool,
    /// Partitions of a topic chgate creates (existing topics are left as they are).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// After a crash, each partition's tail is read from this many offsets before the end
    /// the broker reports, to find the last event it has (see `cdc/tail.rs`).
    #[serde(default = "default_tail_rewind")]
    pub tail_rewind: i64,
    /// Where the capture records that its snapshot is complete (one small record per
    /// slot): what lets a store be rebuilt from the topics (`cdc/rebuild.rs`). Default:
    /// `<prefix>.__chgate_state`.
    pub state_topic: Option<String>,
    /// Any other librdkafka producer property.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_partitions() -> i32 {
    3
}

fn default_tail_rewind() -> i64 {
    10_000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcAdminConfig {
    /// `/metrics` and `/healthz`.
    pub listen: Option<std::net::SocketAddr>,
}

/// A validated config, with the password read.
pub struct ValidatedCdc {
    pub config: CdcConfig,
    pub password: Option<Secret>,
    pub topic_prefix: String,
    /// `postgres.sslmode` and `sslrootcert`, loaded.
    pub tls: PgTls,
}

impl ValidatedCdc {
    pub fn topic(&self, schema: &str, table: &str) -> String {
        format!("{}.{schema}.{table}", self.topic_prefix)
    }

    /// The topic of the capture's state records (see `cdc/rebuild.rs`).
    pub fn state_topic(&self) -> String {
        self.config
            .kafka
            .state_topic
            .clone()
            .unwrap_or_else(|| format!("{}.__chgate_state", self.topic_prefix))
    }
}

/// Reads and validates the file; relative paths are taken from the file's directory.
pub fn load(path: &Path) -> Result<ValidatedCdc, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    })?;
    let mut config: CdcConfig =
        toml::from_str(&text).map_err(|e| vec![Problem::from_toml(&e, &text)])?;
    let base = path.parent().unwrap_or(Path::new("."));
    if config.capture.state_dir.is_relative() {
        config.capture.state_dir = base.join(&config.capture.state_dir);
    }
    validate(config, base)
}

fn identifier_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Producer properties chgate sets and a config may not change. What a restart relies on
/// is that each partition holds a gap-free prefix of the events sent to it (`cdc/tail.rs`):
/// idempotence keeps retries from doubling or reordering them; a message never times out
/// (a timed-out message is not covered by the next one, which may still land after it); and
/// any other error that could leave a gap stops the producer (librdkafka's
/// `enable.gapless.guarantee`) instead of letting later events land.
pub const FIXED_PROPERTIES: [(&str, &str); 3] = [
    ("enable.idempotence", "true"),
    ("message.timeout.ms", "0"),
    ("enable.gapless.guarantee", "true"),
];

pub fn validate(config: CdcConfig, base: &Path) -> Result<ValidatedCdc, Vec<Problem>> {
    let mut problems = Vec::new();
    let c = &config.capture;
    for (key, v) in [
        ("capture.slot", &c.slot),
        ("capture.publication", &c.publication),
    ] {
        if !identifier_ok(v) {
            problems.push(Problem::new(
                key,
                format!(
                    "{v:?} must be 1-63 lowercase letters, digits or _ (not starting with a digit)"
                ),
            ));
        }
    }
    if c.tables.is_empty() {
        problems.push(Problem::new("capture.tables", "name at least one table"));
    }
    for (i, t) in c.tables.iter().enumerate() {
        if t.split('.').count() != 2 || t.split('.').any(str::is_empty) {
            problems.push(Problem::new(
                format!("capture.tables[{i}]"),
                format!("{t:?} is not schema.table (a * matches any part of a name)"),
            ));
        }
    }
    if c.snapshot_chunk_rows == 0 {
        problems.push(Problem::new(
            "capture.snapshot_chunk_rows",
            "must be at least 1",
        ));
    }
    if c.snapshot_parallel == 0 {
        problems.push(Problem::new(
            "capture.snapshot_parallel",
            "must be at least 1",
        ));
    }
    let prefix = config
        .kafka
        .topic_prefix
        .clone()
        .unwrap_or_else(|| c.name.clone());
    let topic_names = std::iter::once(("kafka.topic_prefix", Some(&prefix)))
        .chain([("kafka.state_topic", config.kafka.state_topic.as_ref())]);
    for (key, name) in topic_names {
        let Some(name) = name else { continue };
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
        {
            problems.push(Problem::new(
                key,
                format!("{name:?}: a Kafka topic name takes letters, digits, '.', '_' and '-'"),
            ));
        }
    }
    if let Some(co) = &config.coordination {
        if co.zookeeper.is_empty() {
            problems.push(Problem::new(
                "coordination.zookeeper",
                "name at least one host:port",
            ));
        }
        if !co.root.starts_with('/') || co.root.len() < 2 {
            problems.push(Problem::new(
                "coordination.root",
                format!("{:?} is not an absolute znode path", co.root),
            ));
        }
        if co.session_timeout < Duration::from_secs(2) {
            problems.push(Problem::new(
                "coordination.session_timeout",
                "must be at least 2 s",
            ));
        }
    }
    if config.kafka.partitions < 1 {
        problems.push(Problem::new("kafka.partitions", "must be at least 1"));
    }
    if config.kafka.tail_rewind < 1 {
        problems.push(Problem::new(
            "kafka.tail_rewind",
            "must be at least 1 (a tail read from the end finds no event)",
        ));
    }
    for key in config.kafka.properties.keys() {
        if FIXED_PROPERTIES.iter().any(|(k, _)| k == key)
            || matches!(
                key.as_str(),
                "delivery.timeout.ms" | "request.required.acks" | "acks" | "transactional.id"
            )
        {
            problems.push(Problem::new(
                format!("kafka.properties.{key}"),
                "chgate sets this itself: the broker must hold a gap-free, duplicate-free prefix of every partition's events (an idempotent producer whose messages never time out and that stops at any error that could leave a gap)",
            ));
        }
    }
    let p = &config.postgres;
    let password = match (&p.password_env, &p.password_file) {
        (Some(_), Some(_)) => {
            problems.push(Problem::new(
                "postgres",
                "give password_env or password_file, not both",
            ));
            None
        }
        (None, None) => None,
        (env, file) => match crate::secret::load(env.as_deref(), file.as_deref(), base) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(Problem::new("postgres.password", e.to_string()));
                None
            }
        },
    };
    let rootcert = p.sslrootcert.as_ref().map(|f| base.join(f));
    let tls = match PgTls::new(p.sslmode, rootcert.as_deref()) {
        Ok(tls) => Some(tls),
        Err(e) => {
            problems.push(Problem::new("postgres.sslrootcert", e));
            None
        }
    };
    if let (true, Some(tls)) = (problems.is_empty(), tls) {
        Ok(ValidatedCdc {
            config,
            password,
            topic_prefix: prefix,
            tls,
        })
    } else {
        Err(problems)
    }
}

/// Whether `schema.table` matches a pattern of `capture.tables` (`*` matches any run of
/// characters within one part).
pub fn matches(pattern: &str, schema: &str, table: &str) -> bool {
    let Some((ps, pt)) = pattern.split_once('.') else {
        return false;
    };
    glob(ps, schema) && glob(pt, table)
}

fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_per_part() {
        assert!(matches("public.*", "public", "orders"));
        assert!(matches("public.ord*s", "public", "orders"));
        assert!(!matches("public.*", "private", "orders"));
        assert!(matches("*.orders", "sales", "orders"));
        assert!(!matches("public.orders", "public", "orders2"));
        assert!(matches("public.*_v*", "public", "a_v2"));
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let c: CdcConfig = toml::from_str(
            r#"
            [postgres]
            host = "h"
            user = "u"
            dbname = "d"
            [capture]
            name = "pg"
            slot = "Bad-Slot"
            publication = "ok"
            tables = ["nodot"]
            state_dir = "/tmp/x"
            snapshot_chunk_rows = 0
            [kafka]
            brokers = "b"
            topic_prefix = "a b"
            "#,
        )
        .unwrap();
        let keys: Vec<String> = validate(c, Path::new("."))
            .err()
            .unwrap()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "capture.slot",
                "capture.tables[0]",
                "capture.snapshot_chunk_rows",
                "kafka.topic_prefix"
            ]
        );
    }
}
