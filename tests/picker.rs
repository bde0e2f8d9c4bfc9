//! The picker's probes against the real stack. Needs `scripts/dev-stack up`.

mod common;

use std::time::{Duration, Instant};

use chgate::config::{AccountConfig, UpstreamConfig};
use chgate::picker::probe::{detect, probe, probe_zookeeper, ProbeError};
use chgate::secret::Secret;
use chgate::upstream::{Account, Node};
use common::*;

/// The probe test reads ch4's figures; the stop test freezes ch4. One at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn account() -> Account {
    Account::new(
        &AccountConfig {
            user: "chgate".into(),
            password_env: None,
            password_file: None,
        },
        &Secret::new(secret("chgate")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_every_node_and_detects_what_it_lacks() {
    let _serial = SERIAL.lock().await;
    let account = account();
    for host in NODES {
        // An earlier test may have frozen a node long enough to expire its session.
        settled(host, Duration::from_secs(90)).unwrap();
        let node = Node::new(host, 8123, 0, &UpstreamConfig::default());
        let caps = detect(&node, &account, Duration::from_secs(5))
            .await
            .unwrap();
        // Ask the server directly rather than assume a version.
        let has_disks = direct(
            host,
            "SELECT count() FROM system.tables WHERE database = 'system' AND name = 'disks'",
        ) == "1\n";
        assert_eq!(caps.disks, has_disks, "{host}");
        assert!(caps.replicas, "{host}: the demo tables are replicated");
        let figures = tokio::spawn({
            let node = Node::new(host, 8123, 0, &UpstreamConfig::default());
            let account = self::account();
            async move { probe(&node, &account, caps, Duration::from_secs(5)).await }
        })
        .await
        .unwrap()
        .unwrap();
        assert!(
            figures.running_queries >= 1,
            "the probe itself runs: {figures:?}"
        );
        assert_eq!(figures.free_disk_bytes.is_some(), has_disks, "{figures:?}");
        assert!(
            !figures.session_expired && figures.readonly_replicas == 0,
            "{host}: {figures:?}"
        );
        assert!(figures.round_trip > Duration::ZERO);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_fails_its_probe_within_the_timeout() {
    let _serial = SERIAL.lock().await;
    // A SIGSTOPped server still completes TCP handshakes (the kernel does), so only an
    // answer-level probe with a deadline tells it is gone.
    let host = NODES[3];
    let node = Node::new(host, 8123, 0, &UpstreamConfig::default());
    let account = account();
    let caps = detect(&node, &account, Duration::from_secs(5))
        .await
        .unwrap();
    let frozen = Frozen::stop(&[("ch4", host)]);
    let started = Instant::now();
    let result = probe(&node, &account, caps, Duration::from_millis(800)).await;
    let elapsed = started.elapsed();
    drop(frozen);
    assert!(matches!(result, Err(ProbeError::Timeout(_))), "{result:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    // And it answers again once resumed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe(&node, &account, caps, Duration::from_secs(2))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "node did not come back");
    }
}

#[tokio::test]
async fn zookeeper_ensembles_answer_mntr_and_a_dead_one_is_an_error() {
    for addr in ["127.0.0.1:2181", "127.0.0.1:2182"] {
        let f = probe_zookeeper(addr, Duration::from_secs(3)).await.unwrap();
        assert_eq!(f.server_state, "standalone", "{addr}");
        assert!(f.avg_latency_ms >= 0.0);
    }
    let err = probe_zookeeper("127.0.0.1:2199", Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}
