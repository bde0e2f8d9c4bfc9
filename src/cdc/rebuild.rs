//! A key-state store rebuilt from the topics, for an instance whose store did not write
//! them: a standby taking over on another machine (its own `state_dir`), a former leader
//! whose store fell behind while another led, a `state_dir` that was lost.
//!
//! The topics hold every event the capture published, each partition a gap-free prefix of
//! what was sent to it, and every key's events in its one partition, in order. So the
//! last event of each key is its last published state: its `after` (byte for byte the
//! stored row) and `source.row_version` (the stored version), or, for a delete, no row.
//! Folding the topics gives the store its leader had, minus what it had not sent.
//!
//! What comes next is the slot's: the stream resumes at its confirmed position, and the
//! server sends again every transaction after it, some of which the topics already hold,
//! wholly or in part (the old leader died with them in flight). [`Rebuilt`] says which
//! changes those are: a change is in the topics if its key's last event there is at or
//! past its version (a key's events are in order), or a truncate at or past it went to its
//! partition. Those are skipped, the others published: nothing twice, nothing lost.
//!
//! The snapshot cannot be rebuilt so: a chunk in flight when the leader died is partly in
//! the topics, and nothing says which rows. So the capture keeps a record per slot in a
//! state topic ([`record_state`]): the snapshot as planned, before any of its rows is
//! published, a reconcile as it starts, and done, once it is acknowledged. A table whose
//! topic holds events that the record does not say done is reconciled
//! (`capture/reconcile.rs`); without any record the rebuild is refused, saying what would
//! let it go on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::envelope::TableEnvelope;
use super::producer::SEQ_HEADER;
use super::snapshot::SnapshotState;
use super::store::{row_key_into, Store, StoredRow};
use super::tail::{read_partitions, OffsetGone, Quiet, Start};
use crate::kafka::client_config;
use crate::kafka::partition::partition_for_key;

/// A captured table's topic, as the fold needs it.
pub struct TopicOf {
    pub topic: String,
    /// `schema.table`: the store's key prefix.
    pub table: String,
    pub envelope: Arc<TableEnvelope>,
    pub partitions: i32,
}

/// The captured tables' topics, as a fold of them needs them.
pub fn topics_of(
    cfg: &super::config::ValidatedCdc,
    schemas: &[super::catalog::TableSchema],
    partitions: impl Fn(&str) -> i32,
) -> Vec<TopicOf> {
    let c = &cfg.config;
    schemas
        .iter()
        .map(|s| {
            let topic = cfg.topic(&s.schema, &s.name);
            TopicOf {
                envelope: Arc::new(TableEnvelope::new(
                    &c.capture.name,
                    &c.postgres.dbname,
                    s,
                    &topic,
                )),
                partitions: partitions(&topic),
                topic,
                table: s.full_name(),
            }
        })
        .collect()
}

/// What the topics hold that the server may send again: see the module doc. Kept in the
/// store (meta `rebuilt`) until the capture has passed the newest transaction the topics
/// held, so a restart before that still knows.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rebuilt {
    /// The highest version of a streamed event (insert, update, delete, truncate) in the
    /// topics: a change past it cannot be there.
    pub max_version: u64,
    /// The highest commit position of a transaction with events in the topics: once the
    /// store's position is past it, nothing the server sends is there.
    pub max_commit: u64,
    /// Keys (store keys) whose last event is a delete at or past the slot's restart
    /// position (the oldest change the server can send again): its version, and the
    /// deleted row (the delete's complete `before`).
    deleted: HashMap<String, Deleted>,
    /// The version of the last truncate each partition holds: (topic, partition, version).
    truncated: Vec<(String, i32, u64)>,
    /// The highest `chgate-seq` in the topics: the store numbers its events after it.
    pub highest_seq: u64,
    /// Events read, rows the store holds after the fold (for the log).
    pub events: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Deleted {
    version: u64,
    before: Option<String>,
}

impl Rebuilt {
    /// Whether the topics already hold the change of version `version` to the row with
    /// this store key (in `partition` of `topic`); `stored` is the store's row for it.
    /// A row the snapshot published does not count: a transaction that began before the
    /// snapshot's consistent point and committed after it has changes below that point's
    /// version, which the snapshot did not see.
    pub fn holds(
        &self,
        store_key: &[u8],
        stored: Option<&StoredRow>,
        topic: &str,
        partition: i32,
        version: u64,
    ) -> bool {
        if version > self.max_version {
            return false;
        }
        stored.is_some_and(|r| r.regime == StoredRow::STREAMED && r.version >= version)
            || self
                .deleted_at(store_key)
                .is_some_and(|d| d.version >= version)
            || self.truncate_holds(topic, partition, version)
    }

    fn deleted_at(&self, store_key: &[u8]) -> Option<&Deleted> {
        self.deleted.get(std::str::from_utf8(store_key).ok()?)
    }

    /// The row a delete of version `version` in the topics took away: for the other half
    /// of a key-changing update (its delete is in the topics, its create is not), whose
    /// unchanged TOAST values come from it.
    pub fn deleted_row(&self, store_key: &[u8], version: u64) -> Option<&str> {
        self.deleted_at(store_key)
            .filter(|d| d.version == version)
            .and_then(|d| d.before.as_deref())
    }

    /// Whether `partition` of `topic` holds a truncate at or past `version`.
    pub fn truncate_holds(&self, topic: &str, partition: i32, version: u64) -> bool {
        self.truncated
            .iter()
            .any(|(t, p, v)| t == topic && *p == partition && *v >= version)
    }

    /// Whether the server may still send a change the topics hold, the store being at
    /// `store_lsn`.
    pub fn pending(&self, store_lsn: u64) -> bool {
        store_lsn <= self.max_commit
    }

    fn truncated_at(&mut self, topic: &str, partition: i32, version: u64) {
        match self
            .truncated
            .iter_mut()
            .find(|(t, p, _)| t == topic && *p == partition)
        {
            Some(e) => e.2 = e.2.max(version),
            None => self.truncated.push((topic.to_string(), partition, version)),
        }
    }
}

/// The record the capture keeps in its state topic, keyed by its slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub slot: String,
    /// The snapshot: as planned when its slot was created or a table was added (before
    /// any of its rows is published), done once it is acknowledged; `None` with
    /// `snapshot = "never"`.
    pub snapshot: Option<SnapshotState>,
    pub written_at_ms: i64,
}

/// Writes the capture's state record and waits for the broker to have it.
pub async fn record_state(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    record: &StateRecord,
) -> anyhow::Result<()> {
    let producer: FutureProducer = client_config(brokers, properties)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("a producer for the state topic")?;
    let value = serde_json::to_vec(record)?;
    producer
        .send(
            FutureRecord::to(topic)
                .partition(0)
                .key(record.slot.as_bytes())
                .payload(&value),
            Duration::from_secs(60),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing the state record to {topic}: {e}"))?;
    Ok(())
}

/// The newest state record of `slot` in `topic` (partition 0), if any.
pub fn read_state(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    slot: &str,
) -> anyhow::Result<Option<StateRecord>> {
    let mut found = None;
    let never = AtomicBool::new(false);
    read_partitions(
        brokers,
        properties,
        topic,
        &[(0, Start::First)],
        16384,
        &never,
        |m| {
            if m.key() == Some(slot.as_bytes()) {
                if let Some(v) = m.payload() {
                    let r: StateRecord = serde_json::from_slice(v).with_context(|| {
                        format!("the state record at {topic}/0@{} is not one", m.offset())
                    })?;
                    found = Some(r);
                }
            }
            Ok(())
        },
    )?;
    Ok(found)
}

/// A topic's partition count, from the broker's metadata (blocking).
pub fn partitions_of(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
) -> anyhow::Result<i32> {
    let consumer: BaseConsumer<Quiet> = client_config(brokers, properties)
        .set("group.id", "chgate-cdc-rebuild")
        .create_with_context(Quiet)?;
    let m = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    m.topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .filter(|&n| n > 0)
        .with_context(|| format!("topic {topic} has no partitions"))
}

/// An event's parts the fold needs.
#[derive(Debug, PartialEq)]
struct Parsed<'a> {
    op: u8,
    /// The key object as the capture wrote it (without `with_schema`'s wrapper).
    key_json: &'a str,
    after: Option<&'a str>,
    before: Option<&'a str>,
    version: u64,
    /// The commit position of its transaction (`source.sequence`'s first), if it says.
    commit: Option<u64>,
}

#[derive(Deserialize)]
struct WireValue<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a str>,
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<WireSource<'a>>,
}

#[derive(Deserialize)]
struct WireSource<'a> {
    row_version: Option<u64>,
    /// `["<commit lsn>","<lsn>"]`, as a string.
    #[serde(borrow, default)]
    sequence: Option<std::borrow::Cow<'a, str>>,
}

/// The first number of Debezium's `sequence` string (`["1234","1240"]`).
fn sequence_commit(sequence: &str) -> Option<u64> {
    let first = sequence.strip_prefix("[\"")?.split('"').next()?;
    first.parse().ok()
}

#[derive(Deserialize)]
struct WireKey<'a> {
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// Reads one event of the capture's (key and value as it wrote them).
fn parse<'a>(key: &'a [u8], value: &'a [u8], with_schema: bool) -> anyhow::Result<Parsed<'a>> {
    let key = std::str::from_utf8(key).context("the key is not UTF-8")?;
    let key_json = if with_schema {
        let k: WireKey = serde_json::from_str(key).context("the key has no payload")?;
        k.payload.get()
    } else {
        key
    };
    let mut v: WireValue = serde_json::from_slice(value).context("the value is not an event")?;
    if let Some(p) = v.payload {
        v = serde_json::from_str(p.get()).context("the payload is not an event")?;
    }
    let op = match v.op {
        Some(o) if o.len() == 1 && "crudt".contains(o) => o.as_bytes()[0],
        other => anyhow::bail!("op {other:?} is none of c, r, u, d, t"),
    };
    let source = v.source.context("no source: not an event of chgate's")?;
    let version = source
        .row_version
        .context("no source.row_version: not an event of chgate's")?;
    let commit = source.sequence.as_deref().and_then(sequence_commit);
    let after = v.after.map(RawValue::get);
    let before = v.before.map(RawValue::get);
    if matches!(op, b'c' | b'r' | b'u') && after.is_none() {
        anyhow::bail!("op {} without an after image", op as char);
    }
    Ok(Parsed {
        op,
        key_json,
        after,
        before,
        version,
        commit,
    })
}

/// Rows waiting to go into the store, written a batch at a time.
const BATCH_ROWS: usize = 50_000;

/// The fold of one topic's partitions into the store.
struct Fold<'a> {
    store: &'a mut Store,
    t: &'a TopicOf,
    with_schema: bool,
    /// The slot's restart position: no change before it can be sent again.
    restart: u64,
    pending: HashMap<Vec<u8>, Option<StoredRow>>,
    out: &'a mut Rebuilt,
    /// The next offset of each partition of the topic, as far as the fold went.
    next: &'a mut BTreeMap<i32, i64>,
    key: Vec<u8>,
}

impl Fold<'_> {
    fn message(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
        self.out.events += 1;
        self.next.insert(m.partition(), m.offset() + 1);
        if let Some(seq) = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == SEQ_HEADER)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<u64>().ok())
        }) {
            self.out.highest_seq = self.out.highest_seq.max(seq);
        }
        // A tombstone follows each delete: the delete said it all.
        let Some(value) = m.payload() else {
            return Ok(());
        };
        let at = || format!("{}/{}@{}", self.t.topic, m.partition(), m.offset());
        // A truncate is the one event without a key.
        let Some(key) = m.key() else {
            let p = parse(b"{}", value, false).with_context(at)?;
            if p.op != b't' {
                anyhow::bail!("{}: an event without a key that is no truncate", at());
            }
            if let Some(c) = p.commit {
                self.out.max_commit = self.out.max_commit.max(c);
            }
            return self.truncate(m.partition(), p.version);
        };
        let p = parse(key, value, self.with_schema).with_context(at)?;
        if p.op == b't' {
            anyhow::bail!("{}: a truncate with a key", at());
        }
        row_key_into(&self.t.table, p.key_json.as_bytes(), &mut self.key);
        if p.op != b'r' {
            self.out.max_version = self.out.max_version.max(p.version);
        }
        if let Some(c) = p.commit {
            self.out.max_commit = self.out.max_commit.max(c);
        }
        let text = std::str::from_utf8(&self.key).unwrap_or_default();
        let row = match (p.op, p.after) {
            (b'd', _) => {
                if p.version >= self.restart {
                    let before = p.before.filter(|b| *b != "null").map(str::to_string);
                    let d = Deleted {
                        version: p.version,
                        before,
                    };
                    self.out.deleted.insert(text.to_string(), d);
                }
                None
            }
            (_, Some(after)) => {
                self.out.deleted.remove(text);
                Some(StoredRow {
                    version: p.version,
                    // A snapshot row: the initial snapshot's regime (which sees no
                    // streamed transaction), and not a streamed change for `holds`.
                    regime: if p.op == b'r' { 0 } else { StoredRow::STREAMED },
                    json: after.into(),
                })
            }
            (_, None) => unreachable!("parse refuses a row event without an after image"),
        };
        self.pending.insert(self.key.clone(), row);
        if self.pending.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// A truncate in partition `p`: the table's rows whose keys go to `p` leave.
    fn truncate(&mut self, p: i32, version: u64) -> anyhow::Result<()> {
        self.flush()?;
        self.out.max_version = self.out.max_version.max(version);
        self.out.truncated_at(&self.t.topic, p, version);
        let (envelope, with_schema, n) = (&self.t.envelope, self.with_schema, self.t.partitions);
        self.store.remove_rows_where(&self.t.table, |key_json| {
            partition_for_key(&envelope.key_bytes(key_json, with_schema), n) == p
        })?;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pending.is_empty() {
            // In key order: the B-tree takes sorted inserts faster than random ones.
            let mut rows: Vec<_> = self.pending.drain().collect();
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            self.store.load_rows(rows.into_iter())?;
        }
        Ok(())
    }
}

/// A fold of the topics so far: where it stopped in each partition, and what it learned.
/// A standby keeps it in its store (meta `follow`) between folds (`follow.rs`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Follow {
    /// (topic, partition, next offset).
    pub offsets: Vec<(String, i32, i64)>,
    pub rebuilt: Rebuilt,
}

impl Follow {
    fn next_of(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.offsets
            .iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, p, o)| (*p, *o))
            .collect()
    }

    fn set_next(&mut self, topic: &str, next: BTreeMap<i32, i64>) {
        self.offsets.retain(|(t, _, _)| t != topic);
        self.offsets
            .extend(next.into_iter().map(|(p, o)| (topic.to_string(), p, o)));
    }
}

/// The captured topics and how to read them.
pub struct Topics<'a> {
    pub brokers: &'a str,
    pub properties: &'a BTreeMap<String, String>,
    pub topics: &'a [TopicOf],
    pub with_schema: bool,
}

/// Folds the topics into `store` from where `follow` stopped, to their ends. `Ok(false)`
/// if `stop` was set first (what was folded is in, and `follow` says how far).
fn fold_from(
    src: &Topics<'_>,
    restart: u64,
    store: &mut Store,
    follow: &mut Follow,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    for t in src.topics {
        let mut next = follow.next_of(&t.topic);
        let starts: Vec<(i32, Start)> = (0..t.partitions)
            .map(|p| (p, next.get(&p).map_or(Start::First, |&o| Start::At(o))))
            .collect();
        let mut fold = Fold {
            store,
            t,
            with_schema: src.with_schema,
            restart,
            pending: HashMap::new(),
            out: &mut follow.rebuilt,
            next: &mut next,
            key: Vec::new(),
        };
        let done = read_partitions(
            src.brokers,
            src.properties,
            &t.topic,
            &starts,
            16384,
            stop,
            |m| fold.message(m),
        );
        fold.flush()?;
        follow.set_next(&t.topic, next);
        if !done? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Brings `store` up to the topics' ends: from where its last fold stopped (meta `follow`,
/// a standby's), or from their starts into an emptied store. `restart` is the slot's
/// restart position: deletes below it are forgotten (the server never sends them again).
/// Returns the fold, and whether it went on from a saved one. Blocking: run it on a
/// blocking thread.
pub fn catch_up(
    src: &Topics<'_>,
    restart: u64,
    store: &mut Store,
    stop: &AtomicBool,
) -> anyhow::Result<(Follow, bool)> {
    let saved: Option<Follow> = store
        .meta("follow")?
        .and_then(|b| serde_json::from_slice(&b).ok());
    let went_on = saved.is_some();
    let mut follow = match saved {
        Some(f) => f,
        None => {
            store.reset()?;
            Follow::default()
        }
    };
    let went_on = match fold_from(src, restart, store, &mut follow, stop) {
        Err(e) if went_on && e.is::<OffsetGone>() => {
            tracing::warn!(error = %e, "The topics no longer hold where the last fold stopped: folding them from their start");
            store.reset()?;
            follow = Follow::default();
            fold_from(src, restart, store, &mut follow, stop)?;
            false
        }
        r => {
            r?;
            went_on
        }
    };
    follow.rebuilt.deleted.retain(|_, d| d.version >= restart);
    follow.rebuilt.rows = store.rows_on_disk()?;
    Ok((follow, went_on))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_read_with_and_without_its_schema() {
        let value = br#"{"before":null,"after":{"id":1,"n":"a \"b\""},"source":{"version":"x","sequence":"[\"40\",\"42\"]","row_version":42,"before_row_version":null},"op":"c","ts_ms":1,"transaction":null}"#;
        let p = parse(br#"{"id":1}"#, value, false).unwrap();
        assert_eq!(
            p,
            Parsed {
                op: b'c',
                key_json: r#"{"id":1}"#,
                after: Some(r#"{"id":1,"n":"a \"b\""}"#),
                before: None,
                version: 42,
                commit: Some(40),
            }
        );
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{}}}"#,
            std::str::from_utf8(value).unwrap()
        );
        let key = br#"{"schema":{"type":"struct"},"payload":{"id":1}}"#;
        assert_eq!(parse(key, wrapped.as_bytes(), true).unwrap(), p);
    }

    #[test]
    fn a_delete_and_a_truncate_have_no_after_image() {
        let d =
            br#"{"before":{"id":1},"after":null,"source":{"row_version":7},"op":"d","ts_ms":1}"#;
        let p = parse(br#"{"id":1}"#, d, false).unwrap();
        assert_eq!((p.op, p.after, p.version), (b'd', None, 7));
        let t = br#"{"before":null,"after":null,"source":{"row_version":9},"op":"t","ts_ms":1,"transaction":null}"#;
        let p = parse(b"{}", t, false).unwrap();
        assert_eq!((p.op, p.version), (b't', 9));
    }

    #[test]
    fn what_is_not_an_event_of_the_capture_is_refused_with_the_reason() {
        let cases: [(&[u8], &str); 4] = [
            (b"not json", "not an event"),
            (br#"{"op":"x","source":{"row_version":1}}"#, "none of"),
            (br#"{"op":"u","after":{"id":1},"source":{}}"#, "row_version"),
            (
                br#"{"op":"u","after":null,"source":{"row_version":1}}"#,
                "without an after",
            ),
        ];
        for (value, want) in cases {
            let e = format!("{:#}", parse(br#"{"id":1}"#, value, false).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_change_is_held_when_its_key_or_partition_has_gone_past_it() {
        let mut r = Rebuilt {
            max_version: 100,
            ..Default::default()
        };
        let before = Some("{\"id\":2,\"n\":\"wide\"}".to_string());
        r.deleted.insert(
            "t\0{\"id\":2}".into(),
            Deleted {
                version: 50,
                before,
            },
        );
        r.truncated_at("top", 1, 30);
        r.truncated_at("top", 1, 20);
        let row = |version, regime| StoredRow {
            version,
            regime,
            json: "{}".into(),
        };
        let streamed = StoredRow::STREAMED;
        let k1 = b"t\0{\"id\":1}";
        assert!(r.holds(k1, Some(&row(60, streamed)), "top", 0, 60));
        assert!(!r.holds(k1, Some(&row(60, streamed)), "top", 0, 61));
        // A snapshot row says nothing of the changes after it.
        assert!(!r.holds(k1, Some(&row(60, 0)), "top", 0, 59));
        let k2 = b"t\0{\"id\":2}";
        assert!(r.holds(k2, None, "top", 0, 50));
        assert!(!r.holds(k2, None, "top", 0, 51));
        assert_eq!(r.deleted_row(k2, 50), Some("{\"id\":2,\"n\":\"wide\"}"));
        assert_eq!(r.deleted_row(k2, 49), None);
        assert!(r.holds(b"t\0{\"id\":3}", None, "top", 1, 30));
        assert!(!r.holds(b"t\0{\"id\":3}", None, "top", 0, 30));
        // Past everything the topics hold: never.
        assert!(!r.holds(k1, Some(&row(500, streamed)), "top", 0, 101));
        // Kept in the store as JSON, and read back the same.
        let again: Rebuilt = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn a_fold_keeps_where_it_stopped_in_each_partition_of_each_topic() {
        let mut f = Follow::default();
        f.set_next("a", BTreeMap::from([(0, 10), (1, 4)]));
        f.set_next("b", BTreeMap::from([(0, 7)]));
        f.set_next("a", BTreeMap::from([(0, 12), (1, 4), (2, 1)]));
        assert_eq!(f.next_of("a"), BTreeMap::from([(0, 12), (1, 4), (2, 1)]));
        assert_eq!(f.next_of("b"), BTreeMap::from([(0, 7)]));
        assert!(f.next_of("c").is_empty());
        let again: Follow = serde_json::from_slice(&serde_json::to_vec(&f).unwrap()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn the_commit_position_is_the_first_of_the_sequence() {
        assert_eq!(sequence_commit(r#"["1234","1240"]"#), Some(1234));
        assert_eq!(sequence_commit("[]"), None);
        assert_eq!(sequence_commit(r#"["x","1"]"#), None);
    }
}
