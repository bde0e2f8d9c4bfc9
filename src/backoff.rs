//! The one way the apps wait before trying again: doubling from 100 ms to 5 s, and ending
//! at once when its stop token is cancelled.

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
}
