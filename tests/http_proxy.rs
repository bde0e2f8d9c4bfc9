//! `chgate proxy` over HTTP against the real local cluster, with real clients.
//! Needs `scripts/dev-stack up`.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

async fn get(proxy: &TestProxy, args: &[&str]) -> CurlOutput {
    let mut a = s(&["-sS"]);
    a.extend(s(args));
    a = a
        .into_iter()
        .map(|x| x.replace("{proxy}", &proxy.url()))
        .collect();
    curl_async(a).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_auth_methods_work() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let basic = get(&p, &["-u", "bi:bi-pass", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(
        (basic.status, basic.body.as_str()),
        (200, "1\n"),
        "{}",
        basic.body
    );
    let headers = get(
        &p,
        &[
            "-H",
            "X-ClickHouse-User: bi",
            "-H",
            "X-ClickHouse-Key: bi-pass",
            "{proxy}/?query=SELECT+2",
        ],
    )
    .await;
    assert_eq!((headers.status, headers.body.as_str()), (200, "2\n"));
    let params = get(&p, &["{proxy}/?user=etl&password=etl-pass&query=SELECT+3"]).await;
    assert_eq!((params.status, params.body.as_str()), (200, "3\n"));
    // POST with the query in the body.
    let post = get(
        &p,
        &[
            "-u",
            "etl:etl-pass",
            "{proxy}/",
            "--data-binary",
            "SELECT 4",
        ],
    )
    .await;
    assert_eq!((post.status, post.body.as_str()), (200, "4\n"));
    let ping = get(&p, &["{proxy}/ping"]).await;
    assert_eq!(ping.body, "Ok.\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_look_the_same() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let wrong = get(&p, &["-u", "bi:nope", "{proxy}/?query=SELECT+1"]).await;
    let unknown = get(&p, &["-u", "mallory:nope", "{proxy}/?query=SELECT+1"]).await;
    for (who, r) in [("bi", &wrong), ("mallory", &unknown)] {
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r
            .headers
            .to_lowercase()
            .contains("x-clickhouse-exception-code: 516"));
        assert_eq!(
            r.body,
            format!("Code: 516. DB::Exception: {who}: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED) (version chgate {})\n", env!("CARGO_PKG_VERSION"))
        );
    }
    // Mixing two methods is refused, as ClickHouse does.
    let both = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/?user=bi&password=bi-pass&query=SELECT+1",
        ],
    )
    .await;
    assert_eq!(both.status, 401);
    assert!(
        both.body.contains("more than one authentication method"),
        "{}",
        both.body
    );
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_auth_failures_total",
            &["reason=\"bad_password\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "chgate_auth_failures_total",
            &["reason=\"unknown_user\""]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_user_cannot_write_but_can_read_with_settings() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let marker = unique("ro");
    for (how, args) in [
        ("body", vec!["-u", "bi:bi-pass", "{proxy}/"]),
        (
            "param",
            vec![
                "-u",
                "bi:bi-pass",
                "{proxy}/?query=INSERT%20INTO%20demo.events%20FORMAT%20TSV",
            ],
        ),
    ] {
        let data = if how == "body" {
            format!("INSERT INTO demo.events VALUES (now(), 1, '{marker}', 1)")
        } else {
            format!("2026-01-01 00:00:00\t1\t{marker}\t1\n")
        };
        let mut args = args.clone();
        args.extend(["--data-binary", data.as_str()]);
        let r = get(&p, &args).await;
        assert_eq!(r.status, 403, "{how}: {}", r.body);
        assert!(r.body.starts_with("Code: 164."), "{how}: {}", r.body);
    }
    // A comment or parentheses do not hide a write.
    let sneaky = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/",
            "--data-binary",
            "/* SELECT */ DROP TABLE demo.events",
        ],
    )
    .await;
    assert_eq!(sneaky.status, 403);
    // The client cannot lift the server-side guard either.
    let lift = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/?readonly=0",
            "--data-binary",
            "SELECT value FROM system.settings WHERE name = 'readonly'",
        ],
    )
    .await;
    assert_eq!(
        (lift.status, lift.body.as_str()),
        (200, "1\n"),
        "{}",
        lift.body
    );
    // Settings pass through: a result limit the server enforces.
    let limited = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/?max_result_rows=5&result_overflow_mode=throw",
            "--data-binary",
            "SELECT number FROM system.numbers LIMIT 10",
        ],
    )
    .await;
    assert_ne!(limited.status, 200);
    assert!(limited.body.contains("Code: 396"), "{}", limited.body);
    let threads = get(&p, &["-u", "bi:bi-pass", "{proxy}/?max_threads=3&query=SELECT%20value%20FROM%20system.settings%20WHERE%20name%3D'max_threads'"]).await;
    assert_eq!(threads.body, "3\n");
    // readonly=1 upstream (the default) also refuses a SETTINGS clause: ClickHouse's
    // message comes back as it sent it. upstream_readonly = 2 allows it.
    let settings_clause = "SELECT 5 SETTINGS max_threads = 1";
    let strict = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/",
            "--data-binary",
            settings_clause,
        ],
    )
    .await;
    assert!(strict.body.contains("Code: 164"), "{}", strict.body);
    let extra = format!(
        "[users.grafana]\npassword_hash = \"{}\"\ncluster = \"demo\"\naccount = \"chgate\"\nreadonly = true\nupstream_readonly = 2\n",
        hash("grafana-pass")
    );
    let p2 = TestProxy::start(&config(&demo_nodes(), &extra)).await;
    let relaxed = get(
        &p2,
        &[
            "-u",
            "grafana:grafana-pass",
            "{proxy}/",
            "--data-binary",
            settings_clause,
        ],
    )
    .await;
    assert_eq!(relaxed.body, "5\n");
    let write = get(
        &p2,
        &[
            "-u",
            "grafana:grafana-pass",
            "{proxy}/?query=INSERT%20INTO%20demo.events%20FORMAT%20TSV",
            "--data-binary",
            "x",
        ],
    )
    .await;
    assert_eq!(write.status, 403);
    // A HEAD with a body chgate cannot look into (ClickHouse's compressed format): the
    // server makes only GETs read-only, so chgate's readonly goes on it too.
    let insert = format!("INSERT INTO demo.events VALUES (now(), 1, '{marker}', 1)");
    let body = chgate::clickhouse::compress::lz4_block(insert.as_bytes()).unwrap();
    let mut head = format!(
        "HEAD /?decompress=1 HTTP/1.1\r\nHost: x\r\nX-ClickHouse-User: bi\r\n\
         X-ClickHouse-Key: bi-pass\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(&body);
    let answer = tokio::task::spawn_blocking({
        let addr = p.http;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&head).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        }
    })
    .await
    .unwrap();
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The server would run the first `query`, chgate would check another: refused.
    let twice = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/?query=INSERT%20INTO%20demo.events%20FORMAT%20TSV&query=SELECT%201",
            "--data-binary",
            "2026-01-01 00:00:00\t1\tx\t1\n",
        ],
    )
    .await;
    assert_eq!(twice.status, 400, "{}", twice.body);
    assert!(
        twice.body.contains("given more than once"),
        "{}",
        twice.body
    );
    // Form fields would be settings applied after chgate's readonly.
    let form = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/?query=SELECT%201",
            "-F",
            "readonly=0",
        ],
    )
    .await;
    assert_eq!(form.status, 400, "{}", form.body);
    assert!(form.body.contains("multipart"), "{}", form.body);
    // Nothing was written.
    let count = direct(
        NODES[0],
        &format!("SELECT count() FROM demo.events WHERE event = '{marker}'"),
    );
    assert_eq!(count, "0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_id_is_kept_or_generated_and_reaches_the_server() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let id = unique("qid");
    let r = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            &format!("{{proxy}}/?query_id={id}"),
            "--data-binary",
            &format!("SELECT query_id, user FROM system.processes WHERE query_id = '{id}'"),
        ],
    )
    .await;
    assert_eq!(r.body, format!("{id}\tchgate\n"));
    assert!(r
        .headers
        .to_lowercase()
        .contains(&format!("x-clickhouse-query-id: {id}")));
    let marker = unique("gen");
    let r = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "{proxy}/",
            "--data-binary",
            &format!("SELECT query_id FROM system.processes WHERE query LIKE '%{marker}%'"),
        ],
    )
    .await;
    let generated = r.body.trim().to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert!(r
        .headers
        .to_lowercase()
        .contains(&format!("x-clickhouse-query-id: {generated}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stick_to_one_node_and_are_private_to_a_user() {
    let extra = format!(
        "[users.etl2]\npassword_hash = \"{}\"\ncluster = \"demo\"\naccount = \"chgate\"\n",
        hash("etl2-pass")
    );
    let p = TestProxy::start(&config(&demo_nodes(), &extra)).await;
    let session = unique("sess");
    let url = format!("{{proxy}}/?session_id={session}");
    let r = get(
        &p,
        &[
            "-u",
            "etl:etl-pass",
            &url,
            "--data-binary",
            "CREATE TEMPORARY TABLE t (x UInt8)",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for i in 0..8 {
        let r = get(
            &p,
            &[
                "-u",
                "etl:etl-pass",
                &url,
                "--data-binary",
                &format!("INSERT INTO t VALUES ({i})"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = get(
        &p,
        &[
            "-u",
            "etl:etl-pass",
            &url,
            "--data-binary",
            "SELECT count() FROM t",
        ],
    )
    .await;
    assert_eq!(
        r.body, "8\n",
        "every request of the session reached the same node"
    );
    // Another user with the same session id does not see it.
    let r = get(
        &p,
        &[
            "-u",
            "etl2:etl2-pass",
            &url,
            "--data-binary",
            "SELECT count() FROM t",
        ],
    )
    .await;
    assert_ne!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_passes_through_untouched() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let r = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "-H",
            "Accept-Encoding: gzip",
            "{proxy}/?enable_http_compression=1",
            "--data-binary",
            "SELECT 'hello'",
            "--compressed",
        ],
    )
    .await;
    assert_eq!(r.body, "hello\n");
    assert!(
        r.headers.to_lowercase().contains("content-encoding: gzip"),
        "{}",
        r.headers
    );
    // A gzip request body (the query inside it) for a read-write user.
    let gz = tempfile_path("gz");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf \"SELECT 'zipped'\" | gzip > {}",
            gz.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let r = get(
        &p,
        &[
            "-u",
            "etl:etl-pass",
            "-H",
            "Content-Encoding: gzip",
            "{proxy}/",
            "--data-binary",
            &format!("@{}", gz.display()),
        ],
    )
    .await;
    assert_eq!(r.body, "zipped\n", "{}", r.body);
    // Read-only users may send one too: the server-side readonly guard still applies.
    let r = get(
        &p,
        &[
            "-u",
            "bi:bi-pass",
            "-H",
            "Content-Encoding: gzip",
            "{proxy}/",
            "--data-binary",
            &format!("@{}", gz.display()),
        ],
    )
    .await;
    assert_eq!(r.body, "zipped\n", "{}", r.body);
    let _ = std::fs::remove_file(gz);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_client() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let secret = secret("chgate");
    for args in [
        vec!["-u", "bi:bi-pass", "{proxy}/?query=SELECT+1"],
        vec!["-u", "bi:bi-pass", "{proxy}/?query=SELEC+1"],
        vec!["-u", "bi:wrong", "{proxy}/?query=SELECT+1"],
        vec![
            "-u",
            "etl:etl-pass",
            "{proxy}/?query=SELECT+*+FROM+nope.nope",
        ],
    ] {
        let r = get(&p, &args).await;
        assert!(!r.body.contains(&secret) && !r.headers.contains(&secret));
        assert!(!r.body.contains("bi-pass") && !r.body.contains("etl-pass"));
    }
    // ClickHouse's own errors come back as it sent them.
    let r = get(&p, &["-u", "etl:etl-pass", "{proxy}/?query=SELEC+1"]).await;
    assert_eq!(r.status, 400);
    assert!(r.body.starts_with("Code: 62"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_refuses_other_addresses() {
    let extra = format!(
        "[users.office]\npassword_hash = \"{}\"\ncluster = \"demo\"\naccount = \"chgate\"\nnetworks = [\"10.0.0.0/8\"]\n",
        hash("office-pass")
    );
    let p = TestProxy::start(&config(&demo_nodes(), &extra)).await;
    let r = get(&p, &["-u", "office:office-pass", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(r.status, 403);
    assert!(r.body.starts_with("Code: 195."), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_are_slowed_down() {
    let extra = "[auth]\nfree_failures = 2\nbase_delay = \"400ms\"\nmax_delay = \"1s\"\n";
    let p = TestProxy::start(&config(&demo_nodes(), extra)).await;
    for _ in 0..3 {
        get(&p, &["-u", "bi:wrong", "{proxy}/?query=SELECT+1"]).await;
    }
    let start = Instant::now();
    let r = get(&p, &["-u", "bi:wrong", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(r.status, 401);
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    // A correct login after the delay clears the count.
    let ok = get(&p, &["-u", "bi:bi-pass", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(ok.status, 200);
    let start = Instant::now();
    get(&p, &["-u", "bi:wrong", "{proxy}/?query=SELECT+1"]).await;
    assert!(start.elapsed() < Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refusing_connections_are_skipped() {
    // 127.0.0.99 has nothing listening: connections are refused. The probes are slowed
    // down so that what takes it out is the requests' own connection backoff (with the
    // default probes, they could take it out before any request picked it: seen once).
    let mut nodes = vec![("127.0.0.99", 8123)];
    nodes.extend(demo_nodes());
    let slow_probes = "[picker]\nprobe_interval = \"30s\"\nprobe_retry_interval = \"30s\"\n";
    let p = TestProxy::start(&config(&nodes, slow_probes)).await;
    let connect_errors = |m: &str| {
        metric_sum(
            m,
            "chgate_upstream_errors_total",
            &["127.0.0.99:8123", "kind=\"connect\""],
        )
    };
    // Every request succeeds; more are sent until one was picked for the dead node (each
    // has about a one-in-five chance).
    let mut sent = 0;
    let mut m = String::new();
    while sent < 20 || connect_errors(&m) < 1.0 {
        assert!(sent < 400, "the dead node was never tried");
        for i in sent..sent + 20 {
            let r = get(
                &p,
                &[
                    "-u",
                    "etl:etl-pass",
                    "{proxy}/",
                    "--data-binary",
                    &format!("SELECT {i}"),
                ],
            )
            .await;
            assert_eq!((r.status, r.body.clone()), (200, format!("{i}\n")));
        }
        sent += 20;
        m = p.metrics().await;
    }
    assert!(connect_errors(&m) >= 1.0, "{m}");
    assert_eq!(
        metric_sum(&m, "chgate_upstream_node_down", &["127.0.0.99:8123"]),
        1.0
    );
    // With no node at all, a clear error that names no address.
    let p = TestProxy::start(&config(&[("127.0.0.99", 8123)], "")).await;
    let r = get(&p, &["-u", "etl:etl-pass", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .starts_with("Code: 279. DB::Exception: No node of cluster demo"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("127.0.0.99"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_user_status_and_node() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    for _ in 0..5 {
        get(&p, &["-u", "bi:bi-pass", "{proxy}/?query=SELECT+1"]).await;
    }
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_http_requests_total",
            &["user=\"bi\"", "status=\"200\""]
        ) >= 5.0
    );
    assert!(
        metric_sum(
            &m,
            "chgate_http_request_duration_seconds_count",
            &["user=\"bi\""]
        ) >= 5.0
    );
    assert!(
        metric_sum(
            &m,
            "chgate_http_response_body_bytes_total",
            &["user=\"bi\""]
        ) >= 10.0
    );
    assert!(m.contains("# HELP chgate_http_requests_total"));
    let ready = get(&p, &[&format!("http://{}/readyz", p.admin)]).await;
    assert_eq!(ready.body, "ready\n");
}

#[derive(clickhouse::Row, serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Event {
    ts: u32,
    user_id: u64,
    event: String,
    value: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clickhouse_crate_inserts_and_reads_through_the_proxy() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let marker = unique("crate");
    let writer = clickhouse::Client::default()
        .with_url(p.url())
        .with_user("etl")
        .with_password("etl-pass")
        .with_database("demo")
        .with_validation(false)
        .with_setting("insert_distributed_sync", "1");
    let mut insert = writer.insert::<Event>("events").await.unwrap();
    for i in 0..1000u64 {
        insert
            .write(&Event {
                ts: 1_767_225_600 + i as u32,
                user_id: i,
                event: marker.clone(),
                value: i as f64 * 0.5,
            })
            .await
            .unwrap();
    }
    insert.end().await.unwrap();

    let reader = clickhouse::Client::default()
        .with_url(p.url())
        .with_user("bi")
        .with_password("bi-pass")
        .with_database("demo")
        .with_validation(false);
    // Replication to the other replica of each shard is asynchronous: wait for all rows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows: Vec<Event> = reader
            .query("SELECT ts, user_id, event, value FROM demo.events WHERE event = ? ORDER BY user_id")
            .bind(&marker)
            .fetch_all()
            .await
            .unwrap();
        if rows.len() == 1000 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 1000);
    assert_eq!(
        rows[999],
        Event {
            ts: 1_767_225_600 + 999,
            user_id: 999,
            event: marker.clone(),
            value: 499.5
        }
    );
    // The read-only user cannot insert with the crate either.
    let mut denied = reader.insert::<Event>("events").await.unwrap();
    denied
        .write(&Event {
            ts: 0,
            user_id: 0,
            event: marker.clone(),
            value: 0.0,
        })
        .await
        .unwrap();
    let err = denied.end().await.unwrap_err().to_string();
    assert!(err.contains("164") || err.contains("readonly"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_the_same_interface() {
    let (cert, key) = self_signed_certificate("tls");
    let extra = format!(
        "[proxy.tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    // [proxy.tls] must be inside [proxy]: put it right after that table.
    let text = config(&demo_nodes(), "").replace("[admin]", &format!("{extra}[admin]"));
    let p = TestProxy::start(&text).await;
    let https = p.https.expect("https listener");
    let r = curl_async(s(&[
        "-sS",
        "--cacert",
        cert.to_str().unwrap(),
        "-u",
        "bi:bi-pass",
        &format!("https://127.0.0.1:{}/?query=SELECT+42", https.port()),
    ]))
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "42\n"), "{}", r.body);
    // Plain HTTP to the TLS port fails cleanly; the listener keeps working.
    let r = curl_async(s(&[
        "-sS",
        "--max-time",
        "5",
        &format!("http://127.0.0.1:{}/ping", https.port()),
    ]))
    .await;
    assert_ne!(r.status, 200);
    let r = curl_async(s(&[
        "-sS",
        "--cacert",
        cert.to_str().unwrap(),
        &format!("https://127.0.0.1:{}/ping", https.port()),
    ]))
    .await;
    assert_eq!(r.body, "Ok.\n");

    // A renewed certificate is picked up from the files without a restart (the proxy
    // looks every few seconds; the test asks at once); a half-written one is not, and the
    // one in use stays.
    let (renewed, renewed_key) = self_signed_certificate("tls-renewed");
    let ping = |ca: &std::path::Path| {
        curl_async(s(&[
            "-sS",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://127.0.0.1:{}/ping", https.port()),
        ]))
    };
    let old = cert.with_file_name("old.pem");
    std::fs::copy(&cert, &old).unwrap();
    std::fs::copy(&renewed, &cert).unwrap();
    std::fs::copy(&renewed_key, &key).unwrap();
    assert!(chgate::tls::reload_changed() >= 1, "the renewal was loaded");
    assert_eq!(
        ping(&renewed).await.body,
        "Ok.\n",
        "new handshakes get the new one"
    );
    assert_ne!(ping(&old).await.status, 200, "the old certificate is gone");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ntruncat").unwrap();
    chgate::tls::reload_changed();
    assert_eq!(
        ping(&renewed).await.body,
        "Ok.\n",
        "a broken file changes nothing"
    );
    let _ = std::fs::remove_dir_all(cert.parent().unwrap());
    let _ = std::fs::remove_dir_all(renewed.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_errors_not_crashes() {
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let r = get(
        &p,
        &["-H", "Authorization: Basic %%%", "{proxy}/?query=SELECT+1"],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("not valid HTTP Basic"), "{}", r.body);
    let r = get(&p, &["{proxy}/no/such/handler"]).await;
    assert_eq!(r.status, 404);
    // Raw garbage on the socket.
    let addr = p.http;
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"\x00\x01\x02 NOT HTTP\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    })
    .await
    .unwrap();
    let r = get(&p, &["-u", "bi:bi-pass", "{proxy}/?query=SELECT+1"]).await;
    assert_eq!(r.body, "1\n", "still serving");
}
