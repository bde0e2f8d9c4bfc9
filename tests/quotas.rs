//! Per-user quotas against the real stack, over both frontends: concurrency with and
//! without a queue, the rate, the execution time (the query is gone from the node's
//! `system.processes` within a second of the limit and the client got code 159), and the
//! result size (a cut result ends with ClickHouse's error text, as a node ends an answer that failed
//! after it began: never silently).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A query that runs for minutes and notices a KILL between its blocks (`sleep` does not:
/// 18.16 sleeps a whole block out).
const LONG: &str = "SELECT count() FROM numbers(100000000000) WHERE NOT ignore(sipHash64(number))";

/// A proxy (with a native listener, one node) and its user held to `[quotas.test]`. The
/// metrics are the test process's: each test's user has a name of its own.
struct Quota {
    proxy: TestProxy,
    user: String,
}

impl Quota {
    async fn start(quota: &str) -> Self {
        Self::start_with(quota, "{ host = \"127.0.0.11\", http_port = 8123 }").await
    }

    /// [`Quota::start`] with `replica` as the one node.
    async fn start_with(quota: &str, replica: &str) -> Self {
        Self::start_configured(quota, replica, "").await
    }

    /// [`Quota::start_with`] with more `[proxy]` keys.
    async fn start_configured(quota: &str, replica: &str, proxy: &str) -> Self {
        let user = unique("q").replace('-', "_");
        let extra = format!(
            r#"
[users.{user}]
password_hash = "{hash}"
cluster = "demo"
account = "chgate"
quota = "test"
[quotas.test]
{quota}
"#,
            hash = hash("q-pass"),
        );
        let text = config(&[("127.0.0.11", 8123)], &extra)
            .replace(
                "http_listen = \"127.0.0.1:0\"",
                &format!("http_listen = \"127.0.0.1:0\"\nnative_listen = \"127.0.0.1:0\"\n{proxy}"),
            )
            .replace("{ host = \"127.0.0.11\", http_port = 8123 }", replica);
        Self {
            proxy: TestProxy::start(&text).await,
            user,
        }
    }

    /// Waits (at most 5 s) for the user's `name` metric to read `value`.
    async fn until_metric(&self, name: &str, value: f64) {
        let start = Instant::now();
        while metric_sum(&self.proxy.metrics().await, name, &[&self.label()]) != value {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{name} never read {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn label(&self) -> String {
        format!("user=\"{}\"", self.user)
    }

    fn args(&self, sql: &str, params: &str) -> Vec<String> {
        vec![
            "-sS".into(),
            "-u".into(),
            format!("{}:q-pass", self.user),
            format!("{}/?{params}", self.proxy.url()),
            "--data-binary".into(),
            sql.into(),
        ]
    }

    async fn http(&self, sql: &str, params: &str) -> CurlOutput {
        curl_async(self.args(sql, params)).await
    }

    /// Runs `sql` three times at once through HTTP; the statuses, answers and Retry-After
    /// headers, by status.
    async fn three_at_once(&self, sql: &str) -> Vec<(u16, String, Option<String>)> {
        let runs = (0..3).map(|_| curl_async(self.args(sql, "")));
        let mut outs: Vec<_> = all_at_once(runs)
            .await
            .into_iter()
            .map(|o| (o.status, o.body.clone(), header(&o, "retry-after")))
            .collect();
        outs.sort_by_key(|(s, _, _)| *s);
        outs
    }
}

fn header(out: &CurlOutput, name: &str) -> Option<String> {
    out.headers.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// Runs every future at once (each on its own task) and collects the outputs in order.
async fn all_at_once<F>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn http_concurrency_without_a_queue_refuses_exactly_one_with_202() {
    let q = Quota::start("max_concurrent_queries = 2\nmax_queue_size = 0").await;
    let outs = q.three_at_once("SELECT sleep(1)").await;
    let statuses: Vec<u16> = outs.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 429], "{outs:#?}");
    let (_, refused, retry_after) = &outs[2];
    assert!(refused.contains("Code: 202"), "{refused}");
    assert!(
        refused.contains("TOO_MANY_SIMULTANEOUS_QUERIES"),
        "{refused}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    let m = q.proxy.metrics().await;
    let user = q.label();
    assert_eq!(
        metric_sum(
            &m,
            "chgate_quota_rejections_total",
            &[&user, "reason=\"concurrency\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "chgate_user_queries_in_flight", &[&user]),
        0.0
    );
}

#[tokio::test]
async fn http_concurrency_with_a_queue_lets_the_third_wait_and_succeed() {
    let q =
        Quota::start("max_concurrent_queries = 2\nmax_queue_size = 5\nmax_queue_wait = \"10s\"")
            .await;
    let started = Instant::now();
    let outs = q.three_at_once("SELECT sleep(1)").await;
    let statuses: Vec<u16> = outs.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 200], "{outs:#?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the third waited for a slot: {:?}",
        started.elapsed()
    );
    let m = q.proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "chgate_quota_queue_wait_seconds_count", &[&q.label()]),
        3.0
    );
}

#[tokio::test]
async fn a_queue_wait_that_runs_out_is_refused() {
    let q =
        Quota::start("max_concurrent_queries = 1\nmax_queue_size = 5\nmax_queue_wait = \"300ms\"")
            .await;
    let outs = q.three_at_once("SELECT sleep(1)").await;
    let statuses: Vec<u16> = outs.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [200, 429, 429], "{outs:#?}");
    assert!(
        outs[1].1.contains("waited 0.3 s in chgate's queue"),
        "{}",
        outs[1].1
    );
}

#[tokio::test]
async fn the_rate_refuses_past_the_burst_with_201_and_retry_after() {
    let q = Quota::start("requests_per_minute = 6\nrequests_burst = 2").await;
    for _ in 0..2 {
        let ok = q.http("SELECT 1", "").await;
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    let refused = q.http("SELECT 1", "").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("Code: 201"), "{}", refused.body);
    assert!(refused.body.contains("QUOTA_EXCEEDED"), "{}", refused.body);
    // One query per 10 s comes back: the client is told to wait up to that.
    let after: u64 = header(&refused, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=10).contains(&after), "{after}");
}

/// The queries with `query_id` on the node now.
fn running(node: &str, query_id: &str) -> bool {
    !direct(
        node,
        &format!("SELECT count() FROM system.processes WHERE query_id = '{query_id}'"),
    )
    .trim()
    .starts_with('0')
}

/// A write whose client goes away before its answer runs on (ClickHouse does not stop a
/// write for a closed connection): its concurrency slot stays taken until the node is done
/// with it. It was freed at once, so a client cutting its writes short could run any
/// number of them at once.
#[tokio::test]
async fn a_write_whose_client_went_away_keeps_its_slot_while_it_runs() {
    let q = Quota::start("max_concurrent_queries = 1\nmax_queue_size = 0").await;
    let table = format!("default.{}", unique("orphan").replace('-', "_"));
    direct(
        "127.0.0.11",
        &format!("CREATE TABLE {table} (x UInt8) ENGINE = Memory"),
    );
    let id = unique("orphan");
    // The client gives up after 1 s; the write takes 3 s on the node.
    let mut args = q.args(
        &format!("INSERT INTO {table} SELECT sleep(3)"),
        &format!("query_id={id}"),
    );
    args.insert(0, "-m1".into());
    let cut = curl_async(args).await;
    assert_ne!(cut.status, 200, "{}", cut.body);
    assert!(running("127.0.0.11", &id), "the write runs on");
    let second = q.http("SELECT 1", "").await;
    assert_eq!(
        second.status, 429,
        "the write still holds the slot: {}",
        second.body
    );
    let end = Instant::now() + Duration::from_secs(15);
    while running("127.0.0.11", &id) {
        assert!(Instant::now() < end, "the write never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Given back within the poll after the node is done.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let third = q.http("SELECT 1", "").await;
        if third.status == 200 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the slot was never given back: {}",
            third.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        direct("127.0.0.11", &format!("SELECT count() FROM {table}")).trim(),
        "1"
    );
    direct("127.0.0.11", &format!("DROP TABLE {table}"));
}

#[tokio::test]
async fn http_execution_time_kills_the_query_and_answers_159() {
    let q = Quota::start("max_execution_time = \"1s\"").await;
    // Before its answer begins.
    let id = unique("quota-exec");
    let started = Instant::now();
    let out = q.http(LONG, &format!("query_id={id}")).await;
    let took = started.elapsed();
    assert_eq!(out.status, 504, "{}", out.body);
    assert!(out.body.contains("Code: 159"), "{}", out.body);
    assert!(out.body.contains("maximum: 1"), "{}", out.body);
    assert!(
        took < Duration::from_millis(1800),
        "answered at the limit: {took:?}"
    );
    wait_until(
        "the query gone from the node",
        Duration::from_secs(1),
        || !running("127.0.0.11", &id),
    )
    .await;

    // After it began, and with the limit the node got lifted by the query's own SETTINGS
    // (the node would not stop it): the stream is cut and ends with the text.
    let id = unique("quota-stream");
    let out = q
        .http(
            "SELECT number FROM system.numbers SETTINGS max_execution_time = 100",
            &format!("query_id={id}"),
        )
        .await;
    let tail = &out.body[out.body.len().saturating_sub(300)..];
    assert!(tail.contains("Code: 159"), "{tail}");
    assert!(
        out.body.starts_with("0\n1\n2\n"),
        "rows before the cut arrive"
    );
    wait_until(
        "the streaming query gone from the node",
        Duration::from_secs(1),
        || !running("127.0.0.11", &id),
    )
    .await;
    let m = q.proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_quota_kills_total",
            &[&q.label(), "reason=\"execution_time\""]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn http_result_bytes_cut_the_result_with_396() {
    let q = Quota::start("max_result_bytes = 100000").await;
    let out = q.http("SELECT number FROM numbers(10000000)", "").await;
    let tail = &out.body[out.body.len().saturating_sub(300)..];
    let (rows, text) = out
        .body
        .rsplit_once("\nCode: 396")
        .unwrap_or_else(|| panic!("no error text at the end: {tail:?}"));
    assert!(rows.len() <= 100_000, "{}", rows.len());
    assert!(text.contains("max bytes: 100000"), "{text}");
    // A compressed answer cannot carry the text: its transfer is broken off instead, so no
    // client takes the cut result for a whole one.
    let mut args = q.args(
        "SELECT number FROM numbers(10000000)",
        "enable_http_compression=1",
    );
    args.insert(0, "--compressed".into());
    let gz = curl_async(args).await;
    assert!(!gz.ok, "a cut compressed transfer fails: {}", gz.status);
    assert!(header(&gz, "content-encoding").is_some(), "{}", gz.headers);
    // A small answer is untouched.
    let ok = q.http("SELECT 1", "").await;
    assert_eq!(ok.status, 200);
}

/// clickhouse-client through `addr` as `user`.
async fn native_client(addr: SocketAddr, user: String, query: &str) -> Output {
    let args = vec![
        "--host".to_string(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
        "--user".into(),
        user,
        "--password".into(),
        "q-pass".into(),
        "--query".into(),
        query.into(),
    ];
    tokio::task::spawn_blocking(move || {
        Command::new("clickhouse-client")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("clickhouse-client")
    })
    .await
    .unwrap()
}

/// A relay to ch1's native port that passes the node's first `cap` bytes of each
/// connection and then nothing more (connections stay open): a node that stops sending in
/// the middle of a packet.
async fn stalling_relay(cap: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.11:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(node) = tokio::net::TcpStream::connect("127.0.0.11:9000").await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut nr, mut nw) = node.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut nw).await;
                });
                let mut passed = 0;
                let mut buf = vec![0u8; 16 << 10];
                while passed < cap {
                    let n = match nr.read(&mut buf[..(cap - passed).min(16 << 10)]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    passed += n;
                }
                // Stalled: hold both sides open, pass nothing.
                tokio::time::sleep(Duration::from_secs(120)).await;
                drop((nr, cw));
            });
        }
    });
    port
}

/// A node that stops sending in the middle of a packet while the quota's execution limit
/// passes: the cut waits for the packet's end, which never comes, so past the limit plus a
/// grace the query is killed and the connection closed. Before, nothing woke the relay: the
/// query and its slot stayed until the client gave up (300 s for clickhouse-client).
#[tokio::test]
async fn native_execution_time_ends_a_query_whose_node_stalls_mid_packet() {
    // Past the first blocks (a read's answer is held back whole only until it starts;
    // after that its packets go on as they come), then in the middle of one.
    let port = stalling_relay(3_000_000).await;
    let q = Quota::start_with(
        "max_execution_time = \"2s\"",
        &format!("{{ host = \"127.0.0.11\", http_port = 8123, native_port = {port} }}"),
    )
    .await;
    let native = q.proxy.native.expect("native listener");
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        native_client(
            native,
            q.user.clone(),
            "SELECT number FROM system.numbers LIMIT 100000000",
        ),
    )
    .await
    .expect("the query of a stalled node still holds its client after 30 s");
    let took = started.elapsed();
    assert!(
        !out.status.success(),
        "the stalled query cannot have succeeded"
    );
    assert!(took < Duration::from_secs(10), "ended after {took:?}");
    let m = q.proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "chgate_quota_kills_total",
            &[&q.label(), "reason=\"execution_time\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "chgate_user_queries_in_flight", &[&q.label()]),
        0.0,
        "the slot is given back"
    );
}

#[tokio::test]
async fn native_concurrency_refuses_with_202() {
    let q = Quota::start("max_concurrent_queries = 2\nmax_queue_size = 0").await;
    let native = q.proxy.native.expect("native listener");
    let outs =
        all_at_once((0..3).map(|_| native_client(native, q.user.clone(), "SELECT sleep(1)"))).await;
    let refused: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(refused.len(), 1, "{outs:#?}");
    assert!(refused[0].contains("Code: 202"), "{}", refused[0]);
}

#[tokio::test]
async fn native_execution_time_and_result_bytes_end_the_query_and_keep_the_connection() {
    let q = Quota::start("max_execution_time = \"1s\"\nmax_result_bytes = 200000").await;
    let native = q.proxy.native.expect("native listener");
    let id = unique("native-exec");
    // One connection: a query over the time limit, two over the byte limit (in small
    // blocks, in big ones), then a normal one, which must still work (the connection moves on to a fresh node connection).
    let script = format!(
        r#"
import sys, time
from clickhouse_driver import Client
c = Client(host="{host}", port={port}, user="{user}", password="q-pass")
t = time.time()
try:
    c.execute("{long}", query_id="{id}")
    print("exec: no error")
except Exception as e:
    print("exec:", getattr(e, "code", None), round(time.time() - t, 2))
try:
    rows = c.execute("SELECT number FROM numbers(10000000)", settings={{"max_block_size": 8192}})
    print("bytes: no error", len(rows))
except Exception as e:
    print("bytes:", getattr(e, "code", None))
n = 0
try:
    for _ in c.execute_iter("SELECT number FROM numbers(10000000)", settings={{"max_block_size": 1048576}}):
        n += 1
    print("big: no error", n)
except Exception as e:
    print("big:", getattr(e, "code", None), n)
print("after:", c.execute("SELECT 42")[0][0])
"#,
        host = native.ip(),
        port = native.port(),
        user = q.user,
        long = LONG,
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-c", &script])
            .output()
            .expect("python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exec = stdout.lines().find(|l| l.starts_with("exec:")).unwrap();
    let mut parts = exec.split_whitespace().skip(1);
    assert_eq!(parts.next(), Some("159"), "{stdout}");
    let took: f64 = parts.next().unwrap().parse().unwrap();
    assert!(took < 1.8, "answered at the limit: {took}");
    assert!(stdout.contains("bytes: 396"), "{stdout}");
    // 8 MiB blocks, whose ends are known from their row counts (they pass through as they
    // come): the first would cross the limit, and the cut is told instead of it.
    assert!(stdout.contains("big: 396 0\n"), "{stdout}");
    assert!(stdout.contains("after: 42"), "{stdout}");
    wait_until(
        "the query gone from the node",
        Duration::from_secs(1),
        || !running("127.0.0.11", &id),
    )
    .await;
}

/// `python -c script` with the stack's Python, its stdout piped, killed when dropped.
fn spawn_python(script: &str) -> tokio::process::Child {
    tokio::process::Command::new(python())
        .args(["-c", script])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python")
}

/// A client that stops reading an answer does not hold its query on the node past the
/// quota's execution limit (the node, blocked writing, would not see a KILL): over HTTP a
/// raw connection that never reads; over the native protocol clickhouse-driver's
/// `execute_iter`, never iterated. Each query is gone from the node within 1.5 s of the
/// limit.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_its_query_past_the_limit() {
    use tokio::io::AsyncWriteExt;
    let q = Quota::start("max_execution_time = \"1s\"").await;
    // Wide rows (~700 bytes): the socket buffers on the way fill long before the limit.
    let endless =
        "SELECT number, toString(range(200)) FROM system.numbers SETTINGS max_execution_time = 100";
    // HTTP: the request goes, the answer is never read.
    let id = unique("stalled-http");
    let body = endless;
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:q-pass", q.user))
    };
    let mut conn = tokio::net::TcpStream::connect(q.proxy.http).await.unwrap();
    conn.write_all(
        format!(
            "POST /?query_id={id} HTTP/1.1\r\nHost: chgate\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    wait_until("the HTTP query running", Duration::from_secs(2), || {
        running("127.0.0.11", &id)
    })
    .await;
    wait_until(
        "the unread HTTP query gone from the node",
        Duration::from_millis(2500).saturating_sub(started.elapsed()),
        || !running("127.0.0.11", &id),
    )
    .await;
    let http_gone = started.elapsed();
    drop(conn);

    // Native: the driver reads packets only as the rows are iterated.
    let native = q.proxy.native.expect("native listener");
    let id = unique("stalled-native");
    let script = format!(
        r#"
import time
from clickhouse_driver import Client
c = Client(host="{host}", port={port}, user="{user}", password="q-pass")
rows = c.execute_iter("{endless}", query_id="{id}", settings={{"max_block_size": 65536}})
next(rows)
print("started", flush=True)
time.sleep(6)
"#,
        host = native.ip(),
        port = native.port(),
        user = q.user,
    );
    let mut child = spawn_python(&script);
    let started = Instant::now();
    wait_until("the native query running", Duration::from_secs(5), || {
        running("127.0.0.11", &id)
    })
    .await;
    wait_until(
        "the unread native query gone from the node",
        Duration::from_millis(3000),
        || !running("127.0.0.11", &id),
    )
    .await;
    let native_gone = started.elapsed();
    let _ = child.kill().await;
    eprintln!("limit 1 s: the unread HTTP query was gone after {http_gone:?}, the native one after {native_gone:?}");
    let m = q.proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_quota_kills_total",
            &[&q.label(), "reason=\"execution_time\""]
        ) >= 2.0,
        "{m}"
    );
}

/// A native client that goes away while its query waits in the queue gives up its place:
/// the query never runs once the slot frees.
#[tokio::test]
async fn a_native_query_abandoned_in_the_queue_never_runs() {
    let q =
        Quota::start("max_concurrent_queries = 1\nmax_queue_size = 4\nmax_queue_wait = \"10s\"")
            .await;
    let native = q.proxy.native.expect("native listener");
    // The slot is taken for 3 s over HTTP.
    let holder = {
        let args = q.args("SELECT sleep(3)", "");
        tokio::spawn(curl_async(args))
    };
    wait_until("the slot taken", Duration::from_secs(2), || {
        direct(
            "127.0.0.11",
            "SELECT count() FROM system.processes WHERE query = 'SELECT sleep(3)'",
        )
        .trim()
            != "0"
    })
    .await;
    // A native query queues behind it; its client is killed while it waits.
    let id = unique("abandoned");
    let script = format!(
        r#"
from clickhouse_driver import Client
c = Client(host="{host}", port={port}, user="{user}", password="q-pass")
print("connecting", flush=True)
c.execute("SELECT sleep(1)", query_id="{id}")
"#,
        host = native.ip(),
        port = native.port(),
        user = q.user,
    );
    let mut child = spawn_python(&script);
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("connecting")
    );
    // It logs in and sends its query, which waits in the queue; then the client dies.
    let queued = format!("user=\"{}\"", q.user);
    let start = Instant::now();
    while metric_sum(&q.proxy.metrics().await, "chgate_quota_queued", &[&queued]) != 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never queued: {}",
            q.proxy
                .metrics()
                .await
                .lines()
                .filter(|l| l.contains(&q.user) || l.contains("native"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill().await;
    let _ = holder.await;
    // The slot is free now: the abandoned query must not run.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(!running("127.0.0.11", &id), "the abandoned query ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the user's slot is free for the next query.
    let out = q.http("SELECT 1", "").await;
    assert_eq!(out.status, 200, "{}", out.body);
}

/// Relays to `node` (a native address), listening on `ip`, whose connections are all reset
/// (RST: what a node killed with unread bytes sends) when the returned `Notify` fires.
async fn resetting_relay(
    ip: &str,
    node: &'static str,
) -> (u16, std::sync::Arc<tokio::sync::Notify>) {
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let reset = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = reset.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let reset = notify.clone();
            tokio::spawn(async move {
                let Ok(mut node) = tokio::net::TcpStream::connect(node).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut node) => {}
                    _ = reset.notified() => {
                        let _ = client.set_zero_linger();
                    }
                }
            });
        }
    });
    (port, reset)
}

/// A native query that waits in the queue while its connection's node goes away (the
/// connection reset, as by a node killed) is sent on another connection when its turn
/// comes: the node never had it. Before, the write to the dead connection failed and the
/// client got code 210, "could not be sent".
#[tokio::test]
async fn a_queued_native_query_whose_node_connection_broke_meanwhile_runs_elsewhere() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (port_a, reset_a) = resetting_relay("127.0.0.11", "127.0.0.11:9000").await;
    let (port_b, reset_b) = resetting_relay("127.0.0.12", "127.0.0.12:9000").await;
    let replicas = format!(
        "{{ host = \"127.0.0.11\", http_port = 8123, native_port = {port_a} }}, \
         {{ host = \"127.0.0.12\", http_port = 8123, native_port = {port_b} }}"
    );
    let q = Quota::start_with(
        "max_concurrent_queries = 1\nmax_queue_size = 4\nmax_queue_wait = \"10s\"",
        &replicas,
    )
    .await;
    let native = q.proxy.native.expect("native listener");
    let script = format!(
        r#"
import sys
from clickhouse_driver import Client
c = Client(host="{host}", port={port}, user="{user}", password="q-pass")
print(c.execute("SELECT 1")[0][0], flush=True)
sys.stdin.readline()
try:
    print(c.execute("SELECT 2")[0][0], flush=True)
except Exception as e:
    print("error", str(e).replace("\n", " "), flush=True)
"#,
        host = native.ip(),
        port = native.port(),
        user = q.user,
    );
    let mut child = tokio::process::Command::new(python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("1"));
    // The slot is taken for 2 s over HTTP; the native query queues behind it.
    let holder = tokio::spawn(curl_async(q.args("SELECT sleep(2)", "")));
    q.until_metric("chgate_user_queries_in_flight", 1.0).await;
    stdin.write_all(b"go\n").await.unwrap();
    q.until_metric("chgate_quota_queued", 1.0).await;
    // Meanwhile every node connection is reset.
    reset_a.notify_waiters();
    reset_b.notify_waiters();
    let held = holder.await.unwrap();
    assert_eq!(held.status, 200, "{}", held.body);
    let answer = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert_eq!(answer.as_deref(), Some("2"), "the queued query's answer");
}

/// A read whose body stops coming after admission gives its slot back when
/// `proxy.http_receive_timeout` passes (400, code 33), instead of holding it for as long as
/// the client keeps the connection open.
#[tokio::test]
async fn a_read_whose_body_stops_coming_gives_its_slot_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q = Quota::start_configured(
        "max_concurrent_queries = 1\nmax_queue_size = 0",
        "{ host = \"127.0.0.11\", http_port = 8123 }",
        "http_receive_timeout = \"1s\"",
    )
    .await;
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:q-pass", q.user))
    };
    // The statement is in the parameter (a read, admitted at once); of its 100-byte body,
    // 10 bytes come and then nothing.
    let mut conn = tokio::net::TcpStream::connect(q.proxy.http).await.unwrap();
    conn.write_all(
        format!(
            "POST /?query=SELECT%201 HTTP/1.1\r\nHost: chgate\r\nAuthorization: Basic {auth}\r\nContent-Length: 100\r\n\r\n-- comment"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    q.until_metric("chgate_user_queries_in_flight", 1.0).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Code: 33"), "{answer}");
    assert!(answer.contains("http_receive_timeout"), "{answer}");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    q.until_metric("chgate_user_queries_in_flight", 0.0).await;
    let out = q.http("SELECT 1", "").await;
    assert_eq!(out.status, 200, "the slot is free again: {}", out.body);
}
