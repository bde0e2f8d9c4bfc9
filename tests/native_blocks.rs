//! The Native-format block walker (`chgate::clickhouse::native`) against blocks ClickHouse
//! itself wrote: a wide set of column types from the stack's server, in many blocks, walked
//! one after another to the exact end; every cut of a block is "incomplete", never an error.

mod common;

use std::process::Command;

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
