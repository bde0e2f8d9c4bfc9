//! The picker's hot path: load the published snapshot, draw two nodes by weight, keep the
//! less loaded. 4, 64 and 1024 nodes; one thread, then all cores picking at once.
//! `cargo bench --bench pick`

use std::hint::black_box;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chgate::picker::select::Snapshot;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

struct Setup {
    snapshot: ArcSwap<Snapshot>,
    in_flight: Vec<AtomicU32>,
}

fn setup(n: usize) -> Arc<Setup> {
    let ids: Vec<String> = (0..n)
        .map(|i| format!("10.{}.{}.1:8123", i / 256, i % 256))
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Uneven weights, a few excluded, uneven load: the realistic case.
    let weights: Vec<u32> = (0..n)
        .map(|i| {
            if i % 17 == 5 {
                0
            } else {
                50 + (i as u32 * 37) % 200
            }
        })
        .collect();
    Arc::new(Setup {
        snapshot: ArcSwap::from_pointee(Snapshot::new(&weights, &refs)),
        in_flight: (0..n).map(|i| AtomicU32::new((i % 7) as u32)).collect(),
    })
}

fn pick_once(s: &Setup) -> Option<usize> {
    let snapshot = s.snapshot.load();
    snapshot.pick(&s.in_flight, [rand::random(), rand::random()])
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.throughput(Throughput::Elements(1));
    for n in [4, 64, 1024] {
        let s = setup(n);
        group.bench_with_input(BenchmarkId::new("one_thread", n), &s, |b, s| {
            b.iter(|| pick_once(black_box(s)))
        });
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for n in [4, 64, 1024] {
        let s = setup(n);
        group.bench_with_input(
            BenchmarkId::new(format!("{threads}_threads"), n),
            &s,
            |b, s| {
                // Each iteration is one pick on every thread at once; time per iteration is wall
                // time / iterations, so perfect scaling shows the same time as one thread.
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for _ in 0..threads {
                            scope.spawn(|| {
                                for _ in 0..iters {
                                    black_box(pick_once(s));
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = pick
}
criterion_main!(benches);
