//! A property test of the native-protocol walker against what ClickHouse itself writes.
//!
//! Each case is a random set of columns of random nested types (Array, Tuple, Nullable,
//! LowCardinality inside arrays and tuples, Nothing, Enum, Decimal, UUID, FixedString,
//! DateTime with a zone), a random row count and block size, compression on or off. The
//! case is asked of the stack's first node over a raw native connection (Hello, Query,
//! the empty Data that ends the client's part, a Ping), and the whole stream the server
//! wrote is kept: the server's Hello up to the Pong. The walker
//! ([`ServerPackets`]) must then consume exactly those bytes, packet by packet, ending with
//! EndOfStream and Pong, count the rows asked for, and call any cut of a packet
//! "incomplete", never an error, a panic or a longer packet. Large cases give compressed
//! blocks of several frames.
//!
//! ClickHouse 18.16 has no Map, Variant or JSON type, so those are covered by the walker's
//! unit tests over hand-built blocks (`src/clickhouse/native/block.rs`) only.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chgate::clickhouse::compress::lz4_block;
use chgate::clickhouse::native::client::{self, put_str, ClientInfo, Hello, Query, Setting};
use chgate::clickhouse::native::server::{HelloAnswer, Kind, ServerHello, ServerPackets, Session};
use chgate::clickhouse::native::WalkError;
use chgate::clickhouse::rowbinary::write_varint;
use common::*;
use proptest::prelude::*;

const REVISION: u64 = 54412;

/// A scalar type and how to make a value of it from a UInt64 expression.
#[derive(Debug, Clone, Copy)]
enum Scalar {
    UInt8,
    Int64,
    Float64,
    String,
    FixedString,
    Date,
    DateTime,
    Uuid,
    Decimal64,
    Decimal128,
    Enum8,
}

impl Scalar {
    fn name(self) -> &'static str {
        match self {
            Scalar::UInt8 => "UInt8",
            Scalar::Int64 => "Int64",
            Scalar::Float64 => "Float64",
            Scalar::String => "String",
            Scalar::FixedString => "FixedString(3)",
            Scalar::Date => "Date",
            Scalar::DateTime => "DateTime('Europe/Paris')",
            Scalar::Uuid => "UUID",
            Scalar::Decimal64 => "Decimal(18, 4)",
            Scalar::Decimal128 => "Decimal(38, 2)",
            Scalar::Enum8 => "Enum8('a' = 0, 'b' = 1)",
        }
    }

    /// A value of this type from `v`, a UInt64 expression.
    fn expr(self, v: &str) -> String {
        match self {
            Scalar::UInt8 => format!("toUInt8({v} % 256)"),
            Scalar::Int64 => format!("toInt64({v}) - 1000"),
            Scalar::Float64 => format!("{v} / 7"),
            Scalar::String => {
                format!("substring('abcdefghijklmnopqrstuvwxyz0123456789', 1, {v} % 37)")
            }
            Scalar::FixedString => format!("toFixedString(toString({v} % 1000), 3)"),
            Scalar::Date => format!("toDate({v})"),
            Scalar::DateTime => format!("toDateTime({v}, 'Europe/Paris')"),
            Scalar::Uuid => "generateUUIDv4()".into(),
            Scalar::Decimal64 => format!("toDecimal64({v}, 4)"),
            Scalar::Decimal128 => format!("toDecimal128({v}, 2)"),
            Scalar::Enum8 => format!("CAST({v} % 2 AS Enum8('a' = 0, 'b' = 1))"),
        }
    }

    /// Whether LowCardinality may wrap it (18.16: strings, numbers, dates).
    fn low_cardinality(self) -> bool {
        matches!(
            self,
            Scalar::UInt8 | Scalar::Int64 | Scalar::String | Scalar::FixedString | Scalar::Date
        )
    }
}

/// A column type, nested as ClickHouse allows.
#[derive(Debug, Clone)]
enum Ty {
    Scalar(Scalar),
    Nullable(Scalar),
    /// `Nullable(Nothing)`: the type of NULL.
    Nothing,
    LowCardinality(Scalar),
    LowCardinalityNullable(Scalar),
    Array(Box<Ty>),
    Tuple(Vec<Ty>),
}

impl Ty {
    fn name(&self) -> String {
        match self {
            Ty::Scalar(s) => s.name().into(),
            Ty::Nullable(s) => format!("Nullable({})", s.name()),
            Ty::Nothing => "Nullable(Nothing)".into(),
            Ty::LowCardinality(s) => format!("LowCardinality({})", s.name()),
            Ty::LowCardinalityNullable(s) => {
                format!("LowCardinality(Nullable({}))", s.name())
            }
            Ty::Array(t) => format!("Array({})", t.name()),
            Ty::Tuple(ts) => {
                let names: Vec<String> = ts.iter().map(Ty::name).collect();
                format!("Tuple({})", names.join(", "))
            }
        }
    }

    /// Values of this type (LowCardinality left to the outer CAST) from `v`; `depth` keeps
    /// the lambdas' variables apart.
    fn expr(&self, v: &str, depth: usize) -> String {
        match self {
            Ty::Scalar(s) | Ty::LowCardinality(s) => s.expr(v),
            Ty::Nullable(s) | Ty::LowCardinalityNullable(s) => {
                format!("if({v} % 3 = 0, NULL, {})", s.expr(v))
            }
            Ty::Nothing => "NULL".into(),
            Ty::Array(t) => {
                let x = format!("x{depth}");
                let inner = t.expr(&format!("({v} + {x})"), depth + 1);
                format!("arrayMap({x} -> {inner}, range({v} % 4))")
            }
            Ty::Tuple(ts) => {
                let items: Vec<String> = ts.iter().map(|t| t.expr(v, depth + 1)).collect();
                format!("tuple({})", items.join(", "))
            }
        }
    }
}

fn scalar() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        Just(Scalar::UInt8),
        Just(Scalar::Int64),
        Just(Scalar::Float64),
        Just(Scalar::String),
        Just(Scalar::FixedString),
        Just(Scalar::Date),
        Just(Scalar::DateTime),
        Just(Scalar::Uuid),
        Just(Scalar::Decimal64),
        Just(Scalar::Decimal128),
        Just(Scalar::Enum8),
    ]
}

fn ty() -> impl Strategy<Value = Ty> {
    let leaf = prop_oneof![
        scalar().prop_map(Ty::Scalar),
        scalar().prop_map(Ty::Nullable),
        Just(Ty::Nothing),
        scalar()
            .prop_filter("LowCardinality of this", |s| s.low_cardinality())
            .prop_map(Ty::LowCardinality),
        scalar()
            .prop_filter("LowCardinality of this", |s| s.low_cardinality())
            .prop_map(Ty::LowCardinalityNullable),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|t| Ty::Array(Box::new(t))),
            prop::collection::vec(inner, 1..4).prop_map(Ty::Tuple),
        ]
    })
}

#[derive(Debug, Clone)]
struct Case {
    columns: Vec<Ty>,
    rows: u64,
    max_block_size: u64,
    compression: bool,
}

impl Case {
    fn sql(&self) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, t)| format!("CAST({} AS {}) AS c{i}", t.expr("number", 0), t.name()))
            .collect();
        format!(
            "SELECT {} FROM system.numbers LIMIT {}",
            columns.join(", "),
            self.rows
        )
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(ty(), 1..5),
        prop_oneof![0..50u64, 50..5_000u64, 5_000..60_000u64],
        prop_oneof![1..64u64, 64..70_000u64],
        any::<bool>(),
    )
        .prop_map(|(columns, rows, max_block_size, compression)| Case {
            columns,
            rows,
            max_block_size,
            compression,
        })
}

/// The client's side of one query: Hello, Query, the empty Data that ends its blocks.
/// (No Ping yet: during a query the server takes only Cancel and Data, and closes on
/// anything else with "Unknown packet from client".)
fn client_bytes(case: &Case, sql: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Hello {
        client_name: "chgate native_types test".into(),
        major: 18,
        minor: 16,
        revision: REVISION,
        database: String::new(),
        user: "chgate".into(),
        password: secret("chgate"),
    }
    .write(&mut out);
    let max_block_size = client::varuint_value(case.max_block_size);
    Query {
        query_id: b"",
        info: Some(ClientInfo::initial_tcp(
            b"chgate native_types test",
            (18, 16),
            REVISION,
            b"",
        )),
        settings: vec![Setting {
            name: "max_block_size",
            value: &max_block_size,
        }],
        stage: 2,
        compression: case.compression,
        text: sql.as_bytes(),
    }
    .write(&mut out, REVISION);
    if case.compression {
        write_varint(&mut out, client::DATA);
        put_str(&mut out, b"");
        // BlockInfo (is_overflows 0, bucket_num -1), no columns, no rows, in one frame.
        let block = [1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0];
        out.extend_from_slice(&lz4_block(&block).expect("a tiny frame"));
    } else {
        client::write_empty_data(&mut out);
    }
    out
}

/// Everything the node writes for `case`: read until the walker finds the stream ending
/// in EndOfStream (or an Exception) and the node then stays quiet; then a Ping must be answered by exactly
/// a Pong, which shows the node had nothing more of the query to send. A walker that
/// misplaced a packet end never finds that ending; the read then stops after 30 s and the
/// walk's own error is reported.
fn server_stream(case: &Case, sql: &str, session: &Session) -> Vec<u8> {
    let mut s = TcpStream::connect("127.0.0.11:9000").expect("the stack's first node");
    s.write_all(&client_bytes(case, sql)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut all, mut chunk) = (Vec::new(), vec![0u8; 256 * 1024]);
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let ended = walk(&all, session).is_ok_and(|p| {
                    p.last()
                        .is_some_and(|p| matches!(p.1, Kind::EndOfStream | Kind::Exception))
                });
                if ended {
                    break;
                }
            }
            Err(e) => panic!("reading from the node: {e}"),
        }
    }
    let mut ping = Vec::new();
    write_varint(&mut ping, client::PING);
    s.write_all(&ping).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut chunk).unwrap_or(0);
    all.extend_from_slice(&chunk[..n]);
    all
}

/// The packets of `stream` as the walker finds them: (start, kind, length, rows).
fn walk(stream: &[u8], session: &Session) -> Result<Vec<(usize, Kind, usize, u64)>, String> {
    let mut reader = ServerPackets::default();
    let (mut at, mut out) = (0, Vec::new());
    while at < stream.len() {
        let p = reader
            .next(&stream[at..], session)
            .map_err(|e| format!("packet {} at byte {at} of {}: {e}", out.len(), stream.len()))?;
        if p.len == 0 || at + p.len > stream.len() {
            return Err(format!(
                "packet {} at byte {at}: length {}",
                out.len(),
                p.len
            ));
        }
        out.push((at, p.kind, p.len, p.rows));
        at += p.len;
    }
    Ok(out)
}

fn check(case: &Case, cuts: &[(usize, f64)]) -> Result<(), TestCaseError> {
    let sql = case.sql();
    let session = Session {
        revision: REVISION,
        compression: case.compression,
        // Written by ClickHouse 18.16.
        empty_low_cardinality_granule: true,
    };
    let stream = server_stream(case, &sql, &session);
    // The stack runs 18.16, which writes a granule for a LowCardinality without rows.
    let (hello, _) = ServerHello::read(&stream, REVISION).expect("the node's Hello");
    let HelloAnswer::Hello(hello) = hello else {
        panic!("the node refused the test's login");
    };
    prop_assert!(hello.writes_empty_low_cardinality_granules());
    let packets =
        walk(&stream, &session).map_err(|e| TestCaseError::fail(format!("{e}\n{sql}")))?;
    let kinds: Vec<Kind> = packets.iter().map(|p| p.1).collect();
    prop_assert!(
        !kinds.contains(&Kind::Exception),
        "the node refused the case: {}\n{sql}",
        String::from_utf8_lossy(&stream)
    );
    prop_assert_eq!(kinds.first(), Some(&Kind::Hello));
    prop_assert_eq!(
        &kinds[kinds.len() - 2..],
        &[Kind::EndOfStream, Kind::Pong][..]
    );
    let rows: u64 = packets
        .iter()
        .filter(|p| p.1 == Kind::Data)
        .map(|p| p.3)
        .sum();
    prop_assert_eq!(rows, case.rows, "{}", sql);
    // Cuts of packets: each one incomplete, from a fresh walker.
    for &(pick, fraction) in cuts {
        let (start, kind, len, _) = packets[pick % packets.len()];
        let end = ((len as f64) * fraction) as usize;
        if end >= len {
            continue;
        }
        let got = ServerPackets::default().next(&stream[start..start + end], &session);
        prop_assert_eq!(
            got,
            Err(WalkError::Incomplete),
            "{:?} packet at {} cut at {} of {}\n{}",
            kind,
            start,
            end,
            len,
            sql
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // A failing case is shrunk on the live server: keep that bounded.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_walker_consumes_exactly_what_clickhouse_wrote(
        case in case(),
        cuts in prop::collection::vec((any::<usize>(), 0.0..1.0f64), 8),
    ) {
        check(&case, &cuts)?;
    }
}

/// One case known to give compressed blocks of several frames: the property above reaches
/// them only in its larger cases.
#[test]
fn a_compressed_answer_of_several_frames_per_block() {
    let case = Case {
        columns: vec![
            Ty::Array(Box::new(Ty::LowCardinalityNullable(Scalar::String))),
            Ty::Tuple(vec![Ty::Scalar(Scalar::String), Ty::Nothing]),
            Ty::Array(Box::new(Ty::Array(Box::new(Ty::Nullable(Scalar::Enum8))))),
        ],
        rows: 60_000,
        max_block_size: 65_536,
        compression: true,
    };
    let session = Session {
        revision: REVISION,
        compression: true,
        // Written by ClickHouse 18.16.
        empty_low_cardinality_granule: true,
    };
    let stream = server_stream(&case, &case.sql(), &session);
    // The stack runs 18.16, which writes a granule for a LowCardinality without rows.
    let (hello, _) = ServerHello::read(&stream, REVISION).expect("the node's Hello");
    let HelloAnswer::Hello(hello) = hello else {
        panic!("the node refused the test's login");
    };
    assert!(hello.writes_empty_low_cardinality_granules());
    let packets = walk(&stream, &session).unwrap();
    let &(start, _, len, rows) = packets
        .iter()
        .find(|p| p.1 == Kind::Data && p.3 > 0)
        .expect("a Data packet with rows");
    assert_eq!(rows, 60_000);
    // The packet: its type, an empty table name, then frames (a 16-byte checksum, the
    // method, the compressed size counting the 9-byte header, the original size).
    let (mut at, mut frames) = (start + 2, 0);
    while at < start + len {
        let size = u32::from_le_bytes(stream[at + 17..at + 21].try_into().unwrap());
        at += 16 + size as usize;
        frames += 1;
    }
    assert_eq!(at, start + len);
    assert!(frames >= 2, "{frames} frame(s)");
    // Cut within the first frame, at a frame's end, and in the last one's last bytes.
    let first_frame_end = start
        + 2
        + 16
        + u32::from_le_bytes(stream[start + 19..start + 23].try_into().unwrap()) as usize;
    for end in [
        start + 3,
        start + 40,
        first_frame_end,
        first_frame_end + 1,
        start + len - 1,
    ] {
        assert_eq!(
            ServerPackets::default().next(&stream[start..end], &session),
            Err(WalkError::Incomplete),
            "cut at {} of {len}",
            end - start
        );
    }
}
