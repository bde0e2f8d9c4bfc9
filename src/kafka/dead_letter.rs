//! Dead letters: a message that could not become a row, published to a dead-letter topic
//! with its original key and bytes and headers saying why, and where it came from:
//! `chgate-error`, `chgate-reason`, `chgate-source-topic`, `chgate-source-partition`,
//! `chgate-source-offset`.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::backoff::{Backoff, Stop};

/// A message that goes to the dead-letter topic, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// A fixed word: `parse`, `type`, `time_window`, `refused`, `envelope`, `truncate`.
    pub reason: &'static str,
    pub error: String,
}

impl DeadLetter {
    /// The headers it is published with.
    fn headers(&self, source_topic: &str) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        OwnedHeaders::new()
            .insert(Header {
                key: "chgate-error",
                value: Some(self.error.as_str()),
            })
            .insert(Header {
                key: "chgate-reason",
                value: Some(self.reason),
            })
            .insert(Header {
                key: "chgate-source-topic",
                value: Some(source_topic),
            })
            .insert(Header {
                key: "chgate-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "chgate-source-offset",
                value: Some(offset.as_str()),
            })
    }
}

/// Publishes `letter` (from `source_topic`) to `topic` until the broker acknowledges it;
/// false if stopped first (a drain ends only the waits between tries, see [`Stop`]).
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    source_topic: &str,
    letter: &DeadLetter,
    stop: &Stop,
) -> bool {
    let mut backoff = Backoff::default();
    loop {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&letter.payload)
            .headers(letter.headers(source_topic));
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        let sent = tokio::select! {
            _ = stop.now.cancelled() => return false,
            r = producer.send(record, Duration::from_secs(5)) => r,
        };
        match sent {
            Ok(_) => return true,
            Err((e, _)) => {
                tracing::warn!(topic, error = %e, "Dead letter not delivered; retrying");
                if !stop.backoff(&mut backoff).await {
                    return false;
                }
            }
        }
    }
}
