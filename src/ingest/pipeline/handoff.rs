//! What the pipeline's threads pass each other: the tasks they share, the items of a
//! ring, the commits writers send back to the consumer thread, and which partitions have
//! settled their start (the workers tell the consumer thread's flow control).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::ingest::batch::{Message, TaskSpec};
use crate::sink::Target;

/// A task as the pipeline runs it.
pub struct Task {
    pub name: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub spec: Arc<TaskSpec>,
    pub target: Arc<Target>,
}

pub struct Commit {
    pub task: usize,
    pub partition: i32,
    pub next: i64,
}

/// What travels through a ring: messages, and, in order with them, the news that a
/// partition was taken away (so the worker drops what it holds of it and its writer stops
/// before the next segment: the partition's next owner resumes from the intent).
pub enum Item {
    Message(Message),
    Revoked { task: usize, partition: i32 },
}

/// The partitions whose start has settled: their worker has read the partition's intent and
/// rebuilt the pending segment it names, if it names one. The memory ceiling pauses only
/// these. A partition still being rebuilt needs its messages to finish: its segment is
/// never cut short (it must be the same block as the insert that may have landed before
/// the crash), so it holds its bytes until it is whole, and a column `ALTER` waits for it.
/// Pausing it could hold everything forever. Until its first message is seen a partition's
/// intent is not known, so it counts as not settled too.
///
/// Workers write it a few times per partition; the consumer thread reads the change count
/// once a loop and the set only when it changed.
#[derive(Default)]
pub struct Settled {
    set: Mutex<HashSet<(usize, i32)>>,
    changes: AtomicU64,
}

impl Settled {
    /// The partition's start is settled: it may be paused.
    pub fn settle(&self, task: usize, partition: i32) {
        if self.lock().insert((task, partition)) {
            self.changes.fetch_add(1, Ordering::Release);
        }
    }

    /// The partition was revoked: if it comes back, its start is read again.
    pub fn unsettle(&self, task: usize, partition: i32) {
        if self.lock().remove(&(task, partition)) {
            self.changes.fetch_add(1, Ordering::Release);
        }
    }

    /// Grows with every change to the set.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    pub fn contains(&self, task: usize, partition: i32) -> bool {
        self.lock().contains(&(task, partition))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(usize, i32)>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_counts_only_real_changes() {
        let s = Settled::default();
        assert!(!s.contains(0, 1));
        s.settle(0, 1);
        s.settle(0, 1);
        assert!(s.contains(0, 1));
        assert_eq!(s.changes(), 1);
        s.unsettle(0, 1);
        s.unsettle(0, 1);
        assert!(!s.contains(0, 1));
        assert_eq!(s.changes(), 2);
    }
}
