//! A consumed message on its way from the consumer thread to a parser worker.
//!
//! Messages from Kafka are not copied: the worker reads the payload where librdkafka put
//! it (the fetch response buffer) and the message is released when the worker is done
//! with it. Measured on the benchmark's ~780-byte JSON messages, the copy and its
//! allocation and free were about a tenth of the sidecar's CPU.

use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;

/// A message as the consumer hands it to a worker.
#[derive(Debug)]
pub struct Message {
    pub task: usize,
    pub partition: i32,
    pub offset: i64,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Owned {
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    Kafka(Held),
}

impl Message {
    /// A message whose bytes are already owned (tests, benchmarks).
    pub fn owned(
        task: usize,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            task,
            partition,
            offset,
            body: Body::Owned { key, payload },
        }
    }

    /// A message still in the Kafka client's buffers.
    pub fn kafka(task: usize, held: Held) -> Self {
        Self {
            task,
            partition: held.0.partition(),
            offset: held.0.offset(),
            body: Body::Kafka(held),
        }
    }

    pub fn payload(&self) -> &[u8] {
        match &self.body {
            Body::Owned { payload, .. } => payload,
            Body::Kafka(h) => h.0.payload().unwrap_or_default(),
        }
    }

    pub fn key(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Owned { key, .. } => key.as_deref(),
            Body::Kafka(h) => h.0.key(),
        }
    }

    /// The key and payload as owned bytes (a dead letter outlives the message).
    pub fn into_parts(self) -> (Option<Vec<u8>>, Vec<u8>) {
        match self.body {
            Body::Owned { key, payload } => (key, payload),
            Body::Kafka(h) => (
                h.0.key().map(<[u8]>::to_vec),
                h.0.payload().unwrap_or_default().to_vec(),
            ),
        }
    }
}

/// A message borrowed from a Kafka consumer, with the borrow's lifetime erased so it can
/// cross to a worker thread (`BorrowedMessage` is `Send`; librdkafka releases a message
/// from any thread).
///
/// What the lifetime stood for still has to hold: the consumer must outlive the message.
/// The pipeline keeps it so: the consumer lives in an `Arc`, and everything that can hold
/// messages (the consumer thread with its stash and ring senders, each worker with its ring
/// receiver) holds a clone of that `Arc` and drops its messages first.
#[derive(Debug)]
pub struct Held(BorrowedMessage<'static>);

impl Held {
    /// # Safety
    /// The consumer `message` came from must outlive the returned value.
    pub unsafe fn new(message: BorrowedMessage<'_>) -> Self {
        // SAFETY: only the lifetime changes; the caller keeps the consumer alive.
        Self(unsafe {
            std::mem::transmute::<BorrowedMessage<'_>, BorrowedMessage<'static>>(message)
        })
    }
}
