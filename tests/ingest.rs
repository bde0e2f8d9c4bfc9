//! `chgate ingest` end to end: the real broker (tansu), kcat producing, the real cluster,
//! and the proxy's pick API. Each test uses its own topics and event names.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The shards' replicas, by shard.
const SHARDS: [[&str; 2]; 2] = [[NODES[0], NODES[1]], [NODES[2], NODES[3]]];

/// Per shard, the replica with the most rows of `event` and how many, among those that
/// answer within 3 s (tests stop replicas; a twin may still be fetching).
fn fullest_replicas(event: &str) -> Vec<Option<(u64, &'static str)>> {
    let sql = format!("SELECT count() FROM demo.events_local WHERE event = '{event}'");
    SHARDS
        .iter()
        .map(|replicas| {
            replicas
                .iter()
                .filter_map(|node| {
                    let n = direct_within(node, &sql, 3)?.trim().parse::<u64>().ok()?;
                    Some((n, *node))
                })
                .max()
        })
        .collect()
}

/// Rows of `event` now: per shard, what its fullest answering replica has.
fn rows_now(event: &str) -> u64 {
    fullest_replicas(event)
        .iter()
        .flatten()
        .map(|(n, _)| n)
        .sum()
}

/// Polls the count of `event` until it reaches `want` (or the deadline).
fn wait_for_rows(event: &str, want: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        let n = rows_now(event);
        if n >= want || Instant::now() > end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts a sidecar on `config` (off the runtime: it waits for the process to listen).
async fn start_ingest(config: String) -> IngestProcess {
    tokio::task::spawn_blocking(move || IngestProcess::start(&config))
        .await
        .unwrap()
}

/// Starts a sidecar again on its config file.
async fn restart_ingest(path: std::path::PathBuf) -> IngestProcess {
    tokio::task::spawn_blocking(move || IngestProcess::start_with(path))
        .await
        .unwrap()
}

/// Waits until a line of the sidecar's log contains `text`; fails saying `what` if none
/// does `within`.
async fn wait_for_log(ingest: &IngestProcess, text: &str, within: Duration, what: &str) {
    let end = Instant::now() + within;
    while !ingest.log.lock().unwrap().iter().any(|l| l.contains(text)) {
        assert!(Instant::now() < end, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`rows_now`] off the runtime.
async fn count_of(event: &str) -> u64 {
    let event = event.to_string();
    tokio::task::spawn_blocking(move || rows_now(&event))
        .await
        .unwrap()
}

/// Where ZooKeeper lists the parts `node` has committed (its replica of its shard).
fn committed_parts_path(node: &str) -> String {
    let shard = SHARDS.iter().position(|r| r.contains(&node)).unwrap() + 1;
    // The stack's replicas are named after their address: 127.0.0.13 is ch3.
    let replica = format!(
        "ch{}",
        node.rsplit('.').next().unwrap().trim_start_matches('1')
    );
    format!("/clickhouse/tables/{shard}/demo/events_local/replicas/{replica}/parts")
}

/// `exprs` over the rows of `event`, read from the fullest answering replica of each shard
/// (not through the Distributed table, which may read a replica another test has just
/// resumed from SIGSTOP and which has not caught up yet), counting only the parts
/// ZooKeeper lists for that replica. A replica whose ZooKeeper session ends during an
/// insert answers "Unknown status, client must retry" and keeps the part it wrote, outside
/// ZooKeeper, until its part check drops it five minutes later (ClickHouse's
/// `MAX_AGE_OF_LOCAL_PART_THAT_WASNT_ADDED_TO_ZOOKEEPER`); the sidecar has written the block
/// to the twin meanwhile, as ClickHouse asks. Such a part is no write of the shard: a
/// block the sidecar wrote twice is in ZooKeeper twice, and counted twice.
async fn totals(event: &str, exprs: &str) -> String {
    let (event, exprs) = (event.to_string(), exprs.to_string());
    tokio::task::spawn_blocking(move || {
        // Both replicas of a shard may be stopped by another test for a while.
        let end = Instant::now() + Duration::from_secs(60);
        let live: Vec<&str> = loop {
            let fullest = fullest_replicas(&event);
            if fullest.iter().all(Option::is_some) {
                break fullest
                    .into_iter()
                    .flatten()
                    .map(|(_, node)| node)
                    .collect();
            }
            assert!(
                Instant::now() < end,
                "a shard has no replica answering: {fullest:?}"
            );
        };
        let shards: Vec<String> = live
            .iter()
            .map(|node| {
                format!(
                    "SELECT * FROM remote('{node}', demo.events_local, 'chgate', '{}') \
                     WHERE event = '{event}' AND _part IN \
                     (SELECT name FROM system.zookeeper WHERE path = '{}')",
                    secret("chgate"),
                    committed_parts_path(node)
                )
            })
            .collect();
        direct(
            NODES[0],
            &format!("SELECT {exprs} FROM ({})", shards.join(" UNION ALL ")),
        )
    })
    .await
    .unwrap()
}

/// Fails with `message`, the sidecars' last warnings, and their whole logs in a file.
fn fail_with_logs(message: &str, sidecars: &[&IngestProcess]) -> ! {
    let all: Vec<String> = sidecars
        .iter()
        .flat_map(|s| s.log.lock().unwrap().clone())
        .collect();
    let warnings: Vec<&String> = all
        .iter()
        .filter(|l| !l.contains("\"INFO\"") && !l.contains("\"DEBUG\""))
        .collect();
    let tail = &warnings[warnings.len().saturating_sub(30)..];
    let path = tempfile_path("ingest-failure");
    let _ = std::fs::write(&path, all.join("\n"));
    panic!(
        "{message}; the sidecars' last warnings: {tail:#?}; whole logs in {}",
        path.display()
    );
}

/// Waits for `n` rows of `event` (user ids 0..n), lets a quiet moment pass for anything
/// extra to arrive, then checks that every id is there exactly once.
/// `sidecars` are the ones running, whose warnings a failure shows.
async fn exactly_once(event: &str, n: u64, what: &str, sidecars: &[&IngestProcess]) {
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        let got = count_of(event).await;
        if got >= n {
            break;
        }
        if Instant::now() >= end {
            fail_with_logs(&format!("{what}: {got} rows, never reached {n}"), sidecars);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let check = totals(event, "count(), uniqExact(user_id), sum(user_id)").await;
    let sum: u64 = (0..n).sum();
    let want = format!("{n}\t{n}\t{sum}\n");
    if check != want {
        let event = event.to_string();
        let parts = tokio::task::spawn_blocking(move || parts_of_repeats(&event))
            .await
            .unwrap();
        fail_with_logs(
            &format!(
                "{what}: a row lost or written twice: count, distinct ids, sum {check:?}, want {want:?}; \
                 parts holding repeated ids, per node:\n{parts}"
            ),
            sidecars,
        );
    }
}

/// Per node that answers, the parts holding ids of `event` that are there more than once:
/// part name, rows of them, their id range, when the part was written and whether
/// ZooKeeper lists it (a repeat in two listed parts is a block deduplication missed; one
/// in a part it does not list, a replica's insert of unknown status, see [`totals`]).
fn parts_of_repeats(event: &str) -> String {
    NODES
        .iter()
        .map(|node| {
            let sql = format!(
                "SELECT p._part, count(), min(user_id), max(user_id), any(w.modification_time), \
                        p._part IN (SELECT name FROM system.zookeeper WHERE path = '{}') \
                 FROM (SELECT _part, user_id FROM demo.events_local WHERE event = '{event}' \
                       AND user_id IN (SELECT user_id FROM demo.events_local \
                                       WHERE event = '{event}' GROUP BY user_id \
                                       HAVING count() > 1)) AS p \
                 ANY LEFT JOIN (SELECT name AS _part, modification_time FROM system.parts \
                                WHERE database = 'demo' AND table = 'events_local') AS w \
                 USING _part GROUP BY p._part ORDER BY p._part",
                committed_parts_path(node)
            );
            let got = direct_within(node, &sql, 10).unwrap_or_else(|| "no answer\n".into());
            format!("{node}:\n{got}")
        })
        .collect()
}

/// `n` JSON events (user ids 0..n, value 1) keyed `k<id>`, with `ts(id)` as their time.
fn events(event: &str, n: u64, ts: impl Fn(u64) -> u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "k{i}\t{{\"ts\": {}, \"user_id\": {i}, \"event\": \"{event}\", \"value\": 1}}",
                ts(i)
            )
        })
        .collect()
}

/// [`produce`] off the runtime.
async fn produce_off(topic: &str, lines: Vec<String>) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || produce(&topic, &lines))
        .await
        .unwrap()
}

/// [`wait_for_rows`] off the runtime.
async fn rows_reaching(event: &str, want: u64) -> u64 {
    let event = event.to_string();
    tokio::task::spawn_blocking(move || wait_for_rows(&event, want))
        .await
        .unwrap()
}

fn ingest_config(
    topic: &str,
    dlq: &str,
    pick_api: Option<std::net::SocketAddr>,
    extra_task: &str,
    template: &str,
) -> String {
    format!(
        r#"{header}
[templates.t]
{template}
[tasks.main]
topic = "{topic}"
template = "t"
cluster = "demo"
account = "ingest"
table = "demo.events_local"
batch_rows = 5000
batch_age = "300ms"
dead_letter_topic = "{dlq}"
{extra_task}
"#,
        header = ingest_header(topic, pick_api),
    )
}

/// [`ingest_config`] for JSON messages, with `batching` (batch keys, and whatever tables
/// follow) in place of its batch size and age.
fn json_config_batched(topic: &str, dlq: &str, batching: &str) -> String {
    ingest_config(topic, dlq, None, batching, "format = \"json\"")
        .replace("batch_rows = 5000\nbatch_age = \"300ms\"\n", "")
}

/// A new topic (named from `prefix`) and its dead-letter topic, the first holding `n`
/// events of a new event name (from `event_prefix`), all stamped now: topic, dead-letter
/// topic, event name.
async fn topic_of_events(prefix: &str, event_prefix: &str, n: u64) -> (String, String, String) {
    let topic = unique(prefix);
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique(event_prefix);
    let now = unix_now();
    produce_off(&topic, events(&event, n, |_| now)).await;
    (topic, dlq, event)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lands_once_and_bad_messages_are_dead_lettered_with_reasons() {
    let topic = unique("ing_json");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let proxy = TestProxy::start(&grouped_config("")).await;
    let event = unique("ev");
    let now = unix_now();
    let n = 1_000_000u64;
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            // Both time forms, unknown fields, nested junk.
            let ts = if i % 2 == 0 {
                format!("{}", now - i % 3600)
            } else {
                "\"2026-11-01 12:00:00\"".to_string()
            };
            format!(
                "k{i}\t{{\"ts\": {ts}, \"user_id\": {i}, \"event\": \"{event}\", \"value\": {}, \"extra\": {{\"a\": [1, 2]}}}}",
                i as f64 / 2.0
            )
        })
        .collect();
    lines.push("bad1\tnot json at all".into());
    lines.push(format!(
        "bad2\t{{\"ts\": {now}, \"user_id\": \"seven\", \"event\": \"{event}\"}}"
    ));
    lines.push(format!(
        "bad3\t{{\"ts\": 1000000000, \"user_id\": 1, \"event\": \"{event}\"}}"
    ));
    let config = ingest_config(
        &topic,
        &dlq,
        Some(proxy.admin),
        "[tasks.main.time_window]\ncolumn = \"ts\"\nmax_age = \"400d\"\nmax_future = \"1h\"",
        "format = \"json\"\n[templates.t.columns.ts]\nformats = [\"unix\", \"%Y-%m-%d %H:%M:%S\"]",
    );
    let mut ingest = start_ingest(config).await;
    let lines2 = lines.clone();
    produce_off(&topic, lines2).await;
    let got = rows_reaching(&event, n).await;
    assert_eq!(got, n);
    let check = totals(
        &event,
        "count(), uniqExact(user_id), sum(user_id), sum(value)",
    )
    .await;
    let sum: u64 = (0..n).sum();
    let values: f64 = (0..n).map(|i| i as f64 / 2.0).sum();
    assert_eq!(check, format!("{n}\t{n}\t{sum}\t{values}\n"));

    let dlq2 = dlq.clone();
    let dead = tokio::task::spawn_blocking(move || dead_letters(&dlq2, 3))
        .await
        .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let find = |payload: &str| {
        dead.iter()
            .find(|(p, _)| p.contains(payload))
            .unwrap_or_else(|| panic!("{payload} not dead-lettered: {dead:?}"))
    };
    assert!(find("not json").1.contains("chgate-reason=parse"));
    let type_error = &find("seven").1;
    assert!(
        type_error.contains("chgate-reason=type") && type_error.contains("user_id"),
        "{type_error}"
    );
    assert!(
        type_error.contains(&format!("chgate-source-topic={topic}")),
        "{type_error}"
    );
    assert!(type_error.contains("chgate-source-offset="), "{type_error}");
    assert!(find("1000000000").1.contains("chgate-reason=time_window"));

    // Every batch went through the proxy's pick API.
    let m = proxy.metrics().await;
    assert!(
        metric_sum(&m, "chgate_picks_total", &["purpose=\"write\""]) >= 4.0,
        "{m}"
    );
    let im = ingest.metrics();
    assert_eq!(
        metric_sum(&im, "chgate_ingest_consumed_total", &[]),
        (n + 3) as f64
    );
    assert_eq!(
        metric_sum(
            &im,
            "chgate_ingest_rows_written_total",
            &["table=\"demo.events_local\""]
        ),
        n as f64
    );
    assert_eq!(metric_sum(&im, "chgate_ingest_parsed_total", &[]), n as f64);

    // A clean stop commits: a restart writes nothing again.
    ingest.signal("TERM");
    assert!(ingest.wait(Duration::from_secs(30)).success());
    let path = ingest.config_path.clone();
    let again = restart_ingest(path).await;
    // Once it has its partitions back (and a few batch ages more), nothing new arrived.
    wait_for_log(
        &again,
        "Partitions assigned",
        Duration::from_secs(30),
        "the restarted sidecar never got its partitions",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = totals(&event, "count()").await;
    assert_eq!(
        after,
        format!("{n}\n"),
        "rows written twice after a clean restart"
    );
    assert_eq!(
        metric_sum(&again.metrics(), "chgate_ingest_rows_written_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delimited_text_and_key_sharding_put_each_key_on_one_shard() {
    let topic = unique("ing_delim");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("dl");
    let n = 3_000u64;
    let lines: Vec<String> = (0..n)
        .map(|i| format!("k{i}\t{}||{}||\"{event}\"||{}", unix_now(), i % 50, i))
        .collect();
    // No pick API: the sidecar's own picker chooses replicas.
    let config = ingest_config(
        &topic,
        &dlq,
        None,
        "sharding = \"key\"\nkey = \"user_id\"",
        "format = \"delimited\"\nseparator = \"||\"\nfields = [\"ts\", \"user_id\", \"event\", \"value\"]",
    );
    let _ingest = start_ingest(config).await;
    produce_off(&topic, lines).await;
    let got = rows_reaching(&event, n).await;
    assert_eq!(got, n);
    // Both replicas of a shard: the twin of the node a batch went to may not have
    // fetched it yet.
    let keys = |replicas: &[&str]| -> Vec<u64> {
        let mut keys: Vec<u64> = replicas
            .iter()
            .flat_map(|node| {
                direct(
                    node,
                    &format!(
                        "SELECT DISTINCT user_id FROM demo.events_local WHERE event = '{event}'"
                    ),
                )
                .lines()
                .map(|l| l.parse().unwrap())
                .collect::<Vec<u64>>()
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    let (shard1, shard2) = (keys(&NODES[..2]), keys(&NODES[2..]));
    assert!(
        !shard1.is_empty() && !shard2.is_empty(),
        "{shard1:?} {shard2:?}"
    );
    assert!(
        shard1.iter().all(|k| !shard2.contains(k)),
        "a key on both shards"
    );
    assert_eq!(shard1.len() + shard2.len(), 50);
}

/// A bad message larger than the dead-letter producer takes (`message.max.bytes` lowered
/// to 20,000 here; librdkafka's default is 1,000,000 while topics may take more): it goes
/// to the dead-letter topic without its payload, saying so, instead of holding its
/// partition back for ever; the rows after it land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_goes_without_its_payload() {
    let topic = unique("ing_big_dlq");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("bigdlq");
    let now = unix_now();
    let mut lines = vec![format!("big\tnot json {}", "x".repeat(50_000))];
    lines.extend(events(&event, 100, |_| now));
    produce_off(&topic, lines).await;
    let config = ingest_config(&topic, &dlq, None, "", "format = \"json\"").replace(
        "properties = { \"fetch.wait.max.ms\" = \"10\" }",
        "properties = { \"fetch.wait.max.ms\" = \"10\", \"message.max.bytes\" = \"20000\" }",
    );
    assert!(config.contains("message.max.bytes"));
    let ingest = start_ingest(config).await;
    let got = rows_reaching(&event, 100).await;
    assert_eq!(got, 100, "the rows after the big bad message did not land");
    let dlq2 = dlq.clone();
    let dead = tokio::task::spawn_blocking(move || dead_letters(&dlq2, 1))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.is_empty(), "the payload went along");
    assert!(
        dead[0].1.contains("chgate-reason=parse") && dead[0].1.contains("not included"),
        "{}",
        dead[0].1
    );
    drop(ingest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_three_times_with_a_replica_stopped_still_exactly_once() {
    let topic = unique("ing_kill");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("kill");
    let n = 1_000_000u64;
    let now = unix_now();
    let lines = events(&event, n, |i| now - i % 1000);
    produce_off(&topic, lines).await;
    let config = json_config_batched(&topic, &dlq, "batch_rows = 2000\nbatch_age = \"200ms\"");
    let mut ingest = start_ingest(config).await;
    // One replica of shard 2 stops answering for part of the run.
    let mut stopped = None;
    let mut killed = Vec::new();
    for round in 1..=3u64 {
        let target = n * round / 5;
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let got = count_of(&event).await;
            if got >= target {
                break;
            }
            if Instant::now() >= end {
                fail_with_logs(
                    &format!("round {round}: stuck at {got}, below {target}"),
                    &[&ingest],
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if round == 1 {
            stopped = Some(Frozen::stop(&[("ch4", NODES[3])]));
        }
        ingest.signal("KILL");
        ingest.wait(Duration::from_secs(10));
        let path = ingest.config_path.clone();
        killed.push(std::mem::replace(&mut ingest, restart_ingest(path).await));
    }
    drop(stopped);
    // A failure shows every run's warnings, the killed ones' first.
    let mut runs: Vec<&IngestProcess> = killed.iter().collect();
    runs.push(&ingest);
    exactly_once(&event, n, "killed 3 times", &runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_shard_down_holds_only_what_must_go_there() {
    let topic = unique("ing_shard");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("sh");
    let n = 60_000u64;
    let now = unix_now();
    let lines = events(&event, n, |_| now);
    produce_off(&topic, lines).await;
    let config = json_config_batched(&topic, &dlq, "batch_rows = 1000\nbatch_age = \"200ms\"");
    // Both replicas of shard 2 stop answering before the sidecar starts.
    let frozen = Frozen::stop(&[("ch3", NODES[2]), ("ch4", NODES[3])]);
    let ingest = start_ingest(config).await;
    // Shard 1 keeps taking batches: most rows arrive while shard 2 is down. (Count on shard
    // 1's node directly: the Distributed table would wait for shard 2.)
    let local = |node: &'static str, event: String| async move {
        tokio::task::spawn_blocking(move || {
            direct(
                node,
                &format!("SELECT count() FROM demo.events_local WHERE event = '{event}'"),
            )
            .trim()
            .parse::<u64>()
            .unwrap()
        })
        .await
        .unwrap()
    };
    let end = Instant::now() + Duration::from_secs(90);
    while local(NODES[0], event.clone()).await < n * 8 / 10 {
        assert!(
            Instant::now() < end,
            "shard 1 stopped flowing while shard 2 was down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting = n - local(NODES[0], event.clone()).await;
    drop(frozen);
    // Shard 2 back: what waited for it lands; nothing is lost or doubled.
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let total = local(NODES[0], event.clone()).await + local(NODES[2], event.clone()).await;
        if total >= n {
            break;
        }
        assert!(
            Instant::now() < end,
            "stuck at {total} of {n} after shard 2 came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let check = totals(&event, "count(), uniqExact(user_id)").await;
    assert_eq!(
        check,
        format!("{n}\t{n}\n"),
        "{waiting} rows had waited for shard 2"
    );
    drop(ingest);
}

/// SIGTERM while writers wait for a shard that is down: they give up at once instead of
/// holding the drain up for its 30 s limit, and the next run writes their segments, once.
/// (Shard 2 is "down" by its replicas' addresses in the first run's config, which answer
/// nothing: freezing the real nodes would also freeze other tests' inserts under them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_shard_that_is_down() {
    let n = 20_000u64;
    let (topic, dlq, event) = topic_of_events("ing_term", "tm", n).await;
    // Keyed: a segment's rows of shard 2 can go nowhere else.
    let config = ingest_config(
        &topic,
        &dlq,
        None,
        "sharding = \"key\"\nkey = \"user_id\"",
        "format = \"json\"",
    );
    let unreachable = config
        .replace("\"127.0.0.13\"", "\"127.0.0.98\"")
        .replace("\"127.0.0.14\"", "\"127.0.0.99\"");
    assert_ne!(unreachable, config);
    let mut ingest = start_ingest(unreachable).await;
    wait_for_log(
        &ingest,
        "No node for a batch",
        Duration::from_secs(60),
        "no writer waited for shard 2",
    )
    .await;
    let asked = Instant::now();
    ingest.signal("TERM");
    let status = tokio::task::block_in_place(|| ingest.wait(Duration::from_secs(60)));
    let took = asked.elapsed();
    if !status.success() || took > Duration::from_secs(10) {
        fail_with_logs(
            &format!("SIGTERM with shard 2 down: {status} after {took:?}"),
            &[&ingest],
        );
    }
    let said = ingest
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("cannot be written now stays uncommitted"));
    if !said {
        fail_with_logs(
            "no writer said it left its segment to the next run",
            &[&ingest],
        );
    }
    let again = start_ingest(config).await;
    exactly_once(&event, n, "after a SIGTERM with shard 2 down", &[&again]).await;
}

/// Rows of `event` in a local table, counted on the first replica of each shard.
fn rows_in(table: &str, event: &str) -> u64 {
    [NODES[0], NODES[2]]
        .iter()
        .map(|node| {
            direct(
                node,
                &format!("SELECT count() FROM {table} WHERE event = '{event}'"),
            )
            .trim()
            .parse::<u64>()
            .unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_refuses_go_alone_to_the_dead_letter_topic() {
    // Arrays of one Nested column that differ in length: each value is fine on its own (the
    // template encodes it), only ClickHouse sees the row is wrong (Code 190). Nothing in the
    // refused insert is written, so splitting finds exactly the bad rows. (The table,
    // demo.refusals_local, comes with the stack: scripts/dev-stack.)
    let topic = unique("ing_refuse");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("rf");
    let now = unix_now();
    let n = 6_000u64;
    let bad = |i: u64| i % 1000 == 7;
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let b = if bad(i) { "[3]" } else { "[3, 4]" };
            format!("k{i}\t{{\"ts\": {now}, \"user_id\": {i}, \"event\": \"{event}\", \"a\": [1, 2], \"b\": {b}}}")
        })
        .collect();
    let config = ingest_config(
        &topic,
        &dlq,
        None,
        "",
        "format = \"json\"\n[templates.t.columns.\"n.a\"]\npath = \"a\"\n[templates.t.columns.\"n.b\"]\npath = \"b\"",
    )
    .replace("table = \"demo.events_local\"", "table = \"demo.refusals_local\"");
    let ingest = start_ingest(config).await;
    produce_off(&topic, lines).await;
    let good = n - (0..n).filter(|&i| bad(i)).count() as u64;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let ev = event.clone();
        let got = tokio::task::spawn_blocking(move || rows_in("demo.refusals_local", &ev))
            .await
            .unwrap();
        if got >= good {
            assert_eq!(got, good);
            break;
        }
        assert!(Instant::now() < end, "only {got} of {good} rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dlq2 = dlq.clone();
    let dead = tokio::task::spawn_blocking(move || dead_letters(&dlq2, 6))
        .await
        .unwrap();
    assert_eq!(dead.len(), 6, "{dead:?}");
    for (payload, headers) in &dead {
        // The original message, read again from the partition: the pipeline keeps rows,
        // not messages.
        assert!(payload.contains("\"b\": [3]}"), "{payload}");
        assert!(headers.contains("chgate-reason=refused"), "{headers}");
        assert!(headers.contains("different array sizes"), "{headers}");
        let id: u64 = payload
            .split("\"user_id\": ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(bad(id), "{id} was a good row");
    }
    let m = ingest.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "chgate_ingest_dead_letters_total",
            &["reason=\"refused\""]
        ),
        6.0
    );
    // A node that refuses data is not a failing node. (Other tests freeze replicas while
    // this one runs: a node that went down is a failure, but not for its data.)
    let failed: Vec<String> = ingest
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("Insert failed"))
        .cloned()
        .collect();
    let went_down = failed.iter().filter(|l| l.contains("went down")).count();
    assert_eq!(went_down, failed.len(), "{failed:?}");
    assert_eq!(
        metric_sum(&m, "chgate_ingest_insert_failures_total", &[]),
        went_down as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_ceiling_pauses_the_partitions_and_loses_nothing() {
    let topic = unique("ing_ceiling");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("cl");
    let now = unix_now();
    let n = 40_000u64;
    let padding = "p".repeat(900);
    let lines: Vec<String> = (0..n)
        .map(|i| format!("k{i}\t{{\"ts\": {now}, \"user_id\": {i}, \"event\": \"{event}\", \"value\": 1, \"padding\": \"{padding}\"}}"))
        .collect();
    // 4 MiB of held bytes: ~4,000 of these messages unparsed, far less than a batch of
    // 5,000 rows is worth in JSON; the rows it becomes are ~40 bytes each.
    let config = ingest_config(
        &topic,
        &dlq,
        None,
        "[limits]\nmax_pending_bytes = 4194304",
        "format = \"json\"",
    );
    let ingest = start_ingest(config).await;
    produce_off(&topic, lines).await;
    let got = rows_reaching(&event, n).await;
    assert_eq!(got, n);
    let check = totals(&event, "count(), uniqExact(user_id)").await;
    assert_eq!(check, format!("{n}\t{n}\n"));
    let m = ingest.metrics();
    assert!(
        metric_sum(&m, "chgate_ingest_pauses_total", &[]) >= 1.0,
        "never paused: {m}"
    );
    assert_eq!(
        metric_sum(&m, "chgate_ingest_broker_skipped_offsets_total", &[]),
        0.0
    );
    // Once everything is committed, nothing is held and nothing is paused.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let m = ingest.metrics();
        if metric_sum(&m, "chgate_ingest_pending_bytes", &[]) == 0.0
            && metric_sum(&m, "chgate_ingest_paused_partitions", &[]) == 0.0
        {
            break;
        }
        assert!(Instant::now() < end, "still holding or paused: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sidecar_takes_partitions_over_mid_stream_exactly_once() {
    let topic = unique("ing_pair");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("pr");
    let now = unix_now();
    let n = 150_000u64;
    let mut lines = events(&event, n, |_| now);
    let later = lines.split_off(n as usize / 2);
    produce_off(&topic, lines).await;
    // tansu 0.6 never hands a partition a static member gave up under cooperative-sticky
    // to the member that joined: an eager strategy (config/ingest-local.toml says more).
    let config = ingest_config(&topic, &dlq, None, "", "format = \"json\"").replace(
        "properties = { ",
        "properties = { \"partition.assignment.strategy\" = \"roundrobin\", ",
    );
    let second = config.replace(
        &format!("instance_id = \"{topic}-1\""),
        &format!("instance_id = \"{topic}-2\""),
    );
    assert_ne!(config, second);
    let first = start_ingest(config).await;
    let end = Instant::now() + Duration::from_secs(120);
    while count_of(&event).await < n / 10 {
        assert!(Instant::now() < end, "the first sidecar wrote nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The group rebalances: the first sidecar gives partitions up mid-stream (what it held
    // of them is dropped; their new owner resumes from the intents).
    let second = start_ingest(second).await;
    // The second half arrives once the second sidecar has partitions of its own.
    wait_for_log(
        &second,
        "Partitions assigned",
        Duration::from_secs(60),
        "the second sidecar never got partitions",
    )
    .await;
    produce_off(&topic, later).await;
    exactly_once(&event, n, "two sidecars", &[&first, &second]).await;
    let revoked = first
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("Partitions revoked"));
    assert!(revoked, "the first sidecar never gave a partition up");
    let took = metric_sum(&second.metrics(), "chgate_ingest_consumed_total", &[]);
    assert!(took > 0.0, "the second sidecar consumed nothing");
}

/// The fencing under a partition hand-over (`ingest::intents`), against the stack's
/// ZooKeeper: two clients stand for the old and the new owner of a partition.
#[tokio::test]
async fn a_partition_claimed_by_another_consumer_fences_its_old_writer() {
    use chgate::ingest::intents::{Intent, Intents, RecordError};
    let root = format!("/chgate-tests/{}", unique("fence"));
    let zk = ["127.0.0.1:2181".to_string()];
    let old = Intents::connect(&zk, &root).await.unwrap();
    let new = Intents::connect(&zk, &root).await.unwrap();
    let (nothing, v_old) = old.claim("g", "t", 0).await.unwrap();
    assert_eq!(nothing, None);
    let pending = Intent {
        first: 0,
        last: 9,
        clock: 0,
        shard: Some(1),
        done: false,
    };
    let v_old = old.record("g", "t", 0, &pending, v_old).await.unwrap();
    // The new owner takes over and sees what the old one had recorded.
    let (seen, v_new) = new.claim("g", "t", 0).await.unwrap();
    assert_eq!(seen, Some(pending));
    // The old owner, still believing it holds the partition, can record nothing more.
    let done = Intent {
        done: true,
        ..pending
    };
    assert!(matches!(
        old.record("g", "t", 0, &done, v_old).await,
        Err(RecordError::Fenced)
    ));
    let next = Intent {
        first: 10,
        last: 19,
        ..pending
    };
    assert!(matches!(
        old.record("g", "t", 0, &next, v_old).await,
        Err(RecordError::Fenced)
    ));
    // The new owner goes on; a partition never seen is claimed too.
    let v_new = new.record("g", "t", 0, &done, v_new).await.unwrap();
    new.record("g", "t", 0, &next, v_new).await.unwrap();
    assert_eq!(old.load("g", "t", 0).await.unwrap(), Some(next));
    let (nothing, _) = new.claim("g", "t", 1).await.unwrap();
    assert_eq!(nothing, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_after_catching_up_it_writes_nothing_twice() {
    // A sidecar that has written everything records intents at the partitions' very ends.
    // tansu reports an end below that (the first offset of the last record batch): taken
    // for a recreated topic, the intents were dropped and the partitions written again
    // from the committed offset, which a SIGKILL leaves behind.
    let topic = unique("ing_caught_up");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let event = unique("cu");
    let now = unix_now();
    let all = events(&event, 20_000, |_| now);
    let config = ingest_config(&topic, &dlq, None, "", "format = \"json\"");
    let mut ingest = start_ingest(config).await;
    produce_off(&topic, all[..10_000].to_vec()).await;
    assert_eq!(rows_reaching(&event, 10_000).await, 10_000);
    ingest.signal("KILL");
    ingest.wait(Duration::from_secs(10));
    let path = ingest.config_path.clone();
    let again = restart_ingest(path).await;
    // The rest only once the partitions are back (and their ends looked up).
    wait_for_log(
        &again,
        "Partitions assigned",
        Duration::from_secs(60),
        "the restarted sidecar got no partitions",
    )
    .await;
    produce_off(&topic, all[10_000..].to_vec()).await;
    exactly_once(&event, 20_000, "restarted after catching up", &[&again]).await;
    let dropped: Vec<String> = again
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("past the partition's end"))
        .cloned()
        .collect();
    assert!(dropped.is_empty(), "intents dropped: {dropped:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_consumed_from_its_start() {
    // The intents outlive the topic: once it is deleted and created again its offsets start
    // at 0, below what was recorded. Kept, the intents would skip every new message.
    let topic = unique("ing_recreate");
    let dlq = format!("{topic}_dlq");
    create_topics(&topic, &dlq);
    let now = unix_now();
    let batch = |event: &str, n: u64| events(event, n, |_| now);
    let before = unique("rc1");
    let config = ingest_config(&topic, &dlq, None, "", "format = \"json\"");
    let mut ingest = start_ingest(config).await;
    produce_off(&topic, batch(&before, 3_000)).await;
    let got = rows_reaching(&before, 3_000).await;
    assert_eq!(got, 3_000);
    ingest.signal("TERM");
    assert!(ingest.wait(Duration::from_secs(30)).success());

    stack_shell(&format!(
        "tansu topic delete {topic} --broker tcp://127.0.0.1:9092 >/dev/null\n\
         tansu topic create {topic} --partitions 3 --broker tcp://127.0.0.1:9092 >/dev/null"
    ));
    let after = unique("rc2");
    produce_off(&topic, batch(&after, 500)).await;
    let path = ingest.config_path.clone();
    let again = restart_ingest(path).await;
    let got = rows_reaching(&after, 500).await;
    assert_eq!(got, 500);
    let dropped = again
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("past the partition's end"))
        .count();
    assert!(dropped >= 1, "no stale intent was noticed");
}

/// The sidecar's insert body is one compressed block (`ingest::compress`), so a body cut
/// short by a crash mid-send is refused whole; a plain RowBinary body cut on a row boundary
/// is inserted as a smaller block, which a rebuilt batch could not be deduplicated against.
#[test]
fn a_cut_insert_body_is_refused() {
    let event = unique("cut");
    let row = |i: u64| {
        let mut out = Vec::new();
        out.extend_from_slice(&1_767_225_600u32.to_le_bytes());
        out.extend_from_slice(&i.to_le_bytes());
        out.push(event.len() as u8);
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(&(i as f64).to_le_bytes());
        out
    };
    let rows: Vec<u8> = (0..3).flat_map(row).collect();
    let two_rows = 2 * rows.len() / 3;
    let insert = |body: &[u8], compressed: bool| {
        let path = tempfile_path("cut-body");
        std::fs::write(&path, body).unwrap();
        let sql = "INSERT INTO demo.events_local (ts, user_id, event, value) FORMAT RowBinary";
        let url = format!(
            "http://{}:8123/?decompress={}&query={}",
            NODES[0],
            u8::from(compressed),
            sql.replace(' ', "+")
        );
        let out = curl(&[
            "-sS",
            "-u",
            &format!("chgate:{}", secret("chgate")),
            &url,
            "--data-binary",
            &format!("@{}", path.display()),
        ]);
        let _ = std::fs::remove_file(&path);
        out
    };
    let count = || {
        direct(
            NODES[0],
            &format!("SELECT count() FROM demo.events_local WHERE event = '{event}'"),
        )
        .trim()
        .parse::<u64>()
        .unwrap()
    };

    let block = chgate::clickhouse::compress::lz4_block(&rows).unwrap();
    for cut in [block.len() - 1, block.len() / 2, 30, 10] {
        let out = insert(&block[..cut], true);
        assert_ne!(out.status, 200, "a block cut at {cut} bytes was taken");
        assert!(
            out.body.contains("Cannot read all data") || out.body.contains("compressed"),
            "cut at {cut}: {}",
            out.body
        );
    }
    assert_eq!(count(), 0, "nothing of a cut block lands");
    // Plain RowBinary cut after two rows: ClickHouse takes the two.
    let out = insert(&rows[..two_rows], false);
    assert_eq!(out.status, 200, "{}", out.body);
    assert_eq!(count(), 2);
    let out = insert(&block, true);
    assert_eq!(out.status, 200, "{}", out.body);
    assert_eq!(count(), 5);
}

/// Killed right after an insert (a failpoint's SIGKILL, before the done record), then sent
/// SIGTERM as soon as the next run resumes that pending 40,000-row segment, then run to
/// the end: every row once. (Whether the SIGTERM lands before the rebuild is whole depends
/// on how fast the broker hands the range back; tansu is quick, so this does not pin the
/// worker's stop path for a segment cut short: see `src/ingest/DESIGN.md`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_right_after_resuming_a_pending_segment_still_exactly_once() {
    let n = 150_000u64;
    let (topic, dlq, event) = topic_of_events("ing_term", "term", n).await;
    let config = json_config_batched(&topic, &dlq, "batch_rows = 40000\nbatch_age = \"5s\"");
    let path = tempfile_path("ingest").with_extension("toml");
    std::fs::write(&path, &config).unwrap();

    let p = path.clone();
    let first = tokio::task::spawn_blocking(move || IngestProcess::killed_after_first_insert(p))
        .await
        .unwrap();

    let mut second = restart_ingest(path.clone()).await;
    wait_for_log(
        &second,
        "\"done\":false",
        Duration::from_secs(60),
        "the second run never resumed the pending segment",
    )
    .await;
    second.signal("TERM");
    let status = tokio::task::block_in_place(|| second.wait(Duration::from_secs(40)));
    assert!(status.success(), "{status:?}");

    let third = restart_ingest(path).await;
    exactly_once(
        &event,
        n,
        "killed, then stopped while resuming",
        &[&first, &second, &third],
    )
    .await;
}

/// Killed right after an insert (a pending intent for a 20,000-row segment, its rows in
/// ClickHouse), then restarted with a memory ceiling of 256 KiB, far below what that
/// segment holds while it is rebuilt. A rebuilt segment cannot be cut short (it must be
/// the same block again), so the ceiling must not pause its partition: paused, it would
/// hold its bytes and wait for its messages forever, and nothing more would be written.
/// Every row lands once, and the ceiling still paused the partitions that had settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_segment_larger_than_the_ceiling_is_still_rebuilt_whole() {
    let n = 90_000u64;
    let (topic, dlq, event) = topic_of_events("ing_rebuild", "rb", n).await;
    let config = |limits: &str| {
        json_config_batched(
            &topic,
            &dlq,
            &format!("batch_rows = 20000\nbatch_age = \"2s\"\n{limits}"),
        )
    };
    let path = tempfile_path("ingest").with_extension("toml");
    std::fs::write(&path, config("")).unwrap();
    let p = path.clone();
    let first = tokio::task::spawn_blocking(move || IngestProcess::killed_after_first_insert(p))
        .await
        .unwrap();

    std::fs::write(&path, config("[limits]\nmax_pending_bytes = 262144")).unwrap();
    let second = restart_ingest(path).await;
    wait_for_log(
        &second,
        "\"done\":false",
        Duration::from_secs(60),
        "the second run never resumed the pending segment",
    )
    .await;
    exactly_once(
        &event,
        n,
        "a pending segment over the ceiling",
        &[&first, &second],
    )
    .await;
    let m = second.metrics();
    assert!(
        metric_sum(&m, "chgate_ingest_pauses_total", &[]) >= 1.0,
        "the ceiling never paused anything, so this proved nothing: {m}"
    );
}
