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
//!   and handed over first when there is room. Nothing spins, nothing grows. The ceiling
//!   leaves running the partitions whose start has not settled (a pending segment being
//!   rebuilt after a crash, which cannot be cut short: see `handoff::Settled`).
//! - Shutdown: stop fetching, let the workers cut what they hold, let the writers finish
//!   (up to `drain_timeout`), commit synchronously, leave the group.
//!
//! The rooms, by job: [`rebalance`] (where assigned partitions start, revocations),
//! [`consumer`] (the consume loop and its flow control), [`positions`] (what to do with
//! each message read, gaps included), [`worker`] (parsing into segments), and
//! [`partition_writer`] (intents, inserts, dead letters, commits). `kafka::queue` and
//! `kafka::message` hold the librdkafka FFI; `pending` the memory ceiling.

mod consumer;
mod handoff;
mod partition_writer;
mod positions;
mod rebalance;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::intents::Intents;
use super::pending::Ceiling;
use super::ring::ring;
use crate::kafka::Rereader;
pub use handoff::Task;
use handoff::{Commit, Item, Settled};
use rebalance::Context;
use worker::Worker;

/// Maps keyed by (task, partition) are read several times per message: a fast hasher (the
/// keys come from the broker's assignment, not from message contents).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub struct Settings {
    pub group: String,
    /// See `Context::rewind`.
    pub rewind: i64,
    /// The consumer group's session timeout (`kafka.session_timeout`).
    pub session_timeout: Duration,
    /// Batch intents (exactly-once); `None` runs at-least-once.
    pub intents: Option<Arc<Intents>>,
    pub workers: usize,
    pub ring_capacity: usize,
    pub max_pending_bytes: usize,
    pub drain_timeout: Duration,
    /// Reads the originals of refused rows again.
    pub reread: Arc<Rereader>,
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

    let ceiling = Ceiling::leak();
    let settled = Arc::new(Settled::default());
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
            ceiling,
            settled: settled.clone(),
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

    let start = consumer::Start {
        consumer,
        tasks: tasks.clone(),
        senders,
        commits: commit_rx,
        ceiling,
        settled,
        max_pending: settings.max_pending_bytes,
        stop: stop.clone(),
        fetching_done: fetching_done.clone(),
        flushed: flushed.clone(),
        group: settings.group.clone(),
        session_timeout: settings.session_timeout,
    };
    let consumer_thread = std::thread::Builder::new()
        .name("chgate-consume".into())
        .spawn(move || consumer::run(start))?;

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
