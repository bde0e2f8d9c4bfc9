//! The running sidecar: one Kafka consumer thread, parser worker threads fed through
//! rings, and a writer task per (task, partition).
//!
//! ```text
//! consumer thread --ring--> worker thread (Batcher per partition) --segment--> writer task
//!       ^                                                                         |
//!       +------------------- commit (partition, last offset + 1) ----------------+
//! ```
//!
//! - Every partition's messages go to one worker (the least loaded when the partition is
//!   first seen), so they stay in order, and one
//!   writer task per partition writes its segments one after another: offsets are
//!   committed contiguously, and only after the segment's rows are in ClickHouse and its
//!   dead letters are acknowledged by the broker.
//! - A full ring or the memory ceiling (`limits.max_pending_bytes` of consumed, not yet
//!   committed message bytes) pauses the assignment; the message that did not fit is kept
//!   and handed over first when there is room. Nothing spins, nothing grows.
//! - Shutdown: stop fetching, let the workers cut what they hold, let the writers finish
//!   (up to `drain_timeout`), commit synchronously, leave the group.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::Backoff;
use super::batch::{Batcher, DeadLetter, Segment, TaskSpec};
use super::config::Sharding;
use super::intents::{Disposition, Intent, Intents, RecordError};
use super::message::{Held, Message};
use super::reread::Rereader;
use super::ring::{ring, Receiver, Sender};
use super::writer::Target;
use crate::metrics::METRICS;

/// Maps keyed by (task, partition) are read several times per message: a fast hasher (the
/// keys come from the broker's assignment, not from message contents).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A task as the pipeline runs it.
pub struct Task {
    pub name: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub spec: Arc<TaskSpec>,
    pub target: Arc<Target>,
}

pub struct Settings {
    pub group: String,
    /// See `Context::rewind`.
    pub rewind: i64,
    /// Batch intents (exactly-once); `None` runs at-least-once.
    pub intents: Option<Arc<Intents>>,
    pub workers: usize,
    pub ring_capacity: usize,
    pub max_pending_bytes: usize,
    pub drain_timeout: Duration,
    /// Reads the originals of refused rows again.
    pub reread: Arc<Rereader>,
}

struct Commit {
    task: usize,
    partition: i32,
    next: i64,
}

/// What travels through a ring: messages, and, in order with them, the news that a
/// partition was taken away (so the worker drops what it holds of it and its writer stops
/// before the next segment: the partition's next owner resumes from the intent).
enum Item {
    Message(Message),
    Revoked { task: usize, partition: i32 },
}

struct Context {
    /// (topic, partition) revoked during the last poll, for the consume loop to pass on.
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
    /// Set with `revoked`, so the loop takes the lock only when there is something.
    any_revoked: AtomicBool,
    /// With intents, where each assigned partition starts is what ZooKeeper says, not the
    /// committed offset (which can lag, and which the test broker was seen to overtake).
    intents: Option<(Arc<Intents>, String, tokio::runtime::Handle)>,
    /// Start this many offsets before the intent's position (the worker skips what is
    /// before it): brokers that answer a fetch from the middle of a record batch with the
    /// next batch (tansu 0.6 does) would otherwise skip the rest of that batch.
    rewind: i64,
    /// Tells a recreated topic from a broker that reports too low an end.
    reread: Arc<Rereader>,
    /// The consume thread's `MessageQueue` while it runs (null before and after): each
    /// partition is forwarded to it when assigned.
    queue: AtomicPtr<rdsys::rd_kafka_queue_t>,
}

impl ClientContext for Context {}

impl Context {
    /// The first offset to read from a partition: right after its last finished segment,
    /// or the start of its unfinished one. An intent past the partition's end names
    /// messages that are gone (the topic was deleted and created again, or the broker lost
    /// its log): it is dropped and the partition starts like a new one, as Kafka does with
    /// a committed offset out of range; keeping it would skip every new message below it.
    /// Dropping one wrongly writes again whatever lies between the committed offset and
    /// the intent, so the end the broker reports is not taken alone: the intent is only
    /// dropped if its last message cannot be read either (tansu 0.6 reports the first
    /// offset of the partition's last record batch as its end, below a sidecar that has
    /// caught up).
    fn start_offset(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
    ) -> Option<i64> {
        let (intents, group, handle) = self.intents.as_ref()?;
        // The rebalance cannot go on without knowing: wait for ZooKeeper as long as it takes.
        let intent = intents.load_waiting(handle, group, topic, partition, None)??;
        let start = if intent.done {
            intent.last + 1
        } else {
            intent.first
        };
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
            Ok((_, end)) if start > end && !self.readable(topic, partition, intent.last) => {
                tracing::warn!(
                    topic, partition, recorded = start, end,
                    "The batch intent is past the partition's end (the topic was recreated?): dropping it and starting the partition anew"
                );
                intents.forget_waiting(handle, group, topic, partition);
                None
            }
            _ => Some(start),
        }
    }

    /// Whether the message at `offset` can be read (a few seconds at most).
    fn readable(&self, topic: &str, partition: i32, offset: i64) -> bool {
        match self
            .reread
            .read(topic, partition, &[offset], Duration::from_secs(5))
        {
            Ok(found) => {
                let there = found.contains_key(&offset);
                if there {
                    tracing::debug!(
                        topic,
                        partition,
                        offset,
                        "The broker reports the partition's end below the batch intent, but its last message is there: keeping it"
                    );
                }
                there
            }
            // Not known to be gone: keep the intent.
            Err(e) => {
                tracing::warn!(topic, partition, offset, error = %e, "Cannot read the batch intent's last message; keeping the intent");
                true
            }
        }
    }

    /// Forwards the partitions about to be assigned to the batch queue, before their
    /// fetching starts (librdkafka keeps an application's forwarding over the assignment
    /// and clears it when the partition is stopped, so every assignment sets it again).
    fn forward(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let queue = self.queue.load(Ordering::Acquire);
        if queue.is_null() {
            return;
        }
        for e in tpl.elements() {
            let Ok(topic) = std::ffi::CString::new(e.topic()) else {
                continue;
            };
            // SAFETY: the client is alive (we are in its rebalance); the partition's queue
            // handle is released right after forwarding, which outlives the handle; the
            // batch queue is alive while `queue` is not null (the consume thread clears it
            // before destroying the queue, and rebalances run on that thread).
            unsafe {
                let partition = rdsys::rd_kafka_queue_get_partition(
                    consumer.client().native_ptr(),
                    topic.as_ptr(),
                    e.partition(),
                );
                if partition.is_null() {
                    continue;
                }
                rdsys::rd_kafka_queue_forward(partition, queue);
                rdsys::rd_kafka_queue_destroy(partition);
            }
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let starts: Vec<(String, i32, i64)> = tpl
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        let start = self.start_offset(base_consumer, e.topic(), e.partition())?;
                        Some((e.topic().to_string(), e.partition(), start))
                    })
                    .collect();
                for (topic, partition, start) in starts {
                    let from = (start - self.rewind).max(0);
                    tracing::info!(topic = %topic, partition, offset = start, fetch_from = from, "Starting the partition where its batch intent says");
                    let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(from));
                }
                self.pre_rebalance(base_consumer, &Rebalance::Assign(tpl));
                self.forward(base_consumer, tpl);
                if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "Rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "Applying a rebalance failed");
        }
    }

    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "Partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "Partitions revoked");
                let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
                for e in tpl.elements() {
                    revoked.push((e.topic().to_string(), e.partition()));
                }
                self.any_revoked.store(true, Ordering::Release);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error"),
        }
    }
}

/// The queue every assigned partition's messages are forwarded to, read in batches: one
/// librdkafka call per batch instead of a poll per message (each with an event, an
/// allocation and three clock reads: ~10% of the sidecar's CPU, measured). Rebalances,
/// commit results and errors stay on the consumer's own queue, polled between batches;
/// messages of a partition stopped or sought meanwhile are dropped by librdkafka on the
/// way out (its version barrier), as from the consumer's queue.
struct MessageQueue(NonNull<rdsys::rd_kafka_queue_t>);

impl MessageQueue {
    const BATCH: usize = 256;

    fn new(consumer: &BaseConsumer<Context>) -> Self {
        // SAFETY: a queue of a live client, destroyed (on drop) before the client, since the
        // consume thread that owns it holds the consumer.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        Self(NonNull::new(queue).expect("librdkafka creates a queue"))
    }

    fn as_ptr(&self) -> *mut rdsys::rd_kafka_queue_t {
        self.0.as_ptr()
    }

    /// What is waiting, up to `out.len()` messages, or else the first to come within
    /// `wait_ms`; returns how many of `out` it filled. Each is owned by the caller
    /// (`Held::from_raw`).
    fn read(&self, out: &mut [*mut rdsys::rd_kafka_message_t], wait_ms: i32) -> usize {
        // A batch read waits until the batch is full or the time is up: take what is there
        // without waiting, and wait only for one.
        let n = self.read_up_to(out, 0);
        if n > 0 || out.is_empty() {
            return n;
        }
        self.read_up_to(&mut out[..1], wait_ms)
    }

    fn read_up_to(&self, out: &mut [*mut rdsys::rd_kafka_message_t], wait_ms: i32) -> usize {
        // SAFETY: the queue is alive; librdkafka writes at most `out.len()` pointers.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(self.as_ptr(), wait_ms, out.as_mut_ptr(), out.len())
        };
        n.max(0) as usize
    }
}

impl Drop for MessageQueue {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once; messages still in it are released.
        unsafe { rdsys::rd_kafka_queue_destroy(self.as_ptr()) }
    }
}

/// Hands a message to its worker, or keeps it (in order) while the worker's ring is full.
fn hand_over(
    stash: &mut VecDeque<(usize, Item)>,
    senders: &mut [Sender<Item>],
    worker: usize,
    msg: Message,
) {
    if !stash.is_empty() {
        // Keep order: nothing overtakes a message waiting for room.
        stash.push_back((worker, Item::Message(msg)));
    } else if let Err(item) = senders[worker].push(Item::Message(msg)) {
        stash.push_back((worker, item));
    }
}

/// Where the consumer thread is in each partition.
struct Positions {
    taken: HashMap<(usize, i32), Taken>,
    partitions_of: Vec<usize>,
    /// Per partition, the gap last read again (each gap is read again once).
    reread: HashMap<(usize, i32), i64>,
    rewind: i64,
    /// Partitions sought back during the batch being taken: the rest of the batch's
    /// messages of them were read before the seek, so they are dropped here as librdkafka
    /// drops them after it (taking them would pass over the gap being read again).
    sought: Vec<(usize, i32)>,
}

impl Positions {
    /// The worker the message at `offset` goes to, or `None` if it is not to go on: taken
    /// already (read again after a rewound seek), or past a gap the broker left, which is
    /// read again from before it once (the seek is made here).
    fn admit(
        &mut self,
        consumer: &BaseConsumer<Context>,
        tasks: &[Task],
        task: usize,
        partition: i32,
        offset: i64,
    ) -> Option<usize> {
        let key = (task, partition);
        if self.sought.contains(&key) {
            return None;
        }
        let t = match self.taken.get_mut(&key) {
            Some(t) => t,
            None => {
                let worker = (0..self.partitions_of.len())
                    .min_by_key(|&w| self.partitions_of[w])
                    .unwrap_or(0);
                self.partitions_of[worker] += 1;
                self.taken
                    .entry(key)
                    .or_insert(Taken { next: None, worker })
            }
        };
        let topic = tasks[task].topic.as_str();
        match t.next {
            None => tracing::debug!(partition, offset, "First message polled"),
            Some(next) if offset < next => return None,
            Some(next) if offset > next => {
                let rewind = self.rewind;
                if rewind > 0 && self.reread.insert(key, next) != Some(next) {
                    // A broker that answers a mid-batch fetch with the next batch skipped
                    // the rest of one: read again from before it, once per gap.
                    tracing::debug!(
                        partition,
                        expected = next,
                        got = offset,
                        "Offsets skipped by the broker; reading again from earlier"
                    );
                    let mut tpl = TopicPartitionList::new();
                    let sought = tpl
                        .add_partition_offset(
                            topic,
                            partition,
                            Offset::Offset((next - rewind).max(0)),
                        )
                        .and_then(|()| consumer.seek_partitions(tpl, Duration::from_secs(5)));
                    match sought {
                        Ok(_) => {
                            self.sought.push(key);
                            return None;
                        }
                        Err(e) => tracing::warn!(error = %e, "Seeking back over a gap failed"),
                    }
                }
                // Kafka leaves gaps where transaction markers or compacted records were;
                // with a rewind configured, a gap that is there again when read again is
                // real too.
                if rewind > 0 {
                    tracing::warn!(
                        topic,
                        partition,
                        expected = next,
                        got = offset,
                        "Offsets missing from the partition even when read again; going on without them"
                    );
                    METRICS
                        .ingest_skipped_by_broker
                        .inc_by((offset - next) as u64);
                }
            }
            Some(_) => {}
        }
        t.next = Some(offset + 1);
        Some(t.worker)
    }
}

/// A partition as the consumer thread knows it.
struct Taken {
    /// The offset after the last message taken from the client; `None` until one is
    /// taken after the partition was (re)assigned.
    next: Option<i64>,
    /// The worker that takes its messages: the one with the fewest partitions when it was
    /// first seen (a hash put 2 of 3 partitions on one of 2 workers, and that worker
    /// capped the sidecar), and the same one when it comes back after a revocation, so
    /// one worker at a time ever holds it.
    worker: usize,
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
        .set("auto.offset.reset", "earliest");
    // Incremental rebalances by default; `kafka.properties` may choose another strategy
    // (the test broker needs one, see config/ingest-local.toml).
    if consumer_config
        .get("partition.assignment.strategy")
        .is_none()
    {
        consumer_config.set("partition.assignment.strategy", "cooperative-sticky");
    }
    // Shared: messages go to the workers without being copied (see `message::Held`), and
    // whoever holds messages keeps the consumer alive until they are dropped.
    let consumer: Arc<BaseConsumer<Context>> = Arc::new(
        consumer_config.create_with_context(Context {
            revoked: Default::default(),
            any_revoked: AtomicBool::new(false),
            intents: settings
                .intents
                .clone()
                .map(|i| (i, settings.group.clone(), tokio::runtime::Handle::current())),
            rewind: settings.rewind,
            reread: settings.reread.clone(),
            queue: AtomicPtr::new(std::ptr::null_mut()),
        })?,
    );
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
        let (tx, rx) = ring::<Item>(settings.ring_capacity);
        senders.push(tx);
        let worker = Worker {
            group: settings.group.clone(),
            reread: settings.reread.clone(),
            intents: settings.intents.clone(),
            intent_of: HashMap::default(),
            claimed: HashMap::default(),
            seen: HashMap::default(),
            index: w,
            rx,
            _consumer: consumer.clone(),
            tasks: tasks.clone(),
            batchers: HashMap::default(),
            writers: HashMap::default(),
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
    consumer: Arc<BaseConsumer<Context>>,
    tasks: &[Task],
    mut senders: Vec<Sender<Item>>,
    commit_rx: mpsc::Receiver<Commit>,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
    stop: CancellationToken,
    fetching_done: Arc<AtomicBool>,
    flushed: Arc<AtomicBool>,
) {
    let task_of: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.topic.as_str(), i))
        .collect();
    // Resolved once (a label lookup per message is a hash and a lock) and added to in
    // bulk at housekeeping.
    let mut uncounted = vec![0u64; tasks.len()];
    let consumed: Vec<_> = tasks
        .iter()
        .map(|t| {
            METRICS
                .ingest_consumed
                .with_label_values(&[t.name.as_str()])
        })
        .collect();
    let mut stash: VecDeque<(usize, Item)> = VecDeque::new();
    let mut positions = Positions {
        taken: HashMap::default(),
        partitions_of: vec![0usize; senders.len()],
        reread: HashMap::default(),
        rewind: consumer.context().rewind,
        sought: Vec::new(),
    };
    let mut paused = false;
    let rewind = positions.rewind;
    // Messages come in batches from one queue that every assigned partition is forwarded
    // to (the rebalance does it): see `MessageQueue`.
    let queue = MessageQueue::new(&consumer);
    consumer
        .context()
        .queue
        .store(queue.as_ptr(), Ordering::Release);
    let mut batch = vec![std::ptr::null_mut(); MessageQueue::BATCH];
    let mut latest: HashMap<(usize, i32), i64> = HashMap::default();
    let commit = |rx: &mpsc::Receiver<Commit>,
                  latest: &mut HashMap<(usize, i32), i64>,
                  mode: CommitMode| {
        // Called once per message: a list is only made when there is something to commit.
        let Ok(first) = rx.try_recv() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for c in std::iter::once(first).chain(rx.try_iter()) {
            latest.insert((c.task, c.partition), c.next);
            let _ =
                tpl.add_partition_offset(&tasks[c.task].topic, c.partition, Offset::Offset(c.next));
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "Offset commit failed; the next commit covers it");
        }
    };
    let mut last_gauges = Instant::now();
    let mut last_lag = Instant::now();
    let mut last_forward = Instant::now();
    let (mut iterations, mut idle) = (0u32, true);
    loop {
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
                METRICS.ingest_paused.set(if want_pause {
                    assignment.count() as i64
                } else {
                    0
                });
                if want_pause {
                    METRICS.ingest_pauses.inc();
                }
                let r = if want_pause {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment).and_then(|()| {
                        // Pausing drops what the client had fetched ahead; resuming may
                        // fetch from beyond it. Go back to after the last message taken,
                        // per partition (measured: without this, a pause lost the ~900
                        // messages of a fetch), less the rewind: a mid-batch fetch on
                        // tansu skips the rest of the batch. What was taken is dropped
                        // below when it comes again.
                        let mut tpl = TopicPartitionList::new();
                        for e in assignment.elements() {
                            if let Some(&task) = task_of.get(e.topic()) {
                                if let Some(next) = positions
                                    .taken
                                    .get(&(task, e.partition()))
                                    .and_then(|t| t.next)
                                {
                                    tpl.add_partition_offset(
                                        e.topic(),
                                        e.partition(),
                                        Offset::Offset((next - rewind).max(0)),
                                    )?;
                                }
                            }
                        }
                        if tpl.count() > 0 {
                            consumer.seek_partitions(tpl, Duration::from_secs(5))?;
                        }
                        Ok(())
                    })
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "Pausing or resuming partitions failed");
                }
            }
            tracing::debug!(paused = want_pause, "Consumption paused or resumed");
            paused = want_pause;
        }
        // The clock and the stop token (a lock) are read every 256 messages (or when
        // idle), not per message.
        iterations = iterations.wrapping_add(1);
        let housekeeping = idle || iterations % 256 == 0;
        if housekeeping {
            if stop.is_cancelled() {
                break;
            }
            for (n, counter) in uncounted.iter_mut().zip(&consumed) {
                counter.inc_by(std::mem::take(n));
            }
        }
        if housekeeping && last_forward.elapsed() > Duration::from_millis(250) {
            // A partition revoked and assigned again at once can lose its forwarding: the
            // stop of the revocation, which clears it, may run after the assignment set it
            // again (librdkafka stops partitions asynchronously, and starts them only once
            // stopped). Its messages would then wait in the partition's own queue, unread.
            // Setting it again is harmless and moves what waits there, in order.
            if let Ok(assignment) = consumer.assignment() {
                consumer.context().forward(&consumer, &assignment);
            }
            last_forward = Instant::now();
        }
        if housekeeping && last_gauges.elapsed() > Duration::from_millis(500) {
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
        if housekeeping && last_lag.elapsed() > Duration::from_secs(5) {
            // Lag: the partition's end minus the next offset taken from it (one short
            // metadata round trip per partition every 5 s).
            for (&(task, partition), next) in positions
                .taken
                .iter()
                .filter_map(|(k, t)| Some((k, t.next?)))
            {
                if let Ok((_, high)) = consumer.fetch_watermarks(
                    &tasks[task].topic,
                    partition,
                    Duration::from_millis(200),
                ) {
                    METRICS
                        .ingest_lag
                        .with_label_values(&[tasks[task].name.as_str(), &partition.to_string()])
                        .set((high - next).max(0));
                }
            }
            last_lag = Instant::now();
        }
        // Events (rebalances, commit results, errors) from the consumer's own queue, then
        // messages in a batch from the queue every partition is forwarded to.
        let polled = consumer.poll(Duration::ZERO);
        let revoked: Vec<(String, i32)> = if consumer.context().any_revoked.load(Ordering::Acquire)
        {
            consumer
                .context()
                .any_revoked
                .store(false, Ordering::Relaxed);
            std::mem::take(
                &mut *consumer
                    .context()
                    .revoked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            )
        } else {
            Vec::new()
        };
        for (topic, partition) in revoked {
            if let Some(&task) = task_of.get(topic.as_str()) {
                positions.reread.remove(&(task, partition));
                // A worker holds something of it only if a message of it was taken.
                if let Some(t) = positions.taken.get_mut(&(task, partition)) {
                    t.next = None;
                    stash.push_back((t.worker, Item::Revoked { task, partition }));
                }
            }
        }
        // One task reads one topic. A few tasks: comparing names beats hashing one per
        // message (naming the topic checks it is UTF-8, so not even that for one).
        let task_for = |topic: Option<&str>| {
            if tasks.len() == 1 {
                Some(0)
            } else {
                topic.and_then(|topic| tasks.iter().position(|t| t.topic == topic))
            }
        };
        positions.sought.clear();
        let mut take = |msg: Message| {
            if let Some(w) = positions.admit(&consumer, tasks, msg.task, msg.partition, msg.offset)
            {
                pending.fetch_add(msg.payload().len(), Ordering::Relaxed);
                uncounted[msg.task] += 1;
                hand_over(&mut stash, &mut senders, w, msg);
            }
        };
        match polled {
            Some(Ok(m)) => {
                // A partition assigned before the batch queue existed: copied.
                idle = false;
                if let Some(task) = task_for(Some(m.topic())) {
                    take(Message::owned(
                        task,
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
            }
            Some(Err(e)) => {
                idle = false;
                tracing::warn!(error = %e, "Kafka consumer error");
            }
            None => {
                let n = queue.read(&mut batch, if paused { 20 } else { 50 });
                idle = n == 0;
                for &raw in &batch[..n] {
                    // SAFETY: returned by the batch read, owned by nothing else; the consumer
                    // is in an `Arc` that every holder of messages also holds, dropping its
                    // messages first (the workers, and this thread below).
                    let Some(held) = (unsafe { Held::from_raw(raw) }) else {
                        continue;
                    };
                    if let Some(error) = held.error() {
                        tracing::warn!(partition = held.partition(), error = %error, "Kafka consumer error");
                        continue;
                    }
                    if let Some(task) = task_for(held.topic()) {
                        take(Message::kafka(task, held));
                    }
                }
            }
        }
    }
    for (n, counter) in uncounted.iter().zip(&consumed) {
        counter.inc_by(*n);
    }
    // Stop fetching; hand over what was already taken.
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    while let Some((w, mut item)) = stash.pop_front() {
        while let Err(back) = senders[w].push(item) {
            item = back;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Messages are dropped before this thread's hold on the consumer.
    drop(stash);
    drop(senders);
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
    consumer
        .context()
        .queue
        .store(std::ptr::null_mut(), Ordering::Release);
    drop(queue);
    tracing::info!(committed_partitions = latest.len(), "Consumer closed");
}

struct Worker {
    group: String,
    reread: Arc<Rereader>,
    intents: Option<Arc<Intents>>,
    /// Per partition, its intent while messages still fall in or before it.
    intent_of: HashMap<(usize, i32), Option<Intent>>,
    /// Per partition, the intent znode's version its claim left (see `intents.rs`): its
    /// writer's records name it, so they fail once another consumer claims the partition.
    claimed: HashMap<(usize, i32), i32>,
    /// Per partition, the next offset expected: anything below it is already in a batch
    /// (a consumer that re-reads from the committed offset must not write it twice).
    seen: HashMap<(usize, i32), i64>,
    index: usize,
    rx: Receiver<Item>,
    /// Declared after `rx`: the messages left in the ring are dropped before it.
    _consumer: Arc<BaseConsumer<Context>>,
    tasks: Arc<Vec<Task>>,
    batchers: HashMap<(usize, i32), Batcher>,
    writers: HashMap<
        (usize, i32),
        (
            tokio::sync::mpsc::UnboundedSender<Segment>,
            CancellationToken,
        ),
    >,
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
                    if let Some(s) = self.batchers.get_mut(&k).and_then(Batcher::seal) {
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
        if let Some(mut b) = self.batchers.remove(&key) {
            if let Some(open) = b.seal() {
                self.pending.fetch_sub(open.bytes, Ordering::Relaxed);
            }
        }
        if let Some((_, stop)) = self.writers.remove(&key) {
            stop.cancel();
        }
        self.intent_of.remove(&key);
        self.claimed.remove(&key);
        self.seen.remove(&key);
    }

    fn accept(&mut self, msg: Message) {
        let key = (msg.task, msg.partition);
        if let Some(&next) = self.seen.get(&key) {
            if msg.offset < next {
                self.pending
                    .fetch_sub(msg.payload().len(), Ordering::Relaxed);
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
            self.intent_of.insert(key, intent);
        }
        let (tasks, pending) = (&self.tasks, &self.pending);
        let batcher = self.batchers.entry(key).or_insert_with(|| {
            Batcher::new(tasks[key.0].spec.clone(), key.0, key.1, pending.clone())
        });
        let sealed = match self.intent_of.get(&key).copied().flatten() {
            Some(intent) => match intent.disposition(msg.offset) {
                Disposition::Skip => {
                    self.pending
                        .fetch_sub(msg.payload().len(), Ordering::Relaxed);
                    None
                }
                Disposition::Replay => {
                    batcher.add_replay(msg, intent.clock, intent.shard, intent.last)
                }
                Disposition::Fresh => {
                    // Past the recorded segment: from here on, batches are new.
                    self.intent_of.insert(key, None);
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
            let stop = self.hard_stop.child_token();
            let writer = PartitionWriter {
                group: self.group.clone(),
                reread: self.reread.clone(),
                intents: self.intents.clone(),
                tasks: self.tasks.clone(),
                producer: self.producer.clone(),
                commit_tx: self.commit_tx.clone(),
                pending: self.pending.clone(),
                hard_stop: stop.clone(),
                version: AtomicI32::new(self.claimed.get(&key).copied().unwrap_or(-1)),
            };
            self.tracker.spawn_on(writer.run(rx), &self.handle);
            (tx, stop)
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
            self.pending.fetch_sub(e.0.bytes, Ordering::Relaxed);
        }
    }
}

struct PartitionWriter {
    /// The intent znode's version this writer last left (see `Worker::claimed`).
    version: AtomicI32,
    group: String,
    reread: Arc<Rereader>,
    intents: Option<Arc<Intents>>,
    tasks: Arc<Vec<Task>>,
    producer: Arc<FutureProducer>,
    commit_tx: mpsc::Sender<Commit>,
    pending: Arc<AtomicUsize>,
    hard_stop: CancellationToken,
}

impl PartitionWriter {
    async fn run(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Segment>) {
        while let Some(mut segment) = rx.recv().await {
            if self.hard_stop.is_cancelled() || !self.write(&mut segment).await {
                // Stopped (or the partition was revoked) before the segment was in: its
                // offsets stay uncommitted, and whoever consumes the partition next resumes
                // from its intent.
                self.pending.fetch_sub(segment.bytes, Ordering::Relaxed);
                while let Ok(s) = rx.try_recv() {
                    self.pending.fetch_sub(s.bytes, Ordering::Relaxed);
                }
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

    /// Records an intent, retrying until ZooKeeper takes it; false on a hard stop or once
    /// another consumer has claimed the partition (then nothing more is written).
    async fn record(&self, task: &Task, partition: i32, intent: &Intent) -> bool {
        let Some(intents) = &self.intents else {
            return true;
        };
        let mut backoff = Backoff::default();
        loop {
            let version = self.version.load(Ordering::Relaxed);
            match intents
                .record(&self.group, &task.topic, partition, intent, version)
                .await
            {
                Ok(next) => {
                    self.version.store(next, Ordering::Relaxed);
                    return true;
                }
                Err(RecordError::Fenced) => {
                    tracing::warn!(topic = %task.topic, partition, first = intent.first, last = intent.last, "Another consumer has claimed the partition: this one stops writing it");
                    METRICS
                        .ingest_fenced
                        .with_label_values(&[task.name.as_str()])
                        .inc();
                    return false;
                }
                Err(e) => {
                    tracing::warn!(topic = %task.topic, partition, error = %e, "Cannot record the batch intent; retrying");
                    if !backoff.wait(&self.hard_stop).await {
                        return false;
                    }
                }
            }
        }
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
        if self.intents.is_some() && !segment.replay {
            // A random-sharded segment's shard is chosen before anything is written, so a
            // rebuild after a crash goes back to it.
            if task.spec.sharding == Sharding::Random {
                for part in &mut segment.parts {
                    if part.shard.is_none() {
                        let Some(shard) = task.target.choose_shard(&self.hard_stop).await else {
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
            let Some(written) = task.target.write(part, &token, &self.hard_stop).await else {
                return false;
            };
            refused.extend(
                written
                    .refused
                    .into_iter()
                    .map(|(row, error)| (part.offsets[row], error)),
            );
        }
        if !refused.is_empty() {
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
            if originals.len() == offsets.len()
                || attempt == 3
                || !backoff.wait(&self.hard_stop).await
            {
                break;
            }
        }
        if self.hard_stop.is_cancelled() {
            return None;
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
        let partition = d.partition.to_string();
        let offset = d.offset.to_string();
        let mut backoff = Backoff::default();
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
                    if !backoff.wait(&self.hard_stop).await {
                        return false;
                    }
                }
            }
        }
    }
}
