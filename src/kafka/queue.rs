//! The queue a consumer's partitions are forwarded to, read in batches: one librdkafka call
//! per batch instead of a poll per message (each with an event, an allocation and three
//! clock reads: ~10% of the ingest sidecar's CPU, measured). Rebalances, commit results and
//! errors stay on the consumer's own queue, polled between batches; messages of a
//! partition stopped or sought meanwhile are dropped by librdkafka on the way out (its
//! version barrier), as from the consumer's queue.
//!
//! With [`super::message`], all of chgate's librdkafka `unsafe` is in these two files.

use std::ptr::NonNull;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;

pub struct MessageQueue(NonNull<rdsys::rd_kafka_queue_t>);

impl MessageQueue {
    /// Messages taken per batch read.
    pub const BATCH: usize = 256;

    /// A queue of `consumer`'s client. Drop it before the consumer.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Self {
        // SAFETY: a queue of a live client; the owner destroys it (on drop) before the
        // client, which it keeps alive meanwhile.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        Self(NonNull::new(queue).expect("librdkafka creates a queue"))
    }

    pub fn as_ptr(&self) -> *mut rdsys::rd_kafka_queue_t {
        self.0.as_ptr()
    }

    /// What is waiting, up to `out.len()` messages, or else the first to come within
    /// `wait_ms`; returns how many of `out` it filled. Each is owned by the caller
    /// ([`super::Held::from_raw`]).
    pub fn read(&self, out: &mut [*mut rdsys::rd_kafka_message_t], wait_ms: i32) -> usize {
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

/// Forwards the partitions of `tpl` to `queue` (librdkafka keeps an application's
/// forwarding over an assignment and clears it when the partition is stopped, so every
/// assignment sets it again). A null `queue` forwards nothing.
///
/// # Safety
/// `queue` is null or a live queue of `consumer`'s client, alive for the call.
pub unsafe fn forward<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    queue: *mut rdsys::rd_kafka_queue_t,
) {
    if queue.is_null() {
        return;
    }
    for e in tpl.elements() {
        let Ok(topic) = std::ffi::CString::new(e.topic()) else {
            continue;
        };
        // SAFETY: the client is alive (borrowed); the partition's queue handle is released
        // right after forwarding, which outlives the handle; `queue` is alive (the caller's
        // promise).
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
