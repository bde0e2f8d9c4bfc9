//! When a read that has had no answer yet is worth sending to a second node: the cluster's
//! recent first-byte times, and the hedging policy of `[upstream]`.
//!
//! A read waits for its first byte mostly because its node is slow or because the node
//! coordinating a Distributed query waits on a replica that accepts connections but never
//! answers (a hung or stopped process: 18.16 waits `receive_timeout`, 300 s). Sending the
//! read to a second node after a bound derived from what is normal for the cluster, and
//! taking whichever answers first, bounds that wait (Dean and Barroso's "hedged
//! requests"). Hedges are extra load, so they draw on the cluster's retry budget and, in
//! the default mode, are only sent while the picker sees a node of the cluster down.
//!
//! First-byte times go into a log-scale histogram of two rotating windows (the current and
//! the previous [`WINDOW`]), counted with relaxed atomics: recording takes no lock and
//! allocates nothing. The bound is recomputed from it at most once per [`REFRESH`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::Gauge;

use crate::config::{HedgeAfter, HedgeMode, UpstreamConfig};
use crate::metrics::METRICS;

/// Buckets are a quarter of a doubling wide, from 50 us: bucket `i` ends at
/// 50 us x 2^((i+1)/4); the last one takes everything above ~52 s.
const BUCKETS: usize = 80;
const FIRST_BUCKET_US: f64 = 50.0;
/// How long a window collects before the older one is cleared for reuse.
const WINDOW: Duration = Duration::from_secs(30);
/// How often the bound is recomputed from the histogram.
const REFRESH: Duration = Duration::from_secs(1);
/// Fewer first-byte times than this (in both windows) say too little: the bound is then
/// `hedge_after_max`.
const MIN_SAMPLES: u64 = 20;
/// The quantile of first-byte times the auto bound is built on, and its multiplier.
const QUANTILE: f64 = 0.95;
const FACTOR: f64 = 2.0;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= FIRST_BUCKET_US {
        return 0;
    }
    ((4.0 * (us / FIRST_BUCKET_US).log2()) as usize).min(BUCKETS - 1)
}

/// The upper end of bucket `i`.
fn bucket_end(i: usize) -> Duration {
    Duration::from_secs_f64(FIRST_BUCKET_US * 2f64.powf((i + 1) as f64 / 4.0) / 1e6)
}

struct Window {
    /// Which window of time (`now_ms / WINDOW`) the counts belong to.
    id: AtomicU64,
    counts: [AtomicU32; BUCKETS],
}

impl Window {
    fn new() -> Self {
        Self {
            id: AtomicU64::new(0),
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// Hedging for one cluster: its policy and its recent first-byte times.
pub struct Hedging {
    mode: HedgeMode,
    after: HedgeAfter,
    min: Duration,
    max: Duration,
    windows: [Window; 2],
    /// The current bound in microseconds, and when it was computed (ms since the epoch).
    bound_us: AtomicU64,
    computed_ms: AtomicU64,
    /// `chgate_hedge_after_seconds` of the cluster.
    gauge: Gauge,
}

impl Hedging {
    pub fn new(cluster: &str, config: &UpstreamConfig) -> Self {
        let gauge = METRICS.hedge_after.with_label_values(&[cluster]);
        let initial = match config.hedge_after {
            HedgeAfter::Fixed(d) => d,
            HedgeAfter::Auto => config.hedge_after_max,
        };
        gauge.set(initial.as_secs_f64());
        Self {
            gauge,
            mode: config.hedge,
            after: config.hedge_after,
            min: config.hedge_after_min,
            max: config.hedge_after_max,
            windows: [Window::new(), Window::new()],
            bound_us: AtomicU64::new(config.hedge_after_max.as_micros() as u64),
            computed_ms: AtomicU64::new(0),
        }
    }

    pub fn mode(&self) -> HedgeMode {
        self.mode
    }

    /// Records how long a read waited for the first byte of its answer.
    pub fn record(&self, first_byte: Duration) {
        let id = now_ms() / WINDOW.as_millis() as u64;
        let window = &self.windows[(id % 2) as usize];
        let seen = window.id.load(Ordering::Relaxed);
        // Racing: two recorders may both see the old id; only the one whose swap wins
        // clears the counts, and a count added meanwhile by the other may be lost. The
        // histogram is an estimate; a lost count does not change it.
        if seen != id
            && window
                .id
                .compare_exchange(seen, id, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            for c in &window.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        window.counts[bucket_of(first_byte)].fetch_add(1, Ordering::Relaxed);
    }

    /// How long a read waits for its first byte before it is hedged (when the mode allows
    /// one at all; see [`Self::mode`]).
    pub fn after(&self) -> Duration {
        if let HedgeAfter::Fixed(d) = self.after {
            return d;
        }
        let now = now_ms();
        let computed = self.computed_ms.load(Ordering::Relaxed);
        // `computed` is 0 until a bound came from enough first-byte times: until then it is
        // worked out on every read (80 buckets), so the first reads set it.
        if computed == 0 || now.saturating_sub(computed) >= REFRESH.as_millis() as u64 {
            let (bound, settled) = self.compute(now);
            let stamp = if settled { now.max(1) } else { 0 };
            self.computed_ms.store(stamp, Ordering::Relaxed);
            self.bound_us
                .store(bound.as_micros() as u64, Ordering::Relaxed);
            self.gauge.set(bound.as_secs_f64());
            return bound;
        }
        Duration::from_micros(self.bound_us.load(Ordering::Relaxed))
    }

    /// The bound, and whether it came from enough first-byte times.
    fn compute(&self, now: u64) -> (Duration, bool) {
        let id = now / WINDOW.as_millis() as u64;
        let mut counts = [0u64; BUCKETS];
        for w in &self.windows {
            let wid = w.id.load(Ordering::Relaxed);
            if wid == id || wid + 1 == id {
                for (sum, c) in counts.iter_mut().zip(&w.counts) {
                    *sum += c.load(Ordering::Relaxed) as u64;
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return (self.max, false);
        }
        let want = (total as f64 * QUANTILE).ceil() as u64;
        let mut seen = 0;
        let mut quantile = bucket_end(BUCKETS - 1);
        for (i, &n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                quantile = bucket_end(i);
                break;
            }
        }
        (quantile.mul_f64(FACTOR).clamp(self.min, self.max), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hedging(after: HedgeAfter) -> Hedging {
        hedging_of("test", after)
    }

    fn hedging_of(cluster: &str, after: HedgeAfter) -> Hedging {
        Hedging::new(
            cluster,
            &UpstreamConfig {
                hedge_after: after,
                hedge_after_min: Duration::from_millis(100),
                hedge_after_max: Duration::from_secs(4),
                ..UpstreamConfig::default()
            },
        )
    }

    #[test]
    fn buckets_are_ordered_and_cover_their_values() {
        for us in [1u64, 49, 51, 100, 1_000, 37_000, 2_000_000, 400_000_000] {
            let d = Duration::from_micros(us);
            let i = bucket_of(d);
            assert!(
                i == BUCKETS - 1 || bucket_end(i) >= d,
                "{us} us in bucket {i}"
            );
            assert!(i == 0 || bucket_end(i - 1) <= d, "{us} us in bucket {i}");
        }
        assert!(bucket_end(BUCKETS - 1) > Duration::from_secs(50));
    }

    #[test]
    fn too_few_samples_give_the_maximum() {
        let h = hedging(HedgeAfter::Auto);
        for _ in 0..(MIN_SAMPLES - 1) {
            h.record(Duration::from_millis(1));
        }
        assert_eq!(h.after(), Duration::from_secs(4));
        // One more, and the next read already gets the learnt bound (no refresh wait).
        h.record(Duration::from_millis(1));
        assert_eq!(h.after(), Duration::from_millis(100));
    }

    #[test]
    fn the_auto_bound_follows_the_95th_percentile() {
        let h = hedging(HedgeAfter::Auto);
        // 96% of reads answer in 80 ms, 4% in 30 s: the 95th percentile is ~80 ms.
        for i in 0..1000 {
            h.record(Duration::from_millis(if i % 25 == 0 { 30_000 } else { 80 }));
        }
        let bound = h.after();
        assert!(
            bound >= Duration::from_millis(160) && bound <= Duration::from_millis(200),
            "{bound:?}"
        );
        // Fast reads: the floor.
        let h = hedging(HedgeAfter::Auto);
        for _ in 0..100 {
            h.record(Duration::from_micros(300));
        }
        assert_eq!(h.after(), Duration::from_millis(100));
        // Slow reads: the ceiling.
        let h = hedging(HedgeAfter::Auto);
        for _ in 0..100 {
            h.record(Duration::from_secs(9));
        }
        assert_eq!(h.after(), Duration::from_secs(4));
    }

    #[test]
    fn a_fixed_bound_is_kept() {
        let h = hedging_of("fixed", HedgeAfter::Fixed(Duration::from_millis(700)));
        h.record(Duration::from_secs(10));
        assert_eq!(h.after(), Duration::from_millis(700));
        let exported = METRICS.hedge_after.with_label_values(&["fixed"]).get();
        assert_eq!(exported, 0.7);
        let auto = hedging_of("auto", HedgeAfter::Auto);
        for _ in 0..100 {
            auto.record(Duration::from_millis(1));
        }
        assert_eq!(METRICS.hedge_after.with_label_values(&["auto"]).get(), 4.0);
        auto.after();
        assert_eq!(METRICS.hedge_after.with_label_values(&["auto"]).get(), 0.1);
    }
}
