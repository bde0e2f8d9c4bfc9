//! Per-user quotas: how many queries of a user run at once (with a FIFO queue for the
//! rest), how fast they may start, how long they may run and how much they may return.
//!
//! A [`Limiter`] holds one user's counters. It outlives config generations (a reload that
//! keeps the user keeps its limiter and only changes its limits), so a reload neither frees
//! slots that running queries hold nor refills a spent rate bucket.
//!
//! Admission takes no global lock and, on the fast path, no lock at all:
//!
//! - Concurrency is an atomic count of running queries. A query takes a slot with one
//!   compare-and-swap while nobody waits; otherwise it queues behind the user's own mutex
//!   (never shared with another user), and a slot given back is handed to the first waiter.
//! - The rate is a GCRA token bucket in one atomic: the "theoretical arrival time" of the
//!   next query, moved forward by `60 s / requests_per_minute` per query; a query is
//!   refused when that time is further ahead than the burst allows.
//!
//! Fleet-wide limits: with several chgate instances on one ZooKeeper root, each instance
//! enforces `ceil(limit / live instances)` of the concurrency, queue, rate and burst (see
//! [`Fleet`]). That is exact when a user's traffic is spread evenly and approximate
//! otherwise: one instance can refuse while another has room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::oneshot;

use super::error::GatewayError;
use crate::config::QuotaConfig;
use crate::metrics::METRICS;

/// The live chgate instances sharing the config root (1 without ZooKeeper): quotas divide
/// their limits by it.
#[derive(Debug)]
pub struct Fleet {
    members: AtomicU32,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Self {
        Self {
            members: AtomicU32::new(1),
        }
    }

    pub fn members(&self) -> u32 {
        self.members.load(Ordering::Relaxed).max(1)
    }

    /// Records the live member count (at least 1: this instance).
    pub fn set_members(&self, n: u32) {
        let n = n.max(1);
        let before = self.members.swap(n, Ordering::Relaxed);
        if before != n {
            tracing::info!(
                members = n,
                "Fleet membership changed; per-user limits are shared out again"
            );
        }
        METRICS.fleet_members.set(i64::from(n));
    }

    /// This instance's share of a fleet-wide limit (rounded up: never 0).
    pub fn share(&self, limit: u32) -> u32 {
        limit.div_ceil(self.members()).max(1)
    }
}

/// The `max_execution_time` (whole seconds) a node gets with a query whose quota limits its
/// execution to `limit`: a second more than the gateway's own limit, so the gateway (which
/// kills the query and answers at the limit itself) acts first and the client always gets
/// the same answer, while the node's own limit stays as a backstop should the gateway be
/// gone.
pub fn upstream_execution_seconds(limit: Duration) -> u64 {
    limit.as_secs_f64().ceil() as u64 + 1
}

/// Why a query was refused, as a `chgate_quota_rejections_total` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Concurrency,
    QueueFull,
    QueueTimeout,
    Rate,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Concurrency => "concurrency",
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
            Self::Rate => "rate",
        }
    }
}

/// One user's quota counters.
pub struct Limiter {
    user: Arc<str>,
    config: ArcSwap<QuotaConfig>,
    fleet: Arc<Fleet>,
    running: AtomicU32,
    /// Queries in `queue` (read without the lock on the fast paths).
    waiting: AtomicU32,
    queue: Mutex<VecDeque<Waiter>>,
    next_waiter: AtomicU64,
    /// GCRA: nanoseconds since [`EPOCH`] at which the bucket is full again.
    tat: AtomicU64,
    metrics: LimiterMetrics,
}

struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

struct LimiterMetrics {
    in_flight: IntGauge,
    /// The queue's length, set under the queue's lock whenever it changes.
    queued: IntGauge,
    queue_wait: Histogram,
    rejected: [IntCounter; 4],
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

impl Limiter {
    pub fn new(user: &str, config: &QuotaConfig, fleet: Arc<Fleet>) -> Self {
        let rejected = |r: Refusal| {
            METRICS
                .quota_rejections
                .with_label_values(&[user, r.as_str()])
        };
        Self {
            user: user.into(),
            config: ArcSwap::from_pointee(config.clone()),
            fleet,
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            queue: Mutex::new(VecDeque::new()),
            next_waiter: AtomicU64::new(0),
            tat: AtomicU64::new(0),
            metrics: LimiterMetrics {
                in_flight: METRICS.queries_in_flight.with_label_values(&[user]),
                queued: METRICS.quota_queued.with_label_values(&[user]),
                queue_wait: METRICS.quota_queue_wait.with_label_values(&[user]),
                rejected: [
                    rejected(Refusal::Concurrency),
                    rejected(Refusal::QueueFull),
                    rejected(Refusal::QueueTimeout),
                    rejected(Refusal::Rate),
                ],
            },
        }
    }

    /// Takes new limits (a reload); counters and running queries are kept. A raised
    /// concurrency limit lets waiters in at once.
    pub fn configure(&self, config: &QuotaConfig) {
        if **self.config.load() != *config {
            self.config.store(Arc::new(config.clone()));
            self.dispatch_if_waiting();
        }
    }

    pub fn config(&self) -> Arc<QuotaConfig> {
        self.config.load_full()
    }

    /// Queries of this user running now (on this instance).
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }

    /// Admits one query: checks the rate, then takes a concurrency slot, waiting in the
    /// queue if the quota has one. The slot is given back when the returned [`Slot`] drops.
    pub async fn admit(self: &Arc<Self>) -> Result<Slot, GatewayError> {
        // Copied out: a guard, not a clone, so threads do not contend on a reference count.
        let (rate, concurrency, queue_size, max_wait, execution, result) = {
            let c = self.config.load();
            (
                c.requests_per_minute
                    .map(|n| (n, c.requests_burst.unwrap_or(n))),
                c.max_concurrent_queries,
                c.max_queue_size,
                c.max_queue_wait,
                c.max_execution_time,
                c.max_result_bytes,
            )
        };
        if let Some((per_minute, burst)) = rate {
            self.take_token(per_minute, burst)?;
        }
        let slot = |counted| Slot {
            limiter: self.slot(),
            counted,
            execution_limit: execution,
            result_limit: result,
        };
        let Some(limit) = concurrency else {
            return Ok(slot(false));
        };
        let limit = self.fleet.share(limit);
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_take(limit) {
            self.metrics.queue_wait.observe(0.0);
            return Ok(slot(true));
        }
        let queue_size = match queue_size {
            0 => 0,
            n => self.fleet.share(n),
        };
        self.wait(limit, queue_size, max_wait).await?;
        Ok(slot(true))
    }

    /// A hold on this limiter for a slot (counted in the in-flight gauge).
    fn slot(self: &Arc<Self>) -> Arc<Self> {
        self.metrics.in_flight.inc();
        self.clone()
    }

    /// One compare-and-swap loop: a slot if fewer than `limit` queries run.
    fn try_take(&self, limit: u32) -> bool {
        self.running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn limit(&self) -> u32 {
        self.config
            .load()
            .max_concurrent_queries
            .map_or(u32::MAX, |l| self.fleet.share(l))
    }

    async fn wait(
        self: &Arc<Self>,
        limit: u32,
        queue_size: u32,
        max_wait: Duration,
    ) -> Result<(), GatewayError> {
        let started = Instant::now();
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (wake, woken) = oneshot::channel();
        {
            let mut queue = self.lock();
            if queue.len() as u32 >= queue_size {
                drop(queue);
                // A slot may have come free meanwhile, with nobody to hand it to.
                if self.waiting.load(Ordering::SeqCst) == 0 && self.try_take(limit) {
                    self.metrics.queue_wait.observe(0.0);
                    return Ok(());
                }
                let refusal = if queue_size == 0 {
                    Refusal::Concurrency
                } else {
                    Refusal::QueueFull
                };
                return Err(self.refuse(refusal, limit, None));
            }
            queue.push_back(Waiter { id, wake });
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.metrics.queued.set(queue.len() as i64);
            // A slot given back between the fast path and here found nobody waiting.
            self.dispatch(&mut queue);
        }
        let mut waiting = Waiting {
            limiter: self,
            id,
            woken: Some(woken),
        };
        let woken = waiting.woken.as_mut().expect("set above");
        match tokio::time::timeout(max_wait, woken).await {
            Ok(Ok(())) => {
                waiting.woken = None;
                self.metrics
                    .queue_wait
                    .observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            // The sender is only dropped after a send, or by `Waiting` itself.
            Ok(Err(_)) | Err(_) => {
                if waiting.leave() {
                    // Handed a slot just as the wait ran out: take it.
                    self.metrics
                        .queue_wait
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(self.refuse(Refusal::QueueTimeout, limit, Some(max_wait)))
            }
        }
    }

    fn refuse(&self, refusal: Refusal, limit: u32, waited: Option<Duration>) -> GatewayError {
        self.metrics.rejected[refusal as usize].inc();
        GatewayError::TooManyQueries {
            user: self.user.to_string(),
            running: self.running(),
            limit,
            waited,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        // A panic while holding it cannot leave the queue inconsistent (each step is a
        // single push or pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands free slots to the first waiters, in order.
    fn dispatch(&self, queue: &mut VecDeque<Waiter>) {
        let limit = self.limit();
        while !queue.is_empty() && self.try_take(limit) {
            let Some(w) = queue.pop_front() else { break };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queued.set(queue.len() as i64);
            if w.wake.send(()).is_err() {
                // Its query went away: the slot goes to the next.
                self.running.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn dispatch_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch(&mut self.lock());
        }
    }

    fn release(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.dispatch_if_waiting();
    }

    /// GCRA: one query's token, or the refusal with how long until one is free.
    fn take_token(&self, per_minute: u32, burst: u32) -> Result<(), GatewayError> {
        let per_minute = self.fleet.share(per_minute);
        let burst = self.fleet.share(burst);
        let interval = 60_000_000_000 / u64::from(per_minute);
        // Saturating: a huge burst at a low rate must not overflow (it means "no limit").
        let tolerance = interval.saturating_mul(u64::from(burst - 1));
        let now = now_nanos();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > tolerance {
                self.metrics.rejected[Refusal::Rate as usize].inc();
                return Err(GatewayError::RateLimited {
                    user: self.user.to_string(),
                    per_minute,
                    retry_after: Duration::from_nanos(start - now - tolerance),
                });
            }
            match self.tat.compare_exchange_weak(
                tat,
                start.saturating_add(interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// A query's place in the queue; leaving it (the wait ran out, or the client went away and
/// the future was dropped) removes it, or gives back a slot handed to it meanwhile.
struct Waiting<'a> {
    limiter: &'a Limiter,
    id: u64,
    woken: Option<oneshot::Receiver<()>>,
}

impl Waiting<'_> {
    /// Leaves the queue; true if a slot had been handed over (the caller now holds it).
    fn leave(&mut self) -> bool {
        let Some(mut woken) = self.woken.take() else {
            return false;
        };
        let mut queue = self.limiter.lock();
        if let Some(i) = queue.iter().position(|w| w.id == self.id) {
            queue.remove(i);
            self.limiter.waiting.fetch_sub(1, Ordering::SeqCst);
            self.limiter.metrics.queued.set(queue.len() as i64);
            return false;
        }
        // Not in the queue: `dispatch` popped it, under this lock, and sent a slot.
        woken.try_recv().is_ok()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.leave() {
            self.limiter.release();
        }
    }
}

/// A running query's hold on its user's quota, with the limits it runs under; dropping it
/// gives the slot back.
pub struct Slot {
    limiter: Arc<Limiter>,
    /// It holds a concurrency slot (the quota limits concurrency).
    counted: bool,
    pub execution_limit: Option<Duration>,
    pub result_limit: Option<u64>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.metrics.in_flight.dec();
        if self.counted {
            self.limiter.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(text: &str) -> QuotaConfig {
        toml::from_str(text).unwrap()
    }

    /// Lets the other tasks run until `n` queries wait in `l`'s queue.
    async fn queued(l: &Limiter, n: u32) {
        for _ in 0..10_000 {
            if l.waiting.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} waiters never queued");
    }

    fn limiter(text: &str) -> Arc<Limiter> {
        Arc::new(Limiter::new("u", &quota(text), Arc::new(Fleet::new())))
    }

    #[tokio::test]
    async fn beyond_the_limit_without_a_queue_is_refused_with_202() {
        let l = limiter("max_concurrent_queries = 2");
        let a = l.admit().await.unwrap();
        let _b = l.admit().await.unwrap();
        let e = l.admit().await.err().unwrap();
        assert_eq!(e.code().number, 202, "{e}");
        assert!(e.to_string().contains("maximum: 2"), "{e}");
        drop(a);
        let _c = l.admit().await.unwrap();
        assert_eq!(l.running(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_first_in_first_out() {
        let l = limiter("max_concurrent_queries = 1\nmax_queue_size = 3\nmax_queue_wait = \"10s\"");
        let first = l.admit().await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (task, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = task.admit().await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            }));
            // Each joins the queue before the next.
            queued(&l, i + 1).await;
        }
        // The queue is full: a fourth is refused.
        let e = l.admit().await.err().unwrap();
        assert!(
            e.to_string().contains("Too many simultaneous queries"),
            "{e}"
        );
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(l.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_is_refused_and_leaves_the_queue() {
        let l = limiter("max_concurrent_queries = 1\nmax_queue_size = 1\nmax_queue_wait = \"1s\"");
        let _first = l.admit().await.unwrap();
        let e = l.admit().await.err().unwrap();
        assert!(e.to_string().contains("waited 1 s"), "{e}");
        assert_eq!(l.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(l.lock().len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_does_not_keep_a_slot() {
        let l = limiter("max_concurrent_queries = 1\nmax_queue_size = 2\nmax_queue_wait = \"10s\"");
        let first = l.admit().await.unwrap();
        let gone = {
            let l = l.clone();
            tokio::spawn(async move { l.admit().await.map(drop) })
        };
        queued(&l, 1).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(l.lock().len(), 0, "the cancelled waiter left the queue");
        drop(first);
        assert_eq!(l.running(), 0);
        let _again = l.admit().await.unwrap();
    }

    #[tokio::test]
    async fn a_raised_limit_lets_waiters_in() {
        let l = limiter("max_concurrent_queries = 1\nmax_queue_size = 1\nmax_queue_wait = \"10s\"");
        let _first = l.admit().await.unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.admit().await.map(|_| ()) })
        };
        queued(&l, 1).await;
        l.configure(&quota(
            "max_concurrent_queries = 2\nmax_queue_size = 1\nmax_queue_wait = \"10s\"",
        ));
        waiter.await.unwrap().unwrap();
    }

    #[test]
    fn the_rate_allows_the_burst_then_one_per_interval() {
        let l = limiter("requests_per_minute = 60\nrequests_burst = 3");
        for _ in 0..3 {
            l.take_token(60, 3).unwrap();
        }
        let e = l.take_token(60, 3).err().unwrap();
        assert_eq!(e.code().number, 201, "{e}");
        let GatewayError::RateLimited { retry_after, .. } = e else {
            panic!("{e:?}")
        };
        assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}");
    }

    #[test]
    fn extreme_rates_and_bursts_do_not_overflow() {
        let l = limiter("requests_per_minute = 1\nrequests_burst = 4294967295");
        for _ in 0..1000 {
            l.take_token(1, u32::MAX).unwrap();
        }
        let l = limiter("requests_per_minute = 4294967295");
        l.take_token(u32::MAX, u32::MAX).unwrap();
    }

    #[test]
    fn the_fleet_shares_limits_out_rounding_up() {
        let fleet = Fleet::new();
        assert_eq!(fleet.share(2), 2);
        fleet.set_members(2);
        assert_eq!(fleet.share(2), 1);
        assert_eq!(fleet.share(3), 2);
        fleet.set_members(5);
        assert_eq!(fleet.share(2), 1, "never 0");
        fleet.set_members(0);
        assert_eq!(fleet.members(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_threads_never_exceed_the_limit() {
        let l =
            limiter("max_concurrent_queries = 3\nmax_queue_size = 1000\nmax_queue_wait = \"60s\"");
        let peak = Arc::new(AtomicU32::new(0));
        let now = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (l, peak, now) = (l.clone(), peak.clone(), now.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let slot = l.admit().await.unwrap();
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(l.running(), 0);
    }
}
