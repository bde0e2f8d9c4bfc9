//! Active probes: what a ClickHouse node and a ZooKeeper ensemble say about themselves.
//!
//! A node probe is one `GET /?query=...` with the cluster account: scalar subqueries over
//! system tables, one TSV row back. Servers differ (18.16 has no `system.disks`, newer ones
//! renamed background pool metrics), so [`detect`] asks once which tables exist and the
//! query only uses those; a figure the server cannot give is `None`, never a guess.
//! A ZooKeeper probe is the four-letter words `ruok` and `mntr` over plain TCP.
//!
//! Probes go over a connection of their own ([`Dedicated`]), never the request pool.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::figures::{Capabilities, ClusterRow, NodeFigures, ZooKeeperFigures};
use crate::upstream::{Account, Dedicated, Node, QueryError, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("the server answered {status}: {text}")]
    Status { status: u16, text: String },
    #[error("unexpected answer: {0}")]
    Parse(String),
    #[error("ZooKeeper: {0}")]
    ZooKeeper(String),
}

impl From<QueryError> for ProbeError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Upstream(UpstreamError::Timeout(t)) => Self::Timeout(t),
            QueryError::Upstream(e) => Self::Upstream(e),
            QueryError::Server { status, text, .. } => Self::Status { status, text },
        }
    }
}

impl ProbeError {
    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Upstream(_) => "connect",
            Self::Status { .. } => "status",
            Self::Parse(_) => "parse",
            Self::ZooKeeper(_) => "zookeeper",
        }
    }
}

/// `GET /ping`: the server's HTTP handler answers without touching any table.
pub async fn ping(node: &Node, timeout: Duration) -> Result<Duration, ProbeError> {
    ping_on(node, &mut Dedicated::default(), timeout).await
}

async fn ping_on(
    node: &Node,
    conn: &mut Dedicated,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let (text, rtt) = conn.get(node, None, "/ping", timeout).await?;
    if text.trim_end() != "Ok." {
        return Err(ProbeError::Parse(format!(
            "/ping answered {:?}",
            text.chars().take(100).collect::<String>()
        )));
    }
    Ok(rtt)
}

/// Asks the node which system tables it has.
pub async fn detect(
    node: &Node,
    account: &Account,
    timeout: Duration,
) -> Result<Capabilities, ProbeError> {
    detect_on(node, &mut Dedicated::default(), account, timeout).await
}

async fn detect_on(
    node: &Node,
    conn: &mut Dedicated,
    account: &Account,
    timeout: Duration,
) -> Result<Capabilities, ProbeError> {
    let (text, _) = conn.query(
        node,
        account,
        "SELECT name FROM system.tables WHERE database = 'system' AND name IN ('disks', 'replicas') \
         UNION ALL SELECT concat('version=', version()) FORMAT TSV",
        timeout,
    )
    .await?;
    Ok(parse_capabilities(&text))
}

/// The capabilities query's answer: system tables by name, and a `version=` line.
fn parse_capabilities(text: &str) -> Capabilities {
    let names: Vec<&str> = text.lines().collect();
    let version = names.iter().find_map(|l| l.strip_prefix("version="));
    Capabilities {
        disks: names.contains(&"disks"),
        replicas: names.contains(&"replicas"),
        kill_holds_process_list: version.is_none_or(Capabilities::kill_holds_process_list),
    }
}

fn figures_query(caps: Capabilities) -> String {
    let replicas = if caps.replicas {
        "(SELECT toUInt64(countIf(is_readonly)) FROM system.replicas), \
         (SELECT toUInt64(max(is_session_expired)) FROM system.replicas), \
         (SELECT toUInt64(max(absolute_delay)) FROM system.replicas), \
         (SELECT toUInt64(max(queue_size)) FROM system.replicas)"
    } else {
        "toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0)"
    };
    let disks = if caps.disks {
        "(SELECT min(free_space) FROM system.disks)"
    } else {
        "CAST(NULL AS Nullable(UInt64))"
    };
    format!(
        "SELECT \
         (SELECT count() FROM system.processes), \
         (SELECT count() FROM system.merges), \
         (SELECT toUInt64(sum(value)) FROM system.metrics WHERE metric LIKE 'Background%PoolTask'), \
         {replicas}, \
         (SELECT toUInt64(max(c)) FROM (SELECT count() AS c FROM system.parts WHERE active GROUP BY database, table, partition)), \
         {disks} \
         FORMAT TSV"
    )
}

fn parse_figures(text: &str, round_trip: Duration) -> Result<NodeFigures, ProbeError> {
    let fields: Vec<&str> = text.trim_end_matches('\n').split('\t').collect();
    if fields.len() != 9 {
        return Err(ProbeError::Parse(format!(
            "expected 9 fields, got {}: {:?}",
            fields.len(),
            text.chars().take(200).collect::<String>()
        )));
    }
    let num = |i: usize| -> Result<u64, ProbeError> {
        fields[i]
            .parse()
            .map_err(|_| ProbeError::Parse(format!("field {i} is not a number: {:?}", fields[i])))
    };
    Ok(NodeFigures {
        round_trip,
        running_queries: num(0)?,
        merges: num(1)?,
        background_pool_tasks: num(2)?,
        readonly_replicas: num(3)?,
        session_expired: num(4)? > 0,
        replica_delay_s: num(5)?,
        replica_queue: num(6)?,
        max_parts_in_partition: num(7)?,
        free_disk_bytes: match fields[8] {
            "\\N" => None,
            _ => Some(num(8)?),
        },
    })
}

/// Probes a node's load, replication state, parts and disk, in one query.
pub async fn probe(
    node: &Node,
    account: &Account,
    caps: Capabilities,
    timeout: Duration,
) -> Result<NodeFigures, ProbeError> {
    probe_on(node, &mut Dedicated::default(), account, caps, timeout).await
}

async fn probe_on(
    node: &Node,
    conn: &mut Dedicated,
    account: &Account,
    caps: Capabilities,
    timeout: Duration,
) -> Result<NodeFigures, ProbeError> {
    let (text, rtt) = conn
        .query(node, account, &figures_query(caps), timeout)
        .await?;
    parse_figures(&text, rtt)
}

/// A full probe within `timeout`: `/ping` (its round trip is the node's latency figure),
/// capabilities if not known yet, then the figures.
pub async fn probe_node(
    node: &Node,
    account: &Account,
    known: Option<Capabilities>,
    timeout: Duration,
) -> Result<(NodeFigures, Capabilities), ProbeError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    // One connection for the whole probe.
    let mut conn = Dedicated::default();
    let rtt = ping_on(node, &mut conn, timeout).await?;
    let caps = match known {
        Some(c) => c,
        None => detect_on(node, &mut conn, account, left()).await?,
    };
    let mut figures = probe_on(node, &mut conn, account, caps, left()).await?;
    figures.round_trip = rtt;
    Ok((figures, caps))
}

/// Reads a cluster's shards and replicas from a node's `system.clusters`.
pub async fn system_clusters(
    node: &Node,
    account: &Account,
    cluster: &str,
    timeout: Duration,
) -> Result<Vec<ClusterRow>, ProbeError> {
    let quoted = cluster.replace('\\', "\\\\").replace('\'', "\\'");
    let sql = format!(
        "SELECT shard_num, shard_weight, replica_num, host_name, port FROM system.clusters \
         WHERE cluster = '{quoted}' ORDER BY shard_num, replica_num FORMAT TSV"
    );
    let (text, _) = Dedicated::default()
        .query(node, account, &sql, timeout)
        .await?;
    parse_cluster_rows(&text)
}

fn parse_cluster_rows(text: &str) -> Result<Vec<ClusterRow>, ProbeError> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let bad = || ProbeError::Parse(format!("unexpected system.clusters row {line:?}"));
            if f.len() != 5 {
                return Err(bad());
            }
            Ok(ClusterRow {
                shard_num: f[0].parse().map_err(|_| bad())?,
                shard_weight: f[1].parse().map_err(|_| bad())?,
                replica_num: f[2].parse().map_err(|_| bad())?,
                host_name: f[3].to_string(),
                port: f[4].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

async fn four_letter_word(
    addr: &str,
    word: &[u8],
    timeout: Duration,
) -> Result<String, ProbeError> {
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ProbeError::ZooKeeper(format!("cannot connect: {e}")))?;
        stream
            .write_all(word)
            .await
            .map_err(|e| ProbeError::ZooKeeper(e.to_string()))?;
        let mut out = Vec::new();
        // The server closes the connection after answering; 64 KiB is far above any answer.
        stream
            .take(64 * 1024)
            .read_to_end(&mut out)
            .await
            .map_err(|e| ProbeError::ZooKeeper(e.to_string()))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

/// `ruok` then `mntr` on one ensemble member.
pub async fn probe_zookeeper(
    addr: &str,
    timeout: Duration,
) -> Result<ZooKeeperFigures, ProbeError> {
    let started = Instant::now();
    let ruok = four_letter_word(addr, b"ruok", timeout).await?;
    if ruok != "imok" {
        return Err(ProbeError::ZooKeeper(format!("ruok answered {ruok:?}")));
    }
    let round_trip = started.elapsed();
    let mntr = four_letter_word(addr, b"mntr", timeout).await?;
    if mntr.contains("not in the whitelist") {
        // The operator has not allowed mntr: ruok is all there is to go on.
        return Ok(ZooKeeperFigures {
            round_trip,
            server_state: "unknown (mntr not whitelisted)".into(),
            ..Default::default()
        });
    }
    parse_mntr(&mntr, round_trip)
}

fn parse_mntr(text: &str, round_trip: Duration) -> Result<ZooKeeperFigures, ProbeError> {
    let mut figures = ZooKeeperFigures {
        round_trip,
        ..Default::default()
    };
    let mut seen = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('\t') else {
            continue;
        };
        match key {
            "zk_server_state" => {
                figures.server_state = value.to_string();
                seen += 1;
            }
            "zk_avg_latency" => {
                figures.avg_latency_ms = value.parse().unwrap_or(0.0);
                seen += 1;
            }
            "zk_outstanding_requests" => {
                figures.outstanding_requests = value.parse().unwrap_or(0);
                seen += 1;
            }
            _ => {}
        }
    }
    if seen < 3 {
        // mntr not whitelisted answers "mntr is not executed because it is not in the whitelist."
        return Err(ProbeError::ZooKeeper(format!(
            "mntr gave no figures: {:?}",
            text.chars().take(200).collect::<String>()
        )));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_name_the_servers_whose_kill_holds_the_process_list() {
        let caps = parse_capabilities("replicas\nversion=18.16.1\n");
        assert!(caps.replicas && !caps.disks && caps.kill_holds_process_list);
        let caps = parse_capabilities("disks\nreplicas\nversion=22.9.1.2603\n");
        assert!(caps.disks && !caps.kill_holds_process_list);
        assert!(!parse_capabilities("version=25.8.3.1\n").kill_holds_process_list);
        assert!(parse_capabilities("version=22.8.20.11\n").kill_holds_process_list);
        // No version, or one that does not parse: assumed to hold it.
        assert!(parse_capabilities("replicas\n").kill_holds_process_list);
        assert!(parse_capabilities("version=unknown\n").kill_holds_process_list);
    }

    #[test]
    fn parses_figures_with_and_without_disks() {
        let f = parse_figures("3\t1\t2\t0\t0\t12\t4\t17\t\\N\n", Duration::from_millis(2)).unwrap();
        assert_eq!(f.running_queries, 3);
        assert_eq!(f.replica_delay_s, 12);
        assert_eq!(f.max_parts_in_partition, 17);
        assert_eq!(f.free_disk_bytes, None);
        let f = parse_figures("0\t0\t0\t1\t1\t0\t0\t5\t1024\n", Duration::ZERO).unwrap();
        assert!(f.session_expired);
        assert_eq!(f.readonly_replicas, 1);
        assert_eq!(f.free_disk_bytes, Some(1024));
        assert!(parse_figures("Code: 60. DB::Exception", Duration::ZERO).is_err());
        assert!(parse_figures("a\tb\tc\td\te\tf\tg\th\ti", Duration::ZERO).is_err());
    }

    #[test]
    fn parses_mntr_and_refuses_a_non_answer() {
        let f = parse_mntr(
            "zk_version\t3.8.0\nzk_server_state\tstandalone\nzk_avg_latency\t1.5\nzk_outstanding_requests\t2\n",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(f.server_state, "standalone");
        assert_eq!(f.outstanding_requests, 2);
        assert!(parse_mntr(
            "This ZooKeeper instance is not currently serving requests\n",
            Duration::ZERO
        )
        .is_err());
    }

    #[test]
    fn parses_system_clusters() {
        let rows =
            parse_cluster_rows("1\t1\t1\tch1\t9000\n1\t1\t2\tch2\t9000\n2\t3\t1\tch3\t9440\n")
                .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[2],
            ClusterRow {
                shard_num: 2,
                shard_weight: 3,
                replica_num: 1,
                host_name: "ch3".into(),
                port: 9440
            }
        );
        assert!(parse_cluster_rows("Code: 516\n").is_err());
        assert_eq!(parse_cluster_rows("").unwrap(), vec![]);
    }
}
