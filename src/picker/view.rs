//! The published state of a cluster: every node's standing per purpose and the snapshots
//! picks are drawn from. Rebuilt by the cluster's supervisor a few times per probe interval
//! and swapped in whole; a pick reads one `View` and never waits.

use std::sync::Arc;
use std::time::Duration;

use super::health::State;
use super::purpose::Purpose;
use super::score::{score, Exclusion, NodeView, ScoreConfig, WEIGHT_SCALE};
use super::select::Snapshot;
use super::topology::Topology;

/// One node's standing when the view was built.
#[derive(Debug, Clone)]
pub struct Standing {
    pub state: State,
    pub ramp: f64,
    /// Weight per purpose ([read, write]), or why the node is excluded.
    pub purposes: [Result<u32, Exclusion>; 2],
}

impl Standing {
    pub fn get(&self, purpose: Purpose) -> &Result<u32, Exclusion> {
        &self.purposes[purpose.index()]
    }
}

/// Why nothing could be picked: per node, the reason it is excluded.
#[derive(Debug, Clone)]
pub struct NoNode {
    pub purpose: Purpose,
    /// The 1-based shard the pick was pinned to, if any.
    pub shard: Option<u32>,
    /// (node index, reason) for every node considered.
    pub reasons: Vec<(usize, Exclusion)>,
}

pub struct View {
    pub topology: Arc<Topology>,
    pub standings: Box<[Standing]>,
    /// How long a pick answer may be cached by its caller.
    pub cache_for: Duration,
    /// Over all nodes, per purpose, priority applied.
    cluster: [Snapshot; 2],
    /// Sessions: the configured weight of every node that is up, so a session's node does
    /// not move with load or lag (moving a session loses its temporary tables and
    /// settings, which is worse than a stale read), only when the node is down.
    sticky: Snapshot,
    /// Per shard (node indices local to the shard), per purpose.
    per_shard: Box<[[Snapshot; 2]]>,
    /// Shards by how much of an unpinned write they take.
    shard_write: Snapshot,
    /// Some node is down or unreachable: a read may wait on it behind its coordinator.
    pub degraded: bool,
    /// Every shard with a node down or unreachable has its first replica (in the order of
    /// the nodes' `remote_servers`) up: reads in ClickHouse's `in_order` load balancing
    /// avoid every such node.
    pub in_order_avoids_down: bool,
    /// Per node: a preferred coordinator for reads (a replica of a shard with a node down,
    /// see [`Inputs::coordinate_from_degraded_shards`]); all true when none is preferred.
    coordinators: Box<[bool]>,
}

/// Everything a view is built from, besides the topology.
pub struct Inputs<'a> {
    pub score: &'a ScoreConfig,
    pub cache_for: Duration,
    /// `picker.coordinate_from_degraded_shards`.
    pub coordinate_from_degraded_shards: bool,
}

/// True if the node is down or its connections fail: it may hang a query that reaches it.
fn unreachable(standing: &Standing) -> bool {
    standing.state == State::Down
        || matches!(
            standing.get(Purpose::Read),
            Err(Exclusion::Down | Exclusion::Refused { .. })
        )
}

impl View {
    pub fn build(topology: Arc<Topology>, inputs: &Inputs<'_>) -> Self {
        let standings: Box<[Standing]> = topology
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let probed = node.state.snapshot();
                let replica = &topology.replicas[i];
                let group = topology.shards[replica.shard]
                    .group
                    .map(|g| &topology.groups[g]);
                let down = probed.health.state() == State::Down;
                let view = NodeView {
                    configured_weight: replica.weight,
                    down,
                    ramp: probed.health.ramp(),
                    figures: probed.figures.clone(),
                    error_rate: probed.error_rate,
                    zookeeper_healthy: group.is_none_or(|g| g.healthy()),
                    refused_for: node.node.backing_off().then(|| node.node.backoff_left()),
                };
                let s = score(&view, inputs.score);
                Standing {
                    state: probed.health.state(),
                    ramp: view.ramp,
                    purposes: [s.read, s.write],
                }
            })
            .collect();
        let labels: Vec<&str> = topology.nodes.iter().map(|n| n.label()).collect();
        let priorities: Vec<u32> = topology.replicas.iter().map(|r| r.priority).collect();
        let weights = |purpose: Purpose, members: &[usize]| -> Vec<u32> {
            let raw: Vec<u32> = members
                .iter()
                .map(|&i| *standings[i].get(purpose).as_ref().unwrap_or(&0))
                .collect();
            best_priority_only(&raw, members.iter().map(|&i| priorities[i]))
        };
        let all: Vec<usize> = (0..topology.nodes.len()).collect();
        let degraded = standings.iter().any(unreachable);
        let in_order_avoids_down = degraded
            && topology.shards.iter().all(|shard| {
                let down = |&i: &usize| unreachable(&standings[i]);
                !shard.nodes.iter().any(down)
                    || shard
                        .nodes
                        .iter()
                        .find(|&&i| topology.replicas[i].replica_num == 1)
                        .is_some_and(|i| !down(i))
            });
        let coordinators = coordinators(&topology, &standings, |p, m| weights(p, m), inputs);
        // The coordinators first, then priority among them: the other way round, a
        // degraded shard served by its standby alone zeroed every node (the standby for
        // its priority, the rest as no coordinators), and the cluster looked unreadable.
        let coordinating: Vec<u32> = all
            .iter()
            .map(|&i| match standings[i].get(Purpose::Read) {
                Ok(w) if coordinators[i] => *w,
                _ => 0,
            })
            .collect();
        let read = best_priority_only(&coordinating, priorities.iter().copied());
        let cluster = [
            Snapshot::new(&read, &labels),
            Snapshot::new(&weights(Purpose::Write, &all), &labels),
        ];
        let sticky_raw: Vec<u32> = all
            .iter()
            .map(|&i| match standings[i].get(Purpose::Read) {
                Ok(_) | Err(Exclusion::ReplicaDelay { .. }) => {
                    ((topology.replicas[i].weight * WEIGHT_SCALE).round() as u32).max(1)
                }
                Err(_) => 0,
            })
            .collect();
        let sticky = Snapshot::new(
            &best_priority_only(&sticky_raw, priorities.iter().copied()),
            &labels,
        );
        let per_shard: Box<[[Snapshot; 2]]> = topology
            .shards
            .iter()
            .map(|shard| {
                let local: Vec<&str> = shard.nodes.iter().map(|&i| labels[i]).collect();
                [Purpose::Read, Purpose::Write]
                    .map(|p| Snapshot::new(&weights(p, &shard.nodes), &local))
            })
            .collect();
        // A shard takes unpinned writes in proportion to its configured weight times the
        // mean write weight of its replicas (0 if none can take writes).
        let shard_weights: Vec<u32> = topology
            .shards
            .iter()
            .map(|shard| {
                let sum: f64 = shard
                    .nodes
                    .iter()
                    .map(|&i| *standings[i].get(Purpose::Write).as_ref().unwrap_or(&0) as f64)
                    .sum();
                if sum == 0.0 {
                    return 0;
                }
                let mean = sum / shard.nodes.len().max(1) as f64;
                ((shard.weight as f64 * mean).round() as u32).max(1)
            })
            .collect();
        let shard_labels: Vec<String> = topology
            .shards
            .iter()
            .map(|s| s.number.to_string())
            .collect();
        let shard_label_refs: Vec<&str> = shard_labels.iter().map(String::as_str).collect();
        let shard_write = Snapshot::new(&shard_weights, &shard_label_refs);
        Self {
            topology,
            standings,
            cache_for: inputs.cache_for,
            cluster,
            sticky,
            per_shard,
            shard_write,
            degraded,
            in_order_avoids_down,
            coordinators,
        }
    }

    /// True if `node` is a preferred coordinator for reads now.
    pub fn preferred_coordinator(&self, node: usize) -> bool {
        self.coordinators.get(node).copied().unwrap_or(true)
    }

    /// The node for one proxied request: weighted power-of-two-choices over the nodes
    /// eligible for `purpose`, or the session's node. No lock, no allocation.
    pub fn choose(
        &self,
        purpose: Purpose,
        session: Option<&[u8]>,
        random: [u64; 2],
    ) -> Option<usize> {
        if let Some(key) = session {
            return self.sticky.pick_sticky(key);
        }
        let nodes = &self.topology.nodes;
        self.cluster[purpose.index()].pick(|i| nodes[i].node.load(), random)
    }

    /// The next node to try after `tried` failed: the eligible node with the least load
    /// per weight (for reads, a preferred coordinator first), whatever its priority; for reads, failing that, the least lagging
    /// replica (a stale answer beats none). Never a node that is down.
    pub fn fallback(&self, purpose: Purpose, tried: &[usize]) -> Option<usize> {
        let nodes = &self.topology.nodes;
        let candidates = || (0..nodes.len()).filter(|i| !tried.contains(i));
        let best = candidates()
            .filter_map(|i| {
                self.standings[i]
                    .get(purpose)
                    .as_ref()
                    .ok()
                    .map(|&w| (i, w))
            })
            .min_by_key(|&(i, w)| {
                (
                    purpose == Purpose::Read && !self.preferred_coordinator(i),
                    (nodes[i].node.load() + 1) * 1_000_000 / w.max(1) as u64,
                )
            })
            .map(|(i, _)| i);
        if best.is_some() || purpose == Purpose::Write {
            return best;
        }
        candidates()
            .filter_map(|i| match self.standings[i].get(purpose) {
                Err(Exclusion::ReplicaDelay { seconds, .. }) => Some((i, *seconds)),
                _ => None,
            })
            .min_by_key(|&(_, lag)| lag)
            .map(|(i, _)| i)
    }

    /// A pick for the API: a node for `purpose`, within the 1-based `shard` if given. An
    /// unpinned write first chooses a shard (by health and shard weight), then a replica.
    pub fn pick(
        &self,
        purpose: Purpose,
        shard: Option<u32>,
        random: [u64; 2],
    ) -> Result<usize, NoNode> {
        let nodes = &self.topology.nodes;
        let no_node = |members: &mut dyn Iterator<Item = usize>| NoNode {
            purpose,
            shard,
            reasons: members
                .filter_map(|i| self.standings[i].get(purpose).clone().err().map(|e| (i, e)))
                .collect(),
        };
        let shard_index = match shard {
            Some(number) => match self.topology.shard_index(number) {
                Some(s) => Some(s),
                None => {
                    return Err(NoNode {
                        purpose,
                        shard,
                        reasons: Vec::new(),
                    })
                }
            },
            None if purpose == Purpose::Write => {
                // Fresh bits for the shard draw, so it does not correlate with the replica's.
                let mixed = random.map(|r| r.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29));
                match self.shard_write.pick(|_| 0, mixed) {
                    Some(s) => Some(s),
                    None => return Err(no_node(&mut (0..nodes.len()))),
                }
            }
            None => None,
        };
        match shard_index {
            Some(s) => {
                let members = &self.topology.shards[s].nodes;
                self.per_shard[s][purpose.index()]
                    .pick(|local| nodes[members[local]].node.load(), random)
                    .map(|local| members[local])
                    .ok_or_else(|| no_node(&mut members.iter().copied()))
            }
            None => self
                .choose(purpose, None, random)
                .ok_or_else(|| no_node(&mut (0..nodes.len()))),
        }
    }

    /// The weight a node gets in its shard's snapshot for `purpose` (after priority).
    pub fn published_weight(&self, node: usize, purpose: Purpose) -> u32 {
        self.cluster[purpose.index()].weight(node)
    }

    /// True if some node can take reads.
    pub fn readable(&self) -> bool {
        self.cluster[Purpose::Read.index()].eligible() > 0
    }
}

/// Which nodes should coordinate reads: with `coordinate_from_degraded_shards`, while some
/// shard has a node down and another of its replicas can take reads, only the replicas of
/// such shards that can; otherwise every node.
fn coordinators(
    topology: &Topology,
    standings: &[Standing],
    weights: impl Fn(Purpose, &[usize]) -> Vec<u32>,
    inputs: &Inputs<'_>,
) -> Box<[bool]> {
    let every = vec![true; topology.nodes.len()].into_boxed_slice();
    if !inputs.coordinate_from_degraded_shards {
        return every;
    }
    let mut preferred = vec![false; topology.nodes.len()];
    let mut any = false;
    for shard in topology.shards.iter() {
        if !shard.nodes.iter().any(|&i| unreachable(&standings[i])) {
            continue;
        }
        for (&i, &w) in shard
            .nodes
            .iter()
            .zip(&weights(Purpose::Read, &shard.nodes))
        {
            if w > 0 {
                preferred[i] = true;
                any = true;
            }
        }
    }
    if any {
        preferred.into_boxed_slice()
    } else {
        every
    }
}

/// Zeroes the weights of nodes whose priority is worse than the best priority among the
/// eligible ones.
fn best_priority_only(weights: &[u32], priorities: impl Iterator<Item = u32>) -> Vec<u32> {
    let priorities: Vec<u32> = priorities.collect();
    let best = weights
        .iter()
        .zip(&priorities)
        .filter(|(&w, _)| w > 0)
        .map(|(_, &p)| p)
        .min();
    weights
        .iter()
        .zip(&priorities)
        .map(|(&w, &p)| if Some(p) == best { w } else { 0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::ClusterConfig;
    use crate::picker::figures::NodeFigures;
    use crate::picker::health::HealthConfig;
    use crate::picker::state::{Group, MemberStatus};

    const HEALTH: HealthConfig = HealthConfig {
        fall: 1,
        rise: 1,
        slow_start: Duration::from_secs(10),
    };

    fn topology() -> Arc<Topology> {
        let c: ClusterConfig = toml::from_str(
            r#"
            [[shard_groups]]
            shards = [{ replicas = [{ host = "a1" }, { host = "a2" }, { host = "a3", priority = 1 }] }]
            [[shard_groups]]
            zookeeper = ["127.0.0.1:1"]
            shards = [{ replicas = [{ host = "b1" }, { host = "b2", weight = 3.0 }] }]
            "#,
        )
        .unwrap();
        let groups: Vec<_> = c
            .groups()
            .into_iter()
            .map(|g| Arc::new(Group::new(g.name.unwrap(), g.zookeeper)))
            .collect();
        Arc::new(Topology::from_config(
            &c,
            &groups,
            &Default::default(),
            &HashMap::new(),
        ))
    }

    fn build(t: &Arc<Topology>) -> View {
        View::build(
            t.clone(),
            &Inputs {
                score: &ScoreConfig {
                    max_replica_delay: Duration::from_secs(5),
                    ..Default::default()
                },
                cache_for: Duration::from_secs(1),
                coordinate_from_degraded_shards: true,
            },
        )
    }

    fn counts(v: &View, purpose: Purpose, shard: Option<u32>) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for _ in 0..20_000 {
            let i = v
                .pick(purpose, shard, [rand::random(), rand::random()])
                .unwrap();
            *c.entry(v.topology.nodes[i].label().to_string())
                .or_default() += 1;
        }
        c
    }

    #[test]
    fn reads_are_coordinated_from_the_shard_of_a_down_replica() {
        let t = topology();
        let v = build(&t);
        assert!(!v.degraded);
        let before = counts(&v, Purpose::Read, None);
        assert!(
            before.keys().any(|k| k.starts_with('a')) && before.keys().any(|k| k.starts_with('b'))
        );
        // b1 stops answering: reads are coordinated by b2, which reads shard 2 locally.
        t.nodes[3]
            .state
            .record_probe(HEALTH, Err("timed out".into()));
        let v = build(&t);
        assert!(v.degraded);
        assert!(!v.in_order_avoids_down, "b1 is its shard's first replica");
        let c = counts(&v, Purpose::Read, None);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["b2:8123"], "{c:?}");
        // A failover or hedge prefers it too; once it is tried, any other node.
        assert_eq!(v.fallback(Purpose::Read, &[]), Some(4));
        assert!(v.fallback(Purpose::Read, &[4]).is_some_and(|i| i < 3));
        // Writes and pinned reads are not affected.
        assert!(counts(&v, Purpose::Write, None)
            .keys()
            .any(|k| k.starts_with('a')));
        assert!(v.pick(Purpose::Read, Some(1), [1, 2]).is_ok());
        // Turned off: every healthy node coordinates.
        let off = View::build(
            t.clone(),
            &Inputs {
                score: &ScoreConfig::default(),
                cache_for: Duration::from_secs(1),
                coordinate_from_degraded_shards: false,
            },
        );
        assert!(off.degraded);
        assert!(counts(&off, Purpose::Read, None).len() >= 3);
        // b1 back, a2 (its shard's second replica) down: in_order reads avoid it.
        t.nodes[3]
            .state
            .record_probe(HEALTH, Ok(NodeFigures::default()));
        t.nodes[1]
            .state
            .record_probe(HEALTH, Err("timed out".into()));
        let v = build(&t);
        assert!(v.degraded && v.in_order_avoids_down);
    }

    #[test]
    fn priority_keeps_standbys_out_until_needed() {
        let t = topology();
        let v = build(&t);
        let c = counts(&v, Purpose::Read, Some(1));
        assert!(!c.contains_key("a3:8123"), "{c:?}");
        // Both preferred replicas down: the standby takes over.
        t.nodes[0].state.record_probe(HEALTH, Err("x".into()));
        t.nodes[1].state.record_probe(HEALTH, Err("x".into()));
        let v = build(&t);
        assert_eq!(counts(&v, Purpose::Read, Some(1)).len(), 1);
        assert_eq!(
            v.pick(Purpose::Read, Some(1), [1, 2])
                .map(|i| t.nodes[i].label().to_string())
                .unwrap(),
            "a3:8123"
        );
        // Unpinned too: the standby is the degraded shard's coordinator, and the cluster
        // stays readable (it was all zeros: /readyz 503 on every proxy).
        assert!(v.readable());
        assert_eq!(
            counts(&v, Purpose::Read, None).keys().collect::<Vec<_>>(),
            ["a3:8123"]
        );
    }

    #[test]
    fn an_unhealthy_ensemble_refuses_its_shard_for_writes_with_the_reason() {
        let t = topology();
        let member = MemberStatus {
            address: "127.0.0.1:1".into(),
            result: Err("refused".into()),
        };
        t.groups[1].record(HEALTH, vec![member]);
        let v = build(&t);
        let err = v.pick(Purpose::Write, Some(2), [1, 2]).unwrap_err();
        assert_eq!(err.shard, Some(2));
        assert_eq!(err.reasons.len(), 2);
        assert!(err
            .reasons
            .iter()
            .all(|(_, e)| *e == Exclusion::ZooKeeperUnhealthy));
        // Reads on shard 2 still work; unpinned writes all go to shard 1.
        assert!(v.pick(Purpose::Read, Some(2), [1, 2]).is_ok());
        let c = counts(&v, Purpose::Write, None);
        assert!(c.keys().all(|k| k.starts_with('a')), "{c:?}");
        // An unknown shard is a NoNode without reasons.
        assert!(v
            .pick(Purpose::Write, Some(9), [1, 2])
            .unwrap_err()
            .reasons
            .is_empty());
    }

    #[test]
    fn lagging_replicas_serve_reads_only_as_a_last_resort() {
        let t = topology();
        for (i, lag) in [(0usize, 60u64), (1, 7), (3, 100), (4, 0)] {
            t.nodes[i].state.record_probe(
                HEALTH,
                Ok(NodeFigures {
                    replica_delay_s: lag,
                    ..Default::default()
                }),
            );
        }
        let v = build(&t);
        assert!(matches!(
            v.standings[1].get(Purpose::Read),
            Err(Exclusion::ReplicaDelay { seconds: 7, max: 5 })
        ));
        // Shard 1: only the standby is fresh.
        let c = counts(&v, Purpose::Read, Some(1));
        assert_eq!(c.keys().collect::<Vec<_>>(), ["a3:8123"]);
        // Fallback after every fresh node was tried: the least lagging one.
        let fresh = [2usize, 4];
        assert_eq!(v.fallback(Purpose::Read, &fresh), Some(1));
        assert_eq!(v.fallback(Purpose::Write, &[0, 1, 2, 3, 4]), None);
    }

    #[test]
    fn unpinned_writes_spread_over_shards_by_health() {
        let t = topology();
        let v = build(&t);
        let c = counts(&v, Purpose::Write, None);
        let shard1: usize = ["a1:8123", "a2:8123"].iter().map(|k| c[*k]).sum();
        // Shard 1: mean of (1000, 1000, 1000); shard 2: mean of (1000, 3000) = 2000.
        let share = shard1 as f64 / 20_000.0;
        assert!((share - 1.0 / 3.0).abs() < 0.03, "{share} {c:?}");
        assert!(!c.contains_key("a3:8123"), "the standby takes no writes");
    }

    #[test]
    fn sessions_do_not_follow_load() {
        let t = topology();
        let v = build(&t);
        let homes: Vec<_> = (0..50)
            .map(|k| v.choose(Purpose::Read, Some(format!("s-{k}").as_bytes()), [0, 0]))
            .collect();
        // Every node busy at a different level: weights change, sessions stay.
        for (i, node) in t.nodes.iter().enumerate() {
            node.state.record_probe(
                HEALTH,
                Ok(NodeFigures {
                    running_queries: 10 * i as u64,
                    ..Default::default()
                }),
            );
        }
        let v2 = build(&t);
        assert_ne!(
            v2.standings[0].get(Purpose::Read),
            v2.standings[4].get(Purpose::Read)
        );
        for (k, home) in homes.iter().enumerate() {
            assert_eq!(
                v2.choose(Purpose::Read, Some(format!("s-{k}").as_bytes()), [7, 9]),
                *home
            );
        }
        assert!(!homes.contains(&Some(2)), "the standby holds no sessions");
        // Lag does not move sessions either; going down does.
        for node in t.nodes.iter() {
            node.state.record_probe(
                HEALTH,
                Ok(NodeFigures {
                    replica_delay_s: 1_000,
                    ..Default::default()
                }),
            );
        }
        let lagging = build(&t);
        for (k, home) in homes.iter().enumerate() {
            assert_eq!(
                lagging.choose(Purpose::Read, Some(format!("s-{k}").as_bytes()), [1, 1]),
                *home
            );
        }
        let home0 = homes[0].unwrap();
        t.nodes[home0]
            .state
            .record_probe(HEALTH, Err("gone".into()));
        let down = build(&t);
        assert_ne!(
            down.choose(Purpose::Read, Some(b"s-0"), [1, 1]),
            Some(home0)
        );
    }
}
