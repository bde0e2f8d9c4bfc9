//! The sidecar follows its clusters in ZooKeeper: with `[config_source]`, every change of
//! the root is read whole, validated with the sidecar's own file, and the embedded picker's
//! clusters are swapped under the running tasks (a replica added or taken away is picked
//! from, or not, from the next batch on).
//!
//! A task's shards cannot change under it: a key-sharded task maps keys to its shard
//! numbers, and a batch retried after a crash goes back to its shard. A change that would
//! alter the number of shards of a cluster a task writes to, change its accounts or drop
//! the cluster, is refused as a whole and reported as needing a restart; the running
//! clusters stay.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::config::{self, IngestConfig};
use crate::backoff::Backoff;
use crate::config::source::Tracker;
use crate::config::zookeeper::{self, Nodes, Store};
use crate::config::{ClusterConfig, ConfigSourceConfig};
use crate::metrics::METRICS;
use crate::picker::{Cluster, ClusterConfigs, Clusters};

/// A cluster as the tasks writing to it hold it: swapped when the config changes.
pub type Handle = Arc<ArcSwap<Cluster>>;

/// What the follower needs.
pub struct Follow {
    /// The sidecar's own file (its clusters come from the root).
    pub file: IngestConfig,
    pub base: PathBuf,
    pub source: ConfigSourceConfig,
    /// The clusters running now (the admin listener's too).
    pub clusters: Arc<ArcSwap<Clusters>>,
    /// The clusters the tasks write to, by name.
    pub handles: HashMap<String, Handle>,
    /// The clusters' config now (what a change is compared with).
    pub running: BTreeMap<String, ClusterConfig>,
    /// The znodes the start read, not offered again.
    pub started_with: Nodes,
    /// Whether the root can be read now (`chgate_config_stale_seconds`).
    pub tracker: Arc<Tracker>,
}

/// Follows the root until `stop`.
pub async fn run(mut f: Follow, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut last = f.started_with.clone();
    loop {
        let store = tokio::select! {
            s = Store::connect(&f.source, &f.base, f.source.session_timeout) => s,
            _ = stop.cancelled() => return,
        };
        let store = match store {
            Ok(s) => s,
            Err(e) => {
                f.tracker.set_connected(false);
                tracing::warn!(error = %e, "Config source unreachable; the running clusters stay");
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let snapshot = match store.read(true).await {
                Ok(s) => s,
                Err(e) => {
                    f.tracker.set_connected(false);
                    tracing::warn!(error = %e, "Reading the config root failed");
                    break;
                }
            };
            // Only a session that reads starts the waits between sessions again: one
            // that connects and cannot read (a znode's ACL) must not reconnect at once.
            backoff.reset();
            f.tracker.set_connected(true);
            if snapshot.nodes != last {
                apply(&mut f, &snapshot.nodes, store.root(), snapshot.version);
                last = snapshot.nodes.clone();
            }
            let fired: Vec<_> = snapshot
                .watchers
                .into_iter()
                .map(|w| Box::pin(w.changed()))
                .collect();
            if fired.is_empty() {
                break;
            }
            tokio::select! {
                _ = futures_util::future::select_all(fired) => {}
                _ = stop.cancelled() => return,
            }
            if store.client().state().is_terminated() {
                f.tracker.set_connected(false);
                break;
            }
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

/// Validates the root's `nodes` with the sidecar's file and swaps the clusters in, or
/// refuses the change and says why.
fn apply(f: &mut Follow, nodes: &Nodes, root: &str, version: u64) {
    let counted = |result: &str| {
        METRICS.config_reloads.with_label_values(&[result]).inc();
    };
    let next = match next_config(f, nodes, root) {
        Ok(v) => v,
        Err(problems) => {
            counted("rejected");
            for p in &problems {
                tracing::warn!(version, problem = %p, "Config change refused; the running clusters stay");
            }
            return;
        }
    };
    let c = &next.config;
    // Checked on the config, before anything is built: building would already hand the new
    // `[upstream]` settings to the nodes the running clusters share.
    if let Err(why) = compatible(&f.handles, &f.running, &c.clusters) {
        counted("rejected");
        tracing::warn!(version, reason = %why, "Config change needs a restart of the sidecar; the running clusters stay");
        return;
    }
    let current = f.clusters.load_full();
    let generation = current.reconcile(&ClusterConfigs {
        clusters: &c.clusters,
        secrets: &next.secrets,
        upstream: &c.upstream,
        picker: &c.picker,
    });
    for (name, handle) in &f.handles {
        if let Some(cluster) = generation.get(name) {
            handle.store(cluster.clone());
        }
    }
    f.clusters.store(Arc::new(generation));
    f.running = c.clusters.clone();
    counted("ok");
    METRICS.config_version.set(version as i64);
    tracing::info!(
        version,
        clusters = c.clusters.len(),
        "Clusters reloaded from ZooKeeper"
    );
}

fn next_config(
    f: &Follow,
    nodes: &Nodes,
    root: &str,
) -> Result<config::ValidatedIngest, Vec<String>> {
    let strings = |p: Vec<crate::config::Problem>| p.iter().map(ToString::to_string).collect();
    let dynamic = zookeeper::parse_nodes(nodes, root).map_err(strings)?;
    let mut next = f.file.clone();
    next.clusters = dynamic.clusters;
    if let Some(u) = dynamic.upstream {
        next.upstream = u;
    }
    if let Some(p) = dynamic.picker {
        next.picker = p;
    }
    config::validate(next, &f.base).map_err(strings)
}

/// Whether the tasks can go on with the `next` clusters: each one's cluster keeps its
/// number of shards (its shards are numbered 1..n) and its accounts (a task holds its
/// account from the start).
fn compatible(
    handles: &HashMap<String, Handle>,
    running: &BTreeMap<String, ClusterConfig>,
    next: &BTreeMap<String, ClusterConfig>,
) -> Result<(), String> {
    let shards = |c: &ClusterConfig| -> usize { c.groups().iter().map(|g| g.shards.len()).sum() };
    for name in handles.keys() {
        let (Some(was), Some(now)) = (running.get(name), next.get(name)) else {
            return Err(format!("cluster {name}, which tasks write to, is gone"));
        };
        if shards(was) != shards(now) {
            return Err(format!(
                "cluster {name} would go from {} to {} shards under running tasks",
                shards(was),
                shards(now)
            ));
        }
        if was.accounts != now.accounts {
            return Err(format!(
                "the accounts of cluster {name}, which tasks write with, changed"
            ));
        }
    }
    Ok(())
}

/// The handles for the clusters `tasks` write to.
pub fn handles<'a>(
    clusters: &Clusters,
    tasks: impl Iterator<Item = &'a str>,
) -> HashMap<String, Handle> {
    let mut out = HashMap::new();
    for name in tasks {
        if let Some(c) = clusters.get(name) {
            out.entry(name.to_string())
                .or_insert_with(|| Arc::new(ArcSwap::new(c.clone())));
        }
    }
    out
}
