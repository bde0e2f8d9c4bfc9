//! A table read again to bring the topics in line with it, when another instance's snapshot
//! of it stopped part way (a standby taking over mid-snapshot with a `state_dir` of its
//! own, its store rebuilt from the topics).
//!
//! The topics then hold some of that snapshot's rows, and nothing says which: a chunk in
//! flight may be in some partitions and not others. Reading the table again as a plain
//! snapshot would publish those rows twice; not reading it would miss the rest. So the
//! table is read again, under snapshots of this instance's own (regimes, as a resumed
//! snapshot is), and each row is compared with what the store holds for its key, which
//! is what the topics hold:
//!
//! - the same row: nothing is published (the row is marked as read again);
//! - another row (the table changed since the first snapshot read it): a `u` event whose
//!   `before` is the published row;
//! - no row for the key: the row's `r` event, as in any snapshot;
//! - and, once the table is read to its end, every stored row not read again (deleted
//!   since) gets a `d` event with it as `before` ([`Capture::sweep_step`]).
//!
//! The same goes for a table that comes back to the capture after it was taken out: the
//! store still holds its rows as the capture last saw them, and the table changed unseen.
//!
//! Versions: every event of a reconcile carries one version `v` (a key gets at most one
//! event per reconcile: a key read is not read again, the sweep takes only keys not read,
//! and once every row was read a restart goes on with the sweep without reading again).
//! `v` must lie above every version the table's topic holds for the key, and below every
//! change of the key the stream still sends that the new snapshot did not see:
//!
//! - after a takeover mid-snapshot, the topic holds the first snapshot's rows at its row
//!   version `rv` (one below the slot's restart LSN when it was planned) and the events of
//!   earlier reconciles, each at one more than the one before; the state record says which
//!   was the last (it is written before a reconcile publishes anything), so `v` is one
//!   more. The stream sends changes at their WAL records' LSNs, from the slot's restart
//!   LSN on: `rv + 1` is that of a `running_xacts` record, and the next change lies at
//!   least a record's length (24 bytes) above it, so some twenty reconciles of one
//!   snapshot fit below it;
//! - a table that comes back to the capture: its events were all published before it was
//!   taken out, below the store's position then (kept in the snapshot state), and `v` is
//!   one more. A change of a key the new snapshot saw differ (or appear) was made while the
//!   table was out, after that position, and any later change of the key follows its
//!   commit (row locks), above `v`.
//!
//! Changes the new snapshot saw are skipped by the stream (the regime's visibility check).
//!
//! The stored rows the reconcile has not read again are those marked with regime 0 (the
//! placeholder [`super::super::snapshot::TableProgress::reconciling`] puts first: what the
//! rebuild found in the topics, or what [`Capture::mark_found`] marked) or as streamed (a
//! table captured before, whose topic holds an earlier capture's changes); the stream does
//! not run during a snapshot, so no row of the table is marked streamed by this one.

use std::sync::Arc;

use super::{Capture, StoredRow, TRUNCATE_BATCH, TRUNCATE_BATCH_BYTES};
use crate::cdc::envelope::{now_ms, Source};
use crate::cdc::snapshot::{ChunkEvent, SnapshotState};
use crate::metrics::METRICS;

/// The regime that stands for the rows found in the topics, not read again yet.
const FOUND_IN_TOPICS: u8 = 0;

impl Capture {
    /// One row of a chunk of a table being reconciled (read under regime `regime`; the
    /// snapshot's row version `version`), with its `r` event, published only if the
    /// topics have no row for its key.
    pub(super) fn reconcile_row(
        &mut self,
        t: usize,
        (key, row): (&[u8], &[u8]),
        event: ChunkEvent,
        version: u64,
        regime: u8,
    ) -> anyhow::Result<()> {
        let outcome = match self.stored(t, key)? {
            None => {
                let topic = Arc::clone(&self.tables[t].topic);
                self.store
                    .add_event(topic, event.partition, Some(event.key), Some(event.value));
                self.put_row(t, key, row, version, regime);
                METRICS
                    .cdc_events
                    .with_label_values(&[self.tables[t].name.as_str(), "r"])
                    .inc();
                "new"
            }
            Some(stored) if stored.json.as_bytes() == row => {
                // Read again: a truncate this regime's snapshot saw keeps it.
                let store_key = self.store_key(t, key);
                self.store
                    .put(store_key, Some(StoredRow { regime, ..stored }));
                "unchanged"
            }
            Some(stored) => {
                let v = following(stored.version, version);
                let source = reconciling(v, stored.version);
                self.emit(
                    t,
                    'u',
                    key,
                    Some(stored.json.as_bytes()),
                    Some(row),
                    &source,
                );
                self.put_row(t, key, row, v, regime);
                "changed"
            }
        };
        METRICS
            .cdc_reconciled_rows
            .with_label_values(&[self.tables[t].name.as_str(), outcome])
            .inc();
        Ok(())
    }

    /// Before a table that comes back to the capture is reconciled (its rows from an
    /// earlier capture are still in the store, and the table changed meanwhile unseen):
    /// marks every stored row of it as not read again (regime 0, whatever regime an
    /// earlier snapshot read it under), a batch per commit. Whether it has any.
    pub(in crate::cdc) async fn mark_found(&mut self, table: &str) -> anyhow::Result<bool> {
        let mut after: Option<Vec<u8>> = None;
        let mut any = false;
        loop {
            let batch = self.store.rows_batch(
                table,
                after.as_deref(),
                TRUNCATE_BATCH,
                TRUNCATE_BATCH_BYTES,
            )?;
            any |= !batch.rows.is_empty();
            for (store_key, _, row) in batch.rows {
                if row.regime != FOUND_IN_TOPICS && row.regime != StoredRow::STREAMED {
                    let row = StoredRow {
                        regime: FOUND_IN_TOPICS,
                        ..row
                    };
                    self.store.put(store_key, Some(row));
                }
            }
            self.close_unit(None, 0);
            self.flush().await?;
            after = batch.next;
            if after.is_none() {
                return Ok(any);
            }
        }
    }

    /// Once a reconciled table is read to its end: a batch of its stored rows, from the
    /// store key after `after`, each one not read again deleted with a `d` event (as one
    /// unit). `Ok(true)` once the table is done, which is recorded with the batch; after a
    /// crash the table's last chunk is read again (none) and the sweep goes on: the rows
    /// deleted before are gone from the store.
    pub(in crate::cdc) fn sweep_step(
        &mut self,
        t: usize,
        after: &mut Option<Vec<u8>>,
        state: &mut SnapshotState,
    ) -> anyhow::Result<bool> {
        let name = self.tables[t].name.clone();
        let version = state.version_of(&name);
        let batch = self.store.rows_batch(
            &name,
            after.as_deref(),
            TRUNCATE_BATCH,
            TRUNCATE_BATCH_BYTES,
        )?;
        let mut gone = 0;
        for (store_key, key_json, row) in batch.rows {
            if row.regime != FOUND_IN_TOPICS && row.regime != StoredRow::STREAMED {
                continue;
            }
            let v = following(row.version, version);
            let source = reconciling(v, row.version);
            self.emit_delete(t, &key_json, &row, &source);
            self.store.put(store_key, None);
            gone += 1;
        }
        METRICS
            .cdc_reconciled_rows
            .with_label_values(&[name.as_str(), "gone"])
            .inc_by(gone);
        *after = batch.next;
        let done = after.is_none();
        if done {
            if let Some(progress) = state.tables.get_mut(&name) {
                progress.done = true;
            }
            self.store
                .put_meta("snapshot", serde_json::to_vec(state).unwrap_or_default());
            let count = |outcome: &str| {
                METRICS
                    .cdc_reconciled_rows
                    .with_label_values(&[name.as_str(), outcome])
                    .get()
            };
            tracing::info!(
                table = %name,
                unchanged = count("unchanged"),
                changed = count("changed"),
                new = count("new"),
                gone = count("gone"),
                "Reconciled the topics with the table"
            );
        }
        self.close_unit(None, 0);
        Ok(done)
    }
}

/// The version of a reconcile's event (at `version`) that follows a published row of
/// version `published`: `version`, which is above every published one; should a row say
/// otherwise, above it all the same, so versions never go back along a row's history.
fn following(published: u64, version: u64) -> u64 {
    version.max(published.saturating_add(1))
}

/// The source of a reconciling event: a snapshot's, at version `version`, following the
/// published row's `before`.
fn reconciling(version: u64, before: u64) -> Source {
    Source {
        commit_ts_ms: now_ms(),
        snapshot: "true",
        tx_id: None,
        lsn: Some(version),
        commit_lsn: None,
        row_version: version,
        before_row_version: Some(before),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconciling_event_follows_the_published_row() {
        // The reconcile's version is above what was published...
        assert_eq!(following(1000, 1001), 1001);
        assert_eq!(following(400, 1001), 1001);
        // ...and should a row be newer, the event still follows it.
        assert_eq!(following(5000, 1001), 5001);
        assert_eq!(following(u64::MAX, 1), u64::MAX);
    }
}
