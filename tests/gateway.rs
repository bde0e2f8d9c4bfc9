//! The gateway core against fake ClickHouse nodes (`common::fake`): failover, what is and
//! is not sent again, the stale-connection retry (the proxy's and the ingest writer's),
//! statement sniffing and policy, in-flight accounting, probes of a hung node. No stack
//! needed: every node here is a fake on port 0, every client real (curl) or in memory.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fake::{self, FakeClickHouse, Reply};
use common::*;
use http_body_util::Full;

/// The frontend's in-flight gauge is one for the whole test binary: the test that reads it
/// runs alone (write), the others beside each other (read).
static GAUGES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn curl_ok(args: &[&str]) -> CurlOutput {
    curl_async(args.iter().map(|s| s.to_string()).collect()).await
}

/// Reads as `bi`, writes as `etl`, through the proxy at `url`.
async fn read(url: &str, sql: &str) -> CurlOutput {
    curl_ok(&["-sS", "-u", "bi:bi-pass", url, "--data-binary", sql]).await
}

async fn write(url: &str, sql: &str, data: &str) -> CurlOutput {
    let query: String = form_urlencoded::byte_serialize(sql.as_bytes()).collect();
    let target = format!("{url}/?query={query}");
    curl_ok(&["-sS", "-u", "etl:etl-pass", &target, "--data-binary", data]).await
}

/// Waits until the admin API says the node on `port` is down (or up).
async fn wait_health(p: &TestProxy, port: u16, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, t) = admin_json(p.admin, "/v1/topology").await;
        let replicas = &t["clusters"][0]["shards"][0]["replicas"];
        let health = replicas
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["http_port"] == port)
            .map(|r| r["health"].as_str().unwrap_or("").to_string());
        if health.as_deref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node :{port} not {want}: {replicas}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lost_on_one_node_is_answered_by_another() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::Close).await;
    let b = FakeClickHouse::start(|_| Reply::ok("1\n")).await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    for i in 0..20 {
        let out = read(&p.url(), &format!("SELECT {i}")).await;
        assert_eq!((out.status, out.body.as_str()), (200, "1\n"), "read {i}");
    }
    assert!(
        !a.seen().is_empty(),
        "some reads went to the failing node first"
    );
    for lost in a.seen() {
        assert!(
            b.seen().iter().any(|s| s.body == lost.body),
            "{:?} was answered by the other node",
            lost.body
        );
    }
    let m = p.metrics().await;
    assert!(metric_sum(&m, "chgate_failovers_total", &[]) >= 1.0, "{m}");
    assert!(
        metric_sum(&m, "chgate_upstream_errors_total", &["kind=\"send\""]) >= 1.0,
        "{m}"
    );
}

const FAN_OUT_ERROR: &str = "Code: 279, e.displayText() = DB::NetException: All connection tries failed. Log: \n\nCode: 210, e.displayText() = DB::NetException: Connection refused (10.0.0.3:9000)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_a_node_could_not_fan_out_is_answered_by_another() {
    let _gauges = GAUGES.read().await;
    // Node a coordinates reads but cannot reach a shard (code 279); b can. Writes and
    // other errors from a are passed on as they are.
    let a = FakeClickHouse::start(|seen| {
        if seen.body.starts_with(b"SELECT") {
            Reply::error(500, FAN_OUT_ERROR)
        } else if seen.query.starts_with("INSERT") {
            Reply::error(
                500,
                "Code: 210, e.displayText() = DB::NetException: Connection reset\n",
            )
        } else {
            Reply::error(
                500,
                "Code: 60, e.displayText() = DB::Exception: Table t doesn't exist\n",
            )
        }
    })
    .await;
    let b = FakeClickHouse::start(|seen| {
        if seen.body.starts_with(b"SELECT") {
            Reply::ok("1\n")
        } else {
            Reply::error(
                500,
                "Code: 60, e.displayText() = DB::Exception: Table t doesn't exist\n",
            )
        }
    })
    .await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    for i in 0..20 {
        let out = read(&p.url(), &format!("SELECT {i}")).await;
        assert_eq!((out.status, out.body.as_str()), (200, "1\n"), "read {i}");
    }
    assert!(!a.seen().is_empty(), "some reads went to a first");
    let m = p.metrics().await;
    assert!(
        metric_sum(&m, "chgate_declined_reads_total", &[]) >= 1.0,
        "{m}"
    );
    // An error that is the query's own comes back from the first node, not sent again.
    let before = a.seen().len() + b.seen().len();
    let out = read(&p.url(), "DESCRIBE t").await;
    assert_eq!(out.status, 500, "{}", out.body);
    assert!(out.body.contains("Code: 60"), "{}", out.body);
    assert_eq!(a.seen().len() + b.seen().len(), before + 1);
    // A write answered with a network code is not sent again.
    for i in 0..10 {
        let before = b.seen().len();
        let out = write(&p.url(), "INSERT INTO t FORMAT TSV", &format!("{i}\n")).await;
        assert_eq!(out.status, 500, "{}", out.body);
        assert_eq!(
            b.seen().len() - before,
            usize::from(!out.body.contains("Code: 210"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_no_node_could_fan_out_gets_clickhouses_own_error() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::error(500, FAN_OUT_ERROR)).await;
    let b = FakeClickHouse::start(|_| Reply::error(500, FAN_OUT_ERROR)).await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    let out = read(&p.url(), "SELECT 1").await;
    assert_eq!(out.status, 500, "{}", out.body);
    assert_eq!(out.body, FAN_OUT_ERROR);
    assert_eq!(a.seen().len() + b.seen().len(), 2, "each node asked once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lost_after_it_was_sent_is_not_sent_again() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::Close).await;
    let b = FakeClickHouse::start(|_| Reply::ok("")).await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    let mut refused = 0;
    for i in 0..40 {
        let data = format!("row {i}\n");
        let out = write(&p.url(), "INSERT INTO t FORMAT TSV", &data).await;
        match out.status {
            200 => {}
            502 => {
                refused += 1;
                assert!(out.body.contains("Code: 210"), "{}", out.body);
                assert!(
                    out.body.contains("might have been executed"),
                    "{}",
                    out.body
                );
                assert!(
                    !out.body.contains("127.0.0.1"),
                    "no address in it: {}",
                    out.body
                );
            }
            other => panic!("write {i}: {other} {}", out.body),
        }
        if refused > 0 && i > 5 {
            break;
        }
    }
    assert!(refused >= 1, "some write went to the failing node");
    for lost in a.seen() {
        assert!(
            !b.seen().iter().any(|s| s.body == lost.body),
            "{:?} was sent again to the other node",
            lost.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_reached_no_node_goes_to_the_next_whatever_it_is() {
    let _gauges = GAUGES.read().await;
    let dead = fake::refused_port().await;
    let b = FakeClickHouse::start(|_| Reply::ok("")).await;
    let p = TestProxy::start(&fake::config(&[dead, b.port()], "")).await;
    for i in 0..10 {
        let out = write(&p.url(), "INSERT INTO t FORMAT TSV", &format!("w{i}\n")).await;
        assert_eq!(out.status, 200, "write {i}: {}", out.body);
    }
    let bodies: Vec<Bytes> = b.seen().into_iter().map(|s| s.body).collect();
    for i in 0..10 {
        let want = Bytes::from(format!("w{i}\n"));
        assert_eq!(bodies.iter().filter(|b| **b == want).count(), 1, "w{i}");
    }
    wait_health(&p, dead, "down").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_reaches_the_client_as_an_error_and_is_not_retried() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::CutBody {
        sent: "partial".into(),
        promised: 100,
    })
    .await;
    let b = FakeClickHouse::start(|_| Reply::ok("whole\n")).await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    let mut cut = None;
    for i in 0..40 {
        let sql = format!("SELECT {i}");
        let out = read(&p.url(), &sql).await;
        if !out.ok {
            cut = Some((sql, out));
            break;
        }
        assert_eq!(out.body, "whole\n");
    }
    let (sql, out) = cut.unwrap_or_else(|| {
        panic!(
            "some read went to the node that cuts its answers: {}",
            a.seen().len()
        )
    });
    assert_eq!(out.status, 200, "the head had gone out");
    assert!(out.body.starts_with("partial"), "{:?}", out.body);
    assert!(
        !b.seen().iter().any(|s| s.body == sql.as_bytes()),
        "an answer that had started is never sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_probes_hang_is_taken_out_and_back() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::ok("a\n")).await;
    let b = FakeClickHouse::start(|_| Reply::ok("b\n")).await;
    let p = TestProxy::start(&fake::config(&[a.port(), b.port()], "")).await;
    a.hang_probes();
    // probe_timeout 150 ms, fall 2: down within about a second.
    wait_health(&p, a.port(), "down").await;
    let before = a.seen().len();
    for i in 0..20 {
        let out = read(&p.url(), &format!("SELECT {i}")).await;
        assert_eq!(out.body, "b\n");
    }
    assert_eq!(a.seen().len(), before, "no read went to the hung node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_sniffed_and_read_only_users_held_to_reads() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|_| Reply::ok("ok\n")).await;
    let p = TestProxy::start(&fake::config(&[a.port()], "")).await;
    let url = p.url();

    // A write in the body, from a read-only user: refused before any node sees it.
    let out = read(&url, "INSERT INTO t VALUES (1)").await;
    assert_eq!(out.status, 403, "{}", out.body);
    assert!(out.body.starts_with("Code: 164."), "{}", out.body);
    assert!(a.seen().is_empty());

    // A read behind comments and parentheses; what goes upstream is the cluster account's.
    let out = curl_ok(&[
        "-sS",
        "-u",
        "bi:bi-pass",
        "-H",
        "X-ClickHouse-Format: TSV",
        &format!("{url}/?max_threads=2"),
        "--data-binary",
        "/* c */ -- x\n (SELECT 1)",
    ])
    .await;
    assert_eq!(out.status, 200, "{}", out.body);
    let s = a.seen().pop().unwrap();
    assert_eq!(s.body, "/* c */ -- x\n (SELECT 1)");
    assert_eq!(s.param("readonly").as_deref(), Some("1"));
    assert_eq!(s.param("max_threads").as_deref(), Some("2"));
    assert!(s.param("query_id").is_some_and(|q| q.len() == 36));
    let basic = format!("Basic {}", base64_encode(b"chgate:fake-password"));
    assert_eq!(s.headers["authorization"], basic.as_str());
    assert_eq!(s.headers["x-clickhouse-format"], "TSV");
    assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");

    // The `query` parameter first, the body appended: a blank comment there defers to it.
    let out = curl_ok(&[
        "-sS",
        "-u",
        "bi:bi-pass",
        &format!("{url}/?query=--+first%0A"),
        "--data-binary",
        "SELECT 2",
    ])
    .await;
    assert_eq!(out.status, 200, "{}", out.body);
    let out = curl_ok(&[
        "-sS",
        "-u",
        "bi:bi-pass",
        &format!("{url}/?query=--+first%0A"),
        "--data-binary",
        "DROP TABLE t",
    ])
    .await;
    assert_eq!(out.status, 403, "{}", out.body);

    // What is not recognisably a read counts as a write.
    let out = read(&url, "SYSTEM FLUSH LOGS").await;
    assert_eq!(out.status, 403, "{}", out.body);

    // A body it cannot read (compressed) is the server's to judge, under readonly=1.
    let seen = a.seen().len();
    let out = curl_ok(&[
        "-sS",
        "-u",
        "bi:bi-pass",
        "-H",
        "Content-Encoding: gzip",
        &url,
        "--data-binary",
        "\u{1f}\u{8b} not really gzip",
    ])
    .await;
    assert_eq!(out.status, 200, "{}", out.body);
    let s = &a.seen()[seen];
    assert_eq!(s.param("readonly").as_deref(), Some("1"));
    assert_eq!(s.headers["content-encoding"], "gzip");

    // A write with its data in the body goes through whole.
    let data = "1\ta\n2\tb\n".repeat(1000);
    let out = write(&url, "INSERT INTO t FORMAT TSV", &data).await;
    assert_eq!(out.status, 200, "{}", out.body);
    let s = a.seen().pop().unwrap();
    assert_eq!(s.body, data.as_bytes());
    assert_eq!(s.query, "INSERT INTO t FORMAT TSV");
    assert!(s.param("readonly").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_counts_come_back_down_however_a_request_ends() {
    let _gauges = GAUGES.write().await;
    let slow = FakeClickHouse::start(|_| Reply::Answer {
        status: 200,
        body: "late\n".into(),
        delay: Duration::from_millis(700),
    })
    .await;
    let p = TestProxy::start(&fake::config(&[slow.port()], "")).await;
    let label = format!("node=\"127.0.0.1:{}\"", slow.port());
    let url = p.url();
    let gauges = |m: &str| {
        (
            metric_sum(m, "chgate_upstream_in_flight_requests", &[&label]),
            metric_sum(m, "chgate_http_in_flight_requests", &[]),
        )
    };
    // Answered.
    let req = tokio::spawn({
        let url = url.clone();
        async move { read(&url, "SELECT 1").await }
    });
    let mut during = (0.0, 0.0);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        during = gauges(&p.metrics().await);
        if during.0 >= 1.0 {
            break;
        }
    }
    assert_eq!(during, (1.0, 1.0), "one request in flight");
    assert_eq!(req.await.unwrap().body, "late\n");
    assert_eq!(gauges(&p.metrics().await), (0.0, 0.0));
    // The client gives up while the node is still working.
    let out = curl_ok(&[
        "-sS",
        "--max-time",
        "0.2",
        "-u",
        "bi:bi-pass",
        &url,
        "--data-binary",
        "SELECT 2",
    ])
    .await;
    assert!(!out.ok);
    let mut after = (1.0, 1.0);
    for _ in 0..40 {
        after = gauges(&p.metrics().await);
        if after == (0.0, 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after, (0.0, 0.0), "released when the client went away");
    // Refused before any node: the frontend's count comes back down too.
    let out = curl_ok(&["-sS", "-u", "bi:wrong", &url, "--data-binary", "SELECT 1"]).await;
    assert_eq!(out.status, 401);
    assert_eq!(gauges(&p.metrics().await), (0.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_frontend_over_an_in_memory_connection() {
    let _gauges = GAUGES.read().await;
    let a = FakeClickHouse::start(|s| Reply::ok(format!("echo {}\n", s.body.len()))).await;
    let p = TestProxy::start(&fake::config(&[a.port()], "")).await;
    let mut client = duplex::http_client(p.frontend.clone()).await;
    let (status, _, body) = duplex::send(
        &mut client,
        http::Request::get("/nope")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.starts_with("There is no handle /nope\n"), "{body}");
    let (status, headers, body) = duplex::send(
        &mut client,
        http::Request::post("/")
            .header("authorization", "Basic !!!")
            .body(Full::new(Bytes::from("SELECT 1")))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(headers["x-clickhouse-exception-code"], "516");
    assert!(headers.contains_key("www-authenticate"));
    assert!(body.contains("(AUTHENTICATION_FAILED)"), "{body}");
    let (status, headers, body) = duplex::send(
        &mut client,
        http::Request::post("/?query_id=mine")
            .header("x-clickhouse-user", "bi")
            .header("x-clickhouse-key", "bi-pass")
            .body(Full::new(Bytes::from("SELECT 1")))
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "echo 8\n"));
    assert_eq!(headers["x-clickhouse-query-id"], "mine");
    let s = a.seen().pop().unwrap();
    assert_eq!(
        s.headers["x-forwarded-for"], "10.9.8.7",
        "the in-memory peer"
    );
    assert!(s.headers.get("x-clickhouse-key").is_none());
}

/// The ingest writer against a shard of two fakes: `a` preferred, `b` a standby that takes
/// a batch only if `a` fails it.
async fn shard_of_two(a: &FakeClickHouse, b: &FakeClickHouse) -> chgate::sink::Target {
    let config: chgate::config::ClusterConfig = toml::from_str(&format!(
        r#"
        shards = [{{ replicas = [{{ host = "127.0.0.1", http_port = {} }}, {{ host = "127.0.0.1", http_port = {}, priority = 1 }}] }}]
        [accounts.ingest]
        user = "chgate"
        password_env = "UNUSED"
        "#,
        a.port(),
        b.port()
    ))
    .unwrap();
    let mut secrets = BTreeMap::new();
    secrets.insert(
        ("fake".to_string(), "ingest".to_string()),
        chgate::secret::Secret::new("fake-password".into()),
    );
    let cluster = Arc::new(chgate::picker::Cluster::new(
        "fake",
        &config,
        &secrets,
        &Default::default(),
        &Default::default(),
    ));
    chgate::sink::Target {
        task: "fake".into(),
        table: "db.t".into(),
        account: cluster.accounts["ingest"].clone(),
        cluster: Arc::new(arc_swap::ArcSwap::new(cluster)),
        insert: chgate::clickhouse::insert::Insert::new("db", "t", "a"),
        pick_api: None,
        insert_timeout: Duration::from_secs(5),
        alter_also: Vec::new(),
    }
}

fn rows(n: u8) -> chgate::sink::Rows {
    let mut r = chgate::sink::Rows::default();
    for i in 0..n {
        r.data.push(i);
        r.end_row();
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_connection_sends_the_insert_again_to_the_same_node() {
    let _gauges = GAUGES.read().await;
    // `a` closes every connection it kept alive when the next request comes on it: what a
    // server ending an idle keep-alive connection just as a request arrives looks like.
    let a = FakeClickHouse::start(|s| {
        if s.nth_on_conn >= 1 {
            Reply::Close
        } else {
            Reply::ok("")
        }
    })
    .await;
    let b = FakeClickHouse::start(|_| Reply::ok("")).await;
    let target = shard_of_two(&a, &b).await;
    let label = format!("node=\"127.0.0.1:{}\"", a.port());
    let stale = |m: &str| {
        metric_sum(
            m,
            "chgate_upstream_errors_total",
            &[&label, "kind=\"stale_connection\""],
        )
    };
    let failures = |m: &str| metric_sum(m, "chgate_ingest_insert_failures_total", &[&label]);
    let m0 = String::from_utf8(chgate::metrics::METRICS.render()).unwrap();
    let stop = chgate::backoff::Stop::default();
    for batch in 0..3u8 {
        let written = target
            .write(
                None,
                Some(1),
                &rows(batch + 1),
                &format!("t:0:{batch}"),
                &stop,
            )
            .await
            .unwrap();
        assert_eq!(written.shard, 1);
        assert!(written.refused.is_empty());
    }
    let seen = a.seen();
    // Batch 0 on connection 0; batches 1 and 2 each first on the kept connection (closed
    // under them), then again on a fresh one.
    let on: Vec<(usize, usize)> = seen.iter().map(|s| (s.conn, s.nth_on_conn)).collect();
    assert_eq!(seen.len(), 5, "{on:?}");
    assert_eq!(seen[1].body, seen[2].body, "the same insert, sent again");
    assert_eq!(seen[3].body, seen[4].body);
    assert_ne!(seen[1].conn, seen[2].conn, "on a fresh connection");
    assert!(b.seen().is_empty(), "never moved to the other replica");
    let m1 = String::from_utf8(chgate::metrics::METRICS.render()).unwrap();
    assert_eq!(stale(&m1) - stale(&m0), 2.0);
    assert_eq!(
        failures(&m1) - failures(&m0),
        0.0,
        "not counted as failures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_closed_unanswered_on_a_fresh_connection_moves_to_another_replica() {
    let _gauges = GAUGES.read().await;
    let closes = Arc::new(AtomicUsize::new(0));
    let a = FakeClickHouse::start({
        let closes = closes.clone();
        move |_| {
            closes.fetch_add(1, Ordering::SeqCst);
            Reply::Close
        }
    })
    .await;
    let b = FakeClickHouse::start(|_| Reply::ok("")).await;
    let target = shard_of_two(&a, &b).await;
    let stop = chgate::backoff::Stop::default();
    let written = target
        .write(None, Some(1), &rows(4), "t:0:9", &stop)
        .await
        .unwrap();
    assert!(written.refused.is_empty());
    assert_eq!(
        closes.load(Ordering::SeqCst),
        1,
        "a fresh connection is not retried"
    );
    assert_eq!(b.seen().len(), 1, "the batch went to the other replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_are_isolated_and_the_rest_written() {
    let _gauges = GAUGES.read().await;
    // The fake refuses any insert holding the byte 3 (a data error), takes the rest.
    let a = FakeClickHouse::start(|s| {
        if s.body.is_empty() {
            return Reply::ok("");
        }
        if unpack(&s.body).contains(&3) {
            Reply::error(
                500,
                "Code: 27, e.displayText() = DB::Exception: Cannot parse input",
            )
        } else {
            Reply::ok("")
        }
    })
    .await;
    let b = FakeClickHouse::start(|_| Reply::ok("")).await;
    let target = shard_of_two(&a, &b).await;
    let stop = chgate::backoff::Stop::default();
    let written = target
        .write(None, Some(1), &rows(6), "t:0:1", &stop)
        .await
        .unwrap();
    let refused: Vec<usize> = written.refused.iter().map(|(row, _)| *row).collect();
    assert_eq!(refused, [3], "{:?}", written.refused);
    assert!(written.refused[0].1.contains("Code: 27"));
    assert!(
        b.seen().is_empty(),
        "a data error is not the node's: no failover"
    );
}

/// An insert body (one block of ClickHouse's compressed format) unpacked: checksum (16
/// bytes), method, compressed size, original size (LE u32 at 21), then the LZ4 block.
fn unpack(body: &[u8]) -> Vec<u8> {
    let size = u32::from_le_bytes(body[21..25].try_into().unwrap()) as usize;
    lz4_flex::block::decompress(&body[25..], size).unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The fake's answer to chgate's `KILL QUERY` for an abandoned attempt (recorded like any
/// request), and `reply` to everything else.
fn killable(
    reply: impl Fn(&fake::Seen) -> Reply + Send + Sync + 'static,
) -> impl Fn(&fake::Seen) -> Reply + Send + Sync + 'static {
    move |seen: &fake::Seen| {
        if seen.body.starts_with(b"KILL QUERY") {
            Reply::ok("")
        } else {
            reply(seen)
        }
    }
}

/// The `KILL QUERY` statements a fake was sent.
fn kills(node: &FakeClickHouse) -> Vec<String> {
    node.seen()
        .iter()
        .filter(|s| s.body.starts_with(b"KILL QUERY"))
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect()
}

fn with_upstream(text: String, settings: &str) -> String {
    text.replace(
        "connect_timeout = \"500ms\"",
        &format!("connect_timeout = \"500ms\"\n{settings}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_still_waiting_is_hedged_and_the_abandoned_query_killed() {
    let _gauges = GAUGES.read().await;
    let hung = FakeClickHouse::start(killable(|_| Reply::Hang)).await;
    let good = FakeClickHouse::start(killable(|_| Reply::ok("1\n"))).await;
    let text = with_upstream(
        fake::config(&[hung.port(), good.port()], ""),
        "hedge = \"always\"\nhedge_after = \"200ms\"",
    );
    let p = TestProxy::start(&text).await;
    for i in 0..12 {
        let started = std::time::Instant::now();
        let out = read(&p.url(), &format!("SELECT {i}")).await;
        assert_eq!((out.status, out.body.as_str()), (200, "1\n"), "read {i}");
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "read {i} took {:?}: the hedge bound is 200 ms",
            started.elapsed()
        );
    }
    let asked = hung
        .seen()
        .iter()
        .filter(|s| s.query.is_empty() && !s.body.starts_with(b"KILL"))
        .count();
    assert!(asked >= 1, "some reads went to the hung node first");
    // Each read the hung node got is killed there by its query id.
    wait_until(
        "the abandoned queries killed",
        Duration::from_secs(5),
        || kills(&hung).len() >= asked,
    )
    .await;
    for read in hung.seen().iter().filter(|s| s.body.starts_with(b"SELECT")) {
        let id = read.param("query_id").unwrap();
        assert!(
            kills(&hung)
                .iter()
                .any(|k| k.contains(&format!("query_id = '{id}'"))),
            "{id} not killed: {:?}",
            kills(&hung)
        );
    }
    assert!(
        kills(&good).is_empty(),
        "the winner's queries are left alone"
    );
    let m = p.metrics().await;
    let hedges = |result: &str| {
        metric_sum(
            &m,
            "chgate_hedges_total",
            &["cluster=\"fake\"", &format!("result=\"{result}\"")],
        )
    };
    assert!(hedges("sent") >= asked as f64, "{m}");
    assert_eq!(hedges("won"), hedges("sent"));
}

/// Hedged reads while a third node of the cluster is down, on fakes saying `version`:
/// (reads the hung node got, `KILL QUERY` it was sent, the metric's withheld kills).
async fn hedged_while_a_node_is_down(version: &str) -> (usize, usize, f64) {
    let hung = FakeClickHouse::start(killable(|_| Reply::Hang)).await;
    let good = FakeClickHouse::start(killable(|_| Reply::ok("1\n"))).await;
    let down = FakeClickHouse::start(killable(|_| Reply::ok("1\n"))).await;
    for node in [&hung, &good, &down] {
        node.set_version(version);
    }
    let text = with_upstream(
        fake::config(&[hung.port(), good.port(), down.port()], ""),
        "hedge = \"always\"\nhedge_after = \"200ms\"",
    );
    let p = TestProxy::start(&text).await;
    down.hang_probes();
    wait_health(&p, down.port(), "down").await;
    for i in 0..12 {
        let out = read(&p.url(), &format!("SELECT {i}")).await;
        assert_eq!((out.status, out.body.as_str()), (200, "1\n"), "read {i}");
    }
    let asked = hung
        .seen()
        .iter()
        .filter(|s| s.body.starts_with(b"SELECT"))
        .count();
    assert!(asked >= 1, "some reads went to the hung node first");
    // Every abandoned read is counted once, sent (in the background, once the node
    // answered the kill), failed or withheld; the hung node's port names it alone.
    let node = format!("node=\"127.0.0.1:{}\"", hung.port());
    let kills_of = |filters: &[&str]| {
        let m = curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
        metric_sum(&m, "chgate_query_kills_total", filters)
    };
    wait_until(
        "every abandoned read's kill counted",
        Duration::from_secs(5),
        || kills_of(&[&node]) >= asked as f64,
    )
    .await;
    let withheld = kills_of(&[&node, "result=\"withheld\""]);
    (asked, kills(&hung).len(), withheld)
}

/// Before 22.9 `KILL QUERY` cancels while holding the server's process list; a killed
/// query waiting on a node that does not answer then stalls every query of the server
/// (seen as a five-minute freeze of the whole stack in the fault run). While a node is
/// down, such a server is sent no kill; a newer one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_kill_goes_to_a_server_it_could_freeze_while_a_node_is_down() {
    let _gauges = GAUGES.read().await;
    let (asked, killed, withheld) = hedged_while_a_node_is_down("18.16.1").await;
    assert_eq!(killed, 0, "18.16: nothing killed while a node is down");
    assert!(withheld >= asked as f64, "{withheld} withheld of {asked}");
    let (asked, killed, withheld) = hedged_while_a_node_is_down("24.8.4.13").await;
    assert!(
        killed >= asked,
        "24.8: {killed} kills for {asked} abandoned reads"
    );
    assert_eq!(withheld, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_without_an_answer_in_time_gets_code_159_and_is_killed() {
    let _gauges = GAUGES.read().await;
    let hung = FakeClickHouse::start(killable(|_| Reply::Hang)).await;
    let text = with_upstream(
        fake::config(&[hung.port()], ""),
        "hedge = \"off\"\nfirst_byte_timeout = \"400ms\"",
    );
    let p = TestProxy::start(&text).await;
    let started = std::time::Instant::now();
    let out = curl_ok(&[
        "-sS",
        "-i",
        "-u",
        "bi:bi-pass",
        &format!("{}/?query=SELECT+1&query_id=slow-1", p.url()),
    ])
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(out.status, 504, "{}", out.body);
    assert!(out.body.contains("Code: 159"), "{}", out.body);
    assert!(out.body.contains("(TIMEOUT_EXCEEDED)"), "{}", out.body);
    assert!(out
        .body
        .to_lowercase()
        .contains("x-clickhouse-exception-code: 159"));
    wait_until("the query killed", Duration::from_secs(5), || {
        kills(&hung).iter().any(|k| k.contains("'slow-1'"))
    })
    .await;
    // A write is never cut by it: it waits for its node.
    let m = p.metrics().await;
    assert!(
        metric_sum(&m, "chgate_http_requests_total", &["status=\"504\""]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_is_counted_as_client_closed_and_its_query_killed() {
    let _gauges = GAUGES.read().await;
    let hung = FakeClickHouse::start(killable(|_| Reply::Hang)).await;
    // Even on a server whose kill holds its process list: every node answers, and a query
    // a client gave up on is most often a heavy one, working.
    hung.set_version("18.16.1");
    let text = with_upstream(fake::config(&[hung.port()], ""), "hedge = \"off\"");
    let p = TestProxy::start(&text).await;
    let out = curl_ok(&[
        "-sS",
        "-m",
        "0.5",
        "-u",
        "bi:bi-pass",
        &format!("{}/?query=SELECT+1&query_id=gone-1", p.url()),
    ])
    .await;
    assert!(!out.ok, "curl gave up");
    wait_until("the request counted", Duration::from_secs(5), || {
        let m = curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
        metric_sum(
            &m,
            "chgate_http_requests_total",
            &["user=\"bi\"", "status=\"client_closed\""],
        ) >= 1.0
    })
    .await;
    wait_until("the query killed", Duration::from_secs(5), || {
        kills(&hung).iter().any(|k| k.contains("'gone-1'"))
    })
    .await;
}
