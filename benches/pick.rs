//! The picker's hot path: load the published snapshot, draw two nodes by weight, keep the
//! less loaded. 4, 64 and 1024 nodes; one thread, then all cores picking at once.
//! `cargo bench --bench pick`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chgate::config::ClusterConfig;
use chgate::picker::{Cluster, Purpose};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// A cluster of `n` nodes (2 replicas per shard) as the proxy builds it, with uneven
/// weights and uneven load: the realistic case.
fn setup(n: usize) -> Arc<Cluster> {
    let mut text = String::new();
    for shard in 0..n / 2 {
        let replica = |i: usize| {
            format!(
                "{{ host = \"10.{}.{}.1\", weight = {} }}",
                i / 256,
                i % 256,
                1.0 + (i * 37 % 200) as f64 / 100.0
            )
        };
        text.push_str(&format!(
            "[[shards]]\nreplicas = [{}, {}]\n",
            replica(2 * shard),
            replica(2 * shard + 1)
        ));
    }
    let config: ClusterConfig = toml::from_str(&text).expect("valid");
    let cluster = Cluster::new(
        &format!("bench{n}"),
        &config,
        &Default::default(),
        &Default::default(),
        &Default::default(),
    );
    for (i, node) in cluster.topology().nodes.iter().enumerate() {
        node.node.in_flight.set((i % 7) as i64);
    }
    Arc::new(cluster)
}

/// What a proxied read does to choose its node.
fn pick_once(c: &Cluster) -> Option<usize> {
    c.view()
        .choose(Purpose::Read, None, [rand::random(), rand::random()])
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
