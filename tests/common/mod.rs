//! Shared harness for the end-to-end tests: the real stack started by `scripts/dev-stack up`,
//! chgate started in-process on port 0 (or as a real process where a test needs one), and
//! real clients (curl, the official `clickhouse` crate).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub mod duplex;
pub mod fake;

pub const NODES: [&str; 4] = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"];

pub fn stack_dir() -> PathBuf {
    std::env::var_os("CHGATE_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack"))
}

pub fn secret_file(name: &str) -> PathBuf {
    stack_dir().join("secrets").join(format!("{name}.password"))
}

pub fn secret(name: &str) -> String {
    std::fs::read_to_string(secret_file(name))
        .unwrap_or_else(|e| panic!("no stack secret {name} ({e}): run scripts/dev-stack up first"))
        .trim()
        .to_string()
}

/// Runs SQL straight against one node as the cluster account (for setup and checks).
pub fn direct(node: &str, sql: &str) -> String {
    let out = direct_query(node, sql, None);
    assert!(out.ok, "direct query on {node} failed: {sql}: {}", out.body);
    out.body
}

/// [`direct`] that gives up after `seconds` (`None`): a query sent to a replica a test has
/// stopped (or through a Distributed table to one) waits for it.
pub fn direct_within(node: &str, sql: &str, seconds: u32) -> Option<String> {
    let out = direct_query(node, sql, Some(seconds));
    out.ok.then_some(out.body)
}

fn direct_query(node: &str, sql: &str, seconds: Option<u32>) -> CurlOutput {
    let max_time = seconds.map(|s| s.to_string());
    let auth = format!("chgate:{}", secret("chgate"));
    let url = format!("http://{node}:8123/");
    let mut args = vec![
        "-sS",
        "--fail-with-body",
        "-u",
        &auth,
        &url,
        "--data-binary",
        sql,
    ];
    if let Some(t) = &max_time {
        args.extend(["--max-time", t.as_str()]);
    }
    curl(&args)
}

pub struct CurlOutput {
    pub ok: bool,
    pub status: u16,
    pub body: String,
    pub headers: String,
}

/// Runs curl; appends a trailer with the HTTP status, and captures headers separately.
pub fn curl(args: &[&str]) -> CurlOutput {
    let header_file = tempfile_path("curl-headers");
    let out = Command::new("curl")
        .args(args)
        .args([
            "-D",
            header_file.to_str().unwrap(),
            "-w",
            "\n@@status=%{http_code}",
        ])
        .output()
        .expect("curl is installed (scripts/dev-stack up installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text
        .rsplit_once("\n@@status=")
        .map(|(b, s)| (b.to_string(), s.trim().parse().unwrap_or(0)))
        .unwrap_or((text.clone(), 0));
    let headers = std::fs::read_to_string(&header_file).unwrap_or_default();
    let _ = std::fs::remove_file(&header_file);
    CurlOutput {
        ok: out.status.success(),
        status,
        body,
        headers,
    }
}

pub fn tempfile_path(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_stale_tempfiles);
    std::env::temp_dir().join(format!(
        "chgate-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes what earlier test processes left under [`tempfile_path`] names (a CDC test's
/// state directory is ~150 MiB): entries `chgate-<prefix>-<pid>-<n>` whose process is gone.
/// A failed run's files stay for inspection until the next run of a test binary.
fn sweep_stale_tempfiles() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("chgate-") {
            continue;
        }
        // The pid is the second-to-last `-` field; the last is the counter, perhaps with
        // an extension (`.toml`).
        let mut fields = name.rsplit('-');
        let (Some(n), Some(pid)) = (fields.next(), fields.next()) else {
            continue;
        };
        let n = n.split('.').next().unwrap_or(n);
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<u32>()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made with openssl in a fresh
/// directory named after `prefix`: its certificate and key files.
pub fn self_signed_certificate(prefix: &str) -> (PathBuf, PathBuf) {
    let dir = tempfile_path(prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    (cert, key)
}

/// Argon2 hashes for the test users (made once per test binary).
pub fn hash(password: &str) -> String {
    chgate::auth::hash_password(password).unwrap()
}

/// A config for the demo cluster with users `bi` (read-only) and `etl`, listening on port 0.
/// `extra` is appended (more users, sections).
pub fn config(nodes: &[(&str, u16)], extra: &str) -> String {
    let replicas: Vec<String> = nodes
        .iter()
        .map(|(h, p)| format!("{{ host = \"{h}\", http_port = {p} }}"))
        .collect();
    format!(
        r#"
[proxy]
http_listen = "127.0.0.1:0"
access_log = false
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = "500ms"
[[clusters.demo.shards]]
replicas = [{replicas}]
[clusters.demo.accounts.chgate]
user = "chgate"
password_file = "{secret}"
[users.bi]
password_hash = "{bi}"
cluster = "demo"
account = "chgate"
readonly = true
[users.etl]
password_hash = "{etl}"
cluster = "demo"
account = "chgate"
{extra}
"#,
        replicas = replicas.join(", "),
        secret = secret_file("chgate").display(),
        bi = hash("bi-pass"),
        etl = hash("etl-pass"),
    )
}

pub fn demo_nodes() -> Vec<(&'static str, u16)> {
    NODES.iter().map(|n| (*n, 8123)).collect()
}

/// chgate running inside the test process.
pub struct TestProxy {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub https: Option<SocketAddr>,
    /// The native-protocol listeners, if the config has them.
    pub native: Option<SocketAddr>,
    pub native_tls: Option<SocketAddr>,
    /// The HTTP frontend, for in-memory connections ([`duplex`]).
    pub frontend: std::sync::Arc<chgate::http::Frontend>,
    shutdown: CancellationToken,
}

impl TestProxy {
    pub async fn start(config_text: &str) -> Self {
        let v = chgate::config::parse(config_text, std::path::Path::new("."))
            .unwrap_or_else(|p| panic!("test config invalid: {p:?}"));
        let server = chgate::proxy::Server::bind(v).await.expect("bind");
        let shutdown = CancellationToken::new();
        let proxy = Self {
            http: server.http_addr().expect("http listener"),
            admin: server.admin_addr().expect("admin listener"),
            https: server.https_addr(),
            native: server.native_addr(),
            native_tls: server.native_tls_addr(),
            frontend: server.frontend(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(server.serve(shutdown));
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn metrics(&self) -> String {
        let admin = self.admin;
        tokio::task::spawn_blocking(move || curl(&["-sS", &format!("http://{admin}/metrics")]).body)
            .await
            .unwrap()
    }
}

impl TestProxy {
    /// Starts the drain, as SIGTERM does.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sums every sample of a metric whose labels contain all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// curl on a blocking thread, for async tests.
pub async fn curl_async(args: Vec<String>) -> CurlOutput {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs)
    })
    .await
    .unwrap()
}

/// Polls `check` until it returns true or `deadline` passes.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut check: F) {
    let end = Instant::now() + deadline;
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// chgate as a real process (for memory, signal and CLI tests). Reads its JSON log to
/// learn the bound addresses.
pub struct ProxyProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The native listener, if the config has one (logged before the admin one).
    pub native: Option<SocketAddr>,
    pub config_path: PathBuf,
    /// The config file was written for this process (and goes with it).
    owns_config: bool,
}

impl ProxyProcess {
    pub fn start(config_text: &str) -> Self {
        let config_path = tempfile_path("config").with_extension("toml");
        std::fs::write(&config_path, config_text).unwrap();
        let mut p = Self::start_file(&config_path);
        p.owns_config = true;
        p
    }

    /// chgate with an existing config file (a bootstrap file, say), which it leaves.
    pub fn start_file(config_path: &std::path::Path) -> Self {
        let config_path = config_path.to_path_buf();
        let mut child = Command::new(env!("CARGO_BIN_EXE_chgate"))
            .args(["--log-format", "json", "proxy", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the child never blocks.
                    continue;
                }
            }
        });
        let (mut http, mut admin, mut native) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("chgate logs its listeners within 20 s");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "Listening" {
                let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
                match v["kind"].as_str() {
                    Some("http") => http = Some(addr),
                    Some("admin") => admin = Some(addr),
                    Some("native") => native = Some(addr),
                    _ => {}
                }
            }
        }
        Self {
            child,
            http: http.unwrap(),
            admin: admin.unwrap(),
            native,
            config_path,
            owns_config: false,
        }
    }

    /// SIGTERM, and waits for the process to end (its drain included).
    pub fn stop(&mut self) {
        self.signal("TERM");
        let _ = self.child.wait();
    }

    /// Resident memory now and at its peak, in KiB, from /proc.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn signal(&self, sig: &str) {
        send_signal(&self.child.id().to_string(), sig);
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_config {
            let _ = std::fs::remove_file(&self.config_path);
        }
    }
}

/// A name unique to this test run, for tables, events and topics.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// The demo cluster as the quickstart describes it: shard group `a` (shard 1, ZooKeeper A)
/// and `b` (shard 2, ZooKeeper B), with `extra` appended (e.g. a `[picker]` section).
pub fn grouped_config(extra: &str) -> String {
    let flat = config(&demo_nodes(), extra);
    let start = flat.find("[[clusters.demo.shards]]").unwrap();
    let end = flat.find("[clusters.demo.accounts.chgate]").unwrap();
    format!(
        "{}{}{}",
        &flat[..start],
        r#"[[clusters.demo.shard_groups]]
name = "a"
zookeeper = ["127.0.0.1:2181"]
shards = [{ replicas = [{ host = "127.0.0.11" }, { host = "127.0.0.12" }] }]
[[clusters.demo.shard_groups]]
name = "b"
zookeeper = ["127.0.0.1:2182"]
shards = [{ replicas = [{ host = "127.0.0.13" }, { host = "127.0.0.14" }] }]
"#,
        &flat[end..]
    )
}

/// A bootstrap file's text: listeners on free ports, the config from `root` in the ensemble
/// `zookeeper`, a 4 s session, the cache in `cache_file` (relative to the file).
pub fn bootstrap_toml(zookeeper: &str, root: &str, cache_file: &str) -> String {
    format!(
        r#"
[proxy]
http_listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[config_source]
zookeeper = ["{zookeeper}"]
root = "{root}"
session_timeout = "4s"
cache_file = "{cache_file}"
"#
    )
}

/// GET on the admin listener; the status and the parsed JSON body.
pub async fn admin_json(admin: SocketAddr, path_and_query: &str) -> (u16, serde_json::Value) {
    let out = curl_async(vec![
        "-sS".into(),
        format!("http://{admin}{path_and_query}"),
    ])
    .await;
    let v = serde_json::from_str(&out.body)
        .unwrap_or_else(|e| panic!("{path_and_query}: not JSON ({e}): {}", out.body));
    (out.status, v)
}

/// The output of `child` once it has ended; it must end within `limit` (`what` names it
/// in the failure).
pub fn output_within(child: Child, limit: Duration, what: &str) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for a child process"),
        Err(_) => panic!("{what} took over {limit:?}"),
    }
}

/// Runs a bash script with `scripts/dev-stack env` applied (the venv, tansu, and the
/// newer librdkafka kcat needs for the broker).
pub fn stack_shell(script: &str) -> std::process::Output {
    let env = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev-stack"))
        .arg("env")
        .output()
        .unwrap();
    assert!(env.status.success(), "dev-stack env failed");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e\n{}\n{script}",
            String::from_utf8_lossy(&env.stdout)
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `chgate ingest` as a real process; learns its admin address from its JSON log.
pub struct IngestProcess {
    pub child: Child,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log: Log,
}

/// The output of a chgate process, a line a JSON record, as it comes.
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `chgate --log-format json <subcommand> --config <config>`, keeps its log lines
/// (`CHGATE_TEST_ECHO=1` also prints them, with --nocapture) and waits (30 s at most) for
/// its admin listener: the address it reports.
pub fn spawn_logged(
    subcommand: &str,
    config: &std::path::Path,
) -> (std::process::Child, std::net::SocketAddr, Log) {
    spawn_logged_env(subcommand, config, &[])
}

/// [`spawn_logged`] with more environment variables (`CHGATE_FAILPOINTS`, say).
pub fn spawn_logged_env(
    subcommand: &str,
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, std::net::SocketAddr, Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chgate"))
        .args(["--log-format", "json", subcommand, "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start chgate {subcommand}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log: Log = Default::default();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        let echo = std::env::var_os("CHGATE_TEST_ECHO").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{line}");
                }
                log.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!(
                    "chgate {subcommand} did not start: {:?}",
                    log.lock().unwrap()
                )
            });
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["message"] == "Listening" && v["kind"] == "admin" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    (child, admin, log)
}

impl IngestProcess {
    pub fn start(config_text: &str) -> Self {
        let config_path = tempfile_path("ingest").with_extension("toml");
        std::fs::write(&config_path, config_text).unwrap();
        Self::start_with(config_path)
    }

    pub fn start_with(config_path: PathBuf) -> Self {
        Self::start_with_failpoints(config_path, "")
    }

    /// Runs the sidecar on `config_path` until the failpoint `ingest.inserted=kill` ends it
    /// right after its first insert, before that segment's done record (a pending intent
    /// whose rows are in ClickHouse); returns the dead process, for its log.
    pub fn killed_after_first_insert(config_path: PathBuf) -> Self {
        let mut sidecar = Self::start_with_failpoints(config_path, "ingest.inserted=kill");
        let status = sidecar.wait(Duration::from_secs(120));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the failpoint's SIGKILL ended it: {status:?}"
        );
        sidecar
    }

    /// Started with `CHGATE_FAILPOINTS` set to `failpoints` (see `src/failpoint.rs`).
    pub fn start_with_failpoints(config_path: PathBuf, failpoints: &str) -> Self {
        let (child, admin, log) =
            spawn_logged_env("ingest", &config_path, &[("CHGATE_FAILPOINTS", failpoints)]);
        Self {
            child,
            admin,
            config_path,
            log,
        }
    }

    pub fn metrics(&self) -> String {
        curl(&["-sS", &format!("http://{}/metrics", self.admin)]).body
    }

    pub fn signal(&self, sig: &str) {
        send_signal(&self.child.id().to_string(), sig);
    }

    /// Waits for the process to exit; its status.
    pub fn wait(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "chgate ingest did not exit: {:?}",
                self.log
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ClickHouse nodes of the stack frozen with SIGSTOP for as long as this lives. Dropping it
/// resumes them and waits (bounded, without panicking) until each has its ZooKeeper session
/// back and no read-only replica, so a test that froze a node long enough to expire its
/// session does not leave the next test a half-recovered cluster.
///
/// Tests of one binary run side by side: a node two of them froze is resumed only when the
/// last of them lets go (a count per process), so one test's end never thaws a node
/// another still counts on being stopped.
pub struct Frozen {
    nodes: Vec<(&'static str, String)>,
}

/// How many live [`Frozen`] hold each stopped pid.
static FROZEN_BY: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

impl Frozen {
    /// `nodes` are stack names and addresses, e.g. `("ch4", "127.0.0.14")`.
    pub fn stop(nodes: &[(&'static str, &'static str)]) -> Frozen {
        let mut frozen = Frozen { nodes: Vec::new() };
        let mut by = FROZEN_BY.lock().unwrap_or_else(|p| p.into_inner());
        for (name, host) in nodes {
            let pid = stack_pid(name);
            send_signal(&pid, "STOP");
            *by.entry(pid.clone()).or_insert(0) += 1;
            frozen.nodes.push((host, pid));
        }
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut resumed = Vec::new();
        {
            let mut by = FROZEN_BY.lock().unwrap_or_else(|p| p.into_inner());
            for (host, pid) in &self.nodes {
                let count = by.entry(pid.clone()).or_insert(1);
                *count -= 1;
                if *count == 0 {
                    by.remove(pid);
                    try_signal(pid, "CONT");
                    resumed.push(*host);
                }
            }
        }
        for host in resumed {
            if let Err(e) = settled(host, Duration::from_secs(90)) {
                eprintln!("{host} did not settle after SIGCONT: {e}");
            }
        }
    }
}

/// The pid of a stack service (`ch4`, `zk-b`, ...), from its pid file.
pub fn stack_pid(service: &str) -> String {
    std::fs::read_to_string(stack_dir().join(service).join("pid"))
        .unwrap_or_else(|e| panic!("no pid file for {service}: {e}"))
        .trim()
        .to_string()
}

/// Sends `signal` (e.g. "STOP") to `pid`; true if it was delivered.
pub fn try_signal(pid: &str, signal: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .is_ok_and(|s| s.success())
}

/// [`try_signal`], failing the test if the signal was not delivered.
pub fn send_signal(pid: &str, signal: &str) {
    assert!(try_signal(pid, signal), "kill -{signal} {pid}");
}

/// Waits until `host` answers and every replicated table on it has a live ZooKeeper
/// session and is writable.
pub fn settled(host: &str, deadline: Duration) -> Result<(), String> {
    let end = Instant::now() + deadline;
    loop {
        let out = curl(&[
            "-sS",
            "--max-time",
            "5",
            "-u",
            &format!("chgate:{}", secret("chgate")),
            &format!("http://{host}:8123/"),
            "--data-binary",
            "SELECT countIf(is_session_expired OR is_readonly) FROM system.replicas",
        ]);
        let last = if out.ok && out.body.trim() == "0" {
            return Ok(());
        } else {
            out.body
        };
        if Instant::now() >= end {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Probes fast enough for tests that stop a node or make one lag: one that stops answering
/// is down within probe_interval + 2 x probe_timeout (1.6 s), well within two intervals.
pub const FAST_PICKER: &str = r#"
[picker]
probe_interval = "1s"
probe_retry_interval = "250ms"
probe_timeout = "300ms"
fall = 2
rise = 2
slow_start = "3s"
max_replica_delay = "2s"
"#;

/// The replica entry for `host` in a `/v1/topology` answer.
pub fn replica<'a>(topology: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    topology["clusters"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["replicas"].as_array().unwrap())
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("{host} not in {topology}"))
}

/// Polls `/v1/topology` until `check` holds, within `deadline`; the topology that passed.
pub async fn wait_for_topology(
    admin: SocketAddr,
    what: &str,
    deadline: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + deadline;
    loop {
        let (_, t) = admin_json(admin, "/v1/topology").await;
        if check(&t) {
            return t;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {t:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stack's Python (scripts/dev-stack makes it, with requests, clickhouse-driver and LZ4).
pub fn python() -> PathBuf {
    let cache = std::env::var_os("CHGATE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/chgate")
        });
    cache.join("venv/bin/python")
}

/// Creates `topic` (3 partitions) and its dead-letter topic `dlq` (1) on the stack's broker.
pub fn create_topics(topic: &str, dlq: &str) {
    stack_shell(&format!(
        "tansu topic create {topic} --partitions 3 --broker tcp://127.0.0.1:9092 >/dev/null\n\
         tansu topic create {dlq} --partitions 1 --broker tcp://127.0.0.1:9092 >/dev/null"
    ));
}

/// Produces `lines` (each `key\tpayload`) with kcat; keys spread them over partitions. An
/// empty payload goes as a null value (a tombstone).
pub fn produce(topic: &str, lines: &[String]) {
    kcat_produce(topic, "", lines);
}

/// [`produce`] into one partition.
pub fn produce_to(topic: &str, partition: i32, lines: &[String]) {
    kcat_produce(topic, &format!("-p {partition} "), lines);
}

fn kcat_produce(topic: &str, options: &str, lines: &[String]) {
    let file = tempfile_path("produce");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    stack_shell(&format!(
        "kcat -P -Z -b 127.0.0.1:9092 -t {topic} {options}-K '\t' -l {}",
        file.display()
    ));
    let _ = std::fs::remove_file(file);
}

/// The dead-letter topic's messages: (payload, headers as kcat prints them), once there
/// are `expected` of them (or after 20 s).
pub fn dead_letters(dlq: &str, expected: usize) -> Vec<(String, String)> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let out = stack_shell(&format!(
            "kcat -C -b 127.0.0.1:9092 -t {dlq} -o beginning -e -q -f '%s\\t%h\\n'"
        ));
        let got: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.rsplit_once('\t'))
            .map(|(p, h)| (p.to_string(), h.to_string()))
            .collect();
        if got.len() >= expected || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A `chgate ingest` config for the stack up to its templates and tasks: consumer group,
/// static member and ZooKeeper root named after `name`, the demo cluster as two shard
/// groups, the account `ingest`.
pub fn ingest_header(name: &str, pick_api: Option<SocketAddr>) -> String {
    let pick = pick_api
        .map(|a| format!("[pick_api]\nurl = \"http://{a}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "{name}-group"
instance_id = "{name}-1"
# Not shorter: tansu 0.6 expires a restarted static member unless its first heartbeat comes
# within the session timeout of its killed predecessor's last one (README, "Known with the
# test broker"); a restart takes ~10 s to get there on a loaded machine.
session_timeout = "30s"
start_rewind = 10000
# tansu holds every fetch for fetch.wait.max.ms, data or not (config/ingest-local.toml).
properties = {{ "fetch.wait.max.ms" = "10" }}
{pick}
[admin]
listen = "127.0.0.1:0"
[coordination]
zookeeper = ["127.0.0.1:2181"]
root = "/chgate-tests/{name}"
[picker]
probe_interval = "1s"
probe_timeout = "300ms"
probe_retry_interval = "250ms"
[[clusters.demo.shard_groups]]
name = "a"
zookeeper = ["127.0.0.1:2181"]
shards = [{{ replicas = [{{ host = "127.0.0.11" }}, {{ host = "127.0.0.12" }}] }}]
[[clusters.demo.shard_groups]]
name = "b"
zookeeper = ["127.0.0.1:2182"]
shards = [{{ replicas = [{{ host = "127.0.0.13" }}, {{ host = "127.0.0.14" }}] }}]
[clusters.demo.accounts.ingest]
user = "chgate"
password_file = "{secret}"
"#,
        secret = secret_file("chgate").display(),
    )
}
