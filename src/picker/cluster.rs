//! A cluster as the gateway, the sinks and the pick API see it: its accounts, its topology,
//! the view picks read, and the background tasks that keep that view current.
//!
//! One supervisor task per cluster (started by [`Cluster::start`], stopped when the
//! `Cluster` is dropped) owns:
//! - a probe task per node: `/ping` + the figures query every `probe_interval`, sooner
//!   after a failure; results go into the node's [`super::state::NodeState`];
//! - a probe task per shard group with a ZooKeeper ensemble: `ruok`/`mntr` on each member;
//! - optionally, a discovery task that rebuilds the topology from `system.clusters`;
//! - the publish tick: several times per probe interval it folds passive figures, scores
//!   every node and swaps in a new [`View`]; it also notices a new topology and starts or
//!   stops node tasks to match.
//!
//! A reload replaces a generation while connections may still hold it (a BI tool's native
//! connection keeps its user's cluster for hours). [`Cluster::retire_probes`] stops its
//! probe, group and discovery tasks: the next generation probes the nodes and groups it
//! carried over, whose state both share, so the old view keeps following them; only the
//! publish tick runs on. Without it, each held generation probed every node again, and the
//! health counters of a shared node advanced once per generation and probe.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::budget::RetryBudget;
use super::health::{HealthConfig, State, Transition};
use super::hedge::Hedging;
use super::probe::{probe_node, probe_zookeeper, system_clusters};
use super::purpose::Purpose;
use super::score::ScoreConfig;
use super::series::{Held, Key};
use super::state::{Group, MemberStatus};
use super::topology::Topology;
use super::view::{Inputs, View};
use crate::config::{ClusterConfig, PickerConfig, UpstreamConfig};
use crate::metrics::METRICS;
use crate::secret::Secret;
use crate::upstream::Account;

/// What the tasks share with the request path.
pub struct Shared {
    pub name: String,
    pub picker: PickerConfig,
    config: ClusterConfig,
    upstream: UpstreamConfig,
    probe_account: Option<Arc<Account>>,
    pub topology: ArcSwap<Topology>,
    pub view: ArcSwap<View>,
    /// Wakes the supervisor to publish at once (a node or an ensemble changed state).
    changed: tokio::sync::Notify,
    /// The node and ensemble series this cluster exports (see `series`).
    series: Held,
}

impl Shared {
    fn health_config(&self) -> HealthConfig {
        HealthConfig {
            fall: self.picker.fall,
            rise: self.picker.rise,
            slow_start: self.picker.slow_start,
        }
    }

    fn score_config(&self) -> ScoreConfig {
        ScoreConfig {
            max_replica_delay: self.picker.max_replica_delay,
            max_parts_in_partition: self.picker.max_parts_in_partition,
            load_scale: self.picker.load_scale,
            latency_scale: self.picker.latency_scale,
        }
    }

    /// Scores every node of the current topology and swaps in the new view.
    fn publish(&self) {
        let topology = self.topology.load_full();
        let view = View::build(
            topology,
            &Inputs {
                score: &self.score_config(),
                cache_for: self.picker.probe_interval,
                coordinate_from_degraded_shards: self.picker.coordinate_from_degraded_shards,
            },
        );
        let shard_of = |i: usize| {
            view.topology.shards[view.topology.replicas[i].shard]
                .number
                .to_string()
        };
        let mut keys: HashSet<Key> = HashSet::new();
        keys.insert(Key::Cluster(self.name.clone()));
        for (i, node) in view.topology.nodes.iter().enumerate() {
            keys.insert(Key::Node(node.label().to_string()));
            keys.insert(Key::Member {
                cluster: self.name.clone(),
                shard: shard_of(i),
                node: node.label().to_string(),
            });
        }
        for group in view
            .topology
            .groups
            .iter()
            .filter(|g| !g.zookeeper.is_empty())
        {
            keys.insert(Key::Group {
                cluster: self.name.clone(),
                group: group.name.clone(),
            });
        }
        self.series.hold_only(keys, || {
            for (i, node) in view.topology.nodes.iter().enumerate() {
                let shard = shard_of(i);
                let labels = [self.name.as_str(), shard.as_str(), node.label()];
                METRICS
                    .node_health
                    .with_label_values(&labels)
                    .set((view.standings[i].state == State::Up) as i64);
                for purpose in [Purpose::Read, Purpose::Write] {
                    METRICS
                        .node_weight
                        .with_label_values(&[&self.name, &shard, node.label(), purpose.as_str()])
                        .set(view.published_weight(i, purpose) as f64);
                }
            }
        });
        self.view.store(Arc::new(view));
    }
}

/// What a new generation of clusters takes over from the previous one.
#[derive(Default)]
pub(super) struct Carry {
    pub backends: HashMap<String, Arc<Backend>>,
    pub groups: HashMap<(String, Vec<String>), Arc<Group>>,
}

pub struct Cluster {
    pub name: String,
    pub accounts: HashMap<String, Arc<Account>>,
    pub budget: RetryBudget,
    /// When reads are hedged, from the cluster's recent first-byte times.
    pub hedging: Hedging,
    /// `upstream.first_byte_timeout`.
    pub first_byte_timeout: Option<Duration>,
    /// `upstream.avoid_down_replicas`.
    pub avoid_down_replicas: bool,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Cancels the probe, group and discovery tasks only (a child of `stop`).
    probes: CancellationToken,
    started: AtomicBool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
        // Its tasks may still be finishing: from here on they write no series.
        self.shared.series.release();
    }
}

impl Cluster {
    /// Builds a cluster from its config alone (every node new). Nothing runs until
    /// [`Self::start`]; [`super::Clusters::reconcile`] builds and starts a whole config's.
    pub fn new(
        name: &str,
        config: &ClusterConfig,
        secrets: &std::collections::BTreeMap<(String, String), Secret>,
        upstream: &UpstreamConfig,
        picker: &PickerConfig,
    ) -> Self {
        Self::build(name, config, secrets, upstream, picker, &Carry::default())
    }

    /// [`Self::new`], reusing the backends (by label) and shard groups (by name and
    /// ensemble) of `carry`, so pools and health survive a reload.
    pub(super) fn build(
        name: &str,
        config: &ClusterConfig,
        secrets: &std::collections::BTreeMap<(String, String), Secret>,
        upstream: &UpstreamConfig,
        picker: &PickerConfig,
        carry: &Carry,
    ) -> Self {
        let accounts: HashMap<String, Arc<Account>> = config
            .accounts
            .iter()
            .filter_map(|(acc_name, acc)| {
                let secret = secrets.get(&(name.to_string(), acc_name.clone()))?;
                Some((acc_name.clone(), Arc::new(Account::new(acc, secret))))
            })
            .collect();
        let probe_account = match &config.probe_account {
            Some(a) => accounts.get(a).cloned(),
            None => accounts.values().next().cloned(),
        };
        let groups: Vec<Arc<Group>> = config
            .groups()
            .into_iter()
            .map(|g| {
                let name = g.name.unwrap_or_default();
                carry
                    .groups
                    .get(&(name.clone(), g.zookeeper.clone()))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Group::new(name, g.zookeeper)))
            })
            .collect();
        let topology = Arc::new(Topology::from_config(
            config,
            &groups,
            upstream,
            &carry.backends,
        ));
        let shared = Shared {
            name: name.to_string(),
            picker: picker.clone(),
            config: config.clone(),
            upstream: upstream.clone(),
            probe_account,
            view: ArcSwap::from_pointee(View::build(
                topology.clone(),
                &Inputs {
                    score: &ScoreConfig::default(),
                    cache_for: picker.probe_interval,
                    coordinate_from_degraded_shards: picker.coordinate_from_degraded_shards,
                },
            )),
            topology: ArcSwap::new(topology),
            changed: tokio::sync::Notify::new(),
            series: Held::new(),
        };
        shared.publish();
        let stop = CancellationToken::new();
        Self {
            name: name.to_string(),
            accounts,
            budget: RetryBudget::new(
                upstream.retry_budget_ratio,
                upstream.retry_budget_min_per_second,
            ),
            hedging: Hedging::new(name, upstream),
            first_byte_timeout: upstream.first_byte_timeout,
            avoid_down_replicas: upstream.avoid_down_replicas,
            shared: Arc::new(shared),
            probes: stop.child_token(),
            stop,
            started: AtomicBool::new(false),
        }
    }

    /// This generation is superseded: its probe, group and discovery tasks stop (see the
    /// module docs); its view is still published, from the state it shares with the next.
    pub fn retire_probes(&self) {
        self.probes.cancel();
    }

    /// Starts the probes on the current tokio runtime (once; outside a runtime, e.g. in
    /// unit tests, nothing is started and the view stays as configured).
    pub fn start(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        handle.spawn(supervise(
            self.shared.clone(),
            self.stop.clone(),
            self.probes.clone(),
        ));
    }

    /// The current view. Hold it briefly: it pins one generation of weights.
    pub fn view(&self) -> Guard<Arc<View>> {
        self.shared.view.load()
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.shared.topology.load_full()
    }

    pub fn picker_config(&self) -> &PickerConfig {
        &self.shared.picker
    }

    /// The account the probes use (for chgate's own queries on the nodes).
    pub fn probe_account(&self) -> Option<Arc<Account>> {
        self.shared.probe_account.clone()
    }

    /// The cluster's shard groups (discovery keeps them), to carry their ZooKeeper health
    /// over into the next config generation.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.shared.topology.load().groups.clone()
    }
}

/// The supervisor: see the module docs. `probes` stops the tasks that probe and discover
/// (a child of `stop`, which ends everything).
async fn supervise(shared: Arc<Shared>, stop: CancellationToken, probes: CancellationToken) {
    let mut node_tasks: HashMap<String, (CancellationToken, Arc<Backend>)> = HashMap::new();
    let topology = shared.topology.load_full();
    for group in topology.groups.iter().filter(|g| !g.zookeeper.is_empty()) {
        tokio::spawn(probe_group_loop(
            shared.clone(),
            group.clone(),
            probes.child_token(),
        ));
    }
    if shared.config.discovery.is_some() {
        tokio::spawn(discovery_loop(shared.clone(), probes.child_token()));
    }
    let tick = (shared.picker.probe_interval / 8)
        .clamp(Duration::from_millis(50), Duration::from_millis(250));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<Arc<Topology>> = None;
    // When the first backoff the last view excludes a node for ends: that node is
    // published as back then, not at the next tick (a 1 ms backoff is not 250 ms).
    let mut backoff_ends: Option<tokio::time::Instant> = None;
    loop {
        let backoff_ended = async {
            match backoff_ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
            _ = shared.changed.notified() => {}
            _ = backoff_ended => {}
        }
        let topology = shared.topology.load_full();
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &topology)) {
            let wanted: HashMap<&str, &Arc<Backend>> =
                topology.nodes.iter().map(|n| (n.label(), n)).collect();
            // A task probes one backend object: a label now naming another one (a node
            // built anew, its native port changed say) gets a task of its own, or the
            // backend routed to would never be probed.
            node_tasks.retain(|label, (token, probed)| {
                let keep = wanted
                    .get(label.as_str())
                    .is_some_and(|node| Arc::ptr_eq(node, probed));
                if !keep {
                    token.cancel();
                }
                keep
            });
            for (label, node) in wanted {
                if !node_tasks.contains_key(label) && !probes.is_cancelled() {
                    let token = probes.child_token();
                    tokio::spawn(probe_node_loop(
                        shared.clone(),
                        (*node).clone(),
                        token.clone(),
                    ));
                    node_tasks.insert(label.to_string(), (token, (*node).clone()));
                }
            }
            current = Some(topology.clone());
        }
        for node in &topology.nodes {
            node.state.fold_passive();
        }
        shared.publish();
        backoff_ends = first_backoff_end(&topology);
    }
    for (token, _) in node_tasks.values() {
        token.cancel();
    }
}

/// When the first node of `topology` now backing off may take requests again (a
/// millisecond late, so it is past its backoff then), if one is backing off.
fn first_backoff_end(topology: &Topology) -> Option<tokio::time::Instant> {
    let left = topology
        .nodes
        .iter()
        .filter(|n| n.node.backing_off())
        .map(|n| n.node.backoff_left())
        .min()?;
    Some(tokio::time::Instant::now() + left + Duration::from_millis(1))
}

/// Sleeps until `at` or until stopped; false if stopped.
async fn sleep_until(at: tokio::time::Instant, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep_until(at) => true,
    }
}

/// A small random spread of the probe schedule, so nodes are not probed in lockstep.
fn jitter(interval: Duration) -> Duration {
    interval.mul_f64(rand::random::<f64>() * 0.1)
}

async fn probe_node_loop(shared: Arc<Shared>, backend: Arc<Backend>, stop: CancellationToken) {
    let Some(account) = shared.probe_account.clone() else {
        return;
    };
    let picker = &shared.picker;
    loop {
        let started = tokio::time::Instant::now();
        let node = &backend.node;
        let result = probe_node(
            node,
            &account,
            backend.state.capabilities(),
            picker.probe_timeout,
        )
        .await;
        let ok = result.is_ok();
        let recorded = match result {
            Ok((figures, caps)) => {
                backend.state.set_capabilities(Some(caps));
                // The node answers: whatever connection backoff requests put on it is over.
                node.recovered();
                shared.series.write(&Key::Node(node.label.clone()), || {
                    METRICS
                        .node_probe_seconds
                        .with_label_values(&[&node.label])
                        .set(figures.round_trip.as_secs_f64());
                    METRICS
                        .node_replication_delay
                        .with_label_values(&[&node.label])
                        .set(figures.replica_delay_s as i64);
                });
                Ok(figures)
            }
            Err(e) => {
                shared.series.write(&Key::Node(node.label.clone()), || {
                    METRICS
                        .node_probe_failures
                        .with_label_values(&[&node.label, e.kind()])
                        .inc();
                });
                tracing::debug!(cluster = %shared.name, node = %node.label, error = %e, "Probe failed");
                Err(e.to_string())
            }
        };
        let error = recorded.as_ref().err().cloned();
        let (transition, _) = backend.state.record_probe(shared.health_config(), recorded);
        match transition {
            Some(Transition::WentDown) => tracing::warn!(
                cluster = %shared.name, node = %node.label,
                error = error.as_deref().unwrap_or(""),
                "Node down: failed {} probes in a row", picker.fall
            ),
            Some(Transition::CameBack) => tracing::info!(
                cluster = %shared.name, node = %node.label,
                slow_start_s = picker.slow_start.as_secs_f64(),
                "Node back up, ramping up"
            ),
            None => {}
        }
        if transition.is_some() {
            shared.changed.notify_one();
        }
        let next = if ok {
            started + picker.probe_interval + jitter(picker.probe_interval)
        } else {
            (started + picker.probe_retry_interval).max(tokio::time::Instant::now())
        };
        if !sleep_until(next, &stop).await {
            return;
        }
    }
}

async fn probe_group_loop(shared: Arc<Shared>, group: Arc<Group>, stop: CancellationToken) {
    let picker = &shared.picker;
    let labels = [shared.name.as_str(), group.name.as_str()];
    loop {
        let started = tokio::time::Instant::now();
        let mut probes = tokio::task::JoinSet::new();
        for (i, addr) in group.zookeeper.iter().enumerate() {
            let (addr, timeout) = (addr.clone(), picker.probe_timeout);
            probes.spawn(async move {
                let result = probe_zookeeper(&addr, timeout)
                    .await
                    .map_err(|e| e.to_string());
                (
                    i,
                    MemberStatus {
                        address: addr,
                        result,
                    },
                )
            });
        }
        let mut members: Vec<(usize, MemberStatus)> = probes.join_all().await;
        members.sort_by_key(|(i, _)| *i);
        let members: Vec<MemberStatus> = members.into_iter().map(|(_, m)| m).collect();
        let errors: Vec<String> = members
            .iter()
            .filter_map(|m| {
                m.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", m.address))
            })
            .collect();
        let (transition, healthy) = group.record(shared.health_config(), members);
        let key = Key::Group {
            cluster: shared.name.clone(),
            group: group.name.clone(),
        };
        shared.series.write(&key, || {
            METRICS
                .zookeeper_healthy
                .with_label_values(&labels)
                .set(healthy as i64)
        });
        match transition {
            Some(Transition::WentDown) => tracing::warn!(
                cluster = %shared.name, group = %group.name, errors = %errors.join("; "),
                "ZooKeeper ensemble unhealthy: its shards take no writes"
            ),
            Some(Transition::CameBack) => tracing::info!(
                cluster = %shared.name, group = %group.name,
                "ZooKeeper ensemble healthy again"
            ),
            None => {}
        }
        if transition.is_some() {
            shared.changed.notify_one();
        }
        let next = if transition.is_none() && healthy == errors.is_empty() {
            started + picker.probe_interval + jitter(picker.probe_interval)
        } else {
            (started + picker.probe_retry_interval).max(tokio::time::Instant::now())
        };
        if !sleep_until(next, &stop).await {
            return;
        }
    }
}

async fn discovery_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(discovery) = shared.config.discovery.clone() else {
        return;
    };
    let Some(account) = shared.probe_account.clone() else {
        return;
    };
    let system_cluster = discovery
        .system_cluster
        .clone()
        .unwrap_or_else(|| shared.name.clone());
    loop {
        let started = tokio::time::Instant::now();
        let current = shared.topology.load_full();
        let view = shared.view.load_full();
        // Seeds: nodes that can take reads first, in order; one answer is enough.
        let mut seeds: Vec<usize> = (0..current.nodes.len()).collect();
        seeds.sort_by_key(|&i| {
            view.standings
                .get(i)
                .is_none_or(|s| s.get(Purpose::Read).is_err())
        });
        let mut outcome = Err("no node to ask".to_string());
        for i in seeds {
            let node = &current.nodes[i].node;
            match system_clusters(
                node,
                &account,
                &system_cluster,
                shared.picker.probe_timeout * 2,
            )
            .await
            {
                Ok(rows) => {
                    outcome = Ok((rows, node.label.clone()));
                    break;
                }
                Err(e) => outcome = Err(format!("{}: {e}", node.label)),
            }
        }
        let result = match outcome {
            Ok((rows, seed)) => {
                let next = Topology::from_rows(
                    &rows,
                    &shared.config,
                    discovery.http_port,
                    &current.groups,
                    &shared.upstream,
                    &current.node_map(),
                    seed.clone(),
                );
                match next {
                    None => {
                        tracing::warn!(cluster = %shared.name, seed = %seed, system_cluster = %system_cluster, "system.clusters has no such cluster; keeping the current topology");
                        "failed"
                    }
                    Some(next) if next.same_shape(&current) => "unchanged",
                    Some(next) => {
                        tracing::info!(
                            cluster = %shared.name, seed = %seed,
                            shards = next.shards.len(), replicas = next.nodes.len(),
                            "Topology refreshed from system.clusters"
                        );
                        shared.topology.store(Arc::new(next));
                        shared.changed.notify_one();
                        "changed"
                    }
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %shared.name, error = %e, "Topology refresh failed; keeping the current topology");
                "failed"
            }
        };
        METRICS
            .topology_refreshes
            .with_label_values(&[&shared.name, result])
            .inc();
        if !sleep_until(started + discovery.interval, &stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, PickerConfig, UpstreamConfig};
    use crate::picker::purpose::Purpose;
    use crate::upstream::UpstreamError;
    use std::time::Instant;

    fn refused(c: &Cluster) -> bool {
        c.view().standings[0].get(Purpose::Read).is_err()
    }

    /// Waits (up to 2 s) for the first node to be refused or not, as `want` says.
    async fn until(c: &Cluster, want: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while refused(c) != want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        refused(c) == want
    }

    /// A backoff shorter than the publish tick ends in the view when it ends in the node:
    /// a view published during it is replaced then, not at the next tick (250 ms here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backed_off_node_is_published_as_back_when_its_backoff_ends() {
        let config: ClusterConfig = toml::from_str(
            r#"shards = [{ replicas = [{ host = "127.0.0.1", http_port = 1 }, { host = "127.0.0.2", http_port = 1 }] }]"#,
        )
        .unwrap();
        let picker = PickerConfig {
            probe_interval: Duration::from_secs(60),
            probe_retry_interval: Duration::from_secs(60),
            ..PickerConfig::default()
        };
        let upstream = UpstreamConfig {
            down_backoff_min: Duration::from_millis(100),
            down_backoff_max: Duration::from_millis(100),
            ..UpstreamConfig::default()
        };
        let cluster = Cluster::new("c", &config, &Default::default(), &upstream, &picker);
        cluster.start();
        for round in 0..5 {
            let node = cluster.topology().nodes[0].clone();
            node.node.back_off(&UpstreamError::ConnectTimeout);
            let backed_off = Instant::now();
            cluster.shared.changed.notify_one();
            assert!(until(&cluster, true).await, "round {round}: never refused");
            assert!(until(&cluster, false).await, "round {round}: never back");
            let back = backed_off.elapsed();
            // 100 ms of backoff and a millisecond; the tick alone would take 100-350 ms.
            assert!(
                back < Duration::from_millis(180),
                "round {round}: back after {back:?}"
            );
        }
    }
}
