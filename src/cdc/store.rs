//! The capture's local state, in one crash-safe file (redb: copy-on-write B-trees, a
//! durable commit per write):
//!
//! - **rows**: the last published state of every captured row: its JSON, exactly as it
//!   went out in an event's `after`, and its version. It makes every `before` complete
//!   whatever the table's REPLICA IDENTITY, and fills an update's unchanged TOAST values:
//!   PostgreSQL sends neither, the store has both. It costs a copy of each row's
//!   published JSON plus its key and eight bytes (measured per row by `scripts/bench-cdc`).
//! - **outbox**: the events of the changes written, until the broker acknowledges them.
//! - **meta**: the position reached (`store_lsn`), the snapshot's progress, counters.
//!
//! Changes are grouped into *units* (a transaction, or a slice of a big one; a snapshot
//! chunk). A unit's row writes, its events and the position it reaches are committed
//! together, *before* its events are sent; so after a crash the file says exactly which
//! changes have events, and those events are sent again from the outbox, byte for byte (the
//! capture skips the ones the broker already has, see `tail`), never derived again from a
//! store that has moved on. Transactions the server sends again up to `store_lsn` are
//! skipped; a transaction cut into slices resumes after its last committed slice.

/// Keyed by row keys from the source database: foldhash with a per-process random seed
/// (SipHash was a visible share of the snapshot's profile).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::metrics::METRICS;

const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// A committed unit's events, in one record keyed by its last event's number.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// A row's last published state.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub version: u64,
    /// The snapshot regime the row was read under (its index in the table's regimes), or
    /// [`StoredRow::STREAMED`] for a row a streamed change wrote.
    pub regime: u8,
    /// The row's JSON object, as published.
    pub json: std::sync::Arc<str>,
}

impl StoredRow {
    pub const STREAMED: u8 = u8::MAX;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(9 + self.json.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.regime);
        out.extend_from_slice(self.json.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let version = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let regime = *bytes.get(8)?;
        let json = std::str::from_utf8(bytes.get(9..)?).ok()?;
        Some(Self {
            version,
            regime,
            json: json.into(),
        })
    }
}

/// Writes the store key of a row into `out` (cleared first): its table, a zero byte, its
/// key JSON.
pub fn row_key_into(table: &str, key_json: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(table.len() + 1 + key_json.len());
    out.extend_from_slice(table.as_bytes());
    out.push(0);
    out.extend_from_slice(key_json);
}

/// An event waiting for the broker: where it goes, and its bytes. `seq` increases across
/// restarts; it travels in the `chgate-seq` header.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    pub seq: u64,
    pub unit: u64,
    pub topic: Arc<str>,
    pub partition: i32,
    /// Shared with the other events of its snapshot chunk, whose bytes are one buffer.
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

impl OutboxEvent {
    /// Bytes of its encoding, about.
    fn size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.unit.to_le_bytes());
        out.extend_from_slice(&self.partition.to_le_bytes());
        put_bytes(out, Some(self.topic.as_bytes()));
        put_bytes(out, self.key.as_deref());
        put_bytes(out, self.value.as_deref());
    }

    fn decode(seq: u64, mut b: &[u8]) -> Option<Self> {
        let unit = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let partition = i32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let topic: Arc<str> = String::from_utf8(get_bytes(&mut b)??).ok()?.into();
        let key = get_bytes(&mut b)?.map(Bytes::from);
        let value = get_bytes(&mut b)?.map(Bytes::from);
        Some(Self {
            seq,
            unit,
            topic,
            partition,
            key,
            value,
        })
    }
}

/// A unit's events as one record: per event, its number, its length and its encoding; the
/// whole LZ4-compressed (JSON events shrink several times: this is most of what a commit
/// writes).
///
/// `scratch` holds the uncompressed bytes and `out` the record; both are kept from unit to
/// unit (a snapshot chunk's events are tens of MiB: fresh buffers each time cost more in
/// page faults than the copy itself).
fn encode_events_into(events: &[OutboxEvent], scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    scratch.clear();
    scratch.reserve(events.iter().map(|e| 40 + e.size()).sum());
    for e in events {
        scratch.extend_from_slice(&e.seq.to_le_bytes());
        let at = scratch.len();
        scratch.extend_from_slice(&[0; 4]);
        e.encode_into(scratch);
        let len = (scratch.len() - at - 4) as u32;
        scratch[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    // lz4_flex's "size prepended" block: the uncompressed size (u32 LE), then the block.
    out.clear();
    out.resize(
        4 + lz4_flex::block::get_maximum_output_size(scratch.len()),
        0,
    );
    out[..4].copy_from_slice(&(scratch.len() as u32).to_le_bytes());
    let n = lz4_flex::block::compress_into(scratch, &mut out[4..])
        .expect("the output has the block's maximum size");
    out.truncate(4 + n);
}

#[cfg(test)]
fn encode_events(events: &[OutboxEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_events_into(events, &mut Vec::new(), &mut out);
    out
}

fn decode_events(compressed: &[u8]) -> Option<Vec<OutboxEvent>> {
    // The size is the record's own word: a damaged one must not allocate gigabytes.
    let (size, body) = lz4_flex::block::uncompressed_size(compressed).ok()?;
    if size > 1 << 30 {
        return None;
    }
    let raw = lz4_flex::block::decompress(body, size).ok()?;
    let mut b = raw.as_slice();
    let mut out = Vec::new();
    while !b.is_empty() {
        let seq = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        out.push(OutboxEvent::decode(seq, take(&mut b, len as usize)?)?);
    }
    Some(out)
}

fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = (b.get(..n)?, b.get(n..)?);
    *b = rest;
    Some(head)
}

/// `None` if the bytes are cut; `Some(None)` for an absent value.
fn get_bytes(b: &mut &[u8]) -> Option<Option<Vec<u8>>> {
    let len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?);
    if len == u32::MAX {
        return Some(None);
    }
    Some(Some(take(b, len as usize)?.to_vec()))
}

/// A write of a unit, applied in order.
enum Op {
    Row(Arc<[u8]>, Option<StoredRow>),
    /// Every row of a table goes (a TRUNCATE).
    Truncate(String),
}

#[derive(Default)]
struct Unit {
    seq: u64,
    /// The position a complete transaction brings the capture to.
    lsn: Option<u64>,
    ops: Vec<Op>,
    meta: Vec<(String, Vec<u8>)>,
    events: Vec<OutboxEvent>,
    /// The bytes its rows and events hold (keys, JSON, values): what bounds a unit, with
    /// its event count.
    bytes: usize,
}

/// A batch of a table's rows: see [`Store::rows_batch`].
pub struct RowsBatch {
    /// Store key, key JSON, row.
    pub rows: Vec<(Vec<u8>, String, StoredRow)>,
    /// Where the next batch starts (`None`: the table is read to its end).
    pub next: Option<Vec<u8>>,
}

/// A unit just committed: its events are to be sent.
pub struct Committed {
    pub unit: u64,
    pub lsn: Option<u64>,
    pub events: Vec<OutboxEvent>,
}

#[derive(Debug, thiserror::Error)]
#[error("key-state store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn read_u64(b: Option<Vec<u8>>) -> u64 {
    b.and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
        .unwrap_or(0)
}

/// Closed units on their way into the file: see [`Store::begin_commit`].
pub struct CommitJob {
    db: Arc<Database>,
    units: Vec<Unit>,
    /// Acknowledged events to drop from the outbox, up to this one.
    clear: Option<u64>,
    /// The position the units' complete transactions reach, if it moves.
    reached: Option<u64>,
    next_event: u64,
    next_unit: u64,
    /// The store's buffers for outbox records, lent to the job.
    scratch: Vec<u8>,
    record: Vec<u8>,
}

impl CommitJob {
    /// Writes the units in one durable transaction. It blocks on the disk: in async code,
    /// run it on a blocking thread.
    pub fn write(mut self) -> Result<Self, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut rows = tx.open_table(ROWS).map_err(err)?;
            let mut meta = tx.open_table(META).map_err(err)?;
            let mut outbox = tx.open_table(OUTBOX).map_err(err)?;
            for unit in &self.units {
                write_ops(&mut rows, &unit.ops)?;
                for (name, value) in &unit.meta {
                    meta.insert(name.as_str(), value.as_slice()).map_err(err)?;
                }
                if let Some(last) = unit.events.last() {
                    encode_events_into(&unit.events, &mut self.scratch, &mut self.record);
                    outbox
                        .insert(last.seq, self.record.as_slice())
                        .map_err(err)?;
                    // A snapshot's chunks leave big buffers; streaming needs small ones.
                    for buf in [&mut self.scratch, &mut self.record] {
                        if buf.capacity() > 16 << 20 && buf.len() < buf.capacity() / 4 {
                            buf.shrink_to_fit();
                        }
                    }
                }
            }
            if let Some(seq) = self.clear {
                outbox.retain_in(..=seq, |_, _| false).map_err(err)?;
            }
            if let Some(lsn) = self.reached {
                meta.insert("store_lsn", lsn.to_le_bytes().as_slice())
                    .map_err(err)?;
            }
            meta.insert("next_event", self.next_event.to_le_bytes().as_slice())
                .map_err(err)?;
            meta.insert("next_unit", self.next_unit.to_le_bytes().as_slice())
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(self)
    }
}

pub struct Store {
    db: Arc<Database>,
    /// Closed units not yet committed, oldest first.
    closed: Vec<Unit>,
    open: Unit,
    /// The newest uncommitted state of each key a closed or open unit wrote: the unit,
    /// the write's number, the state.
    latest: HashMap<Arc<[u8]>, (u64, u64, Option<StoredRow>)>,
    /// Tables an uncommitted unit truncated: the unit and the write's number.
    truncated: HashMap<String, (u64, u64)>,
    next_unit: u64,
    next_op: u64,
    next_event: u64,
    store_lsn: u64,
    /// Events up to this one are acknowledged: they leave the outbox with the next commit.
    acked: u64,
    cleared: u64,
    /// The last event committed to the outbox.
    committed: u64,
    /// Buffers for a unit's outbox record, kept between commits.
    scratch: Vec<u8>,
    record: Vec<u8>,
    /// Random, made when the file is: see [`Store::id`].
    id: u64,
}

impl Store {
    /// Opens (or creates) the store in `dir`; `cache_bytes` bounds redb's page cache.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("state.redb"))
            .map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(ROWS).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.open_table(OUTBOX).map_err(err)?;
        tx.commit().map_err(err)?;
        let mut store = Self {
            db: Arc::new(db),
            closed: Vec::new(),
            open: Unit::default(),
            latest: HashMap::default(),
            truncated: HashMap::default(),
            next_unit: 1,
            next_op: 1,
            next_event: 1,
            store_lsn: 0,
            acked: 0,
            cleared: 0,
            committed: 0,
            scratch: Vec::new(),
            record: Vec::new(),
            id: 0,
        };
        store.id = match store.meta("store_id")? {
            Some(b) => read_u64(Some(b)),
            None => {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos()),
                );
                h.write_u32(std::process::id());
                let id = h.finish();
                let tx = store.db.begin_write().map_err(err)?;
                tx.open_table(META)
                    .map_err(err)?
                    .insert("store_id", id.to_le_bytes().as_slice())
                    .map_err(err)?;
                tx.commit().map_err(err)?;
                id
            }
        };
        store.store_lsn = read_u64(store.meta("store_lsn")?);
        store.next_event = read_u64(store.meta("next_event")?).max(1);
        // What a crashed run left in the outbox is sent again before anything new, and
        // acknowledged then: counted from here on.
        store.committed = store.next_event - 1;
        store.acked = store.committed;
        store.next_unit = read_u64(store.meta("next_unit")?).max(1);
        Ok(store)
    }

    /// The store's identity, random, made with its file: each event names the store that
    /// numbered it, so that a store can tell whether the topics went on without it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this store has never committed a unit (its event numbers start at 1).
    pub fn is_new(&self) -> Result<bool, StoreError> {
        Ok(self.meta("next_event")?.is_none())
    }

    /// Numbers the events from `seq + 1` on: for a new store whose topics already hold
    /// events numbered up to `seq` (by a store that was lost), so that a tail read after a
    /// crash never takes a new event for one the broker has. Kept with the first commit.
    pub fn number_events_after(&mut self, seq: u64) {
        if seq >= self.next_event {
            self.next_event = seq + 1;
            self.committed = seq;
            self.acked = seq;
        }
    }

    /// The position of the last complete transaction committed here: every transaction
    /// ending at or before it has its events in the outbox or the broker.
    pub fn store_lsn(&self) -> u64 {
        self.store_lsn
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<StoredRow>, StoreError> {
        let table = key.split(|&b| b == 0).next().unwrap_or_default();
        let truncated = std::str::from_utf8(table)
            .ok()
            .and_then(|t| self.truncated.get(t))
            .map(|&(_, op)| op);
        if let Some((_, op, row)) = self.latest.get(key) {
            if truncated.is_none_or(|t| *op > t) {
                return Ok(row.clone());
            }
        }
        if truncated.is_some() {
            // The file's rows of the table are older than the truncate.
            return Ok(None);
        }
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(ROWS).map_err(err)?;
        let v = t.get(key).map_err(err)?;
        Ok(v.and_then(|g| StoredRow::decode(g.value())))
    }

    /// A committed record (progress, counters).
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(META).map_err(err)?;
        let v = t.get(name).map_err(err)?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    /// Sets (or with `None` removes) a row in the open unit.
    pub fn put(&mut self, key: impl Into<Arc<[u8]>>, row: Option<StoredRow>) {
        let key = key.into();
        self.open.bytes += key.len() + row.as_ref().map_or(0, |r| r.json.len());
        let (unit, op) = (self.unit(), self.op());
        self.latest
            .insert(Arc::clone(&key), (unit, op, row.clone()));
        self.open.ops.push(Op::Row(key, row));
    }

    /// Makes room in the open unit for `rows` more rows and events (a snapshot chunk's:
    /// grown one at a time, the vectors' copies were a tenth of the applying thread).
    pub fn reserve(&mut self, rows: usize) {
        self.open.ops.reserve(rows);
        self.open.events.reserve(rows);
        self.latest.reserve(rows);
    }

    /// Removes every row of `table` in the open unit.
    pub fn truncate(&mut self, table: &str) {
        let (unit, op) = (self.unit(), self.op());
        self.truncated.insert(table.into(), (unit, op));
        self.open.ops.push(Op::Truncate(table.into()));
    }

    /// Records progress with the open unit.
    pub fn put_meta(&mut self, name: &str, value: Vec<u8>) {
        self.open.meta.push((name.into(), value));
    }

    /// Adds an event to the open unit; returns its sequence number.
    pub fn add_event(
        &mut self,
        topic: impl Into<Arc<str>>,
        partition: i32,
        key: Option<Bytes>,
        value: Option<Bytes>,
    ) -> u64 {
        let seq = self.next_event;
        self.next_event += 1;
        let unit = self.unit();
        self.open.bytes +=
            key.as_ref().map_or(0, Bytes::len) + value.as_ref().map_or(0, Bytes::len);
        self.open.events.push(OutboxEvent {
            seq,
            unit,
            topic: topic.into(),
            partition,
            key,
            value,
        });
        seq
    }

    fn op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    /// The open unit's number.
    pub fn unit(&mut self) -> u64 {
        if self.open.seq == 0 {
            self.open.seq = self.next_unit;
            self.next_unit += 1;
        }
        self.open.seq
    }

    /// Up to about `limit` rows, or `max_bytes` of them, of `table` as they stand now, in
    /// key order, after the store key `after` (from the table's first row without one): a
    /// table read a batch at a time, never whole. Returns the rows (store key, key JSON, row) and where the
    /// next batch starts, `None` once the table is read to its end.
    pub fn rows_batch(
        &self,
        table: &str,
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<RowsBatch, StoreError> {
        use std::ops::Bound;
        let mut prefix = table.as_bytes().to_vec();
        prefix.push(0);
        let mut end = table.as_bytes().to_vec();
        end.push(1);
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix.as_slice()),
        };
        let truncated = self.truncated.get(table).map(|&(_, op)| op);
        let mut out: std::collections::BTreeMap<Vec<u8>, StoredRow> = Default::default();
        // The last key read from the file when it has more: overlay rows past it belong
        // to a later batch.
        let mut bound: Option<Vec<u8>> = None;
        if truncated.is_none() {
            let tx = self.db.begin_read().map_err(err)?;
            let t = tx.open_table(ROWS).map_err(err)?;
            let range = t
                .range((start, Bound::Excluded(end.as_slice())))
                .map_err(err)?;
            let (mut read, mut bytes) = (0, 0);
            for entry in range {
                let (k, v) = entry.map_err(err)?;
                read += 1;
                bytes += v.value().len();
                if let Some(row) = StoredRow::decode(v.value()) {
                    out.insert(k.value().to_vec(), row);
                }
                if read >= limit || bytes >= max_bytes {
                    bound = Some(k.value().to_vec());
                    break;
                }
            }
        }
        for (key, (_, op, row)) in &self.latest {
            let past_start = match after {
                Some(a) => &key[..] > a,
                None => true,
            };
            if !key.starts_with(&prefix)
                || !past_start
                || bound.as_deref().is_some_and(|b| &key[..] > b)
                || truncated.is_some_and(|t| *op < t)
            {
                continue;
            }
            match row {
                Some(r) => out.insert(key.to_vec(), r.clone()),
                None => out.remove(&key[..]),
            };
        }
        let rows = out
            .into_iter()
            .map(|(k, r)| {
                let json = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                (k, json, r)
            })
            .collect();
        Ok(RowsBatch { rows, next: bound })
    }

    /// Events in the open unit.
    pub fn open_events(&self) -> usize {
        self.open.events.len()
    }

    /// Bytes the open unit's rows and events hold.
    pub fn open_bytes(&self) -> usize {
        self.open.bytes
    }

    /// Closes the open unit; `lsn` is the position a complete transaction reaches.
    pub fn close_unit(&mut self, lsn: Option<u64>) -> u64 {
        let seq = self.unit();
        let mut unit = std::mem::take(&mut self.open);
        unit.lsn = lsn;
        self.closed.push(unit);
        seq
    }

    /// Events in closed units, waiting for [`Store::commit`].
    pub fn uncommitted_events(&self) -> usize {
        self.closed.iter().map(|u| u.events.len()).sum()
    }

    /// Bytes the closed units waiting for [`Store::commit`] hold.
    pub fn uncommitted_bytes(&self) -> usize {
        self.closed.iter().map(|u| u.bytes).sum()
    }

    pub fn has_uncommitted(&self) -> bool {
        !self.closed.is_empty()
    }

    /// Commits every closed unit in one durable transaction: rows, progress, events into
    /// the outbox, the position reached. Returns the units, whose events may now be sent.
    pub fn commit(&mut self) -> Result<Vec<Committed>, StoreError> {
        match self.begin_commit() {
            None => Ok(Vec::new()),
            Some(job) => Ok(self.finish_commit(job.write()?)),
        }
    }

    /// Takes every closed unit for a commit that [`CommitJob::write`] makes durable, on
    /// another thread if the caller likes, while new units are written here; then
    /// [`Store::finish_commit`]. One job at a time, finished in order. `None`: nothing to
    /// commit.
    pub fn begin_commit(&mut self) -> Option<CommitJob> {
        if self.closed.is_empty() {
            return None;
        }
        let units = std::mem::take(&mut self.closed);
        let reached = units
            .iter()
            .filter_map(|u| u.lsn)
            .max()
            .filter(|&l| l > self.store_lsn);
        Some(CommitJob {
            db: Arc::clone(&self.db),
            clear: (self.acked > self.cleared).then_some(self.acked),
            reached,
            next_event: self.next_event,
            next_unit: self.next_unit,
            units,
            scratch: std::mem::take(&mut self.scratch),
            record: std::mem::take(&mut self.record),
        })
    }

    /// Takes a written job back: its units leave the overlay (the file has them now), and
    /// are returned, their events to be sent.
    pub fn finish_commit(&mut self, job: CommitJob) -> Vec<Committed> {
        let CommitJob {
            units,
            clear,
            reached,
            scratch,
            record,
            ..
        } = job;
        (self.scratch, self.record) = (scratch, record);
        if let Some(lsn) = reached {
            self.store_lsn = self.store_lsn.max(lsn);
        }
        if let Some(seq) = clear {
            self.cleared = self.cleared.max(seq);
        }
        if let Some(last) = units.iter().rev().find_map(|u| u.events.last()) {
            self.committed = last.seq;
            self.outbox_gauge();
        }
        let mut out = Vec::with_capacity(units.len());
        for mut unit in units {
            self.forget(&unit);
            out.push(Committed {
                unit: unit.seq,
                lsn: unit.lsn,
                events: std::mem::take(&mut unit.events),
            });
        }
        out
    }

    /// Drops a committed unit's overlay entries that no later unit replaced.
    fn forget(&mut self, unit: &Unit) {
        for op in &unit.ops {
            match op {
                Op::Row(key, _) => {
                    if self.latest.get(key).is_some_and(|(s, _, _)| *s == unit.seq) {
                        self.latest.remove(key);
                    }
                }
                Op::Truncate(table) => {
                    if self
                        .truncated
                        .get(table)
                        .is_some_and(|(s, _)| *s == unit.seq)
                    {
                        self.truncated.remove(table);
                    }
                }
            }
        }
    }

    /// Every event up to `seq` is acknowledged: they leave the outbox with the next commit
    /// (or [`Store::clear_acknowledged`]).
    pub fn acknowledged(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        self.outbox_gauge();
    }

    fn outbox_gauge(&self) {
        METRICS
            .cdc_outbox_events
            .set(self.committed.saturating_sub(self.acked) as i64);
    }

    /// Removes the acknowledged events from the outbox now (when idle, and on the way out).
    pub fn clear_acknowledged(&mut self) -> Result<(), StoreError> {
        if self.acked > self.cleared {
            self.clear_outbox(self.acked)?;
            self.cleared = self.acked;
        }
        Ok(())
    }

    /// Removes every event up to `seq` from the outbox.
    pub fn clear_outbox(&mut self, seq: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut outbox = tx.open_table(OUTBOX).map_err(err)?;
            outbox.retain_in(..=seq, |_, _| false).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(())
    }

    /// The events committed but never acknowledged (after a crash), in order.
    pub fn outbox(&self) -> Result<Vec<OutboxEvent>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            match decode_events(v.value()) {
                Some(events) => out.extend(events),
                None => {
                    return Err(StoreError(format!(
                        "the outbox record of the unit ending at event {} is damaged",
                        k.value()
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Forgets everything (the slot was created anew: nothing here matches it).
    pub fn reset(&mut self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            tx.open_table(ROWS)
                .map_err(err)?
                .retain(|_, _| false)
                .map_err(err)?;
            tx.open_table(OUTBOX)
                .map_err(err)?
                .retain(|_, _| false)
                .map_err(err)?;
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.remove("store_lsn").map_err(err)?;
            meta.remove("snapshot").map_err(err)?;
            meta.remove("partial").map_err(err)?;
            meta.remove("rebuilt").map_err(err)?;
            meta.remove("follow").map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.store_lsn = 0;
        Ok(())
    }

    /// The last event this store numbered (0: none): an event in the topics numbered past
    /// it was written by another store.
    pub fn last_numbered(&self) -> u64 {
        self.next_event - 1
    }

    /// Writes rows (or, `None`, removes them) straight into the file: for a store rebuilt
    /// from the topics, outside any unit. Not durable by itself (no fsync per batch):
    /// [`Store::adopt`]'s commit, which ends a rebuild, makes everything before it durable,
    /// and a rebuild cut short starts again from an empty store.
    pub fn load_rows(
        &mut self,
        rows: impl Iterator<Item = (Vec<u8>, Option<StoredRow>)>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(redb::Durability::None).map_err(err)?;
        {
            let mut t = tx.open_table(ROWS).map_err(err)?;
            let mut value = Vec::new();
            for (key, row) in rows {
                match row {
                    Some(r) => {
                        value.clear();
                        r.encode_into(&mut value);
                        t.insert(key.as_slice(), value.as_slice()).map_err(err)?;
                    }
                    None => {
                        t.remove(key.as_slice()).map_err(err)?;
                    }
                }
            }
        }
        tx.commit().map_err(err)
    }

    /// Removes the rows of `table` whose key JSON `pick` takes, straight from the file.
    pub fn remove_rows_where(
        &mut self,
        table: &str,
        mut pick: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut start = table.as_bytes().to_vec();
        start.push(0);
        let mut end = table.as_bytes().to_vec();
        end.push(1);
        let prefix = start.len();
        // Part of a rebuild, like `load_rows`: durable with `adopt`.
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(redb::Durability::None).map_err(err)?;
        {
            let mut t = tx.open_table(ROWS).map_err(err)?;
            t.retain_in(start.as_slice()..end.as_slice(), |k, _| {
                !pick(k.get(prefix..).unwrap_or_default())
            })
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Takes the position and the snapshot's progress of a store rebuilt from the topics,
    /// and numbers its events after `highest_seq`; committed at once.
    pub fn adopt(
        &mut self,
        store_lsn: u64,
        snapshot: Option<Vec<u8>>,
        rebuilt: Option<Vec<u8>>,
        highest_seq: u64,
    ) -> Result<(), StoreError> {
        self.number_events_after(highest_seq);
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            meta.insert("store_lsn", store_lsn.to_le_bytes().as_slice())
                .map_err(err)?;
            for (name, value) in [("snapshot", &snapshot), ("rebuilt", &rebuilt)] {
                match value {
                    Some(v) => meta.insert(name, v.as_slice()).map_err(err)?,
                    None => meta.remove(name).map_err(err)?,
                };
            }
            // A standby's fold no more: the store is the capture's now.
            meta.remove("follow").map_err(err)?;
            meta.insert("next_event", self.next_event.to_le_bytes().as_slice())
                .map_err(err)?;
            meta.insert("next_unit", self.next_unit.to_le_bytes().as_slice())
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.store_lsn = store_lsn;
        Ok(())
    }

    /// Writes (or, `None`, removes) a record of the meta table at once, durably: for a
    /// standby's fold of the topics (`follow.rs`), outside any unit.
    pub fn set_meta_now(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            match value {
                Some(v) => meta.insert(name, v).map_err(err)?,
                None => meta.remove(name).map_err(err)?,
            };
        }
        tx.commit().map_err(err)
    }

    /// Rows in the file (for the size-per-row figure).
    pub fn rows_on_disk(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(ROWS).map_err(err)?;
        t.len().map_err(err)
    }
}

fn write_ops(rows: &mut redb::Table<&[u8], &[u8]>, ops: &[Op]) -> Result<(), StoreError> {
    let mut value = Vec::new();
    for op in ops {
        match op {
            Op::Row(key, Some(r)) => {
                value.clear();
                r.encode_into(&mut value);
                rows.insert(&key[..], value.as_slice()).map_err(err)?;
            }
            Op::Row(key, None) => {
                rows.remove(&key[..]).map_err(err)?;
            }
            Op::Truncate(table) => {
                let mut start = table.as_bytes().to_vec();
                start.push(0);
                let mut end = table.as_bytes().to_vec();
                end.push(1);
                rows.retain_in(start.as_slice()..end.as_slice(), |_, _| false)
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: u64, j: &str) -> Option<StoredRow> {
        Some(StoredRow {
            version: v,
            regime: StoredRow::STREAMED,
            json: j.into(),
        })
    }

    /// A store directory of a test's own, removed when the test ends (passed or failed).
    struct TempDir(std::path::PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl AsRef<std::path::Path> for TempDir {
        fn as_ref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp() -> TempDir {
        TempDir(std::env::temp_dir().join(format!("chgate-store-{}", uuid::Uuid::new_v4())))
    }

    #[test]
    fn only_committed_units_survive_a_crash_and_their_events_wait_in_the_outbox() {
        let dir = temp();
        {
            let mut s = Store::open(&dir, 1 << 20).unwrap();
            s.put(b"t\0k1".to_vec(), row(1, "{\"a\":1}"));
            s.add_event(
                "topic",
                2,
                Some(Bytes::from_static(b"k1")),
                Some(Bytes::from_static(b"v1")),
            );
            s.close_unit(Some(100));
            let committed = s.commit().unwrap();
            assert_eq!(committed.len(), 1);
            assert_eq!(committed[0].events[0].partition, 2);
            s.put(b"t\0k1".to_vec(), row(2, "{\"a\":2}"));
            s.put(b"t\0k2".to_vec(), row(2, "{\"b\":1}"));
            s.add_event("topic", 0, Some(Bytes::from_static(b"k2")), None);
            s.close_unit(Some(200));
            // Reads see the newest state, committed or not.
            assert_eq!(s.get(b"t\0k1").unwrap(), row(2, "{\"a\":2}"));
            // A crash now: the second unit is lost with the process.
        }
        let mut s = Store::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.store_lsn(), 100);
        assert_eq!(s.get(b"t\0k1").unwrap(), row(1, "{\"a\":1}"));
        assert_eq!(s.get(b"t\0k2").unwrap(), None);
        let outbox = s.outbox().unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].value.as_deref(), Some(&b"v1"[..]));
        // Sequence numbers go on where they stopped.
        assert_eq!(s.add_event("topic", 0, None, None), 2);
        s.clear_outbox(1).unwrap();
        assert!(s.outbox().unwrap().is_empty());
        std::fs::remove_dir_all(dir).ok();
    }

    /// Every row of `table`, read `limit` at a time: their key JSON.
    fn all_rows(s: &Store, table: &str, limit: usize) -> Vec<String> {
        rows_after(s, table, None, limit)
    }

    fn rows_after(s: &Store, table: &str, mut after: Option<Vec<u8>>, limit: usize) -> Vec<String> {
        let mut keys = Vec::new();
        loop {
            let batch = s
                .rows_batch(table, after.as_deref(), limit, usize::MAX)
                .unwrap();
            keys.extend(batch.rows.into_iter().map(|(_, k, _)| k));
            match batch.next {
                Some(n) => after = Some(n),
                None => return keys,
            }
        }
    }

    #[test]
    fn a_table_is_read_in_batches_with_the_open_writes_on_top() {
        let dir = temp();
        let mut s = Store::open(&dir, 1 << 20).unwrap();
        for k in ["a", "b", "c", "d", "e", "f", "g"] {
            s.put(format!("t\0{k}").into_bytes(), row(1, "1"));
        }
        s.put(b"s\0a".to_vec(), row(1, "1"));
        s.put(b"u\0a".to_vec(), row(1, "1"));
        s.close_unit(Some(10));
        s.commit().unwrap();
        // Uncommitted: one row gone, two new (one between committed rows, one past them).
        s.put(b"t\0c".to_vec(), None);
        s.put(b"t\0bb".to_vec(), row(2, "2"));
        s.put(b"t\0z".to_vec(), row(2, "2"));
        let want = ["a", "b", "bb", "d", "e", "f", "g", "z"];
        for limit in [1, 2, 3, 1000] {
            assert_eq!(all_rows(&s, "t", limit), want, "{limit} at a time");
        }
        // Bounded by bytes: a row (10 bytes here) at a time.
        assert_eq!(s.rows_batch("t", None, 1000, 1).unwrap().rows.len(), 1);
        // Rows deleted as they are read (a truncate's batches) are not read again.
        let first = s.rows_batch("t", None, 2, usize::MAX).unwrap();
        for (key, _, _) in &first.rows {
            s.put(key.clone(), None);
        }
        let rest = rows_after(&s, "t", first.next, 2);
        assert_eq!(rest, ["bb", "d", "e", "f", "g", "z"]);
        // The bytes the open unit holds are counted.
        assert!(s.open_bytes() > 0);
        s.close_unit(None);
        assert_eq!(s.open_bytes(), 0);
        assert!(s.uncommitted_bytes() > 0);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_truncate_hides_older_rows_and_not_newer_ones() {
        let dir = temp();
        let mut s = Store::open(&dir, 1 << 20).unwrap();
        s.put(b"t\0a".to_vec(), row(1, "1"));
        s.put(b"u\0a".to_vec(), row(1, "1"));
        s.close_unit(Some(10));
        s.commit().unwrap();
        s.truncate("t");
        assert_eq!(s.get(b"t\0a").unwrap(), None);
        s.put(b"t\0b".to_vec(), row(2, "2"));
        assert_eq!(s.get(b"t\0b").unwrap(), row(2, "2"));
        assert_eq!(all_rows(&s, "t", 1000).len(), 1);
        s.close_unit(Some(20));
        s.commit().unwrap();
        assert_eq!(s.get(b"t\0a").unwrap(), None);
        s.put(b"t\0c".to_vec(), row(3, "3"));
        assert_eq!(all_rows(&s, "t", 1000), ["b", "c"]);
        assert_eq!(s.get(b"u\0a").unwrap(), row(1, "1"));
        assert_eq!(s.rows_on_disk().unwrap(), 2);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_rebuilt_store_takes_rows_position_and_numbers_after_the_topics() {
        let dir = temp();
        {
            let mut s = Store::open(&dir, 1 << 20).unwrap();
            s.load_rows(
                [
                    (b"t\0{\"id\":1}".to_vec(), row(5, "1")),
                    (b"t\0{\"id\":2}".to_vec(), row(6, "2")),
                    (b"t\0{\"id\":3}".to_vec(), row(7, "3")),
                    (b"u\0{\"id\":2}".to_vec(), row(8, "u2")),
                ]
                .into_iter(),
            )
            .unwrap();
            s.load_rows([(b"t\0{\"id\":3}".to_vec(), None)].into_iter())
                .unwrap();
            // A truncate in one partition: the rows whose keys go there leave, only them.
            s.remove_rows_where("t", |key| key == b"{\"id\":2}")
                .unwrap();
            s.adopt(40, Some(b"{}".to_vec()), Some(b"[]".to_vec()), 77)
                .unwrap();
        }
        let s = Store::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.get(b"t\0{\"id\":1}").unwrap(), row(5, "1"));
        assert_eq!(s.get(b"t\0{\"id\":2}").unwrap(), None);
        assert_eq!(s.get(b"t\0{\"id\":3}").unwrap(), None);
        assert_eq!(s.get(b"u\0{\"id\":2}").unwrap(), row(8, "u2"));
        assert_eq!(s.store_lsn(), 40);
        assert_eq!(s.last_numbered(), 77);
        assert_eq!(s.meta("snapshot").unwrap(), Some(b"{}".to_vec()));
        assert_eq!(s.meta("rebuilt").unwrap(), Some(b"[]".to_vec()));
        assert!(!s.is_new().unwrap());
    }

    #[test]
    fn a_units_events_round_trip_in_one_record() {
        let events: Vec<OutboxEvent> = (1..4)
            .map(|seq| OutboxEvent {
                seq,
                unit: 9,
                topic: "t".into(),
                partition: seq as i32,
                key: Some(Bytes::from(vec![seq as u8])),
                value: (seq != 2).then(|| Bytes::from_static(b"v")),
            })
            .collect();
        let blob = encode_events(&events);
        // lz4_flex's size-prepended block, as records written before the buffers were kept.
        assert!(lz4_flex::block::decompress_size_prepended(&blob).is_ok());
        assert_eq!(decode_events(&blob), Some(events));
        assert!(decode_events(&blob[..blob.len() - 1]).is_none());
    }

    #[test]
    fn damaged_outbox_bytes_are_an_error() {
        let e = OutboxEvent {
            seq: 1,
            unit: 1,
            topic: "t".into(),
            partition: 0,
            key: None,
            value: Some(Bytes::from_static(b"x")),
        };
        let bytes = e.encode();
        assert_eq!(OutboxEvent::decode(1, &bytes), Some(e));
        for cut in 0..bytes.len() {
            assert!(OutboxEvent::decode(1, &bytes[..cut]).is_none());
        }
    }
}
