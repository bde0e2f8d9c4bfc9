//! A ClickHouse node is killed while reads run through the proxy: every read still succeeds.
//! Its own test binary, so that it never runs beside another (cargo runs test binaries one
//! after another; it stops a shared node), and it restarts the node with
//! `scripts/dev-stack up` at the end.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_keep_succeeding_while_a_node_is_killed() {
    let victim = "ch2";
    let victim_ip = NODES[1];
    let p = TestProxy::start(&config(&demo_nodes(), "")).await;
    let url = format!("{}/", p.url());
    let done = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..4 {
        let url = url.clone();
        let done = done.clone();
        readers.push(tokio::spawn(async move {
            for i in 0..150 {
                let sql = if i % 2 == 0 {
                    format!("SELECT {r} * 1000 + {i}, count() FROM (SELECT number FROM system.numbers LIMIT 1000)")
                } else {
                    format!("SELECT {r} * 1000 + {i}, 1")
                };
                let out = curl_async(vec![
                    "-sS".into(),
                    "-u".into(),
                    "bi:bi-pass".into(),
                    url.clone(),
                    "--data-binary".into(),
                    sql,
                ])
                .await;
                let first = out.body.split('\t').next().unwrap_or("").to_string();
                assert_eq!(
                    (out.status, first.clone()),
                    (200, format!("{}", r * 1000 + i)),
                    "read {r}/{i} failed: {}",
                    out.body
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Kill the node once reads are flowing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 60 {
        assert!(Instant::now() < deadline, "reads did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(&stack_pid(victim), "KILL");
    let killed_at = done.load(Ordering::Relaxed);
    for r in readers {
        r.await.expect("a read failed while the node was down");
    }
    assert_eq!(done.load(Ordering::Relaxed), 600);
    assert!(
        killed_at < 600,
        "the kill happened while reads were running"
    );
    let m = p.metrics().await;
    let errors = metric_sum(
        &m,
        "chgate_upstream_errors_total",
        &[&format!("{victim_ip}:8123")],
    );
    // The proxy noticed the dead node: a read sent there failed over, or (when the probes
    // were quicker than the next read that would have gone there) the picker took it down
    // first, and no read went there at all.
    let down = metric_sum(
        &m,
        "chgate_node_up",
        &[&format!("node=\"{victim_ip}:8123\"")],
    ) == 0.0;
    assert!(
        errors >= 1.0 || down,
        "the proxy saw the dead node and routed around it:\n{m}"
    );

    // Bring the node back for whoever runs next.
    let status =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-stack"))
            .arg("up")
            .status()
            .unwrap();
    assert!(status.success());
    let r = curl(&["-sS", &format!("http://{victim_ip}:8123/ping")]);
    assert_eq!(r.body, "Ok.\n");
}
