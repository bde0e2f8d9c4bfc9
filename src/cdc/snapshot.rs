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
//! Every snapshot row's version is the slot's start LSN, below every streamed change.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::catalog::{quote_ident, quote_literal, TableSchema};
use super::row::Layout;

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
}

/// The snapshot's progress, in the store's `snapshot` record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The LSN the slot started at: every snapshot row's version.
    pub consistent_lsn: u64,
    pub tables: BTreeMap<String, TableProgress>,
}

impl SnapshotState {
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
    /// Each row as (key JSON, row JSON), written by the reading task (so the conversion
    /// runs beside the publishing, not in its way).
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// The last row's key.
    pub last_key: Option<KeyText>,
    /// Fewer rows than a chunk: the table is done.
    pub last: bool,
    /// Set on the first chunk of a resumed regime.
    pub new_regime: Option<Regime>,
}

/// What one table's reading task is to read.
pub struct TableRead {
    pub index: usize,
    pub table: TableSchema,
    pub layout: Arc<Layout>,
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
        mut after,
        snapshot,
        chunk_rows,
    } = read;
    let result = async {
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
                        "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text",
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
            let sql = chunk_query(&table, after.as_ref(), chunk_rows);
            let stream = client.copy_out(sql.as_str()).await?;
            let data: Vec<Bytes> = stream.try_collect().await?;
            let values = parse_copy_text(&data.concat())?;
            let last = values.len() < chunk_rows as usize;
            let last_key = values.last().map(|r| {
                table
                    .key
                    .iter()
                    .map(|&i| r.get(i).cloned().flatten())
                    .collect()
            });
            let mut rows = Vec::with_capacity(values.len());
            for v in &values {
                let mut key = Vec::with_capacity(32);
                if !layout.key_text(v, &mut key) {
                    anyhow::bail!("a row without its primary key");
                }
                let mut row = Vec::with_capacity(256);
                layout.row_text(v, &mut row);
                rows.push((key, row));
            }
            if let Some(k) = &last_key {
                after = Some(Clone::clone(k));
            }
            let chunk = Chunk {
                table: index,
                rows,
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

/// `COPY ... TO STDOUT` text format: rows end with `\n`, columns are split by tabs, `\N`
/// is NULL, and backslash escapes the rest.
pub fn parse_copy_text(data: &[u8]) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let mut rows = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let row = line
            .split(|&b| b == b'\t')
            .map(|field| {
                if field == b"\\N" {
                    Ok(None)
                } else {
                    unescape(field).map(Some)
                }
            })
            .collect::<anyhow::Result<_>>()?;
        rows.push(row);
    }
    Ok(rows)
}

fn unescape(field: &[u8]) -> anyhow::Result<String> {
    if !field.contains(&b'\\') {
        return Ok(std::str::from_utf8(field)?.to_string());
    }
    let mut out = Vec::with_capacity(field.len());
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
    Ok(String::from_utf8(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_unescapes() {
        let rows = parse_copy_text(b"1\ta\\tb\\\\c\t\\N\n2\tline\\nbreak\t\\x41\\101\n").unwrap();
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
        assert!(parse_copy_text(b"1\tbad\\").is_err());
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
