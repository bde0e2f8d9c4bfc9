//! chgate as a real process: bounded memory while streaming a large result, draining on
//! SIGTERM, reload on SIGHUP, and the command line. Needs `scripts/dev-stack up`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const GIB: u64 = 1 << 30;

#[test]
fn a_gigabyte_streams_through_with_bounded_memory() {
    let p = ProxyProcess::start(&config(&demo_nodes(), ""));
    // RowBinary of UInt64: exactly 8 bytes a row, so the size proves nothing was lost.
    let rows = GIB / 8;
    let url = format!(
        "http://{}/?query=SELECT+number+FROM+system.numbers+LIMIT+{rows}+FORMAT+RowBinary",
        p.http
    );
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "-u",
            "bi:bi-pass",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code}",
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak_rss = 0;
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        peak_rss = peak_rss.max(p.memory_kib().0);
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "1 GiB took over 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, format!("{GIB} 200"), "every byte arrived");
    let (_, hwm) = p.memory_kib();
    eprintln!(
        "1 GiB in {:.1} s; chgate RSS peak sampled {} KiB, high-water mark {} KiB",
        start.elapsed().as_secs_f64(),
        peak_rss,
        hwm
    );
    // A debug build with a full metrics registry idles around 10-20 MiB; buffering any real
    // fraction of the result would blow far past this.
    assert!(
        hwm < 64 * 1024,
        "chgate peaked at {hwm} KiB while streaming 1 GiB"
    );
}

/// An answer in blocks far bigger than the server's usual (`max_block_size` of 4M rows: 64
/// MiB blocks, 64 LZ4 frames each): its fixed-width blocks pass through the native relay as
/// they come, never held whole, compressed or not.
#[test]
fn a_native_answer_of_big_blocks_streams_with_bounded_memory() {
    let text = config(&[("127.0.0.11", 8123)], "").replace(
        "http_listen = \"127.0.0.1:0\"",
        "http_listen = \"127.0.0.1:0\"\nnative_listen = \"127.0.0.1:0\"",
    );
    let p = ProxyProcess::start(&text);
    let native = p.native.expect("a native listener");
    // A first login checks the password hash (Argon2id: ~19 MiB for a moment); the peak
    // measured is the relay's, from after it.
    let warm = Command::new("clickhouse-client")
        .args([
            "--host",
            &native.ip().to_string(),
            "--port",
            &native.port().to_string(),
        ])
        .args(["--user", "bi", "--password", "bi-pass", "-q", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    // 5: the high-water mark starts again from the resident memory now (proc(5)).
    std::fs::write(format!("/proc/{}/clear_refs", p.child.id()), "5").unwrap();
    // RowBinary of two UInt64: 16 bytes a row, so the size proves nothing was lost.
    let rows: u64 = GIB / 2 / 16;
    for compression in ["0", "1"] {
        let script = format!(
            "clickhouse-client --host {} --port {} --user bi --password bi-pass \
             --compression {compression} --max_block_size 4194304 \
             -q 'SELECT number, number * 2 FROM system.numbers LIMIT {rows} FORMAT RowBinary' | wc -c",
            native.ip(),
            native.port()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let out = output_within(child, Duration::from_secs(300), "512 MiB");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (rows * 16).to_string(),
            "every byte arrived (compression {compression})"
        );
        let (_, hwm) = p.memory_kib();
        eprintln!(
            "512 MiB in 64 MiB blocks, compression {compression}, in {:.1} s; chgate high-water mark {hwm} KiB",
            start.elapsed().as_secs_f64()
        );
        // One block held whole would be 64 MiB on its own.
        assert!(
            hwm < 48 * 1024,
            "chgate peaked at {hwm} KiB relaying 64 MiB blocks (compression {compression})"
        );
    }
}

/// Blocks that must be walked value by value (strings) are not held whole either,
/// compressed or not: an answer in blocks of 4M rows (about 70 MiB each) and an INSERT of
/// such blocks from a Native file both pass through the native relay as they come. What
/// the node received is counted and summed by a materialized view.
#[test]
fn native_string_blocks_stream_both_ways_with_bounded_memory() {
    let node = "127.0.0.11";
    let table = unique("strings");
    direct(
        node,
        &format!("CREATE TABLE default.{table} (s String, n UInt64) ENGINE = Null"),
    );
    direct(
        node,
        &format!(
            "CREATE MATERIALIZED VIEW default.{table}_sums ENGINE = SummingMergeTree ORDER BY k \
             AS SELECT 1 AS k, count() AS rows, sum(n) AS total, sum(toUInt64(s) = n) AS same \
             FROM default.{table}"
        ),
    );
    let text = config(&[(node, 8123)], "").replace(
        "http_listen = \"127.0.0.1:0\"",
        "http_listen = \"127.0.0.1:0\"\nnative_listen = \"127.0.0.1:0\"",
    );
    let p = ProxyProcess::start(&text);
    let native = p.native.expect("a native listener");
    let client = |user: &str, compression: u8| {
        format!(
            "clickhouse-client --host {} --port {} --user {user} --password {user}-pass \
             --compression {compression} --max_block_size 4194304",
            native.ip(),
            native.port()
        )
    };
    let run = |script: String, what: &str| {
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = output_within(child, Duration::from_secs(300), what);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // A first login checks the password hash (Argon2id: ~19 MiB for a moment).
    run(
        format!("{} -q 'SELECT 1'", client("bi", 0)),
        "a first query",
    );
    run(
        format!("{} -q 'SELECT 1'", client("etl", 0)),
        "a first query",
    );
    let rows: u64 = 16 << 20;
    let query =
        format!("SELECT toString(number) AS s, number AS n FROM system.numbers LIMIT {rows}");
    let file = tempfile_path("strings").display().to_string();
    for compression in [0, 1] {
        // 5: the high-water mark starts again from the resident memory now (proc(5)).
        std::fs::write(format!("/proc/{}/clear_refs", p.child.id()), "5").unwrap();
        let start = Instant::now();
        let answer = run(
            format!(
                "{} -q '{query} FORMAT Native' | tee {file} | wc -c",
                client("bi", compression)
            ),
            "the answer",
        );
        let (_, hwm) = p.memory_kib();
        eprintln!(
            "compression {compression}: {answer} bytes of String blocks read in {:.1} s; \
             chgate high-water mark {hwm} KiB",
            start.elapsed().as_secs_f64()
        );
        assert!(
            hwm < 48 * 1024,
            "chgate peaked at {hwm} KiB reading String blocks (compression {compression})"
        );
        std::fs::write(format!("/proc/{}/clear_refs", p.child.id()), "5").unwrap();
        let start = Instant::now();
        run(
            format!(
                "{} -q 'INSERT INTO default.{table} FORMAT Native' < {file}",
                client("etl", compression)
            ),
            "the INSERT",
        );
        let (_, hwm) = p.memory_kib();
        eprintln!(
            "compression {compression}: the same blocks inserted in {:.1} s; chgate \
             high-water mark {hwm} KiB",
            start.elapsed().as_secs_f64()
        );
        assert!(
            hwm < 48 * 1024,
            "chgate peaked at {hwm} KiB inserting String blocks (compression {compression})"
        );
        let sums = direct(
            node,
            &format!("SELECT sum(rows), sum(total), sum(same) FROM default.{table}_sums"),
        );
        let times = u64::from(compression) + 1;
        assert_eq!(
            sums.trim(),
            format!(
                "{}\t{}\t{}",
                times * rows,
                times * rows * (rows - 1) / 2,
                times * rows
            ),
            "every row arrived as it was read (compression {compression})"
        );
    }
    let _ = std::fs::remove_file(&file);
    direct(node, &format!("DROP TABLE default.{table}_sums"));
    direct(node, &format!("DROP TABLE default.{table}"));
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let p = ProxyProcess::start(&config(&demo_nodes(), ""));
    let url = format!("http://{}/", p.http);
    // sleep(2.5): the query is in flight when SIGTERM arrives.
    let slow = Command::new("curl")
        .args([
            "-sS",
            "-u",
            "bi:bi-pass",
            &url,
            "--data-binary",
            "SELECT sleep(2.5), 'drained'",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the query is running on a node.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: u32 = NODES
            .iter()
            .map(|n| direct(n, "SELECT count() FROM system.processes WHERE query LIKE '%drained%' AND query NOT LIKE '%processes%'").trim().parse::<u32>().unwrap())
            .sum();
        if running > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "slow query never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    p.signal("TERM");
    let out = slow.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\tdrained\n");
    let mut p = p;
    let status = p.child.wait().unwrap();
    assert!(
        status.success(),
        "chgate exits 0 after draining: {status:?}"
    );
}

#[test]
fn sighup_reloads_users_and_keeps_running_on_a_bad_config() {
    let p = ProxyProcess::start(&config(&demo_nodes(), ""));
    let q = |user: &str| {
        curl(&[
            "-sS",
            "-u",
            user,
            &format!("http://{}/?query=SELECT+1", p.http),
        ])
        .status
    };
    assert_eq!(q("newuser:new-pass"), 401);
    let extra = format!(
        "[users.newuser]\npassword_hash = \"{}\"\ncluster = \"demo\"\naccount = \"chgate\"\n",
        hash("new-pass")
    );
    std::fs::write(&p.config_path, config(&demo_nodes(), &extra)).unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while q("newuser:new-pass") != 200 {
        assert!(Instant::now() < deadline, "reload did not take effect");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken config is refused; the running one stays.
    std::fs::write(&p.config_path, "this is = not [valid").unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
        if metric_sum(&m, "chgate_config_reloads_total", &["result=\"rejected\""]) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "rejected reload not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(q("newuser:new-pass"), 200);
    assert_eq!(q("bi:bi-pass"), 200);
}

/// A node taken out of the config on a reload takes its series with it: its
/// `chgate_node_up` would otherwise stay at its last value, and an alert on it never clear.
#[test]
fn a_node_taken_out_on_a_reload_leaves_no_series_behind() {
    let two = [("127.0.0.11", 8123), ("127.0.0.12", 8123)];
    // A second cluster, which the reload removes whole.
    let spare = format!(
        "[[clusters.spare.shards]]\nreplicas = [{{ host = \"127.0.0.13\", http_port = 8123 }}]\n\
         [clusters.spare.accounts.chgate]\nuser = \"chgate\"\npassword_file = \"{}\"\n",
        secret_file("chgate").display()
    );
    let p = ProxyProcess::start(&config(&two, &spare));
    let hedge_bounds = || -> Vec<String> {
        curl(&["-sS", &format!("http://{}/metrics", p.admin)])
            .body
            .lines()
            .filter(|l| l.starts_with("chgate_hedge_after_seconds{"))
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        hedge_bounds(),
        [
            "chgate_hedge_after_seconds{cluster=\"demo\"}",
            "chgate_hedge_after_seconds{cluster=\"spare\"}"
        ]
    );
    let series_of = |node: &str| -> Vec<String> {
        curl(&["-sS", &format!("http://{}/metrics", p.admin)])
            .body
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("\"{node}")))
            // The clients' history by node stays; the node's own series go.
            .filter(|l| {
                !l.starts_with("chgate_http_request") && !l.starts_with("chgate_native_queries")
            })
            .map(str::to_string)
            .collect()
    };
    let names = |lines: &[String]| -> std::collections::BTreeSet<String> {
        lines
            .iter()
            .map(|l| l.split('{').next().unwrap_or_default().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !names(&series_of("127.0.0.12")).contains("chgate_node_probe_round_trip_seconds") {
        assert!(Instant::now() < deadline, "{:?}", series_of("127.0.0.12"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = names(&series_of("127.0.0.12"));
    for name in ["chgate_node_up", "chgate_node_weight", "chgate_picks_total"] {
        assert!(before.contains(name), "{name} missing: {before:?}");
    }

    std::fs::write(&p.config_path, config(&two[..1], "")).unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !series_of("127.0.0.12").is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            series_of("127.0.0.12")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past a few probe rounds of the node that stays, nothing of the other comes back.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(series_of("127.0.0.12"), Vec::<String>::new());
    let kept = names(&series_of("127.0.0.11"));
    for name in [
        "chgate_node_up",
        "chgate_node_weight",
        "chgate_picks_total",
        "chgate_node_probe_round_trip_seconds",
    ] {
        assert!(kept.contains(name), "{name} of the node kept: {kept:?}");
    }
    // The removed cluster's hedge bound goes; the kept one's stays (its new generation
    // holds it before the old one lets go).
    assert_eq!(
        hedge_bounds(),
        ["chgate_hedge_after_seconds{cluster=\"demo\"}"]
    );
}

/// Runs the chgate binary; returns (success, stderr).
fn chgate(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_reports_every_problem() {
    let path = tempfile_path("bad").with_extension("toml");
    let path_str = path.to_str().unwrap();
    std::fs::write(
        &path,
        r#"
[[clusters.demo.shards]]
replicas = []
[clusters.demo.accounts.chgate]
user = "chgate"
password_env = "CHGATE_SURELY_UNSET_VARIABLE"
[users.bi]
password_hash = "bi-pass"
cluster = "nope"
account = "chgate"
"#,
    )
    .unwrap();
    let (ok, err) = chgate(&["config", "check", path_str]);
    assert!(!ok);
    for expected in [
        "clusters.demo.shards[0].replicas: at least one replica is required",
        "clusters.demo.accounts.chgate: environment variable CHGATE_SURELY_UNSET_VARIABLE is not set",
        "users.bi.password_hash: not a PHC password hash",
        "users.bi.cluster: unknown cluster \"nope\" (known: demo)",
        "4 problems found",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // Syntax errors name the line and column.
    std::fs::write(&path, "[proxy]\nhttp_listen = 8123\n").unwrap();
    let (ok, err) = chgate(&["config", "check", path_str]);
    assert!(!ok);
    assert!(
        err.contains("line 2, column 15") && err.contains("invalid type"),
        "{err}"
    );
    // The proxy refuses to start on it, before binding anything.
    let (ok, err) = chgate(&["proxy", "--config", path_str]);
    assert!(!ok && err.contains("line 2, column 15"), "{err}");
    let _ = std::fs::remove_file(path);
    // The quickstart's bootstrap file and the config it pushes are valid.
    for file in ["/config/local.toml", "/config/local-cluster.toml"] {
        let path = format!("{}{file}", env!("CARGO_MANIFEST_DIR"));
        let (ok, err) = chgate(&["config", "check", &path]);
        assert!(ok, "{file}: {err}");
    }
}

#[test]
fn config_check_tells_the_three_kinds_of_file_apart() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let out = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_chgate"))
            .args(args)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    };
    let (ok, text) = out(&["config", "check", &format!("{dir}/ingest-local.toml")]);
    assert!(
        ok && text.contains("an ingest sidecar's, 3 tasks"),
        "{text}"
    );
    let (ok, text) = out(&["config", "check", &format!("{dir}/cdc-local.toml")]);
    assert!(
        ok && text.contains("a CDC capture's, slot chgate_demo"),
        "{text}"
    );
    // A capture's problems are reported by the capture's own validation.
    let bad = tempfile_path("bad-cdc").with_extension("toml");
    std::fs::write(
        &bad,
        "[postgres]\nhost = \"h\"\nuser = \"u\"\ndbname = \"d\"\n\
         [capture]\nname = \"pg\"\nslot = \"Bad-Slot\"\npublication = \"p\"\ntables = []\nstate_dir = \"s\"\n\
         [kafka]\nbrokers = \"k:9092\"\n",
    )
    .unwrap();
    let (ok, text) = out(&["config", "check", bad.to_str().unwrap()]);
    assert!(!ok, "{text}");
    for expected in ["capture.slot", "capture.tables: name at least one table"] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // --kind overrides the guess: a proxy file read as a capture's fails on its sections.
    let (ok, text) = out(&[
        "config",
        "check",
        "--kind",
        "cdc",
        &format!("{dir}/local.toml"),
    ]);
    assert!(!ok && text.contains("unknown field `proxy`"), "{text}");
    // A sidecar whose clusters come from ZooKeeper is checked offline, all but the names
    // its tasks give to clusters; clusters in the file as well are refused.
    let zk = tempfile_path("ingest-zk").with_extension("toml");
    let text = std::fs::read_to_string(format!("{dir}/ingest-local.toml")).unwrap();
    let without_clusters: String = text
        .split("\n[")
        .filter(|section| !section.starts_with("[clusters.") && !section.starts_with("clusters."))
        .collect::<Vec<_>>()
        .join("\n[");
    let with_source = format!(
        "{without_clusters}\n[config_source]\nzookeeper = [\"127.0.0.1:1\"]\nroot = \"/chgate/local\"\n"
    );
    std::fs::write(&zk, &with_source).unwrap();
    let (ok, text) = out(&["config", "check", zk.to_str().unwrap()]);
    assert!(
        ok && text.contains("clusters from ZooKeeper 127.0.0.1:1/chgate/local"),
        "{text}"
    );
    std::fs::write(
        &zk,
        with_source.replace("batch_rows = 100000", "batch_rows = 0"),
    )
    .unwrap();
    let (ok, text) = out(&["config", "check", zk.to_str().unwrap()]);
    assert!(
        !ok && text.contains("batch_rows, batch_bytes and batch_age"),
        "{text}"
    );
    let original = std::fs::read_to_string(format!("{dir}/ingest-local.toml")).unwrap();
    let both =
        format!("{original}\n[config_source]\nzookeeper = [\"127.0.0.1:1\"]\nroot = \"/r\"\n");
    std::fs::write(&zk, both).unwrap();
    let (ok, text) = out(&["config", "check", zk.to_str().unwrap()]);
    assert!(
        !ok && text.contains("the clusters come from ZooKeeper"),
        "{text}"
    );
    let _ = (std::fs::remove_file(&bad), std::fs::remove_file(&zk));
}

#[test]
fn passwd_makes_a_hash_the_proxy_accepts() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chgate"))
        .args(["passwd", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let extra = format!(
        "[users.made]\npassword_hash = \"{hash}\"\ncluster = \"demo\"\naccount = \"chgate\"\n"
    );
    let p = ProxyProcess::start(&config(&demo_nodes(), &extra));
    let r = curl(&[
        "-sS",
        "-u",
        "made:s3cret pass",
        &format!("http://{}/?query=SELECT+7", p.http),
    ]);
    assert_eq!(r.body, "7\n");
}

#[test]
fn the_reference_config_uses_only_real_keys() {
    // config/example.toml names secrets and TLS files that do not exist here; everything
    // else in it must parse and validate, so the reference cannot drift from the code.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let problems = chgate::config::load(std::path::Path::new(path)).unwrap_err();
    for p in &problems {
        assert!(
            p.key.starts_with("clusters.analytics.accounts.")
                || p.key == "proxy.tls"
                || p.key == "proxy.native_tls"
                || p.key == "admin",
            "unexpected problem in the reference config: {p}"
        );
    }
    assert_eq!(problems.len(), 5, "{problems:?}");
}

#[test]
fn a_pooled_connection_the_server_closed_is_not_used() {
    // Keep idle connections far longer than ClickHouse's keep_alive_timeout (3 s), so the
    // server closes ours while it sits in the pool.
    let text = config(&[("127.0.0.14", 8123)], "").replace(
        "connect_timeout = \"500ms\"",
        "connect_timeout = \"500ms\"\nidle_timeout = \"60s\"",
    );
    let p = ProxyProcess::start(&text);
    let url = format!("http://{}/", p.http);
    let r = curl(&[
        "-sS",
        "-u",
        "etl:etl-pass",
        &url,
        "--data-binary",
        "SELECT 1",
    ]);
    assert_eq!(r.body, "1\n");
    // Wait until the server has closed it: our socket is in CLOSE_WAIT.
    let owner = format!("pid={},", p.child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ss = Command::new("ss")
            .args(["-tnpH", "state", "close-wait"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&ss.stdout)
            .lines()
            .any(|l| l.contains(&owner) && l.contains("127.0.0.14:8123"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ClickHouse never closed the idle connection"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A write (never retried) must not be sent on the dead connection.
    let marker = unique("stale");
    let r = curl(&[
        "-sS",
        "-u",
        "etl:etl-pass",
        &format!("{url}?query=INSERT%20INTO%20demo.events_local%20FORMAT%20TSV"),
        "--data-binary",
        &format!("2026-01-01 00:00:00\t1\t{marker}\t1\n"),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        direct(
            "127.0.0.14",
            &format!("SELECT count() FROM demo.events_local WHERE event = '{marker}'")
        ),
        "1\n"
    );
    let m = curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
    assert_eq!(
        metric_sum(
            &m,
            "chgate_upstream_connections_opened_total",
            &["127.0.0.14:8123"]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "chgate_upstream_errors_total", &[]),
        0.0,
        "{m}"
    );
}

#[test]
fn a_large_upload_streams_through_with_bounded_memory() {
    // 512 MiB of RowBinary UInt64 zeros, uploaded chunked from a pipe, into a Null table
    // on one node: ClickHouse counts the rows, nothing is stored.
    const BYTES: u64 = 512 << 20;
    let node = "127.0.0.14";
    let table = unique("sink");
    direct(
        node,
        &format!("CREATE TABLE default.{table} (x UInt64) ENGINE = Null"),
    );
    let inserted = || -> u64 {
        direct(
            node,
            "SELECT sum(value) FROM system.events WHERE event = 'InsertedRows'",
        )
        .trim()
        .parse()
        .unwrap_or(0)
    };
    let before = inserted();
    let p = ProxyProcess::start(&config(&[(node, 8123)], ""));
    let url = format!(
        "http://{}/?query=INSERT%20INTO%20default.{table}%20FORMAT%20RowBinary",
        p.http
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {BYTES} /dev/zero | curl -sS -u etl:etl-pass -X POST -T - -w '%{{http_code}}' '{url}'"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let out = output_within(child, Duration::from_secs(300), "the upload");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        inserted() - before >= BYTES / 8,
        "ClickHouse received every row"
    );
    let m = curl(&["-sS", &format!("http://{}/metrics", p.admin)]).body;
    assert_eq!(
        metric_sum(
            &m,
            "chgate_http_request_body_bytes_total",
            &["user=\"etl\""]
        ),
        BYTES as f64
    );
    let (_, hwm) = p.memory_kib();
    eprintln!(
        "512 MiB upload in {:.1} s; chgate high-water mark {hwm} KiB",
        start.elapsed().as_secs_f64()
    );
    assert!(
        hwm < 64 * 1024,
        "chgate peaked at {hwm} KiB while streaming 512 MiB in"
    );
    direct(node, &format!("DROP TABLE default.{table}"));
}
