//! `chgate ingest` applying PostgreSQL change events (`format = "debezium"`) end to end:
//! the real broker (tansu), kcat producing scripted envelopes as `chgate cdc` publishes
//! them, the real 2x2 cluster (ClickHouse 18.16) with a ReplicatedVersionedCollapsingMergeTree
//! and a ReplicatedReplacingMergeTree table made by each test on every node.
//!
//! What is checked is what people read: the final rows by `FINAL` (18.16's
//! VersionedCollapsingMergeTree has it) and, for the collapsing table, by the `sum(sign)`
//! form; that no row state is left with a sum other than 0 or 1 (a cancel row that differs
//! from its state row by one byte, or a block written twice, would); each key on the shard
//! its message key hashes to; and the dead letters with their reasons.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The shards' replicas, by shard (shard 1, shard 2).
const SHARDS: [[&str; 2]; 2] = [[NODES[0], NODES[1]], [NODES[2], NODES[3]]];

/// A test's tables, on every node: `<name>_orders` (versioned collapsing, the quickstart's
/// demo.orders_local with a UUID, an array, a Date and a Nested column more: arrays of
/// different lengths in one Nested are refused by ClickHouse itself) and `<name>_customers`
/// (replacing), plus Distributed tables over them on the first node. Dropped at the end.
struct Tables {
    name: String,
}

impl Tables {
    fn create(name: &str) -> Tables {
        for node in NODES {
            direct(
                node,
                &format!(
                    "CREATE TABLE demo.{name}_orders_local (
                        id Int64,
                        customer_id Nullable(Int64),
                        status Nullable(String),
                        amount Nullable(Decimal(12, 2)),
                        note Nullable(String),
                        updated_at Nullable(DateTime),
                        ref Nullable(UUID),
                        tags Array(String),
                        day Nullable(Date),
                        n Nested(a UInt8, b UInt8),
                        sign Int8,
                        version UInt64
                    ) ENGINE = ReplicatedVersionedCollapsingMergeTree(
                        '/clickhouse/tables/{{shard}}/demo/{name}_orders_local', '{{replica}}', sign, version)
                    ORDER BY id"
                ),
            );
            direct(
                node,
                &format!(
                    "CREATE TABLE demo.{name}_customers_local (
                        id Int64,
                        name Nullable(String),
                        email Nullable(String),
                        updated_at Nullable(DateTime),
                        version UInt64,
                        is_deleted UInt8
                    ) ENGINE = ReplicatedReplacingMergeTree(
                        '/clickhouse/tables/{{shard}}/demo/{name}_customers_local', '{{replica}}', version)
                    ORDER BY id"
                ),
            );
        }
        for table in ["orders", "customers"] {
            direct(
                NODES[0],
                &format!(
                    "CREATE TABLE demo.{name}_{table} AS demo.{name}_{table}_local \
                     ENGINE = Distributed(demo, demo, {name}_{table}_local, cityHash64(id))"
                ),
            );
        }
        Tables {
            name: name.to_string(),
        }
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        let name = &self.name;
        for table in ["orders", "customers"] {
            direct_within(
                NODES[0],
                &format!("DROP TABLE IF EXISTS demo.{name}_{table}"),
                10,
            );
            for node in NODES {
                direct_within(
                    node,
                    &format!("DROP TABLE IF EXISTS demo.{name}_{table}_local"),
                    10,
                );
            }
        }
    }
}

/// What the orders queries select, as TSV: every column (times and the UUID as text, so
/// the server's zone does not matter), the version last.
const ORDER_COLUMNS: &str = "id, customer_id, status, toString(amount), note, \
    toUnixTimestamp(updated_at), toString(ref), arrayStringConcat(tags, ','), toString(day), version";
/// The columns a row state is grouped by in the `sum(sign)` form: all but the sign.
const ORDER_KEY: &str =
    "id, customer_id, status, amount, note, updated_at, ref, tags, day, n.a, n.b, version";
const CUSTOMER_COLUMNS: &str = "id, name, email, toUnixTimestamp(updated_at), version";

/// One table's changes as `chgate cdc` publishes them (`key\tvalue` lines for kcat), with
/// the rows they leave: each live row's values and version.
struct Script {
    table: &'static str,
    lines: Vec<String>,
    live: BTreeMap<i64, (Value, u64)>,
    /// The last version given (row versions only ever grow).
    version: u64,
    /// Every other message goes wrapped with its schema, key and value.
    wrap: bool,
    /// Dead letters expected: reason, once each.
    bad: Vec<&'static str>,
    /// Rows the changes so far make (a `u` in a collapsing table makes two).
    rows: u64,
}

impl Script {
    fn new(table: &'static str) -> Script {
        Script {
            table,
            lines: Vec::new(),
            live: BTreeMap::new(),
            version: 0,
            wrap: false,
            bad: Vec::new(),
            rows: 0,
        }
    }

    fn key(&self, id: i64) -> String {
        if self.wrap {
            json!({"schema": {"type": "struct", "fields": [{"field": "id", "type": "int64", "optional": false}], "optional": false, "name": "pg.public.key"}, "payload": {"id": id}}).to_string()
        } else {
            json!({ "id": id }).to_string()
        }
    }

    fn send(&mut self, id: i64, op: &str, before: Option<&(Value, u64)>, after: Option<&Value>) {
        self.version += 1;
        let envelope = json!({
            "before": before.map(|(row, _)| row.clone()),
            "after": after.cloned(),
            "source": {
                "version": "2.7.0", "connector": "postgresql", "name": "pg",
                "ts_ms": 1_796_497_200_000u64 + self.version, "snapshot": if op == "r" { "true" } else { "false" },
                "db": "demo", "sequence": "[\"100\",\"200\"]", "schema": "public", "table": self.table,
                "txId": 500 + self.version, "lsn": 1000 + self.version, "xmin": null,
                "row_version": self.version,
                "before_row_version": before.map(|(_, v)| *v),
            },
            "op": op,
            "ts_ms": 1_796_497_200_000u64 + self.version,
            "transaction": null,
        });
        let value = if self.wrap {
            json!({"schema": {"type": "struct", "optional": false, "name": "pg.public.Envelope", "fields": []}, "payload": envelope})
        } else {
            envelope
        };
        let key = self.key(id);
        self.lines.push(format!("{key}\t{value}"));
        self.wrap = !self.wrap;
    }

    fn insert(&mut self, id: i64, row: Value, op: &str) {
        self.send(id, op, None, Some(&row));
        self.live.insert(id, (row, self.version));
        self.rows += 1;
    }

    fn update(&mut self, id: i64, row: Value, collapsing: bool) {
        let before = self.live.get(&id).cloned().expect("updates a live row");
        self.send(id, "u", Some(&before), Some(&row));
        self.live.insert(id, (row, self.version));
        self.rows += if collapsing { 2 } else { 1 };
    }

    /// A delete, then the tombstone Debezium sends after it.
    fn delete(&mut self, id: i64) {
        let before = self.live.remove(&id).expect("deletes a live row");
        self.send(id, "d", Some(&before), None);
        self.rows += 1;
        let key = self.key(id);
        self.lines.push(format!("{key}\t"));
    }

    /// A message that must be dead-lettered with `reason`.
    fn bad(&mut self, id: i64, value: &str, reason: &'static str) {
        let key = self.key(id);
        self.lines.push(format!("{key}\t{value}"));
        self.bad.push(reason);
    }

    /// Envelope text for a change the contract forbids (built, then broken by `edit`).
    fn broken(&mut self, id: i64, op: &str, edit: impl Fn(&mut Value)) -> String {
        let before = self.live.get(&id).cloned();
        let after = json!({"id": id});
        let mut v = json!({
            "before": before.as_ref().map(|(row, _)| row.clone()),
            "after": if op == "d" { Value::Null } else { after },
            "source": {"schema": "public", "table": self.table, "row_version": self.version + 1,
                       "before_row_version": before.as_ref().map(|(_, v)| *v)},
            "op": op,
        });
        edit(&mut v);
        v.to_string()
    }
}

fn order(id: i64, n: u64) -> Value {
    // Times in both of Debezium's forms: a number of microseconds (`timestamp`) or an
    // ISO string (`timestamptz`); the date as days.
    let at = 1_796_497_200 + n as i64 * 60;
    let updated_at = if n % 2 == 0 {
        json!(at * 1_000_000 + 123_456)
    } else {
        json!(chrono::DateTime::from_timestamp(at, 250_000_000)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    };
    json!({
        "id": id,
        "customer_id": if id % 5 == 0 { Value::Null } else { json!(id * 10) },
        "status": format!("s{n}"),
        "amount": format!("{}.{:02}", n, id % 100),
        "note": if n % 3 == 0 { Value::Null } else { json!(format!("note é \"{n}\"")) },
        "updated_at": updated_at,
        "ref": format!("00112233-4455-6677-8899-{:012x}", id * 1000 + n as i64),
        "tags": (0..n % 3).map(|i| format!("t{i}")).collect::<Vec<_>>(),
        "day": 20_792 + n,
    })
}

/// An order row as `ORDER_COLUMNS` prints it.
fn order_tsv(row: &Value, version: u64) -> String {
    let text = |v: &Value| match v {
        Value::Null => "\\N".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let secs = match &row["updated_at"] {
        Value::Number(n) => n.as_i64().unwrap().div_euclid(1_000_000),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp(),
        _ => unreachable!(),
    };
    let day = chrono::DateTime::from_timestamp(row["day"].as_i64().unwrap() * 86_400, 0)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    let tags: Vec<String> = row["tags"].as_array().unwrap().iter().map(text).collect();
    [
        text(&row["id"]),
        text(&row["customer_id"]),
        text(&row["status"]),
        text(&row["amount"]),
        text(&row["note"]),
        secs.to_string(),
        text(&row["ref"]),
        tags.join(","),
        day,
        version.to_string(),
    ]
    .join("\t")
}

fn customer(id: i64, n: u64) -> Value {
    json!({
        "id": id,
        "name": format!("c{id}-{n}"),
        "email": if n % 2 == 0 { Value::Null } else { json!(format!("c{id}@example.com")) },
        "updated_at": "2026-12-05T19:00:00Z",
    })
}

fn customer_tsv(row: &Value, version: u64) -> String {
    let email = row["email"].as_str().unwrap_or("\\N");
    format!(
        "{}\t{}\t{email}\t1796497200\t{version}",
        row["id"],
        row["name"].as_str().unwrap()
    )
}

/// The shard (index into `SHARDS`) of row `id`'s changes: its message key's primary key,
/// hashed as the sidecar does.
fn shard_of(id: i64) -> usize {
    let mut key = Vec::new();
    chgate::ingest::debezium::shard_key(Some(json!({ "id": id }).to_string().as_bytes()), &mut key);
    (chgate::ingest::shard_key::shard_for(&key, &[1, 2]) - 1) as usize
}

/// Per shard, the expected lines of the rows on it (sorted by id, as the queries are).
fn by_shard(live: &BTreeMap<i64, (Value, u64)>, tsv: fn(&Value, u64) -> String) -> [String; 2] {
    let mut out = [String::new(), String::new()];
    for (id, (row, version)) in live {
        let shard = &mut out[shard_of(*id)];
        shard.push_str(&tsv(row, *version));
        shard.push('\n');
    }
    out
}

/// Waits until `sql` gives `want[s]` on a replica of each shard `s` (a replica may still be
/// fetching what its twin took); fails with what the replicas answered.
async fn on_every_shard(what: &str, sql: String, want: [String; 2], sidecar: &IngestProcess) {
    let end = Instant::now() + Duration::from_secs(180);
    let last = loop {
        let (sql2, want2) = (sql.clone(), want.clone());
        let (ok, answers) = tokio::task::spawn_blocking(move || {
            let mut answers = Vec::new();
            let ok = SHARDS.iter().zip(&want2).all(|(replicas, want)| {
                replicas.iter().any(|node| {
                    let got = direct_within(node, &sql2, 5);
                    let matched = got.as_deref() == Some(want.as_str());
                    answers.push((*node, got));
                    matched
                })
            });
            (ok, answers)
        })
        .await
        .unwrap();
        if ok {
            return;
        }
        if Instant::now() > end {
            break answers;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let log = sidecar.log.lock().unwrap();
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    panic!(
        "{what}: never got\n{want:#?}\nthe replicas answered {last:#?}\nthe sidecar's warnings: {:#?}",
        &warnings[warnings.len().saturating_sub(20)..]
    );
}

/// Waits until `sql` through the Distributed table on the first node gives `want`.
async fn through_distributed(what: &str, sql: String, want: String) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let sql2 = sql.clone();
        let got = tokio::task::spawn_blocking(move || direct_within(NODES[0], &sql2, 10))
            .await
            .unwrap();
        if got.as_deref() == Some(want.as_str()) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: through the Distributed table {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn config(name: &str, tables: &str, dlq: &str, batch_rows: usize) -> String {
    format!(
        r#"{header}
[templates.orders]
format = "debezium"
engine = "versioned_collapsing"
[templates.customers]
format = "debezium"
engine = "replacing"
truncate = "ignore"
[tasks.orders]
topic = "{name}_orders"
template = "orders"
cluster = "demo"
account = "ingest"
table = "demo.{tables}_orders_local"
source_table = "public.orders"
batch_rows = {batch_rows}
batch_age = "300ms"
dead_letter_topic = "{dlq}"
[tasks.customers]
topic = "{name}_customers"
template = "customers"
cluster = "demo"
account = "ingest"
table = "demo.{tables}_customers_local"
batch_rows = {batch_rows}
batch_age = "300ms"
dead_letter_topic = "{dlq}"
"#,
        header = ingest_header(name, None),
    )
}

/// A test's topics (`<name>_orders`, `<name>_customers`, the dead letters' `dlq`) and
/// tables.
async fn setup(name: &str, dlq: &str) -> Tables {
    let (name, dlq) = (name.to_string(), dlq.to_string());
    tokio::task::spawn_blocking(move || {
        create_topics(&format!("{name}_orders"), &dlq);
        stack_shell(&format!(
            "tansu topic create {name}_customers --partitions 3 --broker tcp://127.0.0.1:9092 >/dev/null"
        ));
        Tables::create(&name)
    })
    .await
    .unwrap()
}

async fn start(config: String) -> IngestProcess {
    tokio::task::spawn_blocking(move || IngestProcess::start(&config))
        .await
        .unwrap()
}

async fn produce_off(topic: String, lines: Vec<String>) {
    tokio::task::spawn_blocking(move || produce(&topic, &lines))
        .await
        .unwrap()
}

/// The collapsing table's final rows, both ways, on every shard; and no row state whose
/// signs sum to anything but 0 (cancelled) or 1 (live).
async fn orders_are(tables: &str, script: &Script, sidecar: &IngestProcess) {
    let want = by_shard(&script.live, order_tsv);
    let local = format!("demo.{tables}_orders_local");
    on_every_shard(
        "orders FINAL",
        format!("SELECT {ORDER_COLUMNS} FROM {local} FINAL ORDER BY id FORMAT TSV"),
        want.clone(),
        sidecar,
    )
    .await;
    on_every_shard(
        "orders by sum(sign)",
        format!(
            "SELECT {ORDER_COLUMNS} FROM {local} GROUP BY {ORDER_KEY} HAVING sum(sign) > 0 \
             ORDER BY id FORMAT TSV"
        ),
        want.clone(),
        sidecar,
    )
    .await;
    on_every_shard(
        "orders: every row state cancelled or live once",
        format!(
            "SELECT count(), sum(s) FROM (SELECT sum(sign) AS s FROM {local} GROUP BY {ORDER_KEY}) \
             WHERE s NOT IN (0, 1) FORMAT TSV"
        ),
        ["0\t0\n".to_string(), "0\t0\n".to_string()],
        sidecar,
    )
    .await;
    through_distributed(
        "orders FINAL",
        format!("SELECT {ORDER_COLUMNS} FROM demo.{tables}_orders FINAL ORDER BY id FORMAT TSV"),
        script
            .live
            .iter()
            .map(|(_, (row, v))| order_tsv(row, *v) + "\n")
            .collect(),
    )
    .await;
}

async fn customers_are(tables: &str, script: &Script, sidecar: &IngestProcess) {
    on_every_shard(
        "customers FINAL",
        format!(
            "SELECT {CUSTOMER_COLUMNS} FROM demo.{tables}_customers_local FINAL \
             WHERE is_deleted = 0 ORDER BY id FORMAT TSV"
        ),
        by_shard(&script.live, customer_tsv),
        sidecar,
    )
    .await;
    through_distributed(
        "customers FINAL",
        format!(
            "SELECT {CUSTOMER_COLUMNS} FROM demo.{tables}_customers FINAL \
             WHERE is_deleted = 0 ORDER BY id FORMAT TSV"
        ),
        script
            .live
            .iter()
            .map(|(_, (row, v))| customer_tsv(row, *v) + "\n")
            .collect(),
    )
    .await;
}

/// The scripted orders: repeated updates of one key, deletes (each followed by its
/// tombstone), a re-insert after a delete, snapshot reads, both message forms, and every
/// kind of bad message.
fn orders_script() -> Script {
    let mut s = Script::new("orders");
    for id in 1..=5 {
        s.insert(id, order(id, 0), "c");
    }
    s.insert(10, order(10, 0), "r");
    s.insert(11, order(11, 0), "r");
    for n in 1..=6 {
        s.update(1, order(1, n), true);
    }
    s.update(2, order(2, 1), true);
    s.delete(2);
    s.delete(3);
    s.insert(3, order(3, 7), "c");
    s.update(3, order(3, 8), true);
    s.update(4, order(4, 1), true);
    s.delete(4);
    s.update(11, order(11, 2), true);
    // A change ClickHouse refuses (a Nested column's arrays of different lengths in
    // `after`): its cancel row is glued to it, so neither goes in and the row keeps its
    // state; one dead letter, with the message read again.
    let mut nested = order(12, 0);
    nested["n"] = json!({"a": [1, 2], "b": [3, 4]});
    s.insert(12, nested.clone(), "c");
    nested["n"]["b"] = json!([3]);
    let refused = s.broken(12, "u", |v| v["after"] = nested.clone());
    s.bad(12, &refused, "refused");
    s.bad(7, "not json at all", "parse");
    s.bad(
        7,
        r#"{"before": null, "after": {"id": 7}, "source": {"row_version": 99}}"#,
        "envelope",
    );
    let unknown = s.broken(5, "x", |_| {});
    s.bad(5, &unknown, "envelope");
    let no_before = s.broken(5, "u", |v| v["before"] = Value::Null);
    s.bad(5, &no_before, "envelope");
    let no_previous_version = s.broken(5, "d", |v| v["source"]["before_row_version"] = Value::Null);
    s.bad(5, &no_previous_version, "envelope");
    let mut bad_amount = order(6, 0);
    bad_amount["amount"] = json!("12.345");
    let bad_value = s.broken(6, "c", |v| v["after"] = bad_amount.clone());
    s.bad(6, &bad_value, "type");
    let truncate = json!({"before": null, "after": null, "op": "t",
        "source": {"schema": "public", "table": "orders", "row_version": null, "before_row_version": null}})
    .to_string();
    s.bad(0, &truncate, "truncate");
    // An event of another table in the topic: the task applies public.orders only.
    let other_table = s.broken(8, "c", |v| v["source"]["table"] = json!("invoices"));
    s.bad(8, &other_table, "table");
    // Still applied after all that.
    s.update(5, order(5, 1), true);
    s
}

fn customers_script() -> Script {
    let mut s = Script::new("customers");
    for id in 1..=4 {
        s.insert(id, customer(id, 0), "c");
    }
    for n in 1..=4 {
        s.update(1, customer(1, n), false);
    }
    s.delete(2);
    s.insert(2, customer(2, 5), "c");
    s.delete(3);
    s.bad(9, "{\"op\": \"c\",", "parse");
    let mut bad_time = customer(9, 0);
    bad_time["updated_at"] = json!("yesterday");
    let bad_value = s.broken(9, "c", |v| v["after"] = bad_time.clone());
    s.bad(9, &bad_value, "type");
    let wrong_versions = s.broken(4, "u", |v| {
        v["source"]["row_version"] = v["source"]["before_row_version"].clone()
    });
    s.bad(4, &wrong_versions, "envelope");
    // Ignored (truncate = "ignore"): no row, no dead letter.
    let truncate = json!({"before": null, "after": null, "op": "t",
        "source": {"schema": "public", "table": "customers"}})
    .to_string();
    s.lines.push(format!("{}\t{truncate}", s.key(0)));
    s.update(4, customer(4, 1), false);
    s
}

/// The dead letters' (source table, reason) pairs, sorted, from kcat's header text.
fn reasons(dead: &[(String, String)]) -> Vec<(String, String)> {
    let header = |headers: &str, name: &str| {
        headers
            .split(',')
            .find_map(|h| h.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    };
    let mut out: Vec<(String, String)> = dead
        .iter()
        .map(|(_, h)| {
            let topic = header(h, "chgate-source-topic");
            let table = topic.rsplit('_').next().unwrap_or("").to_string();
            (table, header(h, "chgate-reason"))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_changes_leave_exactly_the_final_rows_and_dead_letter_the_bad_ones() {
    let name = unique("dbz");
    let dlq = format!("{name}_dlq");
    let tables = setup(&name, &dlq).await;
    let (orders, customers) = (orders_script(), customers_script());
    let sidecar = start(config(&name, &name, &dlq, 1000)).await;
    produce_off(format!("{name}_orders"), orders.lines.clone()).await;
    produce_off(format!("{name}_customers"), customers.lines.clone()).await;

    orders_are(&name, &orders, &sidecar).await;
    customers_are(&name, &customers, &sidecar).await;

    let want: usize = orders.bad.len() + customers.bad.len();
    let dead = tokio::task::spawn_blocking(move || dead_letters(&dlq, want))
        .await
        .unwrap();
    let mut expected: Vec<(String, String)> = [(&orders, "orders"), (&customers, "customers")]
        .iter()
        .flat_map(|(s, t)| s.bad.iter().map(|r| (t.to_string(), r.to_string())))
        .collect();
    expected.sort();
    assert_eq!(reasons(&dead), expected, "{dead:#?}");
    for (payload, headers) in &dead {
        assert!(headers.contains("chgate-error="), "{headers}");
        if headers.contains("chgate-reason=type") {
            assert!(
                headers.contains("more decimal places") || headers.contains("\"yesterday\""),
                "{headers}"
            );
            assert!(
                payload.contains("\"op\":\"c\""),
                "the original message: {payload}"
            );
        }
        if headers.contains("chgate-reason=refused") {
            assert!(headers.contains("different array sizes"), "{headers}");
            assert!(
                payload.contains("\"b\":[3]}"),
                "the original message: {payload}"
            );
        }
        if headers.contains("chgate-reason=table") {
            assert!(headers.contains("an event of public.invoices"), "{headers}");
        }
        if headers.contains("chgate-reason=truncate") {
            assert!(headers.contains("truncate of public.orders"), "{headers}");
        }
    }
    // Rows made: the updates of the collapsing table count twice, and so does the update
    // ClickHouse refused (parsed, then refused whole: one dead letter).
    let metrics = sidecar.metrics();
    let parsed = metric_sum(&metrics, "chgate_ingest_parsed_total", &[]);
    assert_eq!(parsed, (orders.rows + customers.rows + 2) as f64);
    assert_eq!(
        metric_sum(
            &metrics,
            "chgate_ingest_dead_letters_total",
            &["reason=\"refused\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "chgate_ingest_dead_letters_total",
            &["reason=\"envelope\""]
        ),
        orders
            .bad
            .iter()
            .chain(&customers.bad)
            .filter(|r| **r == "envelope")
            .count() as f64
    );
    drop(sidecar);
    drop(tables);
}

/// 20,000 changes over 1,000 rows; the sidecar is SIGKILLed once mid-way and started
/// again: the final rows are exact, and no row state is left with a sum of signs other than
/// 0 or 1 (a segment written twice would leave some at 2 or -1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_way_it_still_applies_every_change_exactly_once() {
    let name = unique("dbzkill");
    let dlq = format!("{name}_dlq");
    let tables = setup(&name, &dlq).await;
    let mut orders = Script::new("orders");
    let mut customers = Script::new("customers");
    // A fixed pseudo-random walk: inserts, updates (several per row), deletes and
    // re-inserts, as a busy table sees them.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut n = 0u64;
    while orders.lines.len() < 20_000 {
        let r = next();
        let id = (r % 1000) as i64;
        n += 1;
        match (orders.live.contains_key(&id), r / 1000 % 10) {
            (false, _) => orders.insert(id, order(id, n), "c"),
            (true, 0 | 1) => orders.delete(id),
            (true, _) => orders.update(id, order(id, n), true),
        }
        match (customers.live.contains_key(&id), r / 10_000 % 10) {
            (false, _) => customers.insert(id, customer(id, n), "c"),
            (true, 0) => customers.delete(id),
            (true, _) => customers.update(id, customer(id, n), false),
        }
    }
    let config = config(&name, &name, &dlq, 500);
    produce_off(format!("{name}_orders"), orders.lines.clone()).await;
    produce_off(format!("{name}_customers"), customers.lines.clone()).await;
    let sidecar = start(config).await;
    let total = (orders.rows + customers.rows) as f64;
    // SIGKILL once about a third of the rows are in.
    let end = Instant::now() + Duration::from_secs(180);
    let written = loop {
        let w = metric_sum(&sidecar.metrics(), "chgate_ingest_rows_written_total", &[]);
        if w >= total / 3.0 {
            break w;
        }
        assert!(Instant::now() < end, "only {w} of {total} rows written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sidecar.signal("KILL");
    assert!(
        written < total,
        "killed after everything was in: {written} of {total}"
    );
    let path = sidecar.config_path.clone();
    drop(sidecar);
    let sidecar = tokio::task::spawn_blocking(move || IngestProcess::start_with(path))
        .await
        .unwrap();

    orders_are(&name, &orders, &sidecar).await;
    customers_are(&name, &customers, &sidecar).await;
    let resumed: Vec<String> = sidecar
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("Resuming from the recorded batch intent"))
        .cloned()
        .collect();
    let rebuilt = resumed
        .iter()
        .filter(|l| l.contains("\"done\":false"))
        .count();
    eprintln!(
        "{} order changes, {} customer changes ({total} rows, {} live orders, {} live customers); \
         killed at {written} rows written; {} partitions resumed from their intents, {rebuilt} \
         of them by rebuilding an unfinished segment",
        orders.lines.len(),
        customers.lines.len(),
        orders.live.len(),
        customers.live.len(),
        resumed.len()
    );
    drop(sidecar);
    drop(tables);
}

/// The timestamp of the first JSON log line with this message (and text), in seconds.
fn logged_at(log: &[String], message: &str, text: &str) -> Option<f64> {
    log.iter().find_map(|line| {
        let v: Value = serde_json::from_str(line).ok()?;
        if v["message"] != message || !line.contains(text) {
            return None;
        }
        let ts = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?;
        Some(ts.timestamp_micros() as f64 / 1e6)
    })
}

/// `DESIGN.md`, "New columns": a segment inserted before an `ALTER ... ADD COLUMN` and
/// replayed after it would be a new block to ClickHouse 18.16 and land twice. Here the
/// sidecar dies (a failpoint's SIGKILL) right after its first insert, before that segment's
/// done record, with partition 0 the only one written. Then changes with a column the table
/// lacks come on every partition, and the sidecar restarts with the pending segment's
/// replay held back 3 s: the writers of partitions 1 and 2, which have nothing to replay,
/// meet the new column at once and must wait for that replay before their `ALTER`.
/// Afterwards every row is in exactly once and the new column has its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_is_added_only_after_a_killed_writers_pending_segment_is_replayed() {
    let name = unique("dbzalter");
    let dlq = format!("{name}_dlq");
    let tables = setup(&name, &dlq).await;
    let topic = format!("{name}_orders");
    let to = |partition: i32, lines: Vec<String>| {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || produce_to(&topic, partition, &lines))
    };
    // A key's changes stay in one partition: ids below 300 in 0, then 1 and 2.
    let mut orders = Script::new("orders");
    for id in 0..300 {
        orders.insert(id, order(id, 1), "c");
    }
    to(0, orders.lines.clone()).await.unwrap();
    let config = config(&name, &name, &dlq, 40).replace(
        "engine = \"versioned_collapsing\"\n",
        "engine = \"versioned_collapsing\"\nnew_columns = \"add\"\n",
    );
    let path = tempfile_path("ingest").with_extension("toml");
    std::fs::write(&path, &config).unwrap();

    let p = path.clone();
    tokio::task::spawn_blocking(move || IngestProcess::killed_after_first_insert(p))
        .await
        .unwrap();

    let with_priority = |id: i64| {
        let mut row = order(id, 2);
        row["priority"] = json!(id % 7 + 1);
        row
    };
    let mut sent = orders.lines.len();
    for id in 0..300 {
        orders.update(id, with_priority(id), true);
    }
    to(0, orders.lines[sent..].to_vec()).await.unwrap();
    for partition in 1..3 {
        sent = orders.lines.len();
        for id in 200 + 100 * i64::from(partition)..300 + 100 * i64::from(partition) {
            orders.insert(id, with_priority(id), "c");
        }
        to(partition, orders.lines[sent..].to_vec()).await.unwrap();
    }
    let sidecar = tokio::task::spawn_blocking(move || {
        IngestProcess::start_with_failpoints(path, "ingest.replay=sleep(3000)")
    })
    .await
    .unwrap();

    orders_are(&name, &orders, &sidecar).await;
    let mut priorities = [0i64; 2];
    for (id, (row, _)) in &orders.live {
        priorities[shard_of(*id)] += row["priority"].as_i64().unwrap();
    }
    on_every_shard(
        "priority, through sum(priority * sign)",
        format!("SELECT sum(priority * sign) FROM demo.{name}_orders_local FORMAT TSV"),
        priorities.map(|p| format!("{p}\n")),
        &sidecar,
    )
    .await;

    let log = sidecar.log.lock().unwrap().clone();
    let replays = log
        .iter()
        .filter(|l| l.contains("Failpoint: sleeping"))
        .count();
    assert_eq!(
        replays, 1,
        "partition 0's segment, and only it, was replayed"
    );
    let replay = logged_at(&log, "Failpoint: sleeping", "ingest.replay").unwrap();
    let waited = logged_at(
        &log,
        "Adding columns: waiting for every partition's pending segment first",
        "",
    )
    .expect("a writer met the new column");
    let added = logged_at(&log, "Column added", "").expect("the column was added");
    eprintln!(
        "replay held from {replay:.3}; an alterer waiting from {waited:.3}; first ALTER at \
         {added:.3} ({:.2} s after the replay began)",
        added - replay
    );
    assert!(
        waited < replay + 3.0,
        "no writer was waiting to alter while the replay was held back: the test proved nothing"
    );
    assert!(
        added >= replay + 3.0,
        "the ALTER ran {:.2} s after the pending segment's replay began, before it was in",
        added - replay
    );
    drop(sidecar);
    drop(tables);
}
