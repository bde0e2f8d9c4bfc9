//! The consumer thread: reads messages in batches, admits each ([`Positions`]), holds it
//! against the memory ceiling and hands it to its partition's worker through a ring;
//! applies the writers' commits; pauses the assignment while a ring is full or the ceiling
//! is reached (the message that did not fit waits, in order; the ceiling spares partitions
//! whose start has not settled, see [`Settled`]); and on stop hands over what
//! it holds, keeps the group membership alive until the writers are done, commits and
//! leaves the group.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::handoff::{Commit, Item, Settled, Task};
use super::positions::{Admit, Positions};
use super::rebalance::Context;
use crate::ingest::message::Message;
use crate::ingest::pending::Ceiling;
use crate::ingest::ring::Sender;
use crate::kafka::{Held, MessageQueue};
use crate::metrics::METRICS;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What the consumer thread is started with.
pub struct Start {
    pub consumer: Arc<BaseConsumer<Context>>,
    pub tasks: Arc<Vec<Task>>,
    pub senders: Vec<Sender<Item>>,
    pub commits: mpsc::Receiver<Commit>,
    pub ceiling: &'static Ceiling,
    pub settled: Arc<Settled>,
    pub max_pending: usize,
    pub stop: CancellationToken,
    /// Set once everything taken is handed over (the workers may finish).
    pub fetching_done: Arc<AtomicBool>,
    /// Set once the writers are done (the last commits may be made).
    pub flushed: Arc<AtomicBool>,
    pub group: String,
    pub session_timeout: Duration,
}

struct Consume {
    tasks: Arc<Vec<Task>>,
    senders: Vec<Sender<Item>>,
    commits: mpsc::Receiver<Commit>,
    ceiling: &'static Ceiling,
    settled: Arc<Settled>,
    max_pending: usize,
    task_of: HashMap<String, usize>,
    /// Messages waiting for room in their worker's ring, in order.
    stash: VecDeque<(usize, Item)>,
    positions: Positions,
    /// The partitions this thread has paused.
    paused: std::collections::HashSet<(usize, i32)>,
    /// What the paused set was computed for: a full ring (everything paused) or the
    /// ceiling, and the [`Settled`] change count then. `None`: to be computed again.
    paused_for: Option<(bool, u64)>,
    /// The last offset committed per partition, for the final commit.
    latest: HashMap<(usize, i32), i64>,
    /// Consumed counts resolved once (a label lookup per message is a hash and a lock)
    /// and added to in bulk at housekeeping.
    consumed: Vec<IntCounter>,
    uncounted: Vec<u64>,
    last_gauges: Instant,
    last_lag: Instant,
    last_forward: Instant,
    /// Since when the assignment has been empty (see [`Consume::check_membership`]).
    unassigned_since: Option<Instant>,
    group: String,
    session_timeout: Duration,
    /// Declared last: whatever holds messages (the stash, the rings) is dropped before it.
    consumer: Arc<BaseConsumer<Context>>,
}

/// Runs the consumer thread until `stop`, then drains (see the module docs).
pub fn run(start: Start) {
    let Start {
        consumer,
        tasks,
        senders,
        commits,
        ceiling,
        settled,
        max_pending,
        stop,
        fetching_done,
        flushed,
        group,
        session_timeout,
    } = start;
    let rewind = consumer.context().rewind;
    let mut c = Consume {
        task_of: tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.topic.clone(), i))
            .collect(),
        consumed: tasks
            .iter()
            .map(|t| {
                METRICS
                    .ingest_consumed
                    .with_label_values(&[t.name.as_str()])
            })
            .collect(),
        uncounted: vec![0; tasks.len()],
        positions: Positions::new(senders.len(), rewind),
        consumer,
        tasks,
        senders,
        commits,
        ceiling,
        settled,
        max_pending,
        stash: VecDeque::new(),
        paused: Default::default(),
        paused_for: None,
        latest: HashMap::default(),
        last_gauges: Instant::now(),
        last_lag: Instant::now(),
        last_forward: Instant::now(),
        unassigned_since: None,
        group,
        session_timeout,
    };
    // Messages come in batches from one queue that every assigned partition is forwarded
    // to (the rebalance does it).
    let queue = MessageQueue::new(&c.consumer);
    c.consumer
        .context()
        .queue
        .store(queue.as_ptr(), Ordering::Release);
    let mut batch = vec![std::ptr::null_mut(); MessageQueue::BATCH];
    let (mut iterations, mut idle) = (0u32, true);
    loop {
        c.commit(CommitMode::Async);
        c.flush_stash();
        c.flow_control();
        // The clock and the stop token (a lock) are read every 256 messages (or when
        // idle), not per message.
        iterations = iterations.wrapping_add(1);
        if idle || iterations % 256 == 0 {
            if stop.is_cancelled() {
                break;
            }
            c.housekeeping();
        }
        idle = c.poll(&queue, &mut batch);
    }
    c.close(queue, &fetching_done, &flushed);
}

impl Consume {
    /// Commits what the writers finished since the last call. Called once per loop: a list
    /// is only made when there is something to commit.
    fn commit(&mut self, mode: CommitMode) {
        let Ok(first) = self.commits.try_recv() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for c in std::iter::once(first).chain(self.commits.try_iter()) {
            self.latest.insert((c.task, c.partition), c.next);
            let _ = tpl.add_partition_offset(
                &self.tasks[c.task].topic,
                c.partition,
                Offset::Offset(c.next),
            );
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "Offset commit failed; the next commit covers it");
        }
    }

    /// Hands over what waits for room, in order, as far as the rings take it.
    fn flush_stash(&mut self) {
        while let Some((w, m)) = self.stash.pop_front() {
            if let Err(m) = self.senders[w].push(m) {
                self.stash.push_front((w, m));
                break;
            }
        }
    }

    /// Hands a message to its worker, or keeps it (in order) while the worker's ring is
    /// full.
    fn hand_over(&mut self, worker: usize, item: Item) {
        if !self.stash.is_empty() {
            // Keep order: nothing overtakes a message waiting for room.
            self.stash.push_back((worker, item));
        } else if let Err(item) = self.senders[worker].push(item) {
            self.stash.push_back((worker, item));
        }
    }

    /// Pauses the assignment while something waits for room in a ring; past the ceiling,
    /// pauses the partitions whose start has settled (a pending segment being rebuilt
    /// cannot be cut short to give its bytes back, so pausing its partition could hold
    /// everything forever); resumes what it paused when neither holds.
    fn flow_control(&mut self) {
        let full = !self.stash.is_empty();
        if !full && self.ceiling.held() <= self.max_pending {
            if !self.paused.is_empty() {
                self.resume_all();
            }
            self.paused_for = None;
            return;
        }
        let key = (full, self.settled.changes());
        if self.paused_for != Some(key) {
            self.paused_for = Some(key);
            self.pause_for(full);
        }
    }

    /// Pauses the whole assignment (`full`: a ring has no room) or the partitions whose
    /// start has settled (the ceiling), and resumes the others.
    fn pause_for(&mut self, full: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let assigned: Vec<(usize, i32)> = assignment
            .elements()
            .iter()
            .filter_map(|e| Some((*self.task_of.get(e.topic())?, e.partition())))
            .collect();
        let want: std::collections::HashSet<(usize, i32)> = assigned
            .iter()
            .copied()
            .filter(|&(task, partition)| full || self.settled.contains(task, partition))
            .collect();
        let pause: Vec<_> = want.difference(&self.paused).copied().collect();
        let resume: Vec<_> = self.paused.difference(&want).copied().collect();
        // Those left running: a partition revoked while paused (no longer in `paused`)
        // and assigned again may still be paused in the client (a no-op otherwise).
        let mut running = TopicPartitionList::new();
        for &(task, partition) in &assigned {
            if !want.contains(&(task, partition)) && !self.paused.contains(&(task, partition)) {
                running.add_partition(&self.tasks[task].topic, partition);
            }
        }
        if running.count() > 0 {
            let _ = self.consumer.resume(&running);
        }
        if self.paused.is_empty() && !pause.is_empty() {
            METRICS.ingest_pauses.inc();
        }
        self.set_paused(&pause, true);
        self.set_paused(&resume, false);
        if !pause.is_empty() || !resume.is_empty() {
            tracing::debug!(
                paused = self.paused.len(),
                running = assigned.len().saturating_sub(self.paused.len()),
                "Consumption paused"
            );
        }
    }

    /// Resumes everything paused. The whole assignment too: a partition revoked while
    /// paused (no longer in `paused`) and assigned again may still be paused in the client.
    fn resume_all(&mut self) {
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.resume(&assignment);
        }
        let all: Vec<_> = self.paused.iter().copied().collect();
        self.set_paused(&all, false);
        tracing::debug!("Consumption resumed");
    }

    /// Pauses or resumes `partitions`, and keeps [`Consume::paused`] and its gauge true.
    fn set_paused(&mut self, partitions: &[(usize, i32)], pause: bool) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &(task, partition) in partitions {
            tpl.add_partition(&self.tasks[task].topic, partition);
        }
        let r = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.resume(&tpl)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "Pausing or resuming partitions failed");
            return;
        }
        for p in partitions {
            if pause {
                self.paused.insert(*p);
            } else {
                self.paused.remove(p);
            }
        }
        METRICS.ingest_paused.set(self.paused.len() as i64);
    }

    /// Resumes `assignment`. Pausing drops what the client had fetched ahead; resuming may
    /// fetch from beyond it. So each partition goes back to after the last message taken
    /// (measured: without this, a pause lost the ~900 messages of a fetch), less the
    /// rewind: a mid-batch fetch on tansu skips the rest of the batch. What was taken is
    /// dropped when it comes again.
    fn resume(&self, assignment: &TopicPartitionList) -> rdkafka::error::KafkaResult<()> {
        self.consumer.resume(assignment)?;
        let rewind = self.consumer.context().rewind;
        let mut tpl = TopicPartitionList::new();
        for e in assignment.elements() {
            let Some(&task) = self.task_of.get(e.topic()) else {
                continue;
            };
            if let Some(next) = self.positions.next(task, e.partition()) {
                tpl.add_partition_offset(
                    e.topic(),
                    e.partition(),
                    Offset::Offset((next - rewind).max(0)),
                )?;
            }
        }
        if tpl.count() > 0 {
            self.consumer.seek_partitions(tpl, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Counters, the forwarding of the assignment, gauges and lag, each on its own period.
    fn housekeeping(&mut self) {
        for (n, counter) in self.uncounted.iter_mut().zip(&self.consumed) {
            counter.inc_by(std::mem::take(n));
        }
        if self.last_forward.elapsed() > Duration::from_millis(250) {
            // A partition revoked and assigned again at once can lose its forwarding: the
            // stop of the revocation, which clears it, may run after the assignment set it
            // again (librdkafka stops partitions asynchronously, and starts them only once
            // stopped). Its messages would then wait in the partition's own queue, unread.
            // Setting it again is harmless and moves what waits there, in order.
            if let Ok(assignment) = self.consumer.assignment() {
                self.consumer.context().forward(&self.consumer, &assignment);
                self.check_membership(assignment.count() == 0);
            }
            // A partition assigned meanwhile starts unpaused: flow control looks again.
            self.paused_for = None;
            self.last_forward = Instant::now();
        }
        if self.last_gauges.elapsed() > Duration::from_millis(500) {
            for (w, s) in self.senders.iter().enumerate() {
                METRICS
                    .ingest_ring_occupancy
                    .with_label_values(&[&w.to_string()])
                    .set(s.len() as i64);
            }
            METRICS.ingest_pending_bytes.set(self.ceiling.held() as i64);
            self.last_gauges = Instant::now();
        }
        if self.last_lag.elapsed() > Duration::from_secs(5) {
            // Lag: the partition's end minus the next offset taken from it (one short
            // metadata round trip per partition every 5 s).
            for (task, partition, next) in self.positions.positions() {
                if let Ok((_, high)) = self.consumer.fetch_watermarks(
                    &self.tasks[task].topic,
                    partition,
                    Duration::from_millis(200),
                ) {
                    METRICS
                        .ingest_lag
                        .with_label_values(&[
                            self.tasks[task].name.as_str(),
                            &partition.to_string(),
                        ])
                        .set((high - next).max(0));
                }
            }
            self.last_lag = Instant::now();
        }
    }

    /// A consumer left without partitions for two session timeouts asks the broker about
    /// its group, and joins again if no member of it holds a partition. A broker can lose
    /// a group's assignment (tansu 0.6, after a member was killed and another joined: the
    /// group "stable", its members holding nothing, heartbeats answered), and every
    /// partition would stay unconsumed; Kafka rebalances instead, and then this never finds
    /// it so. With more members than partitions an idle member sees the others' partitions,
    /// and stays as it is.
    fn check_membership(&mut self, unassigned: bool) {
        if !unassigned {
            self.unassigned_since = None;
            return;
        }
        let since = *self.unassigned_since.get_or_insert_with(Instant::now);
        if since.elapsed() < 2 * self.session_timeout {
            return;
        }
        self.unassigned_since = Some(Instant::now());
        let held = match self
            .consumer
            .fetch_group_list(Some(&self.group), Duration::from_secs(2))
        {
            Ok(list) => list
                .groups()
                .iter()
                .flat_map(|g| g.members())
                .filter_map(|m| m.assignment())
                .map(|a| crate::kafka::assigned_partitions(a).unwrap_or(1))
                .sum::<usize>(),
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "No partitions, and the consumer group cannot be listed");
                return;
            }
        };
        if held > 0 {
            tracing::info!(group = %self.group, held, "No partitions for two session timeouts; other members hold the group's partitions");
            return;
        }
        tracing::warn!(group = %self.group, "No member of the consumer group holds a partition (the broker lost its assignment); joining again");
        let topics: Vec<&str> = self.tasks.iter().map(|t| t.topic.as_str()).collect();
        self.consumer.unsubscribe();
        if let Err(e) = self.consumer.subscribe(&topics) {
            tracing::error!(error = %e, "Cannot subscribe again");
        }
    }

    /// Passes the revocations of the last poll on to the workers, in order with the
    /// messages.
    fn take_revocations(&mut self) {
        let context = self.consumer.context();
        if !context.any_revoked.load(Ordering::Acquire) {
            return;
        }
        context.any_revoked.store(false, Ordering::Relaxed);
        let revoked =
            std::mem::take(&mut *context.revoked.lock().unwrap_or_else(|e| e.into_inner()));
        for (topic, partition) in revoked {
            let Some(&task) = self.task_of.get(topic.as_str()) else {
                continue;
            };
            if self.paused.remove(&(task, partition)) {
                METRICS.ingest_paused.set(self.paused.len() as i64);
            }
            self.paused_for = None;
            // A worker holds something of it only if a message of it was taken.
            if let Some(worker) = self.positions.revoke(task, partition) {
                self.stash
                    .push_back((worker, Item::Revoked { task, partition }));
            }
        }
    }

    /// The task of a message's topic. One task reads one topic. A few tasks: comparing
    /// names beats hashing one per message (naming the topic checks it is UTF-8, so not
    /// even that for one).
    fn task_for<'t>(&self, topic: impl FnOnce() -> Option<&'t str>) -> Option<usize> {
        if self.tasks.len() == 1 {
            return Some(0);
        }
        let topic = topic()?;
        self.tasks.iter().position(|t| t.topic == topic)
    }

    /// Admits a message and hands it over.
    fn take(&mut self, msg: Message) {
        let worker = match self.positions.admit(msg.task, msg.partition, msg.offset) {
            Admit::Take(w) => w,
            Admit::Drop => return,
            Admit::SeekBack(from) => {
                let mut tpl = TopicPartitionList::new();
                let sought = tpl
                    .add_partition_offset(
                        &self.tasks[msg.task].topic,
                        msg.partition,
                        Offset::Offset(from),
                    )
                    .and_then(|()| self.consumer.seek_partitions(tpl, Duration::from_secs(5)));
                match sought {
                    Ok(_) => {
                        self.positions.sought(msg.task, msg.partition);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Seeking back over a gap failed");
                        self.positions
                            .seek_failed(msg.task, msg.partition, msg.offset)
                    }
                }
            }
        };
        self.uncounted[msg.task] += 1;
        let msg = msg.reserve(self.ceiling);
        self.hand_over(worker, Item::Message(msg));
    }

    /// Events (rebalances, commit results, errors) from the consumer's own queue, then
    /// messages in a batch from the queue every partition is forwarded to. True if there
    /// was nothing.
    fn poll(&mut self, queue: &MessageQueue, batch: &mut [*mut rdsys::rd_kafka_message_t]) -> bool {
        let consumer = self.consumer.clone();
        let polled = consumer.poll(Duration::ZERO);
        self.take_revocations();
        self.positions.new_batch();
        match polled {
            Some(Ok(m)) => {
                // A partition assigned before the batch queue existed: copied.
                if let Some(task) = self.task_for(|| Some(m.topic())) {
                    self.take(Message::owned(
                        task,
                        m.partition(),
                        m.offset(),
                        m.key().map(<[u8]>::to_vec),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
                false
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                false
            }
            None => {
                let n = queue.read(batch, if self.paused.is_empty() { 50 } else { 20 });
                for &raw in &batch[..n] {
                    // SAFETY: returned by the batch read, owned by nothing else; the consumer
                    // is in an `Arc` that every holder of messages also holds, dropping its
                    // messages first (the workers, and this thread in `close`).
                    let Some(held) = (unsafe { Held::from_raw(raw) }) else {
                        continue;
                    };
                    if let Some(error) = held.error() {
                        tracing::warn!(partition = held.partition(), error = %error, "Kafka consumer error");
                        continue;
                    }
                    if let Some(task) = self.task_for(|| held.topic()) {
                        self.take(Message::kafka(task, held));
                    }
                }
                n == 0
            }
        }
    }

    /// Stops fetching, hands over what was taken, waits for the writers while keeping the
    /// group membership alive and applying commits, commits for the last time and leaves
    /// the group.
    fn close(mut self, queue: MessageQueue, fetching_done: &AtomicBool, flushed: &AtomicBool) {
        for (n, counter) in self.uncounted.iter().zip(&self.consumed) {
            counter.inc_by(*n);
        }
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assignment);
        }
        while let Some((w, mut item)) = self.stash.pop_front() {
            while let Err(back) = self.senders[w].push(item) {
                item = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Messages are dropped before this thread's hold on the consumer.
        self.senders.clear();
        fetching_done.store(true, Ordering::SeqCst);
        while !flushed.load(Ordering::SeqCst) {
            self.commit(CommitMode::Async);
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
        self.commit(CommitMode::Sync);
        // Only partitions this member still holds: one revoked earlier may have been
        // consumed further by its new owner since, and committing this member's older
        // position would move the group back over it.
        let held: std::collections::HashSet<(String, i32)> = self
            .consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for ((task, partition), next) in &self.latest {
            let topic = &self.tasks[*task].topic;
            if !held.contains(&(topic.to_string(), *partition)) {
                continue;
            }
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "Final offset commit failed");
            }
        }
        self.consumer.unsubscribe();
        self.consumer
            .context()
            .queue
            .store(std::ptr::null_mut(), Ordering::Release);
        drop(queue);
        tracing::info!(committed_partitions = tpl.count(), "Consumer closed");
    }
}
