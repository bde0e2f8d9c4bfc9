//! From changes to events: each insert, update, delete and truncate of a captured table
//! becomes a Debezium event with a complete `before` (from the key-state store, whatever
//! the table's REPLICA IDENTITY), unchanged TOAST values filled from the store, and a
//! version; every event of a transaction is tagged with the transaction's unit, so the
//! store is written and the slot confirmed only once the broker has them all.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::Client;

use super::catalog::{TableSchema, TypeCache};
use super::config::{TruncateMode, ValidatedCdc};
use super::envelope::{now_ms, pg_ts_to_unix_ms, Source, TableEnvelope};
use super::pg::pgoutput::{Datum, Relation};
use super::producer::{Done, EventProducer};
use super::rebuild::Rebuilt;
use super::row::Layout;
use super::snapshot::{key_literals, Chunk, KeyText, SnapshotState};
use super::store::{row_key_into, Committed, Store, StoredRow};
use crate::kafka::partition::partition_for_key;
use crate::metrics::METRICS;

mod reconcile;

/// A captured table.
pub struct Captured {
    pub schema: TableSchema,
    /// The catalog's columns (the snapshot's rows).
    pub layout: Arc<Layout>,
    pub envelope: Arc<TableEnvelope>,
    pub topic: Arc<str>,
    /// `schema.table`: the metrics label and the store's key prefix.
    pub name: String,
}

/// Rows, and bytes of them, a truncate reads from the store at a time.
const TRUNCATE_BATCH: usize = 1_000;
const TRUNCATE_BATCH_BYTES: usize = 8 << 20;

/// A TRUNCATE of one table under way: see [`Capture::truncate_step`].
pub struct Truncating {
    t: usize,
    tx: TxInfo,
    lsn: u64,
    /// The regimes of resumed snapshots that saw the truncate (their rows stay).
    seeing: Vec<u8>,
    /// Each row goes with a delete event (`delete_rows`, or resumed snapshots saw it).
    delete_rows: bool,
    /// After a rebuild, with the topics holding this truncate in some partitions and rows
    /// written after it: only the rows older than it go, one by one.
    older_only: bool,
    /// Rows are taken one by one, and some are left to read.
    rows_left: bool,
    /// The store key the next batch starts after.
    next: Option<Vec<u8>>,
}

/// What the stream said a relation looks like now.
#[derive(Clone)]
struct RelState {
    table: usize,
    layout: Arc<Layout>,
}

/// A change of a transaction, applied in order.
#[derive(Debug)]
pub enum Change {
    Relation(Relation),
    Insert {
        lsn: u64,
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        lsn: u64,
        relation: u32,
        old: Option<(u8, Vec<Datum>)>,
        new: Vec<Datum>,
    },
    Delete {
        lsn: u64,
        relation: u32,
        old: (u8, Vec<Datum>),
    },
    Truncate {
        lsn: u64,
        relations: Vec<u32>,
    },
}

/// Which halves of a key-changing update to publish (a resumed snapshot may already hold
/// one of them).
#[derive(Debug, Clone, Copy)]
struct Halves {
    delete_old: bool,
    create_new: bool,
}

/// The transaction being applied.
#[derive(Debug, Clone, Copy)]
pub struct TxInfo {
    pub xid: u32,
    /// The LSN of its commit record.
    pub commit_lsn: u64,
    pub commit_ts_ms: i64,
}

pub struct Capture {
    pub cfg: Arc<ValidatedCdc>,
    pub catalog: Client,
    types: TypeCache,
    pub tables: Vec<Captured>,
    by_name: HashMap<(String, String), usize>,
    relations: HashMap<u32, RelState>,
    /// Relations described by the server that the capture does not publish (a
    /// publication shared with others may hold more tables).
    ignored: std::collections::HashSet<u32>,
    pub store: Store,
    pub producer: EventProducer,
    /// Resumed snapshot regimes, while streamed transactions may still be seen by them.
    pub snapshot: Option<SnapshotState>,
    /// Commit time of each unit in flight, for the commit-to-ack latency.
    commit_times: VecDeque<(u64, i64)>,
    /// Scratch for a row's store key.
    key_buf: Vec<u8>,
    /// What the topics hold past the slot's position, when the store was rebuilt from
    /// them: those changes are not published again.
    pub rebuilt: Option<Rebuilt>,
    /// The topics' last events as a rebuild at this start read them: checked again once the
    /// slot is this instance's (`tail::unchanged_since`).
    pub rebuilt_from: Option<std::collections::HashMap<(String, i32), super::tail::Last>>,
}

impl Capture {
    pub fn new(
        cfg: Arc<ValidatedCdc>,
        catalog: Client,
        schemas: Vec<TableSchema>,
        store: Store,
        producer: EventProducer,
    ) -> Self {
        let c = &cfg.config;
        let tables: Vec<Captured> = schemas
            .into_iter()
            .map(|s| {
                let topic = cfg.topic(&s.schema, &s.name);
                let columns = s
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.kind.clone()))
                    .collect();
                let keys: Vec<String> = s.key.iter().map(|&i| s.columns[i].name.clone()).collect();
                Captured {
                    layout: Arc::new(
                        Layout::new(columns, &keys).expect("the key is among the columns"),
                    ),
                    envelope: Arc::new(TableEnvelope::new(
                        &c.capture.name,
                        &c.postgres.dbname,
                        &s,
                        &topic,
                    )),
                    name: s.full_name(),
                    topic: topic.into(),
                    schema: s,
                }
            })
            .collect();
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| ((t.schema.schema.clone(), t.schema.name.clone()), i))
            .collect();
        Self {
            cfg,
            catalog,
            types: TypeCache::default(),
            tables,
            by_name,
            relations: HashMap::new(),
            ignored: Default::default(),
            store,
            producer,
            snapshot: None,
            commit_times: VecDeque::new(),
            key_buf: Vec::new(),
            rebuilt: None,
            rebuilt_from: None,
        }
    }

    pub fn with_schema(&self) -> bool {
        self.cfg.config.kafka.with_schema
    }

    async fn relation(&mut self, r: Relation) -> anyhow::Result<()> {
        let Some(&table) = self.by_name.get(&(r.namespace.clone(), r.name.clone())) else {
            self.relations.remove(&r.id);
            self.ignored.insert(r.id);
            return Ok(());
        };
        self.ignored.remove(&r.id);
        let mut columns = Vec::with_capacity(r.columns.len());
        for c in &r.columns {
            let kind = self.types.kind(&self.catalog, c.type_oid).await?;
            columns.push((c.name.clone(), kind));
        }
        let keys = &self.tables[table].envelope.key_columns;
        let Some(layout) = Layout::new(columns.clone(), keys) else {
            anyhow::bail!(
                "{}.{}: the primary key ({}) is no longer among the table's columns; restart the capture after a key change",
                r.namespace,
                r.name,
                keys.join(", ")
            );
        };
        if self.with_schema() {
            self.follow_columns(table, &r, &columns).await?;
        }
        self.relations.insert(
            r.id,
            RelState {
                table,
                layout: Arc::new(layout),
            },
        );
        Ok(())
    }

    /// With `with_schema`, a table's schema follows its columns as the server describes
    /// them (after an `ALTER`): a field the payload carries is never missing from the
    /// schema sent with it (a JSON converter would drop it), and a dropped column leaves it.
    async fn follow_columns(
        &mut self,
        table: usize,
        r: &Relation,
        columns: &[(String, super::value::Kind)],
    ) -> anyhow::Result<()> {
        let current = &self.tables[table].schema.columns;
        let same = current.len() == columns.len()
            && current
                .iter()
                .zip(columns)
                .all(|(c, (name, kind))| &c.name == name && &c.kind == kind);
        if same {
            return Ok(());
        }
        let mut followed = Vec::with_capacity(columns.len());
        for (c, (name, kind)) in r.columns.iter().zip(columns) {
            let type_name = match current.iter().find(|o| &o.name == name) {
                Some(o) => o.type_name.clone(),
                None => self
                    .catalog
                    .query_one("SELECT format_type($1, NULL)", &[&c.type_oid])
                    .await?
                    .get(0),
            };
            followed.push(super::catalog::Column {
                name: name.clone(),
                type_oid: c.type_oid,
                type_name,
                kind: kind.clone(),
            });
        }
        let t = &mut self.tables[table];
        let mut schema = t.schema.clone();
        schema.key = t
            .envelope
            .key_columns
            .iter()
            .filter_map(|k| followed.iter().position(|c| &c.name == k))
            .collect();
        schema.columns = followed;
        let c = &self.cfg.config;
        t.envelope = Arc::new(TableEnvelope::new(
            &c.capture.name,
            &c.postgres.dbname,
            &schema,
            &t.topic,
        ));
        t.schema = schema;
        tracing::info!(table = %t.name, "The table's columns changed: its events' schema follows");
        Ok(())
    }

    /// Applies one change of `tx`: events out, store updated.
    pub async fn apply(&mut self, tx: TxInfo, change: Change) -> anyhow::Result<()> {
        match change {
            Change::Relation(r) => self.relation(r).await,
            Change::Insert { lsn, relation, new } => {
                let Some(rel) = self.rel(relation)? else {
                    return Ok(());
                };
                if self.seen_by_snapshot(&rel, tx, &new).await?
                    || self.in_topics(&rel, &new, lsn)?
                {
                    return Ok(());
                }
                self.insert(tx, lsn, &rel, &new).await
            }
            Change::Update {
                lsn,
                relation,
                old,
                new,
            } => {
                let Some(rel) = self.rel(relation)? else {
                    return Ok(());
                };
                // A key change is a delete of the old key and a create of the new one; a
                // resumed snapshot may hold either half (each key lies in its own range).
                let seen_new = self.seen_by_snapshot(&rel, tx, &new).await?
                    || self.in_topics(&rel, &new, lsn)?
                    || old.as_ref().is_some_and(|(_, datums)| {
                        // A key column TOASTed and unchanged: the key is the old tuple's.
                        !rel.layout.key(&new, &mut Vec::new())
                            && self.in_topics(&rel, datums, lsn).unwrap_or(false)
                    });
                let seen_old = match &old {
                    Some((_, datums))
                        if rel.layout.key_values(datums) != rel.layout.key_values(&new) =>
                    {
                        self.seen_by_snapshot(&rel, tx, datums).await?
                            || self.in_topics(&rel, datums, lsn)?
                    }
                    _ => seen_new,
                };
                if seen_old && seen_new {
                    return Ok(());
                }
                let halves = Halves {
                    delete_old: !seen_old,
                    create_new: !seen_new,
                };
                self.update(tx, lsn, &rel, old, &new, halves).await
            }
            Change::Delete { lsn, relation, old } => {
                let Some(rel) = self.rel(relation)? else {
                    return Ok(());
                };
                if self.seen_by_snapshot(&rel, tx, &old.1).await?
                    || self.in_topics(&rel, &old.1, lsn)?
                {
                    return Ok(());
                }
                self.delete(tx, lsn, &rel, &old.1).await
            }
            // Whole, in one unit: the stream applies a truncate itself, in slices.
            Change::Truncate { lsn, relations } => {
                for r in relations {
                    if let Some(mut run) = self.begin_truncate(tx, lsn, r)? {
                        while !self.truncate_step(&mut run)? {}
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether the topics already hold the change of version `lsn` to the row `datums`
    /// (whose key they carry): only after a rebuild (`rebuild.rs`), for the changes the
    /// server sends again from the slot's position.
    fn in_topics(&self, rel: &RelState, datums: &[Datum], lsn: u64) -> anyhow::Result<bool> {
        let Some(r) = &self.rebuilt else {
            return Ok(false);
        };
        if lsn > r.max_version {
            return Ok(false);
        }
        let mut key_json = Vec::with_capacity(32);
        if !rel.layout.key(datums, &mut key_json) {
            return Ok(false);
        }
        let table = &self.tables[rel.table];
        let key = table.envelope.key_bytes(&key_json, self.with_schema());
        let partition = partition_for_key(&key, self.producer.partitions(&table.topic));
        let store_key = self.store_key(rel.table, &key_json);
        let stored = self.store.get(&store_key)?;
        let held = r.holds(&store_key, stored.as_ref(), &table.topic, partition, lsn);
        if held {
            METRICS.cdc_skipped.with_label_values(&["in_topics"]).inc();
        }
        Ok(held)
    }

    /// The captured table a change is for; `None` for a table the capture leaves out. A
    /// change for a relation the server never described is an error: every change of the
    /// table would be lost, so the capture stops (and its restart starts a new session).
    fn rel(&self, relation: u32) -> anyhow::Result<Option<RelState>> {
        if let Some(r) = self.relations.get(&relation) {
            return Ok(Some(r.clone()));
        }
        if self.ignored.contains(&relation) {
            METRICS
                .cdc_skipped
                .with_label_values(&["not_captured"])
                .inc();
            return Ok(None);
        }
        anyhow::bail!(
            "a change for relation {relation}, which the server has not described in this session"
        )
    }

    fn source(&self, tx: TxInfo, lsn: u64, version: u64, before: Option<u64>) -> Source {
        Source {
            commit_ts_ms: tx.commit_ts_ms,
            snapshot: "false",
            tx_id: Some(tx.xid),
            lsn: Some(lsn),
            commit_lsn: Some(tx.commit_lsn),
            row_version: version,
            before_row_version: before,
        }
    }

    async fn insert(
        &mut self,
        tx: TxInfo,
        lsn: u64,
        rel: &RelState,
        new: &[Datum],
    ) -> anyhow::Result<()> {
        let t = rel.table;
        let mut key = Vec::with_capacity(32);
        if !rel.layout.key(new, &mut key) {
            anyhow::bail!("{}: a row without its primary key", self.tables[t].name);
        }
        let mut after = Vec::with_capacity(256);
        if let Err(e) = rel.layout.row(new, None, &mut after) {
            anyhow::bail!("{}: {e}", self.tables[t].name);
        }
        let source = self.source(tx, lsn, lsn, None);
        self.emit(t, 'c', &key, None, Some(&after), &source);
        self.put_row(t, &key, &after, lsn, StoredRow::STREAMED);
        Ok(())
    }

    async fn update(
        &mut self,
        tx: TxInfo,
        lsn: u64,
        rel: &RelState,
        old: Option<(u8, Vec<Datum>)>,
        new: &[Datum],
        halves: Halves,
    ) -> anyhow::Result<()> {
        let t = rel.table;
        // The key before the update: the old tuple's if the server sent one (the key
        // changed, or REPLICA IDENTITY FULL), else the new row's.
        let mut old_key = Vec::with_capacity(32);
        let mut new_key = Vec::with_capacity(32);
        let has_new_key = rel.layout.key(new, &mut new_key);
        let has_old_key = match &old {
            Some((_, datums)) => rel.layout.key(datums, &mut old_key),
            None => {
                old_key.clone_from(&new_key);
                has_new_key
            }
        };
        if !has_old_key {
            anyhow::bail!("{}: an update without the row's key", self.tables[t].name);
        }
        if !has_new_key {
            // A key column TOASTed and unchanged: the key is the old one.
            new_key.clone_from(&old_key);
        }
        let mut prev = self.stored(t, &old_key)?;
        if prev.is_none() {
            // After a rebuild, a key change whose delete half the topics hold: the row it
            // took away still fills the new row's unchanged TOAST values.
            let deleted = self.rebuilt.as_ref().and_then(|r| {
                r.deleted_row(&self.store_key(t, &old_key), lsn)
                    .map(|json| StoredRow {
                        version: lsn,
                        regime: StoredRow::STREAMED,
                        json: json.into(),
                    })
            });
            prev = deleted;
        }
        let mut after = Vec::with_capacity(prev.as_ref().map_or(256, |p| p.json.len() + 16));
        if let Err(e) = rel
            .layout
            .row(new, prev.as_ref().map(|p| &*p.json), &mut after)
        {
            anyhow::bail!("{}: {e}", self.tables[t].name);
        }
        // The complete before image: the stored row; failing that (never stored: snapshot =
        // never), REPLICA IDENTITY FULL's old row.
        let fallback = match (&prev, &old) {
            (None, Some((b'O', datums))) => {
                let mut row = Vec::new();
                rel.layout.row(datums, None, &mut row).ok().map(|()| row)
            }
            _ => None,
        };
        if prev.is_none() && fallback.is_none() {
            METRICS.cdc_skipped.with_label_values(&["no_before"]).inc();
        }
        let before: Option<&[u8]> = prev
            .as_ref()
            .map(|p| p.json.as_bytes())
            .or(fallback.as_deref());
        let before_version = prev.as_ref().map(|p| p.version);
        if new_key != old_key {
            // A primary key change: a delete of the old key and a create of the new one,
            // as Debezium does (each unless a resumed snapshot already holds it).
            if halves.delete_old {
                let source = self.source(tx, lsn, lsn, before_version);
                self.emit(t, 'd', &old_key, before, None, &source);
                self.store.put(self.store_key(t, &old_key), None);
            }
            if halves.create_new {
                let source = self.source(tx, lsn, lsn, None);
                self.emit(t, 'c', &new_key, None, Some(&after), &source);
                self.put_row(t, &new_key, &after, lsn, StoredRow::STREAMED);
            }
            return Ok(());
        }
        let source = self.source(tx, lsn, lsn, before_version);
        self.emit(t, 'u', &new_key, before, Some(&after), &source);
        self.put_row(t, &new_key, &after, lsn, StoredRow::STREAMED);
        Ok(())
    }

    async fn delete(
        &mut self,
        tx: TxInfo,
        lsn: u64,
        rel: &RelState,
        old: &[Datum],
    ) -> anyhow::Result<()> {
        let t = rel.table;
        let mut key = Vec::with_capacity(32);
        if !rel.layout.key(old, &mut key) {
            anyhow::bail!("{}: a delete without the row's key", self.tables[t].name);
        }
        let prev = self.stored(t, &key)?;
        let source = self.source(tx, lsn, lsn, prev.as_ref().map(|p| p.version));
        match &prev {
            Some(p) => self.emit(t, 'd', &key, Some(p.json.as_bytes()), None, &source),
            None => {
                METRICS.cdc_skipped.with_label_values(&["no_before"]).inc();
                let mut partial = Vec::new();
                rel.layout.partial_row(old, &mut partial);
                self.emit(t, 'd', &key, Some(&partial), None, &source);
            }
        }
        self.store.put(self.store_key(t, &key), None);
        Ok(())
    }

    /// Starts a TRUNCATE of `relation`; `None` for a table the capture leaves out. Its rows
    /// are then deleted a batch at a time by [`Capture::truncate_step`], so a table of
    /// millions of rows is never read into memory whole, and its events can be committed
    /// in slices.
    pub fn begin_truncate(
        &self,
        tx: TxInfo,
        lsn: u64,
        relation: u32,
    ) -> anyhow::Result<Option<Truncating>> {
        let Some(rel) = self.rel(relation)? else {
            return Ok(None);
        };
        let t = rel.table;
        // Resumed snapshots taken after this truncate read their key ranges as it left
        // them: those rows stay; only the rows read before it, or written by changes
        // before it, go. No `t` event: it would wipe what those snapshots published.
        let seeing = self.regimes_seeing(t, tx);
        let delete_rows =
            !seeing.is_empty() || self.cfg.config.capture.truncate == TruncateMode::DeleteRows;
        let older_only = self.rebuilt.as_ref().is_some_and(|r| lsn <= r.max_version);
        Ok(Some(Truncating {
            t,
            tx,
            lsn,
            seeing,
            delete_rows,
            older_only,
            rows_left: delete_rows || older_only,
            next: None,
        }))
    }

    /// Applies the next batch of a truncate: a delete event (with its complete before
    /// image) for each row going, each row taken out of the store. `Ok(true)` once the
    /// truncate is complete: then, unless resumed snapshots saw it, the table is emptied
    /// in the store and the `t` event goes to every partition of the table's topic, so it
    /// is ordered against every row event whatever partition the row's key hashes to.
    ///
    /// After a crash between two batches (their slices committed) the truncate is applied
    /// again: the rows deleted before are gone from the store, so none is deleted twice.
    pub fn truncate_step(&mut self, run: &mut Truncating) -> anyhow::Result<bool> {
        let t = run.t;
        if run.rows_left {
            let batch = self.store.rows_batch(
                &self.tables[t].name,
                run.next.as_deref(),
                TRUNCATE_BATCH,
                TRUNCATE_BATCH_BYTES,
            )?;
            for (store_key, key_json, row) in batch.rows {
                if run.seeing.contains(&row.regime) {
                    continue;
                }
                // Written after the truncate: the topics hold it (and the truncate before it).
                if run.older_only && row.version >= run.lsn && row.regime == StoredRow::STREAMED {
                    continue;
                }
                if run.delete_rows {
                    let source = self.source(run.tx, run.lsn, run.lsn, Some(row.version));
                    self.emit_delete(t, &key_json, &row, &source);
                }
                self.store.put(store_key, None);
            }
            run.next = batch.next;
            run.rows_left = run.next.is_some();
            if run.rows_left {
                return Ok(false);
            }
        }
        if !run.seeing.is_empty() {
            return Ok(true);
        }
        if !run.older_only {
            self.store.truncate(&self.tables[t].name);
        }
        let source = self.source(run.tx, run.lsn, run.lsn, None);
        let value = self.tables[t]
            .envelope
            .value('t', None, None, &source, self.with_schema());
        let value = Bytes::from(value);
        let topic = self.tables[t].topic.clone();
        for p in 0..self.producer.partitions(&topic) {
            // After a rebuild: a partition that already has this truncate must not get it
            // again, behind the rows written since.
            if self
                .rebuilt
                .as_ref()
                .is_some_and(|r| r.truncate_holds(&topic, p, run.lsn))
            {
                continue;
            }
            self.store
                .add_event(Arc::clone(&topic), p, None, Some(value.clone()));
        }
        METRICS
            .cdc_events
            .with_label_values(&[self.tables[t].name.as_str(), "t"])
            .inc();
        Ok(true)
    }

    fn store_key(&self, t: usize, key_json: &[u8]) -> Vec<u8> {
        let mut key = Vec::new();
        row_key_into(&self.tables[t].name, key_json, &mut key);
        key
    }

    fn stored(&self, t: usize, key_json: &[u8]) -> anyhow::Result<Option<StoredRow>> {
        Ok(self.store.get(&self.store_key(t, key_json))?)
    }

    fn put_row(&mut self, t: usize, key_json: &[u8], row: &[u8], version: u64, regime: u8) {
        let json: Arc<str> = String::from_utf8_lossy(row).into();
        let mut key = std::mem::take(&mut self.key_buf);
        row_key_into(&self.tables[t].name, key_json, &mut key);
        self.store.put(
            &key[..],
            Some(StoredRow {
                version,
                regime,
                json,
            }),
        );
        self.key_buf = key;
    }

    /// A `d` event for a stored row, its complete `before`.
    fn emit_delete(&mut self, t: usize, key_json: &str, row: &StoredRow, source: &Source) {
        let before = Some(row.json.as_bytes());
        self.emit(t, 'd', key_json.as_bytes(), before, None, source);
    }

    /// Adds one event to the open unit (and Debezium's tombstone after a delete), for the
    /// partition of its key.
    fn emit(
        &mut self,
        t: usize,
        op: char,
        key_json: &[u8],
        before: Option<&[u8]>,
        after: Option<&[u8]>,
        source: &Source,
    ) {
        let with_schema = self.with_schema();
        let table = &self.tables[t];
        let key = table.envelope.key_bytes(key_json, with_schema);
        let value = table.envelope.value(op, before, after, source, with_schema);
        let partition = partition_for_key(&key, self.producer.partitions(&table.topic));
        let topic = &table.topic;
        if op == 'd' {
            let key = Bytes::from(key);
            self.store.add_event(
                Arc::clone(topic),
                partition,
                Some(key.clone()),
                Some(value.into()),
            );
            self.store
                .add_event(Arc::clone(topic), partition, Some(key), None);
        } else {
            self.store.add_event(
                Arc::clone(topic),
                partition,
                Some(key.into()),
                Some(value.into()),
            );
        }
        let label = match op {
            'c' => "c",
            'u' => "u",
            'd' => "d",
            'r' => "r",
            _ => "t",
        };
        METRICS
            .cdc_events
            .with_label_values(&[table.name.as_str(), label])
            .inc();
    }

    /// Ends the open unit: a whole transaction ending at `end_lsn`, or (`None`) a snapshot
    /// chunk or a slice of a big transaction.
    pub fn close_unit(&mut self, end_lsn: Option<u64>, commit_ts_ms: i64) {
        let unit = self.store.close_unit(end_lsn);
        self.commit_times.push_back((unit, commit_ts_ms));
    }

    /// Ends a slice of a big transaction: the changes applied so far are committed (and
    /// recorded, so a replay after a crash goes on after them).
    pub fn close_slice(&mut self, commit_lsn: u64, applied: u64, commit_ts_ms: i64) {
        let mut partial = commit_lsn.to_le_bytes().to_vec();
        partial.extend_from_slice(&applied.to_le_bytes());
        self.store.put_meta("partial", partial);
        self.close_unit(None, commit_ts_ms);
    }

    /// Commits the closed units to the store, then sends their events.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let committed = self.store.commit()?;
        self.send(committed).await
    }

    /// Sends the events of units just committed (by [`Capture::flush`], or by a
    /// [`super::store::CommitJob`] the caller ran and gave back to the store).
    pub async fn send(&mut self, committed: Vec<Committed>) -> anyhow::Result<()> {
        for c in committed {
            let mut ts = 0;
            while let Some(&(u, t)) = self.commit_times.front() {
                if u > c.unit {
                    break;
                }
                self.commit_times.pop_front();
                if u == c.unit {
                    ts = t;
                }
            }
            let last_seq = c.events.last().map_or(0, |e| e.seq);
            self.producer
                .begin_unit(c.unit, c.events.len(), c.lsn, last_seq, ts);
            for e in &c.events {
                self.producer.send(e).await?;
            }
        }
        Ok(())
    }

    /// Takes the acknowledgements: what is wholly in may be confirmed, and leaves the
    /// outbox with the next commit.
    pub fn settle(&mut self) -> anyhow::Result<Option<Done>> {
        self.producer.drain_acks()?;
        let Some(done) = self.producer.take_done() else {
            return Ok(None);
        };
        let now = now_ms();
        for ts in &done.commit_ts_ms {
            METRICS
                .cdc_commit_to_ack
                .observe((now - ts).max(0) as f64 / 1000.0);
        }
        self.store.acknowledged(done.last_seq);
        Ok(Some(done))
    }

    /// The table's snapshot regimes (as store row markers) whose snapshot saw `tx`.
    fn regimes_seeing(&self, t: usize, tx: TxInfo) -> Vec<u8> {
        let Some(state) = &self.snapshot else {
            return Vec::new();
        };
        if tx.commit_lsn > state.check_until() {
            return Vec::new();
        }
        state
            .tables
            .get(&self.tables[t].name)
            .map(|p| {
                p.regimes
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.snapshot.as_ref().is_some_and(|s| s.sees(tx.xid)))
                    .filter_map(|(i, _)| u8::try_from(i).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a resumed snapshot regime already holds this change (its transaction is
    /// visible in the snapshot the row's key range was read under).
    async fn seen_by_snapshot(
        &mut self,
        rel: &RelState,
        tx: TxInfo,
        datums: &[Datum],
    ) -> anyhow::Result<bool> {
        let Some(state) = &self.snapshot else {
            return Ok(false);
        };
        if tx.commit_lsn > state.check_until() {
            return Ok(false);
        }
        let table = &self.tables[rel.table];
        let Some(progress) = state.tables.get(&table.name) else {
            return Ok(false);
        };
        let regimes = &progress.regimes;
        let Some(key) = rel.layout.key_values(datums) else {
            return Ok(false);
        };
        for (i, r) in regimes.iter().enumerate() {
            let Some(snap) = &r.snapshot else { continue };
            if !snap.sees(tx.xid) {
                continue;
            }
            let next = regimes.get(i + 1).and_then(|n| n.from.as_ref());
            if self
                .key_in_range(&table.schema, &key, r.from.as_ref(), next)
                .await?
            {
                tracing::debug!(table = %table.name, ?key, xid = tx.xid, regime = i, from = ?r.from, next = ?next, "seen by the snapshot");
                METRICS
                    .cdc_skipped
                    .with_label_values(&["seen_by_snapshot"])
                    .inc();
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `from < key <= to` in PostgreSQL's own ordering of the key's types.
    async fn key_in_range(
        &self,
        table: &TableSchema,
        key: &KeyText,
        from: Option<&KeyText>,
        to: Option<&KeyText>,
    ) -> anyhow::Result<bool> {
        let k = key_literals(table, key).join(", ");
        let mut cond = vec!["true".to_string()];
        if let Some(f) = from {
            cond.push(format!("({k}) > ({})", key_literals(table, f).join(", ")));
        }
        if let Some(t) = to {
            cond.push(format!("({k}) <= ({})", key_literals(table, t).join(", ")));
        }
        let row = self
            .catalog
            .query_one(&format!("SELECT {}", cond.join(" AND ")), &[])
            .await?;
        Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
    }

    /// Publishes a snapshot chunk's rows as `r` events (written by its reading task), or
    /// reconciles the table's topic with them (`capture/reconcile.rs`), and records the
    /// table's progress with them.
    pub async fn apply_chunk(
        &mut self,
        chunk: Chunk,
        state: &mut SnapshotState,
    ) -> anyhow::Result<()> {
        let t = chunk.table;
        let version = state.version_of(&self.tables[t].name);
        let n = chunk.rows.len();
        // The chunk's regime: the newest of its table (a new one comes with its first chunk).
        let regimes = state
            .tables
            .get(&self.tables[t].name)
            .map_or(0, |p| p.regimes.len());
        let regime = (regimes + usize::from(chunk.new_regime.is_some())).saturating_sub(1);
        let regime = u8::try_from(regime).unwrap_or(StoredRow::STREAMED - 1);
        let topic = Arc::clone(&self.tables[t].topic);
        let reconcile = state.reconciling(&self.tables[t].name).is_some();
        self.store.reserve(n);
        for ((key, row), event) in chunk.rows.iter().zip(chunk.events) {
            if reconcile {
                self.reconcile_row(t, (key, row), event, version, regime)?;
                continue;
            }
            self.store.add_event(
                Arc::clone(&topic),
                event.partition,
                Some(event.key),
                Some(event.value),
            );
            self.put_row(t, key, row, version, regime);
        }
        let name = self.tables[t].name.as_str();
        METRICS
            .cdc_snapshot_rows
            .with_label_values(&[name])
            .inc_by(n as u64);
        if !reconcile {
            METRICS
                .cdc_events
                .with_label_values(&[name, "r"])
                .inc_by(n as u64);
        }
        let progress = state.tables.entry(self.tables[t].name.clone()).or_default();
        if let Some(r) = chunk.new_regime {
            progress.regimes.push(r);
        }
        if chunk.last_key.is_some() {
            progress.after = chunk.last_key;
        }
        match progress.reconcile.as_mut() {
            // Done once the rows not read again are deleted (`Capture::sweep_step`).
            Some(r) => r.read |= chunk.last,
            None => progress.done |= chunk.last,
        }
        self.store
            .put_meta("snapshot", serde_json::to_vec(state).unwrap_or_default());
        self.close_unit(None, 0);
        Ok(())
    }
}

/// A PostgreSQL commit timestamp in Unix ms.
pub fn commit_ms(pg_ts: i64) -> i64 {
    pg_ts_to_unix_ms(pg_ts)
}
