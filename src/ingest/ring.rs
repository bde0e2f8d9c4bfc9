//! The hand-off between the Kafka consumer thread and a parser worker: a bounded,
//! wait-free single-producer single-consumer ring (the `rtrb` crate) plus parking, so an
//! idle worker sleeps instead of spinning and a busy one never takes a lock. The consumer
//! thread owns every ring's [`Sender`]; each worker owns its ring's [`Receiver`].
//!
//! One ring per worker; the consumer sends every message of a partition to the same ring,
//! so a partition's messages stay in order with one worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Duration;

struct Shared {
    /// Set by the worker right before it parks; whoever pushes next wakes it.
    sleeping: AtomicBool,
    worker: std::sync::OnceLock<Thread>,
}

pub struct Sender<T> {
    tx: rtrb::Producer<T>,
    shared: Arc<Shared>,
}

pub struct Receiver<T> {
    rx: rtrb::Consumer<T>,
    shared: Arc<Shared>,
}

/// A ring holding up to `capacity` items.
pub fn ring<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = rtrb::RingBuffer::new(capacity.max(1));
    let shared = Arc::new(Shared {
        sleeping: AtomicBool::new(false),
        worker: std::sync::OnceLock::new(),
    });
    (
        Sender {
            tx,
            shared: shared.clone(),
        },
        Receiver { rx, shared },
    )
}

impl<T> Sender<T> {
    /// Hands an item over; gives it back if the ring is full (the caller pauses its source
    /// and retries later: it never spins and never grows the ring).
    pub fn push(&mut self, item: T) -> Result<(), T> {
        match self.tx.push(item) {
            Ok(()) => {
                if self.shared.sleeping.load(Ordering::SeqCst)
                    && self.shared.sleeping.swap(false, Ordering::SeqCst)
                {
                    if let Some(w) = self.shared.worker.get() {
                        w.unpark();
                    }
                }
                Ok(())
            }
            Err(rtrb::PushError::Full(item)) => Err(item),
        }
    }

    /// Items waiting in the ring.
    pub fn len(&self) -> usize {
        self.tx.buffer().capacity() - self.tx.slots()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Receiver<T> {
    pub fn pop(&mut self) -> Option<T> {
        self.rx.pop().ok()
    }

    /// Pops, or parks the calling thread for up to `wait` while the ring is empty.
    pub fn pop_or_park(&mut self, wait: Duration) -> Option<T> {
        if let Ok(item) = self.rx.pop() {
            return Some(item);
        }
        let _ = self.shared.worker.set(std::thread::current());
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // A push between the failed pop and the flag would not wake us: look again.
        if self.rx.is_empty() {
            std::thread::park_timeout(wait);
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        self.rx.pop().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_rings_give_items_back_and_order_is_kept() {
        let (mut tx, mut rx) = ring(2);
        assert!(tx.push(1).is_ok());
        assert!(tx.push(2).is_ok());
        assert_eq!(tx.len(), 2);
        assert_eq!(tx.push(3), Err(3));
        assert_eq!(rx.pop(), Some(1));
        assert!(tx.push(3).is_ok());
        assert_eq!((rx.pop(), rx.pop(), rx.pop()), (Some(2), Some(3), None));
        assert!(tx.is_empty());
    }

    #[test]
    fn a_parked_worker_wakes_on_push() {
        let (mut tx, mut rx) = ring(16);
        let worker = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 1000 {
                if let Some(x) = rx.pop_or_park(Duration::from_secs(5)) {
                    got.push(x);
                }
            }
            got
        });
        let started = std::time::Instant::now();
        for i in 0..1000 {
            let mut item = i;
            while let Err(back) = tx.push(item) {
                item = back;
                std::thread::yield_now();
            }
        }
        assert_eq!(worker.join().unwrap(), (0..1000).collect::<Vec<_>>());
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a lost wake-up would have parked the worker for 5 s"
        );
    }
}
