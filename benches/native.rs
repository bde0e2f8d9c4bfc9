//! Walking Native-format blocks (`chgate::clickhouse::native`): what a native-protocol relay
//! spends per byte to find where a Data packet ends. `cargo bench --bench native`

use std::hint::black_box;

use chgate::clickhouse::native::{walk_block, Framing};
use chgate::clickhouse::rowbinary::write_varint;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn string(out: &mut Vec<u8>, s: &[u8]) {
    write_varint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Writes one row's value of a column.
type WriteValue<'a> = &'a dyn Fn(&mut Vec<u8>, u64);

/// One block of `rows` rows in the given columns (type name, value writer), as the server
/// writes it.
fn block(rows: u64, columns: &[(&str, WriteValue<'_>)]) -> Vec<u8> {
    let mut b = Vec::new();
    write_varint(&mut b, columns.len() as u64);
    write_varint(&mut b, rows);
    for (i, (ty, write)) in columns.iter().enumerate() {
        string(&mut b, format!("c{i}").as_bytes());
        string(&mut b, ty.as_bytes());
        for row in 0..rows {
            write(&mut b, row);
        }
    }
    b
}

fn walk(c: &mut Criterion) {
    let rows = 65_536;
    let numeric = block(
        rows,
        &[
            ("UInt64", &|b, r| b.extend_from_slice(&r.to_le_bytes())),
            ("Float64", &|b, r| {
                b.extend_from_slice(&(r as f64).to_le_bytes())
            }),
            ("DateTime", &|b, r| {
                b.extend_from_slice(&(r as u32).to_le_bytes())
            }),
        ],
    );
    let strings = block(
        rows,
        &[
            ("String", &|b, r| string(b, format!("user-{r}").as_bytes())),
            ("String", &|b, r| {
                string(
                    b,
                    format!("https://example.com/page/{}", r % 977).as_bytes(),
                )
            }),
        ],
    );
    let mut group = c.benchmark_group("native_walk");
    for (name, bytes) in [
        ("numeric_65536_rows", &numeric),
        ("strings_65536_rows", &strings),
    ] {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(walk_block(black_box(bytes), Framing::default())))
        });
    }
    group.finish();
}

criterion_group!(benches, walk);
criterion_main!(benches);
