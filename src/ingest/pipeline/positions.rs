//! Where the consumer thread is in each partition, and what to do with each message it
//! reads: hand it to the partition's worker, drop it (read already), or read again from
//! before a gap the broker left. The decision is a value ([`Admit`]); the consume loop
//! makes the seek, so the gap logic is tested without a broker.

use crate::metrics::METRICS;

/// Maps keyed by (task, partition) are read several times per message: a fast hasher (the
/// keys come from the broker's assignment, not from message contents).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What to do with a message just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Hand it to this worker.
    Take(usize),
    /// Taken already (read again after a rewound seek), or read before a seek back made
    /// during this batch: drop it.
    Drop,
    /// The broker skipped offsets before it: seek the partition back to this offset and
    /// read the gap again (once per gap), then tell [`Positions::sought`] or, if the seek
    /// failed, [`Positions::seek_failed`].
    SeekBack(i64),
}

/// A partition as the consumer thread knows it.
struct Taken {
    /// The offset after the last message taken from the client; `None` until one is
    /// taken after the partition was (re)assigned.
    next: Option<i64>,
    /// The worker that takes its messages: the one with the fewest partitions when it was
    /// first seen (a hash put 2 of 3 partitions on one of 2 workers, and that worker
    /// capped the sidecar), and the same one when it comes back after a revocation, so
    /// one worker at a time ever holds it.
    worker: usize,
}

pub struct Positions {
    taken: HashMap<(usize, i32), Taken>,
    partitions_of: Vec<usize>,
    /// Per partition, the gap last read again (each gap is read again once).
    reread: HashMap<(usize, i32), i64>,
    /// How far before a gap to read again (`kafka.start_rewind`); 0: gaps are real.
    rewind: i64,
    /// Partitions sought back during the batch being taken: the rest of the batch's
    /// messages of them were read before the seek, so they are dropped here as librdkafka
    /// drops them after it (taking them would pass over the gap being read again).
    sought: Vec<(usize, i32)>,
}

impl Positions {
    pub fn new(workers: usize, rewind: i64) -> Self {
        Self {
            taken: HashMap::default(),
            partitions_of: vec![0; workers.max(1)],
            reread: HashMap::default(),
            rewind,
            sought: Vec::new(),
        }
    }

    /// A new batch of messages begins.
    pub fn new_batch(&mut self) {
        self.sought.clear();
    }

    /// The offset after the last message taken from a partition, if one was taken since it
    /// was assigned.
    pub fn next(&self, task: usize, partition: i32) -> Option<i64> {
        self.taken.get(&(task, partition)).and_then(|t| t.next)
    }

    /// Every partition with a position: (task, partition, next offset).
    pub fn positions(&self) -> impl Iterator<Item = (usize, i32, i64)> + '_ {
        self.taken
            .iter()
            .filter_map(|(&(task, partition), t)| Some((task, partition, t.next?)))
    }

    /// The partition was revoked: it starts afresh when assigned again (same worker). The
    /// worker that holds it, if a message of it was taken, to be told.
    pub fn revoke(&mut self, task: usize, partition: i32) -> Option<usize> {
        self.reread.remove(&(task, partition));
        let t = self.taken.get_mut(&(task, partition))?;
        t.next = None;
        Some(t.worker)
    }

    pub fn admit(&mut self, task: usize, partition: i32, offset: i64) -> Admit {
        let key = (task, partition);
        if self.sought.contains(&key) {
            return Admit::Drop;
        }
        let t = match self.taken.get_mut(&key) {
            Some(t) => t,
            None => {
                let worker = (0..self.partitions_of.len())
                    .min_by_key(|&w| self.partitions_of[w])
                    .unwrap_or(0);
                self.partitions_of[worker] += 1;
                self.taken
                    .entry(key)
                    .or_insert(Taken { next: None, worker })
            }
        };
        match t.next {
            None => tracing::debug!(partition, offset, "First message polled"),
            Some(next) if offset < next => return Admit::Drop,
            Some(next) if offset > next && self.rewind > 0 => {
                if self.reread.insert(key, next) != Some(next) {
                    // A broker that answers a mid-batch fetch with the next batch skipped
                    // the rest of one: read again from before it, once per gap.
                    tracing::debug!(
                        partition,
                        expected = next,
                        got = offset,
                        "Offsets skipped by the broker; reading again from earlier"
                    );
                    return Admit::SeekBack((next - self.rewind).max(0));
                }
                // Kafka leaves gaps where transaction markers or compacted records were;
                // with a rewind configured, a gap that is there again when read again is
                // real too.
                missing(partition, next, offset);
            }
            Some(_) => {}
        }
        t.next = Some(offset + 1);
        Admit::Take(t.worker)
    }

    /// The seek asked for by [`Admit::SeekBack`] was made.
    pub fn sought(&mut self, task: usize, partition: i32) {
        self.sought.push((task, partition));
    }

    /// The seek asked for by [`Admit::SeekBack`] for the message at `offset` failed: go on
    /// past the gap with it; its worker.
    pub fn seek_failed(&mut self, task: usize, partition: i32, offset: i64) -> usize {
        let t = self
            .taken
            .get_mut(&(task, partition))
            .expect("SeekBack is only asked for a known partition");
        if let Some(next) = t.next {
            missing(partition, next, offset);
        }
        t.next = Some(offset + 1);
        t.worker
    }
}

fn missing(partition: i32, expected: i64, got: i64) {
    tracing::warn!(
        partition,
        expected,
        got,
        "Offsets missing from the partition even when read again; going on without them"
    );
    METRICS
        .ingest_skipped_by_broker
        .inc_by((got - expected) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_over_workers_and_keep_theirs() {
        let mut p = Positions::new(2, 0);
        assert_eq!(p.admit(0, 0, 10), Admit::Take(0));
        assert_eq!(p.admit(0, 1, 10), Admit::Take(1));
        assert_eq!(p.admit(0, 2, 10), Admit::Take(0));
        assert_eq!(p.admit(0, 1, 11), Admit::Take(1));
        // Revoked and assigned again: the same worker, from wherever it starts.
        assert_eq!(p.revoke(0, 1), Some(1));
        assert_eq!(p.next(0, 1), None);
        assert_eq!(p.admit(0, 1, 5), Admit::Take(1));
        assert_eq!(p.revoke(0, 7), None, "nothing taken, nobody to tell");
    }

    #[test]
    fn what_was_taken_already_is_dropped() {
        let mut p = Positions::new(1, 100);
        for o in 10..13 {
            assert_eq!(p.admit(0, 0, o), Admit::Take(0));
        }
        assert_eq!(p.admit(0, 0, 11), Admit::Drop);
        assert_eq!(p.next(0, 0), Some(13));
    }

    #[test]
    fn a_gap_is_read_again_once_then_taken_as_real() {
        let mut p = Positions::new(1, 100);
        assert_eq!(p.admit(0, 0, 500), Admit::Take(0));
        // 501..=549 skipped by the broker: read again from 100 before.
        assert_eq!(p.admit(0, 0, 550), Admit::SeekBack(401));
        p.sought(0, 0);
        assert_eq!(p.admit(0, 0, 551), Admit::Drop, "the rest of the batch");
        p.new_batch();
        // Read again: what was taken is dropped, the gap's messages are taken.
        assert_eq!(p.admit(0, 0, 450), Admit::Drop);
        assert_eq!(p.admit(0, 0, 501), Admit::Take(0));
        // A new gap (502) is read again too; found again, it is real (the broker has
        // nothing there).
        let skipped = METRICS.ingest_skipped_by_broker.get();
        assert_eq!(p.admit(0, 0, 503), Admit::SeekBack(402));
        p.sought(0, 0);
        p.new_batch();
        assert_eq!(
            p.admit(0, 0, 503),
            Admit::Take(0),
            "the same gap again: real"
        );
        assert!(METRICS.ingest_skipped_by_broker.get() > skipped);
    }

    #[test]
    fn without_a_rewind_gaps_are_normal_and_a_failed_seek_goes_on() {
        let mut p = Positions::new(1, 0);
        assert_eq!(p.admit(0, 0, 1), Admit::Take(0));
        assert_eq!(
            p.admit(0, 0, 9),
            Admit::Take(0),
            "a transaction marker's gap"
        );
        let mut p = Positions::new(1, 10);
        p.admit(0, 0, 1);
        assert_eq!(p.admit(0, 0, 9), Admit::SeekBack(0));
        assert_eq!(p.seek_failed(0, 0, 9), 0);
        assert_eq!(p.next(0, 0), Some(10));
    }
}
