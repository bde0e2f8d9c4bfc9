//! A hung replica: ClickHouse 18.16 SIGSTOPped (its kernel still accepts connections, nothing
//! answers). Reads of the Distributed table through chgate must keep answering within the
//! hedge bound plus one normal answer, although a node that fans such a read out may send a
//! shard's part to the hung replica and wait for it (ClickHouse 18.16 for 300 s): the same
//! reads sent straight to healthy nodes are shown beside them (how many of those hang
//! depends on the errors each node has counted against the replica since it started: 18.16
//! never forgets them). Against the real stack.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Fast probes: a node that stops answering is out within ~1.6 s.
const PICKER: &str = FAST_PICKER;

const READ: &str = "SELECT count() FROM demo.events";

/// One read through `url` with `args`; its status and how long it took.
async fn timed(args: Vec<String>) -> (u16, Duration, String) {
    let started = Instant::now();
    let out = curl_async(args).await;
    (out.status, started.elapsed(), out.body)
}

async fn wait_health(admin: std::net::SocketAddr, host: &str, want: &str) {
    let what = format!("{host} {want}");
    wait_for_topology(admin, &what, Duration::from_secs(10), |t| {
        replica(t, host)["health"] == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_reads_survive_a_hung_replica() {
    let p = TestProxy::start(&grouped_config(PICKER)).await;
    for host in NODES {
        wait_health(p.admin, host, "up").await;
    }
    let through = |sql: &str| {
        vec![
            "-sS".into(),
            "-m".into(),
            "20".into(),
            "-u".into(),
            "bi:bi-pass".into(),
            format!("{}/", p.url()),
            "--data-binary".into(),
            sql.to_string(),
        ]
    };
    // Normal answers first: they set the hedge bound (auto) and what "one normal answer" is.
    let mut normal = Duration::ZERO;
    for _ in 0..30 {
        let (status, took, body) = timed(through(READ)).await;
        assert_eq!(status, 200, "{body}");
        normal = normal.max(took);
    }

    let frozen = Frozen::stop(&[("ch2", "127.0.0.12")]);
    wait_health(p.admin, "127.0.0.12", "down").await;
    let m = p.metrics().await;
    let bound = Duration::from_secs_f64(metric_sum(
        &m,
        "chgate_hedge_after_seconds",
        &["cluster=\"demo\""],
    ));

    let mut proxied = Vec::new();
    for i in 0..20 {
        proxied.push(timed(through(&format!("{READ} WHERE {i} >= 0"))).await);
    }
    // The same reads straight to the healthy nodes, 4 at a time, given up after 2 s.
    let password = secret("chgate");
    let mut direct = Vec::new();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for (k, host) in ["127.0.0.11", "127.0.0.13", "127.0.0.14", "127.0.0.13"]
            .iter()
            .enumerate()
        {
            tasks.push(timed(vec![
                "-sS".into(),
                "-m".into(),
                "2".into(),
                "-u".into(),
                format!("chgate:{password}"),
                format!("http://{host}:8123/"),
                "--data-binary".into(),
                format!("{READ} WHERE {} >= 0", round * 4 + k),
            ]));
        }
        for t in tasks {
            direct.push(t.await);
        }
    }
    drop(frozen);

    let ok = |runs: &[(u16, Duration, String)]| runs.iter().filter(|r| r.0 == 200).count();
    let slowest = |runs: &[(u16, Duration, String)]| runs.iter().map(|r| r.1).max().unwrap();
    eprintln!(
        "hung replica 127.0.0.12: through chgate {}/{} answered, slowest {:?} (hedge bound {bound:?}, normal answer <= {normal:?}); straight to healthy nodes {}/{} within 2 s",
        ok(&proxied),
        proxied.len(),
        slowest(&proxied),
        ok(&direct),
        direct.len()
    );
    assert!(ok(&proxied) >= 19, "{proxied:?}");
    // They were steered clear of the hung replica (whether a node fanning a read out would
    // have picked it also depends on the errors it has counted against it before).
    let steered = metric_sum(
        &p.metrics().await,
        "chgate_steered_reads_total",
        &["cluster=\"demo\""],
    );
    assert!(steered >= 20.0, "{steered} reads steered");
    // 250 ms for scheduling on a shared two-core machine.
    let limit = bound + normal + Duration::from_millis(250);
    for (status, took, body) in &proxied {
        assert!(
            *status != 200 || *took <= limit,
            "a read took {took:?}, over {limit:?}: {body}"
        );
    }
}
