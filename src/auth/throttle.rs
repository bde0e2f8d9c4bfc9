//! Slows down addresses that keep failing to log in.
//!
//! Each client address (IPv6 by its /64, since one host usually owns a whole /64) has a
//! count of failures within a sliding window. Past `free_failures`, every login attempt
//! from that address, right or wrong, first waits `base_delay * 2^(excess-1)`, capped at
//! `max_delay`. Waiting also on correct attempts is what stops an attacker from guessing
//! in parallel; a success clears the count.

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

    pub fn failure(&self, ip: IpAddr) {
        if self.failures.len() > PRUNE_ABOVE {
            let window = self.window;
            self.failures.retain(|_, f| f.since.elapsed() <= window);
        }
        let now = Instant::now();
        let mut entry = self.failures.entry(key(ip)).or_insert(Failures {
            count: 0,
            since: now,
        });
        if entry.since.elapsed() > self.window {
            *entry = Failures {
                count: 0,
                since: now,
            };
        }
        entry.count = entry.count.saturating_add(1);
    }

    pub fn success(&self, ip: IpAddr) {
        // Checking first keeps the common path (no failures recorded) free of a write lock.
        if self.failures.contains_key(&key(ip)) {
            self.failures.remove(&key(ip));
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
        t.failure(ip);
        t.failure(ip);
        assert_eq!(ms(t.delay(ip)), None);
        t.failure(ip);
        assert_eq!(ms(t.delay(ip)), Some(100));
        t.failure(ip);
        assert_eq!(ms(t.delay(ip)), Some(200));
        t.failure(ip);
        assert_eq!(ms(t.delay(ip)), Some(350));
        for _ in 0..100 {
            t.failure(ip);
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
            t.failure(a);
        }
        assert!(t.delay(b).is_some(), "same /64 shares a count");
        t.success(b);
        assert!(t.delay(a).is_none());
    }
}
