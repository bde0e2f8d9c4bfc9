//! Events into Kafka: an idempotent producer (its own retries neither duplicate nor
//! reorder), every event to the partition the capture chose (murmur2 of the key, as Kafka's
//! Java clients and Debezium do) with its outbox sequence number in the `chgate-seq`
//! header, and the acknowledgements counted per unit, so the capture knows which units are
//! wholly in and may be confirmed to PostgreSQL and dropped from the outbox.

use std::collections::VecDeque;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use super::config::{CdcKafkaConfig, FIXED_PROPERTIES};
use super::store::OutboxEvent;
use crate::kafka::client_config;

/// The header carrying an event's outbox sequence number.
pub const SEQ_HEADER: &str = "chgate-seq";
/// The header that names the store an event was numbered by (hex): a rebuild's sign that
/// the topics went on without this store (`cdc/rebuild.rs`).
pub const STORE_HEADER: &str = "chgate-store";

/// The outcome of one message: its unit, and the error if the broker refused it.
type Delivery = (u64, Option<String>);

struct Context {
    acks: mpsc::UnboundedSender<Delivery>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, unit: usize) {
        let error = result
            .as_ref()
            .err()
            .map(|(e, m)| format!("{e} (topic {}, partition {})", m.topic(), m.partition()));
        let _ = self.acks.send((unit as u64, error));
    }
}

/// A unit whose events are on their way.
struct Pending {
    unit: u64,
    in_flight: usize,
    lsn: Option<u64>,
    last_seq: u64,
    commit_ts_ms: i64,
}

/// Units wholly acknowledged, in order.
#[derive(Debug, Default, PartialEq)]
pub struct Done {
    /// The furthest complete transaction among them.
    pub lsn: Option<u64>,
    /// Every event up to this one is in.
    pub last_seq: u64,
    /// Commit times of their transactions (Unix ms), for the latency histogram.
    pub commit_ts_ms: Vec<i64>,
}

pub struct EventProducer {
    producer: ThreadedProducer<Context>,
    /// The first delivery that failed: nothing more is sent after it (a later event could
    /// land behind a missing one).
    failed: Option<String>,
    acks: mpsc::UnboundedReceiver<Delivery>,
    pending: VecDeque<Pending>,
    /// Partitions per topic.
    partitions: std::collections::HashMap<String, i32>,
    /// The store's id, in hex, for [`STORE_HEADER`].
    store_id: String,
    /// The last acknowledgement, or the moment the first unit went out after a quiet time.
    last_ack: std::time::Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("Kafka: {0}")]
pub struct ProduceError(pub String);

/// The producer's librdkafka properties: the config's, then [`FIXED_PROPERTIES`] over them
/// (validation refuses a config that sets those, so nothing is silently overridden).
fn producer_config(cfg: &CdcKafkaConfig) -> rdkafka::ClientConfig {
    let mut c = client_config(&cfg.brokers, &Default::default());
    // Bounded: the outbox holds every event until it is acknowledged, so librdkafka's
    // own queue needs no depth (its defaults allow 100,000 messages and 1 GiB).
    c.set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "50000")
        .set("queue.buffering.max.kbytes", "65536");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    for (k, v) in FIXED_PROPERTIES {
        c.set(k, v);
    }
    c
}

impl EventProducer {
    pub fn new(cfg: &CdcKafkaConfig) -> Result<Self, ProduceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let producer = producer_config(cfg)
            .create_with_context(Context { acks: tx })
            .map_err(|e| ProduceError(e.to_string()))?;
        Ok(Self {
            producer,
            failed: None,
            acks: rx,
            pending: VecDeque::new(),
            partitions: Default::default(),
            store_id: String::new(),
            last_ack: std::time::Instant::now(),
        })
    }

    /// Creates the topics that do not exist yet, and learns every topic's partitions.
    pub async fn ensure_topics(
        &mut self,
        cfg: &CdcKafkaConfig,
        topics: &[String],
    ) -> Result<(), ProduceError> {
        self.ensure_topics_with(cfg, topics, cfg.partitions, &[])
            .await
    }

    /// [`EventProducer::ensure_topics`] with a partition count and topic configs for the
    /// ones it creates.
    pub async fn ensure_topics_with(
        &mut self,
        cfg: &CdcKafkaConfig,
        topics: &[String],
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), ProduceError> {
        let admin: AdminClient<DefaultClientContext> = client_config(&cfg.brokers, &cfg.properties)
            .create()
            .map_err(|e| ProduceError(e.to_string()))?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                configs.iter().fold(
                    NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                    |n, (k, v)| n.set(k, v),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new, &options)
            .await
            .map_err(|e| ProduceError(format!("creating topics: {e}")))?;
        for r in results {
            match r {
                Ok(topic) => tracing::info!(topic, "Created the topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, e)) => {
                    return Err(ProduceError(format!("creating topic {topic}: {e}")))
                }
            }
        }
        for t in topics {
            let n = self.partition_count(t).await?;
            self.partitions.insert(t.clone(), n);
        }
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, ProduceError> {
        let producer = self.producer.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let m = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| ProduceError(format!("metadata of {topic}: {e}")))?;
            m.topics()
                .first()
                .map(|t| t.partitions().len() as i32)
                .filter(|&n| n > 0)
                .ok_or_else(|| ProduceError(format!("topic {topic} has no partitions")))
        })
        .await
        .map_err(|e| ProduceError(e.to_string()))?
    }

    pub fn partitions(&self, topic: &str) -> i32 {
        self.partitions.get(topic).copied().unwrap_or(1)
    }

    /// Registers a unit about to be sent: how many events it has (none is fine: an
    /// empty transaction still moves the position), where it brings the capture, and its
    /// last event.
    pub fn begin_unit(
        &mut self,
        unit: u64,
        events: usize,
        lsn: Option<u64>,
        last_seq: u64,
        commit_ts_ms: i64,
    ) {
        if events > 0 && self.pending.iter().all(|p| p.in_flight == 0) {
            // Waiting starts now, not at the last acknowledgement of a while ago.
            self.last_ack = std::time::Instant::now();
        }
        self.pending.push_back(Pending {
            unit,
            in_flight: events,
            lsn,
            last_seq,
            commit_ts_ms,
        });
    }

    /// Names the store whose events this producer sends.
    pub fn set_store(&mut self, id: u64) {
        self.store_id = format!("{id:016x}");
    }

    /// Queues one event; waits while librdkafka's queue is full.
    pub async fn send(&mut self, e: &OutboxEvent) -> Result<(), ProduceError> {
        if let Some(first) = &self.failed {
            return Err(ProduceError(format!(
                "not sending after a failed delivery: {first}"
            )));
        }
        let mut digits = [0u8; 20];
        let seq = decimal(e.seq, &mut digits);
        loop {
            let mut record =
                BaseRecord::<[u8], [u8], usize>::with_opaque_to(&e.topic, e.unit as usize)
                    .partition(e.partition)
                    .headers(
                        OwnedHeaders::new_with_capacity(2)
                            .insert(Header {
                                key: SEQ_HEADER,
                                value: Some(seq),
                            })
                            .insert(Header {
                                key: STORE_HEADER,
                                value: Some(self.store_id.as_bytes()),
                            }),
                    );
            if let Some(k) = &e.key {
                record = record.key(&k[..]);
            }
            if let Some(v) = &e.value {
                record = record.payload(&v[..]);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    // librdkafka's queue is full: wait for an acknowledgement to free a place.
                    self.wait_ack(Duration::from_millis(100)).await?;
                }
                Err((err, _)) => {
                    return Err(ProduceError(format!("producing to {}: {err}", e.topic)))
                }
            }
        }
    }

    /// Takes the acknowledgements that have arrived; a refused message is an error (the
    /// idempotent producer has already retried it).
    pub fn drain_acks(&mut self) -> Result<(), ProduceError> {
        while let Ok((unit, error)) = self.acks.try_recv() {
            self.ack(unit, error)?;
        }
        Ok(())
    }

    fn ack(&mut self, unit: u64, error: Option<String>) -> Result<(), ProduceError> {
        if let Some(e) = error {
            self.failed.get_or_insert_with(|| e.clone());
            return Err(ProduceError(format!("an event was not delivered: {e}")));
        }
        if let Ok(i) = self.pending.binary_search_by_key(&unit, |p| p.unit) {
            self.pending[i].in_flight = self.pending[i].in_flight.saturating_sub(1);
        }
        self.last_ack = std::time::Instant::now();
        Ok(())
    }

    /// How long events have waited for the broker with no acknowledgement at all, and how
    /// many are in flight; `None` while acknowledgements come (or nothing waits).
    pub fn stalled(&self) -> Option<(Duration, usize)> {
        let waiting: usize = self.pending.iter().map(|p| p.in_flight).sum();
        (waiting > 0).then(|| (self.last_ack.elapsed(), waiting))
    }

    /// Waits for the next acknowledgement (or `timeout`).
    pub async fn wait_ack(&mut self, timeout: Duration) -> Result<(), ProduceError> {
        if let Ok(Some((unit, error))) = tokio::time::timeout(timeout, self.acks.recv()).await {
            self.ack(unit, error)?;
        }
        self.drain_acks()
    }

    /// The units at the front that are wholly acknowledged; they are forgotten.
    pub fn take_done(&mut self) -> Option<Done> {
        let mut done: Option<Done> = None;
        while self.pending.front().is_some_and(|p| p.in_flight == 0) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let d = done.get_or_insert_with(Done::default);
            d.lsn = d.lsn.max(p.lsn);
            d.last_seq = d.last_seq.max(p.last_seq);
            if p.commit_ts_ms > 0 {
                d.commit_ts_ms.push(p.commit_ts_ms);
            }
        }
        done
    }

    /// Units not yet wholly acknowledged.
    pub fn in_flight_units(&self) -> usize {
        self.pending.len()
    }
}

/// `v` in decimal, written into `buf` (no allocation per event).
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_free_properties_win_over_the_config() {
        let cfg: CdcKafkaConfig = toml::from_str(
            "brokers = \"127.0.0.1:9092\"\n[properties]\n\"linger.ms\" = \"50\"\n\"message.timeout.ms\" = \"1000\"",
        )
        .unwrap();
        let c = producer_config(&cfg);
        assert_eq!(c.get("linger.ms"), Some("50"));
        for (k, v) in FIXED_PROPERTIES {
            assert_eq!(c.get(k), Some(v), "{k}");
        }
    }

    #[test]
    fn sequence_numbers_are_written_in_decimal() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(1_234_567, &mut buf), b"1234567");
        assert_eq!(decimal(u64::MAX, &mut buf), u64::MAX.to_string().as_bytes());
    }
}
