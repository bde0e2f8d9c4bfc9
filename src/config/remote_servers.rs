//! The cluster as its ClickHouse nodes see it: the `remote_servers` element they include
//! from ZooKeeper, rendered from the same typed topology the gateways use, minus the
//! replicas the elected proxy has taken out.
//!
//! Znodes, under the config root (`[config_source] root`):
//!
//! ```text
//! <root>/clickhouse/remote_servers  the element's content, one child per published cluster;
//!                                   in the root's ensemble and in every shard group's
//!                                   ensemble of a published cluster (a node reads `from_zk`
//!                                   from the ensemble of its own <zookeeper> section)
//! <root>/clickhouse/removed         JSON: the replicas taken out, why and since when
//! <root>/clickhouse/ensembles       JSON: the ensembles last published to (one dropped from
//!                                   the config is emptied once, not left stale)
//! <root>/clickhouse/leader          ephemeral: the proxy that keeps the published cluster true
//! ```
//!
//! A node includes it with `<remote_servers from_zk="<root>/clickhouse/remote_servers"/>`;
//! ClickHouse (18.16 too) watches the znode and applies a change without a restart. The
//! published text names the interserver password's environment variable
//! (`<password from_env="..."/>`), never the password. The published znodes are readable by
//! anyone (the nodes' ZooKeeper identity is not chgate's); with digest auth only chgate's
//! user may change them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zookeeper_client as zk;

use super::{ClusterConfig, ConfigSourceConfig, RemoteServersConfig};

/// The published element's znode, relative to the root.
pub const ELEMENT: &str = "clickhouse/remote_servers";
const REMOVED: &str = "clickhouse/removed";
const ENSEMBLES: &str = "clickhouse/ensembles";
const LEADER: &str = "clickhouse/leader";

/// Everyone may read a published znode; with digest auth only its creator may change it.
static READABLE_BY_ALL: [zk::Acl; 2] = [
    zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
    zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
];

/// A replica taken out of the published cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedReplica {
    /// Shard number, from 1.
    pub shard: u32,
    pub reason: String,
    /// Unix seconds.
    pub since: u64,
}

/// The replicas taken out, by cluster (its key in `[clusters]`) and `host:native_port`.
pub type Removed = BTreeMap<String, BTreeMap<String, RemovedReplica>>;

/// A replica's key in [`Removed`].
pub fn replica_key(host: &str, native_port: u16) -> String {
    format!("{host}:{native_port}")
}

/// The clusters that are published, with their settings and published names.
pub fn published(
    clusters: &BTreeMap<String, ClusterConfig>,
) -> impl Iterator<Item = (&String, &ClusterConfig, &RemoteServersConfig, &str)> {
    clusters.iter().filter_map(|(key, c)| {
        let r = c.remote_servers.as_ref()?;
        Some((key, c, r, r.name.as_deref().unwrap_or(key)))
    })
}

/// The label on the element's first line: the config version it was rendered from, and
/// the history that version belongs to, so that nothing overwrites an element of a newer
/// version of the same history (see [`Publisher::publish`]).
const VERSION_LABEL: &str = "<!-- chgate config version ";

/// A config version and its history: the creation zxid of the root's `version` znode, which
/// changes when the root is made again (deleted and pushed anew, or moved to another
/// ensemble) and its numbering starts again. Versions compare only within one history;
/// shard groups' ensembles keep elements of whatever history wrote them last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labelled {
    pub version: u64,
    pub history: i64,
}

impl Labelled {
    fn label(&self) -> String {
        format!("{VERSION_LABEL}{} of {} -->\n", self.version, self.history)
    }

    /// Whether an element labelled `there` must be left alone by one labelled `self`.
    fn is_behind(&self, there: Labelled) -> bool {
        there.history == self.history && there.version > self.version
    }
}

/// The version and history an element was rendered from (version 0, history 0 without a
/// label; history 0 for a label of a version before histories).
fn label_of(element: &str) -> Labelled {
    let mut words = element
        .strip_prefix(VERSION_LABEL)
        .and_then(|rest| rest.split('\n').next())
        .unwrap_or("")
        .split_whitespace();
    let version = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let history = match (words.next(), words.next()) {
        (Some("of"), Some(h)) => h.parse().unwrap_or(0),
        _ => 0,
    };
    Labelled { version, history }
}

/// Whether two elements say the same, whatever versions they were rendered from.
pub fn same_content(a: &str, b: &str) -> bool {
    let body = |s: &str| {
        if s.starts_with(VERSION_LABEL) {
            s.split_once('\n').map_or("", |(_, rest)| rest).to_string()
        } else {
            s.to_string()
        }
    };
    body(a) == body(b)
}

/// The element's content for `clusters` of config `version`, without the `removed`
/// replicas.
pub fn render(
    clusters: &BTreeMap<String, ClusterConfig>,
    removed: &Removed,
    version: Labelled,
) -> String {
    let mut out = version.label();
    for (key, cluster, settings, name) in published(clusters) {
        let out_of = removed.get(key);
        let taken: Vec<String> = out_of
            .map(|m| {
                m.iter()
                    .map(|(r, e)| format!("{r} ({})", e.reason))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<!-- cluster {}, published by chgate{} -->",
            comment(key),
            if taken.is_empty() {
                String::new()
            } else {
                format!("; taken out: {}", comment(&taken.join(", ")))
            }
        );
        let _ = writeln!(out, "<{name}>");
        if let Some(env) = &settings.secret_from_env {
            let _ = writeln!(out, "    <secret from_env=\"{}\"/>", escape(env));
        }
        for group in cluster.groups() {
            for shard in &group.shards {
                out.push_str("    <shard>\n");
                if shard.weight != 1 {
                    let _ = writeln!(out, "        <weight>{}</weight>", shard.weight);
                }
                let _ = writeln!(
                    out,
                    "        <internal_replication>{}</internal_replication>",
                    settings.internal_replication
                );
                for r in &shard.replicas {
                    let k = replica_key(&r.host, r.native_port);
                    if out_of.is_some_and(|m| m.contains_key(&k)) {
                        continue;
                    }
                    replica(&mut out, settings, &r.host, r.native_port);
                }
                out.push_str("    </shard>\n");
            }
        }
        let _ = writeln!(out, "</{name}>");
    }
    out
}

fn replica(out: &mut String, settings: &RemoteServersConfig, host: &str, port: u16) {
    out.push_str("        <replica>\n");
    let _ = writeln!(out, "            <host>{}</host>", escape(host));
    let _ = writeln!(out, "            <port>{port}</port>");
    let _ = writeln!(out, "            <user>{}</user>", escape(&settings.user));
    if let Some(env) = &settings.password_from_env {
        let _ = writeln!(out, "            <password from_env=\"{}\"/>", escape(env));
    }
    if settings.secure {
        out.push_str("            <secure>1</secure>\n");
    }
    out.push_str("        </replica>\n");
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Text safe inside an XML comment (no `--`, no `-` at the end).
fn comment(s: &str) -> String {
    let mut out = escape(s);
    while out.contains("--") {
        out = out.replace("--", "- -");
    }
    if out.ends_with('-') {
        out.push(' ');
    }
    out
}

/// The ensembles the element goes to: the root's, then every shard group's of a published
/// cluster, each once (members sorted).
pub fn ensembles(
    root_ensemble: &[String],
    clusters: &BTreeMap<String, ClusterConfig>,
) -> Vec<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |members: &[String]| {
        let mut m = members.to_vec();
        m.sort();
        if !m.is_empty() && seen.insert(m.clone()) {
            out.push(m);
        }
    };
    add(root_ensemble);
    for (_, cluster, _, _) in published(clusters) {
        for g in cluster.groups() {
            add(&g.zookeeper);
        }
    }
    out
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// It was already so.
    Unchanged,
    /// Left alone: the element there is of this newer config version.
    Newer(u64),
}

/// What publishing to one ensemble did.
#[derive(Debug)]
pub struct Outcome {
    pub ensemble: String,
    pub result: Result<Put, String>,
}

/// Whether a ZooKeeper error ended the session's usefulness (the next use connects again);
/// other errors (a version race, a missing node, no permission) keep the session, and with
/// it the lead.
fn session_lost(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss
            | zk::Error::SessionExpired
            | zk::Error::ClientClosed
            | zk::Error::Timeout
            | zk::Error::AuthFailed
            | zk::Error::SessionMoved
    )
}

/// Sessions with the root's ensemble and the shard groups' ensembles, kept between
/// publications; a session that ended is opened again on its next use.
pub struct Publisher {
    source: ConfigSourceConfig,
    base: PathBuf,
    root: String,
    timeout: Duration,
    sessions: HashMap<Vec<String>, (zk::Client, bool)>,
    /// Ensembles that could not be reached, not tried again before then (a round of the
    /// keeper does not wait out a connect timeout on an ensemble that is down every time).
    unreachable: HashMap<Vec<String>, (std::time::Instant, String)>,
}

/// How long an ensemble that could not be reached is left alone.
const RECONNECT_AFTER: Duration = Duration::from_secs(10);

impl Publisher {
    pub fn new(source: &ConfigSourceConfig, base: &Path, timeout: Duration) -> Self {
        Self {
            source: source.clone(),
            base: base.to_path_buf(),
            root: source.root.trim_end_matches('/').to_string(),
            timeout,
            sessions: HashMap::new(),
            unreachable: HashMap::new(),
        }
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root)
    }

    /// The root ensemble's session (the one leadership is held in).
    pub async fn root_client(&mut self) -> Result<(zk::Client, bool), String> {
        let root = self.source.zookeeper.clone();
        self.client(&root).await
    }

    async fn client(&mut self, ensemble: &[String]) -> Result<(zk::Client, bool), String> {
        let mut key = ensemble.to_vec();
        key.sort();
        if let Some((c, digest)) = self.sessions.get(&key) {
            if !c.state().is_terminated() {
                return Ok((c.clone(), *digest));
            }
        }
        if let Some((until, error)) = self.unreachable.get(&key) {
            if std::time::Instant::now() < *until {
                return Err(format!("{error} (tried again in a few seconds)"));
            }
        }
        let (client, _) =
            match super::zookeeper::connect(ensemble, &self.source, &self.base, self.timeout).await
            {
                Ok(c) => c,
                Err(e) => {
                    let until = std::time::Instant::now() + RECONNECT_AFTER;
                    self.unreachable.insert(key, (until, e.clone()));
                    return Err(e);
                }
            };
        self.unreachable.remove(&key);
        let digest = self.source.digest_user.is_some();
        self.sessions.insert(key, (client.clone(), digest));
        Ok((client, digest))
    }

    /// Forgets an ensemble's session after an error (the next use connects again).
    fn drop_session(&mut self, ensemble: &[String]) {
        let mut key = ensemble.to_vec();
        key.sort();
        self.sessions.remove(&key);
    }

    /// The ACLs of the znodes chgate creates for the nodes: readable by anyone; with
    /// digest auth, changed only by chgate's user.
    fn published_acls(&self) -> zk::Acls<'static> {
        if self.source.digest_user.is_some() {
            zk::Acls::new(&READABLE_BY_ALL)
        } else {
            zk::Acls::anyone_all()
        }
    }

    /// Writes `text` at `rel` in `ensemble` unless it is already so, or (with `version`)
    /// the text there is of a newer config version; creates the parents.
    async fn put(
        &mut self,
        ensemble: &[String],
        rel: &str,
        text: &str,
        version: Option<Labelled>,
    ) -> Result<Put, String> {
        let path = self.path(rel);
        let (client, _) = self.client(ensemble).await?;
        let options = zk::CreateMode::Persistent.with_acls(self.published_acls());
        let result: Result<Put, (zk::Error, String)> = async {
            match client.get_data(&path).await {
                Ok((d, _)) if d == text.as_bytes() => return Ok(Put::Unchanged),
                Ok((d, stat)) => {
                    let there = label_of(&String::from_utf8_lossy(&d));
                    if version.is_some_and(|v| v.is_behind(there)) {
                        return Ok(Put::Newer(there.version));
                    }
                    return client
                        .set_data(&path, text.as_bytes(), Some(stat.version))
                        .await
                        .map(|_| Put::Written)
                        .map_err(|e| (e.clone(), format!("writing {path}: {e}")));
                }
                Err(zk::Error::NoNode) => {}
                Err(e) => return Err((e.clone(), format!("reading {path}: {e}"))),
            }
            if let Some((parent, _)) = path.rsplit_once('/') {
                client
                    .mkdir(parent, &options)
                    .await
                    .map_err(|e| (e.clone(), format!("creating {parent}: {e}")))?;
            }
            client
                .create(&path, text.as_bytes(), &options)
                .await
                .map(|_| Put::Written)
                .map_err(|e| (e.clone(), format!("creating {path}: {e}")))
        }
        .await;
        result.map_err(|(e, message)| {
            if session_lost(&e) {
                self.drop_session(ensemble);
            }
            message
        })
    }

    async fn get(&mut self, ensemble: &[String], rel: &str) -> Result<Option<String>, String> {
        let path = self.path(rel);
        let (client, _) = self.client(ensemble).await?;
        match client.get_data(&path).await {
            Ok((d, _)) => Ok(Some(String::from_utf8_lossy(&d).into_owned())),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => {
                if session_lost(&e) {
                    self.drop_session(ensemble);
                }
                Err(format!("reading {path}: {e}"))
            }
        }
    }

    /// The replicas taken out, as the root's ensemble holds them (none if never written;
    /// a broken znode counts as none, and says so).
    pub async fn removed(&mut self) -> Result<Removed, String> {
        let root = self.source.zookeeper.clone();
        match self.get(&root, REMOVED).await? {
            None => Ok(Removed::new()),
            Some(text) => serde_json::from_str(&text).or_else(|e| {
                tracing::warn!(znode = %self.path(REMOVED), error = %e, "Unreadable list of taken-out replicas; treating it as empty");
                Ok(Removed::new())
            }),
        }
    }

    /// The element as the root's ensemble holds it (`None`: never published).
    pub async fn element(&mut self) -> Result<Option<String>, String> {
        let root = self.source.zookeeper.clone();
        self.get(&root, ELEMENT).await
    }

    /// Records the replicas taken out.
    pub async fn set_removed(&mut self, removed: &Removed) -> Result<(), String> {
        let root = self.source.zookeeper.clone();
        let text = serde_json::to_string_pretty(removed).map_err(|e| e.to_string())?;
        self.put(&root, REMOVED, &text, None).await.map(|_| ())
    }

    /// Publishes the element for `clusters` of config `version` (without the `removed`
    /// replicas) to every ensemble it belongs in, and empties it in ensembles it no longer
    /// does. An element of a newer config version is left alone (a push that landed since
    /// this one was computed).
    pub async fn publish(
        &mut self,
        clusters: &BTreeMap<String, ClusterConfig>,
        removed: &Removed,
        version: u64,
    ) -> Vec<Outcome> {
        let root = self.source.zookeeper.clone();
        let targets = ensembles(&root, clusters);
        // Unreadable: unknown, and then not rewritten either.
        let before: Option<Vec<Vec<String>>> = match self.get(&root, ENSEMBLES).await {
            Ok(Some(t)) => serde_json::from_str(&t).ok(),
            Ok(None) => Some(Vec::new()),
            Err(_) => None,
        };
        let known = before.clone().unwrap_or_default();
        let version = match self.history().await {
            Ok(history) => Labelled { version, history },
            Err(e) => {
                return vec![Outcome {
                    ensemble: root.join(","),
                    result: Err(e),
                }]
            }
        };
        let text = render(clusters, removed, version);
        let mut outcomes = Vec::new();
        let nothing_published = published(clusters).next().is_none();
        for ensemble in &targets {
            // With nothing to publish, the root's znode is only emptied if it exists.
            if nothing_published
                && !known.contains(ensemble)
                && !matches!(self.get(ensemble, ELEMENT).await, Ok(Some(_)))
            {
                continue;
            }
            let result = self.put(ensemble, ELEMENT, &text, Some(version)).await;
            outcomes.push(Outcome {
                ensemble: ensemble.join(","),
                result,
            });
        }
        let empty = version.label();
        for gone in known.iter().filter(|e| !targets.contains(e)) {
            let result = self.put(gone, ELEMENT, &empty, Some(version)).await;
            outcomes.push(Outcome {
                ensemble: gone.join(","),
                result,
            });
        }
        let changed = before.as_ref().is_some_and(|b| *b != targets);
        if changed && outcomes.iter().all(|o| o.result.is_ok()) {
            let list = serde_json::to_string(&targets).unwrap_or_default();
            if let Err(e) = self.put(&root, ENSEMBLES, &list, None).await {
                tracing::warn!(error = %e, "Cannot record the ensembles remote_servers went to");
            }
        }
        outcomes
    }

    /// Takes or keeps the lead (an ephemeral znode in the root's ensemble, tied to this
    /// session): whether this instance leads, and the leader's name.
    pub async fn lead(&mut self, id: &str) -> Result<(bool, Option<String>), String> {
        let root = self.source.zookeeper.clone();
        let path = self.path(LEADER);
        let parent = self.path("clickhouse");
        let (client, _) = self.client(&root).await?;
        let acls = self.published_acls();
        let options = zk::CreateMode::Ephemeral.with_acls(acls);
        let result: Result<(bool, Option<String>), (zk::Error, String)> = async {
            for _ in 0..2 {
                match client.create(&path, id.as_bytes(), &options).await {
                    Ok(_) => return Ok((true, Some(id.to_string()))),
                    Err(zk::Error::NodeExists) => break,
                    Err(zk::Error::NoNode) => client
                        .mkdir(&parent, &zk::CreateMode::Persistent.with_acls(acls))
                        .await
                        .map_err(|e| (e.clone(), format!("creating {parent}: {e}")))?,
                    Err(e) => return Err((e.clone(), format!("creating {path}: {e}"))),
                }
            }
            match client.get_data(&path).await {
                Ok((holder, stat)) => Ok((
                    stat.ephemeral_owner == client.session_id().0,
                    Some(String::from_utf8_lossy(&holder).into_owned()),
                )),
                // The leader just went: the next round tries again.
                Err(zk::Error::NoNode) => Ok((false, None)),
                Err(e) => Err((e.clone(), format!("reading {path}: {e}"))),
            }
        }
        .await;
        result.map_err(|(e, message)| {
            if session_lost(&e) {
                self.drop_session(&root);
            }
            message
        })
    }

    /// The config root's pushed version.
    /// The root's history: the creation zxid of its `version` znode (see [`Labelled`]); 0
    /// before anything was pushed.
    pub async fn history(&mut self) -> Result<i64, String> {
        let root = self.source.zookeeper.clone();
        let path = self.path("version");
        let (client, _) = self.client(&root).await?;
        match client.check_stat(&path).await {
            Ok(stat) => Ok(stat.map_or(0, |s| s.czxid)),
            Err(e) => {
                if session_lost(&e) {
                    self.drop_session(&root);
                }
                Err(format!("reading {path}: {e}"))
            }
        }
    }

    pub async fn root_version(&mut self) -> Result<u64, String> {
        let root = self.source.zookeeper.clone();
        let text = self.get(&root, "version").await?.unwrap_or_default();
        Ok(text.trim().parse().unwrap_or(0))
    }

    /// Gives up the lead (deletes the leader znode if this session holds it).
    pub async fn resign(&mut self) {
        let root = self.source.zookeeper.clone();
        let path = self.path(LEADER);
        if let Ok((client, _)) = self.client(&root).await {
            if let Ok(Some(stat)) = client.check_stat(&path).await {
                if stat.ephemeral_owner == client.session_id().0 {
                    let _ = client.delete(&path, Some(stat.version)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clusters(extra: &str) -> BTreeMap<String, ClusterConfig> {
        toml::from_str(&format!(
            r#"
            [demo]
            [[demo.shard_groups]]
            zookeeper = ["127.0.0.1:2181"]
            shards = [{{ replicas = [{{ host = "127.0.0.11" }}, {{ host = "127.0.0.12" }}] }}]
            [[demo.shard_groups]]
            zookeeper = ["127.0.0.1:2182"]
            shards = [{{ weight = 2, replicas = [{{ host = "127.0.0.13", native_port = 9001 }}] }}]
            [demo.remote_servers]
            password_from_env = "INTERSERVER_PW"
            {extra}
            [other]
            shards = [{{ replicas = [{{ host = "h" }}] }}]
            "#
        ))
        .unwrap()
    }

    #[test]
    fn renders_published_clusters_only_without_removed_replicas() {
        let c = clusters("name = \"demo_cluster\"");
        let mut removed = Removed::new();
        removed.entry("demo".into()).or_default().insert(
            "127.0.0.12:9000".into(),
            RemovedReplica {
                shard: 1,
                reason: "down".into(),
                since: 1,
            },
        );
        let v7 = Labelled {
            version: 7,
            history: 4242,
        };
        let text = render(&c, &removed, v7);
        assert_eq!(label_of(&text), v7, "{text}");
        assert!(text.contains("<demo_cluster>\n"), "{text}");
        assert!(!text.contains("<other>"), "{text}");
        assert!(text.contains("<host>127.0.0.11</host>"), "{text}");
        assert!(!text.contains("<host>127.0.0.12</host>"), "{text}");
        assert!(text.contains("taken out: 127.0.0.12:9000 (down)"), "{text}");
        assert!(text.contains("<port>9001</port>"), "{text}");
        assert!(text.contains("<weight>2</weight>"), "{text}");
        assert!(
            text.contains("<password from_env=\"INTERSERVER_PW\"/>"),
            "{text}"
        );
        assert_eq!(text.matches("<shard>").count(), 2);
        // Well-formed inside ClickHouse's wrapping element.
        let wrapped = format!("<from_zk>{text}</from_zk>");
        assert_eq!(wrapped.matches('<').count(), wrapped.matches('>').count());
    }

    /// Versions compare within one history only: after the root was made again (its
    /// numbering started again), an element of version 57 of the old history is
    /// overwritten by version 1 of the new one, never kept as "newer".
    #[test]
    fn versions_compare_within_one_history() {
        let new = |version, history| Labelled { version, history };
        assert!(new(3, 9).is_behind(new(5, 9)));
        assert!(!new(5, 9).is_behind(new(3, 9)));
        assert!(!new(1, 10).is_behind(new(57, 9)), "another history");
        // A label written before histories: history 0, overwritten by any new one.
        let old = "<!-- chgate config version 57 -->\n<demo/>";
        assert_eq!(label_of(old), new(57, 0));
        assert!(!new(1, 10).is_behind(label_of(old)));
        assert_eq!(label_of("<demo/>"), new(0, 0));
    }

    #[test]
    fn ensembles_are_the_roots_and_every_published_groups_once() {
        let c = clusters("");
        let e = ensembles(&["127.0.0.1:2181".into()], &c);
        assert_eq!(
            e,
            vec![
                vec!["127.0.0.1:2181".to_string()],
                vec!["127.0.0.1:2182".to_string()]
            ]
        );
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(escape("a<b>&\"c"), "a&lt;b&gt;&amp;&quot;c");
        assert_eq!(comment("x--y"), "x- -y");
        assert_eq!(comment("a---b-"), "a- - -b- ");
        assert!(!comment("----").contains("--"));
        // A cluster key may hold `--` (names allow `-`): never inside the comment as is.
        let c: BTreeMap<String, ClusterConfig> = toml::from_str(
            "[\"prod--eu\"]\nshards = [{ replicas = [{ host = \"h\" }] }]\n[\"prod--eu\".remote_servers]\nname = \"prod_eu\"\n",
        )
        .unwrap();
        let text = render(
            &c,
            &Removed::new(),
            Labelled {
                version: 1,
                history: 1,
            },
        );
        assert!(text.contains("<prod_eu>"), "{text}");
        let comments: Vec<&str> = text
            .split("<!--")
            .skip(1)
            .map(|c| c.split("-->").next().unwrap())
            .collect();
        assert!(comments.iter().all(|c| !c.contains("--")), "{text}");
    }
}
