//! Reading the captured topics' partitions (`read_partitions`: for the tails here, for
//! a rebuild's fold in `rebuild.rs`), and after a crash: which events of the outbox the
//! broker already has.
//!
//! The producer is idempotent and every event goes to a partition the capture chose, so a
//! partition holds the capture's events in sequence order with no gap: the outbox events
//! of a partition up to the highest `chgate-seq` found in it are in, the ones after are
//! not. Reading a partition's tail answers that without any state outside Kafka and the
//! store. Reading starts `rewind` offsets before the end the broker reports (some brokers,
//! the test one among them, report the start of the last record batch or earlier, or
//! answer a fetch from inside a batch with the next one) and goes to the real end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
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
    properties: &BTreeMap<String, String>,
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
    properties: &BTreeMap<String, String>,
    topic: &str,
    partitions: &[i32],
    rewind: i64,
    out: &mut HashMap<(String, i32), Last>,
) -> anyhow::Result<()> {
    let starts: Vec<(i32, Start)> = partitions
        .iter()
        .map(|&p| (p, Start::Last(rewind)))
        .collect();
    // A few thousand events per partition: no need for much prefetch.
    let never = AtomicBool::new(false);
    read_partitions(brokers, properties, topic, &starts, 8192, &never, |m| {
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
        Ok(())
    })?;
    Ok(())
}

/// A saved offset the partition no longer has: records were removed (retention), or the
/// topic was made anew. The fold must start over from the partition's first record.
#[derive(Debug, thiserror::Error)]
#[error("{topic}/{partition}: the fold stopped at offset {saved}, and the partition now holds offsets {low} to {high}")]
pub struct OffsetGone {
    topic: String,
    partition: i32,
    saved: i64,
    low: i64,
    high: i64,
}

/// Where a partition's read starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    /// The first record the broker keeps.
    First,
    /// A saved offset (where an earlier read stopped): [`OffsetGone`] if the partition no
    /// longer has it.
    At(i64),
    /// So many offsets before the end the broker reports (see the module doc).
    Last(i64),
}

/// Reads every message of `topic`'s partitions, each from its [`Start`] to the end it
/// reports when asked, handing each to `each`; a partition that does not exist is left
/// out. `prefetch_kib` caps librdkafka's prefetch per partition. `Ok(false)` if `stop` was
/// set first.
pub fn read_partitions(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    starts: &[(i32, Start)],
    prefetch_kib: u32,
    stop: &AtomicBool,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let consumer: BaseConsumer<Quiet> = client_config(brokers, properties)
        .set("group.id", "chgate-cdc-read")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // librdkafka's default prefetch is 64 MiB per partition: a topic of many
        // partitions read whole would hold hundreds of MiB ahead of its reader.
        .set("queued.max.messages.kbytes", prefetch_kib.to_string())
        // It reads to the end and stops: a fetch must not wait for more (librdkafka's
        // default is 500 ms, and some brokers, tansu among them, use all of it).
        .set("fetch.wait.max.ms", "10")
        .create_with_context(Quiet)?;
    let mut list = TopicPartitionList::new();
    let mut open = BTreeSet::new();
    // Where each partition's read from a saved offset starts, and its offsets when asked.
    let mut froms: BTreeMap<i32, (i64, i64, i64)> = BTreeMap::new();
    for &(p, start) in starts {
        let (low, high) = match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
            Ok(w) => w,
            // A state topic nobody wrote yet.
            Err(e)
                if e.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                continue
            }
            Err(e) => return Err(e).with_context(|| format!("the offsets of {topic}/{p}")),
        };
        // Not `saved > high`: some brokers (tansu among them) report an end short of the
        // last record; a partition made anew, shorter than where the fold stopped, shows
        // as the broker taking the read back to an earlier offset (below).
        let from = match start {
            Start::At(saved) if saved < low => {
                return Err(OffsetGone {
                    topic: topic.to_string(),
                    partition: p,
                    saved,
                    low,
                    high,
                }
                .into())
            }
            Start::At(saved) => saved,
            Start::Last(n) => (high - n).max(low),
            Start::First => {
                if low > 0 && high > low {
                    tracing::warn!(
                        topic,
                        partition = p,
                        first_offset = low,
                        "The partition no longer starts at offset 0: unless compaction removed \
                         the records before it (the last event of each key is kept), rows they \
                         held are missing from the rebuilt store"
                    );
                }
                low
            }
        };
        if high <= from && !matches!(start, Start::At(_)) {
            continue;
        }
        list.add_partition_offset(topic, p, Offset::Offset(from))?;
        open.insert(p);
        if let Start::At(_) = start {
            froms.insert(p, (from, low, high));
        }
    }
    if open.is_empty() {
        return Ok(true);
    }
    consumer.assign(&list)?;
    let mut last_progress = Instant::now();
    while !open.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if last_progress.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("reading topic {topic}: no message for 2 minutes");
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Ok(m)) => {
                last_progress = Instant::now();
                if let Some(&(from, low, high)) = froms.get(&m.partition()) {
                    if m.offset() < from {
                        // The offset was past the partition's end: the broker took the read
                        // back to its start.
                        return Err(OffsetGone {
                            topic: topic.to_string(),
                            partition: m.partition(),
                            saved: from,
                            low,
                            high,
                        }
                        .into());
                    }
                }
                each(&m)?;
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading topic {topic}")),
        }
    }
    Ok(true)
}

/// After a rebuild: checks that no partition got an event since the rebuild read `before`,
/// which a previous leader still delivering would have added behind the rebuild's back.
/// Checked before this instance publishes anything (a snapshot it reads first), and again
/// once it holds the slot (the previous leader can read no more changes), where a
/// partition whose newest event this instance's store (`own`) numbered passes: its
/// snapshot published since.
pub async fn unchanged_since(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    rewind: i64,
    before: &HashMap<(String, i32), Last>,
    own: Option<u64>,
) -> anyhow::Result<()> {
    let partitions: BTreeSet<(String, i32)> = before.keys().cloned().collect();
    let (brokers, properties) = (brokers.to_string(), properties.clone());
    let now = tokio::task::spawn_blocking(move || {
        highest_seqs(&brokers, &properties, &partitions, rewind)
    })
    .await??;
    for (partition, last) in &now {
        let ours = own.is_some() && last.store == own;
        if !ours && before.get(partition).is_none_or(|b| b.seq != last.seq) {
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
