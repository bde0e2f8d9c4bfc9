//! The replication stream after the snapshot: frames in, transactions applied in commit
//! order, the broker's acknowledgements turned into store writes and slot confirmations.
//!
//! A transaction the server sends whole (after its commit) is applied as it arrives. One
//! it streams while still in progress (protocol v2, `capture.streaming`) is kept until its
//! Stream Commit as the messages came (`spill.rs`: in memory, past `capture.spill_bytes` on
//! disk), with each message's subtransaction so a rolled-back subtransaction's changes go,
//! and dropped on Stream Abort. Transactions that end at or before the store's position are
//! already in Kafka (the server sends them again after a crash) and are skipped.
//!
//! While idle (nothing in flight, no transaction open), the server's keepalive position is
//! confirmed, and a heartbeat message (`pg_logical_emit_message`) every `capture.heartbeat`
//! makes sure there is a newer one: the slot keeps advancing while the captured tables
//! are quiet and others are busy, so it does not hold WAL back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::capture::{commit_ms, Capture, Change, TxInfo};
use super::catalog::format_lsn;
use super::envelope::now_ms;
use super::pg::pgoutput::{self, Decoder, Frame, Logical};
use super::pg::wire::ReplicationConn;
use super::spill::{self, Streamed};
use crate::metrics::METRICS;

/// The transaction of a relation description, which needs none.
const NO_TX: TxInfo = TxInfo {
    xid: 0,
    commit_lsn: 0,
    commit_ts_ms: 0,
};

/// Events, and bytes of rows and events, of one transaction per store commit at most: a
/// bigger transaction is committed (and its events sent) in slices of this size, so it
/// never has to fit in memory, and a unit's outbox record stays far below the 1 GiB its
/// reader takes (20,000 updates of 100 KiB documents would be 4 GiB).
const SLICE_EVENTS: usize = 20_000;
const SLICE_BYTES: usize = 64 << 20;

/// Closed units hold this many events, or bytes: commit them now rather than at the next
/// tick.
const FLUSH_EVENTS: usize = 5_000;
const FLUSH_BYTES: usize = 64 << 20;

/// How long the broker may acknowledge nothing before the capture says so (and again).
const STALL_WARNING: Duration = Duration::from_secs(30);

struct Stream<'a> {
    capture: &'a mut Capture,
    conn: ReplicationConn,
    decoder: Decoder,
    /// The transaction being received (sent whole), and whether it is already in Kafka.
    current: Option<(TxInfo, bool)>,
    /// Row changes of the current transaction so far, and how many of them a slice
    /// committed before a crash already holds.
    applied: u64,
    skip: u64,
    /// The transaction cut into slices before the last crash: (commit LSN, changes in).
    partial: Option<(u64, u64)>,
    /// Inside a stream block: the top-level transaction it belongs to.
    stream_top: Option<u32>,
    streamed: HashMap<u32, Streamed>,
    /// Where a streamed transaction past `spill_limit` bytes goes.
    spill_dir: std::path::PathBuf,
    spill_limit: usize,
    confirmed: u64,
    /// The last event acknowledged.
    acked_seq: u64,
    /// When [`Stream::warn_if_stalled`] last warned.
    stall_warned: Instant,
    sent_status: u64,
    server_end: u64,
    last_commit_ms: i64,
}

/// Streams from the slot's confirmed position until `stop`; then drains: waits for the
/// broker to acknowledge what was sent, writes it and confirms it (unless `lost`: the
/// leadership went).
pub async fn run(
    capture: &mut Capture,
    mut conn: ReplicationConn,
    start_sql: &str,
    stop: CancellationToken,
    lost: CancellationToken,
) -> anyhow::Result<()> {
    conn.start_replication(start_sql).await?;
    if let Some(before) = capture.rebuilt_from.take() {
        let k = &capture.cfg.config.kafka;
        // Racing: a previous leader's event that landed in a partition after the check
        // before the snapshot, and before this instance's first event there, is hidden
        // behind ours. That leader stopped when its session expired, a session timeout
        // before this instance led, so its last events landed long before.
        let own = Some(capture.store.id());
        super::tail::unchanged_since(&k.brokers, &k.properties, k.tail_rewind, &before, own)
            .await?;
    }
    let confirmed = capture.store.store_lsn();
    let capture_last = capture.store.last_numbered();
    let partial = capture.store.meta("partial")?.and_then(|b| {
        let lsn = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let n = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
        Some((lsn, n))
    });
    let spill_dir = capture.cfg.config.capture.state_dir.join("spill");
    let spill_limit = capture.cfg.config.capture.spill_bytes.max(1);
    spill::clear(&spill_dir).with_context(|| format!("cannot empty {}", spill_dir.display()))?;
    tracing::info!(from = %format_lsn(confirmed), "Streaming changes");
    super::slot::warn_if_far_behind(&capture.catalog, &capture.cfg.config.capture.slot).await;
    let mut s = Stream {
        capture,
        conn,
        decoder: Decoder::default(),
        current: None,
        applied: 0,
        skip: 0,
        partial,
        stream_top: None,
        streamed: HashMap::new(),
        spill_dir,
        spill_limit,
        confirmed,
        // Everything numbered so far is in (sent again, or drained after the snapshot).
        acked_seq: capture_last,
        stall_warned: Instant::now()
            .checked_sub(STALL_WARNING)
            .unwrap_or_else(Instant::now),
        sent_status: 0,
        server_end: confirmed,
        last_commit_ms: 0,
    };
    let result = s.run(&stop).await;
    if lost.is_cancelled() {
        // Another instance leads, or soon will: what this one has not had acknowledged is
        // dropped with its producer, and sent by the next leader (which may have read the
        // topics already: nothing may land behind its back).
        tracing::warn!("No longer the leader: stopping without sending or confirming more");
        return result;
    }
    s.drain().await;
    result
}

impl Stream<'_> {
    async fn run(&mut self, stop: &CancellationToken) -> anyhow::Result<()> {
        let cfg = self.capture.cfg.config.capture.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat_every = if cfg.heartbeat.is_zero() {
            Duration::from_secs(86400 * 365)
        } else {
            cfg.heartbeat
        };
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut slot_check = tokio::time::interval(Duration::from_secs(10));
        let mut last_status = Instant::now();
        loop {
            // Biased, with the stream last: while the server has a backlog to send, the
            // stream is always ready, and the timers and acknowledgements must still come
            // first when due, or nothing would be committed, confirmed or heartbeated
            // until the backlog ends.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    self.capture.flush().await?;
                    self.settle()?;
                    if self.idle() {
                        self.capture.store.clear_acknowledged()?;
                    }
                    let due = last_status.elapsed() >= cfg.status_interval;
                    if self.confirmed != self.sent_status || due {
                        self.conn.send_status(self.confirmed, false).await?;
                        self.sent_status = self.confirmed;
                        last_status = Instant::now();
                    }
                    self.lag_metrics();
                    self.warn_if_stalled();
                }
                r = self.capture.producer.wait_ack(Duration::from_millis(50)) => {
                    r?;
                    self.settle()?;
                }
                _ = heartbeat.tick(), if !cfg.heartbeat.is_zero() => {
                    if let Err(e) = self.capture.catalog
                        .batch_execute("SELECT pg_logical_emit_message(false, 'chgate_heartbeat', '')")
                        .await
                    {
                        tracing::warn!(error = %e, "Heartbeat failed");
                    }
                }
                _ = slot_check.tick() => super::slot::slot_metrics(&self.capture.catalog, &cfg.slot).await,
                data = self.conn.copy_data() => match data? {
                    Some(d) => {
                        self.frame(d).await?;
                        let store = &self.capture.store;
                        if store.uncommitted_events() >= FLUSH_EVENTS
                            || store.uncommitted_bytes() >= FLUSH_BYTES
                        {
                            self.capture.flush().await?;
                        }
                    }
                    None => anyhow::bail!("the server ended the replication stream"),
                },
            }
        }
    }

    /// Says so, every [`STALL_WARNING`], while the broker acknowledges nothing (librdkafka
    /// retries for ever: `message.timeout.ms = 0`), which nothing else would show.
    fn warn_if_stalled(&mut self) {
        let Some((waited, events)) = self.capture.producer.stalled() else {
            return;
        };
        if waited >= STALL_WARNING && self.stall_warned.elapsed() >= STALL_WARNING {
            self.stall_warned = Instant::now();
            tracing::warn!(
                waited_s = waited.as_secs(),
                events,
                confirmed = %format_lsn(self.confirmed),
                "The broker has acknowledged no event for a while: the slot's position stays \
                 where it is until it does"
            );
        }
    }

    fn idle(&self) -> bool {
        self.current.is_none()
            && self.capture.producer.in_flight_units() == 0
            && !self.capture.store.has_uncommitted()
            && self.capture.store.open_events() == 0
    }

    /// Takes the acknowledgements: the position they complete is confirmed next.
    fn settle(&mut self) -> anyhow::Result<()> {
        let Some(done) = self.capture.settle()? else {
            return Ok(());
        };
        let events = done.last_seq > self.acked_seq;
        self.acked_seq = self.acked_seq.max(done.last_seq);
        if let Some(lsn) = done.lsn.filter(|&l| l > self.confirmed) {
            if events {
                // Events in Kafka that the slot does not count as sent yet (a test kills
                // the capture here: the next one gets them again from the server).
                if let Some(d) = crate::failpoint::reach_now("cdc.acked_not_confirmed") {
                    std::thread::sleep(d);
                }
            }
            self.confirmed = lsn;
        }
        Ok(())
    }

    fn lag_metrics(&self) {
        METRICS
            .cdc_lag_bytes
            .set(self.server_end.saturating_sub(self.confirmed) as i64);
        METRICS.cdc_confirmed_lsn.set(self.confirmed as i64);
        let lag = if self.idle() || self.last_commit_ms == 0 {
            0.0
        } else {
            (now_ms() - self.last_commit_ms).max(0) as f64 / 1000.0
        };
        METRICS.cdc_lag_seconds.set(lag);
    }

    async fn frame(&mut self, data: Bytes) -> anyhow::Result<()> {
        match pgoutput::frame(data)? {
            Frame::Keepalive { end, reply } => {
                self.server_end = self.server_end.max(end);
                if self.idle() && end > self.confirmed {
                    self.confirmed = end;
                }
                if reply {
                    self.conn.send_status(self.confirmed, false).await?;
                    self.sent_status = self.confirmed;
                }
                Ok(())
            }
            Frame::XLogData { start, end, data } => {
                self.server_end = self.server_end.max(end);
                let m = self.decoder.decode(data.clone())?;
                match (self.stream_top, m.stream_xid()) {
                    // Kept as it came until the transaction commits (or rolls back).
                    (Some(top), Some(sub)) => {
                        let (dir, limit) = (&self.spill_dir, self.spill_limit);
                        self.streamed
                            .entry(top)
                            .or_insert_with(|| Streamed::new(top, dir, limit))
                            .push(sub, start, &data)
                            .with_context(|| {
                                format!(
                                    "cannot keep streamed transaction {top} in {}",
                                    dir.display()
                                )
                            })
                    }
                    _ => self.message(start, m).await,
                }
            }
        }
    }

    async fn message(&mut self, lsn: u64, m: Logical) -> anyhow::Result<()> {
        let store_lsn = self.capture.store.store_lsn();
        match m {
            Logical::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                let info = TxInfo {
                    xid,
                    commit_lsn: final_lsn,
                    commit_ts_ms: commit_ms(commit_ts),
                };
                self.current = Some((info, final_lsn < store_lsn));
                self.begin_counting(final_lsn);
            }
            Logical::Commit {
                end_lsn, commit_ts, ..
            } => {
                if let Some((_, done_before)) = self.current.take() {
                    let kind = if done_before {
                        "already_published"
                    } else {
                        "whole"
                    };
                    METRICS.cdc_transactions.with_label_values(&[kind]).inc();
                    if !done_before {
                        self.capture.close_unit(Some(end_lsn), commit_ms(commit_ts));
                        self.last_commit_ms = commit_ms(commit_ts);
                    }
                }
            }
            Logical::Relation { .. }
            | Logical::Insert { .. }
            | Logical::Update { .. }
            | Logical::Delete { .. }
            | Logical::Truncate { .. } => {
                if let Some(change) = as_change(lsn, m) {
                    self.change(change).await?;
                }
            }
            Logical::StreamStart { xid } => self.stream_top = Some(xid),
            Logical::StreamStop => self.stream_top = None,
            Logical::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
            } => {
                let tx = self
                    .streamed
                    .remove(&xid)
                    .unwrap_or_else(|| Streamed::new(xid, &self.spill_dir, self.spill_limit));
                let kind = if commit_lsn >= store_lsn {
                    "streamed"
                } else {
                    "already_published"
                };
                METRICS.cdc_transactions.with_label_values(&[kind]).inc();
                if commit_lsn < store_lsn {
                    // Already in Kafka; its relation descriptions still count from now on.
                    let mut replay = tx.replay()?;
                    let mut decoder = pgoutput::Decoder::in_stream();
                    while let Some((_, message)) = replay.next_message()? {
                        if let Logical::Relation { relation, .. } = decoder.decode(message)? {
                            self.capture
                                .apply(NO_TX, Change::Relation(relation))
                                .await?;
                        }
                    }
                } else {
                    self.apply_streamed(
                        TxInfo {
                            xid,
                            commit_lsn,
                            commit_ts_ms: commit_ms(commit_ts),
                        },
                        tx,
                        end_lsn,
                    )
                    .await?;
                }
            }
            Logical::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                    METRICS
                        .cdc_transactions
                        .with_label_values(&["aborted"])
                        .inc();
                } else if let Some(tx) = self.streamed.get_mut(&xid) {
                    tx.abort_subtransaction(subxid);
                }
            }
            Logical::Type { .. } | Logical::Origin | Logical::Message { .. } => {}
        }
        Ok(())
    }

    /// A transaction starts being applied: if slices of it were committed before a crash,
    /// that many of its row changes are already in.
    fn begin_counting(&mut self, commit_lsn: u64) {
        self.applied = 0;
        self.skip = match self.partial {
            Some((lsn, n)) if lsn == commit_lsn => n,
            _ => 0,
        };
    }

    /// Applies a change of the current transaction: row changes already committed by a
    /// slice before a crash are skipped, and a big transaction is cut into slices.
    async fn apply(&mut self, info: TxInfo, change: Change) -> anyhow::Result<()> {
        match change {
            Change::Relation(_) => return self.capture.apply(info, change).await,
            Change::Truncate { lsn, relations } => {
                return self.truncate(info, lsn, relations).await
            }
            _ => {}
        }
        self.applied += 1;
        if self.applied <= self.skip {
            return Ok(());
        }
        self.capture.apply(info, change).await?;
        self.slice_if_full(info, self.applied).await.map(drop)
    }

    /// A TRUNCATE, counted as one change per table. A table's rows are deleted in
    /// batches, and the transaction is sliced between them when the unit is full: such a
    /// slice counts the table as not applied yet, so after a crash its truncate is applied
    /// again, to the rows the store still holds.
    async fn truncate(
        &mut self,
        info: TxInfo,
        lsn: u64,
        relations: Vec<u32>,
    ) -> anyhow::Result<()> {
        for relation in relations {
            self.applied += 1;
            if self.applied <= self.skip {
                continue;
            }
            let Some(mut run) = self.capture.begin_truncate(info, lsn, relation)? else {
                continue;
            };
            while !self.capture.truncate_step(&mut run)? {
                if self.slice_if_full(info, self.applied - 1).await? {
                    crate::failpoint::reach("cdc.truncate_sliced").await;
                }
            }
            self.slice_if_full(info, self.applied).await?;
        }
        Ok(())
    }

    /// Commits the transaction's changes so far as a slice (`applied` of them in) if the
    /// open unit is full; whether it was.
    async fn slice_if_full(&mut self, info: TxInfo, applied: u64) -> anyhow::Result<bool> {
        let store = &self.capture.store;
        if store.open_events() < SLICE_EVENTS && store.open_bytes() < SLICE_BYTES {
            return Ok(false);
        }
        self.capture
            .close_slice(info.commit_lsn, applied, info.commit_ts_ms);
        self.capture.flush().await?;
        Ok(true)
    }

    /// A change of the transaction being received.
    async fn change(&mut self, change: Change) -> anyhow::Result<()> {
        match (self.current, change) {
            (Some((info, false)), change) => self.apply(info, change).await,
            // pgoutput describes a relation once per session, in the first transaction that
            // touches it: the description counts even when the transaction is one already
            // in Kafka (after a restart), or every later change of the table has none.
            (_, Change::Relation(r)) => self.capture.apply(NO_TX, Change::Relation(r)).await,
            (Some((_, true)), _) => Ok(()),
            (None, _) => anyhow::bail!("a row change outside a transaction"),
        }
    }

    async fn apply_streamed(
        &mut self,
        info: TxInfo,
        tx: Streamed,
        end_lsn: u64,
    ) -> anyhow::Result<()> {
        // Relations described inside the transaction stay described once it commits:
        // pgoutput marks them sent for the whole session then, and does not send them again.
        self.begin_counting(info.commit_lsn);
        if tx.spilled() > 0 {
            tracing::info!(
                xid = info.xid,
                spilled_bytes = tx.spilled(),
                "Reading a streamed transaction back from disk"
            );
        }
        let mut replay = tx.replay()?;
        let mut decoder = pgoutput::Decoder::in_stream();
        while let Some((lsn, message)) = replay.next_message()? {
            if let Some(change) = as_change(lsn, decoder.decode(message)?) {
                self.apply(info, change).await?;
            }
        }
        self.capture.close_unit(Some(end_lsn), info.commit_ts_ms);
        self.last_commit_ms = info.commit_ts_ms;
        Ok(())
    }

    /// After `stop`: wait (up to 30 s) for the broker to acknowledge everything sent,
    /// write it, confirm it and end the stream.
    async fn drain(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        if let Err(e) = self.capture.flush().await {
            tracing::warn!(error = %e, "Cannot commit the last changes; they are sent again after the restart");
        }
        while self.capture.producer.in_flight_units() > 0 && Instant::now() < deadline {
            if self
                .capture
                .producer
                .wait_ack(Duration::from_millis(100))
                .await
                .is_err()
            {
                break;
            }
            if self.settle().is_err() {
                break;
            }
        }
        let _ = self.settle();
        let _ = self.capture.store.clear_acknowledged();
        let _ = self.conn.send_status(self.confirmed, false).await;
        tracing::info!(confirmed = %format_lsn(self.confirmed), "Stream drained");
        self.conn.close().await;
    }
}

/// The change a row or relation message is; `None` for the others.
fn as_change(lsn: u64, m: Logical) -> Option<Change> {
    Some(match m {
        Logical::Relation { relation, .. } => Change::Relation(relation),
        Logical::Insert { relation, new, .. } => Change::Insert { lsn, relation, new },
        Logical::Update {
            relation, old, new, ..
        } => Change::Update {
            lsn,
            relation,
            old,
            new,
        },
        Logical::Delete { relation, old, .. } => Change::Delete { lsn, relation, old },
        Logical::Truncate { relations, .. } => Change::Truncate { lsn, relations },
        _ => return None,
    })
}
