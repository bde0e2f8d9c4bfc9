//! The running sidecar: one Kafka consumer thread, parser worker threads fed through
//! rings, and a writer task per (task, partition).
//!
//! ```text
//! consumer thread --ring--> worker thread (Batcher per partition) --segment--> writer task
//!       ^                                                                         |
//!       +------------------- commit (partition, last offset + 1) ----------------+
//! ```
//!
//! - Every partition's messages go to one worker (by hash), so they stay in order, and one
//!   writer task per partition writes its segments one after another: offsets are
//!   committed contiguously, and only after the segment's rows are in ClickHouse and its
//!   dead letters are acknowledged by the broker.
//! - A full ring or the memory ceiling (`limits.max_pending_bytes` of consumed, not yet
//!   committed message bytes) pauses the assignment; the message that did not fit is kept
//!   and handed over first when there is room. Nothing spins, nothing grows.
//! - Shutdown: stop fetching, let the workers cut what they hold, let the writers finish
//!   (up to `drain_timeout`), commit synchronously, leave the group.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batch::{Batcher, DeadLetter, Message, Segment, TaskSpec};
use super::ring::{ring, Receiver, Sender};
use super::writer::Target;
use crate::metrics::METRICS;

/// A task as the pipeline runs it.
pub struct Task {
    pub name: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub spec: Arc<TaskSpec>,
    pub target: Arc<Target>,
}

pub struct Settings {
    pub workers: usize,
    pub ring_capacity: usize,
    pub max_pending_bytes: usize,
    pub drain_timeout: Duration,
}

struct Commit {
    task: usize,
    partition: i32,
    next: i64,
}

struct Context;

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "Partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "Partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error"),
        }
    }
}

/// Which worker takes a partition's messages.
fn worker_for(task: usize, partition: i32, workers: usize) -> usize {
    let h = crate::picker::select::fnv1a(
        &[
            (task as u64).to_le_bytes(),
            (partition as i64).to_le_bytes(),
        ]
        .concat(),
    );
    (h % workers as u64) as usize
}

pub fn kafka_config(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Runs until `stop` is cancelled, then drains.
pub async fn run(
    tasks: Vec<Task>,
    mut consumer_config: rdkafka::ClientConfig,
    producer: FutureProducer,
    settings: Settings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = Arc::new(tasks);
    consumer_config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    let consumer: BaseConsumer<Context> = consumer_config.create_with_context(Context)?;
    let topics: Vec<&str> = tasks.iter().map(|t| t.topic.as_str()).collect();
    consumer.subscribe(&topics)?;

    let pending = Arc::new(AtomicUsize::new(0));
    let fetching_done = Arc::new(AtomicBool::new(false));
    let flushed = Arc::new(AtomicBool::new(false));
    let hard_stop = CancellationToken::new();
    let (commit_tx, commit_rx) = mpsc::channel::<Commit>();
    let tracker = TaskTracker::new();
    let handle = tokio::runtime::Handle::current();
    let producer = Arc::new(producer);

    let mut senders = Vec::new();
    let mut workers = Vec::new();
    for w in 0..settings.workers {
        let (tx, rx) = ring::<Message>(settings.ring_capacity);
        senders.push(tx);
        let worker = Worker {
            index: w,
            rx,
            tasks: tasks.clone(),
            batchers: HashMap::new(),
            writers: HashMap::new(),
            handle: handle.clone(),
            tracker: tracker.clone(),
            producer: producer.clone(),
            commit_tx: commit_tx.clone(),
            pending: pending.clone(),
            stop: stop.clone(),
            hard_stop: hard_stop.clone(),
            fetching_done: fetching_done.clone(),
        };
        workers.push(
            std::thread::Builder::new()
                .name(format!("chgate-parse-{w}"))
                .spawn(move || worker.run())?,
        );
    }
    drop(commit_tx);

    let consumer_thread = {
        let tasks = tasks.clone();
        let pending = pending.clone();
        let stop = stop.clone();
        let fetching_done = fetching_done.clone();
        let flushed = flushed.clone();
        let max_pending = settings.max_pending_bytes;
        std::thread::Builder::new()
            .name("chgate-consume".into())
            .spawn(move || {
                consume(
                    consumer,
                    &tasks,
                    senders,
                    commit_rx,
                    pending,
                    max_pending,
                    stop,
                    fetching_done,
                    flushed,
                )
            })?
    };

    stop.cancelled().await;
    tracing::info!("Stopping: cutting and writing what is held, then committing");
    let joined = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    });
    let _ = joined.await;
    tracker.close();
    if tokio::time::timeout(settings.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = settings.drain_timeout.as_secs(),
            "Writers did not finish in time; their uncommitted messages will be consumed again"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    flushed.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || consumer_thread.join()).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn consume(
    consumer: BaseConsumer<Context>,
    tasks: &[Task],
    mut senders: Vec<Sender<Message>>,
    commit_rx: mpsc::Receiver<Commit>,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
    stop: CancellationToken,
    fetching_done: Arc<AtomicBool>,
    flushed: Arc<AtomicBool>,
) {
    let workers = senders.len();
    let task_of: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.topic.as_str(), i))
        .collect();
    let mut stash: VecDeque<(usize, Message)> = VecDeque::new();
    let mut paused = false;
    let mut latest: HashMap<(usize, i32), i64> = HashMap::new();
    let commit = |rx: &mpsc::Receiver<Commit>,
                  latest: &mut HashMap<(usize, i32), i64>,
                  mode: CommitMode| {
        let mut tpl = TopicPartitionList::new();
        while let Ok(c) = rx.try_recv() {
            latest.insert((c.task, c.partition), c.next);
            let _ =
                tpl.add_partition_offset(&tasks[c.task].topic, c.partition, Offset::Offset(c.next));
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, mode) {
                tracing::warn!(error = %e, "Offset commit failed; the next commit covers it");
            }
        }
    };
    let mut last_gauges = Instant::now();
    while !stop.is_cancelled() {
        commit(&commit_rx, &mut latest, CommitMode::Async);
        while let Some((w, m)) = stash.pop_front() {
            if let Err(m) = senders[w].push(m) {
                stash.push_front((w, m));
                break;
            }
        }
        let want_pause = !stash.is_empty() || pending.load(Ordering::Relaxed) > max_pending;
        if want_pause != paused {
            if let Ok(assignment) = consumer.assignment() {
                let r = if want_pause {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "Pausing or resuming partitions failed");
                }
            }
            paused = want_pause;
            METRICS.ingest_paused.set(paused as i64);
        }
        if last_gauges.elapsed() > Duration::from_millis(500) {
            for (w, s) in senders.iter().enumerate() {
                METRICS
                    .ingest_ring_occupancy
                    .with_label_values(&[&w.to_string()])
                    .set(s.len() as i64);
            }
            METRICS
                .ingest_pending_bytes
                .set(pending.load(Ordering::Relaxed) as i64);
            last_gauges = Instant::now();
        }
        let Some(result) = consumer.poll(Duration::from_millis(if paused { 20 } else { 100 }))
        else {
            continue;
        };
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                continue;
            }
        };
        let Some(&task) = task_of.get(m.topic()) else {
            continue;
        };
        let payload = m.payload().unwrap_or_default().to_vec();
        pending.fetch_add(payload.len(), Ordering::Relaxed);
        METRICS
            .ingest_consumed
            .with_label_values(&[&tasks[task].name])
            .inc();
        let msg = Message {
            task,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload,
        };
        let w = worker_for(task, msg.partition, workers);
        if !stash.is_empty() {
            // Keep order: nothing overtakes a message waiting for room.
            stash.push_back((w, msg));
            continue;
        }
        if let Err(msg) = senders[w].push(msg) {
            stash.push_back((w, msg));
        }
    }
    // Stop fetching; hand over what was already taken.
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    while let Some((w, mut m)) = stash.pop_front() {
        while let Err(back) = senders[w].push(m) {
            m = back;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fetching_done.store(true, Ordering::SeqCst);
    // Keep the group membership alive and apply commits until the writers are done.
    while !flushed.load(Ordering::SeqCst) {
        commit(&commit_rx, &mut latest, CommitMode::Async);
        let _ = consumer.poll(Duration::from_millis(50));
    }
    commit(&commit_rx, &mut latest, CommitMode::Sync);
    let mut tpl = TopicPartitionList::new();
    for ((task, partition), next) in &latest {
        let _ = tpl.add_partition_offset(&tasks[*task].topic, *partition, Offset::Offset(*next));
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "Final offset commit failed");
        }
    }
    consumer.unsubscribe();
    tracing::info!(committed_partitions = latest.len(), "Consumer closed");
}

struct Worker {
    index: usize,
    rx: Receiver<Message>,
    tasks: Arc<Vec<Task>>,
    batchers: HashMap<(usize, i32), Batcher>,
    writers: HashMap<(usize, i32), tokio::sync::mpsc::UnboundedSender<Segment>>,
    handle: tokio::runtime::Handle,
    tracker: TaskTracker,
    producer: Arc<FutureProducer>,
    commit_tx: mpsc::Sender<Commit>,
    pending: Arc<AtomicUsize>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    fetching_done: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self) {
        let mut last_sweep = Instant::now();
        loop {
            if let Some(msg) = self.rx.pop_or_park(Duration::from_millis(10)) {
                let key = (msg.task, msg.partition);
                let spec = self.tasks[msg.task].spec.clone();
                let batcher = self
                    .batchers
                    .entry(key)
                    .or_insert_with(|| Batcher::new(spec, msg.task, msg.partition));
                if let Some(segment) = batcher.add(msg) {
                    self.dispatch(segment);
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
                while let Some(msg) = self.rx.pop() {
                    let key = (msg.task, msg.partition);
                    let spec = self.tasks[msg.task].spec.clone();
                    let b = self
                        .batchers
                        .entry(key)
                        .or_insert_with(|| Batcher::new(spec, msg.task, msg.partition));
                    if let Some(s) = b.add(msg) {
                        self.dispatch(s);
                    }
                }
                let keys: Vec<_> = self.batchers.keys().copied().collect();
                for k in keys {
                    if let Some(s) = self.batchers.get_mut(&k).and_then(Batcher::seal) {
                        self.dispatch(s);
                    }
                }
                tracing::debug!(worker = self.index, "Worker done");
                return;
            }
        }
    }

    fn dispatch(&mut self, segment: Segment) {
        let key = (segment.task, segment.partition);
        let tx = self.writers.entry(key).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let writer = PartitionWriter {
                tasks: self.tasks.clone(),
                producer: self.producer.clone(),
                commit_tx: self.commit_tx.clone(),
                pending: self.pending.clone(),
                hard_stop: self.hard_stop.clone(),
            };
            self.tracker.spawn_on(writer.run(rx), &self.handle);
            tx
        });
        if let Err(e) = tx.send(segment) {
            tracing::error!(
                partition = key.1,
                "Writer gone; segment {}..{} will be consumed again",
                e.0.first,
                e.0.last
            );
        }
    }
}

struct PartitionWriter {
    tasks: Arc<Vec<Task>>,
    producer: Arc<FutureProducer>,
    commit_tx: mpsc::Sender<Commit>,
    pending: Arc<AtomicUsize>,
    hard_stop: CancellationToken,
}

impl PartitionWriter {
    async fn run(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Segment>) {
        while let Some(segment) = rx.recv().await {
            if !self.write(&segment).await {
                // Stopped before the segment was in: its offsets stay uncommitted.
                return;
            }
            let _ = self.commit_tx.send(Commit {
                task: segment.task,
                partition: segment.partition,
                next: segment.last + 1,
            });
            self.pending.fetch_sub(segment.bytes, Ordering::Relaxed);
        }
    }

    /// True once every row is in ClickHouse and every dead letter is acknowledged.
    async fn write(&self, segment: &Segment) -> bool {
        let task = &self.tasks[segment.task];
        let mut dead: Vec<DeadLetter> = segment.dead.clone();
        for part in &segment.parts {
            let Some(written) = task.target.write(part, &self.hard_stop).await else {
                return false;
            };
            for (row, error) in written.refused {
                let (key, payload) = part.originals[row].clone();
                dead.push(DeadLetter {
                    partition: segment.partition,
                    offset: part.offsets[row],
                    key,
                    payload,
                    reason: "refused",
                    error: format!("ClickHouse refused the row: {error}"),
                });
            }
        }
        for d in &dead {
            if !self.dead_letter(task, d).await {
                return false;
            }
        }
        true
    }

    async fn dead_letter(&self, task: &Task, d: &DeadLetter) -> bool {
        let partition = d.partition.to_string();
        let offset = d.offset.to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "chgate-error",
                    value: Some(d.error.as_str()),
                })
                .insert(Header {
                    key: "chgate-reason",
                    value: Some(d.reason),
                })
                .insert(Header {
                    key: "chgate-source-topic",
                    value: Some(task.topic.as_str()),
                })
                .insert(Header {
                    key: "chgate-source-partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "chgate-source-offset",
                    value: Some(offset.as_str()),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&task.dead_letter_topic)
                .payload(&d.payload)
                .headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            let sent = tokio::select! {
                _ = self.hard_stop.cancelled() => return false,
                r = self.producer.send(record, Duration::from_secs(5)) => r,
            };
            match sent {
                Ok(_) => {
                    METRICS
                        .ingest_dead_letters
                        .with_label_values(&[task.name.as_str(), d.reason])
                        .inc();
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(topic = %task.dead_letter_topic, error = %e, "Dead letter not delivered; retrying");
                    tokio::select! {
                        _ = self.hard_stop.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
