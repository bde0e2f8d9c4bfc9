//! The local stack is what the README says it is. Needs `scripts/dev-stack up`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn default_account_is_locked_and_chgate_account_works() {
    let anonymous = curl(&["-sS", "http://127.0.0.11:8123/?query=SELECT+1"]);
    assert_ne!(anonymous.status, 200, "{}", anonymous.body);
    let default = curl(&[
        "-sS",
        "-u",
        &format!("default:{}", secret("default")),
        "http://127.0.0.11:8123/?query=SELECT+1",
    ]);
    assert_eq!(default.body, "1\n");
    assert_eq!(direct(NODES[3], "SELECT 1"), "1\n");
}

#[test]
fn each_shard_uses_its_own_zookeeper_ensemble() {
    for (node, own, other) in [(NODES[0], "1", "2"), (NODES[2], "2", "1")] {
        let tables = direct(
            node,
            "SELECT name FROM system.zookeeper WHERE path = '/clickhouse/tables' ORDER BY name",
        );
        let names: Vec<&str> = tables.lines().collect();
        assert!(
            names.contains(&own) && !names.contains(&other),
            "{node}: {names:?}"
        );
    }
    for port in [2181, 2182] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port}; printf ruok >&3; timeout 2 cat <&3"
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "imok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_table_spans_both_shards_and_replicates() {
    let marker = unique("stack");
    // One row into each shard's local table, on the first replica of each.
    for node in [NODES[0], NODES[2]] {
        direct(
            node,
            &format!("INSERT INTO demo.events_local VALUES (now(), 1, '{marker}', 1)"),
        );
    }
    // Read through the Distributed table from the second replica of shard 1, and the local
    // table of every replica: both rows everywhere, once replication caught up.
    wait_until(
        "replication and the Distributed read",
        Duration::from_secs(30),
        || {
            direct(
                NODES[1],
                &format!("SELECT count() FROM demo.events WHERE event = '{marker}'"),
            ) == "2\n"
                && NODES.iter().all(|n| {
                    direct(
                        n,
                        &format!("SELECT count() FROM demo.events_local WHERE event = '{marker}'"),
                    ) == "1\n"
                })
        },
    )
    .await;
    assert_eq!(
        direct(
            NODES[0],
            "SELECT count() FROM system.clusters WHERE cluster = 'demo'"
        ),
        "4\n"
    );
}

#[test]
fn postgres_has_logical_wal() {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "5433",
            "-U",
            "postgres",
            "-Atc",
            "SHOW wal_level",
        ])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "logical",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kcat_reaches_the_broker_with_the_newer_librdkafka() {
    let env = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-stack"))
        .arg("env")
        .output()
        .unwrap();
    assert!(env.status.success());
    let script = format!(
        "{}\nkcat -b 127.0.0.1:9092 -L -m 10",
        String::from_utf8_lossy(&env.stdout)
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("broker"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
