//! A parser worker thread: takes its partitions' messages from its ring, skips what a
//! partition's batch intent says is in already, rebuilds an unfinished segment exactly,
//! cuts segments (by rows, bytes or age) and hands each to its partition's writer task.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handoff::{Commit, Item, Settled, Task};
use super::partition_writer::PartitionWriter;
use super::rebalance::Context;
use crate::backoff::Stop;
use crate::ingest::batch::{Batcher, Message, Segment};
use crate::ingest::intents::{Disposition, Intent, Intents};
use crate::ingest::pending::Ceiling;
use crate::ingest::ring::Receiver;
use crate::kafka::Rereader;
use crate::metrics::METRICS;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub struct Worker {
    pub(super) group: String,
    pub(super) reread: Arc<Rereader>,
    pub(super) intents: Option<Arc<Intents>>,
    /// Per partition, its intent while messages still fall in or before it.
    pub(super) intent_of: HashMap<(usize, i32), Option<Intent>>,
    /// Per partition, the intent znode's version its claim left (see `intents.rs`): its
    /// writer's records name it, so they fail once another consumer claims the partition.
    pub(super) claimed: HashMap<(usize, i32), i32>,
    /// Per partition, the next offset expected: anything below it is already in a batch
    /// (a consumer that re-reads from the committed offset must not write it twice).
    pub(super) seen: HashMap<(usize, i32), i64>,
    pub(super) index: usize,
    pub(super) rx: Receiver<Item>,
    /// Declared after `rx`: the messages left in the ring are dropped before it.
    pub(super) _consumer: Arc<BaseConsumer<Context>>,
    pub(super) tasks: Arc<Vec<Task>>,
    pub(super) batchers: HashMap<(usize, i32), Batcher>,
    pub(super) writers: HashMap<
        (usize, i32),
        (
            tokio::sync::mpsc::UnboundedSender<Segment>,
            CancellationToken,
        ),
    >,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) tracker: TaskTracker,
    pub(super) producer: Arc<FutureProducer>,
    pub(super) commit_tx: mpsc::Sender<Commit>,
    pub(super) ceiling: &'static Ceiling,
    /// Where this worker says a partition's start has settled (see [`Settled`]).
    pub(super) settled: Arc<Settled>,
    pub(super) stop: CancellationToken,
    pub(super) hard_stop: CancellationToken,
    pub(super) fetching_done: Arc<AtomicBool>,
}

impl Worker {
    pub fn run(mut self) {
        let mut last_sweep = Instant::now();
        loop {
            // Up to 256 items a turn: the clock and the stop token (a lock) are read once
            // a turn, not per message.
            let mut taken = 0;
            while taken < 256 {
                let Some(item) = self.rx.pop() else { break };
                self.take(item);
                taken += 1;
            }
            if taken == 0 {
                if let Some(item) = self.rx.pop_or_park(Duration::from_millis(10)) {
                    self.take(item);
                }
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= Duration::from_millis(10) {
                last_sweep = now;
                let due: Vec<(usize, i32)> = self
                    .batchers
                    .iter()
                    .filter(|(_, b)| b.due(now))
                    .map(|(k, _)| *k)
                    .collect();
                for k in due {
                    if let Some(s) = self.batchers.get_mut(&k).and_then(Batcher::seal) {
                        self.dispatch(s);
                    }
                }
            }
            if self.stop.is_cancelled() && self.fetching_done.load(Ordering::SeqCst) {
                while let Some(item) = self.rx.pop() {
                    self.take(item);
                }
                let keys: Vec<_> = self.batchers.keys().copied().collect();
                for k in keys {
                    let Some(b) = self.batchers.get_mut(&k) else {
                        continue;
                    };
                    // A segment being rebuilt is written whole or not at all: sealed short
                    // of its recorded end, its rows would go under another range (another
                    // token, another done record) than the insert that may have landed
                    // before the crash. Its intent stays pending; the next run rebuilds it.
                    if b.replaying() {
                        b.abandon();
                        tracing::info!(worker = self.index, task = k.0, partition = k.1, "Stopped before a pending segment was rebuilt whole: it is rebuilt by the next run");
                        continue;
                    }
                    if let Some(s) = b.seal() {
                        self.dispatch(s);
                    }
                }
                tracing::debug!(worker = self.index, "Worker done");
                return;
            }
        }
    }

    /// The partition's intent, read (and the partition claimed) once when the partition is
    /// first seen. While ZooKeeper cannot be reached the worker waits (nothing is written
    /// without knowing); if stopped meanwhile, the partition's messages are left uncommitted.
    fn load_intent(&mut self, task: usize, partition: i32) -> Option<Intent> {
        let intents = self.intents.as_ref()?;
        let topic = &self.tasks[task].topic;
        match intents.claim_waiting(
            &self.handle,
            &self.group,
            topic,
            partition,
            Some(&self.stop),
        ) {
            Some((intent, version)) => {
                if let Some(i) = &intent {
                    tracing::info!(topic = %topic, partition, first = i.first, last = i.last, done = i.done, "Resuming from the recorded batch intent");
                }
                self.claimed.insert((task, partition), version);
                intent
            }
            None => {
                tracing::warn!(topic = %topic, partition, "Stopping without the intent; leaving the partition uncommitted");
                // Everything is below `first`: skipped, never written, never committed.
                Some(Intent {
                    first: i64::MAX,
                    last: i64::MAX,
                    clock: 0,
                    shard: None,
                    done: false,
                })
            }
        }
    }

    fn take(&mut self, item: Item) {
        match item {
            Item::Message(msg) => self.accept(msg),
            Item::Revoked { task, partition } => self.revoke(task, partition),
        }
    }

    /// The partition went to another consumer (or will come back from its committed
    /// offset): drop what is held of it; its writer stops before its next segment.
    fn revoke(&mut self, task: usize, partition: i32) {
        let key = (task, partition);
        // What it holds of the partition is dropped, and gives back its bytes.
        self.batchers.remove(&key);
        if let Some((_, stop)) = self.writers.remove(&key) {
            stop.cancel();
        }
        self.intent_of.remove(&key);
        self.claimed.remove(&key);
        self.seen.remove(&key);
        self.settled.unsettle(task, partition);
    }

    fn accept(&mut self, msg: Message) {
        let key = (msg.task, msg.partition);
        if let Some(&next) = self.seen.get(&key) {
            if msg.offset < next {
                return;
            }
        }
        self.seen.insert(key, msg.offset + 1);
        if !self.intent_of.contains_key(&key) {
            tracing::debug!(
                partition = msg.partition,
                offset = msg.offset,
                "First message of a partition"
            );
            let intent = self.load_intent(msg.task, msg.partition);
            if let Some(i) = &intent {
                let expected = if i.done { i.last + 1 } else { i.first };
                if msg.offset > expected {
                    tracing::error!(
                        topic = %self.tasks[msg.task].topic, partition = msg.partition,
                        expected, got = msg.offset,
                        "The broker skipped offsets at the start of the partition: those messages will not be written (raise kafka.start_rewind)"
                    );
                    METRICS
                        .ingest_skipped_by_broker
                        .inc_by((msg.offset - expected) as u64);
                }
            }
            // Nothing to rebuild (no intent, a done one, or none readable while stopping):
            // the partition may be paused from here on.
            if !intent.is_some_and(|i| !i.done && i.first != i64::MAX) {
                self.settled.settle(msg.task, msg.partition);
            }
            self.intent_of.insert(key, intent);
        }
        let (tasks, ceiling) = (&self.tasks, self.ceiling);
        let batcher = self
            .batchers
            .entry(key)
            .or_insert_with(|| Batcher::new(tasks[key.0].spec.clone(), key.0, key.1, ceiling));
        let sealed = match self.intent_of.get(&key).copied().flatten() {
            Some(intent) => match intent.disposition(msg.offset) {
                Disposition::Skip => None,
                Disposition::Replay => {
                    let rebuilt = batcher.add_replay(msg, intent.clock, intent.shard, intent.last);
                    if rebuilt.is_some() {
                        self.settled.settle(key.0, key.1);
                    }
                    rebuilt
                }
                Disposition::Fresh => {
                    // Past the recorded segment: from here on, batches are new.
                    self.intent_of.insert(key, None);
                    self.settled.settle(key.0, key.1);
                    let replayed = if batcher.replaying() {
                        batcher.seal()
                    } else {
                        None
                    };
                    let next = batcher.add(msg);
                    if let Some(r) = replayed {
                        self.dispatch(r);
                    }
                    next
                }
            },
            None => batcher.add(msg),
        };
        // Closed ahead of a message that brought new columns: it goes first.
        if let Some(ready) = self.batchers.get_mut(&key).and_then(Batcher::take_ready) {
            self.dispatch(ready);
        }
        if let Some(segment) = sealed {
            self.dispatch(segment);
        }
    }

    fn dispatch(&mut self, segment: Segment) {
        let key = (segment.task, segment.partition);
        let rows: usize = segment.parts.iter().map(|p| p.rows()).sum();
        METRICS
            .ingest_parsed
            .with_label_values(&[self.tasks[segment.task].name.as_str()])
            .inc_by(rows as u64);
        let (tx, _) = self.writers.entry(key).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let now = self.hard_stop.child_token();
            let writer = PartitionWriter {
                group: self.group.clone(),
                reread: self.reread.clone(),
                intents: self.intents.clone(),
                tasks: self.tasks.clone(),
                producer: self.producer.clone(),
                commit_tx: self.commit_tx.clone(),
                stop: Stop {
                    now: now.clone(),
                    draining: self.stop.clone(),
                },
                version: AtomicI32::new(self.claimed.get(&key).copied().unwrap_or(-1)),
                columns_in_place: Default::default(),
            };
            self.tracker.spawn_on(writer.run(rx), &self.handle);
            (tx, now)
        });
        if let Err(e) = tx.send(segment) {
            // Its writer stopped: another consumer claimed the partition (this one hears of
            // the revocation soon). Left uncommitted, for the new owner.
            tracing::debug!(
                partition = key.1,
                "Writer gone; segment {}..{} left to the partition's next owner",
                e.0.first,
                e.0.last
            );
        }
    }
}
