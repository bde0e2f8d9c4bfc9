//! Writes the seed corpus of the `native_packets` fuzz target from real traffic: run by
//! `fuzz/make-corpus`, which fetches the blocks first (see there).
//!
//! `make_seeds FIXTURES BLOCKS OUT`: FIXTURES holds the captured sessions
//! (`session-compression{0,1}.{s2c,c2s}`, clickhouse-client 18.16 at revision 54412),
//! BLOCKS the Native-format answers of a ClickHouse 18.16 over HTTP (`*.native`), OUT the
//! directory to fill (emptied first). Each seed is two selector bytes (their meaning is in
//! `fuzz/check.rs`), then the bytes to walk:
//!
//! - the server sessions split into packets (each packet, and runs of a few), with the
//!   sessions' own selector;
//! - the client sessions whole, split into packets, and their Hello and Query written back
//!   at other revisions;
//! - the blocks bare, and wrapped as the packets that carry them: server Data (plain, in
//!   LZ4 frames, in several frames, one of them stored), Totals, Extremes, Log, client
//!   Data, and at a revision before `BlockInfo`;
//! - a few blocks and packets made here, of what 18.16 cannot send (later column types,
//!   custom serialization) or did not in the sessions;
//! - answers whose columns are all fixed-width, plain and in frames, whole and cut short:
//!   past their header, a relay finds their blocks' ends from the row counts and passes
//!   the rest on as it comes (`chgate::clickhouse::native::tail`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chgate::clickhouse::compress::lz4_block;
use chgate::clickhouse::native::client::{put_str, Hello, Query, QUERY};
use chgate::clickhouse::native::server::{
    write_exception, HelloAnswer, Kind, ServerHello, ServerPackets, Session, PONG,
};
use chgate::clickhouse::native::{walk_block, Framing};

/// Selector byte 0 (see `fuzz/check.rs`).
const REV_54412: u8 = 0;
const REV_54060: u8 = 1;
const REV_54401: u8 = 2;
const REV_51902: u8 = 6;
const REV_54031: u8 = 7;
const COMPRESSED: u8 = 8;
const EMPTY_LC: u8 = 16;
const BLOCK_INFO: u8 = 32;
const CUSTOM: u8 = 64;
const CLIENT_HELLO: u8 = 128;

/// Byte 1: how many bytes at a time a relay receives them (1 + b²), varied over the seeds.
const CHUNKS: [u8; 6] = [255, 0, 3, 11, 40, 128];

/// A seed's bytes at most (its selector included).
const MAX_SEED: usize = 60 * 1024;

/// `BlockInfo` as servers and clients write it: not overflows, bucket -1, end.
const BLOCK_INFO_BYTES: [u8; 8] = [1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0];

struct Seeds {
    dir: PathBuf,
    written: usize,
    bytes: usize,
    seen: HashSet<Vec<u8>>,
}

impl Seeds {
    fn add(&mut self, name: &str, select: u8, payload: &[u8]) {
        if payload.len() + 2 > MAX_SEED {
            return;
        }
        let mut seed = vec![select, CHUNKS[self.written % CHUNKS.len()]];
        seed.extend_from_slice(payload);
        // The same bytes under the same selector are the same seed, whatever the chunk.
        let mut key = vec![select];
        key.extend_from_slice(payload);
        if !self.seen.insert(key) {
            return;
        }
        let path = self.dir.join(format!("{:03}-{name}", self.written));
        std::fs::write(&path, &seed).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.written += 1;
        self.bytes += seed.len();
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kind_name(kind: Kind) -> String {
    format!("{kind:?}").to_lowercase()
}

/// `data` in compressed frames of about `parts` equal pieces, LZ4, but the one at
/// `stored` (if any) stored as is (method 0x02, no checksum: chgate does not check it).
fn frames(data: &[u8], parts: usize, stored: Option<usize>) -> Vec<u8> {
    let size = data.len().div_ceil(parts).max(1);
    let mut out = Vec::new();
    for (i, piece) in data.chunks(size).enumerate() {
        if Some(i) == stored {
            out.extend_from_slice(&[0; 16]);
            out.push(0x02);
            out.extend_from_slice(&(9 + piece.len() as u32).to_le_bytes());
            out.extend_from_slice(&(piece.len() as u32).to_le_bytes());
            out.extend_from_slice(piece);
        } else {
            out.extend_from_slice(&lz4_block(piece).expect("a frame"));
        }
    }
    out
}

/// A packet of type `kind` carrying `block` (an empty table name first), its bytes as is
/// or in `parts` frames.
fn packet(kind: u8, block: &[u8], parts: Option<usize>) -> Vec<u8> {
    let mut out = vec![kind, 0];
    match parts {
        None => out.extend_from_slice(block),
        Some(parts) => out.extend_from_slice(&frames(block, parts, None)),
    }
    out
}

fn with_block_info(block: &[u8]) -> Vec<u8> {
    let mut out = BLOCK_INFO_BYTES.to_vec();
    out.extend_from_slice(block);
    out
}

/// The server sessions: packets, runs of packets, the start of a packet too big to keep.
fn server_sessions(seeds: &mut Seeds, fixtures: &Path) {
    for compression in [false, true] {
        let c = u8::from(compression);
        let stream = read(&fixtures.join(format!("session-compression{c}.s2c")));
        let session = Session {
            revision: 54412,
            compression,
            empty_low_cardinality_granule: true,
        };
        let select = REV_54412 | EMPTY_LC | BLOCK_INFO | if compression { COMPRESSED } else { 0 };
        let mut reader = ServerPackets::default();
        let mut packets = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let p = reader
                .next(&stream[at..], &session)
                .unwrap_or_else(|e| panic!("s2c{c} at byte {at}: {e}"));
            packets.push((p.kind, at, p.len));
            at += p.len;
        }
        let mut per_kind = std::collections::HashMap::new();
        for &(kind, at, len) in &packets {
            let count = per_kind.entry(kind_name(kind)).or_insert(0);
            if *count < 6 {
                *count += 1;
                let bytes = &stream[at..at + len];
                seeds.add(&format!("s2c{c}-{}", kind_name(kind)), select, bytes);
            }
            if len + 2 > MAX_SEED && kind == Kind::Data {
                // Its start: real column types and data, cut short.
                seeds.add(
                    &format!("s2c{c}-data-cut"),
                    select,
                    &stream[at..at + 24 * 1024],
                );
            }
        }
        // Runs of packets up to 16 KiB; the last few cut short by a few bytes too.
        let mut run: Vec<(usize, usize)> = Vec::new();
        let mut runs = 0;
        for &(_, at, len) in packets.iter().chain([(Kind::Pong, usize::MAX, 0)].iter()) {
            let run_len: usize = run.iter().map(|r| r.1).sum();
            if at == usize::MAX || len > 16 * 1024 || run_len + len > 16 * 1024 {
                if run.len() >= 2 && runs < 12 {
                    let bytes = &stream[run[0].0..run[0].0 + run_len];
                    seeds.add(&format!("s2c{c}-run"), select, bytes);
                    if runs % 3 == 2 {
                        seeds.add(&format!("s2c{c}-run-cut"), select, &bytes[..run_len - 5]);
                    }
                    runs += 1;
                }
                run.clear();
            }
            if at != usize::MAX && len <= 16 * 1024 {
                run.push((at, len));
            }
        }
        // The server's Hello alone, as written to clients of other revisions.
        let (answer, _) = ServerHello::read(&stream, 54412).expect("the server's Hello");
        let HelloAnswer::Hello(hello) = answer else {
            panic!("s2c{c} does not start with a Hello")
        };
        for (revision, rev) in [(54412, REV_54412), (54060, REV_54060), (54401, REV_54401)] {
            let mut out = Vec::new();
            hello.write(&mut out, revision);
            seeds.add("server-hello", rev, &out);
        }
        let mut out = Vec::new();
        hello.write(&mut out, 51902);
        seeds.add("server-hello", REV_51902, &out);
    }
}

/// The client sessions: whole, split into packets, Hello and Query at other revisions.
fn client_sessions(seeds: &mut Seeds, fixtures: &Path) {
    for c in 0..2u8 {
        let stream = read(&fixtures.join(format!("session-compression{c}.c2s")));
        seeds.add(
            &format!("c2s{c}-session"),
            REV_54412 | EMPTY_LC | CLIENT_HELLO,
            &stream,
        );
        let (hello, mut at) = Hello::read(&stream).expect("the client's Hello");
        seeds.add(
            &format!("c2s{c}-hello"),
            REV_54412 | CLIENT_HELLO,
            &stream[..at],
        );
        let mut reader = ServerPackets::default();
        let mut compression = false;
        while at < stream.len() {
            let session = Session {
                revision: 54412,
                compression,
                empty_low_cardinality_granule: false,
            };
            let select = REV_54412 | if compression { COMPRESSED } else { 0 };
            if stream[at] == QUERY as u8 {
                let (query, len) = Query::read(&stream[at..], 54412).expect("a Query");
                seeds.add(&format!("c2s{c}-query"), select, &stream[at..at + len]);
                // The rest of the session from this Query on.
                seeds.add(&format!("c2s{c}-from-query"), select, &stream[at..]);
                for (revision, rev) in [(54060, REV_54060), (54401, REV_54401), (54031, REV_54031)]
                {
                    let mut out = Vec::new();
                    query.write(&mut out, revision);
                    seeds.add("query", rev, &out);
                }
                compression = query.compression;
                at += len;
                continue;
            }
            let p = reader
                .next_client(&stream[at..], &session)
                .unwrap_or_else(|e| panic!("c2s{c} at byte {at}: {e}"));
            seeds.add(
                &format!("c2s{c}-client-packet"),
                select,
                &stream[at..at + p.len],
            );
            at += p.len;
        }
        for revision in [54060, 54401] {
            let mut out = Vec::new();
            Hello {
                revision,
                ..hello.clone()
            }
            .write(&mut out);
            seeds.add("hello", CLIENT_HELLO, &out);
        }
    }
}

/// The blocks an 18.16 answered over HTTP, bare and in every packet that carries blocks.
fn blocks(seeds: &mut Seeds, dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "native"))
        .collect();
    files.sort();
    let framing = Framing {
        empty_low_cardinality_granule: true,
        ..Framing::default()
    };
    for (n, path) in files.iter().enumerate() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let answer = read(path);
        let mut ends = Vec::new();
        let mut at = 0;
        while at < answer.len() {
            let block = walk_block(&answer[at..], framing)
                .unwrap_or_else(|e| panic!("{} at byte {at}: {e}", path.display()));
            at += block.len;
            ends.push(at);
        }
        // As many whole blocks as fit.
        let fit = ends.iter().copied().filter(|&e| e + 2 <= MAX_SEED).max();
        if let Some(fit) = fit {
            seeds.add(&format!("{name}-blocks"), EMPTY_LC, &answer[..fit]);
        }
        let Some(&end) = ends.first() else {
            continue;
        };
        let first = &answer[..end];
        if first.len() > 20 * 1024 {
            continue;
        }
        let block = with_block_info(first);
        let server = EMPTY_LC | BLOCK_INFO;
        seeds.add(&format!("{name}-data"), server, &packet(1, &block, None));
        seeds.add(
            &format!("{name}-data-lz4"),
            server | COMPRESSED,
            &packet(1, &block, Some(1)),
        );
        let mut split = vec![1, 0];
        split.extend_from_slice(&frames(&block, 3, Some(1)));
        seeds.add(&format!("{name}-data-frames"), server | COMPRESSED, &split);
        seeds.add(
            &format!("{name}-client-data"),
            EMPTY_LC,
            &packet(2, &block, None),
        );
        seeds.add(
            &format!("{name}-client-data-lz4"),
            EMPTY_LC | COMPRESSED,
            &packet(2, &block, Some(2)),
        );
        seeds.add(
            &format!("{name}-data-51902"),
            REV_51902 | EMPTY_LC,
            &packet(1, first, None),
        );
        seeds.add(
            &format!("{name}-data-51902-lz4"),
            REV_51902 | EMPTY_LC | COMPRESSED,
            &packet(1, first, Some(2)),
        );
        if n % 4 == 0 {
            // The other packets that carry blocks, then the end of the query.
            let mut answer = Vec::new();
            for kind in [1, 7, 8] {
                answer.extend_from_slice(&packet(kind, &block, Some(2)));
            }
            answer.extend_from_slice(&packet(10, &block, None));
            answer.push(5);
            seeds.add(&format!("{name}-answer"), server | COMPRESSED, &answer);
        }
    }
}

fn put(out: &mut Vec<u8>, s: &str) {
    put_str(out, s.as_bytes());
}

/// Blocks of types 18.16 cannot send, and packets the sessions lack.
fn made_here(seeds: &mut Seeds) {
    // (type, the data of two rows)
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut columns: Vec<(&str, Vec<u8>)> = vec![
        ("Bool", vec![0, 1]),
        ("Int128", vec![7; 32]),
        ("UInt256", vec![7; 64]),
        ("DateTime64(3, 'Europe/Paris')", vec![1; 16]),
        ("Date32", vec![2; 8]),
        ("IPv4", vec![3; 8]),
        ("IPv6", vec![4; 32]),
        ("Decimal(40, 2)", vec![5; 64]),
        ("Decimal(5, 2)", vec![5; 8]),
        ("Enum16('a' = 1, 'b,)' = 2)", vec![1, 0, 2, 0]),
        ("IntervalSecond", vec![6; 16]),
        ("FixedString(3)", b"abcdef".to_vec()),
        ("Nothing", vec![0, 0]),
        ("Tuple(a UInt8, `b` String)", b"\x01\x02\x01x\x00".to_vec()),
        ("SimpleAggregateFunction(sum, UInt64)", u64s(&[1, 2])),
        ("Point", vec![0; 32]),
    ];
    let mut map = u64s(&[1, 2]);
    map.extend_from_slice(b"\x01k\x01l");
    map.extend_from_slice(&u64s(&[10, 20]));
    columns.push(("Map(String, UInt64)", map.clone()));
    columns.push(("Nested(k String, v UInt64)", map));
    let mut ring = u64s(&[1, 1]);
    ring.extend_from_slice(&[0; 16]);
    columns.push(("Ring", ring));
    let mut polygon = u64s(&[1, 1]);
    polygon.extend_from_slice(&u64s(&[1]));
    polygon.extend_from_slice(&[0; 16]);
    columns.push(("Polygon", polygon));
    // LowCardinality(Nullable(String)): key version, then a granule of UInt8 indexes with
    // its keys (the null first).
    let mut lc = u64s(&[1, 0x600, 2]);
    lc.extend_from_slice(b"\x00\x01z");
    lc.extend_from_slice(&u64s(&[2]));
    lc.extend_from_slice(&[0, 1]);
    columns.push(("LowCardinality(Nullable(String))", lc));
    // Array(LowCardinality(UInt8)) of two empty arrays: 18.16's granule for no rows.
    let mut empty_lc = u64s(&[1, 0, 0, 0x600, 1]);
    empty_lc.push(0);
    empty_lc.extend_from_slice(&u64s(&[0]));
    columns.push(("Array(LowCardinality(UInt8))", empty_lc));

    // One block of all of them, with and without the custom-serialization byte.
    for custom in [false, true] {
        let mut block = BLOCK_INFO_BYTES.to_vec();
        block.extend_from_slice(&[columns.len() as u8, 2]);
        for (i, (ty, data)) in columns.iter().enumerate() {
            put(&mut block, &format!("c{i}"));
            put(&mut block, ty);
            if custom {
                block.push(0);
            }
            block.extend_from_slice(data);
        }
        if custom {
            seeds.add(
                "modern-block-custom",
                EMPTY_LC | BLOCK_INFO | CUSTOM,
                &block,
            );
        } else {
            seeds.add("modern-block", EMPTY_LC | BLOCK_INFO, &block);
            seeds.add(
                "modern-data",
                EMPTY_LC | BLOCK_INFO,
                &packet(1, &block, None),
            );
            seeds.add(
                "modern-data-lz4",
                EMPTY_LC | BLOCK_INFO | COMPRESSED,
                &packet(1, &block, Some(3)),
            );
        }
    }
    // Each column alone too, so the fuzzer can change one type without breaking the rest.
    for (ty, data) in &columns {
        let mut block = vec![1, 2];
        put(&mut block, "c");
        put(&mut block, ty);
        block.extend_from_slice(data);
        seeds.add("modern-column", EMPTY_LC, &block);
    }
    // Types refused as unsupported.
    for ty in [
        "AggregateFunction(uniq, UInt64)",
        "Variant(UInt8, String)",
        "JSON",
    ] {
        let mut block = vec![1, 1];
        put(&mut block, "c");
        put(&mut block, ty);
        block.extend_from_slice(&[0; 16]);
        seeds.add("unsupported-column", 0, &block);
    }
    // Server packets without blocks: a nested Exception, ProfileInfo, Progress,
    // TableColumns, Pong, EndOfStream.
    let mut out = Vec::new();
    write_exception(
        &mut out,
        60,
        "DB::Exception: Table default.x doesn't exist.",
    );
    let mut nested = vec![2];
    nested.extend_from_slice(&1002u32.to_le_bytes());
    put(&mut nested, "DB::Exception");
    put(&mut nested, "DB::Exception: outer");
    put(&mut nested, "0. stack");
    nested.push(1);
    nested.extend_from_slice(&out[1..]);
    seeds.add("exception-nested", 0, &nested);
    seeds.add("hello-refused", 0, &out);
    let mut others = vec![6, 1, 1, 8, 0, 0, 0, 3, 1, 2, 3];
    others.push(11);
    put(&mut others, "");
    put(
        &mut others,
        "columns format version: 1\n1 columns:\n`x` UInt8\n",
    );
    others.extend_from_slice(&PONG);
    others.push(5);
    seeds.add("server-others", 0, &others);
    // Client packets: Ping, Cancel, the empty Data that ends an insert.
    let mut client = vec![4, 3];
    chgate::clickhouse::native::client::write_empty_data(&mut client);
    seeds.add("client-others", 0, &client);
}

/// Answers of three fixed-width columns (one `Nullable`, one `Tuple`): a header, blocks
/// of a few hundred rows (in several frames, or plain), totals, the end; whole and cut
/// short inside a block.
fn fixed_width_answers(seeds: &mut Seeds) {
    let block = |rows: u64| {
        let mut b = BLOCK_INFO_BYTES.to_vec();
        chgate::clickhouse::rowbinary::write_varint(&mut b, 3);
        chgate::clickhouse::rowbinary::write_varint(&mut b, rows);
        for (name, ty, width) in [
            ("x", "UInt64", 8),
            ("n", "Nullable(Int32)", 5),
            ("t", "Tuple(UInt8, Float64)", 9),
        ] {
            put(&mut b, name);
            put(&mut b, ty);
            b.extend((0..rows * width).map(|i| (i % 13) as u8));
        }
        b
    };
    for compressed in [false, true] {
        let parts = |n: usize| compressed.then_some(n);
        let mut answer = packet(1, &block(0), parts(1));
        answer.extend(packet(1, &block(400), parts(5)));
        answer.extend(packet(1, &block(250), parts(3)));
        answer.extend(packet(7, &block(1), parts(1)));
        answer.push(5);
        let select = REV_54412 | BLOCK_INFO | if compressed { COMPRESSED } else { 0 };
        for (name, end) in [
            ("fixed-answer", answer.len()),
            ("fixed-answer-cut", answer.len() / 2),
            ("fixed-answer-cut", answer.len() - 40),
        ] {
            seeds.add(name, select, &answer[..end]);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, fixtures, blocks_dir, out] = &args[..] else {
        eprintln!("usage: make_seeds FIXTURES BLOCKS OUT");
        std::process::exit(2);
    };
    let out = PathBuf::from(out);
    if out.exists() {
        std::fs::remove_dir_all(&out).expect("emptying OUT");
    }
    std::fs::create_dir_all(&out).expect("creating OUT");
    let mut seeds = Seeds {
        dir: out,
        written: 0,
        bytes: 0,
        seen: HashSet::new(),
    };
    server_sessions(&mut seeds, Path::new(fixtures));
    client_sessions(&mut seeds, Path::new(fixtures));
    blocks(&mut seeds, Path::new(blocks_dir));
    made_here(&mut seeds);
    fixed_width_answers(&mut seeds);
    println!("{} seeds, {} bytes", seeds.written, seeds.bytes);
}
