//! Walking Native-format blocks (`chgate::clickhouse::native`): what a native-protocol relay
//! spends per byte to find where a Data packet ends, plain and in LZ4 frames.
//! `cargo bench --bench native`

use std::hint::black_box;

use chgate::clickhouse::compress::lz4_block;
use chgate::clickhouse::native::server::{ServerPackets, Session};
use chgate::clickhouse::native::stream::BlockStream;
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
        // The same block walked as it comes, in the relay's 64 KiB reads.
        group.bench_function(format!("{name}_as_it_comes"), |b| {
            b.iter(|| black_box(walk_in_reads(black_box(bytes), 64 << 10)))
        });
    }
    group.finish();
}

/// Walks `bytes` as a relay does a block not all at hand: read by read, what a read left
/// (an item it cut off) given again with the next. Where the block ended.
fn walk_in_reads(bytes: &[u8], read: usize) -> Option<usize> {
    let mut walk = BlockStream::new(Framing::default());
    let (mut taken, mut given) = (0, 0);
    while given < bytes.len() {
        given = (given + read).min(bytes.len());
        let (n, done) = walk.feed(&bytes[taken..given]).ok()?;
        taken += n;
        if done {
            return Some(taken);
        }
    }
    None
}

/// A server Data packet at revision 54412 carrying `block` in LZ4 frames of at most 1 MiB
/// of the block, as ClickHouse's compressed buffer writes them.
fn lz4_packet(block: &[u8]) -> Vec<u8> {
    let mut packet = vec![1, 0]; // Data, no table name
    let mut framed = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
    framed.extend_from_slice(block);
    for part in framed.chunks(1 << 20) {
        packet.extend_from_slice(&lz4_block(part).expect("a frame of 1 MiB"));
    }
    packet
}

/// Walking compressed Data packets: frames of fixed-width data alone are stepped over
/// without being decompressed; String columns need every frame. Each case twice: as the
/// first block of an answer (`first_block`: the reader has just seen an EndOfStream, so it
/// walks), and as a later one (`later_block`: the reader has walked one, so a block of
/// fixed-width columns ends where its row count says, from the start of its first frame,
/// and one of strings is decompressed whole at once).
fn walk_compressed(c: &mut Criterion) {
    let numeric = |b: &mut Vec<u8>, r: u64| b.extend_from_slice(&(r * 7919).to_le_bytes());
    let numbers = |rows| block(rows, &[("UInt64", &numeric), ("UInt64", &numeric)]);
    let strings = block(
        65_536,
        &[
            ("String", &|b, r| string(b, format!("user-{r}").as_bytes())),
            ("String", &|b, r| string(b, format!("{}", r * 3).as_bytes())),
        ],
    );
    let session = Session {
        revision: 54412,
        compression: true,
        empty_low_cardinality_granule: false,
    };
    let mut group = c.benchmark_group("native_packet_lz4");
    for (name, block) in [
        ("numeric_65536_rows", numbers(65_536)),
        ("numeric_1048576_rows", numbers(1 << 20)),
        ("strings_65536_rows", strings),
    ] {
        let packet = lz4_packet(&block);
        let mut packets = ServerPackets::default();
        assert_eq!(packets.next(&packet, &session).unwrap().len, packet.len());
        group.throughput(Throughput::Bytes(block.len() as u64));
        group.bench_function(format!("{name}_first_block"), |b| {
            b.iter(|| {
                let _ = packets.next(&[5], &session); // EndOfStream: a new answer
                black_box(packets.next(black_box(&packet), &session))
            })
        });
        assert_eq!(packets.next(&packet, &session).unwrap().len, packet.len());
        group.bench_function(format!("{name}_later_block"), |b| {
            b.iter(|| black_box(packets.next(black_box(&packet), &session)))
        });
    }
    group.finish();
}

/// One LZ4 frame body of a String block decompressed, by lz4_flex and by the C library,
/// the body written by the C library as ClickHouse writes it (its default acceleration).
fn lz4_decompress(c: &mut Criterion) {
    let strings = block(
        40_000,
        &[
            ("String", &|b, r| string(b, format!("user-{r}").as_bytes())),
            ("String", &|b, r| string(b, format!("{}", r * 3).as_bytes())),
            ("String", &|b, r| {
                string(
                    b,
                    format!("https://example.com/page/{}?q={}", r % 977, r * 31).as_bytes(),
                )
            }),
        ],
    );
    let raw = &strings[..strings.len().min(1 << 20)];
    let mut body = vec![0u8; raw.len() + raw.len() / 255 + 16];
    // SAFETY: both buffers are valid for the lengths given; the bound is LZ4's.
    let n = unsafe {
        lz4_sys::LZ4_compress_default(
            raw.as_ptr().cast(),
            body.as_mut_ptr().cast(),
            raw.len() as i32,
            body.len() as i32,
        )
    };
    assert!(n > 0);
    body.truncate(n as usize);
    let mut out = vec![0u8; raw.len()];
    let mut group = c.benchmark_group("lz4_decompress");
    group.throughput(Throughput::Bytes(raw.len() as u64));
    group.bench_function("lz4_flex", |b| {
        b.iter(|| lz4_flex::block::decompress_into(black_box(&body), &mut out).unwrap())
    });
    group.bench_function("lz4_c", |b| {
        b.iter(|| {
            // SAFETY: as above.
            let got = unsafe {
                lz4_sys::LZ4_decompress_safe(
                    black_box(&body).as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    body.len() as i32,
                    out.len() as i32,
                )
            };
            assert_eq!(got as usize, raw.len());
        })
    });
    group.finish();
}

criterion_group!(benches, walk, walk_compressed, lz4_decompress);
criterion_main!(benches);
