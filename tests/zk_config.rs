//! The config in ZooKeeper, against the stack's ensemble A and real chgate processes: two
//! proxies on one root follow pushes (a new user, a removed one, an added replica), an
//! invalid push is refused with its reason and changes nothing, a znode broken by hand with
//! zkCli is refused as a whole while the old config serves, a rollback restores a kept
//! version; with ZooKeeper unreachable both keep serving, one restarted meanwhile starts
//! from its cache, and a change made once it is back reaches both; a user's concurrency
//! limit is shared out among the live proxies and taken back when one stops.
//!
//! "ZooKeeper unreachable" is a TCP relay in front of ensemble A that the test cuts: the
//! proxies lose it exactly as they would lose the ensemble, while the ClickHouse nodes (and
//! other tests) keep theirs.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const ZK_A: &str = "127.0.0.1:2181";

/// A config root of the test's own, with a bootstrap file per proxy.
struct Root {
    root: String,
    dir: PathBuf,
    zookeeper: String,
}

impl Root {
    fn new(zookeeper: &str) -> Self {
        let root = format!("/chgate/test/{}", unique("cfg"));
        let dir = tempfile_path("zkcfg");
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            root,
            dir,
            zookeeper: zookeeper.to_string(),
        }
    }

    /// A bootstrap file for proxy `name` (listeners on free ports, its own cache file).
    fn bootstrap(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            bootstrap_toml(&self.zookeeper, &self.root, &format!("{name}.cache.toml")),
        )
        .unwrap();
        path
    }

    /// `chgate config <args>` with the first proxy's bootstrap; (success, stdout, stderr).
    fn config(&self, args: &[&str]) -> (bool, String, String) {
        let boot = self.bootstrap("cli");
        let out = Command::new(env!("CARGO_BIN_EXE_chgate"))
            .arg("config")
            .args(args)
            .arg("--config")
            .arg(&boot)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Pushes `text`; panics with chgate's reasons if it is refused.
    fn push(&self, text: &str) -> String {
        let (ok, out, err) = self.try_push(text);
        assert!(ok, "push refused: {err}");
        out
    }

    fn try_push(&self, text: &str) -> (bool, String, String) {
        let file = self.dir.join(format!("{}.toml", unique("push")));
        std::fs::write(&file, text).unwrap();
        self.config(&["push", "--file", file.to_str().unwrap()])
    }
}

/// The dynamic config: cluster `demo` over `hosts`, users `names` (password `pw`) with
/// quota `fair` (`quota` is its body).
fn dynamic(hosts: &[&str], names: &[&str], quota: &str) -> String {
    let replicas: Vec<String> = hosts
        .iter()
        .map(|h| format!("{{ host = \"{h}\" }}"))
        .collect();
    let mut text = format!(
        r#"
[clusters.demo]
shards = [{{ replicas = [{}] }}]
[clusters.demo.accounts.chgate]
user = "chgate"
password_file = "{}"
[picker]
probe_interval = "300ms"
probe_timeout = "300ms"
probe_retry_interval = "100ms"
[quotas.fair]
{quota}
"#,
        replicas.join(", "),
        secret_file("chgate").display()
    );
    for name in names {
        text.push_str(&format!(
            "[users.{name}]\npassword_hash = \"{}\"\ncluster = \"demo\"\naccount = \"chgate\"\nquota = \"fair\"\n",
            hash_once()
        ));
    }
    text
}

/// One hash of "pw" for every user (Argon2 is slow in debug builds).
fn hash_once() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash("pw"))
}

/// A proxy's listeners (copied, so checks can be `'static` closures).
#[derive(Clone, Copy)]
struct Addrs {
    http: SocketAddr,
    admin: SocketAddr,
}

fn addrs(p: &ProxyProcess) -> Addrs {
    Addrs {
        http: p.http,
        admin: p.admin,
    }
}

/// The HTTP status of `SELECT 1` as `user` through `p`.
async fn status(p: Addrs, user: &str) -> u16 {
    curl_async(vec![
        "-sS".into(),
        "-o".into(),
        "/dev/null".into(),
        "-u".into(),
        format!("{user}:pw"),
        format!("http://{}/", p.http),
        "--data-binary".into(),
        "SELECT 1".into(),
    ])
    .await
    .status
}

async fn config_status(p: Addrs) -> serde_json::Value {
    admin_json(p.admin, "/v1/config").await.1
}

/// Waits up to `within` for `check` on both proxies; the time it took.
async fn both<F, Fut>(ps: [&ProxyProcess; 2], within: Duration, what: &str, check: F) -> Duration
where
    F: Fn(Addrs) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    for p in ps {
        let p = addrs(p);
        loop {
            if check(p).await {
                break;
            }
            assert!(start.elapsed() < within, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    start.elapsed()
}

#[tokio::test]
async fn two_proxies_follow_pushes_refuse_bad_ones_and_roll_back() {
    let r = Root::new(ZK_A);
    let first = r.push(&dynamic(&["127.0.0.11"], &["ann"], ""));
    assert!(first.contains("pushed version 1"), "{first}");
    let a = ProxyProcess::start_file(&r.bootstrap("a"));
    let b = ProxyProcess::start_file(&r.bootstrap("b"));
    assert_eq!(status(addrs(&a), "ann").await, 200);
    assert_eq!(status(addrs(&b), "bob").await, 401);

    // A new user works on both within a second; a removed one is refused on both.
    r.push(&dynamic(&["127.0.0.11"], &["ann", "bob"], ""));
    let took = both(
        [&a, &b],
        Duration::from_secs(1),
        "bob admitted",
        |p| async move { status(p, "bob").await == 200 },
    )
    .await;
    eprintln!("a pushed user worked on both proxies after {took:?}");
    r.push(&dynamic(&["127.0.0.11"], &["bob"], ""));
    both(
        [&a, &b],
        Duration::from_secs(1),
        "ann refused",
        |p| async move { status(p, "ann").await == 401 },
    )
    .await;

    // An added replica starts taking reads.
    r.push(&dynamic(&["127.0.0.11", "127.0.0.12"], &["bob"], ""));
    both(
        [&a, &b],
        Duration::from_secs(5),
        "the new replica up",
        |p| async move {
            let (_, topo) = admin_json(p.admin, "/v1/topology").await;
            topo.to_string().contains("127.0.0.12")
                && replica(&topo, "127.0.0.12")["health"] == "up"
        },
    )
    .await;
    for _ in 0..40 {
        assert_eq!(status(addrs(&a), "bob").await, 200);
    }
    let m = curl_async(vec!["-sS".into(), format!("http://{}/metrics", a.admin)])
        .await
        .body;
    assert!(
        metric_sum(
            &m,
            "chgate_http_requests_total",
            &["node=\"127.0.0.12:8123\""]
        ) > 0.0,
        "reads reach the added replica"
    );

    // An invalid push is refused with the reason, and nothing changes.
    let version = config_status(addrs(&a)).await["version"].as_u64().unwrap();
    let mut bad = dynamic(&["127.0.0.11"], &["bob"], "");
    bad.push_str("[users.eve]\npassword_hash = \"x\"\ncluster = \"nope\"\naccount = \"chgate\"\n");
    let (ok, _, err) = r.try_push(&bad);
    assert!(!ok, "an invalid push fails");
    assert!(
        err.contains("users.eve.cluster") && err.contains("unknown cluster"),
        "{err}"
    );
    let (_, pulled, _) = r.config(&["pull"]);
    assert!(
        pulled.contains(&format!("at version {version}")),
        "{pulled}"
    );
    assert!(!pulled.contains("eve"));

    // A znode broken by hand is refused as a whole; the old config keeps serving.
    let znode = format!("{}/config/users/bob", r.root);
    zkcli(&["set", &znode, "password_hash = 7"]);
    let rejected = both(
        [&a, &b],
        Duration::from_secs(3),
        "the broken znode refused",
        |p| async move {
            config_status(p).await["last_rejection"]
                .to_string()
                .contains("/config/users/bob")
        },
    )
    .await;
    eprintln!("the broken znode was refused after {rejected:?}");
    let s = config_status(addrs(&a)).await;
    assert!(
        s["last_rejection"].to_string().contains("password_hash"),
        "{s}"
    );
    assert_eq!(status(addrs(&a), "bob").await, 200, "the old config serves");
    assert_eq!(status(addrs(&b), "bob").await, 200);

    // Rollback restores a kept version (1: ann alone, one replica).
    let (ok, out, err) = r.config(&["rollback", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("restoring version 1"), "{out}");
    both(
        [&a, &b],
        Duration::from_secs(2),
        "version 1 restored",
        |p| async move { status(p, "ann").await == 200 && status(p, "bob").await == 401 },
    )
    .await;
    let (ok, list, _) = r.config(&["rollback", "--list"]);
    assert!(ok && list.contains("(active)"), "{list}");
}

/// A znode the proxies cannot read (an ACL set by hand): the change is refused, naming
/// it, the proxy keeps serving and stays in the fleet (it reconnected every 100 ms and
/// left the fleet before), and it takes the new version once the znode is readable again.
#[tokio::test]
async fn an_unreadable_znode_is_refused_and_the_proxy_stays_in_the_fleet() {
    let r = Root::new(ZK_A);
    r.push(&dynamic(&["127.0.0.11"], &["ann", "bob"], ""));
    let a = ProxyProcess::start_file(&r.bootstrap("a"));
    assert_eq!(status(addrs(&a), "bob").await, 200);
    let znode = format!("{}/config/users/bob", r.root);
    zkcli(&["setAcl", &znode, "world:anyone:a"]);
    // A new version (by hand: `config push` cannot read the root either): the proxy
    // reads the whole root again, and cannot read bob's znode.
    assert_eq!(config_status(addrs(&a)).await["version"], 1);
    zkcli(&["set", &format!("{}/version", r.root), "2"]);
    wait_async(
        "the unreadable znode refused",
        Duration::from_secs(5),
        || async {
            let s = config_status(addrs(&a)).await;
            let why = s["last_rejection"].to_string();
            f64::from(u8::from(
                why.contains("/config/users/bob") && why.contains("cannot be read"),
            ))
        },
        1.0,
    )
    .await;
    assert_eq!(
        status(addrs(&a), "bob").await,
        200,
        "the running config serves"
    );
    assert_eq!(config_status(addrs(&a)).await["version"], 1);
    let m = curl_async(vec!["-sS".into(), format!("http://{}/metrics", a.admin)])
        .await
        .body;
    assert_eq!(metric_sum(&m, "chgate_fleet_members", &[]), 1.0, "{m}");
    zkcli(&["setAcl", &znode, "world:anyone:cdrwa"]);
    wait_async(
        "version 2 taken once readable",
        Duration::from_secs(20),
        || async {
            config_status(addrs(&a)).await["version"]
                .as_f64()
                .unwrap_or(0.0)
        },
        2.0,
    )
    .await;
}

/// zkCli.sh against ensemble A (a JVM: a couple of seconds).
fn zkcli(args: &[&str]) {
    let out = Command::new("/usr/share/zookeeper/bin/zkCli.sh")
        .args(["-server", ZK_A])
        .args(args)
        .output()
        .expect("zkCli.sh (the zookeeper package)");
    assert!(
        out.status.success(),
        "zkCli: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP relay in front of ensemble A that can be cut (every connection closed, new ones
/// closed at once) and restored, on a port that stays the same.
struct Switch {
    addr: SocketAddr,
    /// Cancelled by a cut; a restore puts a fresh one in.
    up: Arc<Mutex<CancellationToken>>,
}

impl Switch {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(Mutex::new(CancellationToken::new()));
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = l.accept().await {
                let token = state.lock().unwrap().clone();
                if token.is_cancelled() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut zk) = TcpStream::connect(ZK_A).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut zk) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    fn cut(&self) {
        self.up.lock().unwrap().cancel();
    }

    fn restore(&self) {
        *self.up.lock().unwrap() = CancellationToken::new();
    }
}

// Multi-threaded: the relay serves while the test waits on chgate's command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_zookeeper_proxies_serve_start_from_cache_and_catch_up() {
    let switch = Switch::start().await;
    let r = Root::new(&switch.addr.to_string());
    r.push(&dynamic(&["127.0.0.11"], &["ann"], ""));
    let a = ProxyProcess::start_file(&r.bootstrap("a"));
    let mut b = ProxyProcess::start_file(&r.bootstrap("b"));
    assert_eq!(status(addrs(&a), "ann").await, 200);

    switch.cut();
    let cut = Instant::now();
    both(
        [&a, &b],
        Duration::from_secs(10),
        "ZooKeeper seen gone",
        |p| async move { config_status(p).await["connected"] == false },
    )
    .await;
    eprintln!("both proxies saw ZooKeeper gone after {:?}", cut.elapsed());
    // Staleness grows, in /v1/config and in the metric (updated once a second).
    let metrics = format!("http://{}/metrics", a.admin);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stale = config_status(addrs(&a)).await["stale_seconds"]
            .as_f64()
            .unwrap();
        let m = curl_async(vec!["-sS".into(), metrics.clone()]).await.body;
        if stale > 0.5 && metric_sum(&m, "chgate_config_stale_seconds", &[]) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "staleness did not grow: {stale}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status(addrs(&a), "ann").await,
        200,
        "serving the last good config"
    );
    assert_eq!(status(addrs(&b), "ann").await, 200);
    let s = config_status(addrs(&a)).await;
    assert_eq!(s["connected"], false, "{s}");
    assert!(s["stale_seconds"].as_f64().unwrap() > 0.5, "{s}");
    let m = curl_async(vec!["-sS".into(), format!("http://{}/metrics", a.admin)])
        .await
        .body;
    assert!(
        metric_sum(&m, "chgate_config_stale_seconds", &[]) > 0.0,
        "{m}"
    );

    // One restarted meanwhile starts from its cache, and says so.
    let boot = b.config_path.clone();
    b.stop();
    let b2 = ProxyProcess::start_file(&boot);
    assert_eq!(status(addrs(&b2), "ann").await, 200);
    let s = config_status(addrs(&b2)).await;
    assert_eq!(s["from_cache"], true, "{s}");
    assert_eq!(s["version"], 1, "{s}");

    // ZooKeeper back: a change made then reaches both.
    switch.restore();
    r.push(&dynamic(&["127.0.0.11"], &["ann", "cy"], ""));
    both(
        [&a, &b2],
        Duration::from_secs(15),
        "cy admitted after the outage",
        |p| async move { status(p, "cy").await == 200 },
    )
    .await;
    let s = config_status(addrs(&b2)).await;
    assert_eq!(s["from_cache"], false, "{s}");
    assert_eq!(s["connected"], true, "{s}");
}

#[tokio::test]
async fn a_users_concurrency_is_shared_out_among_live_proxies() {
    let r = Root::new(ZK_A);
    r.push(&dynamic(
        &["127.0.0.11"],
        &["ann"],
        "max_concurrent_queries = 2\nmax_queue_size = 0",
    ));
    let a = ProxyProcess::start_file(&r.bootstrap("a"));
    let mut b = ProxyProcess::start_file(&r.bootstrap("b"));
    let members = |p: &ProxyProcess| {
        let admin = p.admin;
        async move {
            let m = curl_async(vec!["-sS".into(), format!("http://{admin}/metrics")])
                .await
                .body;
            metric_sum(&m, "chgate_fleet_members", &[])
        }
    };
    wait_async("two members", Duration::from_secs(3), || members(&a), 2.0).await;
    // Each proxy's share of 2 is 1: two at once through one proxy, one is refused.
    let two = concurrent(&a, 2).await;
    assert_eq!(two, [200, 429], "one slot on this proxy");

    b.stop();
    let started = Instant::now();
    wait_async("one member", Duration::from_secs(3), || members(&a), 1.0).await;
    eprintln!(
        "the stopped proxy's share came back after {:?}",
        started.elapsed()
    );
    let two = concurrent(&a, 2).await;
    assert_eq!(two, [200, 200], "the whole limit on the one left");
}

/// `n` concurrent `SELECT sleep(1)` as ann through `p`; the statuses, sorted.
async fn concurrent(p: &ProxyProcess, n: usize) -> Vec<u16> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(curl_async(vec![
                "-sS".into(),
                "-o".into(),
                "/dev/null".into(),
                "-u".into(),
                "ann:pw".into(),
                format!("http://{}/", p.http),
                "--data-binary".into(),
                "SELECT sleep(1)".into(),
            ]))
        })
        .collect();
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap().status);
    }
    statuses.sort();
    statuses
}

async fn wait_async<F, Fut>(what: &str, within: Duration, mut f: F, want: f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let start = Instant::now();
    loop {
        let got = f().await;
        if got == want {
            return;
        }
        assert!(start.elapsed() < within, "{what}: {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_ingest_sidecar_takes_its_clusters_from_the_same_root() {
    let r = Root::new(ZK_A);
    r.push(&dynamic(&["127.0.0.11", "127.0.0.12"], &["ann"], ""));
    let local = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/ingest-local.toml"
    ))
    .unwrap();
    // The quickstart's sidecar config without its own clusters, and with the root's.
    let mut text = String::new();
    let mut skip = false;
    for line in local.lines() {
        if line.starts_with('[') {
            skip = line.contains("clusters.");
        }
        if !skip {
            text.push_str(&line.replace("account = \"ingest\"", "account = \"chgate\""));
            text.push('\n');
        }
    }
    text.push_str(&format!(
        "[config_source]\nzookeeper = [\"{ZK_A}\"]\nroot = \"{}\"\n",
        r.root
    ));
    let path = r.dir.join("ingest.toml");
    std::fs::write(&path, &text).unwrap();
    let (v, from_zookeeper) = chgate::ingest::config::load_with_source(&path)
        .await
        .unwrap_or_else(|p| panic!("{p:?}"));
    let demo = &v.config.clusters["demo"];
    let hosts: Vec<&str> = demo.shards[0]
        .replicas
        .iter()
        .map(|r| r.host.as_str())
        .collect();
    assert_eq!(hosts, ["127.0.0.11", "127.0.0.12"]);
    assert_eq!(v.config.picker.probe_interval, Duration::from_millis(300));

    // It follows the root: a replica pushed later reaches the cluster its tasks hold; a
    // push that would change a task's shards is refused and the running cluster stays.
    let z = from_zookeeper.expect("clusters from ZooKeeper");
    let c = &v.config;
    let clusters = Arc::new(arc_swap::ArcSwap::from_pointee(
        chgate::picker::Clusters::default().reconcile(&chgate::picker::ClusterConfigs {
            clusters: &c.clusters,
            secrets: &v.secrets,
            upstream: &c.upstream,
            picker: &c.picker,
        }),
    ));
    let handles = chgate::ingest::follow::handles(&clusters.load(), ["demo"].into_iter());
    let demo = handles["demo"].clone();
    let stop = CancellationToken::new();
    let tracker = chgate::config::source::Tracker::new("zookeeper".into(), z.version, false);
    let follow = |source, handles, tracker| chgate::ingest::follow::Follow {
        file: z.file.clone(),
        base: z.base.clone(),
        source,
        clusters: clusters.clone(),
        handles,
        running: c.clusters.clone(),
        started_with: z.nodes.clone(),
        tracker,
    };
    tokio::spawn(chgate::ingest::follow::run(
        follow(z.source.clone(), handles.clone(), tracker.clone()),
        stop.clone(),
    ));
    let replicas = |c: &chgate::picker::Cluster| -> Vec<String> {
        c.topology()
            .nodes
            .iter()
            .map(|b| b.node.host.clone())
            .collect()
    };
    r.push(&dynamic(
        &["127.0.0.11", "127.0.0.12", "127.0.0.13"],
        &["ann"],
        "",
    ));
    let start = Instant::now();
    while replicas(&demo.load()).len() != 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the sidecar's cluster did not follow: {:?}",
            replicas(&demo.load())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        clusters.load().get("demo").map(|c| replicas(c).len()),
        Some(3)
    );
    // Two shards instead of one: refused, the three replicas of one shard stay.
    let two_shards = dynamic(&["127.0.0.11"], &["ann"], "").replace(
        "shards = [{ replicas = [{ host = \"127.0.0.11\" }] }]",
        "shards = [{ replicas = [{ host = \"127.0.0.11\" }] }, { replicas = [{ host = \"127.0.0.13\" }] }]",
    );
    assert!(two_shards.contains("127.0.0.13"), "{two_shards}");
    let rejected = || {
        chgate::metrics::METRICS
            .config_reloads
            .with_label_values(&["rejected"])
            .get()
    };
    let before = rejected();
    r.push(&two_shards);
    let start = Instant::now();
    while rejected() == before {
        assert!(start.elapsed() < Duration::from_secs(5), "not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(replicas(&demo.load()).len(), 3);
    assert_eq!(demo.load().topology().shards.len(), 1);
    assert_eq!(tracker.status().stale_seconds, 0.0, "it reads the root");
    stop.cancel();
    // A root it cannot reach: the clusters stay, and the config is stale.
    let mut away = z.source.clone();
    away.zookeeper = vec!["127.0.0.1:1".into()];
    let stale = chgate::config::source::Tracker::new("zookeeper".into(), z.version, false);
    let stop = CancellationToken::new();
    tokio::spawn(chgate::ingest::follow::run(
        follow(away, handles, stale.clone()),
        stop.clone(),
    ));
    let start = Instant::now();
    while stale.status().stale_seconds < 0.5 {
        assert!(start.elapsed() < Duration::from_secs(10), "never stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replicas(&demo.load()).len(), 3);
    stop.cancel();
    // Clusters in the file as well as from ZooKeeper: refused, not merged.
    std::fs::write(
        &path,
        format!(
            "{text}\n{}",
            &local[local.find("[[clusters").unwrap()..local.find("[templates").unwrap()]
        ),
    )
    .unwrap();
    let problems = chgate::ingest::config::load_with_source(&path)
        .await
        .unwrap_err();
    assert!(problems.iter().any(|p| p.key == "clusters"), "{problems:?}");
}
