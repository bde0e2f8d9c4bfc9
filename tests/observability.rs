//! The metrics contract: the exposition passes `promtool check metrics`, and every metric a
//! Grafana dashboard queries is one chgate exports.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use chgate::metrics::METRICS;

fn exposition() -> String {
    // Touch each labelled family so it appears in the output.
    METRICS
        .cdc_events
        .with_label_values(&["public.t", "c"])
        .inc();
    METRICS
        .cdc_snapshot_rows
        .with_label_values(&["public.t"])
        .inc();
    METRICS
        .cdc_skipped
        .with_label_values(&["seen_by_snapshot"])
        .inc();
    METRICS.cdc_transactions.with_label_values(&["whole"]).inc();
    METRICS
        .cdc_slot_wal_status
        .with_label_values(&["reserved"])
        .set(1);
    METRICS.cdc_commit_to_ack.observe(0.01);
    METRICS
        .http_requests
        .with_label_values(&["u", "200", "n"])
        .inc();
    METRICS
        .http_request_duration
        .with_label_values(&["u"])
        .observe(0.01);
    METRICS.http_request_bytes.with_label_values(&["u"]).inc();
    METRICS.http_response_bytes.with_label_values(&["u"]).inc();
    METRICS.http_errors.with_label_values(&["readonly"]).inc();
    METRICS.failovers.with_label_values(&["n"]).inc();
    METRICS.picks.with_label_values(&["n", "read"]).inc();
    METRICS
        .retry_budget_exhausted
        .with_label_values(&["c"])
        .inc();
    METRICS.hedges.with_label_values(&["c", "sent"]).inc();
    METRICS.hedge_after.with_label_values(&["c"]).set(0.3);
    METRICS.steered_reads.with_label_values(&["c"]).inc();
    METRICS
        .remote_servers_changes
        .with_label_values(&["c", "removed"])
        .inc();
    METRICS
        .remote_servers_removed
        .with_label_values(&["c"])
        .set(1);
    METRICS
        .remote_servers_publish_errors
        .with_label_values(&["127.0.0.1:2181"])
        .inc();
    METRICS
        .node_health
        .with_label_values(&["c", "1", "n"])
        .set(1);
    METRICS
        .node_weight
        .with_label_values(&["c", "1", "n", "read"])
        .set(1000.0);
    METRICS
        .node_probe_seconds
        .with_label_values(&["n"])
        .set(0.001);
    METRICS
        .node_replication_delay
        .with_label_values(&["n"])
        .set(0);
    METRICS
        .node_probe_failures
        .with_label_values(&["n", "timeout"])
        .inc();
    METRICS
        .zookeeper_healthy
        .with_label_values(&["c", "g"])
        .set(1);
    METRICS
        .topology_refreshes
        .with_label_values(&["c", "changed"])
        .inc();
    METRICS
        .auth_failures
        .with_label_values(&["bad_password"])
        .inc();
    METRICS
        .upstream_errors
        .with_label_values(&["n", "connect"])
        .inc();
    METRICS.upstream_in_flight.with_label_values(&["n"]).set(0);
    METRICS.upstream_node_down.with_label_values(&["n"]).set(0);
    METRICS.upstream_connections.with_label_values(&["n"]).inc();
    METRICS.config_reloads.with_label_values(&["ok"]).inc();
    METRICS.ingest_consumed.with_label_values(&["t"]).inc();
    METRICS.ingest_parsed.with_label_values(&["t"]).inc();
    METRICS
        .ingest_dead_letters
        .with_label_values(&["t", "parse"])
        .inc();
    METRICS
        .ingest_rows
        .with_label_values(&["t", "d.t", "1", "n"])
        .inc();
    METRICS
        .ingest_batches
        .with_label_values(&["t", "d.t", "1", "n"])
        .inc();
    METRICS
        .ingest_insert_seconds
        .with_label_values(&["t"])
        .observe(0.1);
    METRICS
        .ingest_insert_failures
        .with_label_values(&["t", "n"])
        .inc();
    METRICS
        .ingest_ring_occupancy
        .with_label_values(&["0"])
        .set(0);
    METRICS.ingest_lag.with_label_values(&["t", "0"]).set(0);
    METRICS.ingest_fenced.with_label_values(&["t"]).inc();
    METRICS.native_connections.with_label_values(&["ok"]).inc();
    METRICS.native_open.set(0);
    METRICS
        .native_queries
        .with_label_values(&["u", "ok", "n"])
        .inc();
    METRICS
        .native_query_duration
        .with_label_values(&["u"])
        .observe(0.1);
    METRICS.native_bytes.with_label_values(&["to_client"]).inc();
    METRICS.native_errors.with_label_values(&["protocol"]).inc();
    METRICS.native_reconnects.with_label_values(&["ok"]).inc();
    METRICS
        .quota_rejections
        .with_label_values(&["u", "concurrency"])
        .inc();
    METRICS
        .quota_queue_wait
        .with_label_values(&["u"])
        .observe(0.1);
    METRICS.queries_in_flight.with_label_values(&["u"]).set(0);
    METRICS.quota_queued.with_label_values(&["u"]).set(0);
    METRICS
        .quota_kills
        .with_label_values(&["u", "execution_time"])
        .inc();
    METRICS.fleet_members.set(1);
    METRICS.config_stale_seconds.set(0.0);
    METRICS.config_version.set(1);
    String::from_utf8(METRICS.render()).unwrap()
}

#[test]
fn exposition_passes_promtool() {
    let text = exposition();
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        panic!("promtool not found: scripts/dev-stack up installs the prometheus package");
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool:\n{report}"
    );
    for line in text.lines().filter(|l| l.starts_with("# HELP chgate_")) {
        assert!(
            line.split_whitespace().count() > 3,
            "metric without help text: {line}"
        );
    }
}

#[test]
fn dashboards_only_query_exported_metrics() {
    let text = exposition();
    let mut exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    exported.extend([
        "process_resident_memory_bytes".to_string(),
        "process_cpu_seconds_total".to_string(),
    ]);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
        assert!(
            dash["uid"].is_string() && dash["title"].is_string(),
            "{}",
            path.display()
        );
        for panel in dash["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                let names: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("chgate_") || w.starts_with("process_"))
                    .collect();
                assert!(
                    !names.is_empty(),
                    "{}: no chgate metric in {expr}",
                    path.display()
                );
                for name in names {
                    assert!(
                        exported.contains(name),
                        "{}: panel {:?} queries {name}, which chgate does not export",
                        path.display(),
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10, "dashboards checked: {checked}");
}
