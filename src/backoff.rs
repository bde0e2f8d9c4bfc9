//! The one way the apps wait before trying again: doubling from 100 ms to 5 s, and ending
//! at once when its stop token is cancelled; and [`Stop`], for loops whose attempts must
//! not be cut by a graceful stop but whose waits must.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(FIRST)
    }
}

impl Backoff {
    /// The next wait.
    pub fn next(&self) -> Duration {
        self.0
    }

    /// After a success: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.0 = FIRST;
    }

    /// Waits the next interval and doubles it; false if `stop` was cancelled first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let wait = self.0;
        self.0 = (self.0 * 2).min(MAX);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// What ends a loop of attempts. `now` ends it at once, an attempt under way included (a
/// hard stop, a partition taken away). `draining` (a graceful stop) ends only its waits
/// between attempts: what is under way finishes, and what cannot be done now is left to be
/// done again by the next run rather than holding the stop up.
#[derive(Clone, Default)]
pub struct Stop {
    pub now: CancellationToken,
    pub draining: CancellationToken,
}

impl Stop {
    /// Sleeps `d`; false, without sleeping, if either stop has come or comes first.
    pub async fn pause(&self, d: Duration) -> bool {
        if self.now.is_cancelled() || self.draining.is_cancelled() {
            return false;
        }
        tokio::select! {
            _ = self.now.cancelled() => false,
            _ = self.draining.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Waits `backoff`'s next interval (and doubles it), as [`Stop::pause`].
    pub async fn backoff(&self, backoff: &mut Backoff) -> bool {
        let wait = backoff.0;
        backoff.0 = (backoff.0 * 2).min(MAX);
        self.pause(wait).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_cap_and_stops_on_cancel() {
        let stop = CancellationToken::new();
        let mut b = Backoff::default();
        for want in [100, 200, 400, 800, 1600, 3200, 5000, 5000] {
            assert_eq!(b.next(), Duration::from_millis(want));
            assert!(b.wait(&stop).await);
        }
        b.reset();
        assert_eq!(b.next(), FIRST);
        stop.cancel();
        assert!(!b.wait(&stop).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_or_a_hard_stop_ends_the_waits() {
        let mut b = Backoff::default();
        let stop = Stop::default();
        assert!(stop.backoff(&mut b).await);
        assert_eq!(b.next(), Duration::from_millis(200));
        let waiting = {
            let stop = stop.clone();
            tokio::spawn(async move { stop.pause(Duration::from_secs(3600)).await })
        };
        tokio::task::yield_now().await;
        stop.draining.cancel();
        assert!(
            !waiting.await.unwrap(),
            "a wait under way ends at the drain"
        );
        assert!(!stop.pause(Duration::from_millis(1)).await);
        let hard = Stop::default();
        hard.now.cancel();
        assert!(!hard.backoff(&mut b).await);
    }
}
