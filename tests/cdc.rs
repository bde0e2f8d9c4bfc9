//! `chgate cdc` against the stack's real PostgreSQL 15 and Kafka-compatible broker: a
//! randomized workload (inserts, updates, deletes, TOASTed values an update leaves alone,
//! multi-row transactions, a transaction big enough to be streamed in progress, an ALTER
//! ADD COLUMN, a TRUNCATE) while the capture is SIGKILLed mid-snapshot and mid-stream, for
//! a table with REPLICA IDENTITY DEFAULT and one with FULL. Then every event in Kafka is
//! folded per key, in partition order, and checked: each `before` is exactly the row the
//! previous event published, with its version; versions increase; no event is there twice;
//! and the folded state equals PostgreSQL row for row.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

const PG: &str = "host=127.0.0.1 port=5433 user=postgres";
const BROKER: &str = "127.0.0.1:9092";

async fn pg(db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(&format!("{PG} dbname={db}"), NoTls)
        .await
        .expect("connect to the stack's PostgreSQL (scripts/dev-stack up)");
    tokio::spawn(conn);
    client
}

/// Drops the slots and databases of test runs whose process is gone (killed, so their
/// `Drop` never ran): each holds one of PostgreSQL's few replication slots, and a few
/// aborted runs would leave the next one "all replication slots are in use".
async fn sweep_left_by_dead_runs(admin: &tokio_postgres::Client) {
    let rows = admin
        .query(
            "SELECT slot_name FROM pg_replication_slots WHERE NOT active AND slot_name LIKE 'cdc\\_%'",
            &[],
        )
        .await
        .unwrap_or_default();
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot('{name}') FROM pg_replication_slots WHERE slot_name = '{name}' AND NOT active"
            ))
            .await;
        // (Not in the same batch: DROP DATABASE cannot run inside a transaction.)
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

/// A database of its own, dropped (with its slot) at the end.
struct TestDb {
    name: String,
    slot: String,
}

impl TestDb {
    /// Runs `sql` (statements separated by `;`) in the database, from a test's thread.
    fn exec(&self, rt: &tokio::runtime::Runtime, sql: &str) {
        rt.block_on(async { pg(&self.name).await.batch_execute(sql).await.unwrap() });
    }

    async fn create() -> Self {
        let name = common::unique("cdc");
        let admin = pg("postgres").await;
        sweep_left_by_dead_runs(&admin).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        // Small enough that the big transaction is streamed while in progress.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET logical_decoding_work_mem = '64kB'"
            ))
            .await
            .unwrap();
        let db = pg(&name).await;
        db.batch_execute(
            "CREATE TABLE customers (id bigint PRIMARY KEY, name text, email text, updated_at timestamptz);
             ALTER TABLE customers REPLICA IDENTITY FULL;
             CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint, status text,
                                  amount numeric(12,2), note text, updated_at timestamptz);",
        )
        .await
        .unwrap();
        Self {
            slot: name.clone(),
            name,
        }
    }

    fn drop_all(&self) {
        let name = self.name.clone();
        let slot = self.slot.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let admin = pg("postgres").await;
            let _ = admin
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ))
                .await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        });
    }
}

/// Counters summed over the processes of a test (each SIGKILL loses its own).
#[derive(Default, Debug)]
struct Totals {
    seen_by_snapshot: f64,
    streamed: f64,
    resent: usize,
}

impl Totals {
    fn add(&mut self, cdc: &Cdc) {
        self.seen_by_snapshot +=
            cdc.metric("chgate_cdc_skipped_total", &["reason=\"seen_by_snapshot\""]);
        self.streamed += cdc.metric("chgate_cdc_transactions_total", &["kind=\"streamed\""]);
        self.resent += cdc
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("the broker did not have"))
            .count();
    }
}

impl Drop for TestDb {
    /// The slot goes even when the test fails: a slot left behind holds WAL forever.
    fn drop(&mut self) {
        self.drop_all();
    }
}

/// `chgate cdc` as a real process.
struct Cdc {
    child: Child,
    admin: SocketAddr,
    log: common::Log,
}

impl Cdc {
    fn start(config: &std::path::Path) -> Self {
        let (child, admin, log) = common::spawn_logged("cdc", config);
        Self { child, admin, log }
    }

    /// A capture that dies (SIGKILL of itself) when it reaches the failpoint `name`.
    fn start_killed_at(config: &std::path::Path, name: &str) -> Self {
        Self::start_with_failpoints(config, &format!("{name}=kill"))
    }

    /// With `CHGATE_FAILPOINTS` set to `points` (`src/failpoint.rs`).
    fn start_with_failpoints(config: &std::path::Path, points: &str) -> Self {
        let (child, admin, log) =
            common::spawn_logged_env("cdc", config, &[("CHGATE_FAILPOINTS", points)]);
        Self { child, admin, log }
    }

    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = common::curl(&["-sS", &format!("http://{}/metrics", self.admin)]).body;
        common::metric_sum(&text, name, labels)
    }

    /// SIGKILL; first adds the counters this process kept to `totals`.
    fn kill(&mut self, totals: &mut Totals) {
        totals.add(self);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls a metric until it reaches `at_least`; fails with `what` and the log's tail
    /// after `secs`.
    fn wait_metric(&self, name: &str, labels: &[&str], at_least: f64, secs: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.metric(name, labels) < at_least {
            assert!(Instant::now() < deadline, "{what}: {:?}", self.tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the snapshot has published `rows` rows, and checks it is not done yet
    /// (the kill that follows must land in the middle of it).
    fn wait_mid_snapshot(&self, rows: f64) {
        self.wait_metric(
            "chgate_cdc_snapshot_rows_total",
            &[],
            rows,
            60,
            "no snapshot progress",
        );
        let pending = self.metric("chgate_cdc_snapshot_tables_pending", &[]);
        assert!(
            pending > 0.0,
            "the snapshot finished before the kill: make it bigger"
        );
    }

    /// Waits until the capture streams (its `/readyz` answers 200).
    fn wait_streaming(&self, deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            let out = common::curl(&["-s", &format!("http://{}/readyz", self.admin)]);
            if out.status == 200 {
                return;
            }
            assert!(Instant::now() < end, "not streaming: {:?}", self.tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to `secs`) for the process to exit by itself; its status.
    fn wait_exit(&mut self, secs: u64, what: &str) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "{what}: {:?}", self.tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn term(&mut self) {
        common::send_signal(&self.child.id().to_string(), "TERM");
        let end = Instant::now() + Duration::from_secs(40);
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "chgate cdc exited with {status}: {:?}",
                    self.tail()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("chgate cdc did not stop on SIGTERM: {:?}", self.tail());
    }

    fn tail(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().rev().take(15).rev().cloned().collect()
    }

    /// Whether a line of the log holds `text`.
    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn errors(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"ERROR\""))
            .cloned()
            .collect()
    }
}

impl Drop for Cdc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(db: &TestDb, prefix: &str, state: &std::path::Path, chunk_rows: u32) -> PathBuf {
    let path = common::tempfile_path("cdc").with_extension("toml");
    std::fs::write(
        &path,
        format!(
            r#"
[postgres]
host = "127.0.0.1"
port = 5433
user = "postgres"
dbname = "{db}"

[capture]
name = "{prefix}"
slot = "{slot}"
publication = "{slot}"
tables = ["public.*"]
state_dir = "{state}"
snapshot_chunk_rows = {chunk_rows}
heartbeat = "1s"
# A transaction the server streams before its commit goes to disk past 64 KiB (the big
# transaction of the kill test does).
spill_bytes = 65536

[kafka]
brokers = "{BROKER}"
partitions = 3

[admin]
listen = "127.0.0.1:0"
"#,
            db = db.name,
            slot = db.slot,
            state = state.display(),
        ),
    )
    .unwrap();
    path
}

/// Rows that exist before the capture: `orders` orders (every tenth with a note wide
/// enough to be TOASTed) and `customers` customers after them.
async fn seed(db: &TestDb, orders: i64, customers: i64) {
    pg(&db.name)
        .await
        .batch_execute(&format!(
            "INSERT INTO orders SELECT g, g % 500, 'old', g * 1.25,
                    CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5(random()::text || g || s), '') FROM generate_series(1, 250) s) ELSE 'o' || g END,
                    now() FROM generate_series(1, {orders}) g;
             INSERT INTO customers SELECT g, 'c' || g, 'c' || g || '@x.io', now()
                    FROM generate_series({orders} + 1, {orders} + {customers}) g;"
        ))
        .await
        .unwrap();
}

/// Waits until the slot is confirmed past PostgreSQL's current position.
async fn wait_caught_up(db: &TestDb, cdc: &Cdc) {
    let c = pg(&db.name).await;
    let end: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let t0 = Instant::now();
    loop {
        let done: bool = c
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&end, &db.slot],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the capture did not catch up: {:?}",
            cdc.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The test broker, stopped (SIGSTOP) until dropped: the capture's events wait
/// unacknowledged. Other tests' producers just wait meanwhile.
struct PausedBroker(String);

impl PausedBroker {
    fn pause() -> Self {
        let pid = std::fs::read_to_string(common::stack_dir().join("kafka/pid"))
            .expect("the broker's pid file")
            .trim()
            .to_string();
        common::send_signal(&pid, "STOP");
        Self(pid)
    }
}

impl Drop for PausedBroker {
    fn drop(&mut self) {
        common::send_signal(&self.0, "CONT");
    }
}

/// One message of a topic.
struct Event {
    partition: i32,
    offset: i64,
    key: String,
    value: Option<Value>,
    seq: Option<u64>,
}

/// Every message of `topic`, partition by partition in offset order.
fn read_topic(topic: &str) -> Vec<Event> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", "chgate-cdc-test")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = meta.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut list = TopicPartitionList::new();
    for &p in &parts {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let mut open: HashSet<i32> = parts.iter().copied().collect();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    while !open.is_empty() && Instant::now() < end {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let seq = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "chgate-seq")
                        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                });
                out.push(Event {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    value: m.payload().map(|p| serde_json::from_slice(p).unwrap()),
                    seq,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    assert!(
        open.is_empty(),
        "{topic}: partitions {open:?} never reached their end"
    );
    out.sort_by_key(|e| (e.partition, e.offset));
    out
}

/// The rows the events leave, per key; every inconsistency found on the way. A key's
/// events are all in one partition (and a truncate is in every one): each partition is
/// folded alone.
fn fold(events: &[Event]) -> (BTreeMap<i64, Value>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut problems = Vec::new();
    let mut seqs = HashSet::new();
    let mut partitions: BTreeMap<i32, Vec<&Event>> = BTreeMap::new();
    for e in events {
        if let Some(s) = e.seq {
            if !seqs.insert(s) {
                problems.push(format!(
                    "event seq {s} is in the topic twice (p{} @{})",
                    e.partition, e.offset
                ));
            }
        }
        partitions.entry(e.partition).or_default().push(e);
    }
    for events in partitions.values() {
        let (r, p) = fold_partition(events);
        rows.extend(r);
        problems.extend(p);
    }
    (rows, problems)
}

fn fold_partition(events: &[&Event]) -> (BTreeMap<i64, Value>, Vec<String>) {
    let mut state: HashMap<String, (Value, u64)> = HashMap::new();
    let mut problems = Vec::new();
    let mut last_version: HashMap<String, u64> = HashMap::new();
    for e in events {
        let Some(v) = &e.value else { continue }; // a tombstone
        let op = v["op"].as_str().unwrap_or("?");
        let src = &v["source"];
        let version = src["row_version"].as_u64().unwrap_or(0);
        let at = format!("p{}@{} key {} op {op}", e.partition, e.offset, e.key);
        if op == "t" {
            state.clear();
            last_version.clear();
            continue;
        }
        if let Some(&prev) = last_version.get(&e.key) {
            if version <= prev && op != "r" {
                problems.push(format!("{at}: version {version} after {prev}"));
            }
        }
        last_version.insert(e.key.clone(), version);
        match op {
            "r" | "c" => {
                if state.contains_key(&e.key) {
                    problems.push(format!("{at}: the row already exists"));
                }
                state.insert(e.key.clone(), (v["after"].clone(), version));
            }
            "u" | "d" => {
                match state.get(&e.key) {
                    None => problems.push(format!("{at}: no earlier event for the row")),
                    Some((row, ver)) => {
                        if &v["before"] != row {
                            problems.push(format!(
                                "{at}: before {} is not the published row {}",
                                v["before"], row
                            ));
                        }
                        if src["before_row_version"].as_u64() != Some(*ver) {
                            problems.push(format!(
                                "{at}: before_row_version {} is not {ver}",
                                src["before_row_version"]
                            ));
                        }
                    }
                }
                if op == "u" {
                    state.insert(e.key.clone(), (v["after"].clone(), version));
                } else {
                    state.remove(&e.key);
                }
            }
            _ => problems.push(format!("{at}: unknown op")),
        }
    }
    let rows = state
        .into_values()
        .map(|(row, _)| (row["id"].as_i64().unwrap(), row))
        .collect();
    (rows, problems)
}

fn micros(iso: &Value) -> Option<i64> {
    let s = iso.as_str()?;
    Some(
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_micros(),
    )
}

/// The workload: random transactions on both tables until `stop`.
async fn workload(
    db: String,
    seed: u64,
    txns: usize,
    next_id: std::sync::Arc<std::sync::atomic::AtomicI64>,
) {
    let client = pg(&db).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let wide = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 250))";
    for i in 0..txns {
        let mut sql = String::from("BEGIN;");
        let statements = if rng.gen_bool(0.2) {
            rng.gen_range(2..6)
        } else {
            1
        };
        for _ in 0..statements {
            let hi = next_id.load(std::sync::atomic::Ordering::Relaxed).max(2);
            let pick = rng.gen_range(1..hi);
            match rng.gen_range(0..100) {
                0..=34 => {
                    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let note = if rng.gen_bool(0.3) { wide.to_string() } else { format!("'n{id}'") };
                    sql += &format!(
                        "INSERT INTO orders VALUES ({id}, {}, 'new', {}.{:02}, {note}, now());",
                        rng.gen_range(1..500),
                        rng.gen_range(0..10000),
                        rng.gen_range(0..100)
                    );
                }
                35..=44 => {
                    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sql += &format!("INSERT INTO customers VALUES ({id}, 'c{id}', 'c{id}@x.io', now());");
                }
                // Updates that leave the wide note alone: its TOASTed value is not sent.
                45..=69 => sql += &format!(
                    "UPDATE orders SET status = 'st{}', amount = amount + 1, updated_at = now() WHERE id = {pick};",
                    rng.gen_range(0..9)
                ),
                70..=74 => sql += &format!("UPDATE orders SET note = {wide} WHERE id = {pick};"),
                75..=82 => sql += &format!(
                    "UPDATE customers SET email = 'e{}@y.io', updated_at = now() WHERE id = {pick};",
                    rng.gen_range(0..1000)
                ),
                83..=84 => {
                    // A primary key change: a delete of the old key and a create of the new.
                    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sql += &format!("UPDATE orders SET id = {id} WHERE id = {pick};");
                }
                85..=94 => sql += &format!("DELETE FROM orders WHERE id = {pick};"),
                _ => sql += &format!("DELETE FROM customers WHERE id = {pick};"),
            }
        }
        sql += "COMMIT;";
        if let Err(e) = client.batch_execute(&sql).await {
            // A primary key change onto a key a concurrent insert took: roll back, go on.
            let _ = client.batch_execute("ROLLBACK").await;
            assert!(e.code().is_some(), "workload: {e}");
        }
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[test]
fn killed_mid_snapshot_and_mid_stream_kafka_still_equals_postgres() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    let prefix = db.name.replace('_', "-");
    let state = common::tempfile_path("cdc-state");
    let cfg = config(&db, &prefix, &state, 1000);
    let next_id = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1));

    // Rows that exist before the capture: the snapshot's work (some with wide notes).
    rt.block_on(seed(&db, 20000, 3000));
    next_id.store(23001, std::sync::atomic::Ordering::Relaxed);

    // Writes go on while the snapshot runs; the capture dies in the middle of it.
    let load = rt.spawn(workload(db.name.clone(), 7, 1500, next_id.clone()));
    let mut cdc = Cdc::start(&cfg);
    cdc.wait_mid_snapshot(3000.0);
    let mut totals = Totals::default();
    cdc.kill(&mut totals);
    eprintln!("killed mid-snapshot");

    // Resumed: the rest of the snapshot under new snapshots, then the stream.
    let mut cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1000));
    cdc.kill(&mut totals);
    eprintln!("killed while streaming: {totals:?}");
    let mut cdc = Cdc::start(&cfg);

    // A big transaction (streamed by the server while in progress), a schema change, a
    // truncate, and more kills in the middle of it all.
    rt.block_on(async {
        let c = pg(&db.name).await;
        // Streamed in progress (and spilled to disk), with a rolled-back subtransaction
        // whose changes must not be published.
        c.batch_execute(
            "BEGIN;
             UPDATE orders SET amount = amount + 0.01 WHERE id % 3 = 0;
             SAVEPOINT s;
             UPDATE orders SET status = 'rolled back' WHERE id % 3 = 1;
             ROLLBACK TO SAVEPOINT s;
             COMMIT",
        )
        .await
        .unwrap();
        c.batch_execute("ALTER TABLE orders ADD COLUMN priority int DEFAULT 0")
            .await
            .unwrap();
    });
    cdc.wait_metric(
        "chgate_cdc_transactions_total",
        &["kind=\"streamed\""],
        1.0,
        60,
        "the big transaction was not streamed",
    );
    assert!(
        cdc.metric("chgate_cdc_spilled_bytes_total", &[]) > 0.0,
        "the big transaction did not go to disk"
    );
    cdc.kill(&mut totals);
    eprintln!("killed after the big transaction: {totals:?}");
    let mut cdc = Cdc::start(&cfg);
    rt.block_on(async {
        let c = pg(&db.name).await;
        c.batch_execute("UPDATE orders SET priority = 2, status = 'prio' WHERE id % 7 = 0")
            .await
            .unwrap();
        c.batch_execute("TRUNCATE customers").await.unwrap();
        c.batch_execute("INSERT INTO customers SELECT g, 'again' || g, NULL, now() FROM generate_series(1, 300) g")
            .await
            .unwrap();
    });
    rt.block_on(load).unwrap();
    let more = rt.spawn(workload(db.name.clone(), 11, 500, next_id.clone()));
    std::thread::sleep(Duration::from_millis(800));
    cdc.kill(&mut totals);
    eprintln!("killed a fourth time: {totals:?}");
    let mut cdc = Cdc::start(&cfg);
    rt.block_on(more).unwrap();

    // Killed with the broker paused: the store holds transactions the slot has not
    // confirmed, so the restarted capture is sent them again first, and they carry the
    // session's only descriptions of the tables (which it must keep though it skips them).
    rt.block_on(wait_caught_up(&db, &cdc));
    let whole = |c: &Cdc| c.metric("chgate_cdc_transactions_total", &["kind=\"whole\""]);
    let before = whole(&cdc);
    let events = |c: &Cdc| c.metric("chgate_cdc_events_total", &[]);
    let events_before = events(&cdc);
    {
        let _paused = PausedBroker::pause();
        rt.block_on(async {
            let c = pg(&db.name).await;
            for i in 0..5 {
                c.batch_execute(&format!(
                    "UPDATE orders SET status = 'paused{i}' WHERE id % 1009 = {i}; \
                     UPDATE customers SET email = 'paused{i}@x.io' WHERE id % 1009 = {i}"
                ))
                .await
                .unwrap();
            }
        });
        let t0 = Instant::now();
        while whole(&cdc) < before + 5.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the capture did not take the transactions: {:?}",
                cdc.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Killed once every event of them is committed to the outbox (and none can be
        // acknowledged): the restart finds them in the store, not yet confirmed.
        let made = events(&cdc) - events_before;
        cdc.wait_metric(
            "chgate_cdc_outbox_events",
            &[],
            made,
            30,
            &format!("the transactions' {made} events did not reach the outbox"),
        );
        cdc.kill(&mut totals);
    }
    eprintln!("killed with the broker paused: {totals:?}");
    let mut cdc = Cdc::start(&cfg);
    rt.block_on(workload(db.name.clone(), 13, 200, next_id.clone()));

    // Caught up: the slot confirmed past the last write.
    rt.block_on(wait_caught_up(&db, &cdc));
    totals.add(&cdc);
    cdc.term();
    assert!(cdc.errors().is_empty(), "errors logged: {:?}", cdc.errors());
    eprintln!("{totals:?}");
    assert!(
        totals.resent >= 1,
        "no restart had events to send again: {totals:?}"
    );

    let (expected_orders, expected_customers) = rt.block_on(async {
        let c = pg(&db.name).await;
        let orders = c
            .query(
                "SELECT id, customer_id, status, amount::text, note,
                        (extract(epoch FROM updated_at) * 1000000)::bigint, priority
                 FROM orders",
                &[],
            )
            .await
            .unwrap();
        let customers = c
            .query("SELECT id, name, email, (extract(epoch FROM updated_at) * 1000000)::bigint FROM customers", &[])
            .await
            .unwrap();
        (orders, customers)
    });

    let (orders, problems) = fold(&read_topic(&format!("{prefix}.public.orders")));
    assert!(
        problems.is_empty(),
        "orders: {} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    let (customers, problems) = fold(&read_topic(&format!("{prefix}.public.customers")));
    assert!(
        problems.is_empty(),
        "customers: {} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );

    assert_eq!(
        orders.len(),
        expected_orders.len(),
        "orders: rows in Kafka vs PostgreSQL"
    );
    let mut wide = 0;
    for r in &expected_orders {
        let id: i64 = r.get(0);
        let got = orders
            .get(&id)
            .unwrap_or_else(|| panic!("order {id} is missing"));
        assert_eq!(
            got["customer_id"].as_i64(),
            r.get::<_, Option<i64>>(1),
            "order {id}"
        );
        assert_eq!(
            got["status"].as_str(),
            r.get::<_, Option<&str>>(2),
            "order {id}"
        );
        assert_eq!(
            got["amount"].as_str(),
            r.get::<_, Option<&str>>(3),
            "order {id}"
        );
        let note: Option<&str> = r.get(4);
        assert_eq!(got["note"].as_str(), note, "order {id}: note");
        wide += usize::from(note.is_some_and(|n| n.len() > 4000));
        assert_eq!(
            micros(&got["updated_at"]),
            r.get::<_, Option<i64>>(5),
            "order {id}: updated_at"
        );
        let priority: Option<i32> = r.get(6);
        match got.get("priority") {
            Some(p) => assert_eq!(p.as_i64(), priority.map(i64::from), "order {id}: priority"),
            // Never changed since the ALTER: PostgreSQL's default, with no event.
            None => assert_eq!(priority, Some(0), "order {id}: priority"),
        }
    }
    assert!(wide > 1000, "only {wide} orders with TOASTed notes");
    assert_eq!(
        customers.len(),
        expected_customers.len(),
        "customers: rows in Kafka vs PostgreSQL"
    );
    for r in &expected_customers {
        let id: i64 = r.get(0);
        let got = customers
            .get(&id)
            .unwrap_or_else(|| panic!("customer {id} is missing"));
        assert_eq!(
            got["name"].as_str(),
            r.get::<_, Option<&str>>(1),
            "customer {id}"
        );
        assert_eq!(
            got["email"].as_str(),
            r.get::<_, Option<&str>>(2),
            "customer {id}"
        );
        assert_eq!(
            micros(&got["updated_at"]),
            r.get::<_, Option<i64>>(3),
            "customer {id}"
        );
    }
    eprintln!(
        "Kafka equals PostgreSQL: {} orders ({wide} with TOASTed notes), {} customers",
        orders.len(),
        customers.len()
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// PostgreSQL -> `chgate cdc` -> Kafka -> `chgate ingest` -> ClickHouse, both SIGKILLed
/// along the way: ClickHouse (`FINAL`, and the `sum(sign)` form for the
/// VersionedCollapsingMergeTree table) ends up equal to PostgreSQL row for row, for a table
/// with REPLICA IDENTITY DEFAULT (orders, into VersionedCollapsingMergeTree) and one with
/// FULL (customers, into ReplacingMergeTree), through a TRUNCATE and a schema change.
#[test]
fn postgres_to_clickhouse_through_kills_of_the_capture_and_the_sidecar() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    let name = db.name.clone();
    let tables = ClickHouseTables::create(&name);
    let state = common::tempfile_path("cdc-state");
    let cfg = config(&db, &name, &state, 50);
    let dlq = format!("{name}_dlq");
    common::create_topics(&format!("{name}.public.orders"), &dlq);
    common::stack_shell(&format!(
        "tansu topic create {name}.public.customers --partitions 3 --broker tcp://127.0.0.1:9092 >/dev/null"
    ));
    let sidecar_config = format!(
        r#"{header}
[templates.orders]
format = "debezium"
engine = "versioned_collapsing"
# The ALTER TABLE orders ADD COLUMN below reaches ClickHouse too.
new_columns = "add"
[templates.customers]
format = "debezium"
engine = "replacing"
# A truncate comes as a delete of every row, then the truncate event, which adds nothing.
truncate = "ignore"
[tasks.orders]
topic = "{name}.public.orders"
template = "orders"
cluster = "demo"
account = "ingest"
table = "demo.{name}_orders_local"
alter_also = ["demo.{name}_orders"]
batch_rows = 5000
batch_age = "300ms"
dead_letter_topic = "{dlq}"
[tasks.customers]
topic = "{name}.public.customers"
template = "customers"
cluster = "demo"
account = "ingest"
table = "demo.{name}_customers_local"
batch_rows = 5000
batch_age = "300ms"
dead_letter_topic = "{dlq}"
"#,
        header = common::ingest_header(&name, None),
    );
    let next_id = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1));
    rt.block_on(seed(&db, 8000, 1000));
    next_id.store(9001, std::sync::atomic::Ordering::Relaxed);
    let mut totals = Totals::default();

    let mut sidecar = common::IngestProcess::start(&sidecar_config);
    let load = rt.spawn(workload(db.name.clone(), 3, 1200, next_id.clone()));
    let mut cdc = Cdc::start(&cfg);
    cdc.wait_mid_snapshot(1000.0);
    cdc.kill(&mut totals);
    eprintln!("capture killed mid-snapshot");
    let mut cdc = Cdc::start(&cfg);
    std::thread::sleep(Duration::from_millis(200));
    sidecar.signal("KILL");
    sidecar.wait(Duration::from_secs(10));
    eprintln!("sidecar killed");
    let mut sidecar = common::IngestProcess::start(&sidecar_config);
    rt.block_on(async {
        let c = pg(&db.name).await;
        c.batch_execute("ALTER TABLE orders ADD COLUMN priority int DEFAULT 0")
            .await
            .unwrap();
        c.batch_execute("UPDATE orders SET amount = amount + 0.01 WHERE id % 3 = 0")
            .await
            .unwrap();
        c.batch_execute("UPDATE orders SET priority = id % 7 WHERE id % 5 = 0")
            .await
            .unwrap();
    });
    cdc.kill(&mut totals);
    eprintln!("capture killed again");
    let cdc = Cdc::start(&cfg);
    rt.block_on(async {
        let c = pg(&db.name).await;
        c.batch_execute("TRUNCATE customers").await.unwrap();
        c.batch_execute("INSERT INTO customers SELECT g, 'again' || g, NULL, now() FROM generate_series(1, 200) g")
            .await
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(1000));
    sidecar.signal("KILL");
    sidecar.wait(Duration::from_secs(10));
    eprintln!("sidecar killed again");
    let sidecar = common::IngestProcess::start(&sidecar_config);
    rt.block_on(load).unwrap();
    rt.block_on(workload(db.name.clone(), 5, 300, next_id.clone()));

    let (orders, customers) = rt.block_on(async {
        let c = pg(&db.name).await;
        let orders: Vec<String> = c
            .query(
                "SELECT concat_ws(E'\\t', id, coalesce(customer_id::text, '\\N'), coalesce(status, '\\N'),
                        coalesce(amount::text, '\\N'), coalesce(md5(note), '\\N'),
                        coalesce(floor(extract(epoch FROM updated_at))::bigint::text, '\\N'),
                        coalesce(priority, 0))
                 FROM orders ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let customers: Vec<String> = c
            .query(
                "SELECT concat_ws(E'\\t', id, coalesce(name, '\\N'), coalesce(email, '\\N'),
                        coalesce(floor(extract(epoch FROM updated_at))::bigint::text, '\\N'))
                 FROM customers ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        (orders.join("\n") + "\n", customers.join("\n") + "\n")
    });
    // NULL is \N in both (TSV).
    // A row PostgreSQL has not changed since the ALTER has its default there and NULL in
    // ClickHouse (the column came with the first event that had it; no event backfills).
    let order_columns = "id, customer_id, status, toString(amount), lower(hex(MD5(note))), \
        toUnixTimestamp(updated_at), ifNull(priority, 0)";
    let final_orders =
        format!("SELECT {order_columns} FROM demo.{name}_orders FINAL ORDER BY id FORMAT TSV");
    let sum_orders = format!(
        "SELECT {order_columns} FROM demo.{name}_orders \
         GROUP BY id, customer_id, status, amount, note, updated_at, priority, version HAVING sum(sign) > 0 \
         ORDER BY id FORMAT TSV"
    );
    let final_customers = format!(
        "SELECT id, name, email, toUnixTimestamp(updated_at) \
         FROM (SELECT * FROM demo.{name}_customers FINAL) WHERE is_deleted = 0 ORDER BY id FORMAT TSV"
    );
    for (what, sql, want) in [
        ("orders FINAL", &final_orders, &orders),
        ("orders by sum(sign)", &sum_orders, &orders),
        ("customers FINAL", &final_customers, &customers),
    ] {
        let t0 = Instant::now();
        loop {
            let got = common::direct_within("127.0.0.11", sql, 30).unwrap_or_default();
            if &got == want {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                let got_lines: HashSet<&str> = got.lines().collect();
                let want_lines: HashSet<&str> = want.lines().collect();
                let missing: Vec<_> = want_lines.difference(&got_lines).take(5).collect();
                let extra: Vec<_> = got_lines.difference(&want_lines).take(5).collect();
                panic!(
                    "{what}: ClickHouse has {} rows, PostgreSQL {}; missing {missing:?}, extra {extra:?}; capture {:?}",
                    got.lines().count(),
                    want.lines().count(),
                    cdc.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "{what}: ClickHouse equals PostgreSQL ({} rows)",
            want.lines().count()
        );
    }
    assert!(
        cdc.errors().is_empty(),
        "capture errors: {:?}",
        cdc.errors()
    );
    let dead = common::dead_letters(&dlq, 0);
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    totals.add(&cdc);
    eprintln!("{totals:?}");
    drop(sidecar);
    drop(tables);
    let _ = std::fs::remove_dir_all(&state);
}

/// The test's ClickHouse tables on every node (the quickstart's shapes), and Distributed
/// tables over them on the first; dropped at the end.
struct ClickHouseTables {
    name: String,
}

const NODES: [&str; 4] = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"];

impl ClickHouseTables {
    fn create(name: &str) -> Self {
        for node in NODES {
            common::direct(
                node,
                &format!(
                    "CREATE TABLE demo.{name}_orders_local (id Int64, customer_id Nullable(Int64),
                        status Nullable(String), amount Nullable(Decimal(12, 2)), note Nullable(String),
                        updated_at Nullable(DateTime), sign Int8, version UInt64)
                     ENGINE = ReplicatedVersionedCollapsingMergeTree(
                        '/clickhouse/tables/{{shard}}/demo/{name}_orders_local', '{{replica}}', sign, version)
                     ORDER BY id"
                ),
            );
            common::direct(
                node,
                &format!(
                    "CREATE TABLE demo.{name}_customers_local (id Int64, name Nullable(String),
                        email Nullable(String), updated_at Nullable(DateTime), version UInt64, is_deleted UInt8)
                     ENGINE = ReplicatedReplacingMergeTree(
                        '/clickhouse/tables/{{shard}}/demo/{name}_customers_local', '{{replica}}', version)
                     ORDER BY id"
                ),
            );
        }
        for t in ["orders", "customers"] {
            common::direct(
                NODES[0],
                &format!(
                    "CREATE TABLE demo.{name}_{t} AS demo.{name}_{t}_local \
                     ENGINE = Distributed(demo, demo, {name}_{t}_local, cityHash64(id))"
                ),
            );
        }
        Self { name: name.into() }
    }
}

impl Drop for ClickHouseTables {
    fn drop(&mut self) {
        let name = &self.name;
        for t in ["orders", "customers"] {
            common::direct_within(
                NODES[0],
                &format!("DROP TABLE IF EXISTS demo.{name}_{t}"),
                10,
            );
            for node in NODES {
                common::direct_within(
                    node,
                    &format!("DROP TABLE IF EXISTS demo.{name}_{t}_local"),
                    10,
                );
            }
        }
    }
}

/// Two instances of one capture, each with its own state directory (as on two machines)
/// and `follow = true`: one leads, the other stands by, folding the topics into its store;
/// SIGKILL the leader mid-stream and the standby takes over within the ZooKeeper session
/// timeout (plus its start), with the store it kept, caught up with what came since. Then
/// the first comes back (its store now behind the topics), stands by (folding the topics
/// from their start), and takes over again when the second is killed. Nothing
/// is lost or published twice, and every `before` is complete: Kafka still folds to
/// PostgreSQL.
#[test]
fn the_standby_takes_over_when_the_leader_is_killed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    let prefix = db.name.replace('_', "-");
    let (states, [cfg_a, cfg_b]) = standby_pair(&db, &prefix);
    let next_id = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1));
    rt.block_on(async {
        pg(&db.name)
            .await
            .batch_execute("INSERT INTO orders SELECT g, g, 'old', g, 'o', now() FROM generate_series(1, 3000) g")
            .await
            .unwrap();
    });
    next_id.store(3001, std::sync::atomic::Ordering::Relaxed);

    // The first leader dies right after the broker acknowledged its first streamed
    // events, before it confirmed them to the slot: the server sends them again to the
    // next leader, whose rebuilt store must see that the topics hold them.
    let mut a = Cdc::start_killed_at(&cfg_a, "cdc.acked_not_confirmed");
    a.wait_streaming(Duration::from_secs(120));
    wait_logged(&a, "Recorded the capture's state");
    let b = Cdc::start(&cfg_b);
    wait_standing_by(&b);
    wait_logged(
        &b,
        "Folded the topics into this standby's store from their start",
    );
    assert_eq!(b.metric("chgate_cdc_leader", &[]), 0.0);
    assert_eq!(a.metric("chgate_cdc_leader", &[]), 1.0);
    let status = common::curl(&["-s", &format!("http://{}/readyz", b.admin)]).status;
    assert_eq!(status, 503, "a standby is not ready");

    let load = rt.spawn(workload(db.name.clone(), 21, 800, next_id.clone()));
    a.wait_exit(30, "the failpoint did not kill the leader");
    let killed = Instant::now();
    assert!(a.logged("Failpoint: SIGKILL"), "{:?}", a.tail());
    b.wait_streaming(Duration::from_secs(30));
    let takeover = killed.elapsed();
    eprintln!("the standby streams {takeover:?} after the leader's SIGKILL (session timeout 3 s)");
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    assert!(
        b.logged("\"went_on_from_the_standby_fold\":true"),
        "the standby did not take over with the store it kept: {:?}",
        b.tail()
    );
    rt.block_on(load).unwrap();
    rt.block_on(wait_caught_up(&db, &b));
    let held = b.metric("chgate_cdc_skipped_total", &["reason=\"in_topics\""]);
    assert!(
        held > 0.0,
        "no change sent again was found in the topics: {:?}",
        b.tail()
    );
    eprintln!("changes the server sent again that the topics held, not published twice: {held}");

    // The first instance again, its store behind what the second published.
    let a = Cdc::start(&cfg_a);
    wait_standing_by(&a);
    wait_logged(
        &a,
        "Folded the topics into this standby's store from their start",
    );
    let published = b.metric("chgate_cdc_events_total", &[]);
    let load = rt.spawn(workload(db.name.clone(), 22, 800, next_id.clone()));
    // Killed mid-stream: once the workload's events flow.
    b.wait_metric(
        "chgate_cdc_events_total",
        &[],
        published + 50.0,
        30,
        "the workload's events",
    );
    let mut b = b;
    let mut totals = Totals::default();
    b.kill(&mut totals);
    a.wait_streaming(Duration::from_secs(30));
    assert!(
        a.logged("\"went_on_from_the_standby_fold\":true"),
        "a former leader's store, behind the topics, was not folded anew: {:?}",
        a.tail()
    );
    rt.block_on(load).unwrap();
    let mut a = a;
    rt.block_on(wait_caught_up(&db, &a));
    a.term();
    check_topics_equal_postgres(&rt, &db, &prefix);
    for s in &states {
        let _ = std::fs::remove_dir_all(s);
    }
}

/// The leader is killed in the middle of the initial snapshot while writes go on, and the
/// standby, with a `state_dir` of its own, takes over. The topics hold part of the
/// snapshot, and nothing says which rows (a chunk in flight may be in some partitions only):
/// the standby reads the tables again and reconciles the topics with them. Rows changed
/// since the first snapshot read them get a `u` from the published row, rows deleted since
/// a `d`, the rows not published yet an `r`, and the rest nothing; afterwards every row's
/// events fold without a problem (each `before` the published row, versions growing) into
/// exactly PostgreSQL's rows.
#[test]
fn a_standby_takes_over_mid_snapshot_and_reconciles_the_topics() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    let prefix = db.name.replace('_', "-");
    let (states, [cfg_a, cfg_b]) = standby_pair(&db, &prefix);
    rt.block_on(seed(&db, 20000, 3000));
    let next_id = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(23001));

    // The first leader applies a chunk every 500 ms: the test acts in the middle of it.
    let mut a = Cdc::start_with_failpoints(&cfg_a, "cdc.snapshot_chunk=sleep(500)");
    a.wait_metric(
        "chgate_cdc_snapshot_rows_total",
        &["table=\"public.orders\""],
        3000.0,
        60,
        "no snapshot progress on orders",
    );
    let b = Cdc::start(&cfg_b);
    wait_standing_by(&b);
    // Rows the first leader has published change or go; the workload runs on.
    db.exec(
        &rt,
        "UPDATE orders SET status = 'changed', amount = amount + 1 WHERE id <= 40; \
         UPDATE orders SET note = 'narrowed' WHERE id IN (50, 60, 70); \
         DELETE FROM orders WHERE id BETWEEN 101 AND 120",
    );
    // Runs on through the kill and the takeover.
    let load = rt.spawn(workload(db.name.clone(), 31, 600, next_id.clone()));
    let mut totals = Totals::default();
    let published = a.metric(
        "chgate_cdc_snapshot_rows_total",
        &["table=\"public.orders\""],
    );
    assert!(
        published < 20000.0,
        "the snapshot of orders finished before the kill"
    );
    a.kill(&mut totals);
    let killed = Instant::now();
    b.wait_streaming(Duration::from_secs(120));
    eprintln!(
        "the standby streams {:?} after the leader's SIGKILL mid-snapshot",
        killed.elapsed()
    );
    assert!(
        b.logged("does not record the snapshot of these tables as finished"),
        "{:?}",
        b.tail()
    );
    rt.block_on(load).unwrap();
    rt.block_on(wait_caught_up(&db, &b));
    let outcome = |o: &str| {
        b.metric(
            "chgate_cdc_reconciled_rows_total",
            &["table=\"public.orders\"", &format!("outcome=\"{o}\"")],
        )
    };
    let (unchanged, changed, new, gone) = (
        outcome("unchanged"),
        outcome("changed"),
        outcome("new"),
        outcome("gone"),
    );
    eprintln!(
        "orders reconciled: {unchanged} unchanged, {changed} changed, {new} new, {gone} gone"
    );
    assert!(unchanged >= 500.0, "{unchanged} unchanged");
    assert!(changed >= 43.0, "{changed} changed");
    assert!(new >= 1000.0, "{new} new");
    assert!(gone >= 20.0, "{gone} gone");
    let mut b = b;
    b.term();
    assert!(b.errors().is_empty(), "errors logged: {:?}", b.errors());
    check_topics_equal_postgres(&rt, &db, &prefix);
    let (orders, _) = fold(&read_topic(&format!("{prefix}.public.orders")));
    let expected = rt.block_on(async {
        pg(&db.name)
            .await
            .query("SELECT id, status, amount::text, note FROM orders", &[])
            .await
            .unwrap()
    });
    for r in &expected {
        let id: i64 = r.get(0);
        let got = &orders[&id];
        assert_eq!(
            got["status"].as_str(),
            r.get::<_, Option<&str>>(1),
            "order {id}"
        );
        assert_eq!(
            got["amount"].as_str(),
            r.get::<_, Option<&str>>(2),
            "order {id}"
        );
        assert_eq!(
            got["note"].as_str(),
            r.get::<_, Option<&str>>(3),
            "order {id}"
        );
    }
    for s in &states {
        let _ = std::fs::remove_dir_all(s);
    }
}

/// Two instances of one capture, each with its own `state_dir`, electing a leader in the
/// stack's ZooKeeper (session timeout 3 s) and following the topics while standing by:
/// their state directories and configs.
fn standby_pair(db: &TestDb, prefix: &str) -> ([PathBuf; 2], [PathBuf; 2]) {
    let coordination = format!(
        "\n[coordination]\nzookeeper = [\"127.0.0.1:2181\"]\nroot = \"/chgate-tests/{}\"\nsession_timeout = \"3s\"\nfollow = true\n",
        db.name
    );
    let states = [
        common::tempfile_path("cdc-state-a"),
        common::tempfile_path("cdc-state-b"),
    ];
    let configs = states.clone().map(|state| {
        let cfg = config(db, prefix, &state, 1000);
        let text = std::fs::read_to_string(&cfg).unwrap() + &coordination;
        std::fs::write(&cfg, text).unwrap();
        cfg
    });
    (states, configs)
}

fn wait_standing_by(cdc: &Cdc) {
    wait_logged(cdc, "Standing by");
}

fn wait_logged(cdc: &Cdc, text: &str) {
    let t0 = Instant::now();
    while !cdc.logged(text) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not logged within 20 s: {text:?}: {:?}",
            cdc.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Folds both topics: no inconsistency, and as many rows as PostgreSQL has.
fn check_topics_equal_postgres(rt: &tokio::runtime::Runtime, db: &TestDb, prefix: &str) {
    let (orders, problems) = fold(&read_topic(&format!("{prefix}.public.orders")));
    assert!(
        problems.is_empty(),
        "orders: {} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
    let (customers, problems) = fold(&read_topic(&format!("{prefix}.public.customers")));
    assert!(
        problems.is_empty(),
        "customers: {:?}",
        &problems[..problems.len().min(10)]
    );
    let (want_orders, want_customers): (i64, i64) = rt.block_on(async {
        let c = pg(&db.name).await;
        let o: i64 = c
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get(0);
        let cu: i64 = c
            .query_one("SELECT count(*) FROM customers", &[])
            .await
            .unwrap()
            .get(0);
        (o, cu)
    });
    if orders.len() as i64 != want_orders {
        let ids: Vec<i64> = rt.block_on(async {
            let c = pg(&db.name).await;
            let rows = c.query("SELECT id FROM orders ORDER BY id", &[]).await;
            rows.unwrap().iter().map(|r| r.get(0)).collect()
        });
        let missing: Vec<&i64> = ids.iter().filter(|i| !orders.contains_key(i)).collect();
        panic!(
            "orders in Kafka: {}, in PostgreSQL: {want_orders}; {} missing, first {:?}",
            orders.len(),
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }
    assert_eq!(
        customers.len() as i64,
        want_customers,
        "customers in Kafka vs PostgreSQL"
    );
}

/// The capture's connections to PostgreSQL (the replication one and tokio-postgres's)
/// over TLS, as `postgres.sslmode` says: `verify-full` against the stack's certificate
/// connects and captures, with every connection encrypted; against a CA that did not sign
/// the server's certificate, it stops at once, saying why.
#[test]
fn the_capture_speaks_tls_to_postgres_as_sslmode_says() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    rt.block_on(seed(&db, 20, 2));
    let prefix = db.name.replace('_', "-");
    let with_tls = |rootcert: &std::path::Path| {
        let cfg = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "[capture]",
            &format!(
                "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n\n[capture]",
                rootcert.display()
            ),
            1,
        );
        std::fs::write(&cfg, text).unwrap();
        cfg
    };

    // A CA of its own, which did not sign the server's certificate: refused.
    let other = common::tempfile_path("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(other.join("key.pem"))
        .arg("-out")
        .arg(other.join("cert.pem"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let mut refused = Cdc::start(&with_tls(&other.join("cert.pem")));
    let status = refused.wait_exit(30, "kept going");
    assert!(!status.success());
    let said = refused.tail().join("\n");
    assert!(
        said.contains("UnknownIssuer") || said.contains("certificate"),
        "{said}"
    );

    // The stack's certificate: captured, encrypted.
    let mut cdc = Cdc::start(&with_tls(&common::stack_dir().join("tls/cert.pem")));
    // Its new slot waits for every transaction writing on the server (the other tests'
    // workloads too) to end before it is consistent: the capture logs what it waits for.
    cdc.wait_streaming(Duration::from_secs(120));
    rt.block_on(async {
        pg(&db.name)
            .await
            .batch_execute("INSERT INTO orders VALUES (100, 1, 'new', 1, 'o', now())")
            .await
            .unwrap();
        wait_caught_up(&db, &cdc).await;
        let rows = pg(&db.name)
            .await
            .query(
                "SELECT a.backend_type, s.ssl, coalesce(s.version, '') FROM pg_stat_activity a
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'chgate-cdc' AND a.datname = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        let conns: Vec<(String, bool, String)> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        assert!(
            conns.iter().any(|c| c.0 == "walsender"),
            "the replication connection: {conns:?}"
        );
        assert!(
            conns.iter().any(|c| c.0 == "client backend"),
            "a catalog connection: {conns:?}"
        );
        assert!(
            conns.iter().all(|c| c.1 && c.2.starts_with("TLS")),
            "every connection encrypted: {conns:?}"
        );
    });
    cdc.wait_metric(
        "chgate_cdc_events_total",
        &[],
        23.0,
        30,
        "the snapshot and the new row published",
    );
    cdc.term();
}

/// SIGTERM while the capture starts and its broker does not answer (the topics cannot be
/// created): it stops at once, cleanly, instead of waiting for the broker.
/// A partitioned table is captured as one table: its partitions' rows and changes come
/// once, under its name (a pattern that also matches the partitions skips them). Before
/// that, a table whose REPLICA IDENTITY index lacks the primary key stops the capture at
/// its start, saying why, instead of at its first delete.
#[test]
fn a_partitioned_table_is_captured_once_under_its_own_name() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    db.exec(&rt, "CREATE TABLE measures (id bigint, region text, v int, PRIMARY KEY (id, region))
                     PARTITION BY LIST (region);
                 CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu');
                 CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us');
                 INSERT INTO measures VALUES (1, 'eu', 10), (2, 'eu', 20), (3, 'us', 30), (4, 'us', 40);
                 CREATE TABLE badident (id bigint PRIMARY KEY, code text NOT NULL UNIQUE);
                 ALTER TABLE badident REPLICA IDENTITY USING INDEX badident_code_key;");
    let prefix = db.name.replace('_', "-");
    let state = common::tempfile_path("cdc-state");
    let cfg = config(&db, &prefix, &state, 1000);
    let mut refused = Cdc::start(&cfg);
    let status = refused.wait_exit(30, "still running");
    assert!(
        !status.success() && refused.logged("badident has REPLICA IDENTITY USING INDEX"),
        "{status}: {:?}",
        refused.tail()
    );
    db.exec(&rt, "ALTER TABLE badident REPLICA IDENTITY DEFAULT");
    let cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    rt.block_on(async {
        pg(&db.name)
            .await
            .batch_execute(
                "INSERT INTO measures VALUES (5, 'us', 50);
                 UPDATE measures SET v = 11 WHERE id = 1;
                 DELETE FROM measures WHERE id = 3;
                 UPDATE measures SET region = 'us' WHERE id = 2;",
            )
            .await
            .unwrap();
        wait_caught_up(&db, &cdc).await;
    });
    let events = read_topic(&format!("{prefix}.public.measures"));
    let ops: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| {
            let op = e.value.as_ref()?.get("op")?.as_str()?.to_string();
            Some((op, e.key.clone()))
        })
        .collect();
    let count = |op: &str| ops.iter().filter(|(o, _)| o == op).count();
    // Four rows read once each; the insert; the update; the delete; the row moved
    // between partitions (a delete and an insert, as PostgreSQL decodes it).
    assert_eq!(
        (count("r"), count("c"), count("u"), count("d")),
        (4, 2, 1, 2),
        "{ops:?}"
    );
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let ours: Vec<&str> = meta
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|n| n.starts_with(&format!("{prefix}.")))
        .collect();
    assert!(
        !ours.iter().any(|t| t.contains("measures_")),
        "a partition was captured on its own: {ours:?}"
    );
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
}

/// A capture whose `state_dir` was lost rebuilds its store from the topics: its events are
/// numbered after those already there (every partition's `chgate-seq` keeps growing, which
/// a tail check after a later crash relies on), an update's `before` is still complete
/// (REPLICA IDENTITY DEFAULT sends only the key), and no row is read again by a second
/// snapshot. Without the state record that says the snapshot was done, a rebuild is
/// refused, saying why.
#[test]
fn a_lost_state_dir_is_rebuilt_from_the_topics() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    rt.block_on(seed(&db, 30, 5));
    let prefix = db.name.replace('_', "-");
    let first = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let mut cdc = Cdc::start(&first);
    cdc.wait_streaming(Duration::from_secs(60));
    wait_logged(&cdc, "Recorded the capture's state");
    db.exec(
        &rt,
        "UPDATE orders SET status = 'first' WHERE id <= 20; DELETE FROM orders WHERE id > 25; \
         TRUNCATE customers; INSERT INTO customers VALUES (100, 'after', 'a@x.io', now())",
    );
    rt.block_on(wait_caught_up(&db, &cdc));
    cdc.term();

    // The same capture, its state gone, and no record that its snapshot was done: refused.
    let unrecorded = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let text = std::fs::read_to_string(&unrecorded).unwrap().replace(
        "partitions = 3",
        &format!("partitions = 3\nstate_topic = \"{prefix}.other-state\""),
    );
    std::fs::write(&unrecorded, text).unwrap();
    let mut refused = Cdc::start(&unrecorded);
    let status = refused.wait_exit(60, "a rebuild without the state record kept going");
    assert!(!status.success(), "{:?}", refused.tail());
    assert!(
        refused.logged("holds no record of the snapshot of slot")
            && refused.logged("public.orders"),
        "{:?}",
        refused.tail()
    );

    // With the record: rebuilt.
    let second = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let cdc = Cdc::start(&second);
    cdc.wait_streaming(Duration::from_secs(60));
    assert!(
        cdc.logged("Rebuilt the key-state store from the topics"),
        "{:?}",
        cdc.tail()
    );
    assert_eq!(
        cdc.metric("chgate_cdc_snapshot_rows_total", &[]),
        0.0,
        "the rows were read again"
    );
    db.exec(
        &rt,
        "UPDATE orders SET status = 'again' WHERE id <= 10; DELETE FROM orders WHERE id = 11; \
         UPDATE customers SET name = 'changed'",
    );
    rt.block_on(wait_caught_up(&db, &cdc));
    let events = read_topic(&format!("{prefix}.public.orders"));
    for pair in events.windows(2) {
        if pair[0].partition == pair[1].partition {
            assert!(
                pair[0].seq < pair[1].seq,
                "partition {}: chgate-seq {:?} at offset {} then {:?} at {}",
                pair[0].partition,
                pair[0].seq,
                pair[0].offset,
                pair[1].seq,
                pair[1].offset
            );
        }
    }
    check_topics_equal_postgres(&rt, &db, &prefix);
}

/// A capture killed after the broker acknowledged a transaction (a TRUNCATE, an insert
/// after it, a key change of a row with a TOASTed value, an update) and before the slot was
/// told: a new store rebuilt from the topics gets that transaction again from the server
/// and publishes none of it twice (a second `t` would wipe the row inserted after it), and
/// the rows changed next still carry complete `before` images.
#[test]
fn a_transaction_sent_again_after_a_rebuild_is_not_published_twice() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    rt.block_on(seed(&db, 30, 5));
    let prefix = db.name.replace('_', "-");
    let first = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let mut a = Cdc::start_killed_at(&first, "cdc.acked_not_confirmed");
    a.wait_streaming(Duration::from_secs(60));
    wait_logged(&a, "Recorded the capture's state");
    db.exec(
        &rt,
        "BEGIN; TRUNCATE customers; INSERT INTO customers VALUES (100, 'after', 'a@x.io', now()); \
         UPDATE orders SET id = id + 1000 WHERE id = 10; UPDATE orders SET status = 'moved' WHERE id = 11; \
         COMMIT",
    );
    a.wait_exit(30, "the failpoint did not kill the capture");
    assert!(a.logged("Failpoint: SIGKILL"), "{:?}", a.tail());

    let second = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let mut b = Cdc::start(&second);
    b.wait_streaming(Duration::from_secs(60));
    rt.block_on(wait_caught_up(&db, &b));
    let held = b.metric("chgate_cdc_skipped_total", &["reason=\"in_topics\""]);
    assert!(
        held >= 3.0,
        "changes found in the topics: {held}; {:?}",
        b.tail()
    );
    db.exec(
        &rt,
        "UPDATE orders SET status = 'after' WHERE id IN (1010, 11, 20); \
         UPDATE customers SET name = 'changed'; DELETE FROM orders WHERE id = 12",
    );
    rt.block_on(wait_caught_up(&db, &b));
    b.term();
    check_topics_equal_postgres(&rt, &db, &prefix);
}

/// A table added to `capture.tables` after the snapshot finished: its existing rows are
/// read, under a snapshot of their own, before the stream goes on, and the changes made
/// around that come once each (the folded topic equals the table).
#[test]
fn a_table_added_later_is_read_then_streamed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    rt.block_on(seed(&db, 20, 15));
    let prefix = db.name.replace('_', "-");
    let state = common::tempfile_path("cdc-state");
    let cfg = config(&db, &prefix, &state, 4);
    let with_tables = |tables: &str| {
        let text: Vec<String> = std::fs::read_to_string(&cfg)
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("tables = ") {
                    format!("tables = {tables}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&cfg, text.join("\n")).unwrap();
    };
    with_tables(r#"["public.orders"]"#);
    let mut cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    db.exec(&rt, "UPDATE customers SET name = 'early' WHERE id <= 25");
    cdc.term();
    db.exec(&rt, "INSERT INTO customers VALUES (100, 'late', 'l@x.io', now()); DELETE FROM customers WHERE id = 21");
    with_tables(r#"["public.orders", "public.customers"]"#);
    let cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    db.exec(
        &rt,
        "UPDATE customers SET name = 'streamed' WHERE id IN (22, 100);
         INSERT INTO customers VALUES (101, 'new', 'n@x.io', now())",
    );
    rt.block_on(wait_caught_up(&db, &cdc));
    assert!(cdc.logged("Tables new to the capture"), "{:?}", cdc.tail());
    let (rows, problems) = fold(&read_topic(&format!("{prefix}.public.customers")));
    assert!(problems.is_empty(), "{problems:?}");
    let want: Vec<(i64, String)> = rt.block_on(async {
        pg(&db.name)
            .await
            .query("SELECT id, name FROM customers ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    let got: Vec<(i64, String)> = rows
        .iter()
        .map(|(id, row)| (*id, row["name"].as_str().unwrap_or("?").to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
    // Taken out again: its snapshot progress is forgotten, and the capture streams on.
    let mut cdc = cdc;
    cdc.term();
    with_tables(r#"["public.orders"]"#);
    let mut cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    assert!(cdc.logged("no longer captured"), "{:?}", cdc.tail());
    // Changed while out of the capture, then back: read again and reconciled with what
    // was published of it (nothing twice; a `u` and a `d` from the published rows).
    db.exec(
        &rt,
        "UPDATE customers SET name = 'unseen' WHERE id IN (23, 24);
         DELETE FROM customers WHERE id = 25;
         INSERT INTO customers VALUES (102, 'unseen new', 'u@x.io', now())",
    );
    cdc.term();
    with_tables(r#"["public.orders", "public.customers"]"#);
    let cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    assert!(cdc.logged("Tables back in the capture"), "{:?}", cdc.tail());
    let outcome = |o: &str| {
        cdc.metric(
            "chgate_cdc_reconciled_rows_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    assert_eq!(
        [outcome("changed"), outcome("gone"), outcome("new")],
        [2.0, 1.0, 1.0]
    );
    assert_eq!(outcome("unchanged"), (want.len() - 3) as f64);
    db.exec(
        &rt,
        "UPDATE customers SET name = 'streamed again' WHERE id = 23",
    );
    rt.block_on(wait_caught_up(&db, &cdc));
    let (rows, problems) = fold(&read_topic(&format!("{prefix}.public.customers")));
    assert!(problems.is_empty(), "{problems:?}");
    let want: Vec<(i64, String)> = rt.block_on(async {
        pg(&db.name)
            .await
            .query("SELECT id, name FROM customers ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    let got: Vec<(i64, String)> = rows
        .iter()
        .map(|(id, row)| (*id, row["name"].as_str().unwrap_or("?").to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
}

/// With `with_schema`, a column added mid-stream is in the schema of the events that
/// carry it (a JSON converter drops a payload field its schema lacks).
#[test]
fn with_schema_the_schema_follows_an_added_column() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    rt.block_on(seed(&db, 3, 0));
    let prefix = db.name.replace('_', "-");
    let cfg = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("partitions = 3", "partitions = 3\nwith_schema = true"),
    )
    .unwrap();
    let cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(60));
    rt.block_on(async {
        pg(&db.name)
            .await
            .batch_execute(
                "ALTER TABLE orders ADD COLUMN extra int; UPDATE orders SET extra = 7 WHERE id = 1",
            )
            .await
            .unwrap();
        wait_caught_up(&db, &cdc).await;
    });
    let events = read_topic(&format!("{prefix}.public.orders"));
    let fields_of = |v: &Value, row: &str| -> Vec<String> {
        v["schema"]["fields"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["field"] == row))
            .and_then(|f| f["fields"].as_array())
            .map(|f| {
                f.iter()
                    .filter_map(|f| f["field"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let values: Vec<&Value> = events.iter().filter_map(|e| e.value.as_ref()).collect();
    let read = values
        .iter()
        .find(|v| v["payload"]["op"] == "r")
        .expect("a snapshot event");
    assert!(!fields_of(read, "after").contains(&"extra".to_string()));
    let update = values
        .iter()
        .find(|v| v["payload"]["op"] == "u")
        .expect("the update");
    assert_eq!(update["payload"]["after"]["extra"], 7, "{update}");
    assert!(
        fields_of(update, "after").contains(&"extra".to_string()),
        "{}",
        update["schema"]
    );
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
}

#[test]
fn sigterm_stops_a_capture_still_waiting_for_its_broker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    let prefix = db.name.replace('_', "-");
    let cfg = config(&db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let paused = PausedBroker::pause();
    let mut cdc = Cdc::start(&cfg);
    // Well into the start: its admin listener is up (the catalog comes next, then the
    // topics, which wait on the broker), and it has not got as far as capturing.
    let end = Instant::now() + Duration::from_secs(30);
    while !cdc.tail().iter().any(|l| l.contains("Listening")) {
        assert!(Instant::now() < end, "never started: {:?}", cdc.tail());
        assert!(cdc.child.try_wait().unwrap().is_none(), "{:?}", cdc.tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !cdc.tail().iter().any(|l| l.contains("Capturing")),
        "{:?}",
        cdc.tail()
    );
    let t0 = Instant::now();
    cdc.term();
    drop(paused);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped after {:?}: {:?}",
        t0.elapsed(),
        cdc.tail()
    );
}

/// A TRUNCATE of rows too wide for one unit (1,200 rows of 64 KiB: their delete events
/// carry about 80 MiB of before images): its deletes are committed in slices, the rows read
/// from the store a batch at a time. Killed right after the first slice, the restarted
/// capture deletes the rest, each row once, then publishes the truncate; the topic folds to
/// an empty table with no inconsistency. The snapshot before it read the wide rows in
/// chunks cut to a size, not `snapshot_chunk_rows` at a time.
#[test]
fn a_truncate_of_wide_rows_goes_in_slices_and_survives_a_kill() {
    const ROWS: usize = 1200;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::create());
    db.exec(
        &rt,
        &format!(
            "CREATE TABLE wide (id bigint PRIMARY KEY, doc text);
             INSERT INTO wide SELECT g, repeat(md5(g::text), 2048) FROM generate_series(1, {ROWS}) g"
        ),
    );
    let prefix = db.name.replace('_', "-");
    let cfg = config(&db, &prefix, &common::tempfile_path("cdc-state"), 5000);
    let mut cdc = Cdc::start_killed_at(&cfg, "cdc.truncate_sliced");
    cdc.wait_streaming(Duration::from_secs(120));
    assert_eq!(
        cdc.metric("chgate_cdc_snapshot_rows_total", &["table=\"public.wide\""]),
        ROWS as f64
    );
    db.exec(&rt, "TRUNCATE wide");
    let status = cdc.wait_exit(
        90,
        "the truncate was not sliced (the failpoint never killed the capture)",
    );
    assert!(!status.success(), "killed by the failpoint, not {status}");
    drop(cdc);

    let cdc = Cdc::start(&cfg);
    cdc.wait_streaming(Duration::from_secs(120));
    rt.block_on(wait_caught_up(&db, &cdc));
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
    let events = read_topic(&format!("{prefix}.public.wide"));
    let (rows, problems) = fold(&events);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(rows.is_empty(), "{} rows left", rows.len());
    let op = |e: &Event, op: &str| e.value.as_ref().is_some_and(|v| v["op"] == op);
    let deletes: Vec<&Event> = events.iter().filter(|e| op(e, "d")).collect();
    let keys: HashSet<&str> = deletes.iter().map(|e| e.key.as_str()).collect();
    assert_eq!((deletes.len(), keys.len()), (ROWS, ROWS));
    assert!(deletes.iter().all(|e| {
        e.value.as_ref().unwrap()["before"]["doc"]
            .as_str()
            .is_some_and(|d| d.len() == 65536)
    }));
    let truncates = events.iter().filter(|e| op(e, "t")).count();
    assert_eq!(truncates, 3, "one truncate event per partition");
}

/// A transaction that began while the slot was being created and commits after the slot's
/// consistent point: the exported snapshot does not see it, and its change's WAL record is
/// below that point. Its update must still carry a version above the snapshot row's (else
/// a ReplacingMergeTree target keeps the snapshot's older row). PostgreSQL moves a slot
/// being created through its phases at each running-transactions record, which a
/// `CHECKPOINT` writes; other tests' transactions can shift a phase, so an attempt that
/// did not put the change below the consistent point is tried again on a new database.
#[test]
fn an_update_begun_before_the_consistent_point_outranks_the_snapshot_row() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut tries = Vec::new();
    for _ in 0..3 {
        // Created (and dropped) outside the runtime: its drop runs one of its own.
        let db = rt.block_on(TestDb::create());
        match rt.block_on(straddle_the_consistent_point(&db)) {
            Ok(()) => return,
            Err(why) => tries.push(why),
        }
    }
    panic!("no attempt put a change below the consistent point: {tries:?}");
}

/// One attempt: `Err` when it could not line the transactions up (inconclusive); a failed
/// check panics.
async fn straddle_the_consistent_point(db: &TestDb) -> Result<(), String> {
    seed(db, 3, 0).await;
    let prefix = db.name.replace('_', "-");
    let cfg = config(db, &prefix, &common::tempfile_path("cdc-state"), 1000);
    let admin = pg("postgres").await;
    let (t0, t1, t) = (pg(&db.name).await, pg(&db.name).await, pg(&db.name).await);
    let checkpoints = || async {
        for _ in 0..2 {
            admin.batch_execute("CHECKPOINT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // T0 runs when the slot is asked for: the slot waits for it.
    t0.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let cdc = Cdc::start(&cfg);
    let reserved = format!(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}' AND restart_lsn IS NOT NULL",
        db.slot
    );
    let end = Instant::now() + Duration::from_secs(30);
    while admin.query(&reserved, &[]).await.unwrap().is_empty() {
        assert!(Instant::now() < end, "no slot: {:?}", cdc.tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A running-transactions record past the slot's start, before T1 has an xid: the
    // slot's first phase ends at the first record with T0 gone, and T1 is not older.
    admin.batch_execute("CHECKPOINT").await.unwrap();
    // T1 begins after that record: the slot's second phase waits for it.
    t1.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    t0.batch_execute("COMMIT").await.unwrap();
    checkpoints().await;
    // T begins after the second phase began: the consistent point does not wait for it.
    t.batch_execute("BEGIN; UPDATE orders SET status = 'straddled' WHERE id = 1")
        .await
        .unwrap();
    t1.batch_execute("COMMIT").await.unwrap();
    checkpoints().await;
    let end = Instant::now() + Duration::from_secs(15);
    while !cdc.logged("Created the replication slot") && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let created = cdc.logged("Created the replication slot");
    t.batch_execute("COMMIT").await.unwrap();
    if !created {
        return Err("the slot waited for T: a phase moved later".into());
    }
    wait_caught_up(db, &cdc).await;
    let created: Vec<String> = cdc
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("Created the replication slot"))
        .cloned()
        .collect();
    let consistent = created
        .first()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v["consistent_point"].as_str().map(lsn))
        .unwrap_or_else(|| panic!("no consistent point in the log: {created:?}"));
    let events = read_topic(&format!("{prefix}.public.orders"));
    let of_row_1 = |op: &str| {
        events
            .iter()
            .filter_map(|e| e.value.as_ref())
            .find(|v| v["op"] == op && v["after"]["id"] == 1)
            .unwrap_or_else(|| panic!("no {op} event for order 1"))
            .clone()
    };
    let (read, update) = (of_row_1("r"), of_row_1("u"));
    let change_lsn = update["source"]["lsn"].as_u64().unwrap();
    if change_lsn >= consistent {
        return Err(format!(
            "T's change at {change_lsn} is past the consistent point {consistent}"
        ));
    }
    assert_eq!(read["after"]["status"], "old", "the snapshot saw T: {read}");
    let (r, u) = (
        read["source"]["row_version"].as_u64().unwrap(),
        update["source"]["row_version"].as_u64().unwrap(),
    );
    assert!(
        u > r,
        "the update's version {u} is not above the snapshot row's {r}"
    );
    let (_, problems) = fold(&events);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(cdc.errors().is_empty(), "{:?}", cdc.errors());
    Ok(())
}

/// "16/B374D848" -> its 64-bit LSN.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}
