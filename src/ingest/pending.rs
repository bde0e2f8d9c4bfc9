//! The memory ceiling: bytes held between the consumer and the commit (`limits.
//! max_pending_bytes`). Past it the consumer pauses its partitions.
//!
//! What is held is counted by [`Reservation`]s, released when dropped: a message holds its
//! payload from the moment the consumer takes it, a segment what it keeps of its messages
//! (rows as encoded, dead letters whole) until it is written, abandoned or revoked. No path
//! pairs an add with a subtract by hand, so none can leak or count twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Ceiling {
    held: AtomicUsize,
}

impl Ceiling {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Holds `bytes` until the reservation is dropped.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Reservation {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            ceiling: Some(self.clone()),
            bytes,
        }
    }
}

/// Bytes held against a [`Ceiling`], given back on drop.
#[derive(Debug)]
#[must_use = "the bytes are released when the reservation is dropped"]
pub struct Reservation {
    ceiling: Option<Arc<Ceiling>>,
    bytes: usize,
}

impl Reservation {
    /// A reservation of nothing against no ceiling (messages made in tests and benches).
    pub fn none() -> Self {
        Self {
            ceiling: None,
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `more` bytes on the same ceiling.
    pub fn grow(&mut self, more: usize) {
        if let Some(c) = &self.ceiling {
            c.held.fetch_add(more, Ordering::Relaxed);
        }
        self.bytes += more;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(c) = &self.ceiling {
            c.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_give_back_what_they_hold() {
        let c = Arc::new(Ceiling::default());
        let a = c.reserve(100);
        let mut b = c.reserve(0);
        b.grow(30);
        b.grow(12);
        assert_eq!((c.held(), b.bytes()), (142, 42));
        drop(a);
        assert_eq!(c.held(), 42);
        drop(b);
        assert_eq!(c.held(), 0);
        let mut n = Reservation::none();
        n.grow(5);
        drop(n);
        assert_eq!(c.held(), 0);
    }
}
