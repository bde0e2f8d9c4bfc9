//! The consumer-to-worker ring: messages handed from one thread to another.
//! `cargo bench --bench ring`

use std::hint::black_box;
use std::time::{Duration, Instant};

use chgate::ingest::ring::ring;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// What the consumer hands over per message: its place and its bytes (already owned).
struct Msg {
    _partition: i32,
    offset: i64,
    _payload: Vec<u8>,
}

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop_one_thread", |b| {
        let (mut tx, mut rx) = ring(65_536);
        b.iter(|| {
            let _ = tx.push(Msg {
                _partition: 1,
                offset: 7,
                _payload: Vec::new(),
            });
            black_box(rx.pop().map(|m| m.offset))
        })
    });
    // The real shape: a producer thread and a worker thread, 1M messages per iteration.
    const N: u64 = 1_000_000;
    group.throughput(Throughput::Elements(N));
    group.bench_function("producer_to_worker_1M", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut tx, mut rx) = ring::<Msg>(65_536);
                let worker = std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while seen < N {
                        if let Some(m) = rx.pop_or_park(Duration::from_millis(1)) {
                            black_box(m.offset);
                            seen += 1;
                        }
                    }
                });
                let start = Instant::now();
                for i in 0..N {
                    let mut m = Msg {
                        _partition: 0,
                        offset: i as i64,
                        _payload: Vec::new(),
                    };
                    loop {
                        match tx.push(m) {
                            Ok(()) => break,
                            Err(back) => {
                                m = back;
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
                worker.join().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(10);
    targets = handoff
}
criterion_main!(benches);
