//! The ingest parsing core: ~750-byte JSON messages (four mapped fields among many the
//! template ignores) and delimited lines to RowBinary, per core.
//! `cargo bench --bench ingest`

use std::hint::black_box;
use std::time::Duration;

use chgate::clickhouse::types::ColumnType;
use chgate::ingest::template::{Template, TemplateConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn table() -> Vec<(String, ColumnType)> {
    [
        ("ts", "DateTime"),
        ("user_id", "UInt64"),
        ("event", "String"),
        ("value", "Float64"),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), ColumnType::parse(t).unwrap()))
    .collect()
}

/// A message like the ones BI event pipelines carry: the four fields the table wants, and
/// context it does not.
fn json_message(i: u64) -> Vec<u8> {
    let event = ["click", "view", "purchase", "scroll"][(i % 4) as usize];
    let msg = serde_json::json!({
        "ts": 1_767_225_600 + i % 86_400,
        "user_id": 1_000_000 + i % 50_000,
        "event": event,
        "value": (i % 1000) as f64 / 10.0,
        "session": format!("6f9619ff-8b86-d011-b42d-00c04fc9{:04x}", i % 65536),
        "page": {"url": "https://shop.example.com/catalog/electronics/phones?sort=price&page=3", "referrer": "https://www.example.org/search?q=phones", "title": "Phones - Example Shop"},
        "device": {"type": "mobile", "os": "Android 14", "browser": "Chrome 131.0.6778.135", "screen": [1080, 2400]},
        "geo": {"country": "DE", "region": "BE", "city": "Berlin"},
        "experiment": {"id": "checkout-v2", "variant": "b"},
        "tags": ["organic", "returning", "newsletter"],
        "campaign": {"source": "newsletter", "medium": "email", "name": "autumn-sale-2026"},
        "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile Safari/537.36",
        "consent": {"analytics": true, "ads": false},
    });
    serde_json::to_vec(&msg).unwrap()
}

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let json: TemplateConfig = toml::from_str("format = \"json\"").unwrap();
    let json = Template::compile(&json, &table()).unwrap();
    let messages: Vec<Vec<u8>> = (0..1024).map(json_message).collect();
    let bytes: usize = messages.iter().map(Vec::len).sum();
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(
        format!("json_{}_byte_messages", bytes / messages.len()),
        |b| {
            let mut out = Vec::with_capacity(64 * 1024);
            let mut key = Vec::new();
            b.iter(|| {
                out.clear();
                for m in &messages {
                    json.encode_row(black_box(m), &mut out, None, None, &mut key)
                        .unwrap();
                }
                black_box(out.len())
            })
        },
    );

    let delimited: TemplateConfig =
        toml::from_str("format = \"delimited\"\nseparator = \"||\"").unwrap();
    let delimited = Template::compile(&delimited, &table()).unwrap();
    let lines: Vec<Vec<u8>> = (0..1024u64)
        .map(|i| {
            format!(
                "{}||{}||\"view||{}\"||{}",
                1_767_225_600 + i,
                1_000_000 + i,
                i % 7,
                i as f64 / 3.0
            )
            .into_bytes()
        })
        .collect();
    let bytes: usize = lines.iter().map(Vec::len).sum();
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("delimited_lines", |b| {
        let mut out = Vec::with_capacity(64 * 1024);
        let mut key = Vec::new();
        b.iter(|| {
            out.clear();
            for l in &lines {
                delimited
                    .encode_row(black_box(l), &mut out, None, None, &mut key)
                    .unwrap();
            }
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = ingest
}
criterion_main!(benches);
