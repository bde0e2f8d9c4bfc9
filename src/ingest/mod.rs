//! `chgate ingest`: Kafka to ClickHouse through lock-free rings and parser workers, one
//! picked node per batch, exactly once with ZooKeeper batch intents (`DESIGN.md` beside
//! this file has the guarantee, the states and how the tests prove it).
//!
//! - [`config`]: the sidecar's config file; [`follow`]: its clusters followed in ZooKeeper;
//! - [`template`]: format templates (JSON paths, delimited text with a multi-character
//!   separator and quoting, mapping by name or position, defaults, the time window, and
//!   Debezium change events), compiled against the table's columns;
//! - [`debezium`]: a change event's envelope checked, and the rows it becomes for a
//!   VersionedCollapsingMergeTree or ReplacingMergeTree table;
//! - [`message`], [`ring`]: a consumed message and the wait-free consumer-to-worker
//!   hand-off;
//! - [`pending`]: the memory ceiling, held by messages and segments until dropped;
//! - [`batch`]: per-partition segments, cut by rows, bytes or age, deterministic;
//! - [`shard_key`]: which shard a key goes to (stored-data policy);
//! - [`intents`]: the ZooKeeper record that makes a crash exactly-once;
//! - [`pipeline`]: the consumer thread, the workers and the per-partition writers;
//! - [`run`]: start-up (tables' columns, templates, picker, Kafka) and shutdown.
//!
//! What it shares with the other apps lives below it: ClickHouse's formats in
//! `clickhouse`, Kafka in `kafka`, writing a part to a picked node in `sink`.

pub mod batch;
pub mod config;
pub mod debezium;
pub mod follow;
pub mod intents;
pub mod message;
pub mod pending;
pub mod pipeline;
pub mod ring;
pub mod shard_key;
pub mod template;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSource};
use crate::clickhouse::insert::{Insert, SUPPORTS_DEDUP_TOKEN};
use crate::clickhouse::types::ColumnType;
use crate::kafka::{self, Rereader};
use crate::picker::{Cluster, ClusterConfigs, Clusters};
use crate::secret::Secret;
use crate::sink::{PickApi, Target};
use crate::upstream::{Account, Node};
use batch::TaskSpec;
use config::{IngestConfig, Sharding, TaskConfig, ValidatedIngest};
use template::Template;

/// Names inside SQL literals and identifiers here come from the config: keep them plain.
fn plain_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What the sidecar's admin listener shows: its own picker's clusters (swapped when they
/// are followed in ZooKeeper).
struct Admin {
    clusters: Arc<ArcSwap<Clusters>>,
    stop: CancellationToken,
}

impl AdminSource for Admin {
    fn clusters(&self) -> Arc<Clusters> {
        self.clusters.load_full()
    }

    fn readiness(&self) -> Result<(), &'static str> {
        if self.stop.is_cancelled() {
            Err("draining")
        } else {
            Ok(())
        }
    }

    fn token(&self) -> Option<Secret> {
        None
    }
}

/// The insertable columns of `db.table`, asked of the first node that answers.
async fn table_columns(
    cluster: &Cluster,
    account: &Account,
    db: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, ColumnType)>> {
    let sql = format!(
        "SELECT name, type, default_kind FROM system.columns \
         WHERE database = '{db}' AND table = '{table}' FORMAT TSV"
    );
    let mut errors = Vec::new();
    for backend in cluster.topology().nodes.iter() {
        let node = &backend.node;
        match node.query(account, &sql, Duration::from_secs(5)).await {
            Ok(text) => {
                let mut columns = Vec::new();
                for line in text.lines() {
                    let f: Vec<&str> = line.split('\t').collect();
                    if f.len() < 3 || matches!(f[2], "MATERIALIZED" | "ALIAS") {
                        continue;
                    }
                    let ty = ColumnType::parse(f[1])
                        .map_err(|e| anyhow::anyhow!("{db}.{table}.{}: {e}", f[0]))?;
                    columns.push((f[0].to_string(), ty));
                }
                if columns.is_empty() {
                    anyhow::bail!(
                        "{db}.{table} does not exist on {} (or has no insertable column)",
                        node.label
                    );
                }
                return Ok(columns);
            }
            Err(e) => errors.push(format!("{}: {e}", node.label)),
        }
    }
    anyhow::bail!(
        "cannot read the columns of {db}.{table} from any node: {}",
        errors.join("; ")
    )
}

/// Warns when a debezium task's table is not of the engine its template writes for (a
/// `versioned_collapsing` template into a plain MergeTree keeps every change, which the
/// `sum(sign)` form still reads right: not refused).
async fn check_engine(
    cluster: &Cluster,
    account: &Account,
    db: &str,
    table: &str,
    engine: debezium::Engine,
    task: &str,
) {
    let family = match engine {
        debezium::Engine::VersionedCollapsing => "VersionedCollapsingMergeTree",
        debezium::Engine::Replacing => "ReplacingMergeTree",
    };
    let sql = format!(
        "SELECT engine FROM system.tables WHERE database = '{db}' AND name = '{table}' FORMAT TSV"
    );
    for backend in cluster.topology().nodes.iter() {
        let Ok(text) = backend
            .node
            .query(account, &sql, Duration::from_secs(5))
            .await
        else {
            continue;
        };
        let found = text.trim();
        if !found.ends_with(family) {
            tracing::warn!(task, table = %format!("{db}.{table}"), engine = found, expected = family, "The table's engine is not the one the debezium template writes for");
        }
        return;
    }
}

/// The proxy's pick API as the config names it.
fn pick_api(v: &ValidatedIngest) -> Option<(String, u16, Option<http::HeaderValue>, Duration)> {
    let api = v.config.pick_api.as_ref()?;
    let rest = api.url.trim_start_matches("http://").trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .unwrap_or((rest.to_string(), 80));
    let token = v
        .pick_token
        .as_ref()
        .and_then(|t| http::HeaderValue::from_str(&format!("Bearer {}", t.expose())).ok());
    Some((host, port, token, api.timeout))
}

/// A task ready to run: its table's columns read, its template compiled against them, its
/// insert statement built for what the servers support.
async fn build_task(
    name: &str,
    t: &TaskConfig,
    c: &IngestConfig,
    handles: &HashMap<String, follow::Handle>,
    api: Option<&(String, u16, Option<http::HeaderValue>, Duration)>,
) -> anyhow::Result<pipeline::Task> {
    let handle = handles
        .get(&t.cluster)
        .cloned()
        .with_context(|| format!("tasks.{name}: no cluster {}", t.cluster))?;
    let cluster = handle.load_full();
    let account = cluster
        .accounts
        .get(&t.account)
        .cloned()
        .with_context(|| format!("tasks.{name}: no account {}", t.account))?;
    let (db, table) = t.table.split_once('.').unwrap_or(("", ""));
    anyhow::ensure!(
        plain_identifier(db) && plain_identifier(table),
        "tasks.{name}.table: {:?} must be database.table with letters, digits and _",
        t.table
    );
    let columns = table_columns(&cluster, &account, db, table).await?;
    let template = Template::compile(&c.templates[&t.template], &columns)
        .map_err(|problems| {
            anyhow::anyhow!(
                "template {} does not fit {}:\n{}",
                t.template,
                t.table,
                problems
                    .iter()
                    .map(|p| format!("templates.{}.{p}", t.template))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?
        .only_from(t.source_table.clone());
    if let Some(apply) = template.debezium() {
        check_engine(&cluster, &account, db, table, apply.engine, name).await;
    }
    let key_column = match &t.key {
        Some(k) if t.sharding() == Sharding::Key => {
            Some(template.column_index(k).with_context(|| {
                format!("tasks.{name}.key: {k} is not a column the template fills")
            })?)
        }
        _ => None,
    };
    let window = match &t.time_window {
        Some(w) => Some((
            template.column_index(&w.column).with_context(|| {
                format!(
                    "tasks.{name}.time_window.column: {} is not a column the template fills",
                    w.column
                )
            })?,
            w.max_age,
            w.max_future,
        )),
        None => None,
    };
    let dedup_token = match cluster.topology().nodes.first() {
        Some(b) => b
            .node
            .query(&account, SUPPORTS_DEDUP_TOKEN, Duration::from_secs(5))
            .await
            .is_ok_and(|text| text.trim() == "1"),
        None => false,
    };
    let insert = Insert::new(db, table, &template.insert_columns()).with_dedup_token(dedup_token);
    tracing::info!(task = %name, topic = %t.topic, table = %t.table, columns = %template.insert_columns(), dedup_token, "Task ready");
    let shards = cluster.topology().shards.iter().map(|s| s.number).collect();
    Ok(pipeline::Task {
        name: name.to_string(),
        topic: t.topic.clone(),
        dead_letter_topic: t.dead_letter_topic.clone(),
        spec: Arc::new(TaskSpec {
            template: Arc::new(template),
            sharding: t.sharding(),
            key_column,
            shards,
            window,
            batch_rows: t.batch_rows,
            batch_bytes: t.batch_bytes,
            batch_age: t.batch_age,
        }),
        target: Arc::new(Target {
            task: name.to_string(),
            table: t.table.clone(),
            cluster: handle,
            account,
            insert,
            pick_api: api.map(|(host, port, token, timeout)| PickApi {
                endpoint: Node::new(host, *port, 0, &c.upstream),
                token: token.clone(),
                timeout: *timeout,
            }),
            insert_timeout: Duration::from_secs(60),
            alter_also: t.alter_also.clone(),
        }),
    })
}

/// The consumer's librdkafka config: group, membership, session.
fn consumer_config(c: &IngestConfig) -> rdkafka::ClientConfig {
    let mut config = kafka::client_config(&c.kafka.brokers, &c.kafka.properties);
    if c.kafka.static_membership {
        config.set("group.instance.id", instance_id(c));
    }
    config.set("group.id", &c.kafka.group_id).set(
        "session.timeout.ms",
        c.kafka.session_timeout.as_millis().to_string(),
    );
    config
}

/// The static member id: `kafka.instance_id`, or `chgate-ingest-<hostname>`.
fn instance_id(c: &IngestConfig) -> String {
    c.kafka.instance_id.clone().unwrap_or_else(|| {
        format!(
            "chgate-ingest-{}",
            std::fs::read_to_string("/etc/hostname")
                .unwrap_or_default()
                .trim()
        )
    })
}

/// `chgate ingest --config FILE`: runs until SIGTERM or SIGINT, then drains.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (v, from_zookeeper) = config::load_with_source(path).await.map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
    })?;
    let c = &v.config;
    let stop = crate::signals::shutdown()?;

    // The embedded picker: probes the clusters itself, for when the proxy is out of reach.
    let clusters = Arc::new(ArcSwap::from_pointee(Clusters::default().reconcile(
        &ClusterConfigs {
            clusters: &c.clusters,
            secrets: &v.secrets,
            upstream: &c.upstream,
            picker: &c.picker,
        },
    )));
    let handles = follow::handles(
        &clusters.load(),
        c.tasks.values().map(|t| t.cluster.as_str()),
    );
    let admin_stop = CancellationToken::new();
    let admin_thread = match c.admin.listen {
        Some(addr) => {
            let listener = admin::bind(addr)?;
            tracing::info!(kind = "admin", addr = %listener.local_addr()?, "Listening");
            let source = Arc::new(Admin {
                clusters: clusters.clone(),
                stop: stop.clone(),
            });
            Some(admin::spawn(listener, source, admin_stop.clone())?)
        }
        None => None,
    };

    let api = pick_api(&v);
    let mut tasks = Vec::new();
    for (name, t) in &c.tasks {
        tasks.push(build_task(name, t, c, &handles, api.as_ref()).await?);
    }
    let follow_stop = CancellationToken::new();
    if let Some(z) = from_zookeeper {
        let origin = format!(
            "zookeeper:{}{}",
            z.source.zookeeper.join(","),
            z.source.root
        );
        let tracker = crate::config::source::Tracker::new(origin, z.version, false);
        tracker.spawn_stale_gauge(follow_stop.clone());
        tokio::spawn(follow::run(
            follow::Follow {
                file: z.file,
                base: z.base,
                source: z.source,
                clusters: clusters.clone(),
                handles,
                running: c.clusters.clone(),
                started_with: z.nodes,
                tracker,
            },
            follow_stop.clone(),
        ));
    }
    let producer: rdkafka::producer::FutureProducer =
        kafka::client_config(&c.kafka.brokers, &c.kafka.properties)
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .create()
            .context("cannot create the dead-letter producer")?;
    let intents = match &c.coordination {
        Some(co) => Some(Arc::new(
            intents::Intents::connect(&co.zookeeper, &co.root)
                .await
                .map_err(|e| anyhow::anyhow!("coordination: {e}"))?,
        )),
        None => {
            tracing::warn!(
                "No [coordination] ZooKeeper: a crash may write a batch twice (at-least-once)"
            );
            None
        }
    };
    let instance = if c.kafka.static_membership {
        instance_id(c)
    } else {
        "(dynamic membership)".to_string()
    };
    tracing::info!(group = %c.kafka.group_id, instance = %instance, tasks = tasks.len(), exactly_once = intents.is_some(), "Consuming");
    let rewind = c.kafka.start_rewind.max(0);
    let result = pipeline::run(
        tasks,
        consumer_config(c),
        producer,
        pipeline::Settings {
            group: c.kafka.group_id.clone(),
            rewind,
            session_timeout: c.kafka.session_timeout,
            intents,
            workers: c.limits.workers,
            ring_capacity: c.limits.ring_capacity,
            max_pending_bytes: c.limits.max_pending_bytes,
            drain_timeout: Duration::from_secs(30),
            reread: Arc::new(Rereader::new(
                kafka::client_config(&c.kafka.brokers, &c.kafka.properties),
                &c.kafka.group_id,
                rewind,
            )),
        },
        stop,
    )
    .await;
    follow_stop.cancel();
    admin_stop.cancel();
    if let Some(t) = admin_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    result
}
