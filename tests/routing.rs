//! The shard picker end to end, against the real stack: nodes stopped, a ZooKeeper ensemble
//! stopped, a replica made to lag. The proxy's reads and the pick API must both route around
//! each, say why, and take the node back once it recovers.
//!
//! Tests that disrupt the stack take `SERIAL`, and each undoes its disruption in a guard's
//! `Drop`, so a failing assertion does not leave a node stopped for the tests after it.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fast probes so the tests run in seconds.
const PICKER: &str = FAST_PICKER;

fn dev_stack_up() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-stack");
    let out = Command::new(script).arg("up").output().unwrap();
    assert!(
        out.status.success(),
        "dev-stack up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `undo` when dropped, even if the test fails.
struct Undo<F: FnMut()>(F);

impl<F: FnMut()> Drop for Undo<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Every node probed at least once and up.
async fn all_probed(admin: std::net::SocketAddr) {
    wait_for_topology(admin, "every node probed", Duration::from_secs(10), |t| {
        NODES.iter().all(|h| {
            let r = replica(t, h);
            r["health"] == "up" && r["probe"]["probes"].as_u64() > Some(0)
        })
    })
    .await;
}

/// `n` reads through the proxy, 4 at a time; all must succeed. They read the local table:
/// a `Distributed` table would have ClickHouse itself fan out to the other shard and pick
/// a replica there, stopped or not, which is not what these tests are about.
async fn reads(proxy: &TestProxy, n: usize) {
    let url = format!("{}/", proxy.url());
    for chunk in 0..n.div_ceil(4) {
        let mut tasks = Vec::new();
        for k in 0..4 {
            let sql = format!("SELECT {}, count() FROM demo.events_local", chunk * 4 + k);
            tasks.push(curl_async(vec![
                "-sS".into(),
                "-m".into(),
                "20".into(),
                "-u".into(),
                "bi:bi-pass".into(),
                url.clone(),
                "--data-binary".into(),
                sql,
            ]));
        }
        for t in tasks {
            let out = t.await;
            assert_eq!(out.status, 200, "a read failed: {}", out.body);
        }
    }
}

/// API picks: how often each host was returned.
async fn picks(admin: std::net::SocketAddr, query: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (status, v) = admin_json(admin, &format!("/v1/pick?{query}")).await;
        assert_eq!(status, 200, "{v}");
        *counts
            .entry(v["host"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

fn node_picks(metrics: &str, host: &str) -> f64 {
    metric_sum(
        metrics,
        "chgate_picks_total",
        &[&format!("node=\"{host}:8123\"")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_is_routed_around_and_ramps_back() {
    let _serial = SERIAL.lock().await;
    let p = TestProxy::start(&grouped_config(PICKER)).await;
    all_probed(p.admin).await;
    let victim = NODES[3];
    let frozen = Frozen::stop(&[("ch4", victim)]);
    let stopped = Instant::now();

    // Within two probe intervals it is out, with the reason.
    let t = wait_for_topology(p.admin, "ch4 down", Duration::from_secs(2), |t| {
        replica(t, victim)["health"] == "down"
    })
    .await;
    let detected = stopped.elapsed();
    let r = replica(&t, victim);
    assert_eq!(r["read"]["weight"], 0);
    assert!(
        r["read"]["excluded"].as_str().unwrap().contains("down"),
        "{r}"
    );
    assert!(r["probe"]["last_error"]
        .as_str()
        .unwrap()
        .contains("no answer"));

    // No read and no pick goes to it, and reads keep succeeding.
    let before = node_picks(&p.metrics().await, victim);
    reads(&p, 40).await;
    for query in [
        "cluster=demo&purpose=read",
        "cluster=demo&purpose=write",
        "cluster=demo&purpose=write&shard=2",
    ] {
        let c = picks(p.admin, query, 40).await;
        assert!(!c.contains_key(victim), "{query}: {c:?}");
    }
    assert_eq!(node_picks(&p.metrics().await, victim), before);
    let m = p.metrics().await;
    assert_eq!(
        metric_sum(&m, "chgate_node_up", &[&format!("node=\"{victim}:8123\"")]),
        0.0
    );

    // Back: up after `rise` probes, at a reduced weight while it ramps, then full.
    drop(frozen);
    let t = wait_for_topology(p.admin, "ch4 back up", Duration::from_secs(5), |t| {
        replica(t, victim)["health"] == "up"
    })
    .await;
    let ramping = replica(&t, victim);
    let twin = replica(&t, NODES[2]);
    assert!(ramping["ramp"].as_f64().unwrap() < 0.6, "{ramping}");
    assert!(
        ramping["read"]["weight"].as_u64().unwrap() * 2 < twin["read"]["weight"].as_u64().unwrap(),
        "a recovering node starts well below its twin: {ramping} vs {twin}"
    );
    wait_for_topology(p.admin, "ch4 at full weight", Duration::from_secs(6), |t| {
        replica(t, victim)["ramp"] == 1.0
    })
    .await;
    let before = node_picks(&p.metrics().await, victim);
    reads(&p, 40).await;
    let c = picks(p.admin, "cluster=demo&purpose=read&shard=2", 40).await;
    assert!(c.contains_key(victim), "{c:?}");
    assert!(node_picks(&p.metrics().await, victim) > before);
    eprintln!("ch4 SIGSTOP detected after {detected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_zookeeper_a_shard_takes_no_writes_but_serves_reads() {
    let _serial = SERIAL.lock().await;
    let p = TestProxy::start(&grouped_config(PICKER)).await;
    all_probed(p.admin).await;
    send_signal(&stack_pid("zk-b"), "TERM");
    let _restart = Undo(dev_stack_up);

    // The pick API refuses shard 2 for writes, naming the ensemble.
    let end = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        let (status, v) = admin_json(p.admin, "/v1/pick?cluster=demo&purpose=write&shard=2").await;
        if status == 503 && v["reason"].as_str().unwrap_or("").contains("ZooKeeper") {
            break v;
        }
        assert!(
            Instant::now() < end,
            "shard 2 still takes writes: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refusal["shard"], 2);
    assert_eq!(refusal["purpose"], "write");
    assert_eq!(refusal["nodes"].as_array().unwrap().len(), 2, "{refusal}");
    assert!(refusal["error"].as_str().unwrap().contains("shard 2"));
    let (_, t) = admin_json(p.admin, "/v1/topology").await;
    assert_eq!(t["clusters"][0]["shard_groups"][1]["healthy"], false, "{t}");

    // Unpinned writes go to shard 1; reads, shard 2 included, still work.
    let c = picks(p.admin, "cluster=demo&purpose=write", 30).await;
    assert!(c.keys().all(|h| h == NODES[0] || h == NODES[1]), "{c:?}");
    let c = picks(p.admin, "cluster=demo&purpose=read&shard=2", 10).await;
    assert!(!c.is_empty());
    reads(&p, 20).await;
    // The proxy sends writes where they can land: an insert into the local table works.
    let tag = unique("zkb");
    for i in 0..6 {
        let out = curl_async(vec![
            "-sS".into(),
            "-u".into(),
            "etl:etl-pass".into(),
            format!("{}/", p.url()),
            "--data-binary".into(),
            format!("INSERT INTO demo.events_local VALUES (now(), {i}, '{tag}', 1)"),
        ])
        .await;
        assert_eq!(out.status, 200, "insert {i}: {}", out.body);
    }

    // The ensemble comes back: so do writes.
    dev_stack_up();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = admin_json(p.admin, "/v1/pick?cluster=demo&purpose=write&shard=2").await;
        if status == 200 {
            assert_eq!(v["shard"], 2);
            break;
        }
        assert!(Instant::now() < end, "shard 2 never took writes again: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_takes_no_reads() {
    let _serial = SERIAL.lock().await;
    let p = TestProxy::start(&grouped_config(PICKER)).await;
    all_probed(p.admin).await;
    let (leader, lagger) = (NODES[0], NODES[1]);
    direct(lagger, "SYSTEM STOP FETCHES demo.events_local");
    let _start = Undo(|| {
        direct(lagger, "SYSTEM START FETCHES demo.events_local");
    });
    let tag = unique("lag");
    direct(
        leader,
        &format!("INSERT INTO demo.events_local VALUES (now(), 1, '{tag}', 1)"),
    );

    // Right after the stack starts, a replica that has not loaded its queue yet is
    // excluded too (ClickHouse reports its delay since the epoch): wait for the lag.
    let t = wait_for_topology(
        p.admin,
        "ch2 excluded for lag",
        Duration::from_secs(15),
        |t| {
            let r = replica(t, lagger);
            r["read"]["weight"] == 0
                && r["read"]["excluded"]
                    .as_str()
                    .is_some_and(|why| why.contains("replication delay"))
        },
    )
    .await;
    let r = replica(&t, lagger);
    let why = r["read"]["excluded"].as_str().unwrap();
    assert!(why.contains("replication delay"), "{r}");
    assert!(r["probe"]["figures"]["replica_delay_s"].as_u64().unwrap() > 2);
    assert!(
        r["write"]["weight"].as_u64().unwrap() > 0,
        "a lagging replica still takes writes: {r}"
    );

    let before = node_picks(&p.metrics().await, lagger);
    reads(&p, 20).await;
    let c = picks(p.admin, "cluster=demo&purpose=read&shard=1", 30).await;
    assert_eq!(c.keys().collect::<Vec<_>>(), [leader], "{c:?}");
    assert_eq!(node_picks(&p.metrics().await, lagger), before);

    direct(lagger, "SYSTEM START FETCHES demo.events_local");
    wait_for_topology(p.admin, "ch2 caught up", Duration::from_secs(30), |t| {
        replica(t, lagger)["read"]["weight"].as_u64() > Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_fills_in_replicas_from_system_clusters() {
    // Only one replica per shard configured; system.clusters names the other two.
    let text = grouped_config(&format!(
        "{PICKER}\n[clusters.demo.discovery]\ninterval = \"1s\"\n"
    ))
    .replace(", { host = \"127.0.0.12\" }", "")
    .replace(", { host = \"127.0.0.14\" }", "");
    let p = TestProxy::start(&text).await;
    let t = wait_for_topology(
        p.admin,
        "4 discovered nodes",
        Duration::from_secs(10),
        |t| t["clusters"][0]["source"]["from"] == "system.clusters",
    )
    .await;
    let shards = t["clusters"][0]["shards"].as_array().unwrap();
    let hosts: Vec<Vec<&str>> = shards
        .iter()
        .map(|s| {
            s["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["host"].as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(hosts, [NODES[..2].to_vec(), NODES[2..].to_vec()]);
    assert_eq!(
        shards[1]["group"], "b",
        "shard 2 stays in its ZooKeeper group"
    );
    all_probed(p.admin).await;
    reads(&p, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pick_api_explains_bad_requests_and_honours_its_token() {
    let token_file = tempfile_path("admin-token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let text = grouped_config(&format!(
        "{PICKER}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    ))
    .replacen("[admin]\nlisten = \"127.0.0.1:0\"\n", "", 1);
    let p = TestProxy::start(&text).await;
    let get = |path: &str, token: Option<&str>| {
        let mut args = vec!["-sS".to_string(), format!("http://{}{path}", p.admin)];
        if let Some(t) = token {
            args.extend(["-H".into(), format!("Authorization: Bearer {t}")]);
        }
        curl_async(args)
    };
    assert_eq!(get("/v1/topology", None).await.status, 401);
    assert_eq!(get("/v1/topology", Some("wrong")).await.status, 401);
    assert_eq!(get("/metrics", None).await.status, 401);
    assert_eq!(get("/healthz", None).await.status, 200);
    assert_eq!(get("/v1/topology", Some("s3cret-token")).await.status, 200);
    let ok = get("/v1/pick?cluster=demo&purpose=write", Some("s3cret-token")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let v: Value = serde_json::from_str(&ok.body).unwrap();
    for key in [
        "cluster",
        "shard",
        "host",
        "http_port",
        "native_port",
        "weight",
        "cache_for_ms",
    ] {
        assert!(!v[key].is_null(), "{key} missing: {v}");
    }
    assert_eq!(v["cache_for_ms"], 1000);
    for (query, status, says) in [
        (
            "purpose=sideways&cluster=demo",
            400,
            "purpose must be read or write",
        ),
        ("cluster=demo", 400, "purpose is required"),
        ("cluster=nope&purpose=read", 404, "(known: demo)"),
        (
            "cluster=demo&purpose=read&shard=3",
            404,
            "no shard 3 (shards 1 to 2)",
        ),
        (
            "cluster=demo&purpose=read&shard=x",
            400,
            "shard must be a shard number",
        ),
        ("cluster=demo&purpose=read&sharrd=1", 400, "sharrd"),
    ] {
        let out = get(&format!("/v1/pick?{query}"), Some("s3cret-token")).await;
        assert_eq!(out.status, status, "{query}: {}", out.body);
        assert!(out.body.contains(says), "{query}: {}", out.body);
    }
    let _ = std::fs::remove_file(token_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_stop_when_the_retry_budget_is_spent() {
    // Two "nodes" that take a request and hang up before answering; probes are slow enough
    // not to notice during the test, so only the budget stops the retries.
    let mut ports = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                });
            }
        });
    }
    let nodes: Vec<(&str, u16)> = ports.iter().map(|&p| ("127.0.0.1", p)).collect();
    let text = config(
        &nodes,
        r#"
[picker]
probe_interval = "60s"
probe_retry_interval = "60s"
probe_timeout = "30s"
"#,
    )
    .replace(
        "connect_timeout = \"500ms\"",
        "connect_timeout = \"500ms\"\ndown_backoff_min = \"1ms\"\ndown_backoff_max = \"1ms\"\nretry_budget_ratio = 0.0\nretry_budget_min_per_second = 0",
    );
    let p = TestProxy::start(&text).await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        // A failed node is back 1 ms later, in the view too (it republishes then): each
        // request waits for both nodes in the view, so each fails over.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let m = p.metrics().await;
            let weighted = ports.iter().all(|port| {
                let node = format!("node=\"127.0.0.1:{port}\"");
                metric_sum(&m, "chgate_node_weight", &[&node, "purpose=\"read\""]) > 0.0
            });
            if weighted {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {i}: a failed node not back in the view after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let out = curl_async(vec![
            "-sS".into(),
            "-u".into(),
            "bi:bi-pass".into(),
            format!("{}/?query=SELECT+{i}", p.url()),
        ])
        .await;
        statuses.push((out.status, out.body));
    }
    // The budget starts with 10 retries and earns none (ratio 0): after them, no more.
    let exhausted = statuses
        .iter()
        .filter(|(_, b)| b.contains("retry budget"))
        .count();
    assert!(exhausted >= 1, "{statuses:?}");
    assert!(statuses.iter().all(|(s, _)| *s >= 500), "{statuses:?}");
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_retry_budget_exhausted_total",
            &["cluster=\"demo\""]
        ) >= 1.0
    );
    assert!(metric_sum(&m, "chgate_failovers_total", &[]) >= 10.0);
}
