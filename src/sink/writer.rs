//! Writing one part (a shard's rows of a batch) into a node's local table.
//!
//! The node comes from the proxy's pick API (`purpose=write`, pinned to the part's shard
//! once it has one); if the API cannot be reached, from the app's own picker, which probes
//! the same cluster. A node that fails the insert is set aside for this part and another
//! replica of the same shard tried; when none is left, the part waits (doubling backoff)
//! and tries again: a part is never dropped. A stale pooled connection is not a failing
//! node: the insert goes again to the same node on a fresh connection (`Node::exchange`).
//! A part ClickHouse refuses for its data is split in halves until the refused rows are
//! isolated; only those are returned. Rows glued together (`Rows`) are never split: they
//! are refused together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pick_api::PickApi;
use super::Rows;
use crate::backoff::{Backoff, Stop};
use crate::clickhouse::insert::{Insert, InsertError};
use crate::clickhouse::types::ColumnType;
use crate::metrics::METRICS;
use crate::picker::{Backend, Cluster, Purpose};
use crate::upstream::Account;

/// Where a task's parts go.
pub struct Target {
    /// The task's name, for metrics and logs.
    pub task: String,
    /// `db.table`, for the metrics.
    pub table: String,
    /// The cluster, swapped when the sidecar follows its config in ZooKeeper.
    pub cluster: Arc<arc_swap::ArcSwap<Cluster>>,
    pub account: Arc<Account>,
    pub insert: Insert,
    pub pick_api: Option<PickApi>,
    pub insert_timeout: Duration,
    /// Tables of every node that get a new column too (`alter_also`).
    pub alter_also: Vec<String>,
}

/// What became of a part.
#[derive(Debug)]
pub struct Written {
    pub shard: u32,
    /// (row index, ClickHouse's error) for rows it refused; rows glued together are
    /// refused as one, named by their first.
    pub refused: Vec<(usize, String)>,
}

/// Resolves once the picker's probes mark `backend` down.
async fn went_down(backend: &Backend) {
    while !backend.state.is_down() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What became of one range of a part's rows.
enum Range {
    /// In ClickHouse.
    Written,
    /// A single row (or rows glued together) ClickHouse refused, with its error.
    Refused(String),
    /// ClickHouse refused some of the rows: the halves, cut at this row, go again.
    Split(usize),
}

impl Target {
    /// The node for a part: the pick API's choice, or the embedded picker's; never one of
    /// `failed`. `Err` says why no node can take it now.
    async fn pick(
        &self,
        shard: Option<u32>,
        failed: &[Arc<Backend>],
    ) -> Result<(u32, Arc<Backend>), String> {
        if failed.is_empty() {
            if let Some(api) = &self.pick_api {
                match api.pick(&self.cluster.load_full(), shard).await {
                    Ok(Some(pick)) => return Ok(pick),
                    Ok(None) => {}
                    Err(refusal) => return Err(refusal),
                }
            }
        }
        let view = self.cluster.load().view();
        let t = &view.topology;
        let tried: Vec<usize> = (0..t.nodes.len())
            .filter(|&i| failed.iter().any(|f| Arc::ptr_eq(f, &t.nodes[i])))
            .collect();
        let pick = if tried.is_empty() {
            view.pick(Purpose::Write, shard, [rand::random(), rand::random()])
                .map_err(|no| {
                    let reasons: Vec<String> = no
                        .reasons
                        .iter()
                        .map(|(i, e)| format!("{}: {e}", t.nodes[*i].label()))
                        .collect();
                    format!("no node can take writes ({})", reasons.join("; "))
                })?
        } else {
            // A replica of the same shard that has not failed this part.
            let shard_index = shard.and_then(|n| t.shard_index(n));
            let candidates: Vec<usize> = match shard_index {
                Some(s) => t.shards[s]
                    .nodes
                    .iter()
                    .copied()
                    .filter(|i| !tried.contains(i))
                    .collect(),
                None => (0..t.nodes.len()).filter(|i| !tried.contains(i)).collect(),
            };
            candidates
                .into_iter()
                .filter(|&i| view.standings[i].get(Purpose::Write).is_ok())
                .max_by_key(|&i| *view.standings[i].get(Purpose::Write).as_ref().unwrap_or(&0))
                .ok_or_else(|| "every replica of the shard failed this batch".to_string())?
        };
        let number = t.shards[t.replicas[pick].shard].number;
        Ok((number, t.nodes[pick].clone()))
    }

    /// The shard for a random-sharded batch, as the picker chooses it now (waiting while
    /// no shard can take writes); `None` if stopped (a drain ends the wait).
    pub async fn choose_shard(&self, stop: &Stop) -> Option<u32> {
        let mut backoff = Backoff::default();
        loop {
            match self.pick(None, &[]).await {
                Ok((shard, _)) => return Some(shard),
                Err(why) => {
                    tracing::warn!(task = %self.task, reason = %why, "No shard takes writes; waiting");
                    if !stop.backoff(&mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The insert of `columns` (a template extended with new columns names more than the
    /// task's insert).
    pub fn insert_of(&self, columns: &str) -> Insert {
        let (db, table) = self.table.split_once('.').unwrap_or(("", ""));
        Insert::new(db, table, columns).with_dedup_token(self.insert.dedup_token())
    }

    /// Adds `columns` (name, type) to the table on every node that answers, then to each
    /// of `also` (tables of every node, e.g. the Distributed one); a column already there
    /// is fine. `Err` unless every shard has a replica with every column afterwards (a
    /// replica down now takes the change from the replication log when it comes back).
    pub async fn add_columns(
        &self,
        columns: &[(String, ColumnType)],
        also: &[String],
    ) -> Result<(), String> {
        const TIMEOUT: Duration = Duration::from_secs(30);
        let topology = self.cluster.load().topology();
        let alter = |table: &str| {
            columns
                .iter()
                .map(|(name, ty)| {
                    format!(
                        "ALTER TABLE {table} ADD COLUMN `{}` {ty}",
                        name.replace('`', "\\`")
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut shards_done = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        for (i, backend) in topology.nodes.iter().enumerate() {
            let node = &backend.node;
            let mut ok = true;
            for sql in alter(&self.table) {
                match node.execute(&self.account, &sql, TIMEOUT).await {
                    Ok(_) => {
                        tracing::info!(task = %self.task, node = %node.label, sql = %sql, "Column added")
                    }
                    Err(e) if e.to_string().contains("already exists") => {}
                    Err(e) => {
                        ok = false;
                        errors.push(format!("{}: {sql}: {e}", node.label));
                    }
                }
            }
            if ok && self.has_columns(node, &self.table, columns).await {
                shards_done.insert(topology.shards[topology.replicas[i].shard].number);
            }
            for table in also {
                for sql in alter(table) {
                    if let Err(e) = node.execute(&self.account, &sql, TIMEOUT).await {
                        let e = e.to_string();
                        if e.contains("doesn't exist") {
                            tracing::debug!(task = %self.task, node = %node.label, table = %table, "No such table on this node");
                            break;
                        }
                        if !e.contains("already exists") {
                            tracing::warn!(task = %self.task, node = %node.label, sql = %sql, error = %e, "Cannot add the column to a table of alter_also; run the statement by hand");
                        }
                    }
                }
            }
        }
        let missing: Vec<u32> = topology
            .shards
            .iter()
            .map(|s| s.number)
            .filter(|n| !shards_done.contains(n))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "shard(s) {missing:?} have no replica with the new columns: {}",
                errors.join("; ")
            ))
        }
    }

    /// Whether `table` on `node` has every one of `columns`.
    async fn has_columns(
        &self,
        node: &crate::upstream::Node,
        table: &str,
        columns: &[(String, ColumnType)],
    ) -> bool {
        let (db, name) = table.split_once('.').unwrap_or(("", ""));
        let sql = format!(
            "SELECT name FROM system.columns WHERE database = '{db}' AND table = '{name}' FORMAT TSV"
        );
        match node
            .query(&self.account, &sql, Duration::from_secs(5))
            .await
        {
            Ok(text) => columns.iter().all(|(c, _)| text.lines().any(|l| l == c)),
            Err(_) => false,
        }
    }

    /// Writes a part's `rows`, whatever it takes; `None` if stopped: by `stop.now` at once,
    /// by a drain once no replica is left to try without waiting. `shard` is
    /// the part's (`None`: the first pick chooses it); `token` names the part for servers
    /// that take a deduplication token; `insert` is the task's unless the rows were
    /// encoded with new columns.
    pub async fn write(
        &self,
        insert: Option<&Insert>,
        shard: Option<u32>,
        rows: &Rows,
        token: &str,
        stop: &Stop,
    ) -> Option<Written> {
        let mut writing = Writing {
            shard,
            failed: Vec::new(),
            backoff: Backoff::default(),
        };
        let mut refused = Vec::new();
        // Row ranges still to write; a refused range is split.
        let mut pending = vec![(0usize, rows.rows())];
        while let Some((from, to)) = pending.pop() {
            match self
                .write_range(&mut writing, insert, rows, from, to, token, stop)
                .await?
            {
                Range::Written => {}
                Range::Refused(e) => refused.push((from, e)),
                Range::Split(mid) => {
                    pending.push((mid, to));
                    pending.push((from, mid));
                }
            }
        }
        refused.sort_by_key(|(row, _)| *row);
        Some(Written {
            shard: writing.shard.unwrap_or(0),
            refused,
        })
    }

    /// Rows `[from, to)`, to a node of the part's shard, retried on its other replicas
    /// (and after a wait when none is left) until ClickHouse has taken or refused them.
    #[allow(clippy::too_many_arguments)]
    async fn write_range(
        &self,
        w: &mut Writing,
        insert: Option<&Insert>,
        rows: &Rows,
        from: usize,
        to: usize,
        token: &str,
        stop: &Stop,
    ) -> Option<Range> {
        loop {
            if stop.now.is_cancelled() {
                return None;
            }
            let (number, backend) = match self.pick(w.shard, &w.failed).await {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(task = %self.task, shard = ?w.shard, reason = %why, retry_in_ms = w.backoff.next().as_millis() as u64, "No node for a batch; waiting");
                    w.failed.clear();
                    if !stop.backoff(&mut w.backoff).await {
                        return None;
                    }
                    continue;
                }
            };
            // The first pick decides the shard of a random-sharded part: a retry must go
            // back to the same shard.
            w.shard = Some(number);
            let started = Instant::now();
            let range_token = range_token(token, from, to, rows.slice(from, to));
            let node = &backend.node;
            // A node that goes down under an insert (stopped, partitioned) would hold it
            // until the timeout: give up on it as soon as the probes say so. The retry on
            // another replica is safe: the shard deduplicates the block.
            let outcome = tokio::select! {
                r = node.insert(&self.account, insert.unwrap_or(&self.insert), (rows.slice(from, to), to - from), Some(&range_token), self.insert_timeout) => r,
                _ = went_down(&backend) => Err(InsertError::Node("the node went down during the insert".into())),
            };
            tracing::debug!(task = %self.task, node = %node.label, shard = number, token = %range_token, ok = outcome.is_ok(), "Insert");
            match outcome {
                Ok(()) => {
                    self.count_written(number, &node.label, to - from, started);
                    w.backoff.reset();
                    return Some(Range::Written);
                }
                Err(InsertError::Data(e)) => {
                    let Some(mid) = rows.split_point(from, to) else {
                        return Some(Range::Refused(e));
                    };
                    tracing::warn!(task = %self.task, node = %node.label, rows = to - from, error = %e, "ClickHouse refused the batch's data; splitting it");
                    return Some(Range::Split(mid));
                }
                Err(InsertError::Node(e)) => {
                    tracing::warn!(task = %self.task, node = %node.label, shard = number, error = %e, "Insert failed; trying another replica");
                    METRICS
                        .ingest_insert_failures
                        .with_label_values(&[self.task.as_str(), node.label.as_str()])
                        .inc();
                    w.failed.push(backend);
                }
            }
        }
    }

    fn count_written(&self, shard: u32, node: &str, rows: usize, started: Instant) {
        let labels = [
            self.task.as_str(),
            self.table.as_str(),
            &shard.to_string(),
            node,
        ];
        METRICS
            .ingest_rows
            .with_label_values(&labels)
            .inc_by(rows as u64);
        METRICS.ingest_batches.with_label_values(&labels).inc();
        METRICS
            .ingest_insert_seconds
            .with_label_values(&[self.task.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// One part's progress across its ranges.
struct Writing {
    shard: Option<u32>,
    /// Replicas that failed this part (cleared when none is left).
    failed: Vec<Arc<Backend>>,
    backoff: Backoff,
}

/// The deduplication token of rows `from..to` of a part whose token is `token`. The rows'
/// bytes are in it too: an exact rebuild of the range (the same messages, the same
/// encoding) is the same insert, but other rows under the same offsets (a topic deleted
/// and created again) are not dropped as a repeat by servers that deduplicate by the token
/// alone (22.2 and later).
fn range_token(token: &str, from: usize, to: usize, bytes: &[u8]) -> String {
    let content = cityhash_rs::cityhash_102_128(bytes) as u64;
    format!("{token}:{from}-{to}:{content:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_token_names_its_rows_bytes() {
        let t = range_token("orders:3:100-199:1", 0, 100, b"rows");
        assert!(t.starts_with("orders:3:100-199:1:0-100:"), "{t}");
        assert_eq!(t, range_token("orders:3:100-199:1", 0, 100, b"rows"));
        assert_ne!(t, range_token("orders:3:100-199:1", 0, 100, b"other rows"));
    }
}
