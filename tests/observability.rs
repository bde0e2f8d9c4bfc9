//! The metrics contract: the exposition passes `promtool check metrics`; every metric a
//! Grafana dashboard or a Prometheus rule reads is one chgate exports, with labels it has;
//! the rules in deploy/prometheus pass promtool's checks and unit tests, and every alert
//! there has a severity, a summary, a description and a runbook, and is tested both firing
//! and cleared.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Write};
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
    METRICS
        .cdc_reconciled_rows
        .with_label_values(&["public.t", "unchanged"])
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
    METRICS.declined_reads.with_label_values(&["n"]).inc();
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
        .remote_servers_stale_nodes
        .with_label_values(&["c"])
        .set(0);
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
    METRICS.ingest_columns_added.with_label_values(&["t"]).inc();
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
    METRICS
        .query_kills
        .with_label_values(&["127.0.0.11:8123", "withheld"])
        .inc();
    METRICS.fleet_members.set(1);
    METRICS.config_stale_seconds.set(0.0);
    METRICS.config_version.set(1);
    String::from_utf8(METRICS.render()).unwrap()
}

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/chgate.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/chgate.rules.test.yml";

/// Runs promtool in the crate's directory with `stdin` as its input; its exit status and
/// its stdout and stderr together.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let child = Command::new("promtool")
        .args(args)
        .current_dir(MANIFEST_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("promtool not found; scripts/dev-stack up installs it")
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// Every sample name chgate exports (a histogram's `_bucket`, `_sum` and `_count`), with the
/// label names its samples carry.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let text = exposition();
    // A labelled family appears only once touched: one that `exposition` forgets would make
    // every query of it look like a query of a metric chgate does not have.
    let source = include_str!("../src/metrics.rs");
    let definitions = source.split("#[cfg(test)]").next().unwrap();
    for (at, _) in definitions.match_indices("\"chgate_") {
        let name: String = definitions[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} is defined in src/metrics.rs but not in the exposition: touch it in exposition()"
        );
    }
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels = labels
            .split(',')
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k.trim().to_string());
        names.entry(name.to_string()).or_default().extend(labels);
    }
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total"] {
        names.entry(name.to_string()).or_default();
    }
    names
}

#[derive(PartialEq)]
enum Token<'a> {
    Ident(&'a str),
    Str,
    Punct(char),
}

/// PromQL's tokens, as far as finding metric names and label matchers needs: identifiers
/// (recorded names' colons included), string literals (whose text is never a name), and
/// single punctuation characters; numbers and durations are dropped.
fn tokens(expr: &str) -> Vec<Token<'_>> {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            out.push(Token::Ident(&expr[start..i]));
        } else if c.is_ascii_digit() || c == '.' {
            while i < bytes.len() && (word(bytes[i]) || bytes[i] == b'.') {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i += 1;
            while i < bytes.len() && bytes[i] as char != c {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            assert!(i < bytes.len(), "unterminated string in {expr}");
            i += 1;
            out.push(Token::Str);
        } else {
            if !c.is_whitespace() {
                out.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    out
}

/// Checks the metrics one PromQL expression reads (`what` says where it is): each `chgate_*`
/// or `process_*` name is exported and its matchers name labels it has (or the target's
/// `job` and `instance`); a recorded `level:metric:operation` name is one `recorded` holds;
/// any other selector is `up`. Returns the metric names read.
fn check_expr(
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
    recorded: &BTreeSet<String>,
    what: &str,
) -> Vec<String> {
    let tokens = tokens(expr);
    let mut checked = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let Token::Ident(name) = *token else { continue };
        let selector = matches!(
            tokens.get(i + 1),
            Some(Token::Punct('{')) | Some(Token::Punct('['))
        );
        let labels = if name.starts_with("chgate_") || name.starts_with("process_") {
            let Some(labels) = exported.get(name) else {
                panic!("{what} reads {name}, which chgate does not export (in {expr})");
            };
            Some(labels)
        } else if name.contains(':') {
            assert!(
                recorded.contains(name),
                "{what} reads {name}, which no rule records (in {expr})"
            );
            None
        } else {
            if selector {
                assert!(
                    name == "up",
                    "{what} selects {name}, which is neither chgate's nor `up` (in {expr})"
                );
                checked.push(name.to_string());
            }
            continue;
        };
        checked.push(name.to_string());
        let (Some(labels), Some(Token::Punct('{'))) = (labels, tokens.get(i + 1)) else {
            continue;
        };
        let matchers = tokens[i + 2..]
            .iter()
            .take_while(|t| **t != Token::Punct('}'))
            .collect::<Vec<_>>();
        for pair in matchers.windows(2) {
            if let [Token::Ident(label), Token::Punct('=' | '!')] = pair {
                assert!(
                    labels.contains(*label) || matches!(*label, "job" | "instance"),
                    "{what} matches {name} on label {label}, which it does not have (in {expr})"
                );
            }
        }
    }
    checked
}

/// One rule of the rules file.
struct Rule {
    /// `record` or `alert`.
    kind: &'static str,
    name: String,
    line: usize,
    expr: String,
    /// `for`, `labels.NAME` and `annotations.NAME`, unquoted.
    fields: BTreeMap<String, String>,
}

/// The rules file's rules. It is read line by line in the layout it is written in (YAML's
/// other forms are refused, so a rule cannot slip past these checks by being written
/// differently); `alert_rules_pass_promtool` also compares the count with promtool's.
fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(format!("{MANIFEST_DIR}/{RULES}")).unwrap();
    let mut rules: Vec<Rule> = Vec::new();
    let mut section: Option<&str> = None;
    let mut in_expr_block = false;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if in_expr_block {
            if body.is_empty() || indent >= 10 {
                let rule = rules.last_mut().unwrap();
                rule.expr.push_str(body);
                rule.expr.push('\n');
                continue;
            }
            in_expr_block = false;
        }
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let refuse = || -> ! {
            panic!(
                "{RULES}:{n}: not in the layout tests/observability.rs reads (see the file's header): {line:?}"
            )
        };
        let Some((key, value)) = body.split_once(':') else {
            refuse()
        };
        let value = value.trim();
        match (indent, key) {
            (0, "groups") | (4, "rules") if value.is_empty() => {}
            (2, "- name") | (4, "interval") if !value.is_empty() => {}
            (6, "- record" | "- alert") if !value.is_empty() => {
                rules.push(Rule {
                    kind: if key == "- alert" { "alert" } else { "record" },
                    name: value.to_string(),
                    line: n,
                    expr: String::new(),
                    fields: BTreeMap::new(),
                });
                section = None;
            }
            (8, "expr") if !rules.is_empty() => {
                let rule = rules.last_mut().unwrap();
                assert!(rule.expr.is_empty(), "{RULES}:{n}: a second expr");
                if value == "|" {
                    in_expr_block = true;
                } else if value.is_empty()
                    || "|>\"'&*!{[".contains(&value[..1])
                    || value.contains(" #")
                {
                    refuse();
                } else {
                    rule.expr = value.to_string();
                }
            }
            (8, "for") if !rules.is_empty() && !value.is_empty() => {
                let rule = rules.last_mut().unwrap();
                let first = rule
                    .fields
                    .insert("for".into(), value.to_string())
                    .is_none();
                assert!(first, "{RULES}:{n}: a second for");
            }
            (8, "labels" | "annotations") if !rules.is_empty() && value.is_empty() => {
                section = Some(key);
            }
            (10, _)
                if section.is_some() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') =>
            {
                let unquoted = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .filter(|v| !v.contains(['"', '\\']));
                let value = match unquoted {
                    Some(v) => v,
                    // A plain label value, e.g. `severity: warning`.
                    None if section == Some("labels")
                        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                    {
                        value
                    }
                    None => refuse(),
                };
                let rule = rules.last_mut().unwrap();
                let field = format!("{}.{key}", section.unwrap());
                assert!(
                    rule.fields.insert(field, value.to_string()).is_none(),
                    "{RULES}:{n}: {key} twice"
                );
            }
            _ => refuse(),
        }
    }
    for rule in &rules {
        assert!(
            !rule.expr.trim().is_empty(),
            "{RULES}:{}: {} {} has no expr",
            rule.line,
            rule.kind,
            rule.name
        );
    }
    rules
}

/// Parses a promtool duration such as `90s`, `15m` or `1h30m`, in seconds.
fn seconds(duration: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in duration.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => panic!("{RULE_TESTS}: duration {duration:?}"),
        };
        total += number.parse::<u64>().expect("a number before each unit") * unit;
        number.clear();
    }
    assert!(
        number.is_empty(),
        "{RULE_TESTS}: duration {duration:?} has no unit"
    );
    total
}

/// Per alert, the evaluation times (seconds) at which the promtool tests expect it firing,
/// and those at which they expect no alert.
fn alert_expectations() -> BTreeMap<String, (Vec<u64>, Vec<u64>)> {
    let text = std::fs::read_to_string(format!("{MANIFEST_DIR}/{RULE_TESTS}")).unwrap();
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut expected: BTreeMap<String, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    for (k, &(n, line)) in lines.iter().enumerate() {
        let Some(alert) = line.strip_prefix("alertname:") else {
            continue;
        };
        // Written as `- eval_time: T`, `alertname: A`, `exp_alerts: ...`, in that order.
        let eval_time = k
            .checked_sub(1)
            .and_then(|p| lines[p].1.strip_prefix("- eval_time:"))
            .unwrap_or_else(|| panic!("{RULE_TESTS}:{n}: `- eval_time:` must come just before"));
        let outcome = lines.get(k + 1).map(|&(_, l)| l);
        let at = seconds(eval_time.trim());
        let entry = expected.entry(alert.trim().to_string()).or_default();
        match outcome {
            Some("exp_alerts: []") => entry.1.push(at),
            Some("exp_alerts:") => entry.0.push(at),
            _ => panic!("{RULE_TESTS}:{n}: `exp_alerts:` must come just after"),
        }
    }
    expected
}

#[test]
fn exposition_passes_promtool() {
    let text = exposition();
    let (ok, report) = promtool(&["check", "metrics"], &text);
    assert!(ok && report.trim().is_empty(), "promtool:\n{report}");
    for line in text.lines().filter(|l| l.starts_with("# HELP chgate_")) {
        assert!(
            line.split_whitespace().count() > 3,
            "metric without help text: {line}"
        );
    }
}

#[test]
fn dashboards_only_query_exported_metrics() {
    let exported = exported();
    let recorded: BTreeSet<String> = rules()
        .into_iter()
        .filter(|r| r.kind == "record")
        .map(|r| r.name)
        .collect();
    let dir = format!("{MANIFEST_DIR}/grafana");
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
                let what = format!("{}: panel {:?}", path.display(), panel["title"]);
                let names = check_expr(expr, &exported, &recorded, &what);
                assert!(!names.is_empty(), "{what}: no chgate metric in {expr}");
                checked += names.len();
            }
        }
    }
    assert!(checked >= 10, "dashboards checked: {checked}");
}

#[test]
fn alert_rules_pass_promtool() {
    let (ok, report) = promtool(&["check", "rules", RULES], "");
    assert!(ok, "promtool check rules {RULES}:\n{report}");
    // promtool says `SUCCESS: N rules found`: the same rules as this file's reading of it.
    let found = report
        .split("SUCCESS: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<usize>().ok());
    assert_eq!(
        found,
        Some(rules().len()),
        "promtool and tests/observability.rs read different rule counts:\n{report}"
    );
    let (ok, report) = promtool(&["test", "rules", RULE_TESTS], "");
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{report}");
}

#[test]
fn alert_rules_only_use_exported_metrics() {
    let exported = exported();
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|r| r.kind == "record")
        .map(|r| r.name.clone())
        .collect();
    for rule in &rules {
        if rule.kind == "record" {
            assert!(
                rule.name.split(':').count() == 3 && rule.name.contains(":chgate_"),
                "{RULES}:{}: recorded name {} is not level:chgate_metric:operation",
                rule.line,
                rule.name
            );
        }
        let what = format!("{RULES}:{} ({})", rule.line, rule.name);
        let names = check_expr(&rule.expr, &exported, &recorded, &what);
        assert!(!names.is_empty(), "{what}: reads no metric");
    }
}

#[test]
fn every_alert_has_runbook_and_is_tested() {
    let expected = alert_expectations();
    let alerts: Vec<Rule> = rules().into_iter().filter(|r| r.kind == "alert").collect();
    assert!(!alerts.is_empty());
    for alert in &alerts {
        let at = format!("{RULES}:{} ({})", alert.line, alert.name);
        let field = |k: &str| alert.fields.get(k).map(String::as_str).unwrap_or("");
        assert!(!field("for").is_empty(), "{at}: no `for:`");
        assert!(
            matches!(field("labels.severity"), "critical" | "warning"),
            "{at}: labels.severity must be critical or warning"
        );
        for key in ["summary", "description", "runbook"] {
            let text = field(&format!("annotations.{key}"));
            assert!(text.len() > 10, "{at}: no annotations.{key}");
            // Only Prometheus' template forms used here: a misspelt one renders as text.
            for part in text.split("{{").skip(1) {
                let inner = part.split_once("}}").map(|(t, _)| t.trim());
                let ok = inner.is_some_and(|t| {
                    t.strip_prefix("$labels.")
                        .is_some_and(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                        || t == "$value"
                        || t.strip_prefix("$value | ").is_some_and(|f| {
                            matches!(
                                f,
                                "humanize"
                                    | "humanize1024"
                                    | "humanizeDuration"
                                    | "humanizePercentage"
                            )
                        })
                        || (t.starts_with("printf `") && t.ends_with("` $value"))
                });
                assert!(ok, "{at}: annotations.{key} has template {{{{{part}");
            }
        }
        assert!(
            field("annotations.summary").contains("{{ $labels."),
            "{at}: the summary names none of the alert's labels"
        );
        let (firing, cleared) = expected
            .get(&alert.name)
            .unwrap_or_else(|| panic!("{at}: not in {RULE_TESTS}"));
        let first_firing = firing
            .iter()
            .min()
            .unwrap_or_else(|| panic!("{at}: {RULE_TESTS} never expects it firing"));
        assert!(
            cleared.iter().any(|t| t > first_firing),
            "{at}: {RULE_TESTS} never expects it cleared after it fired"
        );
    }
    for name in expected.keys() {
        assert!(
            alerts.iter().any(|a| &a.name == name),
            "{RULE_TESTS} tests {name}, which {RULES} does not define"
        );
    }
}
