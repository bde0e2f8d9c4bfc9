//! The cluster keeper: in a fleet of proxies on one ZooKeeper root, the elected one keeps
//! the nodes' published `remote_servers` true. Once a second it takes or keeps the lead
//! (an ephemeral znode), feeds what its picker sees into each published cluster's
//! [`removal`] rules, records the replicas taken out and publishes the element to every
//! ensemble that should have it (so an ensemble that was down during a push catches up).
//! Every instance, leading or not, reads what is published for `/v1/topology`. Every 10 s
//! the leader also asks each healthy node of a published cluster for its own
//! `system.clusters`, and names the nodes that do not follow (a node of ClickHouse 18.16
//! stops following its `from_zk` config once its ZooKeeper session has expired, until it
//! restarts).
//!
//! The leader publishes only the config the root holds now, labelled with its version:
//! while it has not applied the root's latest (not yet, or it refused it), it leaves the
//! element alone, and it never overwrites an element of a newer version (a push that
//! landed meanwhile).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::remote_servers::{self, Outcome, Publisher, Put, Removed};
use crate::config::source::Tracker;
use crate::config::{ClusterConfig, ConfigSourceConfig};
use crate::metrics::METRICS;
use crate::picker::removal::{self, Change, Publication, Settings};
use crate::picker::Clusters;

/// How often the keeper looks.
const TICK: Duration = Duration::from_secs(1);

/// How often the leader checks that the nodes follow what is published.
const APPLIED_CHECK_EVERY: u32 = 10;

/// What the keeper reads each round.
pub struct Inputs {
    pub source: ConfigSourceConfig,
    pub base: PathBuf,
    /// The running config's clusters.
    pub configs: Arc<ArcSwap<BTreeMap<String, ClusterConfig>>>,
    /// The running picker.
    pub picker: Box<dyn Fn() -> Arc<Clusters> + Send + Sync>,
    /// The running config's version (applied, or refused).
    pub tracker: Arc<Tracker>,
    /// This instance's name in the fleet.
    pub id: String,
}

/// Runs until `stop`, keeping `shown` current.
pub async fn run(inputs: Inputs, shown: Arc<ArcSwapOption<Publication>>, stop: CancellationToken) {
    let mut keeper = Keeper {
        publisher: Publisher::new(&inputs.source, &inputs.base, TICK * 5),
        trackers: HashMap::new(),
        leading: false,
        rounds: 0,
        suspects: HashMap::new(),
        stale: BTreeMap::new(),
        last_errors: BTreeMap::new(),
        inputs,
    };
    // A round each TICK; one that overran (a slow ensemble) is followed by the next
    // TICK later, not by a burst.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The clusters whose gauges the last round set.
    let mut exported: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => break,
        }
        let publication = keeper.round().await;
        // A cluster gone from the config takes its gauges with it.
        for gone in exported.difference(&publication.clusters.iter().cloned().collect()) {
            let _ = METRICS.remote_servers_removed.remove_label_values(&[gone]);
            let _ = METRICS
                .remote_servers_stale_nodes
                .remove_label_values(&[gone]);
        }
        exported = publication.clusters.iter().cloned().collect();
        for cluster in &publication.clusters {
            let out = publication.removed.get(cluster).map_or(0, |r| r.len());
            METRICS
                .remote_servers_removed
                .with_label_values(&[cluster])
                .set(out as i64);
            let stale = keeper.stale.get(cluster).map_or(0, BTreeMap::len);
            METRICS
                .remote_servers_stale_nodes
                .with_label_values(&[cluster])
                .set(stale as i64);
        }
        shown.store(Some(Arc::new(publication)));
    }
    if keeper.leading {
        keeper.publisher.resign().await;
        METRICS.remote_servers_leader.set(0);
    }
}

struct Keeper {
    inputs: Inputs,
    publisher: Publisher,
    trackers: HashMap<String, removal::Tracker>,
    leading: bool,
    rounds: u32,
    /// (cluster, node) that differed from the published cluster at the last check: what
    /// the node listed.
    suspects: HashMap<(String, String), String>,
    /// Nodes that differed on two checks in a row, by cluster: node -> what differs.
    stale: BTreeMap<String, BTreeMap<String, String>>,
    /// The last error per ensemble (or "zookeeper"), logged once until it changes.
    last_errors: BTreeMap<String, String>,
}

impl Keeper {
    async fn round(&mut self) -> Publication {
        let configs = self.inputs.configs.load_full();
        let clusters: Vec<String> = remote_servers::published(&configs)
            .map(|(k, ..)| k.clone())
            .collect();
        let mut shown = Publication {
            clusters,
            ..Default::default()
        };
        if shown.clusters.is_empty() {
            if self.leading {
                self.publisher.resign().await;
                self.set_leading(false);
            }
            return shown;
        }
        let lead = self.publisher.lead(&self.inputs.id).await;
        let (leads, leader) = match lead {
            Ok(l) => l,
            Err(e) => {
                self.set_leading(false);
                self.note_error("zookeeper", &e);
                shown.last_error = Some(e);
                return shown;
            }
        };
        self.set_leading(leads);
        shown.leader = leader;
        shown.this_instance_leads = leads;
        let mut removed = match self.publisher.removed().await {
            Ok(r) => r,
            Err(e) => {
                self.note_error("zookeeper", &e);
                shown.last_error = Some(e);
                return shown;
            }
        };
        self.last_errors.remove("zookeeper");
        if leads {
            if let Err(e) = self.keep(&configs, &mut removed, &mut shown).await {
                self.note_error("zookeeper", &e);
                shown.last_error = Some(e);
            }
            self.rounds = self.rounds.wrapping_add(1);
            if self.rounds % APPLIED_CHECK_EVERY == 0 {
                self.check_applied(&configs, &removed).await;
            }
            shown.stale_nodes = self
                .stale
                .iter()
                .filter(|(_, nodes)| !nodes.is_empty())
                .map(|(c, nodes)| (c.clone(), nodes.clone()))
                .collect();
        } else {
            self.stale.clear();
            self.suspects.clear();
        }
        shown.removed = removed;
        shown
    }

    fn set_leading(&mut self, leads: bool) {
        if leads != self.leading {
            if leads {
                tracing::info!(instance = %self.inputs.id, "This instance now keeps the nodes' remote_servers (takes failed replicas out, puts them back)");
            } else {
                tracing::info!("This instance no longer keeps the nodes' remote_servers");
                self.trackers.clear();
            }
            self.leading = leads;
            METRICS.remote_servers_leader.set(i64::from(leads));
        }
    }

    fn note_error(&mut self, at: &str, error: &str) {
        if self.last_errors.get(at).map(String::as_str) != Some(error) {
            tracing::warn!(at, error, "Keeping the nodes' remote_servers");
            self.last_errors.insert(at.to_string(), error.to_string());
        }
    }

    /// The leader's work: decide, record, publish.
    async fn keep(
        &mut self,
        configs: &BTreeMap<String, ClusterConfig>,
        removed: &mut Removed,
        shown: &mut Publication,
    ) -> Result<(), String> {
        let before = removed.clone();
        self.decide(configs, removed);
        if *removed != before {
            self.publisher.set_removed(removed).await?;
        }
        // Publish only the config the root holds now, and as its version: read the root's
        // version first, then the running one (set after the clusters it goes with), then
        // those clusters. A push that lands meanwhile wrote its own element, of a newer
        // version, which `publish` leaves alone.
        let root_version = self.publisher.root_version().await?;
        if self.inputs.tracker.status().version != root_version {
            return Ok(());
        }
        let configs = self.inputs.configs.load_full();
        let outcomes = self
            .publisher
            .publish(&configs, removed, root_version)
            .await;
        for Outcome { ensemble, result } in outcomes {
            match result {
                Ok(put) => {
                    if put == Put::Written {
                        tracing::info!(
                            ensemble,
                            version = root_version,
                            "Published the nodes' remote_servers"
                        );
                    }
                    self.last_errors.remove(&ensemble);
                    shown.ensembles.insert(ensemble, "ok".into());
                }
                Err(e) => {
                    METRICS
                        .remote_servers_publish_errors
                        .with_label_values(&[&ensemble])
                        .inc();
                    self.note_error(&ensemble, &e);
                    shown.ensembles.insert(ensemble, e);
                }
            }
        }
        Ok(())
    }

    /// Runs each published cluster's removal rules over what the picker sees.
    fn decide(&mut self, configs: &BTreeMap<String, ClusterConfig>, removed: &mut Removed) {
        let picker = (self.inputs.picker)();
        let now = Instant::now();
        let unix_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        removed.retain(|k, _| configs.get(k).is_some_and(|c| c.remote_servers.is_some()));
        self.trackers
            .retain(|k, _| removed.contains_key(k) || configs.contains_key(k));
        for (key, _, settings, _) in remote_servers::published(configs) {
            let Some(cluster) = picker.get(key) else {
                continue;
            };
            let seen = removal::observe(cluster);
            let settings = Settings {
                remove_failed: settings.remove_failed,
                remove_after: settings.remove_after,
                restore_after: settings.restore_after,
                min_removal_interval: settings.min_removal_interval,
            };
            let out = removed.entry(key.clone()).or_default();
            let changes = self
                .trackers
                .entry(key.clone())
                .or_default()
                .step(now, unix_now, &seen, out, &settings);
            for change in changes {
                log_change(key, &change);
            }
        }
        removed.retain(|_, r| !r.is_empty());
    }
}

impl Keeper {
    /// Asks each healthy node of each published cluster for its own `system.clusters` and
    /// compares it with what is published; a node that differs twice in a row is stale.
    async fn check_applied(
        &mut self,
        configs: &BTreeMap<String, ClusterConfig>,
        removed: &Removed,
    ) {
        let picker = (self.inputs.picker)();
        for (key, cluster, _, name) in remote_servers::published(configs) {
            let Some(running) = picker.get(key) else {
                continue;
            };
            let Some(account) = running.probe_account() else {
                continue;
            };
            let out = removed.get(key);
            let mut expected: Vec<String> = cluster
                .groups()
                .iter()
                .flat_map(|g| g.shards.iter().flat_map(|s| &s.replicas))
                .map(|r| remote_servers::replica_key(&r.host, r.native_port))
                .filter(|k| !out.is_some_and(|o| o.contains_key(k)))
                .collect();
            expected.sort();
            let expected = expected.join(",");
            let sql = format!(
                "SELECT arrayStringConcat(arraySort(groupArray(concat(host_name, ':', toString(port)))), ',') FROM system.clusters WHERE cluster = '{name}'"
            );
            let view = running.view();
            let nodes: Vec<_> = view
                .topology
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| view.standings[*i].state == crate::picker::health::State::Up)
                .map(|(_, b)| b.clone())
                .collect();
            drop(view);
            let asks = nodes.iter().map(|b| {
                let (account, sql) = (account.clone(), sql.clone());
                async move {
                    let answer = b.node.query(&account, &sql, Duration::from_secs(2)).await;
                    (b.node.label.clone(), answer)
                }
            });
            let answers = futures_util::future::join_all(asks).await;
            let stale = self.stale.entry(key.clone()).or_default();
            for (node, answer) in answers {
                let Ok(listed) = answer else {
                    continue;
                };
                let listed = listed.trim().to_string();
                let suspect = (key.clone(), node.clone());
                if listed == expected {
                    self.suspects.remove(&suspect);
                    if stale.remove(&node).is_some() {
                        tracing::info!(cluster = %key, node, "The node follows the published remote_servers again");
                    }
                    continue;
                }
                let before = self.suspects.insert(suspect, listed.clone());
                if before.as_deref() == Some(listed.as_str()) && !stale.contains_key(&node) {
                    let why = format!("lists [{listed}], published [{expected}]");
                    tracing::warn!(cluster = %key, node, differs = %why, "A node does not follow the published remote_servers (ClickHouse 18.16 stops once its ZooKeeper session expired; restart it)");
                    stale.insert(node, why);
                }
            }
        }
    }
}

fn log_change(cluster: &str, change: &Change) {
    match change {
        Change::Removed { key, shard, reason } => {
            METRICS
                .remote_servers_changes
                .with_label_values(&[cluster, "removed"])
                .inc();
            tracing::warn!(cluster, replica = %key, shard, reason = %reason, "Took a failed replica out of the nodes' remote_servers");
        }
        Change::Restored { key, shard, after } => {
            METRICS
                .remote_servers_changes
                .with_label_values(&[cluster, "restored"])
                .inc();
            tracing::info!(cluster, replica = %key, shard, healthy_for = ?after, "Put a replica back into the nodes' remote_servers");
        }
        Change::Forgotten { key } => {
            tracing::info!(cluster, replica = %key, "A taken-out replica is no longer configured; forgotten");
        }
    }
}
