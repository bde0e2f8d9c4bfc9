//! A retry budget: failovers are allowed up to a share of the requests, plus a small
//! steady allowance, so that when a cluster is sick the proxy does not multiply its load by
//! retrying everything (the approach of Finagle's and Envoy's retry budgets).
//!
//! Tokens are kept in thousandths: every request deposits `ratio` of a token, every retry
//! withdraws one, time adds `min_per_second`; the balance is capped at ten seconds'
//! worth of the steady allowance (at least ten retries).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

const MILLI: i64 = 1000;

pub struct RetryBudget {
    deposit: i64,
    per_ms: i64,
    cap: i64,
    balance: AtomicI64,
    refilled_ms: AtomicU64,
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        let cap = MILLI * (10 * min_per_second as i64).max(10);
        Self {
            deposit: (ratio.clamp(0.0, 1.0) * MILLI as f64).round() as i64,
            per_ms: min_per_second as i64,
            cap,
            balance: AtomicI64::new(cap),
            refilled_ms: AtomicU64::new(now_ms()),
        }
    }

    /// Called once per request.
    pub fn deposit(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < self.cap {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget; false if it is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = now_ms();
        let last = self.refilled_ms.load(Ordering::Relaxed);
        if now > last
            && self
                .refilled_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let add = (now - last) as i64 * self.per_ms;
            let _ = self
                .balance
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some((b + add).min(self.cap))
                });
        }
        let before = self.balance.fetch_sub(MILLI, Ordering::Relaxed);
        if before >= MILLI {
            true
        } else {
            self.balance.fetch_add(MILLI, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests() {
        let b = RetryBudget::new(0.1, 0);
        // Starts with the cap: 10 retries.
        assert_eq!((0..20).filter(|_| b.try_withdraw()).count(), 10);
        assert!(!b.try_withdraw());
        // 100 requests buy 10 more retries.
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.try_withdraw()).count(), 10);
    }

    #[test]
    fn time_refills_the_steady_allowance() {
        let b = RetryBudget::new(0.0, 1000);
        while b.try_withdraw() {}
        std::thread::sleep(std::time::Duration::from_millis(20));
        // 1000 per second: about 20 after 20 ms.
        let got = (0..100).filter(|_| b.try_withdraw()).count();
        assert!((10..=60).contains(&got), "{got}");
    }
}
