//! Kafka as chgate's apps use it, on librdkafka (rdkafka): client settings, messages owned
//! without a copy and read in batches from one queue, reading messages again by offset,
//! and dead letters. What a consumer does with messages is the app's.
//!
//! - [`config`]: client config from the operator's brokers and properties;
//! - [`message`], [`queue`]: zero-copy messages and the batch queue (all the `unsafe`);
//! - [`assigned_partitions`]: a group member's assignment, counted;
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

/// How many partitions a consumer group member's assignment (the consumer protocol's
/// `Assignment`: version, then topics with their partitions) holds; `None` if it cannot be
/// read.
pub fn assigned_partitions(assignment: &[u8]) -> Option<usize> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn int(b: &mut &[u8]) -> Option<i32> {
        take(b, 4).map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    if assignment.is_empty() {
        return Some(0);
    }
    let mut b = assignment;
    take(&mut b, 2)?; // version
    let topics = int(&mut b)?;
    let mut total = 0usize;
    for _ in 0..topics.max(0) {
        let len = take(&mut b, 2).map(|x| i16::from_be_bytes([x[0], x[1]]))?;
        take(&mut b, usize::try_from(len).ok()?)?;
        let partitions = usize::try_from(int(&mut b)?).ok()?;
        take(&mut b, partitions.checked_mul(4)?)?;
        total += partitions;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::assigned_partitions;

    #[test]
    fn reads_a_members_assignment() {
        // Version 0, two topics: "ab" with partitions 0 and 2, "c" with none; user data -1.
        let mut a = vec![
            0, 0, 0, 0, 0, 2, 0, 2, b'a', b'b', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        a.extend([0, 1, b'c', 0, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(assigned_partitions(&a), Some(2));
        assert_eq!(assigned_partitions(&[0, 1, 0, 0, 0, 0]), Some(0));
        assert_eq!(assigned_partitions(&[]), Some(0));
        // Cut short, or claiming more than there is: unreadable, not a panic.
        assert_eq!(assigned_partitions(&a[..9]), None);
        assert_eq!(
            assigned_partitions(&[0, 0, 0, 0, 0, 1, 0, 1, b'x', 127, 255, 255, 255]),
            None
        );
    }
}
