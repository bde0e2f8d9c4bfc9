//! The initial snapshot: every existing row of the captured tables as an `r` event,
//! consistent with the stream that follows, parallel across tables, in chunks of
//! `snapshot_chunk_rows` by primary key, each chunk's progress recorded when its events are
//! in Kafka.
//!
//! On the first start the slot is created with an exported snapshot (`S`, consistent with
//! the slot's start): the chunks read under it and the stream from the slot's start
//! overlap nowhere. After a crash mid-snapshot that snapshot is gone; each unfinished table
//! goes on from its last recorded key under a new snapshot `T` of its own (a *regime*),
//! whose `pg_current_snapshot()` is recorded. The stream still starts at the slot's start,
//! so it brings transactions `T` already saw: an event is skipped when its transaction is
//! visible in the snapshot its row's key range was read under (`Regime::sees`), which
//! happens only for keys of a resumed range. So no row is missed and none is applied twice.
//! Every snapshot row's version is one below the slot's restart LSN when the snapshot was
//! planned, below every change the slot can send. Not the consistent point: a transaction
//! that began before it (and was not yet running when the slot was asked for) commits
//! after it, so the snapshot does not see it, yet its changes sit at LSNs below it; with
//! the consistent point as the snapshot's version, ReplacingMergeTree would keep the
//! snapshot's older row over that transaction's update.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::catalog::{quote_ident, quote_literal, TableSchema};
use super::envelope::{now_ms, Source, TableEnvelope};
use super::row::Layout;
use crate::kafka::partition::partition_for_key;

/// Key values of a row, as text (`None` for NULL), in key order.
pub type KeyText = Vec<Option<String>>;

/// A snapshot PostgreSQL took, as `pg_current_snapshot()` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XidSnapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl XidSnapshot {
    /// "10:20:12,15" -> xmin 10, xmax 20, in progress 12 and 15.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Self { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the (committed) transaction with the 32-bit `xid`.
    pub fn sees(&self, xid: u32) -> bool {
        // Widen the xid to 64 bits in the epoch nearest the snapshot's xmax.
        let diff = xid.wrapping_sub(self.xmax as u32) as i32;
        let full = self.xmax.wrapping_add_signed(i64::from(diff));
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// A key range of a table and the snapshot it was read under: keys above `from` (from the
/// start when `None`) up to the next regime's `from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regime {
    pub from: Option<KeyText>,
    /// `None`: the slot's exported snapshot (sees no streamed transaction).
    pub snapshot: Option<XidSnapshot>,
    /// The WAL position when the snapshot was taken: every transaction it sees committed
    /// before it.
    pub lsn_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableProgress {
    pub done: bool,
    /// The key of the last row published.
    pub after: Option<KeyText>,
    pub regimes: Vec<Regime>,
    /// The table is read again to reconcile its topic with it (`capture/reconcile.rs`):
    /// another instance's snapshot of it stopped part way (the store, rebuilt from the
    /// topics, holds the rows that one published), or it comes back to the capture (the
    /// store holds its rows as last published). Its regime 0 stands for those rows (read
    /// under no snapshot of this reading); the rows read again are compared with them, and
    /// the ones not read again are deleted at the end.
    #[serde(default)]
    pub reconcile: Option<Reconcile>,
}

/// A reconcile under way (see [`TableProgress::reconcile`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reconcile {
    /// The version of its events: above every version the table's topic holds, below every
    /// change the stream can still send (`capture/reconcile.rs` says why).
    pub version: u64,
    /// Every row was read: only the deletes of the rows not read again are left, and a
    /// restart goes on with them without reading again (a new reading could find a key
    /// the sweep already deleted, inserted again since, and publish it at the same version
    /// as its delete).
    #[serde(default)]
    pub read: bool,
}

impl TableProgress {
    /// The progress of a table read again to reconcile its topic with it, its events at
    /// `version`.
    pub fn reconciling(version: u64) -> Self {
        Self {
            done: false,
            after: None,
            regimes: vec![Regime {
                from: None,
                snapshot: None,
                lsn_at: 0,
            }],
            reconcile: Some(Reconcile {
                version,
                read: false,
            }),
        }
    }
}

/// The snapshot's progress, in the store's `snapshot` record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The slot's consistent point (the exported snapshot's LSN).
    pub consistent_lsn: u64,
    /// Every snapshot row's version: one below the slot's restart LSN when the snapshot
    /// was planned. `None` in a record of a version of chgate before it (which took the
    /// consistent point).
    #[serde(default)]
    pub row_version: Option<u64>,
    pub tables: BTreeMap<String, TableProgress>,
    /// Tables taken out of the capture, and the store's position then: every event of
    /// theirs published is below it (a table that comes back is reconciled above it).
    #[serde(default)]
    pub removed: BTreeMap<String, u64>,
}

impl SnapshotState {
    /// Every snapshot row's version.
    pub fn row_version(&self) -> u64 {
        self.row_version.unwrap_or(self.consistent_lsn)
    }

    /// The version of a table's snapshot events: its reconcile's, or every snapshot row's.
    pub fn version_of(&self, table: &str) -> u64 {
        self.reconciling(table)
            .map_or_else(|| self.row_version(), |r| r.version)
    }

    /// The table's reconcile under way, if it is being reconciled.
    pub fn reconciling(&self, table: &str) -> Option<Reconcile> {
        self.tables.get(table).and_then(|p| p.reconcile)
    }

    pub fn done(&self) -> bool {
        self.tables.values().all(|t| t.done)
    }

    /// The last WAL position a resumed regime's snapshot may have seen a transaction at:
    /// past it, no streamed event needs the visibility check.
    pub fn check_until(&self) -> u64 {
        self.tables
            .values()
            .flat_map(|t| &t.regimes)
            .filter(|r| r.snapshot.is_some())
            .map(|r| r.lsn_at)
            .max()
            .unwrap_or(0)
    }
}

/// One chunk of a table's rows, read under one snapshot.
pub struct Chunk {
    pub table: usize,
    /// Each row's key JSON and row JSON, written by the reading task (so the conversion
    /// runs beside the publishing, not in its way).
    pub rows: ChunkRows,
    /// The rows' `r` events, in row order, also written by the reading task.
    pub events: Vec<ChunkEvent>,
    /// The last row's key.
    pub last_key: Option<KeyText>,
    /// Fewer rows than a chunk: the table is done.
    pub last: bool,
    /// Set on the first chunk of a resumed regime.
    pub new_regime: Option<Regime>,
}

/// A chunk's rows as JSON, key then row, one after the other in one buffer: two
/// allocations a chunk instead of two a row (glibc's free lists were a large share of the
/// snapshot's applying thread, README "The CDC snapshot's applying thread").
#[derive(Debug, Default)]
pub struct ChunkRows {
    buf: Vec<u8>,
    /// Per row: where its key ends and where its row ends in `buf`.
    ends: Vec<(usize, usize)>,
}

impl ChunkRows {
    fn with_capacity(rows: usize, bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(rows),
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// (key JSON, row JSON) of each row, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, row_end)| {
            let pair = (&self.buf[start..key_end], &self.buf[key_end..row_end]);
            start = row_end;
            pair
        })
    }

    /// Appends a row of COPY text values: its key (false if a key column is NULL), then
    /// the row.
    fn push<'a>(&mut self, layout: &Layout, value: impl Fn(usize) -> Option<&'a str>) -> bool {
        let start = self.buf.len();
        if !layout.key_text(&value, &mut self.buf) {
            self.buf.truncate(start);
            return false;
        }
        let key_end = self.buf.len();
        layout.row_text(&value, &mut self.buf);
        self.ends.push((key_end, self.buf.len()));
        true
    }
}

/// A snapshot row's `r` event: its partition, key and value, slices of one buffer per
/// chunk.
pub struct ChunkEvent {
    pub partition: i32,
    pub key: Bytes,
    pub value: Bytes,
}

/// How a reading task writes its rows' events.
pub struct EventShape {
    pub envelope: Arc<TableEnvelope>,
    pub with_schema: bool,
    /// The topic's partitions.
    pub partitions: i32,
    /// Every snapshot row's version (`SnapshotState::row_version`).
    pub version: u64,
}

impl EventShape {
    /// The `r` events of a chunk's rows.
    fn events(&self, rows: &ChunkRows) -> Vec<ChunkEvent> {
        let source = Source {
            commit_ts_ms: now_ms(),
            snapshot: "true",
            tx_id: None,
            lsn: Some(self.version),
            commit_lsn: None,
            row_version: self.version,
            before_row_version: None,
        };
        let mut buf = Vec::with_capacity(rows.buf.len() * 2 + rows.len() * 400);
        let mut spans = Vec::with_capacity(rows.len());
        for (key, row) in rows.iter() {
            let start = buf.len();
            self.envelope.key_into(key, self.with_schema, &mut buf);
            let key_end = buf.len();
            self.envelope
                .value_into('r', None, Some(row), &source, self.with_schema, &mut buf);
            let partition = partition_for_key(&buf[start..key_end], self.partitions);
            spans.push((partition, start, key_end, buf.len()));
        }
        let buf = Bytes::from(buf);
        spans
            .into_iter()
            .map(|(partition, start, key_end, end)| ChunkEvent {
                partition,
                key: buf.slice(start..key_end),
                value: buf.slice(key_end..end),
            })
            .collect()
    }
}

/// What one table's reading task is to read.
pub struct TableRead {
    pub index: usize,
    pub table: TableSchema,
    pub layout: Arc<Layout>,
    pub events: EventShape,
    /// Go on after this key (the last one published).
    pub after: Option<KeyText>,
    /// The exported snapshot to read under; without it the task takes a new one and
    /// reports it as a regime with its first chunk.
    pub snapshot: Option<String>,
    pub chunk_rows: u32,
}

/// Reads one table chunk by chunk into `out`.
pub async fn read_table(client: Client, read: TableRead, out: mpsc::Sender<anyhow::Result<Chunk>>) {
    let TableRead {
        index,
        table,
        layout,
        events: shape,
        mut after,
        snapshot,
        chunk_rows,
    } = read;
    let result = async {
        // Before the transaction: SET TRANSACTION SNAPSHOT must be its first statement.
        let mut limit = first_chunk_rows(&client, &table, chunk_rows).await;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let mut new_regime = match &snapshot {
            Some(name) => {
                client
                    .batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))
                    .await?;
                None
            }
            None => {
                let row = client
                    .query_one(
                        // The WAL's insert position, not its write position: with
                        // asynchronous commit a transaction is visible once its commit
                        // record is inserted, before it is written.
                        "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
                        &[],
                    )
                    .await?;
                let snap: String = row.get(0);
                let lsn: String = row.get(1);
                Some(Regime {
                    from: after.clone(),
                    snapshot: Some(XidSnapshot::parse(&snap).ok_or_else(|| {
                        anyhow::anyhow!("cannot read pg_current_snapshot() {snap:?}")
                    })?),
                    lsn_at: super::catalog::parse_lsn(&lsn).unwrap_or(u64::MAX),
                })
            }
        };
        loop {
            let sql = chunk_query(&table, after.as_ref(), limit);
            let stream = client.copy_out(sql.as_str()).await?;
            let data: Vec<Bytes> = stream.try_collect().await?;
            let data = data.concat();
            let (rows, last_key) = rows_of_copy(&data, &table, &layout, limit)?;
            let events = shape.events(&rows);
            let last = rows.len() < limit as usize;
            limit = chunk_rows_for(rows.len(), data.len(), chunk_rows);
            if let Some(k) = &last_key {
                after = Some(Clone::clone(k));
            }
            let chunk = Chunk {
                table: index,
                rows,
                events,
                last_key,
                last,
                new_regime: new_regime.take(),
            };
            if out.send(Ok(chunk)).await.is_err() || last {
                break;
            }
        }
        client.batch_execute("COMMIT").await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = out
            .send(Err(e.context(format!("snapshot of {}", table.full_name()))))
            .await;
    }
}

/// A chunk's COPY text is kept near this size: `snapshot_chunk_rows` rows of wide rows
/// (documents of 100 KiB, say) would be gigabytes in memory, and one outbox record too big
/// to read back.
const CHUNK_BYTES: usize = 16 << 20;

/// The rows of the next chunk: as many as fill [`CHUNK_BYTES`] at the last chunk's bytes
/// per row, at most `max` (`snapshot_chunk_rows`).
fn chunk_rows_for(rows: usize, bytes: usize, max: u32) -> u32 {
    if rows == 0 || bytes == 0 {
        return max;
    }
    let per_row = bytes.div_ceil(rows);
    u32::try_from(CHUNK_BYTES / per_row)
        .unwrap_or(u32::MAX)
        .clamp(1, max.max(1))
}

/// The first chunk's rows, from the table's size per row in the catalog (its TOAST
/// included, compressed as it is on disk, so a guess that wide values can still exceed),
/// and at most 1,000 until a chunk has shown the real width.
async fn first_chunk_rows(client: &Client, table: &TableSchema, max: u32) -> u32 {
    let max = max.clamp(1, 1_000);
    let sql = "SELECT (pg_total_relation_size(c.oid) / greatest(c.reltuples, 1))::float8 \
               FROM pg_class c WHERE c.oid = $1::text::regclass AND c.reltuples > 0";
    match client.query_opt(sql, &[&table.qualified()]).await {
        Ok(Some(row)) => {
            let per_row = row.get::<_, f64>(0).max(1.0);
            ((CHUNK_BYTES as f64 / per_row) as u32).clamp(1, max)
        }
        _ => max,
    }
}

/// `COPY (SELECT cols FROM t WHERE (key) > (after) ORDER BY key LIMIT n) TO STDOUT`.
pub fn chunk_query(table: &TableSchema, after: Option<&KeyText>, limit: u32) -> String {
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let key: Vec<String> = table
        .key
        .iter()
        .map(|&i| quote_ident(&table.columns[i].name))
        .collect();
    let filter = match after {
        Some(values) => format!(
            " WHERE ({}) > ({})",
            key.join(", "),
            key_literals(table, values).join(", ")
        ),
        None => String::new(),
    };
    format!(
        "COPY (SELECT {} FROM {}{filter} ORDER BY {} LIMIT {limit}) TO STDOUT",
        cols.join(", "),
        table.qualified(),
        key.join(", ")
    )
}

/// Key values as typed SQL literals: `'42'::bigint`.
pub fn key_literals(table: &TableSchema, values: &KeyText) -> Vec<String> {
    table
        .key
        .iter()
        .zip(values)
        .map(|(&i, v)| match v {
            Some(v) => format!("{}::{}", quote_literal(v), table.columns[i].type_name),
            None => "NULL".into(),
        })
        .collect()
}

/// A chunk's COPY text as JSON rows, and the last row's key values.
fn rows_of_copy(
    data: &[u8],
    table: &TableSchema,
    layout: &Layout,
    chunk_rows: u32,
) -> anyhow::Result<(ChunkRows, Option<KeyText>)> {
    let mut rows = ChunkRows::with_capacity(chunk_rows as usize, data.len() * 3);
    // The key of the row last seen, its strings reused from row to row.
    let mut last: KeyText = vec![None; table.key.len()];
    for_each_copy_row(data, table.columns.len(), |row| {
        if !rows.push(layout, |i| row.get(i)) {
            anyhow::bail!("a row without its primary key");
        }
        for (slot, &i) in last.iter_mut().zip(&table.key) {
            if let Some(v) = row.get(i) {
                let s = slot.get_or_insert_with(String::new);
                s.clear();
                s.push_str(v);
            }
        }
        Ok(())
    })?;
    let last_key = (!rows.is_empty()).then_some(last);
    Ok((rows, last_key))
}

/// Where a COPY field's text is.
#[derive(Debug, Clone, Copy)]
enum Field {
    Null,
    /// In the line, as it came (no escapes).
    Raw(usize, usize),
    /// In the scratch buffer, unescaped.
    Unescaped(usize, usize),
}

/// One row of COPY text: its fields, unescaped where they had to be.
pub struct CopyRow<'a> {
    line: &'a str,
    scratch: &'a [u8],
    fields: &'a [Field],
}

impl CopyRow<'_> {
    /// Column `i`'s text; `None` for NULL.
    pub fn get(&self, i: usize) -> Option<&str> {
        match *self.fields.get(i)? {
            Field::Null => None,
            Field::Raw(a, b) => self.line.get(a..b),
            // Checked as UTF-8 when it was unescaped.
            Field::Unescaped(a, b) => std::str::from_utf8(&self.scratch[a..b]).ok(),
        }
    }
}

/// Calls `f` with each row of `COPY ... TO STDOUT` text: rows end with `\n`, columns are
/// split by tabs, `\N` is NULL, and backslash escapes the rest. Allocates nothing per row.
pub fn for_each_copy_row(
    data: &[u8],
    columns: usize,
    mut f: impl FnMut(&CopyRow<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut scratch = Vec::new();
    let mut fields = Vec::with_capacity(columns);
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let line = std::str::from_utf8(line)?;
        scratch.clear();
        fields.clear();
        let mut start = 0;
        for field in line.split('\t') {
            let end = start + field.len();
            fields.push(if field == "\\N" {
                Field::Null
            } else if field.contains('\\') {
                let from = scratch.len();
                unescape(field.as_bytes(), &mut scratch)?;
                std::str::from_utf8(&scratch[from..])?;
                Field::Unescaped(from, scratch.len())
            } else {
                Field::Raw(start, end)
            });
            start = end + 1;
        }
        if fields.len() != columns {
            anyhow::bail!(
                "a COPY row of {} fields for {columns} columns",
                fields.len()
            );
        }
        f(&CopyRow {
            line,
            scratch: &scratch,
            fields: &fields,
        })?;
    }
    Ok(())
}

/// Appends `field` to `out` with COPY's backslash escapes undone.
fn unescape(field: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&e) = field.get(i) else {
            anyhow::bail!("a COPY value ends with a lone backslash");
        };
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_copy_text(data: &[u8], columns: usize) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let mut rows = Vec::new();
        for_each_copy_row(data, columns, |row| {
            rows.push(
                (0..columns)
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            );
            Ok(())
        })?;
        Ok(rows)
    }

    #[test]
    fn chunks_are_cut_to_a_size_in_bytes() {
        // Narrow rows: the configured count.
        assert_eq!(chunk_rows_for(20_000, 1_200_000, 20_000), 20_000);
        // 64 KiB rows: 16 MiB of them.
        assert_eq!(chunk_rows_for(1_000, 1_000 * 65_536, 20_000), 256);
        // A row over the budget: one at a time, never none.
        assert_eq!(chunk_rows_for(3, 3 * (64 << 20), 20_000), 1);
        // An empty chunk says nothing about the width.
        assert_eq!(chunk_rows_for(0, 0, 500), 500);
    }

    #[test]
    fn copy_text_unescapes() {
        let rows =
            parse_copy_text(b"1\ta\\tb\\\\c\t\\N\n2\tline\\nbreak\t\\x41\\101\n", 3).unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Some("1".into()), Some("a\tb\\c".into()), None],
                vec![
                    Some("2".into()),
                    Some("line\nbreak".into()),
                    Some("AA".into())
                ],
            ]
        );
        assert!(parse_copy_text(b"1\tbad\\\t2", 3).is_err());
        assert!(parse_copy_text(b"1\t2\n", 3).is_err(), "a short row");
        assert!(parse_copy_text(b"1\t\xff\t2\n", 3).is_err(), "not UTF-8");
    }

    #[test]
    fn visibility_follows_the_snapshot() {
        let s = XidSnapshot::parse("100:110:103,105").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(104));
        assert!(!s.sees(103));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
        assert!(XidSnapshot::parse("5:5:").unwrap().sees(4));
        // Across the 32-bit wrap: epoch 1.
        let w = XidSnapshot::parse("4294967390:4294967400:").unwrap();
        assert!(w.sees(50)); // 2^32 + 50 < xmin
        assert!(!w.sees(200));
        assert!(w.sees(u32::MAX - 5)); // the previous epoch
        assert!(XidSnapshot::parse("x:1:").is_none());
    }
}
