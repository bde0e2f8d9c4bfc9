//! `chgate cdc`: PostgreSQL changes into Kafka in Debezium's envelope, for `chgate ingest`
//! (or any Debezium consumer) to apply.
//!
//! The rooms, bottom up:
//! - [`pg`]: the replication connection ([`pg::wire`]) and the `pgoutput` messages
//!   ([`pg::pgoutput`]), our own: tokio-postgres has no replication mode, and the crates
//!   that do either need a git fork of it or bring a second TLS/crypto stack (pg_walstream:
//!   aws-lc next to our ring); `postgres-protocol` does the message codec and SCRAM;
//! - [`config`], [`value`] (text values to Debezium's JSON), [`catalog`] (tables, keys,
//!   types; publication and slot), [`row`] (rows and keys as JSON bytes), [`envelope`]
//!   (key and value bytes);
//! - [`store`] (rows as last published, the outbox, progress), [`producer`] (acknowledged
//!   units), [`tail`] (what the broker has after a crash), [`rebuild`] (a store rebuilt
//!   from the topics, for a standby or a lost `state_dir`);
//! - [`capture`] (changes to events), [`snapshot`] (existing rows), [`stream`] (the
//!   replication loop), [`leader`] (active/standby), [`follow`] (a standby keeping its
//!   store current from the topics), and [`run`] here, which puts them in order.
//!
//! The order of a start: validate the config; read the catalog and manage the
//! publication; rebuild the store from the topics if they hold events it did not write;
//! send again what the outbox holds that the broker lacks; create the slot if
//! missing (with an exported snapshot) and snapshot or resume the snapshot; stream.

pub mod capture;
pub mod catalog;
pub mod config;
pub mod envelope;
pub mod follow;
pub mod leader;
pub mod pg;
pub mod producer;
pub mod rebuild;
pub mod row;
pub mod slot;
pub mod snapshot;
pub mod spill;
pub mod store;
pub mod stream;
pub mod tail;
pub mod value;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSource};
use crate::metrics::METRICS;
use capture::Capture;
use catalog::{format_lsn, parse_lsn, quote_ident, quote_literal};
use config::{SnapshotMode, ValidatedCdc};
use pg::wire::{ConnectParams, ReplicationConn};
use snapshot::{Chunk, Regime, SnapshotState, TableProgress};
use store::Store;

/// Runs the capture until SIGTERM (then drains) or a failure.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let v = config::load(path).map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
    })?;
    let cfg = Arc::new(v);
    let stop = crate::signals::shutdown()?;
    let streaming = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin_thread = match cfg.config.admin.listen {
        Some(addr) => {
            let listener = admin::bind(addr)?;
            tracing::info!(kind = "admin", addr = %listener.local_addr()?, "Listening");
            let source = Arc::new(Admin {
                streaming: streaming.clone(),
            });
            Some(admin::spawn(listener, source, admin_stop.clone())?)
        }
        None => None,
    };
    // With [coordination], wait to lead; the capture stops when leadership is lost.
    let leadership = match &cfg.config.coordination {
        Some(co) => match lead(&cfg, co, &stop).await? {
            Some(l) => Some(l),
            None => {
                admin_stop.cancel();
                return Ok(());
            }
        },
        None => None,
    };
    let run_stop = stop.child_token();
    if let Some(l) = &leadership {
        let (lost, run_stop) = (l.lost.clone(), run_stop.clone());
        tokio::spawn(async move {
            lost.cancelled().await;
            run_stop.cancel();
        });
    }
    let lost = leadership
        .as_ref()
        .map_or_else(CancellationToken::new, |l| l.lost.clone());
    let mut result = capture(cfg, run_stop, lost, streaming).await;
    if leadership.as_ref().is_some_and(|l| l.lost.is_cancelled()) && result.is_ok() {
        result = Err(anyhow::anyhow!(
            "lost the leadership of the capture; restart to stand by"
        ));
    }
    admin_stop.cancel();
    if let Some(t) = admin_thread {
        let _ = t.join();
    }
    result
}

/// `lost` is cancelled when this instance is no longer the leader: then nothing more is
/// sent, not even what waits to be acknowledged (the next leader sends it).
/// Waits to lead; with `coordination.follow`, folds the topics into the store meanwhile
/// (`follow.rs`), and closes it before leading.
async fn lead(
    cfg: &Arc<ValidatedCdc>,
    co: &config::CoordinationConfig,
    stop: &CancellationToken,
) -> anyhow::Result<Option<leader::Leadership>> {
    let standing_by = CancellationToken::new();
    let follow_stop = CancellationToken::new();
    let follower = co.follow.then(|| {
        tokio::spawn(follow::run(
            cfg.clone(),
            standing_by.clone(),
            follow_stop.clone(),
        ))
    });
    let acquired = leader::acquire(co, &cfg.config.capture.slot, stop, &standing_by).await;
    follow_stop.cancel();
    if let Some(f) = follower {
        match f.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "Stopped following the topics"),
            Err(e) => tracing::warn!(error = %e, "The follower of the topics failed"),
        }
    }
    acquired
}

async fn capture(
    cfg: Arc<ValidatedCdc>,
    stop: CancellationToken,
    lost: CancellationToken,
    streaming: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    // Connecting, creating topics and resending the outbox can each wait on a server
    // that is away: SIGTERM stops them (whatever they left is picked up at the next start).
    let (mut capture, conn, plan) = tokio::select! {
        started = start(&cfg) => started?,
        _ = stop.cancelled() => {
            tracing::info!("Stopped before the capture started");
            return Ok(());
        }
    };
    if let Some(plan) = plan {
        if !run_snapshot(&mut capture, plan, &stop).await? {
            return Ok(());
        }
    }
    if stop.is_cancelled() {
        return Ok(());
    }
    record_snapshot_done(&capture);
    let sql = start_sql(&cfg, conn.server_version);
    streaming.store(true, Ordering::Relaxed);
    let r = stream::run(&mut capture, conn, &sql, stop, lost).await;
    streaming.store(false, Ordering::Relaxed);
    r
}

/// Everything before the snapshot and the stream: the catalog, the publication, the
/// store, the topics, the outbox resent, the slot; and what the snapshot must cover.
async fn start(
    cfg: &Arc<ValidatedCdc>,
) -> anyhow::Result<(Capture, ReplicationConn, Option<SnapshotPlan>)> {
    let c = &cfg.config;
    let catalog = catalog::connect(cfg).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL {}:{} database {}",
            c.postgres.host, c.postgres.port, c.postgres.dbname
        )
    })?;
    let schemas = catalog::tables(&catalog, &c.capture.tables).await?;
    for t in &schemas {
        if t.replica_identity == 'n' {
            anyhow::bail!(
                "table {} has REPLICA IDENTITY NOTHING: PostgreSQL refuses its updates and deletes once it is published; use DEFAULT",
                t.full_name()
            );
        }
    }
    catalog::ensure_publication(&catalog, &c.capture.publication, &schemas).await?;
    let store =
        Store::open(&c.capture.state_dir, c.capture.store_cache_mib << 20).with_context(|| {
            format!(
                "cannot open the key-state store in {}",
                c.capture.state_dir.display()
            )
        })?;
    let mut producer = producer::EventProducer::new(&c.kafka)?;
    let topics: Vec<String> = schemas
        .iter()
        .map(|t| cfg.topic(&t.schema, &t.name))
        .collect();
    producer.ensure_topics(&c.kafka, &topics).await?;
    // One record per slot, the newest the one that counts: compacted, never expired.
    producer
        .ensure_topics_with(
            &c.kafka,
            &[cfg.state_topic()],
            1,
            &[("cleanup.policy", "compact")],
        )
        .await?;
    let (store, rebuilt, have, rebuilt_now) =
        follow_the_topics(cfg, &catalog, &producer, &schemas, &topics, store).await?;
    tracing::info!(tables = %topics.join(", "), "Capturing");
    producer.set_store(store.id());
    let mut capture = Capture::new(cfg.clone(), catalog, schemas, store, producer);
    if rebuilt_now {
        // Every partition, those still empty too: a previous leader's late event is found
        // in one as well (`tail::unchanged_since`).
        let mut from = have.clone();
        for t in &topics {
            for p in 0..capture.producer.partitions(t) {
                from.entry((t.clone(), p)).or_insert(tail::Last {
                    seq: 0,
                    store: None,
                });
            }
        }
        capture.rebuilt_from = Some(from);
    }
    capture.rebuilt = rebuilt;
    // This instance captures the slot (alone, or elected).
    METRICS.cdc_leader.set(1);
    resend_outbox(&mut capture, &have).await?;
    let (conn, plan) = prepare_slot(&mut capture).await?;
    Ok((capture, conn, plan))
}

/// `START_REPLICATION` with pgoutput's options: protocol v2 with streaming of large
/// in-progress transactions on PostgreSQL 14+, v1 before.
fn start_sql(cfg: &ValidatedCdc, server_version: u32) -> String {
    let c = &cfg.config.capture;
    let proto = if server_version >= 140000 { 2 } else { 1 };
    let mut options = format!(
        "proto_version '{proto}', publication_names {}",
        quote_literal(&quote_ident(&c.publication))
    );
    if proto >= 2 && c.streaming {
        options.push_str(", streaming 'on'");
    }
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 ({options})",
        quote_ident(&c.slot)
    )
}

fn connect_params(cfg: &ValidatedCdc) -> ConnectParams {
    let p = &cfg.config.postgres;
    ConnectParams {
        host: p.host.clone(),
        port: p.port,
        user: p.user.clone(),
        password: cfg.password.as_ref().map(|s| s.expose().to_string()),
        dbname: p.dbname.clone(),
        application_name: "chgate-cdc".into(),
        connect_timeout: p.connect_timeout,
        tls: cfg.tls.clone(),
    }
}

/// The last event (by `chgate-seq`) in each partition of the captured topics.
type Highest = std::collections::HashMap<(String, i32), tail::Last>;

/// Checks the store against the topics. If they hold events it did not write (it is new:
/// a first start, a `state_dir` that was lost, a standby on another machine; or another
/// instance led since it last did), it cannot go on as it is:
///
/// - with the slot gone (a new one, and a new snapshot, follow), it numbers its events
///   after theirs: the tail check after a crash counts an outbox event as sent when its
///   partition holds a higher number, so numbers starting again at 1 would be skipped;
/// - with the slot there, it is rebuilt from the topics (`rebuild.rs`), which needs the
///   state record of the slot's snapshot (a table it does not say finished is reconciled).
///
/// Returns the store; what the topics hold that the server may send again (from this
/// rebuild, or kept from an earlier one); each partition's last event; and whether it was
/// rebuilt now.
async fn follow_the_topics(
    cfg: &Arc<ValidatedCdc>,
    catalog: &tokio_postgres::Client,
    producer: &producer::EventProducer,
    schemas: &[catalog::TableSchema],
    topics: &[String],
    mut store: Store,
) -> anyhow::Result<(Store, Option<rebuild::Rebuilt>, Highest, bool)> {
    let partitions: BTreeSet<(String, i32)> = topics
        .iter()
        .flat_map(|t| (0..producer.partitions(t)).map(move |p| (t.clone(), p)))
        .collect();
    let k = &cfg.config.kafka;
    let (brokers, props, rewind) = (k.brokers.clone(), k.properties.clone(), k.tail_rewind);
    let have = tokio::task::spawn_blocking(move || {
        tail::highest_seqs(&brokers, &props, &partitions, rewind)
    })
    .await??;
    let newest = have.values().max_by_key(|l| l.seq).copied();
    let highest = newest.map_or(0, |l| l.seq);
    // A standby's store that followed the topics (`follow.rs`) is a fold of them, never
    // the store of a leader: it catches up, whatever the tails say.
    let followed = store.meta("follow")?.is_some();
    if !followed && !behind(newest, store.last_numbered(), store.id()) {
        // A rebuild's knowledge of the topics, while the server may still send what they hold.
        let rebuilt = store
            .meta("rebuilt")?
            .and_then(|b| serde_json::from_slice::<rebuild::Rebuilt>(&b).ok())
            .filter(|r| r.pending(store.store_lsn()));
        return Ok((store, rebuilt, have, false));
    }
    let c = &cfg.config.capture;
    let Some(confirmed) = catalog::slot_confirmed(catalog, &c.slot).await? else {
        tracing::warn!(
            highest,
            "The topics already hold events, and the slot is new: numbering this store's after theirs"
        );
        store.number_events_after(highest);
        return Ok((store, None, have, false));
    };
    let with_events: BTreeSet<&str> = have.keys().map(|(t, _)| t.as_str()).collect();
    let snapshot = recorded_snapshot(cfg, schemas, &with_events).await?;
    if followed {
        tracing::info!("Taking over with the store this standby kept from the topics");
    } else {
        tracing::warn!(
            ours = store.last_numbered(),
            theirs = highest,
            store = %format!("{:016x}", store.id()),
            newest_by = %newest.and_then(|l| l.store).map_or("?".into(), |s| format!("{s:016x}")),
            "The topics hold events this key-state store did not write (a new state_dir, or \
             another instance led since): rebuilding it from them"
        );
    }
    let restart = catalog::slot_restart(catalog, &c.slot)
        .await?
        .unwrap_or(0)
        .min(confirmed);
    let topics_of = rebuild::topics_of(cfg, schemas, |t| producer.partitions(t));
    let plan = Rebuild {
        confirmed,
        restart,
        snapshot,
        highest,
    };
    let (store, rebuilt) = rebuild_store(cfg, topics_of, plan, store).await?;
    Ok((store, Some(rebuilt), have, true))
}

/// What a rebuild goes on from: the slot's positions, the recorded snapshot, the topics'
/// highest `chgate-seq`.
struct Rebuild {
    confirmed: u64,
    restart: u64,
    snapshot: Option<SnapshotState>,
    highest: u64,
}

/// Brings the store up to the topics' ends (`rebuild::catch_up`) and makes it the
/// capture's, at the slot's confirmed position.
async fn rebuild_store(
    cfg: &ValidatedCdc,
    topics_of: Vec<rebuild::TopicOf>,
    plan: Rebuild,
    mut store: Store,
) -> anyhow::Result<(Store, rebuild::Rebuilt)> {
    let started = std::time::Instant::now();
    let k = &cfg.config.kafka;
    let (brokers, props, with_schema) = (k.brokers.clone(), k.properties.clone(), k.with_schema);
    let (store, rebuilt, went_on) = tokio::task::spawn_blocking(move || {
        let never = std::sync::atomic::AtomicBool::new(false);
        let src = rebuild::Topics {
            brokers: &brokers,
            properties: &props,
            topics: &topics_of,
            with_schema,
        };
        let (follow, went_on) = rebuild::catch_up(&src, plan.restart, &mut store, &never)?;
        let rebuilt = follow.rebuilt;
        let snapshot = plan.snapshot.map(|s| serde_json::to_vec(&s)).transpose()?;
        let kept = serde_json::to_vec(&rebuilt)?;
        let highest = rebuilt.highest_seq.max(plan.highest);
        store.adopt(plan.confirmed, snapshot, Some(kept), highest)?;
        anyhow::Ok((store, rebuilt, went_on))
    })
    .await??;
    tracing::info!(
        events = rebuilt.events,
        rows = rebuilt.rows,
        from = %format_lsn(plan.confirmed),
        went_on_from_the_standby_fold = went_on,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuilt the key-state store from the topics"
    );
    Ok((store, rebuilt))
}

/// Whether the topics went on without this store (numbered up to `ours`, identity `id`):
/// their newest event is past its numbers, or was numbered by another store (topics
/// recreated, or a store kept from before its slot was): the store must not be used as it is.
fn behind(newest: Option<tail::Last>, ours: u64, id: u64) -> bool {
    newest.is_some_and(|l| l.seq > ours || l.store.is_some_and(|s| s != id))
}

/// The snapshot a rebuilt store goes on from: the state record's (`None` with
/// `snapshot = "never"`). A table whose topic holds events and whose snapshot the record
/// does not show finished (a chunk in flight when the store that wrote them stopped may be
/// partly in the topics, and nothing says which rows) is read again to reconcile the topics
/// with it (`capture/reconcile.rs`) rather than as a plain snapshot, which would publish its
/// rows twice. Without a record of the slot's snapshot at all, its row version is not
/// known: refused.
async fn recorded_snapshot(
    cfg: &ValidatedCdc,
    schemas: &[catalog::TableSchema],
    with_events: &BTreeSet<&str>,
) -> anyhow::Result<Option<SnapshotState>> {
    let c = &cfg.config;
    if c.capture.snapshot == SnapshotMode::Never {
        return Ok(None);
    }
    let (brokers, props, topic, slot) = (
        c.kafka.brokers.clone(),
        c.kafka.properties.clone(),
        cfg.state_topic(),
        c.capture.slot.clone(),
    );
    let record =
        tokio::task::spawn_blocking(move || rebuild::read_state(&brokers, &props, &topic, &slot))
            .await??;
    let recorded = record.and_then(|r| r.snapshot);
    let unfinished: Vec<String> = schemas
        .iter()
        .filter(|s| with_events.contains(cfg.topic(&s.schema, &s.name).as_str()))
        .map(|s| s.full_name())
        .filter(|name| {
            recorded
                .as_ref()
                .and_then(|r| r.tables.get(name))
                .is_none_or(|p| !p.done)
        })
        .collect();
    if unfinished.is_empty() {
        return Ok(Some(recorded.unwrap_or_default()));
    }
    let Some(mut state) = recorded else {
        anyhow::bail!(
            "the topics hold events that this instance's key-state store did not write (a new \
             state_dir, or another instance led since), and the state topic {} holds no record \
             of the snapshot of slot {} (so the version of the rows of {} is not known): give \
             this instance the state_dir of the one that wrote them, or start over (drop the \
             slot and the topics)",
            cfg.state_topic(),
            c.capture.slot,
            unfinished.join(", "),
        );
    };
    for name in &unfinished {
        // One above the table's last reconcile the record knows of (each records itself
        // before it publishes anything), or above the first snapshot's rows.
        let version = state.version_of(name).saturating_add(1);
        state
            .tables
            .insert(name.clone(), snapshot::TableProgress::reconciling(version));
    }
    let record = rebuild::StateRecord {
        slot: c.capture.slot.clone(),
        snapshot: Some(state.clone()),
        written_at_ms: envelope::now_ms(),
    };
    rebuild::record_state(
        &c.kafka.brokers,
        &c.kafka.properties,
        &cfg.state_topic(),
        &record,
    )
    .await
    .context("cannot record the reconcile in the state topic")?;
    tracing::warn!(
        tables = %unfinished.join(", "),
        "The state topic does not record the snapshot of these tables as finished, and their \
         topics hold some of its rows: each is read again and compared with what the topics \
         hold (a `u` event for a row changed since, a `d` for one gone, an `r` for one not \
         published yet, nothing for the rest)"
    );
    Ok(Some(state))
}

/// Records in the state topic that the snapshot is done and acknowledged (or that there
/// is none), so that a store can be rebuilt from the topics (`rebuild.rs`). Written each
/// time the stream starts, on a task of its own; a failure is logged, not fatal: it only
/// matters to a rebuild, which then says what is missing.
fn record_snapshot_done(capture: &Capture) {
    let c = &capture.cfg.config;
    let saved: Option<SnapshotState> = match capture.store.meta("snapshot") {
        Ok(b) => b.and_then(|b| serde_json::from_slice(&b).ok()),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the snapshot's progress");
            return;
        }
    };
    let snapshot = match (&c.capture.snapshot, saved) {
        (SnapshotMode::Never, _) => None,
        (SnapshotMode::Initial, Some(s)) if s.done() => Some(s),
        _ => return,
    };
    let record = state_record(capture, snapshot);
    let (kafka, topic) = (c.kafka.clone(), capture.cfg.state_topic());
    // Beside the stream, which need not wait for it (a producer's start and a round trip).
    tokio::spawn(async move {
        let r = rebuild::record_state(&kafka.brokers, &kafka.properties, &topic, &record).await;
        match r {
            Ok(()) => tracing::info!(
                topic,
                "Recorded the capture's state: a store can be rebuilt from the topics"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot record the capture's state: a store rebuilt from the topics will be refused")
            }
        }
    });
}

fn state_record(capture: &Capture, snapshot: Option<SnapshotState>) -> rebuild::StateRecord {
    rebuild::StateRecord {
        slot: capture.cfg.config.capture.slot.clone(),
        snapshot,
        written_at_ms: envelope::now_ms(),
    }
}

/// Writes the capture's state record (see `rebuild.rs`) and waits for the broker to have it.
async fn publish_state(capture: &Capture, snapshot: Option<SnapshotState>) -> anyhow::Result<()> {
    let c = &capture.cfg.config;
    let record = state_record(capture, snapshot);
    let topic = capture.cfg.state_topic();
    rebuild::record_state(&c.kafka.brokers, &c.kafka.properties, &topic, &record).await
}

/// After a crash: sends the outbox's events the broker does not have, and waits until it
/// has them all.
async fn resend_outbox(capture: &mut Capture, have: &Highest) -> anyhow::Result<()> {
    let events = capture.store.outbox()?;
    if events.is_empty() {
        return Ok(());
    }
    let (mut sent, mut skipped) = (0usize, 0usize);
    let mut by_unit: VecDeque<(u64, Vec<&store::OutboxEvent>)> = VecDeque::new();
    for e in &events {
        if e.seq
            <= have
                .get(&(e.topic.to_string(), e.partition))
                .map_or(0, |l| l.seq)
        {
            skipped += 1;
            continue;
        }
        match by_unit.back_mut() {
            Some((u, list)) if *u == e.unit => list.push(e),
            _ => by_unit.push_back((e.unit, vec![e])),
        }
    }
    let last = events.last().map_or(0, |e| e.seq);
    for (unit, list) in &by_unit {
        let last_seq = list.last().map_or(0, |e| e.seq);
        capture
            .producer
            .begin_unit(*unit, list.len(), None, last_seq, 0);
        for e in list {
            capture.producer.send(e).await?;
            sent += 1;
        }
    }
    while capture.producer.in_flight_units() > 0 {
        capture
            .producer
            .wait_ack(Duration::from_millis(200))
            .await?;
        capture.producer.take_done();
    }
    capture.store.acknowledged(last);
    capture.store.clear_acknowledged()?;
    tracing::info!(
        sent,
        already_in_kafka = skipped,
        "Sent the events of the last run that the broker did not have"
    );
    Ok(())
}

/// How often a slot creation that has not returned says what holds it up.
const SLOT_WAIT_REPORT: Duration = Duration::from_secs(10);

/// `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`. PostgreSQL answers only once every
/// transaction that was writing when it was asked has ended (server-wide), which under a
/// busy server or one forgotten open transaction takes a while: every 10 s the wait is
/// logged with the transactions it waits for.
async fn create_slot(
    conn: &mut ReplicationConn,
    catalog: &tokio_postgres::Client,
    slot: &str,
) -> anyhow::Result<Vec<pg::wire::TextRow>> {
    tracing::info!(slot, "Creating the replication slot");
    let started = std::time::Instant::now();
    let query = format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
        quote_ident(slot)
    );
    let create = conn.simple_query(&query);
    tokio::pin!(create);
    let mut report = tokio::time::interval_at(
        tokio::time::Instant::now() + SLOT_WAIT_REPORT,
        SLOT_WAIT_REPORT,
    );
    loop {
        tokio::select! {
            rows = &mut create => {
                return rows.with_context(|| format!("cannot create replication slot {slot:?}"));
            }
            _ = report.tick() => {
                let holding = catalog::transactions_holding_slot(catalog)
                    .await
                    .unwrap_or_else(|e| vec![format!("(cannot list them: {e})")]);
                tracing::warn!(
                    slot,
                    waited_s = started.elapsed().as_secs(),
                    transactions = %holding.join("; "),
                    "Still creating the replication slot: PostgreSQL waits for the transactions \
                     running when it was asked to end"
                );
            }
        }
    }
}

/// What the snapshot still has to do.
struct SnapshotPlan {
    state: SnapshotState,
    /// The slot's exported snapshot (a new slot); `None`: resume under new snapshots.
    exported: Option<String>,
}

/// Opens the replication connection; creates the slot (and plans the snapshot) if it is
/// missing, or plans the rest of an unfinished snapshot.
async fn prepare_slot(
    capture: &mut Capture,
) -> anyhow::Result<(ReplicationConn, Option<SnapshotPlan>)> {
    let cfg = capture.cfg.clone();
    let c = &cfg.config.capture;
    let slot_lsn = catalog::slot_confirmed(&capture.catalog, &c.slot).await?;
    let mut saved: Option<SnapshotState> = capture
        .store
        .meta("snapshot")?
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let (Some(_), Some(state), SnapshotMode::Initial) = (slot_lsn, &mut saved, &c.snapshot) {
        follow_captured_tables(capture, state).await?;
    }
    let mut conn = ReplicationConn::connect(&connect_params(&cfg))
        .await
        .context("cannot open the replication connection")?;
    let fresh = |consistent_lsn: u64, restart_lsn: u64, regimes: Vec<Regime>| SnapshotState {
        consistent_lsn,
        removed: BTreeMap::new(),
        row_version: Some(restart_lsn.saturating_sub(1)),
        tables: capture
            .tables
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TableProgress {
                        done: false,
                        after: None,
                        regimes: regimes.clone(),
                        reconcile: None,
                    },
                )
            })
            .collect(),
    };
    let plan = match slot_lsn {
        None => {
            // A new slot: nothing the store holds belongs to it.
            capture.store.reset()?;
            let rows = create_slot(&mut conn, &capture.catalog, &c.slot).await?;
            let row = rows
                .first()
                .context("CREATE_REPLICATION_SLOT returned no row")?;
            let consistent = row
                .get(1)
                .cloned()
                .flatten()
                .as_deref()
                .and_then(parse_lsn)
                .context("CREATE_REPLICATION_SLOT returned no consistent point")?;
            let exported = row.get(2).cloned().flatten();
            tracing::info!(slot = %c.slot, consistent_point = %format_lsn(consistent), "Created the replication slot");
            match c.snapshot {
                SnapshotMode::Never => None,
                SnapshotMode::Initial => {
                    let restart = slot_start(capture, &c.slot).await?;
                    let state = fresh(
                        consistent,
                        restart,
                        vec![Regime {
                            from: None,
                            snapshot: None,
                            lsn_at: 0,
                        }],
                    );
                    record_state(capture, &state).await?;
                    Some(SnapshotPlan { state, exported })
                }
            }
        }
        Some(confirmed) => match saved {
            Some(state) if !state.done() => {
                tracing::info!("Resuming the snapshot where it stopped");
                Some(SnapshotPlan {
                    state,
                    exported: None,
                })
            }
            Some(state) => {
                if state.check_until() > capture.store.store_lsn() {
                    capture.snapshot = Some(state);
                }
                None
            }
            // The slot was created, but the process died before it recorded the snapshot.
            None if c.snapshot == SnapshotMode::Initial
                && capture.store.store_lsn() == 0
                && capture.store.rows_on_disk()? == 0 =>
            {
                let restart = slot_start(capture, &c.slot).await?;
                let state = fresh(confirmed, restart, Vec::new());
                record_state(capture, &state).await?;
                Some(SnapshotPlan {
                    state,
                    exported: None,
                })
            }
            None => None,
        },
    };
    Ok((conn, plan))
}

/// The slot's restart LSN, before the capture confirms anything on it: no change the slot
/// sends is below it (PostgreSQL decodes from there, and a slot being created waits for
/// every transaction that began before it to end).
async fn slot_start(capture: &Capture, slot: &str) -> anyhow::Result<u64> {
    catalog::slot_restart(&capture.catalog, slot)
        .await
        .with_context(|| format!("cannot read the restart LSN of replication slot {slot:?}"))?
        .with_context(|| format!("replication slot {slot:?} has no restart LSN"))
}

/// Brings a saved snapshot's tables in line with the tables captured now. One added after
/// the snapshot began is read too, under a snapshot of its own taken at its turn (a
/// regime, as for a resumed table): the stream brings its changes from when the
/// publication took it in, and those the new snapshot already saw are skipped. One no
/// longer captured is forgotten (else the snapshot would never be done), so it is read
/// again if it comes back: reconciled with the rows the store kept of it
/// (`capture/reconcile.rs`), not published twice.
async fn follow_captured_tables(
    capture: &mut Capture,
    state: &mut SnapshotState,
) -> anyhow::Result<()> {
    let captured = |name: &String| capture.tables.iter().any(|t| &t.name == name);
    let removed: Vec<String> = state
        .tables
        .keys()
        .filter(|n| !captured(n))
        .cloned()
        .collect();
    let added: Vec<String> = capture
        .tables
        .iter()
        .filter(|t| !state.tables.contains_key(&t.name))
        .map(|t| t.name.clone())
        .collect();
    if added.is_empty() && removed.is_empty() {
        return Ok(());
    }
    for name in &removed {
        // Its events so far: below the store's position, or at its reconcile's version.
        let reconciled = state.reconciling(name).map_or(0, |r| r.version);
        state.tables.remove(name);
        let below = capture.store.store_lsn().max(reconciled);
        state.removed.insert(name.clone(), below);
    }
    let mut returning = Vec::new();
    for name in &added {
        // Back after it was taken out: the store holds its rows as last captured, every
        // event of it published below the store's position then (not known if it was
        // taken out by a version of chgate before this record: the position now).
        let out_since = state.removed.remove(name);
        let progress = if capture.mark_found(name).await? {
            returning.push(name.clone());
            let below = out_since.unwrap_or_else(|| capture.store.store_lsn());
            TableProgress::reconciling(below.max(state.row_version()).saturating_add(1))
        } else {
            TableProgress {
                done: false,
                after: None,
                regimes: Vec::new(),
                reconcile: None,
            }
        };
        state.tables.insert(name.clone(), progress);
    }
    record_state(capture, state).await?;
    if !added.is_empty() {
        tracing::info!(tables = %added.join(", "), "Tables new to the capture: their existing rows are read first");
    }
    if !returning.is_empty() {
        tracing::info!(tables = %returning.join(", "), "Tables back in the capture: their rows are read again and compared with what the capture last published");
    }
    if !removed.is_empty() {
        tracing::info!(tables = %removed.join(", "), "Tables no longer captured: their snapshot progress is forgotten");
    }
    Ok(())
}

/// Records the snapshot's progress in the store, and in the state topic (waiting for the
/// broker to have it), before any row of it is published: a rebuild must never take an
/// earlier record (of a slot since created anew, say) for this snapshot's.
async fn record_state(capture: &mut Capture, state: &SnapshotState) -> anyhow::Result<()> {
    capture
        .store
        .put_meta("snapshot", serde_json::to_vec(state)?);
    capture.close_unit(None, 0);
    capture.store.commit()?;
    publish_state(capture, Some(state.clone()))
        .await
        .context("cannot record the snapshot's start in the state topic")
}

/// Reads every unfinished table, `snapshot_parallel` at a time; returns false if `stop`
/// came first (progress so far is kept).
async fn run_snapshot(
    capture: &mut Capture,
    plan: SnapshotPlan,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let cfg = capture.cfg.clone();
    let c = &cfg.config.capture;
    if let Some(before) = &capture.rebuilt_from {
        // Before this instance publishes anything over a rebuilt store.
        let k = &cfg.config.kafka;
        tail::unchanged_since(&k.brokers, &k.properties, k.tail_rewind, before, None).await?;
    }
    let mut state = plan.state;
    let mut todo: VecDeque<usize> = (0..capture.tables.len())
        .filter(|&i| {
            state
                .tables
                .get(&capture.tables[i].name)
                .is_none_or(|p| !p.done)
        })
        .collect();
    METRICS.cdc_snapshot_tables_pending.set(todo.len() as i64);
    tracing::info!(
        tables = todo.len(),
        consistent_point = %format_lsn(state.consistent_lsn),
        row_version = state.row_version(),
        "Snapshot of the existing rows"
    );
    // One chunk read ahead: the reading tasks turn rows into events faster than they are
    // applied, and each waiting chunk holds its rows and events (tens of MiB at 50,000 rows).
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Chunk>>(1);
    let mut running = 0;
    let start = |capture: &Capture, i: usize, state: &SnapshotState| {
        let table = capture.tables[i].schema.clone();
        let layout = capture.tables[i].layout.clone();
        let events = snapshot::EventShape {
            envelope: Arc::clone(&capture.tables[i].envelope),
            with_schema: capture.with_schema(),
            partitions: capture.producer.partitions(&capture.tables[i].topic),
            version: state.version_of(&capture.tables[i].name),
        };
        let after = state
            .tables
            .get(&capture.tables[i].name)
            .and_then(|p| p.after.clone());
        let (tx, exported, chunk_rows, cfg) = (
            tx.clone(),
            plan.exported.clone(),
            c.snapshot_chunk_rows,
            cfg.clone(),
        );
        tokio::spawn(async move {
            match catalog::connect(&cfg).await {
                Ok(client) => {
                    let read = snapshot::TableRead {
                        index: i,
                        table,
                        layout,
                        events,
                        after,
                        snapshot: exported,
                        chunk_rows,
                    };
                    snapshot::read_table(client, read, tx).await
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(anyhow::Error::new(e).context("snapshot connection")))
                        .await;
                }
            }
        });
    };
    // A reconcile that read every row before a restart goes on with its deletes, without
    // reading again.
    for i in todo.clone() {
        if state
            .reconciling(&capture.tables[i].name)
            .is_some_and(|r| r.read)
        {
            sweep(capture, i, &mut state).await?;
            todo.retain(|&t| t != i);
            METRICS.cdc_snapshot_tables_pending.dec();
        }
    }
    while running < c.snapshot_parallel {
        let Some(i) = todo.pop_front() else { break };
        start(capture, i, &state);
        running += 1;
    }
    // The previous chunk's commit, written on a blocking thread while the next chunk is
    // turned into events on this one; its events are sent when it is back.
    let mut writing: Option<Writing> = None;
    while running > 0 {
        let chunk = tokio::select! {
            _ = stop.cancelled() => {
                finish_writing(capture, &mut writing).await?;
                drain_acks(capture).await?;
                return Ok(false);
            }
            chunk = rx.recv() => chunk,
            r = capture.producer.wait_ack(Duration::from_millis(100)) => {
                r?;
                capture.settle()?;
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        let (last, table) = (chunk.last, chunk.table);
        capture.apply_chunk(chunk, &mut state).await?;
        finish_writing(capture, &mut writing).await?;
        writing = capture
            .store
            .begin_commit()
            .map(|job| tokio::task::spawn_blocking(move || job.write()));
        capture.settle()?;
        crate::failpoint::reach("cdc.snapshot_chunk").await;
        if last && state.reconciling(&capture.tables[table].name).is_some() {
            finish_writing(capture, &mut writing).await?;
            sweep(capture, table, &mut state).await?;
        }
        if last {
            running -= 1;
            METRICS.cdc_snapshot_tables_pending.dec();
            if let Some(i) = todo.pop_front() {
                start(capture, i, &state);
                running += 1;
            }
        }
    }
    finish_writing(capture, &mut writing).await?;
    drain_acks(capture).await?;
    tracing::info!("Snapshot done");
    if state.check_until() > 0 {
        capture.snapshot = Some(state);
    }
    Ok(true)
}

/// Deletes the rows of a reconciled table that were not read again, a batch per commit
/// (`Capture::sweep_step`); the table is done with the last.
async fn sweep(capture: &mut Capture, t: usize, state: &mut SnapshotState) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let done = capture.sweep_step(t, &mut after, state)?;
        capture.flush().await?;
        capture.settle()?;
        if done {
            return Ok(());
        }
    }
}

/// A snapshot chunk's commit on a blocking thread.
type Writing = tokio::task::JoinHandle<Result<store::CommitJob, store::StoreError>>;

/// Waits for the commit on its way, if any, and sends its events.
async fn finish_writing(
    capture: &mut Capture,
    writing: &mut Option<Writing>,
) -> anyhow::Result<()> {
    if let Some(w) = writing.take() {
        let job = w
            .await
            .map_err(|e| anyhow::anyhow!("the store's commit: {e}"))??;
        let committed = capture.store.finish_commit(job);
        capture.send(committed).await?;
    }
    Ok(())
}

/// Waits until everything sent is acknowledged.
async fn drain_acks(capture: &mut Capture) -> anyhow::Result<()> {
    capture.flush().await?;
    while capture.producer.in_flight_units() > 0 {
        capture
            .producer
            .wait_ack(Duration::from_millis(200))
            .await?;
        capture.settle()?;
    }
    capture.store.clear_acknowledged()?;
    Ok(())
}

/// The admin listener's view: `/metrics`, `/healthz`, `/readyz` (ready while streaming).
struct Admin {
    streaming: Arc<AtomicBool>,
}

impl AdminSource for Admin {
    fn clusters(&self) -> Arc<crate::picker::Clusters> {
        Arc::new(crate::picker::Clusters::default())
    }

    fn readiness(&self) -> Result<(), &'static str> {
        if self.streaming.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not streaming yet (connecting, or taking the snapshot)")
        }
    }

    fn token(&self) -> Option<crate::secret::Secret> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_behind_the_topics_when_their_newest_event_is_not_its_own() {
        let last = |seq, store| Some(tail::Last { seq, store });
        // Empty topics, or the store's own events last: it goes on.
        assert!(!behind(None, 10, 7));
        assert!(!behind(last(10, Some(7)), 10, 7));
        assert!(!behind(last(8, None), 10, 7));
        // Events past its numbers (a new store, or another led since).
        assert!(behind(last(11, Some(9)), 10, 7));
        assert!(behind(last(11, None), 10, 7));
        // Another store's events, numbered below this one's (topics recreated since).
        assert!(behind(last(5, Some(9)), 10, 7));
    }
}
