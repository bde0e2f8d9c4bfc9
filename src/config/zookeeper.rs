//! The dynamic part of the config in ZooKeeper: the znode layout, reading it (with watches),
//! and publishing a new version atomically.
//!
//! Under the root (`[config_source] root`, e.g. `/chgate/prod`):
//!
//! ```text
//! <root>/version                 the pushed version, a decimal number; bumped by every push
//! <root>/config/clusters/<name>  the body of [clusters.<name>], as TOML
//! <root>/config/users/<name>     the body of [users.<name>]
//! <root>/config/quotas/<name>    the body of [quotas.<name>]
//! <root>/config/upstream         the body of [upstream] (absent: the defaults)
//! <root>/config/picker           the body of [picker] (absent: the defaults)
//! <root>/history/<version>       each pushed version whole, as `chgate config pull` prints it
//! <root>/members/<instance>      one ephemeral znode per running proxy (see quotas)
//! ```
//!
//! Every value is TOML of the same typed model as a config file and is validated by the
//! same code, so a znode written by hand with zkCli is held to the same rules as a push. No
//! secret is ever stored: accounts still name an environment variable or a file.
//!
//! A push is one multi-op: a check on the version znode's stat (as read before the push)
//! plus every create, set and delete, the version bump and the history entry; two pushes
//! racing cannot interleave, the second fails and says so.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use zookeeper_client as zk;

use super::validate::Problem;
use super::{
    ClusterConfig, Config, ConfigSourceConfig, PickerConfig, QuotaConfig, UpstreamConfig,
    UserConfig,
};

/// Sections holding one znode per entry.
const MAP_SECTIONS: [&str; 3] = ["clusters", "users", "quotas"];
/// Sections held in one znode each.
const ONE_SECTIONS: [&str; 2] = ["upstream", "picker"];
/// Sections that stay in the bootstrap file (they cannot change without a restart, or are
/// about reaching the config itself).
const BOOTSTRAP_SECTIONS: [&str; 4] = ["proxy", "admin", "auth", "config_source"];

/// The dynamic part of a config: what a pushed file holds and ZooKeeper keeps.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dynamic {
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
    #[serde(default)]
    pub quotas: BTreeMap<String, QuotaConfig>,
    pub upstream: Option<UpstreamConfig>,
    pub picker: Option<PickerConfig>,
}

impl Dynamic {
    /// The bootstrap config with this dynamic part in it.
    pub fn merge_into(self, mut bootstrap: Config) -> Config {
        bootstrap.clusters = self.clusters;
        bootstrap.users = self.users;
        bootstrap.quotas = self.quotas;
        if let Some(u) = self.upstream {
            bootstrap.upstream = u;
        }
        if let Some(p) = self.picker {
            bootstrap.picker = p;
        }
        bootstrap
    }
}

/// Znodes (paths relative to `<root>/config`) and their TOML text.
pub type Nodes = BTreeMap<String, String>;

/// Splits a config file's dynamic sections into znodes. A section that belongs in the
/// bootstrap file, or an unknown one, is a problem.
pub fn split(text: &str) -> Result<Nodes, Vec<Problem>> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| vec![Problem::from_toml(&e, text)])?;
    let mut nodes = Nodes::new();
    let mut problems = Vec::new();
    for (section, value) in table {
        let s = section.as_str();
        if MAP_SECTIONS.contains(&s) {
            let Some(entries) = value.as_table() else {
                problems.push(Problem::new(s, "must be a table of named entries"));
                continue;
            };
            for (name, entry) in entries {
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    problems.push(Problem::new(
                        format!("{s}.{name}"),
                        "names may not be empty, start with '.' or contain '/'",
                    ));
                    continue;
                }
                match entry.as_table() {
                    Some(t) => {
                        nodes.insert(format!("{s}/{name}"), fragment(t));
                    }
                    None => problems.push(Problem::new(format!("{s}.{name}"), "must be a table")),
                }
            }
        } else if ONE_SECTIONS.contains(&s) {
            match value.as_table() {
                Some(t) => {
                    nodes.insert(s.to_string(), fragment(t));
                }
                None => problems.push(Problem::new(s, "must be a table")),
            }
        } else if BOOTSTRAP_SECTIONS.contains(&s) {
            problems.push(Problem::new(
                s,
                "belongs in the bootstrap file (it cannot change without a restart), not in ZooKeeper",
            ));
        } else {
            problems.push(Problem::new(
                s,
                "unknown section (ZooKeeper holds clusters, users, quotas, upstream and picker)",
            ));
        }
    }
    if problems.is_empty() {
        Ok(nodes)
    } else {
        Err(problems)
    }
}

fn fragment(table: &toml::Table) -> String {
    toml::to_string_pretty(table).unwrap_or_else(|_| table.to_string())
}

/// The znodes as one config file (what `chgate config pull` prints and a push accepts), or
/// the problems of the znodes that are not valid TOML, each named by its path under `root`.
pub fn assemble(nodes: &Nodes, root: &str) -> Result<String, Vec<Problem>> {
    let mut doc = toml::Table::new();
    let mut problems = Vec::new();
    for (path, text) in nodes {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let p = Problem::from_toml(&e, text);
                problems.push(Problem::new(znode(root, path), p.message));
                continue;
            }
        };
        match path.split_once('/') {
            Some((section, name)) => {
                let entry = doc
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let Some(t) = entry.as_table_mut() {
                    t.insert(name.to_string(), toml::Value::Table(table));
                }
            }
            None => {
                doc.insert(path.clone(), toml::Value::Table(table));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(toml::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string()))
}

/// The typed dynamic config from znodes: each znode parsed on its own, so a broken one is
/// named by its path (`<root>/config/users/bi`) with the key and the reason.
pub fn parse_nodes(nodes: &Nodes, root: &str) -> Result<Dynamic, Vec<Problem>> {
    let mut d = Dynamic::default();
    let mut problems = Vec::new();
    for (path, text) in nodes {
        let located = |e: toml::de::Error| {
            Problem::new(znode(root, path), Problem::from_toml(&e, text).message)
        };
        match path.split_once('/') {
            Some(("clusters", name)) => match toml::from_str(text) {
                Ok(c) => drop(d.clusters.insert(name.into(), c)),
                Err(e) => problems.push(located(e)),
            },
            Some(("users", name)) => match toml::from_str(text) {
                Ok(u) => drop(d.users.insert(name.into(), u)),
                Err(e) => problems.push(located(e)),
            },
            Some(("quotas", name)) => match toml::from_str(text) {
                Ok(q) => drop(d.quotas.insert(name.into(), q)),
                Err(e) => problems.push(located(e)),
            },
            None if path == "upstream" => match toml::from_str(text) {
                Ok(u) => d.upstream = Some(u),
                Err(e) => problems.push(located(e)),
            },
            None if path == "picker" => match toml::from_str(text) {
                Ok(p) => d.picker = Some(p),
                Err(e) => problems.push(located(e)),
            },
            _ => problems.push(Problem::new(
                znode(root, path),
                "unknown znode (the layout holds clusters/, users/, quotas/, upstream and picker)",
            )),
        }
    }
    if problems.is_empty() {
        Ok(d)
    } else {
        Err(problems)
    }
}

/// The absolute path of a config znode.
pub fn znode(root: &str, path: &str) -> String {
    format!("{root}/config/{path}")
}

/// Renames a validation problem's key (`users.bi.cluster`) to the znode it is about and the
/// key inside it (`/chgate/prod/config/users/bi: cluster`).
pub fn locate(problem: Problem, root: &str, nodes: &Nodes) -> Problem {
    let key = problem.key.as_str();
    // The longest znode whose dotted name the key starts with (names may contain dots).
    let found = nodes
        .keys()
        .filter_map(|path| {
            let dotted = path.replace('/', ".");
            let rest = key.strip_prefix(dotted.as_str())?;
            (rest.is_empty() || rest.starts_with('.')).then(|| (path, rest.trim_start_matches('.')))
        })
        .max_by_key(|(path, _)| path.len());
    match found {
        Some((path, "")) => Problem::new(znode(root, path), problem.message),
        Some((path, rest)) => Problem::new(
            format!("{} (key {rest})", znode(root, path)),
            problem.message,
        ),
        None => problem,
    }
}

/// What a push would change, one line per znode (`+` created, `-` deleted, `~` changed,
/// with the lines of its text that go and come).
pub fn diff(old: &Nodes, new: &Nodes) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in new {
        match old.get(path) {
            None => {
                out.push(format!("+ {path}"));
                out.extend(text.lines().map(|l| format!("    + {l}")));
            }
            Some(before) if before != text => {
                out.push(format!("~ {path}"));
                let (b, a): (Vec<&str>, Vec<&str>) =
                    (before.lines().collect(), text.lines().collect());
                out.extend(
                    b.iter()
                        .filter(|l| !a.contains(l))
                        .map(|l| format!("    - {l}")),
                );
                out.extend(
                    a.iter()
                        .filter(|l| !b.contains(l))
                        .map(|l| format!("    + {l}")),
                );
            }
            Some(_) => {}
        }
    }
    for path in old.keys().filter(|p| !new.contains_key(*p)) {
        out.push(format!("- {path}"));
    }
    out
}

/// What a read of the root found: the znodes, the version, and the watches that fire on the
/// next change of any of them.
pub struct Snapshot {
    pub version: u64,
    /// The version znode's stat version, checked by a push.
    pub stat_version: i32,
    pub nodes: Nodes,
    pub watchers: Vec<zk::OneshotWatcher>,
}

/// One read of the root (no watches), for a start: the snapshot and the root's path;
/// failures keyed `config_source`.
pub async fn fetch(
    source: &ConfigSourceConfig,
    base: &Path,
    timeout: Duration,
) -> Result<(Snapshot, String), Vec<Problem>> {
    let problem = |e: String| vec![Problem::new("config_source", e)];
    let store = Store::connect(source, base, timeout)
        .await
        .map_err(problem)?;
    let snapshot = store.read(false).await.map_err(problem)?;
    Ok((snapshot, store.root().to_string()))
}

/// A session with the ensemble `servers`, authenticated as `[config_source]` says, and the
/// ACLs of the znodes it creates (everyone, or with digest auth only its user).
pub async fn connect(
    servers: &[String],
    source: &ConfigSourceConfig,
    base: &Path,
    timeout: Duration,
) -> Result<(zk::Client, zk::Acls<'static>), String> {
    let servers = servers.join(",");
    let mut connector = zk::Client::connector()
        .with_session_timeout(source.session_timeout)
        .with_connection_timeout(timeout.min(source.session_timeout))
        .with_fail_eagerly();
    let mut acls = zk::Acls::anyone_all();
    if let Some(user) = &source.digest_user {
        let password = crate::secret::load(
            source.digest_password_env.as_deref(),
            source.digest_password_file.as_deref(),
            base,
        )
        .map_err(|e| {
            format!(
                "config_source digest password: {}",
                e.to_string().replace("password_", "digest_password_")
            )
        })?;
        connector =
            connector.with_auth("digest", format!("{user}:{}", password.expose()).as_bytes());
        acls = zk::Acls::creator_all();
    }
    let client = tokio::time::timeout(timeout, connector.connect(&servers))
        .await
        .map_err(|_| format!("cannot reach ZooKeeper {servers} within {timeout:?}"))?
        .map_err(|e| format!("cannot connect to ZooKeeper {servers}: {e}"))?;
    Ok((client, acls))
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("another push changed the config since it was read (now version {0}); look at `chgate config diff` and push again")]
    Concurrent(u64),
    #[error("{0}")]
    ZooKeeper(String),
}

/// A session with the config root.
pub struct Store {
    client: zk::Client,
    root: String,
    acls: zk::Acls<'static>,
}

impl Store {
    /// Connects (within `timeout`) and makes sure the layout's directories exist.
    pub async fn connect(
        source: &ConfigSourceConfig,
        base: &Path,
        timeout: Duration,
    ) -> Result<Self, String> {
        let (client, acls) = connect(&source.zookeeper, source, base, timeout).await?;
        let root = source.root.trim_end_matches('/').to_string();
        let store = Self { client, root, acls };
        for dir in [
            "config/clusters",
            "config/users",
            "config/quotas",
            "history",
            "members",
        ] {
            store.mkdir(&format!("{}/{dir}", store.root)).await?;
        }
        let version = format!("{}/version", store.root);
        match store
            .client
            .create(&version, b"0", &store.create_options())
            .await
        {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(format!("cannot create {version}: {e}")),
        }
        Ok(store)
    }

    fn create_options(&self) -> zk::CreateOptions<'_> {
        zk::CreateMode::Persistent.with_acls(self.acls)
    }

    async fn mkdir(&self, path: &str) -> Result<(), String> {
        self.client
            .mkdir(path, &self.create_options())
            .await
            .map_err(|e| format!("cannot create {path} in ZooKeeper: {e}"))
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn client(&self) -> &zk::Client {
        &self.client
    }

    /// Reads the whole config root, with watches on every znode of it when `watch`. Reads
    /// again if a push landed meanwhile, so the snapshot is one version's.
    pub async fn read(&self, watch: bool) -> Result<Snapshot, String> {
        for _ in 0..5 {
            let snapshot = self.read_once(watch).await?;
            let (_, stat) = self.get(&format!("{}/version", self.root)).await?;
            if stat.version == snapshot.stat_version {
                return Ok(snapshot);
            }
        }
        Err(format!(
            "{}: the config kept changing while it was read",
            self.root
        ))
    }

    async fn get(&self, path: &str) -> Result<(Vec<u8>, zk::Stat), String> {
        self.client
            .get_data(path)
            .await
            .map_err(|e| format!("reading {path}: {e}"))
    }

    async fn read_once(&self, watch: bool) -> Result<Snapshot, String> {
        let mut watchers = Vec::new();
        let version_path = format!("{}/version", self.root);
        let (data, stat) = if watch {
            let (d, s, w) = self
                .client
                .get_and_watch_data(&version_path)
                .await
                .map_err(|e| format!("reading {version_path}: {e}"))?;
            watchers.push(w);
            (d, s)
        } else {
            self.get(&version_path).await?
        };
        let version = std::str::from_utf8(&data)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let config = format!("{}/config", self.root);
        let mut nodes = Nodes::new();
        let top = self.children(&config, watch, &mut watchers).await?;
        for name in top {
            let path = format!("{config}/{name}");
            if MAP_SECTIONS.contains(&name.as_str()) {
                for entry in self.children(&path, watch, &mut watchers).await? {
                    if let Some(text) = self
                        .text(&format!("{path}/{entry}"), watch, &mut watchers)
                        .await?
                    {
                        nodes.insert(format!("{name}/{entry}"), text);
                    }
                }
            } else if let Some(text) = self.text(&path, watch, &mut watchers).await? {
                nodes.insert(name, text);
            }
        }
        Ok(Snapshot {
            version,
            stat_version: stat.version,
            nodes,
            watchers,
        })
    }

    async fn children(
        &self,
        path: &str,
        watch: bool,
        watchers: &mut Vec<zk::OneshotWatcher>,
    ) -> Result<Vec<String>, String> {
        let result = if watch {
            self.client
                .get_and_watch_children(path)
                .await
                .map(|(c, _, w)| {
                    watchers.push(w);
                    c
                })
        } else {
            self.client.list_children(path).await
        };
        match result {
            Ok(mut c) => {
                c.sort();
                Ok(c)
            }
            Err(zk::Error::NoNode) => Ok(Vec::new()),
            Err(e) => Err(format!("listing {path}: {e}")),
        }
    }

    /// A znode's text; `None` if it went away meanwhile. Text that is not UTF-8 is kept as
    /// a lossy copy, which validation then refuses with its position.
    async fn text(
        &self,
        path: &str,
        watch: bool,
        watchers: &mut Vec<zk::OneshotWatcher>,
    ) -> Result<Option<String>, String> {
        let result = if watch {
            self.client.get_and_watch_data(path).await.map(|(d, _, w)| {
                watchers.push(w);
                d
            })
        } else {
            self.client.get_data(path).await.map(|(d, _)| d)
        };
        match result {
            Ok(d) => Ok(Some(String::from_utf8_lossy(&d).into_owned())),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }

    /// Publishes `nodes` as the next version, if the config is still at `read` (the
    /// snapshot the push was computed from). Returns the new version.
    pub async fn push(
        &self,
        read: &Snapshot,
        nodes: &Nodes,
        whole: &str,
        keep: u32,
    ) -> Result<u64, PushError> {
        let next = read.version + 1;
        let config = format!("{}/config", self.root);
        let history = format!("{}/history", self.root);
        let kept = self
            .client
            .list_children(&history)
            .await
            .map_err(|e| PushError::ZooKeeper(format!("listing {history}: {e}")))?;
        let mut kept: Vec<String> = kept
            .into_iter()
            .filter(|n| n.parse::<u64>().is_ok())
            .collect();
        kept.sort();
        let options = self.create_options();
        let op = |e: zk::Error| PushError::ZooKeeper(e.to_string());
        let mut w = self.client.new_multi_writer();
        w.add_check_version(&format!("{}/version", self.root), read.stat_version)
            .map_err(op)?;
        for path in read.nodes.keys().filter(|p| !nodes.contains_key(*p)) {
            w.add_delete(&format!("{config}/{path}"), None)
                .map_err(op)?;
        }
        for (path, text) in nodes {
            let full = format!("{config}/{path}");
            match read.nodes.get(path) {
                Some(old) if old == text => {}
                Some(_) => w.add_set_data(&full, text.as_bytes(), None).map_err(op)?,
                None => w.add_create(&full, text.as_bytes(), &options).map_err(op)?,
            }
        }
        w.add_set_data(
            &format!("{}/version", self.root),
            next.to_string().as_bytes(),
            None,
        )
        .map_err(op)?;
        let entry = format!("{history}/{next:010}");
        if !kept.contains(&format!("{next:010}")) {
            w.add_create(&entry, whole.as_bytes(), &options)
                .map_err(op)?;
        } else {
            w.add_set_data(&entry, whole.as_bytes(), None).map_err(op)?;
        }
        let excess = (kept.len() + 1).saturating_sub(keep.max(1) as usize);
        for old in kept
            .iter()
            .filter(|k| **k != format!("{next:010}"))
            .take(excess)
        {
            w.add_delete(&format!("{history}/{old}"), None)
                .map_err(op)?;
        }
        match w.commit().await {
            Ok(_) => Ok(next),
            Err(zk::MultiWriteError::OperationFailed { index: 0, .. }) => {
                let now = self.read(false).await.map(|s| s.version).unwrap_or(0);
                Err(PushError::Concurrent(now))
            }
            Err(e) => Err(PushError::ZooKeeper(format!(
                "publishing version {next}: {e}"
            ))),
        }
    }

    /// The versions kept in the history, oldest first.
    pub async fn history(&self) -> Result<Vec<u64>, String> {
        let path = format!("{}/history", self.root);
        let names = self
            .client
            .list_children(&path)
            .await
            .map_err(|e| format!("listing {path}: {e}"))?;
        let mut versions: Vec<u64> = names.iter().filter_map(|n| n.parse().ok()).collect();
        versions.sort();
        Ok(versions)
    }

    /// A kept version's whole text.
    pub async fn version_text(&self, version: u64) -> Result<String, String> {
        let path = format!("{}/history/{version:010}", self.root);
        match self.client.get_data(&path).await {
            Ok((d, _)) => Ok(String::from_utf8_lossy(&d).into_owned()),
            Err(zk::Error::NoNode) => Err(format!(
                "version {version} is not kept (see `chgate config rollback --list`)"
            )),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }

    /// Registers this instance under `<root>/members` (ephemeral: it goes with the session).
    /// A znode of the same name left by an earlier session of this instance (a reconnect
    /// before that session expired, or a restart with the same name) is replaced, or it
    /// would vanish when that session expires and leave this instance out of the fleet.
    pub async fn join(&self, id: &str, about: &str) -> Result<(), String> {
        let path = format!("{}/members/{id}", self.root);
        let options = zk::CreateMode::Ephemeral.with_acls(self.acls);
        for _ in 0..3 {
            match self.client.create(&path, about.as_bytes(), &options).await {
                Ok(_) => return Ok(()),
                Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(format!("cannot register {path}: {e}")),
            }
            match self.client.check_stat(&path).await {
                Ok(Some(stat)) if stat.ephemeral_owner == self.client.session_id().0 => {
                    return Ok(())
                }
                Ok(Some(stat)) => match self.client.delete(&path, Some(stat.version)).await {
                    Ok(()) | Err(zk::Error::NoNode) | Err(zk::Error::BadVersion) => {}
                    Err(e) => return Err(format!("cannot replace the stale {path}: {e}")),
                },
                Ok(None) => {}
                Err(e) => return Err(format!("cannot check {path}: {e}")),
            }
        }
        Err(format!("cannot register {path}: it keeps being re-created"))
    }

    /// Leaves the fleet (deletes this instance's members znode).
    pub async fn leave(&self, id: &str) {
        let path = format!("{}/members/{id}", self.root);
        if let Err(e) = self.client.delete(&path, None).await {
            tracing::debug!(path, error = %e, "Leaving the fleet");
        }
    }

    /// The live members' names, and a watch that fires when they change.
    pub async fn members(&self) -> Result<(Vec<String>, zk::OneshotWatcher), String> {
        let path = format!("{}/members", self.root);
        let (children, _, watcher) = self
            .client
            .get_and_watch_children(&path)
            .await
            .map_err(|e| format!("listing {path}: {e}"))?;
        Ok((children, watcher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[clusters.demo]
shards = [{ replicas = [{ host = "127.0.0.11" }] }]
[clusters.demo.accounts.chgate]
user = "chgate"
password_env = "X"

[users.bi]
password_hash = "h"
cluster = "demo"
account = "chgate"

[users."a.b"]
password_hash = "h"
cluster = "demo"
account = "chgate"
quota = "q"

[quotas.q]
max_concurrent_queries = 2

[picker]
fall = 3
"#;

    #[test]
    fn a_file_splits_into_znodes_and_assembles_back() {
        let nodes = split(FILE).unwrap();
        let paths: Vec<&str> = nodes.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "clusters/demo",
                "picker",
                "quotas/q",
                "users/a.b",
                "users/bi"
            ]
        );
        assert!(
            nodes["users/bi"].contains("cluster = \"demo\""),
            "{}",
            nodes["users/bi"]
        );
        let whole = assemble(&nodes, "/r").unwrap();
        assert_eq!(
            split(&whole).unwrap(),
            nodes,
            "assembled text splits the same: {whole}"
        );
        let d = parse_nodes(&nodes, "/r").unwrap();
        assert_eq!(d.users.len(), 2);
        assert_eq!(d.picker.unwrap().fall, 3);
        assert_eq!(d.quotas["q"].max_concurrent_queries, Some(2));
    }

    #[test]
    fn bootstrap_sections_and_unknown_ones_are_refused() {
        let problems =
            split("[proxy]\nhttp_listen = \"127.0.0.1:1\"\n[nonsense]\nx = 1\n").unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["nonsense", "proxy"]);
        assert!(problems[1].message.contains("bootstrap"));
        assert!(split("users = 3").is_err());
        assert!(split("not toml [").is_err());
    }

    #[test]
    fn a_broken_znode_is_named_with_its_key_and_reason() {
        let mut nodes = split(FILE).unwrap();
        nodes.insert(
            "users/bi".into(),
            "password_hash = \"h\"\ncluster = 7\n".into(),
        );
        nodes.insert("stray".into(), "x = 1".into());
        let problems = parse_nodes(&nodes, "/chgate/t").unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("/chgate/t/config/users/bi: ") && t.contains("line 2")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("/chgate/t/config/stray: unknown znode")),
            "{text:?}"
        );
    }

    #[test]
    fn validation_keys_are_located_in_their_znode() {
        let nodes = split(FILE).unwrap();
        let p = locate(
            Problem::new("users.a.b.quota", "unknown quota"),
            "/r",
            &nodes,
        );
        assert_eq!(p.key, "/r/config/users/a.b (key quota)");
        let p = locate(Problem::new("picker.fall", "bad"), "/r", &nodes);
        assert_eq!(p.key, "/r/config/picker (key fall)");
        let p = locate(Problem::new("users", "at least one"), "/r", &nodes);
        assert_eq!(p.key, "users");
    }

    #[test]
    fn diff_names_what_comes_goes_and_changes() {
        let old = split(FILE).unwrap();
        let mut new = old.clone();
        new.remove("quotas/q");
        new.insert("users/new".into(), "password_hash = \"h\"\n".into());
        new.insert("picker".into(), "fall = 4\n".into());
        let d = diff(&old, &new);
        assert!(d.contains(&"+ users/new".to_string()), "{d:?}");
        assert!(d.contains(&"- quotas/q".to_string()), "{d:?}");
        assert!(d.contains(&"~ picker".to_string()), "{d:?}");
        assert!(d.contains(&"    - fall = 3".to_string()), "{d:?}");
        assert!(d.contains(&"    + fall = 4".to_string()), "{d:?}");
        assert!(diff(&old, &old).is_empty());
    }
}
