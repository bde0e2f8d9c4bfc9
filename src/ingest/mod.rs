//! `chgate ingest`: Kafka to ClickHouse through lock-free rings and parser workers, one
//! picked node per batch, exactly once with ZooKeeper batch intents (`DESIGN.md` beside
//! this file has the guarantee, the states and how the tests prove it).
//!
//! - [`config`]: the sidecar's config file;
//! - [`types`]: ClickHouse column types from `system.columns` names;
//! - [`encode`]: message values to RowBinary, converted to the column's type;
//! - [`template`]: format templates (JSON paths, delimited text with a multi-character
//!   separator and quoting, mapping by name or position, defaults, the time window),
//!   compiled against the table's columns;
//! - [`backoff`]: how every retry waits;
//! - [`ring`]: the wait-free consumer-to-worker hand-off;
//! - [`batch`]: per-partition segments, cut by rows, bytes or age, deterministic;
//! - [`writer`]: one part into a picked node's local table, retried, never dropped;
//! - [`intents`]: the ZooKeeper record that makes a crash exactly-once;
//! - [`pipeline`]: the consumer thread, the workers and the per-partition writers;
//! - [`run`]: start-up (tables' columns, templates, picker, Kafka) and shutdown.

pub mod backoff;
pub mod batch;
pub mod compress;
pub mod config;
pub mod encode;
pub mod intents;
pub mod message;
pub mod pipeline;
pub mod reread;
pub mod ring;
pub mod template;
pub mod types;
pub mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::picker::Cluster;
use crate::upstream::Account;
use batch::TaskSpec;
use config::{Sharding, ValidatedIngest};
use template::Template;
use types::ColumnType;

/// Names inside SQL literals and identifiers here come from the config: keep them plain.
fn plain_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
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
    for node in cluster.topology().nodes.iter() {
        match crate::picker::probe::query(node, account, &sql, Duration::from_secs(5)).await {
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

/// Serves `/metrics` and `/healthz` for the sidecar.
async fn serve_metrics(addr: std::net::SocketAddr, stop: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(kind = "admin", addr = %listener.local_addr()?, "Listening");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (200, crate::metrics::METRICS.render()),
                            "/healthz" => (200, b"ok\n".to_vec()),
                            _ => (404, b"not found: try /metrics, /healthz\n".to_vec()),
                        };
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// `chgate ingest --config FILE`: runs until SIGTERM or SIGINT, then drains.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let v: ValidatedIngest = config::load(path).map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
    })?;
    let c = &v.config;
    let stop = CancellationToken::new();
    if let Some(addr) = c.admin.listen {
        serve_metrics(addr, stop.clone()).await?;
    }

    // The embedded picker: probes the clusters itself, for when the proxy is out of reach.
    let mut clusters: HashMap<String, Arc<Cluster>> = HashMap::new();
    for (name, cc) in &c.clusters {
        let cluster = Cluster::new(
            name,
            cc,
            &v.secrets,
            &c.upstream,
            &c.picker,
            &HashMap::new(),
            &HashMap::new(),
        );
        cluster.start();
        clusters.insert(name.clone(), Arc::new(cluster));
    }
    let pick_api = match &c.pick_api {
        None => None,
        Some(api) => {
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
    };

    let mut tasks = Vec::new();
    for (name, t) in &c.tasks {
        let cluster = clusters[&t.cluster].clone();
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
        let template =
            Template::compile(&c.templates[&t.template], &columns).map_err(|problems| {
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
            })?;
        let key_column = match &t.key {
            Some(k) if t.sharding == Sharding::Key => {
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
        let sql = format!(
            "INSERT INTO `{db}`.`{table}` ({}) FORMAT RowBinary",
            template.insert_columns()
        );
        let path_and_query = format!(
            "/?insert_deduplicate=1&decompress=1&query={}",
            form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
        );
        let shards = cluster.topology().shards.iter().map(|s| s.number).collect();
        let dedup_token = match crate::picker::probe::query(
            &cluster.topology().nodes[0],
            &account,
            "SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'",
            Duration::from_secs(5),
        )
        .await
        {
            Ok(text) => text.trim() == "1",
            Err(_) => false,
        };
        tracing::info!(task = %name, topic = %t.topic, table = %t.table, columns = %template.insert_columns(), dedup_token, "Task ready");
        tasks.push(pipeline::Task {
            name: name.clone(),
            topic: t.topic.clone(),
            dead_letter_topic: t.dead_letter_topic.clone(),
            spec: Arc::new(TaskSpec {
                template: Arc::new(template),
                sharding: t.sharding,
                key_column,
                shards,
                window,
                batch_rows: t.batch_rows,
                batch_bytes: t.batch_bytes,
                batch_age: t.batch_age,
            }),
            target: Arc::new(writer::Target {
                task: name.clone(),
                table: t.table.clone(),
                cluster,
                account,
                path_and_query,
                pick_api: pick_api
                    .as_ref()
                    .map(|(host, port, token, timeout)| writer::PickApi {
                        endpoint: crate::upstream::Node::new(host, *port, 0, &c.upstream),
                        token: token.clone(),
                        timeout: *timeout,
                    }),
                insert_timeout: Duration::from_secs(60),
                dedup_token,
            }),
        });
    }

    let mut consumer_config = pipeline::kafka_config(&c.kafka.brokers, &c.kafka.properties);
    let instance = c.kafka.instance_id.clone().unwrap_or_else(|| {
        format!(
            "chgate-ingest-{}",
            std::fs::read_to_string("/etc/hostname")
                .unwrap_or_default()
                .trim()
        )
    });
    if c.kafka.static_membership {
        consumer_config.set("group.instance.id", &instance);
    }
    consumer_config.set("group.id", &c.kafka.group_id).set(
        "session.timeout.ms",
        c.kafka.session_timeout.as_millis().to_string(),
    );
    let producer: rdkafka::producer::FutureProducer =
        pipeline::kafka_config(&c.kafka.brokers, &c.kafka.properties)
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .create()
            .context("cannot create the dead-letter producer")?;

    let signals = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, draining"),
        }
        signals.cancel();
    });
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
        instance
    } else {
        "(dynamic membership)".to_string()
    };
    tracing::info!(group = %c.kafka.group_id, instance = %instance, tasks = tasks.len(), exactly_once = intents.is_some(), "Consuming");
    pipeline::run(
        tasks,
        consumer_config,
        producer,
        pipeline::Settings {
            group: c.kafka.group_id.clone(),
            rewind: c.kafka.start_rewind.max(0),
            intents,
            workers: c.limits.workers,
            ring_capacity: c.limits.ring_capacity,
            max_pending_bytes: c.limits.max_pending_bytes,
            drain_timeout: Duration::from_secs(30),
            reread: Arc::new(reread::Rereader::new(
                pipeline::kafka_config(&c.kafka.brokers, &c.kafka.properties),
                &c.kafka.group_id,
                c.kafka.start_rewind.max(0),
            )),
        },
        stop,
    )
    .await
}
