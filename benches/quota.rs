//! Admission under a quota: the rate bucket plus a concurrency slot taken and given back,
//! the work every query of a user with a quota does. One thread; then 4 threads at once, each
//! with its own user (no shared lock may slow them), and 2 and 4 threads on one user (the
//! shared atomics). Target: under 1 µs per admission. Times are wall time per admission per
//! thread: with more threads than cores, they include waiting for a core.
//! `cargo bench --bench quota`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use chgate::config::QuotaConfig;
use chgate::gateway::quota::{Fleet, Limiter};
use criterion::{criterion_group, criterion_main, Criterion};

fn limiter(user: &str) -> Arc<Limiter> {
    let config: QuotaConfig = toml::from_str(
        "max_concurrent_queries = 64\nmax_queue_size = 100\nrequests_per_minute = 1000000000",
    )
    .expect("valid");
    Arc::new(Limiter::new(user, &config, Arc::new(Fleet::new())))
}

/// One admission and its release; a slot is always free, so it completes at its first poll.
fn admit_once(l: &Arc<Limiter>, cx: &mut Context<'_>) {
    let fut = pin!(l.admit());
    match fut.poll(cx) {
        Poll::Ready(Ok(slot)) => drop(black_box(slot)),
        other => panic!("admission did not complete at once: {}", other.is_ready()),
    }
}

/// `threads` threads admitting `iters` times each; the wall time per admission per thread.
fn threaded(limiters: &[Arc<Limiter>], iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for l in limiters {
            s.spawn(move || {
                let mut cx = Context::from_waker(Waker::noop());
                for _ in 0..iters {
                    admit_once(l, &mut cx);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("quota_admission");
    let one = limiter("solo");
    g.bench_function("1_thread", |b| {
        let mut cx = Context::from_waker(Waker::noop());
        b.iter(|| admit_once(&one, &mut cx))
    });
    let own: Vec<_> = (0..4).map(|i| limiter(&format!("user{i}"))).collect();
    g.bench_function("4_threads_own_users", |b| {
        b.iter_custom(|iters| threaded(&own, iters))
    });
    let shared = limiter("shared");
    for threads in [2, 4] {
        let same: Vec<_> = (0..threads).map(|_| shared.clone()).collect();
        g.bench_function(format!("{threads}_threads_one_user"), |b| {
            b.iter_custom(|iters| threaded(&same, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
