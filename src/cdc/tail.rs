//! After a crash: which events of the outbox the broker already has.
//!
//! The producer is idempotent and every event goes to a partition the capture chose, so a
//! partition holds the capture's events in sequence order with no gap: the outbox events
//! of a partition up to the highest `chgate-seq` found in it are in, the ones after are
//! not. Reading a partition's tail answers that without any state outside Kafka and the
//! store. Reading starts `rewind` offsets before the end the broker reports (some brokers,
//! the test one among them, report the start of the last record batch or earlier, or
//! answer a fetch from inside a batch with the next one) and goes to the real end.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::producer::{SEQ_HEADER, STORE_HEADER};
use crate::kafka::client_config;

/// A client context that does not log reaching a partition's end as an error: here it is
/// the point.
pub(super) struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::error!(%error, reason, "Kafka client error while reading partition tails");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// The last event of a partition: its `chgate-seq`, and the store that numbered it (absent
/// in events of chgate before 2026-12-07).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Last {
    pub seq: u64,
    pub store: Option<u64>,
}

/// The highest `chgate-seq` in each partition (absent: none found).
pub fn highest_seqs(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
    partitions: &BTreeSet<(String, i32)>,
    rewind: i64,
) -> anyhow::Result<HashMap<(String, i32), Last>> {
    let mut out = HashMap::new();
    let topics: BTreeSet<&String> = partitions.iter().map(|(t, _)| t).collect();
    for topic in topics {
        let wanted: Vec<i32> = partitions
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect();
        read_topic(brokers, properties, topic, &wanted, rewind, &mut out)?;
    }
    Ok(out)
}

/// One topic at a time: an end-of-partition event names only the partition.
fn read_topic(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
    topic: &str,
    partitions: &[i32],
    rewind: i64,
    out: &mut HashMap<(String, i32), Last>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<Quiet> = client_config(brokers, properties)
        .set("group.id", "chgate-cdc-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // It reads to the end and stops: a fetch must not wait for more (librdkafka's
        // default is 500 ms, and some brokers, tansu among them, use all of it).
        .set("fetch.wait.max.ms", "10")
        // It reads a few thousand events per partition: no need for librdkafka's 64 MiB
        // of prefetch per partition.
        .set("queued.max.messages.kbytes", "8192")
        .create_with_context(Quiet)?;
    let mut list = TopicPartitionList::new();
    let mut open = BTreeSet::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high <= low {
            continue;
        }
        list.add_partition_offset(topic, p, Offset::Offset((high - rewind).max(low)))?;
        open.insert(p);
    }
    if open.is_empty() {
        return Ok(());
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !open.is_empty() {
        if Instant::now() > deadline {
            anyhow::bail!("reading the tails of topic {topic} took over 2 minutes");
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Ok(m)) => {
                let header = |name: &str, radix: u32| {
                    m.headers().and_then(|h| {
                        h.iter().find(|h| h.key == name).and_then(|h| {
                            u64::from_str_radix(std::str::from_utf8(h.value?).ok()?, radix).ok()
                        })
                    })
                };
                if let Some(seq) = header(SEQ_HEADER, 10) {
                    let last = Last {
                        seq,
                        store: header(STORE_HEADER, 16),
                    };
                    out.entry((topic.to_string(), m.partition()))
                        .and_modify(|e| {
                            if seq > e.seq {
                                *e = last;
                            }
                        })
                        .or_insert(last);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

/// After a rebuild, once this instance holds the slot (the previous leader can read no
/// more changes): checks that no partition got an event since the rebuild read `before`,
/// which a previous leader still delivering would have added behind the rebuild's back.
pub async fn unchanged_since(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
    rewind: i64,
    before: &HashMap<(String, i32), Last>,
) -> anyhow::Result<()> {
    let partitions: BTreeSet<(String, i32)> = before.keys().cloned().collect();
    let (brokers, properties) = (brokers.to_string(), properties.clone());
    let now = tokio::task::spawn_blocking(move || {
        highest_seqs(&brokers, &properties, &partitions, rewind)
    })
    .await??;
    for (partition, last) in &now {
        if before.get(partition).is_none_or(|b| b.seq != last.seq) {
            anyhow::bail!(
                "{}/{}: an event arrived while this instance rebuilt its store (seq {}): the \
                 previous leader was still sending; starting again",
                partition.0,
                partition.1,
                last.seq
            );
        }
    }
    Ok(())
}
