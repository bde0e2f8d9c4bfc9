//! The nodes' own cluster definition in ZooKeeper, against the real stack: the quickstart's
//! ClickHouse nodes include `<remote_servers from_zk="/chgate/local/clickhouse/remote_servers"/>`
//! from their own ensemble (nodes 11 and 12 from A, 13 and 14 from B). A shard added with
//! one `chgate config push` reaches every node's `cluster()` reads without a file edited or
//! a restart, and goes again when it is pushed away; with one replica SIGSTOPped, the
//! elected proxy takes it out of the published cluster, after which Distributed reads sent
//! straight to any healthy node answer, and puts it back once it is healthy again.
//!
//! Both tests publish to the quickstart's root (the nodes read no other), one at a time,
//! and push the quickstart's own config back when they end.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Both tests write the quickstart's root: one at a time.
static ROOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The quickstart's dynamic config, with absolute secret paths (the test's bootstrap file
/// lives elsewhere) and `extra` appended.
fn quickstart(extra: &str) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/local-cluster.toml"
    ))
    .unwrap();
    let text = text.replace(
        "\"../.stack/secrets/chgate.password\"",
        &format!("{:?}", secret_file("chgate")),
    );
    format!("{text}\n{extra}")
}

/// A bootstrap file on the quickstart's root, listeners on free ports.
struct Bootstrap {
    dir: PathBuf,
    path: PathBuf,
}

impl Bootstrap {
    fn new() -> Self {
        let dir = tempfile_path("remote_servers");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bootstrap.toml");
        std::fs::write(
            &path,
            bootstrap_toml("127.0.0.1:2181", "/chgate/local", "cache.toml"),
        )
        .unwrap();
        Self { dir, path }
    }

    /// `chgate config push` of `text`: its output; panics with the reasons if refused.
    fn push(&self, text: &str) -> String {
        let file = self.dir.join(format!("{}.toml", unique("push")));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_chgate"))
            .args(["config", "push", "--config"])
            .arg(&self.path)
            .arg("--file")
            .arg(&file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "push refused: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

impl Drop for Bootstrap {
    /// Leaves the quickstart's config as the quickstart pushes it, with no replica taken
    /// out (should a test have stopped before its keeper put one back).
    fn drop(&mut self) {
        let _ = Command::new(python())
            .args([
                "-c",
                "from kazoo.client import KazooClient\nzk = KazooClient(hosts='127.0.0.1:2181')\nzk.start(timeout=10)\nzk.delete('/chgate/local/clickhouse/removed')\nzk.stop()",
            ])
            .output();
        let file = self.dir.join("restore.toml");
        let _ = std::fs::write(&file, quickstart(""));
        let _ = Command::new(env!("CARGO_BIN_EXE_chgate"))
            .args(["config", "push", "--config"])
            .arg(&self.path)
            .arg("--file")
            .arg(&file)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds for the answer to `sql` on every one of `hosts`.
fn wait_on_nodes(hosts: &[&str], sql: &str, what: &str, check: impl Fn(&str) -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    for host in hosts {
        loop {
            let got = direct_within(host, sql, 5).unwrap_or_default();
            if check(got.trim()) {
                break;
            }
            assert!(
                Instant::now() < end,
                "{host}: timed out waiting for {what}; `{sql}` answers {got:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn extra_cluster(replicas: &[&str]) -> String {
    let shards: Vec<String> = replicas
        .iter()
        .map(|h| format!("{{ replicas = [{{ host = \"{h}\" }}] }}"))
        .collect();
    format!(
        r#"
[clusters.extra]
shards = [{}]
[clusters.extra.accounts.chgate]
user = "chgate"
password_file = {:?}
[clusters.extra.remote_servers]
name = "extra_pair"
password_from_env = "CHGATE_INTERSERVER_PASSWORD"
"#,
        shards.join(", "),
        secret_file("chgate")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_shard_reaches_every_nodes_cluster_reads() {
    let _one = ROOT.lock().await;
    let b = Bootstrap::new();
    let count = "SELECT count() FROM cluster('extra_pair', system.one)";
    let out = b.push(&quickstart(&extra_cluster(&["127.0.0.11"])));
    assert!(
        out.contains("127.0.0.1:2181") && out.contains("127.0.0.1:2182"),
        "published to both ensembles: {out}"
    );
    wait_on_nodes(&NODES, count, "cluster extra_pair with 1 shard", |a| {
        a == "1"
    });
    // One push adds a shard (its replica on ensemble B's side): every node follows.
    b.push(&quickstart(&extra_cluster(&["127.0.0.11", "127.0.0.14"])));
    wait_on_nodes(&NODES, count, "cluster extra_pair with 2 shards", |a| {
        a == "2"
    });
    let hosts = direct(
        "127.0.0.13",
        "SELECT arrayStringConcat(arraySort(groupArray(host_address)), ',') FROM system.clusters WHERE cluster = 'extra_pair'",
    );
    assert_eq!(hosts.trim(), "127.0.0.11,127.0.0.14");
    // Pushed away: gone from every node.
    b.push(&quickstart(""));
    wait_on_nodes(
        &NODES,
        "SELECT count() FROM system.clusters WHERE cluster = 'extra_pair'",
        "cluster extra_pair gone",
        |a| a == "0",
    );
}

/// The root made again (deleted, then pushed anew: its version numbering starts again at
/// 1): ensemble B still holds an element of a higher version of the old numbering, and
/// must take the new one all the same (it was left alone as "newer", and nodes 13/14
/// never saw a change again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_made_again_still_reaches_the_other_ensemble() {
    let _one = ROOT.lock().await;
    let b = Bootstrap::new();
    let count = "SELECT count() FROM cluster('extra_pair', system.one)";
    // A few versions of the old numbering, the last one published everywhere.
    for _ in 0..3 {
        b.push(&quickstart(""));
    }
    b.push(&quickstart(&extra_cluster(&["127.0.0.11"])));
    wait_on_nodes(&NODES, count, "cluster extra_pair with 1 shard", |a| {
        a == "1"
    });
    let deleted = Command::new(python())
        .args([
            "-c",
            "from kazoo.client import KazooClient\nzk = KazooClient(hosts='127.0.0.1:2181')\nzk.start(timeout=10)\nzk.delete('/chgate/local', recursive=True)\nzk.stop()",
        ])
        .output()
        .unwrap();
    assert!(deleted.status.success(), "{deleted:?}");
    let out = b.push(&quickstart(&extra_cluster(&["127.0.0.11", "127.0.0.14"])));
    assert!(!out.contains("left in"), "{out}");
    wait_on_nodes(&NODES, count, "cluster extra_pair with 2 shards", |a| {
        a == "2"
    });
}

/// The quickstart's config with fast probes and a keeper that acts within seconds.
fn fast_keeper() -> String {
    let mut text = quickstart(FAST_PICKER);
    for (from, to) in [
        ("remove_after = \"5s\"", "remove_after = \"2s\""),
        ("restore_after = \"15s\"", "restore_after = \"3s\""),
        (
            "min_removal_interval = \"30s\"",
            "min_removal_interval = \"1s\"",
        ),
    ] {
        assert!(
            text.contains(from),
            "config/local-cluster.toml has no {from}"
        );
        text = text.replace(from, to);
    }
    text
}

fn demo_published_hosts(host: &str) -> Option<String> {
    direct_within(
        host,
        "SELECT arrayStringConcat(arraySort(groupArray(host_address)), ',') FROM system.clusters WHERE cluster = 'demo'",
        5,
    )
    .map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_taken_out_of_the_nodes_cluster_and_put_back() {
    let _one = ROOT.lock().await;
    let b = Bootstrap::new();
    b.push(&fast_keeper());
    let mut proxy = ProxyProcess::start_file(&b.path);
    wait_for_topology(
        proxy.admin,
        "this proxy leading",
        Duration::from_secs(15),
        |t| {
            t["remote_servers"]["this_instance_leads"] == true
                && NODES.iter().all(|h| replica(t, h)["health"] == "up")
        },
    )
    .await;
    let all = "127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14";
    wait_on_nodes(&NODES, "SELECT 1", "nodes up", |a| a == "1");
    assert_eq!(demo_published_hosts("127.0.0.13").as_deref(), Some(all));

    let frozen = Frozen::stop(&[("ch2", "127.0.0.12")]);
    let stopped = Instant::now();
    let t = wait_for_topology(proxy.admin, "12 taken out", Duration::from_secs(20), |t| {
        replica(t, "127.0.0.12")["published"] == false
    })
    .await;
    let taken_out = stopped.elapsed();
    let reason = &t["remote_servers"]["removed"]["demo"]["127.0.0.12:9000"]["reason"];
    assert!(
        reason.as_str().is_some_and(|r| r.starts_with("down")),
        "{t:#}"
    );
    for host in ["127.0.0.11", "127.0.0.13", "127.0.0.14"] {
        let end = Instant::now() + Duration::from_secs(15);
        while demo_published_hosts(host).as_deref() != Some("127.0.0.11,127.0.0.13,127.0.0.14") {
            assert!(Instant::now() < end, "{host} still lists 127.0.0.12");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let applied = stopped.elapsed();
    // Distributed reads straight to each healthy node: none waits for the hung replica.
    let mut times = Vec::new();
    for i in 0..21 {
        let host = ["127.0.0.11", "127.0.0.13", "127.0.0.14"][i % 3];
        let started = Instant::now();
        let got = direct_within(host, "SELECT count() > 0 FROM demo.events", 5);
        times.push((host, started.elapsed(), got.is_some()));
    }
    let slowest = times.iter().map(|t| t.1).max().unwrap();
    eprintln!(
        "12 stopped: out of the proxy's published cluster after {taken_out:?}, of every healthy node's after {applied:?}; 21 direct Distributed reads: {} answered, slowest {slowest:?}",
        times.iter().filter(|t| t.2).count()
    );
    assert!(times.iter().all(|t| t.2), "{times:?}");
    let m = proxy_metrics(&proxy).await;
    assert_eq!(
        metric_sum(
            &m,
            "chgate_remote_servers_changes_total",
            &["cluster=\"demo\"", "action=\"removed\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "chgate_remote_servers_leader", &[]), 1.0);

    drop(frozen); // SIGCONT, then waits until its replicas have their sessions back
    wait_for_topology(proxy.admin, "12 put back", Duration::from_secs(30), |t| {
        replica(t, "127.0.0.12")["published"] == true
    })
    .await;
    for host in NODES {
        let end = Instant::now() + Duration::from_secs(15);
        while demo_published_hosts(host).as_deref() != Some(all) {
            assert!(
                Instant::now() < end,
                "{host} does not list 127.0.0.12 again"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    proxy.stop();
}

async fn proxy_metrics(p: &ProxyProcess) -> String {
    curl_async(vec!["-sS".into(), format!("http://{}/metrics", p.admin)])
        .await
        .body
}
