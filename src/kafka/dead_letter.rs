//! Dead letters: a message that could not become a row, published to a dead-letter topic
//! with its original key and bytes and headers saying why, and where it came from:
//! `chgate-error`, `chgate-reason`, `chgate-source-topic`, `chgate-source-partition`,
//! `chgate-source-offset`.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
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

/// The most of a dead letter's error text kept in its header.
const MAX_ERROR_BYTES: usize = 4096;

impl DeadLetter {
    /// This letter without its payload (and with a key over 64 KiB dropped), its error
    /// saying so: what goes when the dead-letter topic refuses the letter as too large.
    fn stripped(&self, why: &KafkaError) -> Self {
        let mut error = format!(
            "{} [payload of {} bytes not included: the dead-letter topic refused the letter ({why}); read it at the source offset]",
            self.error,
            self.payload.len()
        );
        if error.len() > MAX_ERROR_BYTES {
            let mut end = MAX_ERROR_BYTES;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error.truncate(end);
        }
        Self {
            partition: self.partition,
            offset: self.offset,
            key: self.key.clone().filter(|k| k.len() <= 64 << 10),
            payload: Vec::new(),
            reason: self.reason,
            error,
        }
    }
}

/// Whether the broker (or librdkafka before it) refused a message for its size: sending
/// it again never helps.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// Publishes `letter` (from `source_topic`) to `topic` until the broker acknowledges it;
/// false if stopped first (a drain ends only the waits between tries, see [`Stop`]). A
/// letter refused for its size goes once more without its payload (the headers still
/// name the source offset), rather than holding its partition back for ever.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    source_topic: &str,
    letter: &DeadLetter,
    stop: &Stop,
) -> bool {
    let mut backoff = Backoff::default();
    let mut stripped: Option<DeadLetter> = None;
    loop {
        let letter = stripped.as_ref().unwrap_or(letter);
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
            Err((e, _)) if stripped.is_none() && too_large(&e) => {
                tracing::warn!(topic, error = %e, source_topic, partition = letter.partition, offset = letter.offset, "Dead letter refused for its size; sending it without its payload");
                stripped = Some(letter.stripped(&e));
            }
            Err((e, _)) => {
                tracing::warn!(topic, error = %e, "Dead letter not delivered; retrying");
                if !stop.backoff(&mut backoff).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_too_large_goes_without_its_payload() {
        let letter = DeadLetter {
            partition: 2,
            offset: 99,
            key: Some(vec![b'k'; 100 << 10]),
            payload: vec![b'x'; 2 << 20],
            reason: "parse",
            error: "é".repeat(5000),
        };
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(too_large(&e));
        assert!(!too_large(&KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
        let s = letter.stripped(&e);
        assert!(s.payload.is_empty() && s.key.is_none());
        assert!(s.error.len() <= MAX_ERROR_BYTES);
        assert_eq!((s.partition, s.offset, s.reason), (2, 99, "parse"));
        let short = DeadLetter {
            error: "bad json".into(),
            key: Some(b"k1".to_vec()),
            ..letter
        }
        .stripped(&e);
        assert!(
            short
                .error
                .contains("payload of 2097152 bytes not included"),
            "{}",
            short.error
        );
        assert_eq!(short.key.as_deref(), Some(&b"k1"[..]));
    }
}
