//! Wakes a task raises on itself while it is being polled, taken as another pass of the
//! poll instead of a trip through the scheduler.
//!
//! A connection task wakes itself all the time: hyper's server reads a request body and
//! wakes the handler waiting for it, the upstream connection the request's task drives
//! delivers the response and wakes the request waiting for it, and so on, each time from
//! inside the task's own poll. tokio then schedules the running task once more, and its
//! multi-threaded runtime wakes an idle worker for it (a futex wake, a context switch)
//! that finds nothing to do; on a small machine that costs as much as the request's own
//! work. Polled through [`Passes`], such a wake makes the poll go round once more at once;
//! any other wake (a socket, a timer, another task) reaches the task as usual.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// No poll under way: a wake goes to the task.
const IDLE: u8 = 0;
/// A poll under way: a wake is noted.
const POLLING: u8 = 1;
/// A poll under way was woken: it goes round again.
const WOKEN: u8 = 2;

/// Passes in a row while a poll keeps waking itself, before the wake goes to the runtime
/// after all: hyper's connection yields by waking itself after 16 rounds of work, and that
/// stays a yield, only this many passes later (or at once when tokio's budget is spent).
const MAX_PASSES: usize = 4;

/// The waker handed to what [`Passes::poll`] polls.
struct Relay {
    state: AtomicU8,
    /// The task's own waker, from the latest poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            match state {
                POLLING => match self.state.compare_exchange(
                    POLLING,
                    WOKEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(now) => state = now,
                },
                WOKEN => return,
                _ => {
                    let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(w) = task.as_ref() {
                        w.wake_by_ref();
                    }
                    return;
                }
            }
        }
    }
}

/// Polls something so that the wakes it raises while being polled are another pass (see
/// the module docs). Cloning is cheap and shares the relay.
#[derive(Clone)]
pub struct Passes {
    relay: Arc<Relay>,
    waker: Waker,
}

impl Default for Passes {
    fn default() -> Self {
        let relay = Arc::new(Relay {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        Self {
            waker: Waker::from(relay.clone()),
            relay,
        }
    }
}

impl Passes {
    /// Polls `f` for the task polling with `cx`, again at once while `f` wakes itself and
    /// is not ready. When `f` is ready, a wake it raised is dropped: the caller owns what
    /// `f` polls and polls it again before waiting on it.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            let mut task = self.relay.task.lock().unwrap_or_else(|e| e.into_inner());
            match task.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        let mut relayed = Context::from_waker(&self.waker);
        for _ in 0..MAX_PASSES {
            self.relay.state.store(POLLING, Ordering::Release);
            let poll = f(&mut relayed);
            let woken = self.relay.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
            if poll.is_ready() || !woken {
                return poll;
            }
            // Out of tokio's budget, its resources wake the task and say pending until the
            // runtime has had it back: that is a yield.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        // Still waking itself: a yield, or busy; let the runtime run others first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Runs `f`, which changes what the next [`Self::poll`] polls (e.g. queues a message
    /// for it), and drops the wakes `f` raises: that poll looks anyway.
    pub fn quietly<T>(&self, f: impl FnOnce() -> T) -> T {
        self.relay.state.store(POLLING, Ordering::Release);
        let out = f();
        self.relay.state.store(IDLE, Ordering::Release);
        out
    }
}

/// A future polled through [`Passes`]: for a task's whole future.
pub struct SelfWaking<F> {
    future: Pin<Box<F>>,
    passes: Passes,
}

impl<F: Future> SelfWaking<F> {
    pub fn new(future: F) -> Self {
        Self {
            future: Box::pin(future),
            passes: Passes::default(),
        }
    }
}

impl<F: Future> Future for SelfWaking<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let future = &mut this.future;
        this.passes.poll(cx, |cx| future.as_mut().poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_wake_raised_while_polling_is_another_pass() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let passes = Passes::default();
        let mut polls = 0;
        let poll = passes.poll(&mut cx, |cx| {
            polls += 1;
            if polls < 3 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        });
        assert!(poll.is_ready());
        assert_eq!(polls, 3);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            0,
            "no wake reached the task"
        );
    }

    #[test]
    fn later_wakes_reach_the_task_and_endless_self_wakes_yield() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let passes = Passes::default();
        let mut kept = None;
        let poll: Poll<()> = passes.poll(&mut cx, |cx| {
            kept = Some(cx.waker().clone());
            Poll::Pending
        });
        assert!(poll.is_pending());
        kept.unwrap().wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "a wake from outside");

        let mut polls = 0;
        let poll: Poll<()> = passes.poll(&mut cx, |cx| {
            polls += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(poll.is_pending());
        assert_eq!(polls, MAX_PASSES);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            2,
            "handed back to the runtime"
        );
        assert_eq!(passes.quietly(|| 7), 7);
    }
}
