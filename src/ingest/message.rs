//! A consumed message on its way from the consumer thread to a parser worker.
//!
//! Messages from Kafka are not copied: the worker reads the payload where librdkafka put
//! it ([`Held`]) and the message is released when the worker is done with it. While it
//! travels, a message holds its payload's bytes against the memory ceiling
//! ([`Reservation`]), given back when it is dropped, whatever becomes of it.

use super::pending::{Ceiling, Reservation};
use crate::kafka::Held;

/// A message as the consumer hands it to a worker.
#[derive(Debug)]
pub struct Message {
    pub task: usize,
    pub partition: i32,
    pub offset: i64,
    body: Body,
    reserved: Reservation,
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
            reserved: Reservation::none(),
        }
    }

    /// A message still in the Kafka client's buffers.
    pub fn kafka(task: usize, held: Held) -> Self {
        Self {
            task,
            partition: held.partition(),
            offset: held.offset(),
            body: Body::Kafka(held),
            reserved: Reservation::none(),
        }
    }

    /// The message with its payload held against `ceiling` until it is dropped.
    pub fn reserve(mut self, ceiling: &'static Ceiling) -> Self {
        self.reserved = ceiling.reserve(self.payload().len());
        self
    }

    pub fn payload(&self) -> &[u8] {
        match &self.body {
            Body::Owned { payload, .. } => payload,
            Body::Kafka(h) => h.payload(),
        }
    }

    pub fn key(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Owned { key, .. } => key.as_deref(),
            Body::Kafka(h) => h.key(),
        }
    }

    /// The key and payload as owned bytes (a dead letter outlives the message).
    pub fn into_parts(self) -> (Option<Vec<u8>>, Vec<u8>) {
        match self.body {
            Body::Owned { key, payload } => (key, payload),
            Body::Kafka(h) => (h.key().map(<[u8]>::to_vec), h.payload().to_vec()),
        }
    }
}
