//! Reading messages again by offset: the originals of rows ClickHouse refused, for the
//! dead-letter topic. The pipeline does not keep a message once it is a row (a row is ~20
//! times smaller than its JSON, which is what lets batches be large under the memory
//! ceiling); refusals are rare, so fetching those few messages again is the cheap side.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// A message's key and payload.
pub type Original = (Option<Vec<u8>>, Vec<u8>);

pub struct Rereader {
    config: rdkafka::ClientConfig,
    /// How far before the first wanted offset to start (see `KafkaConfig::start_rewind`).
    rewind: i64,
}

impl Rereader {
    /// `config`: the brokers and client properties; no group is joined.
    pub fn new(mut config: rdkafka::ClientConfig, group: &str, rewind: i64) -> Self {
        config
            .set("group.id", format!("{group}-reread"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Starting before the log's start (retention) starts at its start.
            .set("auto.offset.reset", "earliest");
        Self { config, rewind }
    }

    /// The messages at `offsets` of one partition (blocking; call off the runtime). An
    /// offset missing from the answer was not found before `timeout` (deleted by
    /// retention, or the broker is unreachable).
    pub fn read(
        &self,
        topic: &str,
        partition: i32,
        offsets: &[i64],
        timeout: Duration,
    ) -> Result<HashMap<i64, Original>, String> {
        let (Some(&first), Some(&last)) = (offsets.iter().min(), offsets.iter().max()) else {
            return Ok(HashMap::new());
        };
        let consumer: BaseConsumer = self
            .config
            .create()
            .map_err(|e| format!("cannot create a consumer: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            topic,
            partition,
            Offset::Offset((first - self.rewind).max(0)),
        )
        .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let wanted: HashSet<i64> = offsets.iter().copied().collect();
        let mut found = HashMap::with_capacity(wanted.len());
        let end = Instant::now() + timeout;
        while found.len() < wanted.len() && Instant::now() < end {
            let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = match polled {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(topic, partition, error = %e, "Reading again");
                    continue;
                }
            };
            if m.offset() > last {
                break;
            }
            if wanted.contains(&m.offset()) {
                found.insert(
                    m.offset(),
                    (
                        m.key().map(<[u8]>::to_vec),
                        m.payload().unwrap_or_default().to_vec(),
                    ),
                );
            }
        }
        Ok(found)
    }
}
