//! The per-request work of the proxy that is ours (not hyper's or the kernel's): checking a
//! password that verified before, telling a read from a write, finding the credentials.
//! `cargo bench --bench hot_paths`

use std::hint::black_box;

use chgate::auth::{hash_password, PasswordCheck, Verifier};
use chgate::gateway::sql::classify;
use chgate::http::credentials::extract;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

fn auth(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let check = PasswordCheck::new(&hash_password("bi-pass").unwrap());
    let verifier = Verifier::new(1);
    assert!(runtime.block_on(verifier.verify("bi", &check, "bi-pass")));
    c.bench_function("auth/cached_password_check", |b| {
        b.iter(|| verifier.verify_cached(black_box(&check), black_box("bi-pass")))
    });
    c.bench_function("auth/cached_password_check_wrong", |b| {
        b.iter(|| verifier.verify_cached(black_box(&check), black_box("bi-pasS")))
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Basic Ymk6YmktcGFzcw=="),
    );
    c.bench_function("auth/extract_basic", |b| {
        b.iter(|| {
            extract(
                black_box(&headers),
                black_box(Some("query=SELECT+1&max_threads=2")),
            )
        })
    });
}

fn sql(c: &mut Criterion) {
    let q = b"/* dashboard 12, panel 3 */\n  (SELECT toStartOfHour(ts) AS h, count() FROM demo.events GROUP BY h)";
    c.bench_function("sql/classify_commented_select", |b| {
        b.iter(|| classify(black_box(q), true))
    });
    c.bench_function("sql/classify_insert", |b| {
        b.iter(|| {
            classify(
                black_box(b"INSERT INTO demo.events FORMAT RowBinary"),
                false,
            )
        })
    });
}

criterion_group!(benches, auth, sql);
criterion_main!(benches);
