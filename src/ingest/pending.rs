//! The memory ceiling: bytes held between the consumer and the commit (`limits.
//! max_pending_bytes`). Past it the consumer pauses its partitions.
//!
//! What is held is counted by [`Reservation`]s, released when dropped: a message holds its
//! payload from the moment the consumer takes it, a segment what it keeps of its messages
//! (rows as encoded, dead letters whole) until it is written, abandoned or revoked. No path
//! pairs an add with a subtract by hand, so none can leak or count twice.
//!
//! A reservation points at its ceiling without a reference count: a sidecar has one
//! ceiling for the life of its process ([`Ceiling::leak`]), so counting references to it on
//! every message (two more atomic read-modify-writes per message, on a cache line the
//! consumer and worker threads already share) would buy nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct Ceiling {
    held: AtomicUsize,
}

impl Ceiling {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A ceiling that lives as long as the process (a few bytes, once per pipeline).
    pub fn leak() -> &'static Ceiling {
        Box::leak(Box::default())
    }

    /// Holds `bytes` until the reservation is dropped.
    pub fn reserve(&'static self, bytes: usize) -> Reservation {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            ceiling: Some(self),
            bytes,
        }
    }
}

/// Bytes held against a [`Ceiling`], given back on drop.
#[derive(Debug)]
#[must_use = "the bytes are released when the reservation is dropped"]
pub struct Reservation {
    ceiling: Option<&'static Ceiling>,
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
        let c = Ceiling::leak();
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
