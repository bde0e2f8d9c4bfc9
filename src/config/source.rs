//! Where a running proxy's config comes from, and the one path every change takes.
//!
//! - A file: loaded at start, loaded again on SIGHUP.
//! - A bootstrap file with `[config_source]`: the static part (listeners, TLS files, the
//!   admin token, auth policy) from the file, the dynamic part (clusters, users, quotas,
//!   picker, upstream) from a ZooKeeper root ([`super::zookeeper`]), watched. If ZooKeeper
//!   cannot be reached at start, the last good config is read from the local cache, and
//!   the instance says so; while ZooKeeper is away it keeps serving what it has and
//!   reconnects with backoff, and `chgate_config_stale_seconds` grows.
//!
//! Either way a change is read whole, validated by the same code as a file, and handed to
//! [`Reloader::offer`]: applied as a whole, or refused as a whole (the running config
//! stays; every problem is logged with its key, or its znode and key; the metric counts
//! it; `/v1/config` shows it). Keys that cannot change without a restart (listener
//! addresses, TLS files, the auth policy, the config source) are reported, not half-applied.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::validate::{validate, Problem, Validated};
use super::zookeeper::{self, Nodes, Store};
use super::{Config, ConfigSourceConfig};
use crate::backoff::Backoff;
use crate::metrics::METRICS;

/// How long a start waits for ZooKeeper before it falls back to the cache.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Which config is running, where it came from, and the last change refused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// `file:<path>` or `zookeeper:<servers><root>`.
    pub source: String,
    /// The ZooKeeper version (0 for a file).
    pub version: u64,
    /// Unix seconds of the last apply.
    pub applied_at: u64,
    /// Started from the local cache because ZooKeeper could not be reached.
    pub from_cache: bool,
    /// Watching ZooKeeper now (always true for a file).
    pub connected: bool,
    /// Seconds since the config was last known to be current (0 while connected).
    pub stale_seconds: f64,
    pub last_rejection: Option<Rejection>,
    /// Keys changed in the source that only a restart applies.
    pub restart_needed: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejection {
    pub at: u64,
    pub version: u64,
    pub problems: Vec<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The running config's status, shared with the admin listener.
pub struct Tracker {
    status: Mutex<Status>,
    stale_since: Mutex<Option<Instant>>,
}

impl Tracker {
    /// The status of a config read from `source` at `version` (from the local cache:
    /// stale from the start).
    pub fn new(source: String, version: u64, from_cache: bool) -> Arc<Self> {
        METRICS.config_version.set(version as i64);
        Arc::new(Self {
            status: Mutex::new(Status {
                source,
                version,
                applied_at: unix_now(),
                from_cache,
                connected: !from_cache,
                stale_seconds: 0.0,
                last_rejection: None,
                restart_needed: Vec::new(),
            }),
            stale_since: Mutex::new(from_cache.then(Instant::now)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status now (stale time brought up to date).
    pub fn status(&self) -> Status {
        let mut s = self.lock().clone();
        s.stale_seconds = self.stale_seconds();
        s
    }

    fn stale_seconds(&self) -> f64 {
        let since = *self.stale_since.lock().unwrap_or_else(|e| e.into_inner());
        since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// Backdates the start of staleness by `age` (a config from a cache that old).
    pub fn stale_for(&self, age: Duration) {
        let mut since = self.stale_since.lock().unwrap_or_else(|e| e.into_inner());
        *since = Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
    }

    /// Whether the source can be read now: the config is stale from the first `false`
    /// until the next `true`.
    pub fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
        let mut since = self.stale_since.lock().unwrap_or_else(|e| e.into_inner());
        match (connected, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// Keeps `chgate_config_stale_seconds` current, once a second, until `stop`.
    pub fn spawn_stale_gauge(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                METRICS.config_stale_seconds.set(me.stale_seconds());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
}

/// A config at start, and where it came from.
pub struct Started {
    pub validated: Validated,
    pub tracker: Arc<Tracker>,
    /// The bootstrap file and its ZooKeeper source, to watch.
    pub watch: Option<Watch>,
}

/// What the ZooKeeper watch needs.
pub struct Watch {
    bootstrap: Config,
    base: PathBuf,
    source: ConfigSourceConfig,
    cache: PathBuf,
    version: u64,
    /// The znodes the start read (none when it started from the cache).
    nodes: Option<Nodes>,
}

impl Watch {
    /// The bootstrap's `[config_source]`.
    pub fn source(&self) -> &ConfigSourceConfig {
        &self.source
    }

    /// Where the bootstrap's relative paths are taken from.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

/// Loads the config a proxy starts with: the file, or the bootstrap file plus its ZooKeeper
/// root (or, if ZooKeeper cannot be reached, the cache of the last good one).
pub async fn start(path: &Path) -> Result<Started, Vec<Problem>> {
    let (bootstrap, base) = read_bootstrap(path)?;
    let Some(source) = bootstrap.config_source.clone() else {
        let validated = validate(bootstrap, &base)?;
        let tracker = Tracker::new(format!("file:{}", path.display()), 0, false);
        return Ok(Started {
            validated,
            tracker,
            watch: None,
        });
    };
    let cache = cache_path(path, &source);
    let origin = format!("zookeeper:{}{}", source.zookeeper.join(","), source.root);
    let from_zk = async {
        let (snapshot, root) = zookeeper::fetch(&source, &base, START_TIMEOUT).await?;
        let validated = build(&bootstrap, &base, &snapshot.nodes, &root)?;
        Ok::<_, Vec<Problem>>((validated, snapshot.version, snapshot.nodes))
    };
    let (validated, version, nodes, cached_at) = match from_zk.await {
        Ok((validated, version, nodes)) => {
            write_cache(&cache, &nodes, version, source.root.trim_end_matches('/'));
            (validated, version, Some(nodes), None)
        }
        Err(problems) => {
            for p in &problems {
                tracing::error!(problem = %p, "Cannot load the config from ZooKeeper");
            }
            let (validated, version, written) = read_cache(&cache, &source.root, &bootstrap, &base)
                .map_err(|mut cache_problems| {
                    cache_problems.splice(0..0, problems);
                    cache_problems
                })?;
            tracing::warn!(cache = %cache.display(), version, "ZooKeeper could not be reached or its config is invalid: started from the cached config of version {version}; it is replaced as soon as ZooKeeper answers");
            (validated, version, None, written)
        }
    };
    let tracker = Tracker::new(origin, version, nodes.is_none());
    if let Some(written) = cached_at {
        // Stale since the cache was written, not since this start.
        tracker.stale_for(Duration::from_secs(unix_now().saturating_sub(written)));
    }
    Ok(Started {
        validated,
        tracker,
        watch: Some(Watch {
            bootstrap,
            base,
            source,
            cache,
            version,
            nodes,
        }),
    })
}

/// The file, parsed, and the directory its relative paths are taken from. A file with
/// `[config_source]` may not hold the dynamic sections itself.
fn read_bootstrap(path: &Path) -> Result<(Config, PathBuf), Vec<Problem>> {
    let (config, base) = super::read::<Config>(path)?;
    if config.config_source.is_some() {
        let mut problems = Vec::new();
        let section = |name: &str| {
            Problem::new(
                name,
                "with [config_source] this comes from ZooKeeper: put it in the file you give `chgate config push`",
            )
        };
        if !config.clusters.is_empty() {
            problems.push(section("clusters"));
        }
        if !config.users.is_empty() {
            problems.push(section("users"));
        }
        if !config.quotas.is_empty() {
            problems.push(section("quotas"));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
    }
    Ok((config, base))
}

/// Validates the bootstrap with a dynamic part from znodes; problems name their znode.
pub fn build(
    bootstrap: &Config,
    base: &Path,
    nodes: &Nodes,
    root: &str,
) -> Result<Validated, Vec<Problem>> {
    let dynamic = zookeeper::parse_nodes(nodes, root)?;
    validate(dynamic.merge_into(bootstrap.clone()), base).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| zookeeper::locate(p, root, nodes))
            .collect()
    })
}

fn cache_path(bootstrap: &Path, source: &ConfigSourceConfig) -> PathBuf {
    match &source.cache_file {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => bootstrap.parent().unwrap_or_else(|| Path::new(".")).join(p),
        None => {
            let mut name = bootstrap.as_os_str().to_owned();
            name.push(".cache.toml");
            PathBuf::from(name)
        }
    }
}

/// Writes the cache atomically (a temporary file renamed over it); a failure is logged:
/// the cache is a fallback, not a reason to refuse a good config.
fn write_cache(cache: &Path, nodes: &Nodes, version: u64, root: &str) {
    let Ok(text) = zookeeper::assemble(nodes, root) else {
        return;
    };
    let body = format!(
        "# chgate config cache: version {version} of {root}. Written by chgate; do not edit.\n# written_unix = {}\n{text}",
        unix_now()
    );
    let tmp = cache.with_extension("tmp");
    let written = (|| {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, cache)
    })();
    if let Err(e) = written {
        tracing::warn!(cache = %cache.display(), error = %e, "Cannot write the config cache");
    }
}

/// The version and root a cache's first line names (`None` for a line that is not one).
fn cache_header(line: &str) -> (u64, Option<&str>) {
    let Some(rest) = line.strip_prefix("# chgate config cache: version ") else {
        return (0, None);
    };
    let Some((version, rest)) = rest.split_once(" of ") else {
        return (0, None);
    };
    let root = rest.rsplit_once(". Written by").map(|(root, _)| root);
    (version.parse().unwrap_or(0), root)
}

/// The cache of the config under `root` (trailing slashes trimmed, as the store does).
fn read_cache(
    cache: &Path,
    root: &str,
    bootstrap: &Config,
    base: &Path,
) -> Result<(Validated, u64, Option<u64>), Vec<Problem>> {
    let root = root.trim_end_matches('/');
    let key = format!("config_source.cache_file {}", cache.display());
    let text = std::fs::read_to_string(cache).map_err(|e| {
        vec![Problem::new(
            key.clone(),
            format!("no cached config to start from: {e}"),
        )]
    })?;
    let (version, cached_root) = cache_header(text.lines().next().unwrap_or(""));
    let written = text
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("# written_unix = "))
        .and_then(|t| t.trim().parse::<u64>().ok());
    if cached_root != Some(root) {
        return Err(vec![Problem::new(
            key,
            format!(
                "the cached config is of {}, not of this instance's root {root}: not used",
                cached_root.unwrap_or("an unknown root")
            ),
        )]);
    }
    let dynamic: zookeeper::Dynamic = toml::from_str(&text).map_err(|e| {
        let p = Problem::from_toml(&e, &text);
        vec![Problem::new(key.clone(), p.message)]
    })?;
    let validated = validate(dynamic.merge_into(bootstrap.clone()), base)?;
    Ok((validated, version, written))
}

/// The one path a change takes, from a file or from ZooKeeper.
pub struct Reloader<F: Fn(&Validated)> {
    apply: F,
    tracker: Arc<Tracker>,
    running: Mutex<Config>,
}

impl<F: Fn(&Validated)> Reloader<F> {
    pub fn new(apply: F, tracker: Arc<Tracker>, running: &Config) -> Self {
        Self {
            apply,
            tracker,
            running: Mutex::new(running.clone()),
        }
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Applies a validated change as a whole, or records its refusal; `version` is the
    /// ZooKeeper version (0 for a file). True if it was applied.
    pub fn offer(&self, change: Result<Validated, Vec<Problem>>, version: u64) -> bool {
        match change {
            Ok(v) => {
                let restart = {
                    let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    let keys = restart_keys(&running, &v.config);
                    *running = v.config.clone();
                    keys
                };
                for key in &restart {
                    tracing::warn!(key, "Changed in the config, but only a restart applies it; the rest of the change is applied");
                }
                (self.apply)(&v);
                METRICS.config_reloads.with_label_values(&["ok"]).inc();
                METRICS.config_version.set(version as i64);
                let mut s = self.tracker.lock();
                s.version = version;
                s.applied_at = unix_now();
                s.from_cache = false;
                s.restart_needed = restart;
                drop(s);
                tracing::info!(
                    version,
                    users = v.config.users.len(),
                    clusters = v.config.clusters.len(),
                    "Config applied"
                );
                true
            }
            Err(problems) => {
                METRICS
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                for p in &problems {
                    tracing::error!(version, problem = %p, "Config change rejected, keeping the running one");
                }
                self.tracker.lock().last_rejection = Some(Rejection {
                    at: unix_now(),
                    version,
                    problems: problems.iter().map(ToString::to_string).collect(),
                });
                false
            }
        }
    }
}

/// Logs the keys of the bootstrap file at `path` that changed since `running` was loaded
/// (with a ZooKeeper source, they are all keys only a restart applies).
pub fn report_bootstrap_changes(path: &Path, running: &Config) {
    match read_bootstrap(path) {
        Ok((now, _)) => {
            for key in restart_keys(running, &now) {
                tracing::warn!(key, path = %path.display(), "Changed in the bootstrap file; only a restart applies it");
            }
        }
        Err(problems) => {
            for p in problems {
                tracing::error!(path = %path.display(), problem = %p, "The bootstrap file no longer loads; a restart would fail");
            }
        }
    }
}

/// Keys whose change only a restart applies (listeners are bound once; the auth policy and
/// the config source are set up once).
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    let listen = |c: &Config| {
        [
            ("proxy.http_listen", format!("{:?}", c.proxy.http_listen)),
            ("proxy.tls", format!("{:?}", c.proxy.tls)),
            (
                "proxy.native_listen",
                format!("{:?}", c.proxy.native_listen),
            ),
            ("proxy.native_tls", format!("{:?}", c.proxy.native_tls)),
            ("admin.listen", format!("{:?}", c.admin.listen)),
            ("auth", format!("{:?}", c.auth)),
            ("config_source", format!("{:?}", c.config_source)),
            // Read once by the listeners and the frontends they start.
            (
                "proxy.max_replay_body_bytes",
                format!("{:?}", c.proxy.max_replay_body_bytes),
            ),
            (
                "proxy.keep_alive_timeout",
                format!("{:?}", c.proxy.keep_alive_timeout),
            ),
            (
                "proxy.header_read_timeout",
                format!("{:?}", c.proxy.header_read_timeout),
            ),
            (
                "proxy.http_receive_timeout",
                format!("{:?}", c.proxy.http_receive_timeout),
            ),
            (
                "proxy.drain_timeout",
                format!("{:?}", c.proxy.drain_timeout),
            ),
            ("proxy.access_log", format!("{:?}", c.proxy.access_log)),
            (
                "proxy.native_idle_timeout",
                format!("{:?}", c.proxy.native_idle_timeout),
            ),
            (
                "proxy.native_send_timeout",
                format!("{:?}", c.proxy.native_send_timeout),
            ),
            (
                "proxy.native_max_query_bytes",
                format!("{:?}", c.proxy.native_max_query_bytes),
            ),
        ]
    };
    listen(old)
        .into_iter()
        .zip(listen(new))
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| a.0.to_string())
        .collect()
}

/// Watches the ZooKeeper root until `stop`: every change is read whole and offered; the
/// instance's members znode is kept and the member count passed to `members`. While
/// ZooKeeper is away the running config stays and reconnects back off.
pub async fn watch<F: Fn(&Validated)>(
    w: Watch,
    reloader: Arc<Reloader<F>>,
    members: impl Fn(u32),
    member_id: String,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut offered = Offered {
        last: w.nodes.clone().map(|n| (w.version, n)),
        unreadable: None,
    };
    loop {
        let store = tokio::select! {
            s = Store::connect(&w.source, &w.base, w.source.session_timeout) => s,
            _ = stop.cancelled() => return,
        };
        let store = match store {
            Ok(s) => s,
            Err(e) => {
                reloader.tracker.set_connected(false);
                tracing::warn!(error = %e, "Config source unreachable; serving the last good config");
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        // The session joins the fleet (and joins again whenever its znode is missing). The
        // wait between sessions starts again only once one has read the root: a session
        // that connects and then cannot read (a znode's ACL, say) must not reconnect ten
        // times a second.
        let ended = session(
            &store,
            &w,
            &reloader,
            &members,
            &member_id,
            &mut offered,
            &mut backoff,
            &stop,
        )
        .await;
        if ended.is_none() {
            // Leave the fleet now rather than when the session times out: the others take
            // this instance's share at once.
            let _ = tokio::time::timeout(Duration::from_secs(1), store.leave(&member_id)).await;
            return;
        }
        reloader.tracker.set_connected(false);
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

/// The config last offered (applied or refused), by version and znodes; and the read
/// error last refused, if the root cannot be read now.
struct Offered {
    last: Option<(u64, Nodes)>,
    unreadable: Option<String>,
}

/// Whether the session is connected (a failed read was not the connection's fault).
fn session_alive(store: &Store) -> bool {
    use zookeeper_client::SessionState;
    matches!(
        store.client().state(),
        SessionState::SyncConnected | SessionState::ConnectedReadOnly
    )
}

/// What this instance's members znode says of it.
fn member_about() -> String {
    format!(
        "{{\"pid\":{},\"joined\":{}}}",
        std::process::id(),
        unix_now()
    )
}

/// Joins the fleet if this instance is not in it, and passes the member count on.
async fn stay_in_fleet(store: &Store, members: &impl Fn(u32), member_id: &str) {
    let Ok((names, _)) = store.members().await else {
        return;
    };
    if names.iter().any(|n| n == member_id) {
        members(names.len() as u32);
        return;
    }
    if store.join(member_id, &member_about()).await.is_ok() {
        if let Ok((names, _)) = store.members().await {
            members(names.len() as u32);
        }
    }
}

/// One ZooKeeper session: read, offer, wait for the next change; `None` once stopped,
/// `Some(())` when the session is lost.
#[allow(clippy::too_many_arguments)]
async fn session<F: Fn(&Validated)>(
    store: &Store,
    w: &Watch,
    reloader: &Reloader<F>,
    members: &impl Fn(u32),
    member_id: &str,
    offered: &mut Offered,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> Option<()> {
    let mut state = store.client().state_watcher();
    loop {
        let snapshot = match store.read(true).await {
            Ok(s) => s,
            Err(e) if session_alive(store) => {
                // Connected, and a znode cannot be read (its ACL, say): a config that
                // cannot be taken, not a lost session. Refused once (named, counted, in
                // /v1/config), the instance stays in the fleet, and the read is tried
                // again after a wait in the same session.
                if offered.unreadable.as_deref() != Some(e.as_str()) {
                    let problem = Problem::new(
                        format!("config_source.root {}", store.root()),
                        format!("cannot be read: {e}"),
                    );
                    let version = offered.last.as_ref().map_or(0, |(v, _)| *v);
                    reloader.offer(Err(vec![problem]), version);
                    offered.unreadable = Some(e);
                }
                stay_in_fleet(store, members, member_id).await;
                if !backoff.wait(stop).await {
                    return None;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Reading the config root failed");
                return Some(());
            }
        };
        offered.unreadable = None;
        backoff.reset();
        reloader.tracker.set_connected(true);
        let (mut names, mut members_watch) = match store.members().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Reading the fleet members failed");
                return Some(());
            }
        };
        if !names.contains(&member_id.to_string()) {
            // Not there yet (a new session), or gone (someone deleted it): join.
            match store.join(member_id, &member_about()).await {
                Ok(()) => match store.members().await {
                    Ok(m) => (names, members_watch) = m,
                    Err(e) => {
                        tracing::warn!(error = %e, "Reading the fleet members failed");
                        return Some(());
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot register in the fleet; quotas count this instance out")
                }
            }
        }
        members(names.len() as u32);
        // What was last offered, applied or refused, is not offered again until it changes.
        let seen = Some((snapshot.version, snapshot.nodes.clone()));
        if offered.last != seen {
            let result = build(&w.bootstrap, &w.base, &snapshot.nodes, store.root());
            if reloader.offer(result, snapshot.version) {
                write_cache(&w.cache, &snapshot.nodes, snapshot.version, store.root());
            }
            offered.last = seen;
        }
        let mut fired: Vec<_> = snapshot
            .watchers
            .into_iter()
            .map(|w| Box::pin(w.changed()))
            .collect();
        fired.push(Box::pin(members_watch.changed()));
        use zookeeper_client::{EventType, SessionState};
        let state_now = tokio::select! {
            (event, _, _) = futures_util::future::select_all(fired) => {
                (event.event_type == EventType::Session).then_some(event.session_state)
            }
            s = state.changed() => Some(s),
            _ = stop.cancelled() => return None,
        };
        match state_now {
            None | Some(SessionState::SyncConnected | SessionState::ConnectedReadOnly) => {}
            Some(SessionState::Disconnected) => {
                reloader.tracker.set_connected(false);
                tracing::warn!("ZooKeeper connection lost; serving the last good config while the session reconnects");
                // Wait for the session to come back (then read again) or to end.
                loop {
                    if matches!(
                        state.peek_state(),
                        SessionState::SyncConnected | SessionState::ConnectedReadOnly
                    ) {
                        break;
                    }
                    tokio::select! {
                        s = state.changed() => match s {
                            SessionState::SyncConnected | SessionState::ConnectedReadOnly => break,
                            SessionState::Disconnected => continue,
                            _ => return Some(()),
                        },
                        _ = stop.cancelled() => return None,
                    }
                }
            }
            Some(_) => return Some(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_names_its_root_and_another_root_refuses_it() {
        let line =
            "# chgate config cache: version 12 of /chgate/prod.eu. Written by chgate; do not edit.";
        assert_eq!(cache_header(line), (12, Some("/chgate/prod.eu")));
        assert_eq!(cache_header("# something else"), (0, None));
        let dir = std::env::temp_dir().join(format!("chgate-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = dir.join("c.toml");
        std::fs::write(&cache, format!("{line}\n")).unwrap();
        let bootstrap: Config = toml::from_str("").unwrap();
        let refused = read_cache(&cache, "/chgate/staging/", &bootstrap, &dir).unwrap_err();
        assert!(
            refused[0]
                .message
                .contains("not of this instance's root /chgate/staging"),
            "{refused:?}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_config_from_an_old_cache_is_stale_since_the_cache_was_written() {
        let t = Tracker::new("zookeeper:x/y".into(), 3, true);
        t.stale_for(Duration::from_secs(3600));
        assert!(t.status().stale_seconds >= 3600.0);
        t.set_connected(true);
        assert_eq!(t.status().stale_seconds, 0.0);
    }

    #[test]
    fn settings_read_once_at_start_are_reported_as_needing_a_restart() {
        let old: Config = toml::from_str("").unwrap();
        let new: Config =
            toml::from_str("[proxy]\ndrain_timeout = \"5s\"\nnative_send_timeout = \"9s\"\n")
                .unwrap();
        assert_eq!(
            restart_keys(&old, &new),
            ["proxy.drain_timeout", "proxy.native_send_timeout"]
        );
        assert!(restart_keys(&old, &old).is_empty());
    }
}
