//! `chgate ingest`'s config: the Kafka consumer, where picks come from, the clusters
//! (the same sections as the proxy's, for the embedded picker and the insert account),
//! format templates and tasks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::template::{FormatKind, TemplateConfig};
use crate::config::{
    validate_clusters, validate_picker, validate_upstream, ClusterConfig, ConfigSourceConfig,
    PickerConfig, Problem, UpstreamConfig,
};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub kafka: KafkaConfig,
    /// The proxy's pick API. Without it (or when it cannot be reached) the sidecar's own
    /// copy of the picker, probing the cluster itself, chooses.
    #[serde(default)]
    pub pick_api: Option<PickApiConfig>,
    /// Where batch intents live (exactly-once across crashes). Without it, a crash can
    /// write a batch twice.
    #[serde(default)]
    pub coordination: Option<CoordinationConfig>,
    #[serde(default)]
    pub admin: IngestAdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub picker: PickerConfig,
    /// The clusters; with `[config_source]`, read from its ZooKeeper root at start instead
    /// (with `[upstream]` and `[picker]` if the root has them).
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// The proxies' ZooKeeper config root, to take the clusters from (the same root, so
    /// one push changes both).
    pub config_source: Option<ConfigSourceConfig>,
    pub templates: BTreeMap<String, TemplateConfig>,
    pub tasks: BTreeMap<String, TaskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    /// Static group membership (`group.instance.id`): a restarted sidecar gets its
    /// partitions back without a rebalance. Default: `chgate-ingest-<hostname>`; give each
    /// sidecar on one host its own.
    pub instance_id: Option<String>,
    /// `false`: no `group.instance.id` (dynamic membership; a restart rebalances).
    #[serde(default = "yes")]
    pub static_membership: bool,
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// For brokers that answer a fetch from the middle of a record batch with the next
    /// batch (the test broker, tansu 0.6): a partition is started this many offsets before
    /// its recorded position, a resume after a pause seeks this far back, and a gap in the
    /// offsets is read again from this far back once (what was taken already is dropped).
    /// Must exceed a producer batch (10000 is safe for kcat's defaults). 0 for Kafka, where
    /// gaps (transaction markers, compaction) are normal.
    #[serde(default)]
    pub start_rewind: i64,
    /// Any other librdkafka consumer/producer property.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    /// The ensemble's members, `host:port`.
    pub zookeeper: Vec<String>,
    #[serde(default = "default_root")]
    pub root: String,
}

fn default_root() -> String {
    "/chgate/ingest".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PickApiConfig {
    /// The proxy's admin listener, e.g. `http://127.0.0.1:9188`.
    pub url: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_pick_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_pick_timeout() -> Duration {
    Duration::from_millis(500)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestAdminConfig {
    /// `/metrics`, `/healthz`. `None` disables it.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for IngestAdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9189))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Parser worker threads; each drains its own ring.
    pub workers: usize,
    /// Messages each ring holds.
    pub ring_capacity: usize,
    /// Bytes of messages and encoded batches held at once; past it the consumer pauses.
    pub max_pending_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            ring_capacity: 65_536,
            max_pending_bytes: 128 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// The picker chooses the shard per batch, by health.
    Random,
    /// A hash of the `key` column (for `debezium` templates, of the message key) chooses
    /// the shard: one key, one shard.
    Key,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub topic: String,
    pub template: String,
    pub cluster: String,
    /// The cluster account inserts run as.
    pub account: String,
    /// The local (replicated) table on each node: `database.table`.
    pub table: String,
    /// Default `random`; for a `debezium` template `key`, the only one it takes.
    /// [`validate`] fills it in.
    #[serde(default)]
    pub sharding: Option<Sharding>,
    /// The column whose value chooses the shard with `sharding = "key"` (not for
    /// `debezium` templates: the message key does).
    pub key: Option<String>,
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub batch_age: Duration,
    /// Where messages that cannot become rows go, with headers saying why.
    pub dead_letter_topic: String,
    pub time_window: Option<TimeWindowConfig>,
    /// Debezium: the `schema.table` whose events this task applies. An event of another
    /// table (a topic carrying several, or a task pointed at the wrong topic) is
    /// dead-lettered with reason `table` instead of being written here. Unset: not checked.
    #[serde(default)]
    pub source_table: Option<String>,
    /// Debezium with `new_columns = "add"`: more tables that get each new column, on every
    /// node of the cluster (the Distributed table over `table`, say), after `table` has it.
    #[serde(default)]
    pub alter_also: Vec<String>,
}

fn default_batch_rows() -> usize {
    100_000
}
/// A batch goes as one compressed block (`compress`); this leaves room for the rows of
/// the message that crossed the line.
const MAX_BATCH_BYTES: usize = 256 << 20;

fn default_batch_bytes() -> usize {
    16 << 20
}
fn default_batch_age() -> Duration {
    Duration::from_secs(1)
}

impl TaskConfig {
    /// The task's sharding (as [`validate`] resolved it).
    pub fn sharding(&self) -> Sharding {
        self.sharding.unwrap_or(Sharding::Random)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowConfig {
    /// A DateTime column of the template.
    pub column: String,
    /// Rows older than this (against the batch's clock) are dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Rows further in the future than this are dead-lettered.
    #[serde(default, with = "humantime_serde")]
    pub max_future: Duration,
}

/// A checked config with its secrets (redacted in `Debug`).
#[derive(Debug)]
pub struct ValidatedIngest {
    pub config: IngestConfig,
    pub secrets: BTreeMap<(String, String), Secret>,
    pub pick_token: Option<Secret>,
}

/// Reads and validates; every problem is reported with its key. (Templates are checked
/// against the tables' real columns at start, when ClickHouse can be asked.)
pub fn load(path: &Path) -> Result<ValidatedIngest, Vec<Problem>> {
    let (config, base) = read(path)?;
    validate(config, &base)
}

/// Checks a file as `chgate config check` does, returning it as read. With
/// `[config_source]` the clusters come from ZooKeeper at start, so the tasks' cluster and
/// account names are checked then; the rest of the file is checked here, offline.
pub fn check(path: &Path) -> Result<IngestConfig, Vec<Problem>> {
    let (config, base) = read(path)?;
    let file = config.clone();
    if config.config_source.is_none() {
        return validate(config, &base).map(|_| file);
    }
    if !config.clusters.is_empty() {
        return Err(vec![Problem::new(
            "clusters",
            "with [config_source] the clusters come from ZooKeeper; leave them out here",
        )]);
    }
    let named_in_zookeeper = |p: &Problem| {
        p.key == "clusters"
            || (p.key.starts_with("tasks.")
                && (p.key.ends_with(".cluster") || p.key.ends_with(".account")))
    };
    match validate(config, &base) {
        Ok(_) => Ok(file),
        Err(problems) => {
            let rest: Vec<Problem> = problems
                .into_iter()
                .filter(|p| !named_in_zookeeper(p))
                .collect();
            if rest.is_empty() {
                Ok(file)
            } else {
                Err(rest)
            }
        }
    }
}

/// The sidecar's own file and where its clusters come from, for following them.
#[derive(Debug)]
pub struct FromZooKeeper {
    /// The file as read (no clusters: they come from the root).
    pub file: IngestConfig,
    pub base: PathBuf,
    pub source: crate::config::ConfigSourceConfig,
    /// The znodes the start read.
    pub nodes: crate::config::zookeeper::Nodes,
    /// The root's version then.
    pub version: u64,
}

/// [`load`], with the clusters (and `[upstream]`, `[picker]`, if there) taken from the
/// `[config_source]` ZooKeeper root when the file names one; then what following the root
/// needs (see [`super::follow`]).
pub async fn load_with_source(
    path: &Path,
) -> Result<(ValidatedIngest, Option<FromZooKeeper>), Vec<Problem>> {
    let (mut config, base) = read(path)?;
    let Some(source) = config.config_source.clone() else {
        return Ok((validate(config, &base)?, None));
    };
    if !config.clusters.is_empty() {
        return Err(vec![Problem::new(
            "clusters",
            "with [config_source] the clusters come from ZooKeeper; leave them out here",
        )]);
    }
    let file = config.clone();
    let timeout = Duration::from_secs(10);
    let (snapshot, root) = crate::config::zookeeper::fetch(&source, &base, timeout).await?;
    let dynamic = crate::config::zookeeper::parse_nodes(&snapshot.nodes, &root)?;
    config.clusters = dynamic.clusters;
    if let Some(u) = dynamic.upstream {
        config.upstream = u;
    }
    if let Some(p) = dynamic.picker {
        config.picker = p;
    }
    tracing::info!(
        root,
        version = snapshot.version,
        clusters = config.clusters.len(),
        "Clusters read from ZooKeeper (and followed)"
    );
    let validated = validate(config, &base)?;
    Ok((
        validated,
        Some(FromZooKeeper {
            file,
            base,
            source,
            nodes: snapshot.nodes,
            version: snapshot.version,
        }),
    ))
}

fn read(path: &Path) -> Result<(IngestConfig, PathBuf), Vec<Problem>> {
    crate::config::read(path)
}

pub(super) fn validate(
    mut config: IngestConfig,
    base: &Path,
) -> Result<ValidatedIngest, Vec<Problem>> {
    let mut problems = Vec::new();
    for (name, t) in &config.templates {
        for (key, why) in t.problems() {
            problems.push(Problem::new(format!("templates.{name}.{key}"), why));
        }
    }
    for t in config.tasks.values_mut() {
        if t.sharding.is_none() && debezium(&config.templates, t) {
            t.sharding = Some(Sharding::Key);
        }
    }
    // The same checks as the proxy's: a sidecar's embedded picker is a picker like its.
    if let Some(source) = &config.config_source {
        crate::config::validate_config_source(source, &mut problems);
    }
    validate_upstream(&config.upstream, &mut problems);
    validate_picker(&config.picker, &mut problems);
    let secrets = validate_clusters(&config.clusters, base, &mut problems);
    let mut p = |k: String, m: String| problems.push(Problem::new(k, m));
    let pick_token = match &config.pick_api {
        Some(api) if api.token_env.is_some() || api.token_file.is_some() => {
            crate::secret::load(api.token_env.as_deref(), api.token_file.as_deref(), base)
                .map_err(|e| {
                    p(
                        "pick_api".into(),
                        e.to_string().replace("password_", "token_"),
                    )
                })
                .ok()
        }
        _ => None,
    };
    if let Some(api) = &config.pick_api {
        if !api.url.starts_with("http://") {
            p(
                "pick_api.url".into(),
                format!("{:?} must start with http://", api.url),
            );
        }
    }
    if let Some(c) = &config.coordination {
        if c.zookeeper.is_empty() {
            p(
                "coordination.zookeeper".into(),
                "at least one member is required".into(),
            );
        }
        if !c.root.starts_with('/') || c.root.len() < 2 {
            p(
                "coordination.root".into(),
                format!("{:?} must be an absolute path like /chgate/ingest", c.root),
            );
        }
    }
    if config.limits.workers == 0 {
        p("limits.workers".into(), "must be at least 1".into());
    }
    if config.limits.ring_capacity < 16 {
        p("limits.ring_capacity".into(), "must be at least 16".into());
    }
    if config.tasks.is_empty() {
        p("tasks".into(), "at least one task is required".into());
    }
    let mut topics = std::collections::HashSet::new();
    for (name, t) in &config.tasks {
        let key = format!("tasks.{name}");
        if !topics.insert(t.topic.clone()) {
            p(
                format!("{key}.topic"),
                format!("topic {} is already consumed by another task", t.topic),
            );
        }
        if !config.templates.contains_key(&t.template) {
            p(
                format!("{key}.template"),
                format!("no template {:?}", t.template),
            );
        }
        match config.clusters.get(&t.cluster) {
            None => p(
                format!("{key}.cluster"),
                format!("no cluster {:?}", t.cluster),
            ),
            Some(c) if !c.accounts.contains_key(&t.account) => p(
                format!("{key}.account"),
                format!("cluster {} has no account {:?}", t.cluster, t.account),
            ),
            Some(_) => {}
        }
        if t.table.split('.').count() != 2 {
            p(
                format!("{key}.table"),
                format!("{:?} must be database.table", t.table),
            );
        }
        if debezium(&config.templates, t) {
            debezium_task(&key, t, &mut p);
        } else if t.source_table.is_some() || !t.alter_also.is_empty() {
            let option = if t.source_table.is_some() {
                "source_table"
            } else {
                "alter_also"
            };
            p(
                format!("{key}.{option}"),
                "only tasks with a debezium template take it".into(),
            );
        } else if t.sharding() == Sharding::Key && t.key.is_none() {
            p(
                format!("{key}.key"),
                "sharding = \"key\" needs the key column".into(),
            );
        }
        if t.batch_rows == 0 || t.batch_bytes == 0 || t.batch_age.is_zero() {
            p(
                key.clone(),
                "batch_rows, batch_bytes and batch_age must be above zero".into(),
            );
        }
        if t.batch_bytes > MAX_BATCH_BYTES {
            p(
                format!("{key}.batch_bytes"),
                format!(
                    "{} is over the limit of {MAX_BATCH_BYTES} (a batch is sent as one compressed block, \
                     which ClickHouse takes up to 1 GiB)",
                    t.batch_bytes
                ),
            );
        }
        if t.dead_letter_topic == t.topic {
            p(
                format!("{key}.dead_letter_topic"),
                "must differ from the topic".into(),
            );
        }
    }
    if problems.is_empty() {
        Ok(ValidatedIngest {
            config,
            secrets,
            pick_token,
        })
    } else {
        Err(problems)
    }
}

/// True if the task's template is a `debezium` one.
fn debezium(templates: &BTreeMap<String, TemplateConfig>, t: &TaskConfig) -> bool {
    templates
        .get(&t.template)
        .is_some_and(|c| c.format == FormatKind::Debezium)
}

/// What a task applying change events must be: sharded by its message key, with no key
/// column and no time window.
fn debezium_task(key: &str, t: &TaskConfig, p: &mut impl FnMut(String, String)) {
    for table in &t.alter_also {
        let plain =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !table
            .split_once('.')
            .is_some_and(|(d, t)| plain(d) && plain(t))
        {
            p(
                format!("{key}.alter_also"),
                format!("{table:?} must be database.table with letters, digits and _"),
            );
        }
    }
    if let Some(table) = &t.source_table {
        if !table
            .split_once('.')
            .is_some_and(|(s, t)| !s.is_empty() && !t.is_empty())
        {
            p(
                format!("{key}.source_table"),
                format!("{table:?} must be schema.table, as in the events' source"),
            );
        }
    }
    if t.sharding() != Sharding::Key {
        p(
            format!("{key}.sharding"),
            "a debezium task needs sharding = \"key\" (the default for it): the message key, \
             the row's primary key, must choose the shard, so that a row's cancel and state \
             rows and all its versions land on one shard (merges and FINAL only collapse rows \
             within a shard)"
                .into(),
        );
    }
    if t.key.is_some() {
        p(
            format!("{key}.key"),
            "a debezium task is sharded by the message key (the row's primary key); leave key out"
                .into(),
        );
    }
    if t.time_window.is_some() {
        p(
            format!("{key}.time_window"),
            "a debezium task applies every change: one dropped for its time would leave its \
             row wrong for good"
                .into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/ingest-local.toml"
        ));
        // The stack's secret may not exist where unit tests run: only that may be wrong.
        match load(path) {
            Ok(v) => {
                let t = &v.config.tasks["events"];
                assert_eq!(t.sharding(), Sharding::Random);
                for cdc in ["orders", "customers"] {
                    assert_eq!(v.config.tasks[cdc].sharding(), Sharding::Key, "{cdc}");
                }
                assert_eq!(t.batch_age, Duration::from_secs(1));
                assert!(v.config.pick_api.is_some());
            }
            Err(problems) => {
                assert!(
                    problems
                        .iter()
                        .all(|p| p.key == "clusters.demo.accounts.ingest"),
                    "{problems:?}"
                );
            }
        }
    }

    #[test]
    fn problems_name_their_keys() {
        let dir = std::env::temp_dir().join(format!("chgate-ingest-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(
            &path,
            r#"
            [kafka]
            brokers = "b:9092"
            group_id = "g"
            [picker]
            fall = 0
            probe_interval = "0s"
            [upstream]
            max_attempts = 0
            [clusters.demo]
            shards = [{ replicas = [{ host = "h" }] }]
            [clusters.demo.accounts.a]
            user = "u"
            password_env = "CHGATE_TEST_INGEST_SECRET"
            [templates.t]
            format = "json"
            [tasks.x]
            topic = "in"
            template = "nope"
            cluster = "demo"
            account = "b"
            table = "events_local"
            sharding = "key"
            batch_bytes = 1073741824
            dead_letter_topic = "in"
            "#,
        )
        .unwrap();
        std::env::set_var("CHGATE_TEST_INGEST_SECRET", "s");
        let problems = load(&path).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "tasks.x.template",
            "tasks.x.account",
            "tasks.x.table",
            "tasks.x.key",
            "tasks.x.dead_letter_topic",
            "tasks.x.batch_bytes",
            // The proxy's own checks of the shared sections.
            "picker.fall",
            "picker.probe_interval",
            "upstream.max_attempts",
        ] {
            assert!(keys.contains(&key), "{key} missing: {problems:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn debezium_tasks_shard_by_the_message_key() {
        let config = |template: &str, task: &str| {
            let text = format!(
                r#"
                [kafka]
                brokers = "b:9092"
                group_id = "g"
                [clusters.demo]
                shards = [{{ replicas = [{{ host = "h" }}] }}]
                [clusters.demo.accounts.a]
                user = "u"
                password_env = "CHGATE_TEST_INGEST_SECRET"
                [templates.t]
                format = "debezium"
                {template}
                [tasks.x]
                topic = "pg.public.t"
                template = "t"
                cluster = "demo"
                account = "a"
                table = "demo.t_local"
                dead_letter_topic = "pg-dlq"
                {task}
                "#
            );
            std::env::set_var("CHGATE_TEST_INGEST_SECRET", "s");
            let parsed: IngestConfig = toml::from_str(&text).unwrap();
            validate(parsed, Path::new("."))
        };
        let v = config("engine = \"replacing\"", "").unwrap();
        assert_eq!(v.config.tasks["x"].sharding(), Sharding::Key, "the default");
        let v = config("engine = \"replacing\"", "source_table = \"public.t\"").unwrap();
        assert_eq!(
            v.config.tasks["x"].source_table.as_deref(),
            Some("public.t")
        );
        for bad in ["t", ".t", "public."] {
            let problems = config(
                "engine = \"replacing\"",
                &format!("source_table = \"{bad}\""),
            )
            .unwrap_err();
            assert_eq!(problems[0].key, "tasks.x.source_table", "{problems:?}");
            assert!(problems[0].message.contains("schema.table"), "{problems:?}");
        }
        let problems = config(
            "sign_column = \"s\"",
            "sharding = \"random\"\nkey = \"id\"\ntime_window = { column = \"ts\", max_age = \"1h\" }",
        )
        .unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "templates.t.engine",
                "tasks.x.sharding",
                "tasks.x.key",
                "tasks.x.time_window"
            ],
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("the message key"),
            "{problems:?}"
        );
    }
}
