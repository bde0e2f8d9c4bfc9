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
//!   `before` is the published row, at a version just above that row's;
//! - no row for the key: the row's `r` event, as in any snapshot;
//! - and, once the table is read to its end, every stored row not read again (deleted
//!   since) gets a `d` event with it as `before` ([`Capture::sweep_step`]).
//!
//! Versions: the first snapshot's rows carry the snapshot's row version, below every
//! change the slot can send; a reconciling event carries the published row's version plus
//! one. Changes of the row that the new snapshot saw are skipped by the stream (the
//! regime's visibility check); those it did not see come later, at their own LSNs, which
//! lie above it (a WAL record takes more than one byte). So every row's versions still
//! grow along its history, and VersionedCollapsingMergeTree gets exact cancel rows.
//!
//! The same goes for a table that comes back to the capture after it was taken out: the
//! store still holds its rows as the capture last saw them, and the table changed unseen.
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
                let v = next_version(stored.version, version);
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
    pub async fn mark_found(&mut self, table: &str) -> anyhow::Result<bool> {
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
    pub fn sweep_step(
        &mut self,
        t: usize,
        after: &mut Option<Vec<u8>>,
        state: &mut SnapshotState,
    ) -> anyhow::Result<bool> {
        let name = self.tables[t].name.clone();
        let snapshot_version = state.row_version();
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
            let v = next_version(row.version, snapshot_version);
            let source = reconciling(v, row.version);
            self.emit(
                t,
                'd',
                key_json.as_bytes(),
                Some(row.json.as_bytes()),
                None,
                &source,
            );
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

/// The version of an event that follows a published row of version `published`: above it,
/// and above the snapshot's row version (a row an earlier capture streamed may be older).
fn next_version(published: u64, snapshot: u64) -> u64 {
    published.max(snapshot).saturating_add(1)
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
        // A snapshot row (at the snapshot's version) and a row an earlier capture streamed
        // before the snapshot's version: both are followed from above.
        assert_eq!(next_version(1000, 1000), 1001);
        assert_eq!(next_version(400, 1000), 1001);
        assert_eq!(next_version(5000, 1000), 5001);
        assert_eq!(next_version(u64::MAX, 1), u64::MAX);
    }
}
