//! Walking the native protocol (`chgate::clickhouse::native`) over bytes ClickHouse itself
//! wrote: blocks of a wide set of column types from the stack's server, walked one after
//! another to the exact end; whole server sessions captured from clickhouse-client 18.16
//! (`tests/fixtures/native`, made with `scripts/capture-native`), with and without
//! compression, walked packet by packet to the exact end. Every cut is "incomplete",
//! never an error or a panic.

mod common;

use std::process::Command;

use chgate::clickhouse::native::server::{Kind, ServerPackets, Session};
use chgate::clickhouse::native::{walk_block, Framing, WalkError};
use common::*;

const COLUMNS: &str = "number AS n, toString(number) AS s, toFixedString(toString(number % 10), 2) AS f, \
    [number, number + 1] AS a, [[toString(number)], []] AS aa, if(number % 3 = 0, NULL, number) AS nn, \
    if(number % 2 = 0, NULL, toString(number)) AS ns, toLowCardinality(toString(number % 7)) AS lc, \
    (number, toString(number)) AS t, toDecimal64(number, 4) AS d, toDecimal128(number, 2) AS d2, \
    toDate(number) AS dt, toDateTime(number, 'Europe/Paris') AS dtt, generateUUIDv4() AS u, \
    CAST(number % 2 AS Enum8('a' = 0, 'b' = 1)) AS e, toInt8(-1) AS i8, toFloat32(1.5) AS f32, \
    CAST(NULL AS Nullable(Nothing)) AS nothing, \
    toLowCardinality(if(number % 2 = 0, NULL, toString(number))) AS lcn, \
    arrayMap(x -> toString(x), range(number % 5)) AS strings";

/// `sql` answered in the Native format by the stack's first node, as bytes.
fn native(sql: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "-u",
            &format!("chgate:{}", secret("chgate")),
            "http://127.0.0.11:8123/?max_block_size=7000",
            "--data-binary",
            &format!("{sql} FORMAT Native"),
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out.stdout
}

#[test]
fn blocks_the_server_wrote_are_walked_to_their_exact_end() {
    let bytes = native(&format!(
        "SELECT {COLUMNS} FROM system.numbers LIMIT 100000"
    ));
    let (mut at, mut rows, mut blocks) = (0, 0, 0);
    while at < bytes.len() {
        let block = walk_block(&bytes[at..], Framing::default())
            .unwrap_or_else(|e| panic!("block {blocks} at byte {at}: {e}"));
        assert_eq!(block.columns, 20);
        at += block.len;
        rows += block.rows;
        blocks += 1;
    }
    assert_eq!(at, bytes.len());
    assert_eq!(rows, 100_000);
    assert!(blocks >= 10, "{blocks} blocks");
    eprintln!("{blocks} blocks, {} bytes walked", bytes.len());
}

#[test]
fn every_cut_of_a_block_is_incomplete() {
    let bytes = native(&format!("SELECT {COLUMNS} FROM system.numbers LIMIT 5"));
    let whole = walk_block(&bytes, Framing::default()).unwrap();
    assert_eq!((whole.rows, whole.len), (5, bytes.len()));
    for end in 0..bytes.len() {
        assert_eq!(
            walk_block(&bytes[..end], Framing::default()),
            Err(WalkError::Incomplete),
            "cut at {end} of {}",
            bytes.len()
        );
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/native/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Walks a captured server stream packet by packet; the packets' kinds and rows.
fn packets(stream: &[u8], compression: bool) -> Vec<(Kind, u64)> {
    let session = Session {
        revision: 54412,
        compression,
        // Written by ClickHouse 18.16.
        empty_low_cardinality_granule: true,
    };
    let mut reader = ServerPackets::default();
    let (mut at, mut out) = (0, Vec::new());
    while at < stream.len() {
        let p = reader
            .next(&stream[at..], &session)
            .unwrap_or_else(|e| panic!("packet {} at byte {at}: {e}", out.len()));
        out.push((p.kind, p.rows));
        at += p.len;
    }
    assert_eq!(at, stream.len());
    out
}

#[test]
fn captured_sessions_are_walked_packet_by_packet() {
    for compression in [false, true] {
        let stream = fixture(&format!("session-compression{}.s2c", u8::from(compression)));
        let seen = packets(&stream, compression);
        assert_eq!(seen[0].0, Kind::Hello);
        let rows: u64 = seen
            .iter()
            .filter(|(k, _)| *k == Kind::Data)
            .map(|(_, r)| r)
            .sum();
        // 25,000 + 3,000 rows, then SHOW DATABASES' 3; one query ends in an exception.
        assert_eq!(rows, 28_003, "{seen:?}");
        assert_eq!(
            seen.iter().filter(|(k, _)| *k == Kind::EndOfStream).count(),
            3
        );
        assert_eq!(seen.last().unwrap().0, Kind::Exception);
        assert!(seen.iter().any(|(k, _)| *k == Kind::Progress));
    }
}

#[test]
fn every_cut_of_a_compressed_multi_frame_block_is_incomplete() {
    let stream = fixture("session-compression1.s2c");
    let session = Session {
        revision: 54412,
        compression: true,
        // Written by ClickHouse 18.16.
        empty_low_cardinality_granule: true,
    };
    let mut reader = ServerPackets::default();
    // Find the first Data packet with rows: its block is over 1 MiB, so several frames.
    let mut at = 0;
    let big = loop {
        let p = reader.next(&stream[at..], &session).unwrap();
        if p.kind == Kind::Data && p.rows > 0 {
            break p;
        }
        at += p.len;
    };
    assert_eq!(big.rows, 25_000);
    let packet = &stream[at..at + big.len];
    // Cuts spread over the packet, and each of its last 64 bytes.
    for end in (0..packet.len())
        .step_by(9973)
        .chain(packet.len() - 64..packet.len())
    {
        assert_eq!(
            reader.next(&packet[..end], &session),
            Err(WalkError::Incomplete),
            "cut at {end} of {}",
            packet.len()
        );
    }
}
