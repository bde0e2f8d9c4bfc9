//! A partition's writer task: writes its segments one after another (so offsets are
//! committed contiguously), each with its batch intent recorded before the first insert and
//! marked done after the last; refused rows' originals read again and dead-lettered; the
//! commit sent to the consumer thread only once every row is in and every dead letter
//! acknowledged. A writer fenced by another consumer's claim stops at its next record.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;

use super::handoff::{Commit, Task};
use crate::backoff::{Backoff, Stop};
use crate::ingest::batch::Segment;
use crate::ingest::config::Sharding;
use crate::ingest::intents::{Intent, Intents, RecordError};
use crate::kafka::{dead_letter, DeadLetter, Rereader};
use crate::metrics::METRICS;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub struct PartitionWriter {
    /// The intent znode's version this writer last left (see `Worker::claimed`).
    pub(super) version: AtomicI32,
    pub(super) group: String,
    pub(super) reread: Arc<Rereader>,
    pub(super) intents: Option<Arc<Intents>>,
    pub(super) tasks: Arc<Vec<Task>>,
    pub(super) producer: Arc<FutureProducer>,
    pub(super) commit_tx: mpsc::Sender<Commit>,
    /// `now`: a hard stop or the partition revoked; `draining`: the sidecar stopping, which
    /// ends this writer's retries (a segment it cannot write now stays uncommitted, and is
    /// replayed from its intent by the next run) so a drain is not held up by a node or a
    /// broker that is down.
    pub(super) stop: Stop,
    /// New columns this writer has made sure the table has.
    pub(super) columns_in_place: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl PartitionWriter {
    pub async fn run(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Segment>) {
        while let Some(mut segment) = rx.recv().await {
            if self.stop.now.is_cancelled() || !self.write(&mut segment).await {
                // Stopped (or the partition was revoked) before the segment was in: its
                // offsets stay uncommitted, and whoever consumes the partition next resumes
                // from its intent. What waits behind it is dropped with the channel.
                if self.stop.draining.is_cancelled() && !self.stop.now.is_cancelled() {
                    tracing::info!(
                        topic = %self.tasks[segment.task].topic,
                        partition = segment.partition,
                        first = segment.first,
                        last = segment.last,
                        "Stopping: a segment that cannot be written now stays uncommitted, for the next run"
                    );
                }
                return;
            }
            let _ = self.commit_tx.send(Commit {
                task: segment.task,
                partition: segment.partition,
                next: segment.last + 1,
            });
        }
    }

    /// Records an intent, retrying until ZooKeeper takes it; false if stopped or once
    /// another consumer has claimed the partition (then nothing more is written). A
    /// pending intent of a task that may add columns is recorded only while the topic's
    /// alter fence says `stable`, and checks it in the same write (`DESIGN.md`, "New
    /// columns").
    async fn record(&self, task: &Task, partition: i32, intent: &Intent) -> bool {
        let Some(intents) = &self.intents else {
            return true;
        };
        let fenced = !intent.done && task.spec.template.adds_columns();
        let mut backoff = Backoff::default();
        // A write that failed without an answer may still have landed: then its retry is
        // refused for its version, by this writer's own write.
        let mut unknown_outcome = false;
        loop {
            let version = self.version.load(Ordering::Relaxed);
            let result = if fenced {
                match self.fence_open(intents, task).await {
                    Some(fence) => {
                        intents
                            .record_fenced(
                                &self.group,
                                &task.topic,
                                partition,
                                intent,
                                version,
                                fence,
                            )
                            .await
                    }
                    None => return false,
                }
            } else {
                intents
                    .record(&self.group, &task.topic, partition, intent, version)
                    .await
            };
            let result = match result {
                Err(RecordError::Fenced) if unknown_outcome => {
                    match intents
                        .landed(&self.group, &task.topic, partition, intent, version)
                        .await
                    {
                        Ok(Some(next)) => Ok(next),
                        Ok(None) => Err(RecordError::Fenced),
                        Err(e) => Err(RecordError::Other(e)),
                    }
                }
                other => other,
            };
            match result {
                Ok(next) => {
                    self.version.store(next, Ordering::Relaxed);
                    return true;
                }
                Err(RecordError::FenceMoved) => continue,
                Err(RecordError::Fenced) => {
                    tracing::warn!(topic = %task.topic, partition, first = intent.first, last = intent.last, "Another consumer has claimed the partition: this one stops writing it");
                    METRICS
                        .ingest_fenced
                        .with_label_values(&[task.name.as_str()])
                        .inc();
                    return false;
                }
                Err(e) => {
                    unknown_outcome = true;
                    tracing::warn!(topic = %task.topic, partition, error = %e, "Cannot record the batch intent; retrying");
                    if !self.stop.backoff(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// The pause between two looks at ZooKeeper while another writer holds the alter
    /// lock or the fence; false if stopped meanwhile.
    async fn poll_pause(&self) -> bool {
        self.stop.pause(Duration::from_millis(200)).await
    }

    /// Waits until the topic's alter fence says `stable`; returns its version (`None` if
    /// stopped first). A fence left `altering` by a writer that died (no one holds the
    /// lock) is set back: that writer's segment was never recorded.
    async fn fence_open(&self, intents: &Intents, task: &Task) -> Option<i32> {
        let mut backoff = Backoff::default();
        let mut waited = std::time::Instant::now();
        loop {
            let state = match intents.fence(&self.group, &task.topic).await {
                Ok((false, version)) => return Some(version),
                Ok((true, version)) => intents
                    .alter_locked(&self.group, &task.topic)
                    .await
                    .map(|locked| (locked, version)),
                Err(e) => Err(e),
            };
            match state {
                Ok((false, version)) => {
                    tracing::warn!(topic = %task.topic, "The alter fence was left up by a writer that is gone; taking it down");
                    let _ = intents
                        .set_fence(&self.group, &task.topic, false, Some(version))
                        .await;
                    continue;
                }
                Ok((true, _)) => {
                    if waited.elapsed() > Duration::from_secs(10) {
                        tracing::info!(topic = %task.topic, "Waiting for another writer to add columns to the table");
                        waited = std::time::Instant::now();
                    }
                    if !self.poll_pause().await {
                        return None;
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %task.topic, error = %e, "Cannot read the alter fence; retrying");
                    if !self.stop.backoff(&mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The table gets the columns `segment` was encoded with and lacks: under the topic's
    /// alter lock, with the fence up, once no partition has a pending intent (whose replay
    /// after the `ALTER` would be a different block to ClickHouse); false if stopped first.
    async fn add_columns(&self, task: &Task, segment: &Segment) -> bool {
        let added = &segment.template.added;
        let names: Vec<&str> = added.iter().map(|(n, _)| n.as_str()).collect();
        let Some(intents) = &self.intents else {
            // No coordination (at-least-once): nothing to fence.
            return self.alter(task, added).await;
        };
        let (group, topic) = (&self.group, &task.topic);
        loop {
            if !self.lock_alter(intents, topic).await {
                return false;
            }
            tracing::info!(topic = %topic, columns = ?names, "Adding columns: waiting for every partition's pending segment first");
            let outcome = self.alter_fenced(intents, task, added).await;
            let _ = intents.set_fence(group, topic, false, None).await;
            let _ = intents.unlock_alter(group, topic).await;
            match outcome {
                Some(true) => return true,
                None => return false,
                // The fence or the lock went away under it: once more, from the lock.
                Some(false) => {}
            }
        }
    }

    /// Takes the topic's alter lock, waiting while another writer holds it; false if
    /// stopped first.
    async fn lock_alter(&self, intents: &Intents, topic: &str) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match intents.lock_alter(&self.group, topic).await {
                Ok(true) => return true,
                Ok(false) => {
                    if !self.poll_pause().await {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "Cannot take the alter lock; retrying");
                    if !self.stop.backoff(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Under the lock: raises the fence, waits for every pending segment, alters. `None`
    /// if stopped first, `Some(false)` if the fence or the lock went away meanwhile.
    async fn alter_fenced(
        &self,
        intents: &Intents,
        task: &Task,
        added: &[(String, crate::clickhouse::types::ColumnType)],
    ) -> Option<bool> {
        let (group, topic) = (&self.group, &task.topic);
        let mut backoff = Backoff::default();
        while let Err(e) = intents.set_fence(group, topic, true, None).await {
            tracing::warn!(topic = %topic, error = %e, "Cannot raise the alter fence; retrying");
            if !self.stop.backoff(&mut backoff).await {
                return None;
            }
        }
        let mut said = std::time::Instant::now();
        loop {
            // Still ours: a writer that found the lock gone (this session expired) would
            // have lowered the fence, and segments may be going in without it.
            let ours = matches!(intents.fence(group, topic).await, Ok((true, _)))
                && matches!(intents.alter_locked(group, topic).await, Ok(true));
            if !ours {
                tracing::warn!(topic = %topic, "The alter fence or lock went away while waiting; adding the columns is tried again");
                return Some(false);
            }
            match intents.pending(group, topic).await {
                Ok(p) if p.is_empty() => break,
                Ok(p) => {
                    if said.elapsed() > Duration::from_secs(10) {
                        tracing::info!(topic = %topic, partitions = ?p, "Adding columns: still waiting for these partitions' pending segments");
                        said = std::time::Instant::now();
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "Cannot read the intents; retrying")
                }
            }
            if !self.poll_pause().await {
                return None;
            }
        }
        self.alter(task, added).await.then_some(true)
    }

    /// `ALTER TABLE ... ADD COLUMN` until every shard has the columns.
    async fn alter(
        &self,
        task: &Task,
        added: &[(String, crate::clickhouse::types::ColumnType)],
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match task
                .target
                .add_columns(added, &task.target.alter_also)
                .await
            {
                Ok(()) => {
                    METRICS
                        .ingest_columns_added
                        .with_label_values(&[task.name.as_str()])
                        .inc_by(added.len() as u64);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(task = %task.name, error = %e, "Cannot add the new columns yet; retrying");
                    if !self.stop.backoff(&mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Whether the table has the columns `segment` adds, adding them if not (this writer
    /// remembers what it has seen in place).
    async fn columns_ready(&self, task: &Task, segment: &Segment) -> bool {
        let missing = {
            let have = self
                .columns_in_place
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            segment
                .template
                .added
                .iter()
                .any(|(name, _)| !have.contains(name))
        };
        if !missing {
            return true;
        }
        if !self.add_columns(task, segment).await {
            return false;
        }
        let mut have = self
            .columns_in_place
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        have.extend(segment.template.added.iter().map(|(n, _)| n.clone()));
        true
    }

    /// True once every row is in ClickHouse and every dead letter is acknowledged.
    async fn write(&self, segment: &mut Segment) -> bool {
        let task = &self.tasks[segment.task];
        let mut intent = Intent {
            first: segment.first,
            last: segment.last,
            clock: segment.clock,
            shard: None,
            done: false,
        };
        // Rows encoded with new columns: the table gets them before the segment is
        // recorded (and so before any insert of it), and the insert names them.
        let extended = !segment.template.added.is_empty();
        if extended && !segment.replay && !self.columns_ready(task, segment).await {
            return false;
        }
        let insert = extended.then(|| task.target.insert_of(&segment.template.insert_columns()));
        if self.intents.is_some() && !segment.replay {
            // A random-sharded segment's shard is chosen before anything is written, so a
            // rebuild after a crash goes back to it.
            if task.spec.sharding == Sharding::Random {
                for part in &mut segment.parts {
                    if part.shard.is_none() {
                        let Some(shard) = task.target.choose_shard(&self.stop).await else {
                            return false;
                        };
                        part.shard = Some(shard);
                    }
                }
                intent.shard = segment.parts.first().and_then(|p| p.shard);
            }
            if !self.record(task, segment.partition, &intent).await {
                return false;
            }
        } else if segment.replay {
            intent.shard = segment.parts.first().and_then(|p| p.shard);
            crate::failpoint::reach("ingest.replay").await;
        }
        let mut dead: Vec<DeadLetter> = segment.dead.clone();
        let mut refused = Vec::new();
        for part in &segment.parts {
            let token = format!(
                "{}:{}:{}-{}:{}",
                task.topic,
                segment.partition,
                segment.first,
                segment.last,
                part.shard.unwrap_or(0)
            );
            let Some(written) = task
                .target
                .write(insert.as_ref(), part.shard, &part.rows, &token, &self.stop)
                .await
            else {
                return false;
            };
            refused.extend(
                written
                    .refused
                    .into_iter()
                    .map(|(row, error)| (part.offsets[row], error)),
            );
        }
        crate::failpoint::reach("ingest.inserted").await;
        if !refused.is_empty() {
            one_per_message(&mut refused);
            let Some(letters) = self.refused(task, segment.partition, refused).await else {
                return false;
            };
            dead.extend(letters);
        }
        for d in &dead {
            if !self.dead_letter(task, d).await {
                return false;
            }
        }
        if self.intents.is_some() {
            intent.done = true;
            return self.record(task, segment.partition, &intent).await;
        }
        true
    }

    /// Dead letters for the rows ClickHouse refused, with their messages read again. A
    /// message that cannot be read again (gone by retention) goes without its payload,
    /// saying so; `None` only if stopped first.
    async fn refused(
        &self,
        task: &Task,
        partition: i32,
        refused: Vec<(i64, String)>,
    ) -> Option<Vec<DeadLetter>> {
        let offsets: Vec<i64> = refused.iter().map(|(o, _)| *o).collect();
        let mut originals = HashMap::default();
        let mut backoff = Backoff::default();
        for attempt in 1..=3 {
            let (reread, topic, wanted) =
                (self.reread.clone(), task.topic.clone(), offsets.clone());
            let read = tokio::task::spawn_blocking(move || {
                reread.read(&topic, partition, &wanted, Duration::from_secs(10))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match read {
                Ok(found) => originals.extend(found),
                Err(e) => {
                    tracing::warn!(topic = %task.topic, partition, error = %e, "Cannot read refused messages again")
                }
            }
            if originals.len() == offsets.len() || attempt == 3 {
                break;
            }
            if !self.stop.backoff(&mut backoff).await {
                return None;
            }
        }
        Some(
            refused
                .into_iter()
                .map(|(offset, error)| {
                    let (key, payload, error) = match originals.remove(&offset) {
                        Some((key, payload)) => {
                            (key, payload, format!("ClickHouse refused the row: {error}"))
                        }
                        None => (
                            None,
                            Vec::new(),
                            format!("ClickHouse refused the row (its message could not be read again): {error}"),
                        ),
                    };
                    DeadLetter {
                        partition,
                        offset,
                        key,
                        payload,
                        reason: "refused",
                        error,
                    }
                })
                .collect(),
        )
    }

    async fn dead_letter(&self, task: &Task, d: &DeadLetter) -> bool {
        let sent = dead_letter::publish(
            &self.producer,
            &task.dead_letter_topic,
            &task.topic,
            d,
            &self.stop,
        )
        .await;
        if sent {
            METRICS
                .ingest_dead_letters
                .with_label_values(&[task.name.as_str(), d.reason])
                .inc();
        }
        sent
    }
}

/// Keeps the first refusal of each message: a message of several rows (a Debezium update)
/// has its offset once per row, and gets one dead letter.
fn one_per_message(refused: &mut Vec<(i64, String)>) {
    let mut seen = std::collections::HashSet::new();
    refused.retain(|(offset, _)| seen.insert(*offset));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_several_refused_rows_is_one_dead_letter() {
        let mut refused = vec![
            (7, "a".to_string()),
            (7, "b".to_string()),
            (9, "c".to_string()),
            (3, "d".to_string()),
            (9, "e".to_string()),
        ];
        one_per_message(&mut refused);
        assert_eq!(
            refused,
            [
                (7, "a".to_string()),
                (9, "c".to_string()),
                (3, "d".to_string())
            ]
        );
    }
}
