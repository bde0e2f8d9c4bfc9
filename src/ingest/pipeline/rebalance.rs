//! Rebalances: where each assigned partition starts (its batch intent in ZooKeeper, when
//! there is one), forwarding it to the batch queue, and passing revocations on to the
//! consume loop, which tells the workers in order with the messages.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::ingest::intents::Intents;
use crate::kafka::{queue, Rereader};

pub struct Context {
    /// (topic, partition) revoked during the last poll, for the consume loop to pass on.
    pub(super) revoked: std::sync::Mutex<Vec<(String, i32)>>,
    /// Set with `revoked`, so the loop takes the lock only when there is something.
    pub(super) any_revoked: AtomicBool,
    /// With intents, where each assigned partition starts is what ZooKeeper says, not the
    /// committed offset (which can lag, and which the test broker was seen to overtake).
    pub(super) intents: Option<(Arc<Intents>, String, tokio::runtime::Handle)>,
    /// Start this many offsets before the intent's position (the worker skips what is
    /// before it): brokers that answer a fetch from the middle of a record batch with the
    /// next batch (tansu 0.6 does) would otherwise skip the rest of that batch.
    pub(super) rewind: i64,
    /// Tells a recreated topic from a broker that reports too low an end.
    pub(super) reread: Arc<Rereader>,
    /// The consume thread's `MessageQueue` while it runs (null before and after): each
    /// partition is forwarded to it when assigned.
    pub(super) queue: AtomicPtr<rdsys::rd_kafka_queue_t>,
}

impl ClientContext for Context {}

/// Partitions whose intent is past their end checked at once (each check is a consumer
/// of its own, for a few seconds).
const READ_CHECKS: usize = 16;

impl Context {
    /// Where each partition of an assignment starts: right after its last finished
    /// segment, or the start of its unfinished one (`None` for a partition without an
    /// intent: the committed offset). An intent past the partition's end names messages
    /// that are gone (the topic was deleted and created again, or the broker lost its
    /// log): it is dropped and the partition starts like a new one, as Kafka does with a
    /// committed offset out of range; keeping it would skip every new message below it.
    /// Dropping one wrongly writes again whatever lies between the committed offset and
    /// the intent, so the end the broker reports is not taken alone: the intent is only
    /// dropped if its last message cannot be read either (tansu 0.6 reports the first
    /// offset of the partition's last record batch as its end, below a sidecar that has
    /// caught up). Those reads wait a few seconds for a message that is gone, so they run
    /// side by side ([`READ_CHECKS`] at a time): one after another, a recreated topic of
    /// many partitions held the rebalance for seconds per partition (a fault run saw 45 s
    /// for 9, and a group that never settled under repeated restarts).
    fn start_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Vec<(String, i32, i64)> {
        let Some((intents, group, handle)) = self.intents.as_ref() else {
            return Vec::new();
        };
        let mut starts = Vec::new();
        // (topic, partition, start, the broker's end, the intent's last offset)
        let mut past_end = Vec::new();
        for e in tpl.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            // The rebalance cannot go on without knowing: wait for ZooKeeper as long as
            // it takes.
            let Some(Some(intent)) = intents.load_waiting(handle, group, topic, partition, None)
            else {
                continue;
            };
            let start = if intent.done {
                intent.last + 1
            } else {
                intent.first
            };
            match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
                Ok((_, end)) if start > end => {
                    past_end.push((topic.to_string(), partition, start, end, intent.last))
                }
                _ => starts.push((topic.to_string(), partition, start)),
            }
        }
        for chunk in past_end.chunks(READ_CHECKS) {
            let readable: Vec<bool> = std::thread::scope(|s| {
                let checks: Vec<_> = chunk
                    .iter()
                    .map(|(topic, partition, _, _, last)| {
                        s.spawn(move || self.readable(topic, *partition, *last))
                    })
                    .collect();
                // A check that failed to run keeps the intent, as one that cannot tell.
                checks
                    .into_iter()
                    .map(|c| c.join().unwrap_or(true))
                    .collect()
            });
            for ((topic, partition, start, end, _), there) in chunk.iter().zip(readable) {
                if there {
                    starts.push((topic.clone(), *partition, *start));
                    continue;
                }
                tracing::warn!(
                    topic, partition, recorded = start, end,
                    "The batch intent is past the partition's end (the topic was recreated?): dropping it and starting the partition anew"
                );
                intents.forget_waiting(handle, group, topic, *partition);
            }
        }
        starts
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
    pub(super) fn forward(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        // SAFETY: `queue` is null or the consume thread's live batch queue (it clears it
        // before destroying the queue, and rebalances run on that thread).
        unsafe { queue::forward(consumer, tpl, self.queue.load(Ordering::Acquire)) }
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
                for (topic, partition, start) in self.start_offsets(base_consumer, tpl) {
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
