//! Slows down addresses that keep failing to log in.
//!
//! Each client address (IPv6 by its /64, since one host usually owns a whole /64) has a
//! count of failures within a sliding window. Past `free_failures`, every login attempt
//! from that address, right or wrong, first waits `base_delay * 2^(excess-1)`, capped at
//! `max_delay`, and the waits of one address are taken in turn (each attempt reserves its
//! slot after the last one's), so attempts sent in parallel wait one after another: an
//! attacker cannot guess in parallel. A success clears the count only if every failure
//! counted was for the user that succeeded: logging in with an account of one's own does
//! not reset the count of guesses at another.

use std::net::IpAddr;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::AuthConfig;

/// Above this many tracked addresses, stale entries are dropped on the next failure.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
    /// When the last reserved wait of this address ends.
    next: Instant,
    /// The user every failure was for (a hash of the name), or `None` once failures for
    /// more than one user were counted.
    user: Option<u64>,
}

impl Failures {
    fn new(now: Instant, user: u64) -> Self {
        Self {
            count: 0,
            since: now,
            next: now,
            user: Some(user),
        }
    }
}

fn user_hash(user: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    h.finish()
}

pub struct Throttle {
    free: u32,
    window: Duration,
    base: Duration,
    max: Duration,
    failures: DashMap<IpAddr, Failures>,
}

impl Throttle {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            free: config.free_failures,
            window: config.failure_window,
            base: config.base_delay,
            max: config.max_delay,
            failures: DashMap::new(),
        }
    }

    /// How long an attempt from `ip` must wait before it is looked at.
    pub fn delay(&self, ip: IpAddr) -> Option<Duration> {
        let entry = self.failures.get(&key(ip))?;
        if entry.since.elapsed() > self.window || entry.count <= self.free {
            return None;
        }
        let excess = entry.count - self.free;
        let factor = 1u32
            .checked_shl(excess.saturating_sub(1).min(20))
            .unwrap_or(u32::MAX);
        Some(self.base.saturating_mul(factor).min(self.max))
    }

    /// Reserves the wait of an attempt from `ip` now: its [`Throttle::delay`], after the
    /// waits reserved before it end. `None` when the address need not wait.
    pub fn reserve(&self, ip: IpAddr) -> Option<Duration> {
        let delay = self.delay(ip)?;
        let mut entry = self.failures.get_mut(&key(ip))?;
        let now = Instant::now();
        let start = entry.next.max(now);
        entry.next = start + delay;
        Some(entry.next - now)
    }

    /// A failed login from `ip` as `user`.
    pub fn failure(&self, ip: IpAddr, user: &str) {
        if self.failures.len() > PRUNE_ABOVE {
            let window = self.window;
            self.failures.retain(|_, f| f.since.elapsed() <= window);
        }
        let now = Instant::now();
        let user = user_hash(user);
        let mut entry = self
            .failures
            .entry(key(ip))
            .or_insert(Failures::new(now, user));
        if entry.since.elapsed() > self.window {
            *entry = Failures::new(now, user);
        }
        if entry.user != Some(user) {
            entry.user = None;
        }
        entry.count = entry.count.saturating_add(1);
    }

    /// A successful login from `ip` as `user`: the address's failures are forgiven if
    /// they were all this user's (a mistyped password), not otherwise.
    pub fn success(&self, ip: IpAddr, user: &str) {
        // Checking first keeps the common path (no failures recorded) free of a write lock.
        if self.failures.contains_key(&key(ip)) {
            let user = user_hash(user);
            self.failures
                .remove_if(&key(ip), |_, f| f.user == Some(user));
        }
    }
}

fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(&AuthConfig {
            free_failures: 2,
            failure_window: Duration::from_secs(60),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
            max_concurrent_verifications: 1,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn delay_grows_then_caps_then_expires() {
        let t = throttle();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
        t.failure(ip, "u");
        t.failure(ip, "u");
        assert_eq!(ms(t.delay(ip)), None);
        t.failure(ip, "u");
        assert_eq!(ms(t.delay(ip)), Some(100));
        t.failure(ip, "u");
        assert_eq!(ms(t.delay(ip)), Some(200));
        t.failure(ip, "u");
        assert_eq!(ms(t.delay(ip)), Some(350));
        for _ in 0..100 {
            t.failure(ip, "u");
        }
        assert_eq!(ms(t.delay(ip)), Some(350));
        // Another address is unaffected.
        assert_eq!(t.delay("10.1.2.4".parse().unwrap()), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.delay(ip), None);
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_and_ipv6_counts_by_prefix() {
        let t = throttle();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            t.failure(a, "u");
        }
        assert!(t.delay(b).is_some(), "same /64 shares a count");
        t.success(b, "u");
        assert!(t.delay(a).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_attempts_wait_in_turn_and_another_users_success_forgives_nothing() {
        let t = throttle();
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        for _ in 0..3 {
            t.failure(ip, "admin");
        }
        // Three attempts at once: 100 ms each, one after another.
        let waits: Vec<u128> = (0..3).map(|_| t.reserve(ip).unwrap().as_millis()).collect();
        assert_eq!(waits, [100, 200, 300]);
        // Logging in as another user (an account of the attacker's own) clears nothing.
        t.success(ip, "mallory");
        assert!(t.delay(ip).is_some());
        // Failures for two users: no success clears them.
        t.failure(ip, "mallory");
        t.success(ip, "admin");
        assert!(t.delay(ip).is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(t.reserve(ip).is_none());
    }
}
