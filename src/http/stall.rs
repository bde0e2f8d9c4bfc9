//! A client that stops reading must not hold its query past its quota's execution limit.
//!
//! A response body is relayed only as fast as the client reads it, and the upstream
//! connection is read only when the body is. A client that stops reading (a BI tool paused
//! on a big result) leaves the node blocked writing its answer, deaf to `KILL QUERY`, and
//! the body's own deadline is never looked at. The watchdog runs beside the body: if the
//! body has not ended a moment after the limit, it kills the query and reads the node's
//! connection itself, throwing the bytes away, so the node's write returns, it sees the kill
//! and ends. The body, polled again, cuts the answer as usual and drops the connection.
//!
//! The watchdog reads the socket through a descriptor of its own (a duplicate taken while the
//! connection was open), so it never reads a closed or reused number. The body owns the
//! connection; before it returns it to the pool (or drops it) it [`Watchdog::release`]s,
//! under the lock the watchdog holds for each read, so a connection that goes on serving
//! other requests is never read from here; the duplicate is closed as the watchdog ends.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the watchdog reads a stalled connection at most (the node ends a killed query
/// long before: it only needs its blocked write to return).
const MAX_DRAIN: Duration = Duration::from_secs(60);

struct Shared {
    /// True while the body still owns the connection; held while a read is in progress.
    alive: Mutex<bool>,
    released: Notify,
    fired: AtomicBool,
}

/// Armed for one response body with an execution limit.
pub struct Watchdog {
    shared: Arc<Shared>,
}

impl Watchdog {
    /// Watches the connection (`socket`: its duplicate descriptor) until `at`; then, if the
    /// body still owns it, calls `kill` once and drains the connection.
    pub fn arm(socket: OwnedFd, at: Instant, kill: impl FnOnce() + Send + 'static) -> Self {
        let shared = Arc::new(Shared {
            alive: Mutex::new(true),
            released: Notify::new(),
            fired: AtomicBool::new(false),
        });
        let task = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = task.released.notified() => return,
            }
            {
                let alive = task.alive.lock().unwrap_or_else(|e| e.into_inner());
                if !*alive {
                    return;
                }
                task.fired.store(true, Ordering::Release);
            }
            kill();
            drain(&task, socket).await;
        });
        Self { shared }
    }

    /// The body is about to let go of the connection: the watchdog stops using it (waits
    /// for a read in progress to end).
    pub fn release(&self) {
        *self.shared.alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.shared.released.notify_one();
    }

    /// Whether it fired (the query was killed by it).
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.release();
    }
}

/// Reads and discards what the node sends until it closes, the body lets go, or
/// [`MAX_DRAIN`]; woken by the socket's readiness, like any other read.
async fn drain(shared: &Shared, socket: OwnedFd) {
    let end = Instant::now() + MAX_DRAIN;
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and the same, until the
    // `AsyncFd` that owns it drops it.
    let Ok(socket) = (unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) })
    else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ready = tokio::select! {
            r = tokio::time::timeout_at(end, socket.readable()) => r,
            _ = shared.released.notified() => return,
        };
        let Ok(Ok(mut guard)) = ready else {
            return;
        };
        let read = guard.try_io(|fd| {
            let alive = shared.alive.lock().unwrap_or_else(|e| e.into_inner());
            if !*alive {
                return Ok(0);
            }
            // SAFETY: `fd` is an open descriptor owned here, and `buf` is a valid writable
            // buffer of `buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match read {
            // More to throw away (or, would block: wait for the next readiness).
            Ok(Ok(n)) if n > 0 => {}
            Err(_would_block) => {}
            // The node closed, the body let go, or the socket failed.
            Ok(_) => return,
        }
    }
}
