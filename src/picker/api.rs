//! The pick API on the admin listener, as JSON:
//!
//! - `GET /v1/pick?cluster=NAME&purpose=read|write[&shard=N]`: one node for a batch or a
//!   query, with how long the answer may be cached. `shard` pins the shard (a retried
//!   batch must go back to its shard). No node: 503 with the shard and every node's reason.
//! - `GET /v1/topology`: every cluster, shard group, shard and node with its health, weights
//!   and the probe figures behind them; for a cluster published to its nodes as
//!   `remote_servers`, whether each replica is in the published cluster (configured vs
//!   published) and, under `remote_servers`, who keeps it and what was taken out.

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use super::health::State;
use super::purpose::Purpose;
use super::removal::Publication;
use super::topology::Source;
use super::view::{NoNode, View};
use super::{Cluster, Clusters};
use crate::config::remote_servers::replica_key;

fn error(status: StatusCode, message: String) -> (StatusCode, Value) {
    (status, json!({ "error": message }))
}

/// Answers `/v1/pick`.
pub fn pick(clusters: &Clusters, query: Option<&str>) -> (StatusCode, Value) {
    let mut cluster_name = None;
    let mut purpose = None;
    let mut shard = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "cluster" => cluster_name = Some(v.into_owned()),
            "purpose" => {
                purpose = Some(match v.as_ref() {
                    "read" => Purpose::Read,
                    "write" => Purpose::Write,
                    other => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("purpose must be read or write, not {other:?}"),
                        )
                    }
                })
            }
            "shard" => match v.parse::<u32>() {
                Ok(n) if n > 0 => shard = Some(n),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("shard must be a shard number (1, 2, ...), not {v:?}"),
                    )
                }
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}; use cluster, purpose, shard"),
                )
            }
        }
    }
    let Some(purpose) = purpose else {
        return error(
            StatusCode::BAD_REQUEST,
            "purpose is required: read or write".into(),
        );
    };
    let cluster = match cluster_name {
        Some(name) => match clusters.get(&name) {
            Some(c) => c,
            None => {
                let mut known: Vec<&str> = clusters.iter().map(|(k, _)| k.as_str()).collect();
                known.sort_unstable();
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown cluster {name:?} (known: {})", known.join(", ")),
                );
            }
        },
        None if clusters.len() == 1 => clusters.values().next().expect("one cluster"),
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "cluster is required when several are configured".into(),
            )
        }
    };
    let view = cluster.view();
    if let Some(n) = shard {
        if view.topology.shard_index(n).is_none() {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "cluster {} has no shard {n} (shards 1 to {})",
                    cluster.name,
                    view.topology.shards.len()
                ),
            );
        }
    }
    match view.pick(purpose, shard, [rand::random(), rand::random()]) {
        Ok(i) => {
            let t = &view.topology;
            let backend = &t.nodes[i];
            backend.picked(purpose);
            let node = &backend.node;
            let replica = &t.replicas[i];
            let s = &t.shards[replica.shard];
            (
                StatusCode::OK,
                json!({
                    "cluster": cluster.name,
                    "purpose": purpose.as_str(),
                    "shard": s.number,
                    "shard_group": s.group.map(|g| t.groups[g].name.clone()),
                    "replica": replica.replica_num,
                    "host": node.host,
                    "http_port": node.port,
                    "native_port": node.native_port,
                    "weight": view.standings[i].get(purpose).as_ref().copied().unwrap_or(0),
                    "cache_for_ms": view.cache_for.as_millis() as u64,
                }),
            )
        }
        Err(no) => (
            StatusCode::SERVICE_UNAVAILABLE,
            no_node_json(&cluster.name, &view, &no),
        ),
    }
}

fn no_node_json(cluster: &str, view: &View, no: &NoNode) -> Value {
    let t = &view.topology;
    let scope = match no.shard {
        Some(n) => format!("shard {n} of cluster {cluster}"),
        None => format!("cluster {cluster}"),
    };
    let details: Vec<String> = no
        .reasons
        .iter()
        .map(|(i, e)| {
            format!(
                "{} (shard {}): {e}",
                t.nodes[*i].label(),
                t.shards[t.replicas[*i].shard].number
            )
        })
        .collect();
    json!({
        "error": format!("no node of {scope} can take {}s", no.purpose.as_str()),
        "cluster": cluster,
        "purpose": no.purpose.as_str(),
        "shard": no.shard,
        "reason": details.join("; "),
        "nodes": no.reasons.iter().map(|(i, e)| json!({
            "host": t.nodes[*i].node.host,
            "http_port": t.nodes[*i].node.port,
            "shard": t.shards[t.replicas[*i].shard].number,
            "reason": e.to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn standing_json(r: &Result<u32, super::score::Exclusion>, published: u32) -> Value {
    match r {
        Ok(w) => json!({ "weight": w, "published_weight": published }),
        Err(e) => json!({ "weight": 0, "excluded": e.to_string() }),
    }
}

/// Answers `/v1/topology`.
pub fn topology(clusters: &Clusters, publication: Option<&Publication>) -> Value {
    let mut sorted: Vec<(&String, &std::sync::Arc<Cluster>)> = clusters.iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let clusters: Vec<Value> = sorted
        .into_iter()
        .map(|(_, c)| cluster_json(c, publication))
        .collect();
    match publication {
        Some(p) => json!({ "clusters": clusters, "remote_servers": p }),
        None => json!({ "clusters": clusters }),
    }
}

/// Whether a replica is in its cluster's published `remote_servers` (`None`: the cluster
/// is not published).
fn published(publication: Option<&Publication>, cluster: &str, key: &str) -> Option<bool> {
    let p = publication?;
    if !p.clusters.iter().any(|c| c == cluster) {
        return None;
    }
    Some(!p.removed.get(cluster).is_some_and(|r| r.contains_key(key)))
}

fn cluster_json(cluster: &Cluster, publication: Option<&Publication>) -> Value {
    let view = cluster.view();
    let t = &view.topology;
    let groups: Vec<Value> = t
        .groups
        .iter()
        .map(|g| {
            let s = g.snapshot();
            json!({
                "name": g.name,
                "zookeeper": g.zookeeper,
                "healthy": g.healthy(),
                "last_probe_ms_ago": s.last_probe.map(|at| at.elapsed().as_millis() as u64),
                "members": s.members.iter().map(|m| match &m.result {
                    Ok(f) => json!({
                        "address": m.address,
                        "ok": true,
                        "server_state": f.server_state,
                        "round_trip_ms": ms(f.round_trip),
                        "avg_latency_ms": f.avg_latency_ms,
                        "outstanding_requests": f.outstanding_requests,
                    }),
                    Err(e) => json!({ "address": m.address, "ok": false, "error": e }),
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let shards: Vec<Value> = t
        .shards
        .iter()
        .map(|s| {
            let replicas: Vec<Value> = s
                .nodes
                .iter()
                .map(|&i| {
                    let backend = &t.nodes[i];
                    let node = &backend.node;
                    let r = &t.replicas[i];
                    let p = backend.state.snapshot();
                    let st = &view.standings[i];
                    let key = replica_key(&node.host, node.native_port);
                    json!({
                        "published": published(publication, &cluster.name, &key),
                        "replica": r.replica_num,
                        "host": node.host,
                        "http_port": node.port,
                        "native_port": node.native_port,
                        "configured_weight": r.weight,
                        "priority": r.priority,
                        "health": if st.state == State::Up { "up" } else { "down" },
                        "slow_start_remaining_ms": p.health.ramp_remaining().map(|d| d.as_millis() as u64),
                        "ramp": (st.ramp * 1000.0).round() / 1000.0,
                        "read": standing_json(st.get(Purpose::Read), view.published_weight(i, Purpose::Read)),
                        "write": standing_json(st.get(Purpose::Write), view.published_weight(i, Purpose::Write)),
                        "in_flight": node.load(),
                        "passive": {
                            "error_rate": (p.error_rate * 1e4).round() / 1e4,
                            "latency_ms": p.latency.map(ms),
                        },
                        "probe": {
                            "probes": p.probes,
                            "last_probe_ms_ago": p.last_probe.map(|at| at.elapsed().as_millis() as u64),
                            "last_error": p.last_error,
                            "figures": p.figures.as_ref().map(|f| json!({
                                "round_trip_ms": ms(f.round_trip),
                                "running_queries": f.running_queries,
                                "merges": f.merges,
                                "background_pool_tasks": f.background_pool_tasks,
                                "readonly_replicas": f.readonly_replicas,
                                "session_expired": f.session_expired,
                                "replica_delay_s": f.replica_delay_s,
                                "replica_queue": f.replica_queue,
                                "max_parts_in_partition": f.max_parts_in_partition,
                                "free_disk_bytes": f.free_disk_bytes,
                            })),
                        },
                    })
                })
                .collect();
            json!({
                "shard": s.number,
                "group": s.group.map(|g| t.groups[g].name.clone()),
                "weight": s.weight,
                "replicas": replicas,
            })
        })
        .collect();
    let source = match &t.source {
        Source::Config => json!({ "from": "config" }),
        Source::SystemClusters { seed, at } => json!({
            "from": "system.clusters",
            "seed": seed,
            "age_s": at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        }),
    };
    json!({
        "name": cluster.name,
        "source": source,
        "cache_for_ms": view.cache_for.as_millis() as u64,
        "shard_groups": groups,
        "shards": shards,
    })
}
