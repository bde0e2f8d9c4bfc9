//! Cutting a partition's messages into segments: a segment is a contiguous offset range of
//! one partition, encoded into one RowBinary part per target shard (one part in `random`
//! mode, where the picker chooses the shard; one per shard the keys hash to in `key`
//! mode), plus the messages that could not become rows. A segment is cut by rows, bytes or
//! age, whichever comes first, and its offsets are committed only after every part is in.
//!
//! Everything about a segment is a function of its messages and its `clock` (the instant
//! the time window is measured from), so the same range rebuilt after a crash gives the
//! same parts byte for byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::Sharding;
use super::pending::{Ceiling, Reservation};
use super::shard_key;
use super::template::{RowError, Template, Window, NEW_COLUMNS};
use crate::kafka::DeadLetter;
use crate::sink::Rows;

pub use super::message::Message;

/// Rows for one shard.
#[derive(Debug, Default)]
pub struct Part {
    /// The 1-based shard; `None` lets the picker choose (random sharding).
    pub shard: Option<u32>,
    pub rows: Rows,
    /// The offset of each row's message (should ClickHouse refuse a row, its original is
    /// read again from the partition for the dead-letter topic: parsed messages are not
    /// kept, a row costs ~20 times less memory than its JSON). A message of several rows
    /// (a Debezium update) has its offset once per row, its rows side by side.
    pub offsets: Vec<i64>,
}

impl Part {
    pub fn rows(&self) -> usize {
        self.rows.rows()
    }
}

#[derive(Debug)]
pub struct Segment {
    pub task: usize,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    /// Unix seconds the time window was measured from.
    pub clock: i64,
    pub parts: Vec<Part>,
    pub dead: Vec<DeadLetter>,
    /// What this segment holds against the memory ceiling (rows as encoded, dead letters
    /// whole), given back when it is dropped: written, abandoned or revoked.
    pub reserved: Reservation,
    /// A segment rebuilt from an unfinished intent: its shard and clock are the recorded
    /// ones, and its intent is already in ZooKeeper.
    pub replay: bool,
    /// The template that encoded every row of it: the task's, or one extended with new
    /// columns (then the insert names them, and the table must have them first).
    pub template: Arc<Template>,
}

/// What a task's batches need to know, fixed at start.
pub struct TaskSpec {
    pub template: Arc<Template>,
    pub sharding: Sharding,
    pub key_column: Option<usize>,
    /// The cluster's shard numbers, for `key` sharding.
    pub shards: Vec<u32>,
    /// (column, max age, max future) of the time window.
    pub window: Option<(usize, Duration, Duration)>,
    pub batch_rows: usize,
    pub batch_bytes: usize,
    pub batch_age: Duration,
}

impl Segment {
    /// Bytes held against the memory ceiling.
    pub fn bytes(&self) -> usize {
        self.reserved.bytes()
    }
}

impl TaskSpec {
    /// The shard a key goes to (see [`shard_key`]: stored-data policy).
    pub fn shard_for(&self, key: &[u8]) -> u32 {
        shard_key::shard_for(key, &self.shards)
    }
}

struct Open {
    /// The offset the segment must end at (a replay).
    ends_at: Option<i64>,
    first: i64,
    last: i64,
    clock: i64,
    opened: Instant,
    parts: Vec<Part>,
    dead: Vec<DeadLetter>,
    rows: usize,
    reserved: Reservation,
}

/// Memory a row holds besides its encoded bytes: its end and its offset.
const ROW_OVERHEAD: usize = 2 * std::mem::size_of::<u64>();

/// One partition's open segment.
pub struct Batcher {
    spec: Arc<TaskSpec>,
    task: usize,
    partition: i32,
    /// The memory ceiling: a message holds its payload until it is added here, then the
    /// segment holds what it keeps of it.
    ceiling: &'static Ceiling,
    open: Option<Open>,
    key: Vec<u8>,
    /// A message's rows being encoded before their shard is known (key sharding), reused.
    rows: Rows,
    /// The template rows are encoded with: the task's until a message brings new columns
    /// (`new_columns = "add"`), then the task's extended by them, from a new segment on.
    template: Arc<Template>,
    /// A segment closed ahead of a message that brought new columns, for the worker to
    /// hand on before whatever `add` returns.
    ready: Option<Segment>,
}

/// Keeps a message the template refused as a dead letter of the open segment.
fn set_aside(open: &mut Open, msg: Message, e: RowError) {
    let kept = msg.payload().len() + msg.key().map_or(0, <[u8]>::len) + e.message.len();
    open.reserved.grow(kept);
    let (partition, offset) = (msg.partition, msg.offset);
    let (key, payload) = msg.into_parts();
    open.dead.push(DeadLetter {
        partition,
        offset,
        key,
        payload,
        reason: e.kind,
        error: e.message,
    });
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Batcher {
    pub fn new(
        spec: Arc<TaskSpec>,
        task: usize,
        partition: i32,
        ceiling: &'static Ceiling,
    ) -> Self {
        Self {
            template: spec.template.clone(),
            spec,
            task,
            partition,
            ceiling,
            open: None,
            key: Vec::new(),
            rows: Rows::default(),
            ready: None,
        }
    }

    /// Adds a message; returns the segment if it is now full.
    pub fn add(&mut self, msg: Message) -> Option<Segment> {
        self.add_inner(msg, None, None)
    }

    /// [`Self::add`] with the clock a new segment starts from (tests, and rebuilding a
    /// segment after a crash).
    pub fn add_at(&mut self, msg: Message, clock: i64) -> Option<Segment> {
        self.add_inner(msg, Some(clock), None)
    }

    /// Adds a message of an unfinished segment being rebuilt: the segment takes the
    /// recorded clock and shard, and is cut exactly at `last`.
    pub fn add_replay(
        &mut self,
        msg: Message,
        clock: i64,
        shard: Option<u32>,
        last: i64,
    ) -> Option<Segment> {
        self.add_inner(msg, Some(clock), Some((shard, last)))
    }

    /// True while a rebuilt segment is open.
    pub fn replaying(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.ends_at.is_some())
    }

    /// A segment closed ahead of a message that brought new columns: hand it on before
    /// what the `add` returned.
    pub fn take_ready(&mut self) -> Option<Segment> {
        self.ready.take()
    }

    /// `clock`: the instant a segment opened by this message measures its window from
    /// (`None`: now, read only when a segment opens).
    fn add_inner(
        &mut self,
        msg: Message,
        clock: Option<i64>,
        replay: Option<(Option<u32>, i64)>,
    ) -> Option<Segment> {
        let spec = &*self.spec;
        let template = &*self.template;
        let ceiling = self.ceiling;
        let open = self.open.get_or_insert_with(|| Open {
            ends_at: replay.map(|(_, last)| last),
            first: msg.offset,
            last: msg.offset,
            clock: clock.unwrap_or_else(unix_now),
            opened: Instant::now(),
            parts: match spec.sharding {
                Sharding::Random => vec![Part {
                    shard: replay.and_then(|(shard, _)| shard),
                    ..Default::default()
                }],
                Sharding::Key => spec
                    .shards
                    .iter()
                    .map(|&s| Part {
                        shard: Some(s),
                        ..Default::default()
                    })
                    .collect(),
            },
            dead: Vec::new(),
            rows: 0,
            reserved: ceiling.reserve(0),
        });
        let last_before = open.last;
        open.last = msg.offset;
        let encoded_before: usize = open.parts.iter().map(|p| p.rows.data.len()).sum();
        let window = spec.window.map(|(column, age, future)| Window {
            column,
            min: open.clock - age.as_secs() as i64,
            max: open.clock + future.as_secs() as i64,
        });
        // Encode into scratch rows first when the shard depends on the key.
        let result = match spec.sharding {
            Sharding::Random => template
                .encode_rows(
                    msg.key(),
                    msg.payload(),
                    &mut open.parts[0].rows,
                    window,
                    None,
                    &mut self.key,
                )
                .map(|n| (0, n)),
            Sharding::Key => {
                self.rows.clear();
                template
                    .encode_rows(
                        msg.key(),
                        msg.payload(),
                        &mut self.rows,
                        window,
                        spec.key_column,
                        &mut self.key,
                    )
                    .map(|n| {
                        let shard = spec.shard_for(&self.key);
                        let i = spec.shards.iter().position(|&s| s == shard).unwrap_or(0);
                        open.parts[i].rows.append(&self.rows);
                        (i, n)
                    })
            }
        };
        let encoded: usize = open.parts.iter().map(|p| p.rows.data.len()).sum();
        // The segment takes on what it keeps before the message (dropped here) gives its
        // payload back: the held total never dips below what is really held.
        match result {
            Ok((i, n)) => {
                // Invariant: one offset per row (a message of no rows, a tombstone, leaves
                // none; its offset is still in the segment's range, committed with it).
                let part = &mut open.parts[i];
                part.offsets.resize(part.offsets.len() + n, msg.offset);
                open.rows += n;
                open.reserved
                    .grow(encoded - encoded_before + n * ROW_OVERHEAD);
                drop(msg);
            }
            Err(e) if e.kind == NEW_COLUMNS => {
                let adds = template.new_fields(msg.payload());
                if replay.is_none() && !adds.is_empty() {
                    return self.extend_for(msg, clock, last_before, adds);
                }
                // A segment being rebuilt keeps the template it had (the table had every
                // column it wrote when it was recorded): a field new to it goes aside.
                let e = RowError {
                    kind: "column",
                    message: format!(
                        "field(s) {} have no column in the table, and a segment being rebuilt cannot add them",
                        e.message
                    ),
                };
                set_aside(open, msg, e);
            }
            Err(e) => set_aside(open, msg, e),
        }
        let full = match open.ends_at {
            // A rebuilt segment ends where it ended before, whatever the limits say.
            Some(end) => open.last >= end,
            None => open.rows >= spec.batch_rows || encoded >= spec.batch_bytes,
        };
        if full {
            self.seal()
        } else {
            None
        }
    }

    /// True once the open segment is older than the task's batch age (never for a
    /// rebuilt segment: it ends at its recorded offset).
    pub fn due(&self, now: Instant) -> bool {
        self.open.as_ref().is_some_and(|o| {
            o.ends_at.is_none() && now.duration_since(o.opened) >= self.spec.batch_age
        })
    }

    /// `msg` has fields the template has no column for: the open segment is closed before
    /// it (into `ready`), the template extended by them, and `msg` added again: it starts
    /// the first segment of the wider template.
    fn extend_for(
        &mut self,
        msg: Message,
        clock: Option<i64>,
        last_before: i64,
        adds: Vec<(String, crate::clickhouse::types::ColumnType)>,
    ) -> Option<Segment> {
        if let Some(open) = self.open.as_mut() {
            if open.first == msg.offset {
                // Opened for this message: nothing of it to keep.
                self.open = None;
            } else {
                open.last = last_before;
                self.ready = self.seal();
            }
        }
        tracing::info!(
            partition = self.partition,
            offset = msg.offset,
            columns = %adds.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", "),
            "New columns in the events: the table gets them before the next segment is written"
        );
        self.template = Arc::new(self.template.extended(&adds));
        self.add_inner(msg, clock, None)
    }

    /// Drops the open segment unwritten (its memory reservation goes with it).
    pub fn abandon(&mut self) {
        self.open = None;
    }

    /// Closes the open segment, if any.
    pub fn seal(&mut self) -> Option<Segment> {
        let open = self.open.take()?;
        Some(Segment {
            replay: open.ends_at.is_some(),
            task: self.task,
            partition: self.partition,
            first: open.first,
            last: open.last,
            clock: open.clock,
            parts: open.parts.into_iter().filter(|p| p.rows() > 0).collect(),
            dead: open.dead,
            reserved: open.reserved,
            template: self.template.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::types::ColumnType;
    use crate::ingest::template::TemplateConfig;

    fn spec(sharding: Sharding, rows: usize) -> Arc<TaskSpec> {
        let table: Vec<(String, ColumnType)> = vec![
            ("ts".into(), ColumnType::DateTime),
            ("user_id".into(), ColumnType::UInt64),
        ];
        let c: TemplateConfig = toml::from_str("format = \"json\"").unwrap();
        let template = Arc::new(Template::compile(&c, &table).unwrap());
        Arc::new(TaskSpec {
            key_column: template.column_index("user_id"),
            template,
            sharding,
            shards: vec![1, 2],
            window: Some((0, Duration::from_secs(100), Duration::from_secs(10))),
            batch_rows: rows,
            batch_bytes: 1 << 20,
            batch_age: Duration::from_millis(50),
        })
    }

    fn msg(offset: i64, text: &str) -> Message {
        Message::owned(0, 3, offset, None, text.as_bytes().to_vec())
    }

    #[test]
    fn cuts_by_rows_and_keeps_bad_messages_aside() {
        let mut b = Batcher::new(spec(Sharding::Random, 3), 0, 3, Ceiling::leak());
        assert!(b
            .add_at(msg(10, r#"{"ts": 1000, "user_id": 1}"#), 1000)
            .is_none());
        assert!(b.add_at(msg(11, "garbage"), 1000).is_none());
        assert!(b
            .add_at(msg(12, r#"{"ts": 5000, "user_id": 1}"#), 1000)
            .is_none());
        assert!(b
            .add_at(msg(13, r#"{"ts": 990, "user_id": 2}"#), 1000)
            .is_none());
        let s = b
            .add_at(msg(14, r#"{"ts": 1001, "user_id": 3}"#), 1000)
            .unwrap();
        assert_eq!((s.first, s.last, s.partition), (10, 14, 3));
        assert_eq!(s.parts.len(), 1);
        assert_eq!(s.parts[0].rows(), 3);
        assert_eq!(s.parts[0].offsets, [10, 13, 14]);
        let reasons: Vec<_> = s.dead.iter().map(|d| (d.offset, d.reason)).collect();
        assert_eq!(reasons, [(11, "parse"), (12, "time_window")]);
        assert_eq!(s.parts[0].rows.slice(1, 2).len(), 12);
        assert!(b.seal().is_none());
    }

    #[test]
    fn key_sharding_sends_each_key_to_one_shard_and_is_deterministic() {
        let spec = spec(Sharding::Key, 1000);
        let build = || {
            let mut b = Batcher::new(spec.clone(), 0, 0, Ceiling::leak());
            for i in 0..200 {
                b.add_at(
                    msg(i, &format!(r#"{{"ts": 1000, "user_id": {}}}"#, i % 17)),
                    1000,
                );
            }
            b.seal().unwrap()
        };
        let s = build();
        assert_eq!(s.parts.len(), 2, "17 keys over 2 shards use both");
        let rows: usize = s.parts.iter().map(Part::rows).sum();
        assert_eq!(rows, 200);
        for k in 0..17u64 {
            let shard = spec.shard_for(k.to_string().as_bytes());
            let part = s.parts.iter().find(|p| p.shard == Some(shard)).unwrap();
            let mine = part
                .offsets
                .iter()
                .filter(|o| (**o as u64) % 17 == k)
                .count();
            let want = (0..200).filter(|i| i % 17 == k).count();
            assert_eq!(mine, want, "key {k} is all on shard {shard}");
        }
        let again = build();
        for (a, b) in s.parts.iter().zip(&again.parts) {
            assert_eq!(
                a.rows.data, b.rows.data,
                "the same messages and clock give the same bytes"
            );
        }
    }

    #[test]
    fn a_replayed_segment_is_rebuilt_byte_for_byte() {
        let spec = spec(Sharding::Random, 2);
        let mut b = Batcher::new(spec.clone(), 0, 3, Ceiling::leak());
        let first = b.add_at(msg(10, r#"{"ts": 1000, "user_id": 1}"#), 1000);
        assert!(first.is_none());
        let original = b
            .add_at(msg(11, r#"{"ts": 1005, "user_id": 2}"#), 1000)
            .unwrap();
        // Rebuilt later, at another time and with other limits in force: same bytes.
        let mut again = Batcher::new(spec, 0, 3, Ceiling::leak());
        assert!(again
            .add_replay(msg(10, r#"{"ts": 1000, "user_id": 1}"#), 1000, Some(2), 11)
            .is_none());
        assert!(again.replaying());
        assert!(!again.due(Instant::now() + Duration::from_secs(60)));
        let rebuilt = again
            .add_replay(msg(11, r#"{"ts": 1005, "user_id": 2}"#), 1000, Some(2), 11)
            .unwrap();
        assert!(rebuilt.replay);
        assert_eq!(rebuilt.parts[0].shard, Some(2));
        assert_eq!(rebuilt.parts[0].rows.data, original.parts[0].rows.data);
        assert_eq!((rebuilt.first, rebuilt.last, rebuilt.clock), (10, 11, 1000));
    }

    fn debezium_spec(rows: usize) -> Arc<TaskSpec> {
        let table: Vec<(String, ColumnType)> = vec![
            ("id".into(), ColumnType::Int64),
            ("status".into(), ColumnType::String),
            ("sign".into(), ColumnType::Int8),
            ("version".into(), ColumnType::UInt64),
        ];
        let c: TemplateConfig =
            toml::from_str("format = \"debezium\"\nengine = \"versioned_collapsing\"").unwrap();
        Arc::new(TaskSpec {
            template: Arc::new(Template::compile(&c, &table).unwrap()),
            sharding: Sharding::Key,
            key_column: None,
            shards: vec![1, 2],
            window: None,
            batch_rows: rows,
            batch_bytes: 1 << 20,
            batch_age: Duration::from_millis(50),
        })
    }

    /// A change of row `id` as the topic carries it: key, envelope.
    fn change(offset: i64, id: u64, op: &str, version: u64) -> Message {
        let row = |v: u64| format!(r#"{{"id": {id}, "status": "s{v}"}}"#);
        let (before, after) = match op {
            "c" => ("null".to_string(), row(version)),
            "u" => (row(version - 1), row(version)),
            _ => (row(version - 1), "null".to_string()),
        };
        let brv = if op == "c" {
            "null".to_string()
        } else {
            (version - 1).to_string()
        };
        let value = format!(
            r#"{{"op": "{op}", "before": {before}, "after": {after}, "source": {{"row_version": {version}, "before_row_version": {brv}}}}}"#
        );
        let key = format!(r#"{{"id":{id}}}"#).into_bytes();
        Message::owned(0, 3, offset, Some(key), value.into_bytes())
    }

    /// 60 messages over 6 keys: creates, updates (two rows each), deletes, tombstones and
    /// one malformed envelope.
    fn changes() -> Vec<Message> {
        let mut out = Vec::new();
        for offset in 0..60i64 {
            let id = (offset % 6) as u64;
            let round = (offset / 6) as u64;
            out.push(match round {
                0 => change(offset, id, "c", 1),
                7 if id == 0 => Message::owned(0, 3, offset, None, b"{\"op\": \"u\"}".to_vec()),
                8 => change(offset, id, "d", round + 1),
                9 => Message::owned(
                    0,
                    3,
                    offset,
                    Some(format!("{{\"id\":{id}}}").into_bytes()),
                    Vec::new(),
                ),
                _ => change(offset, id, "u", round + 1),
            });
        }
        out
    }

    #[test]
    fn a_change_of_two_rows_keeps_them_together_on_its_keys_shard() {
        let spec = debezium_spec(1000);
        let mut b = Batcher::new(spec.clone(), 0, 3, Ceiling::leak());
        for m in changes() {
            assert!(b.add_at(m, 1000).is_none());
        }
        let s = b.seal().unwrap();
        assert_eq!((s.first, s.last), (0, 59), "tombstones are in the range");
        let dead: Vec<_> = s.dead.iter().map(|d| (d.offset, d.reason)).collect();
        assert_eq!(dead, [(42, "envelope")]);
        // 6 creates, 41 updates of 2 rows, 6 deletes; 6 tombstones make none.
        let rows: usize = s.parts.iter().map(Part::rows).sum();
        assert_eq!(rows, 6 + 41 * 2 + 6);
        for part in &s.parts {
            assert_eq!(part.offsets.len(), part.rows());
            for (i, offset) in part.offsets.iter().enumerate() {
                let shard = spec.shard_for(format!("{{\"id\":{}}}", offset % 6).as_bytes());
                assert_eq!(part.shard, Some(shard), "offset {offset}: its key's shard");
                let update = (6..48).contains(offset);
                let glued = part.rows.glued.binary_search(&i).is_ok();
                let first_of_pair = update
                    && part.offsets.get(i + 1) == Some(offset)
                    && (i == 0 || part.offsets[i - 1] != *offset);
                assert_eq!(glued, first_of_pair, "row {i} (offset {offset})");
                if first_of_pair {
                    assert_eq!(part.rows.split_point(i, i + 2), None);
                }
            }
        }
        // Rebuilt after a crash, it is the same bytes, glue included.
        let mut again = Batcher::new(spec, 0, 3, Ceiling::leak());
        let mut rebuilt = None;
        for m in changes() {
            rebuilt = again.add_replay(m, 1000, None, 59);
        }
        let rebuilt = rebuilt.expect("cut at 59");
        for (a, b) in s.parts.iter().zip(&rebuilt.parts) {
            assert_eq!(
                (&a.rows.data, &a.rows.row_ends, &a.rows.glued),
                (&b.rows.data, &b.rows.row_ends, &b.rows.glued)
            );
            assert_eq!(a.offsets, b.offsets);
        }
    }

    #[test]
    fn cuts_by_age() {
        let mut b = Batcher::new(spec(Sharding::Random, 1000), 0, 0, Ceiling::leak());
        assert!(!b.due(Instant::now()));
        b.add_at(msg(1, r#"{"ts": 1000}"#), 1000);
        assert!(!b.due(Instant::now()));
        assert!(b.due(Instant::now() + Duration::from_millis(60)));
    }

    #[test]
    fn holds_what_it_keeps_of_a_message_not_the_message() {
        let ceiling = Ceiling::leak();
        let mut b = Batcher::new(spec(Sharding::Random, 1000), 0, 0, ceiling);
        let padding = "x".repeat(700);
        let mut consumed = 0;
        for i in 0..100 {
            // Held from the moment the consumer takes it, as the consumer does.
            let m = msg(
                i,
                &format!(r#"{{"ts": 1000, "user_id": {i}, "pad": "{padding}"}}"#),
            )
            .reserve(ceiling);
            consumed += m.payload().len();
            b.add_at(m, 1000);
        }
        b.add_at(msg(100, "not json").reserve(ceiling), 1000);
        let held = ceiling.held();
        // 100 rows of 12 bytes (+ their bookkeeping) and one dead letter, not 70 KB of JSON.
        assert!(held < consumed / 10, "{held} of {consumed}");
        let s = b.seal().unwrap();
        assert_eq!(s.bytes(), held);
        drop(s);
        assert_eq!(ceiling.held(), 0, "a segment dropped gives everything back");
    }
}
