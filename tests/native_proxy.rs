//! The native-protocol listener against the real stack, with real clients: clickhouse-client
//! 18.16 (queries, multi-statement sessions, INSERT from stdin in several formats, results
//! compressed and not, wrong passwords, read-only refusals) and Python clickhouse-driver
//! (`tests/native_driver.py`); protocol refusals with raw bytes (an unknown setting, garbage,
//! reserved users); and a connection that outlives its node: the node's connections cut
//! between two queries (the second succeeds elsewhere, its session carried over), during a
//! read before its result (it runs again elsewhere, its progress counted once), during a
//! streaming one (a clean Exception or close, never a hang); and a read its node declines
//! with a fan-out error (it runs elsewhere; the error reaches the client only when every
//! node declines). Nodes are "killed" by cutting a TCP relay
//! in front of them, so every other test on the stack keeps its nodes.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The test config with a native listener on a free port.
fn native_config(nodes: &[(&str, u16)], extra: &str) -> String {
    config(nodes, extra).replace(
        "http_listen = \"127.0.0.1:0\"",
        "http_listen = \"127.0.0.1:0\"\nnative_listen = \"127.0.0.1:0\"",
    )
}

async fn one_node_proxy() -> (TestProxy, SocketAddr) {
    let p = TestProxy::start(&native_config(&[("127.0.0.11", 8123)], "")).await;
    let native = p.native.expect("native listener");
    (p, native)
}

/// clickhouse-client through `addr`, with `stdin` fed to it.
async fn client(addr: SocketAddr, args: &[&str], stdin: Option<Vec<u8>>) -> Output {
    let mut all: Vec<String> = vec![
        "--host".into(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("clickhouse-client")
            .args(&all)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("clickhouse-client");
        let mut input = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            if let Some(bytes) = stdin {
                use std::io::Write;
                let _ = input.write_all(&bytes);
            }
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn errors(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const BI: [&str; 4] = ["--user", "bi", "--password", "bi-pass"];
const ETL: [&str; 4] = ["--user", "etl", "--password", "etl-pass"];

fn with<'a>(who: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    who.iter().chain(rest).copied().collect()
}

/// A Memory table on ch1 for one test, dropped when done.
struct Table(String);

impl Table {
    fn new(prefix: &str) -> Self {
        let name = format!("default.{}", unique(prefix).replace('-', "_"));
        let out = direct(
            "127.0.0.11",
            &format!("CREATE TABLE {name} (id UInt64, s String) ENGINE = Memory"),
        );
        assert!(out.is_empty(), "create {name}: {out}");
        Table(name)
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        direct("127.0.0.11", &format!("DROP TABLE IF EXISTS {}", self.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_client_reads_through_the_native_listener() {
    let (p, addr) = one_node_proxy().await;
    let out = client(addr, &with(&BI, &["-q", "SELECT 1"]), None).await;
    assert!(out.status.success(), "{}", errors(&out));
    assert_eq!(text(&out), "1\n");

    // A result of many blocks, compressed and not, equal to the node's own.
    let big = "SELECT number, toString(number * 3), [number % 7, 1] FROM system.numbers LIMIT 2000000 FORMAT TSV";
    let want = direct("127.0.0.11", big);
    for compression in ["0", "1"] {
        let out = client(
            addr,
            &with(&BI, &["--compression", compression, "-q", big]),
            None,
        )
        .await;
        assert!(out.status.success(), "{}", errors(&out));
        assert!(
            text(&out) == want,
            "2M rows differ from the node's (compression {compression})"
        );
    }

    // Fixed-width columns only, blocks of varying rows, totals and extremes: after the
    // header block, the answer's blocks are found from their row counts (the LZ4 frames
    // are not decompressed); equal to the node's all the same.
    for q in [
        "SELECT number, toNullable(toInt32(number % 1000)), toFixedString(toString(number % 10), 1), \
         toDecimal64(number, 2), toDateTime(number), (number, toFloat64(number) / 3) \
         FROM system.numbers WHERE number % 3 != 1 LIMIT 1500000 FORMAT TSV",
        "SELECT number % 10 AS k, count(), sum(number) FROM (SELECT number FROM system.numbers LIMIT 1000000) \
         GROUP BY k \
         WITH TOTALS ORDER BY k FORMAT TSV",
    ] {
        let want = direct(
            "127.0.0.11",
            &q.replace(" FORMAT TSV", " SETTINGS extremes = 1 FORMAT TSV"),
        );
        for compression in ["0", "1"] {
            let out = client(
                addr,
                &with(&BI, &["--compression", compression, "--extremes", "1", "-q", q]),
                None,
            )
            .await;
            assert!(out.status.success(), "{}", errors(&out));
            assert!(
                text(&out) == want,
                "{q}: differs from the node's (compression {compression})"
            );
        }
    }

    // A session: SET and USE hold for the statements after them (for a user that may change
    // settings: `bi`'s queries carry readonly=1).
    let out = client(
        addr,
        &with(
            &ETL,
            &[
                "-n",
                "-q",
                "SET max_threads = 3; USE system; SELECT value FROM settings WHERE name = 'max_threads'; SELECT currentDatabase()",
            ],
        ),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", errors(&out));
    assert_eq!(text(&out), "3\nsystem\n");
    let out = client(addr, &with(&BI, &["-q", "SET max_threads = 3"]), None).await;
    assert!(errors(&out).contains("Code: 164"), "{}", errors(&out));

    // Refusals, with ClickHouse's codes and chgate's texts.
    let out = client(
        addr,
        &["--user", "bi", "--password", "wrong", "-q", "SELECT 1"],
        None,
    )
    .await;
    assert!(!out.status.success());
    let e = errors(&out);
    assert!(
        e.contains("Code: 516") && e.contains("Authentication failed"),
        "{e}"
    );
    let out = client(
        addr,
        &with(
            &BI,
            &["-q", "CREATE TABLE default.never (x UInt8) ENGINE = Memory"],
        ),
        None,
    )
    .await;
    let e = errors(&out);
    assert!(e.contains("Code: 164") && e.contains("readonly"), "{e}");
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_native_queries_total",
            &["user=\"bi\"", "status=\"ok\""]
        ) >= 3.0,
        "{m}"
    );
    assert!(metric_sum(&m, "chgate_native_queries_total", &["status=\"refused\""]) >= 1.0);
    assert!(
        metric_sum(
            &m,
            "chgate_native_connections_total",
            &["result=\"auth_failed\""]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_client_inserts_from_stdin_in_several_formats() {
    let (_p, addr) = one_node_proxy().await;
    let table = Table::new("native_insert");
    let inputs: [(&str, Vec<u8>); 3] = [
        (
            "TSV",
            (0..100_000)
                .map(|i| format!("{i}\tt{i}\n"))
                .collect::<String>()
                .into_bytes(),
        ),
        (
            "CSV",
            (100_000..100_100)
                .map(|i| format!("{i},\"c,{i}\"\n"))
                .collect::<String>()
                .into_bytes(),
        ),
        (
            "JSONEachRow",
            (100_100..100_110)
                .map(|i| format!("{{\"id\":{i},\"s\":\"j\"}}\n"))
                .collect::<String>()
                .into_bytes(),
        ),
    ];
    for (format, data) in inputs {
        for compression in ["0", "1"] {
            let q = format!("INSERT INTO {} FORMAT {format}", table.0);
            let out = client(
                addr,
                &with(&ETL, &["--compression", compression, "-q", &q]),
                Some(data.clone()),
            )
            .await;
            assert!(out.status.success(), "{format}: {}", errors(&out));
        }
    }
    let got = direct(
        "127.0.0.11",
        &format!("SELECT count(), sum(id) FROM {}", table.0),
    );
    let ids: u64 = (0..100_110u64).sum::<u64>() * 2;
    assert_eq!(got.trim(), format!("{}\t{ids}", 100_110 * 2));
    // A read-only user cannot insert, and no data reaches the node.
    let q = format!("INSERT INTO {} FORMAT TSV", table.0);
    let out = client(addr, &with(&BI, &["-q", &q]), Some(b"1\tx\n".to_vec())).await;
    assert!(errors(&out).contains("Code: 164"), "{}", errors(&out));
    let got = direct("127.0.0.11", &format!("SELECT count() FROM {}", table.0));
    assert_eq!(got.trim(), (100_110 * 2).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clickhouse_driver_works_through_the_native_listener() {
    let (_p, addr) = one_node_proxy().await;
    let table = Table::new("native_driver");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/native_driver.py");
    let secret = secret_file("chgate");
    let port = addr.port().to_string();
    let name = table.0.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &port, "127.0.0.11", secret.to_str().unwrap(), &name])
            .output()
            .expect("run the stack's python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "native_driver.py failed:\n{stdout}");
    assert!(stdout.contains("native driver checks passed"));
}

/// Raw bytes: a Hello at revision 54412 for `user`.
fn hello(user: &str, password: &str, revision: u64) -> Vec<u8> {
    let mut out = Vec::new();
    chgate::clickhouse::native::client::Hello {
        client_name: "raw test".into(),
        major: 18,
        minor: 16,
        revision,
        database: String::new(),
        user: user.into(),
        password: password.into(),
    }
    .write(&mut out);
    out
}

/// Everything the server side sends until it closes (or 5 s pass).
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all)).await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_refusals_are_exceptions_and_never_desynchronise() {
    let (_p, addr) = one_node_proxy().await;
    // Garbage instead of a Hello: an Exception, then the connection closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2), "an Exception packet: {got:?}");
    assert!(String::from_utf8_lossy(&got).contains("native protocol port"));

    // The users ClickHouse reserves for its own schemes are refused like a bad password.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello(" INTERSERVER SECRET ", "", 54412))
        .await
        .unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2));
    assert_eq!(&got[1..5], &516i32.to_le_bytes());

    // A Data packet before the Hello is not read as data.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[2, 0, 1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0])
        .await
        .unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2));
    assert!(String::from_utf8_lossy(&got).contains("not a Hello"));

    // A setting chgate cannot type: refused by name, with code 115, before the node sees it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello("bi", "bi-pass", 54412)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(buf[0], 0, "a server Hello: {:?}", &buf[..n]);
    let mut q = vec![1u8, 0]; // Query, empty id
    q.extend_from_slice(&[1, 0, 0, 0, 1]); // client info: initial, three empty strings, TCP
    q.extend_from_slice(&[0, 0, 0, 18, 16]); // os user, host, name; version
    q.extend_from_slice(&[0x8c, 0xa9, 0x03]); // revision 54412
    q.extend_from_slice(&[0, 0]); // quota key, patch
    q.push(15);
    q.extend_from_slice(b"no_such_setting");
    q.extend_from_slice(&[1, 0, 2, 0, 8]);
    q.extend_from_slice(b"SELECT 1");
    s.write_all(&q).await.unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2), "{got:?}");
    assert_eq!(&got[1..5], &115i32.to_le_bytes());
    assert!(String::from_utf8_lossy(&got).contains("Unknown setting no_such_setting"));

    // A setting value longer than the node reads (a 10-byte VarUInt: 18.16 stops after 9
    // and would take the rest as fields chgate never checked): refused, nothing runs.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello("bi", "bi-pass", 54412)).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(buf[0], 0, "a server Hello: {:?}", &buf[..n]);
    let mut q = vec![1u8, 0];
    q.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0, 18, 16, 0x8c, 0xa9, 0x03, 0, 0]);
    q.push(11);
    q.extend_from_slice(b"max_threads");
    q.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]);
    q.extend_from_slice(&[0, 2, 0, 8]);
    q.extend_from_slice(b"SELECT 1");
    s.write_all(&q).await.unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2), "{got:?}");
    assert!(
        String::from_utf8_lossy(&got).contains("VarUInt longer than 9 bytes"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // A client older than chgate speaks is told so.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello("bi", "bi-pass", 54000)).await.unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(got.first(), Some(&2));
    assert!(String::from_utf8_lossy(&got).contains("revision 54000"));
}

/// A Query packet at revision 54412 with no settings, uncompressed, and the empty block
/// that ends its (absent) external tables.
fn plain_query(text: &str) -> Vec<u8> {
    let mut q = vec![1u8, 0]; // Query, empty id
    q.extend_from_slice(&[1, 0, 0]); // client info: initial, no user, no query id
    q.push(9);
    q.extend_from_slice(b"0.0.0.0:0"); // the address 18.16 parses
    q.push(1); // TCP
    q.extend_from_slice(&[0, 0, 0, 18, 16]); // os user, host, name; version
    q.extend_from_slice(&[0x8c, 0xa9, 0x03]); // revision 54412
    q.extend_from_slice(&[0, 0]); // quota key, patch
    q.push(0); // no settings
    q.extend_from_slice(&[2, 0]); // stage Complete, no compression
    chgate::clickhouse::rowbinary::write_varint(&mut q, text.len() as u64);
    q.extend_from_slice(text.as_bytes());
    chgate::clickhouse::native::client::write_empty_data(&mut q);
    q
}

/// A client that stops reading mid-result: after `native_send_timeout` its query is
/// killed on the node and its connection closed, instead of both being held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go() {
    let config = native_config(&[("127.0.0.11", 8123)], "").replace(
        "access_log = false",
        "access_log = false\nnative_send_timeout = \"2s\"",
    );
    let p = TestProxy::start(&config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(p.native.unwrap()).await.unwrap();
    s.write_all(&hello("etl", "etl-pass", 54412)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(buf[0], 0, "a server Hello: {:?}", &buf[..n]);
    s.write_all(&plain_query(
        "SELECT number, toString(number), 'unread-client' FROM system.numbers LIMIT 500000000",
    ))
    .await
    .unwrap();
    node_running(&["127.0.0.11"], "unread-client", 0).await;
    // Nothing read from here on.
    let gone = "SELECT count() FROM system.processes WHERE query LIKE '%unread-client%' \
                AND query NOT LIKE '%system.processes%'";
    let end = Instant::now() + Duration::from_secs(20);
    while direct("127.0.0.11", gone).trim() != "0" {
        assert!(
            Instant::now() < end,
            "the query of a client that stopped reading still runs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = common::curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
    assert!(
        common::metric_sum(
            &metrics,
            "chgate_native_errors_total",
            &["client_send_timeout"]
        ) >= 1.0,
        "{metrics}"
    );
    drop(s);
}

/// An INSERT whose node stops reading mid-stream (hung: its connection stays open, nothing
/// is taken): after `native_send_timeout` chgate gives the node up, the client gets an
/// Exception and its remaining data is dropped, instead of chgate, the client and the
/// user's concurrency slot waiting on the node for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_node_stops_reading_is_given_up() {
    let (p, addr, a, b) = relayed_proxy_with_settings("", "native_send_timeout = \"2s\"").await;
    let db = Database::new("hungwrite");
    for node in ["127.0.0.11", "127.0.0.12"] {
        direct(
            node,
            &format!(
                "CREATE TABLE {}.sink (id UInt64, s String) ENGINE = Null",
                db.0
            ),
        );
    }
    let sql = format!("INSERT INTO {}.sink FORMAT TSV", db.0);
    let args: Vec<String> = ["--host", "127.0.0.1", "--port"]
        .iter()
        .map(|s| s.to_string())
        .chain([addr.port().to_string()])
        .chain(
            // Blocks of ~10 MiB, sent as stdin is read.
            with(&ETL, &["--max_insert_block_size", "10000", "-q", &sql])
                .iter()
                .map(|s| s.to_string()),
        )
        .collect();
    let mut child = Command::new("clickhouse-client")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clickhouse-client");
    // 200 MiB of rows that do not compress (the client sends LZ4 blocks: rows of one
    // letter would all fit in the sockets' buffers), written as fast as the client takes
    // them; it stops when the client fails.
    let mut input = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        const LETTERS: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = Vec::with_capacity(1 << 20);
        for _ in 0..200 {
            chunk.clear();
            for _ in 0..1000 {
                chunk.extend_from_slice(b"1\t");
                for _ in 0..1000 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    chunk.push(LETTERS[(seed & 63) as usize]);
                }
                chunk.push(b'\n');
            }
            if input.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    node_running(&["127.0.0.11", "127.0.0.12"], "hungwrite", 0).await;
    a.hang.cancel();
    b.hang.cancel();
    let hung_at = Instant::now();
    let pid = child.id();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    let Ok(out) = tokio::time::timeout(Duration::from_secs(30), out).await else {
        let m = p.metrics().await;
        let errors: Vec<&str> = m
            .lines()
            .filter(|l| l.contains("native_errors") || l.contains("native_queries"))
            .collect();
        send_signal(&pid.to_string(), "KILL");
        a.cut.cancel();
        b.cut.cancel();
        panic!("the client still waits on a node that reads nothing: {errors:#?}");
    };
    let out = out.unwrap();
    feeder.join().unwrap();
    assert!(!out.status.success(), "the insert cannot have succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connection lost"), "{stderr}");
    let m = p.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "chgate_native_errors_total",
            &["kind=\"node_send_timeout\""]
        ),
        1.0,
        "{m}"
    );
    eprintln!("given up {:?} after the node hung", hung_at.elapsed());
    a.cut.cancel();
    b.cut.cancel();
}

/// Waits until a query whose text holds `pattern` runs on one of `nodes`, having read at
/// least `rows` rows.
async fn running_on(nodes: &[&'static str], pattern: &str, rows: u64) {
    node_running(nodes, pattern, rows).await;
}

/// A TCP relay in front of a node's HTTP and native ports, which can be cut like a node
/// that died (every connection closes, new ones are refused) or hung like a SIGSTOPped
/// one (connections stay open and are accepted, nothing is passed on) until it is cut.
struct Relay {
    http: SocketAddr,
    native: SocketAddr,
    cut: CancellationToken,
    hang: CancellationToken,
}

impl Relay {
    async fn start(node: &str) -> Relay {
        let (cut, hang) = (CancellationToken::new(), CancellationToken::new());
        let http = Self::listen(format!("{node}:8123"), cut.clone(), hang.clone()).await;
        let native = Self::listen(format!("{node}:9000"), cut.clone(), hang.clone()).await;
        Relay {
            http,
            native,
            cut,
            hang,
        }
    }

    async fn listen(target: String, cut: CancellationToken, hang: CancellationToken) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cut.cancelled() => return,
                    a = l.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let (target, cut, hang) = (target.clone(), cut.clone(), hang.clone());
                tokio::spawn(async move {
                    if hang.is_cancelled() {
                        cut.cancelled().await;
                        return;
                    }
                    let Ok(mut node) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = hang.cancelled() => cut.cancelled().await,
                        _ = tokio::io::copy_bidirectional(&mut client, &mut node) => {}
                    }
                });
            }
        });
        addr
    }
}

/// A proxy over two relayed replicas of shard 1 (ch1, ch2).
async fn relayed_proxy() -> (TestProxy, SocketAddr, Relay, Relay) {
    relayed_proxy_with("").await
}

/// [`relayed_proxy`] with `upstream` added to its `[upstream]` settings.
async fn relayed_proxy_with(upstream: &str) -> (TestProxy, SocketAddr, Relay, Relay) {
    relayed_proxy_with_settings(upstream, "").await
}

/// [`relayed_proxy`] with `upstream` added to its `[upstream]` settings and `proxy` to its
/// `[proxy]` ones.
async fn relayed_proxy_with_settings(
    upstream: &str,
    proxy: &str,
) -> (TestProxy, SocketAddr, Relay, Relay) {
    let (a, b) = (
        Relay::start("127.0.0.11").await,
        Relay::start("127.0.0.12").await,
    );
    let replicas = format!(
        "replicas = [{{ host = \"127.0.0.1\", http_port = {}, native_port = {} }}, {{ host = \"127.0.0.1\", http_port = {}, native_port = {} }}]",
        a.http.port(),
        a.native.port(),
        b.http.port(),
        b.native.port()
    );
    let text = native_config(&[("127.0.0.11", 8123)], FAST_PICKER)
        .replace("[upstream]\n", &format!("[upstream]\n{upstream}\n"))
        .replace(
            "access_log = false",
            &format!("access_log = false\n{proxy}"),
        );
    let start = text.find("replicas = [").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!("{}{}{}", &text[..start], replicas, &text[end..]);
    let p = TestProxy::start(&text).await;
    let addr = p.native.unwrap();
    (p, addr, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outlives_its_node() {
    let (p, addr, a, b) = relayed_proxy().await;
    // One connection, a session, a query; then its node dies; then the next query.
    let script = format!(
        r#"
import sys
from clickhouse_driver import Client
c = Client("127.0.0.1", port={port}, user="etl", password="etl-pass")
c.execute("SET max_threads = 3")
c.execute("USE system")
print(c.execute("SELECT substitution FROM macros WHERE macro = 'replica'")[0][0], flush=True)
sys.stdin.readline()
print(c.execute("SELECT substitution FROM macros WHERE macro = 'replica'")[0][0], flush=True)
print(c.execute("SELECT value FROM settings WHERE name = 'max_threads'")[0][0], flush=True)
print(c.execute("SELECT currentDatabase()")[0][0], flush=True)
"#,
        port = addr.port()
    );
    let mut child = tokio::process::Command::new(python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first),
    )
    .await
    .expect("first query")
    .unwrap();
    let first = first.trim().to_string();
    assert!(first == "ch1" || first == "ch2", "{first:?}");
    // Its node goes away while the connection is idle.
    if first == "ch1" {
        a.cut.cancel()
    } else {
        b.cut.cancel()
    }
    // The node went away a moment before the next query (a fixed pause is the scenario:
    // chgate exposes no sign of having seen the close, and a query sent in the same instant
    // as the close is the mid-query case, tested below).
    tokio::time::sleep(Duration::from_millis(300)).await;
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .await
        .unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_to_string(&mut rest))
        .await
        .expect("the second query did not hang")
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{rest}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = rest.lines().collect();
    let other = if first == "ch1" { "ch2" } else { "ch1" };
    assert_eq!(lines, vec![other, "3", "system"], "moved, with its session");
    let m = p.metrics().await;
    assert_eq!(
        metric_sum(&m, "chgate_native_reconnects_total", &["result=\"ok\""]),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_during_a_query_ends_it_cleanly() {
    let (_p, addr, a, b) = relayed_proxy().await;
    // A long compressed result; both relays are cut while it streams.
    let started = Instant::now();
    let args = with(
        &BI,
        &[
            "--compression",
            "1",
            "-q",
            "SELECT number, toString(number) FROM system.numbers LIMIT 200000000 FORMAT Null",
        ],
    );
    let cutter = async {
        running_on(
            &["127.0.0.11", "127.0.0.12"],
            "LIMIT 200000000 FORMAT Null",
            1_000_000,
        )
        .await;
        a.cut.cancel();
        b.cut.cancel();
    };
    let (out, ()) = tokio::join!(client(addr, &args, None), cutter);
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    assert!(!out.status.success(), "the query cannot have finished");
    let e = errors(&out);
    // Cut mid-block, the connection can only close; the client tells it by where it was
    // (between frames: "Attempt to read after eof", code 32; inside one: 33 or a socket
    // error).
    assert!(
        e.contains("Code: 210")
            || e.contains("Code: 32.")
            || e.contains("Code: 33.")
            || e.contains("Connection reset")
            || e.contains("Unexpected EOF")
            || e.contains("Cannot read from socket"),
        "a clean exception or close: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_idle_connections_and_lets_a_running_query_finish() {
    let (p, addr) = one_node_proxy().await;
    // An idle connection, logged in.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(&hello("bi", "bi-pass", 54412))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    // A query that runs for about 2 s.
    let args = with(&BI, &["-q", "SELECT sleep(2)"]);
    let running = client(addr, &args, None);
    let drain = async {
        running_on(
            &["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"],
            "SELECT sleep(2)",
            0,
        )
        .await;
        p.shut_down();
        let started = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
        (started.elapsed(), closed)
    };
    let (out, (waited, closed)) = tokio::join!(running, drain);
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection closed: {closed:?}"
    );
    assert!(waited < Duration::from_secs(1), "at once ({waited:?})");
    assert!(
        out.status.success(),
        "the running query finished: {}",
        errors(&out)
    );
    assert_eq!(text(&out), "0\n");
}

/// The node (of `nodes`) on which a query whose text holds `pattern` runs, once it has
/// read at least `rows` rows.
async fn node_running(nodes: &[&'static str], pattern: &str, rows: u64) -> &'static str {
    let sql = format!(
        "SELECT count() FROM system.processes WHERE query LIKE '%{pattern}%' \
         AND query NOT LIKE '%system.processes%' AND read_rows >= {rows}"
    );
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(node) = nodes.iter().find(|n| direct(n, &sql).trim() != "0") {
            return node;
        }
        assert!(Instant::now() < end, "{pattern:?} never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database on ch1 and ch2 for one test, dropped when done.
struct Database(String);

impl Database {
    fn new(prefix: &str) -> Self {
        let name = unique(prefix).replace('-', "_");
        for node in ["127.0.0.11", "127.0.0.12"] {
            direct(node, &format!("CREATE DATABASE {name}"));
        }
        Database(name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        for node in ["127.0.0.11", "127.0.0.12"] {
            direct(node, &format!("DROP DATABASE IF EXISTS {}", self.0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_declined_by_its_node_moves_to_another() {
    let (p, addr, a, _b) = relayed_proxy().await;
    // The same view on both replicas; on ch1 it reads another node through a relay, which
    // is then cut, so ch1 answers with a fan-out error (279 or 210).
    let db = Database::new("fanout");
    let v = format!("{}.v", db.0);
    let remote = |relay: &Relay| {
        format!(
            "CREATE VIEW {v} AS SELECT toUInt8(1) AS x FROM remote('127.0.0.1:{}', system.one, 'default', '{}')",
            relay.native.port(),
            secret("default")
        )
    };
    let gone = Relay::start("127.0.0.13").await;
    direct("127.0.0.11", &remote(&gone));
    gone.cut.cancel();
    direct(
        "127.0.0.12",
        &format!("CREATE VIEW {v} AS SELECT toUInt8(2) AS x FROM system.one"),
    );
    let ch1 = format!("node=\"127.0.0.1:{}\"", a.http.port());
    let declined =
        || async { metric_sum(&p.metrics().await, "chgate_declined_reads_total", &[&ch1]) };
    // (As `etl`: 18.16 forbids table functions, even in a view, to read-only users.)
    // New connections until one started on ch1 (the picker spreads them).
    let sql = format!("SELECT x FROM {v}");
    let mut runs = 0;
    while declined().await == 0.0 {
        runs += 1;
        assert!(runs <= 40, "no connection started on ch1 in 40");
        let out = client(addr, &with(&ETL, &["-q", &sql]), None).await;
        assert!(out.status.success(), "{}", errors(&out));
        assert_eq!(text(&out), "2\n", "every answer is ch2's");
    }
    // A session moves with the read, and a compressed answer too (Python driver).
    let script = format!(
        r#"
from clickhouse_driver import Client
for i in range(12):
    c = Client("127.0.0.1", port={port}, user="etl", password="etl-pass", compression=(i % 2 == 0))
    c.execute("SET max_threads = 2")
    assert c.execute("SELECT x FROM {v}") == [(2,)]
    assert c.execute("SELECT value FROM system.settings WHERE name = 'max_threads'") == [("2",)]
    c.disconnect()
print("ok")
"#,
        port = addr.port()
    );
    let out = tokio::process::Command::new(python())
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Where every node declines, the client gets ClickHouse's error.
    let gone = Relay::start("127.0.0.13").await;
    direct("127.0.0.12", &format!("DROP TABLE {v}"));
    direct("127.0.0.12", &remote(&gone));
    gone.cut.cancel();
    let out = client(addr, &with(&ETL, &["-q", &sql]), None).await;
    assert!(!out.status.success());
    let e = errors(&out);
    assert!(e.contains("Code: 279") || e.contains("Code: 210"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_node_is_lost_before_its_result_moves() {
    let (p, addr, a, b) = relayed_proxy().await;
    // An aggregate: its only answer before the end is a header and progress. Its node dies
    // a while into it; it runs again on the other one, and the client's progress adds up
    // to the rows of one run, not of both.
    let n: u64 = 1_500_000_000;
    let script = format!(
        r#"
from clickhouse_driver import Client
c = Client("127.0.0.1", port={port}, user="bi", password="bi-pass")
p = c.execute_with_progress("SELECT sum(number) FROM (SELECT number FROM system.numbers LIMIT {n})")
rows = 0
for r, total in p:
    rows = r
print(p.get_result()[0][0], rows, flush=True)
"#,
        port = addr.port()
    );
    let run = tokio::process::Command::new(python())
        .args(["-c", &script])
        .output();
    let cut = async {
        let node = node_running(
            &["127.0.0.11", "127.0.0.12"],
            "system.numbers LIMIT 1500000000",
            50_000_000,
        )
        .await;
        if node == "127.0.0.11" {
            a.cut.cancel();
            a.http.port()
        } else {
            b.cut.cancel();
            b.http.port()
        }
    };
    let (out, cut) = tokio::join!(run, cut);
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(fields[0], (n * (n - 1) / 2).to_string(), "the right answer");
    // 18.16 counts whole blocks read: a little over n for one run, never twice n.
    let rows: u64 = fields[1].parse().unwrap();
    assert!(
        (n..n + n / 10).contains(&rows),
        "rows read, counted once: {rows}"
    );
    let failed = format!("node=\"127.0.0.1:{cut}\"");
    let m = p.metrics().await;
    assert_eq!(
        metric_sum(&m, "chgate_failovers_total", &[&failed]),
        1.0,
        "it moved once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_node_falls_silent_moves_to_another() {
    let (p, addr, a, _b) = relayed_proxy_with("hedge = \"always\"\nhedge_after = \"300ms\"").await;
    // The same view on both replicas; on ch1 it reads another node through a relay that
    // then hangs (accepts, answers nothing), so ch1 waits on it as on a SIGSTOPped replica
    // (18.16: for receive_timeout, 300 s) and sends nothing more.
    let db = Database::new("silent");
    let v = format!("{}.v", db.0);
    let hung = Relay::start("127.0.0.13").await;
    direct(
        "127.0.0.11",
        &format!(
            "CREATE VIEW {v} AS SELECT toUInt8(1) AS x FROM remote('127.0.0.1:{}', system.one, 'default', '{}')",
            hung.native.port(),
            secret("default")
        ),
    );
    hung.hang.cancel();
    direct(
        "127.0.0.12",
        &format!("CREATE VIEW {v} AS SELECT toUInt8(2) AS x FROM system.one"),
    );
    let moved = || async {
        metric_sum(
            &p.metrics().await,
            "chgate_hedges_total",
            &["result=\"moved\""],
        )
    };
    let before = moved().await;
    // New connections until one started on ch1 (the picker spreads them): every answer is
    // ch2's, within the bound plus a normal answer.
    let sql = format!("SELECT x FROM {v}");
    let ch1 = format!("node=\"127.0.0.1:{}\"", a.http.port());
    let mut runs = 0;
    while moved().await == before {
        runs += 1;
        assert!(runs <= 40, "no connection started on ch1 in 40");
        let started = Instant::now();
        let out = client(addr, &with(&ETL, &["-q", &sql]), None).await;
        let took = started.elapsed();
        assert!(out.status.success(), "{}", errors(&out));
        assert_eq!(text(&out), "2\n", "every answer is ch2's");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    let m = p.metrics().await;
    assert!(
        metric_sum(&m, "chgate_native_queries_total", &[&ch1, "status=\"ok\""]) == 0.0,
        "nothing answered on ch1"
    );
    // No KILL QUERY went to ch1: 18.16 would cancel the silent read holding its process
    // list, and every new query of ch1 would wait until the hung relay is cut (the fault
    // run's freeze). The read's node connection was closed instead; ch1 answers.
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_query_kills_total",
            &[&ch1, "result=\"withheld\""]
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "chgate_query_kills_total", &[&ch1, "result=\"sent\""]),
        0.0
    );
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(|| direct_within("127.0.0.11", "SELECT 1", 5))
        .await
        .unwrap();
    assert_eq!(
        answer.as_deref(),
        Some("1\n"),
        "ch1 answers while the abandoned read waits ({:?})",
        started.elapsed()
    );
    hung.cut.cancel();
}
