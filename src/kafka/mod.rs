//! Kafka as chgate's apps use it, on librdkafka (rdkafka): client settings, messages owned
//! without a copy and read in batches from one queue, reading messages again by offset,
//! and dead letters. What a consumer does with messages is the app's.
//!
//! - [`config`]: client config from the operator's brokers and properties;
//! - [`message`], [`queue`]: zero-copy messages and the batch queue (all the `unsafe`);
//! - [`reread`]: the originals of given offsets, fetched again;
//! - [`dead_letter`]: publishing a message that could not become a row, with why;
//! - [`partition`]: the Java client's key partitioner (murmur2).

pub mod config;
pub mod dead_letter;
pub mod message;
pub mod partition;
pub mod queue;
pub mod reread;

pub use config::client_config;
pub use dead_letter::DeadLetter;
pub use message::Held;
pub use queue::MessageQueue;
pub use reread::Rereader;
