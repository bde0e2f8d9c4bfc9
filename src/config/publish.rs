//! `chgate config push | diff | pull | rollback`: publishing the dynamic config to the
//! ZooKeeper root a bootstrap file names, after validating it whole with that bootstrap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::remote_servers::{self, Publisher, Put};
use super::validate::{validate, Problem};
use super::zookeeper::{self, Nodes, Snapshot, Store};
use super::{ClusterConfig, Config, ConfigSourceConfig};

type Clusters = std::collections::BTreeMap<String, ClusterConfig>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A bootstrap file with its `[config_source]`.
struct Bootstrap {
    config: Config,
    base: PathBuf,
    source: ConfigSourceConfig,
}

fn bootstrap(path: &Path) -> Result<Bootstrap, Vec<String>> {
    let (config, base) = super::read::<Config>(path).map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect::<Vec<_>>()
    })?;
    let Some(source) = config.config_source.clone() else {
        return Err(vec![format!(
            "{}: no [config_source]: this is not a bootstrap file (a plain config file is used as it is, with `chgate config check`)",
            path.display()
        )]);
    };
    Ok(Bootstrap {
        config,
        base,
        source,
    })
}

async fn connect(b: &Bootstrap) -> Result<Store, Vec<String>> {
    Store::connect(&b.source, &b.base, CONNECT_TIMEOUT)
        .await
        .map_err(|e| vec![e])
}

/// The file to push, split into znodes and validated whole with the bootstrap; its
/// clusters.
fn prepare(b: &Bootstrap, file: &Path) -> Result<(Nodes, String, Clusters), Vec<String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![format!("{}: cannot read the file: {e}", file.display())])?;
    let located = |problems: Vec<Problem>| -> Vec<String> {
        problems
            .iter()
            .map(|p| format!("{}: {p}", file.display()))
            .collect()
    };
    let nodes = zookeeper::split(&text).map_err(located)?;
    let dynamic = zookeeper::parse_nodes(&nodes, "").map_err(|problems| {
        // Keyed by znode; say it in the file's terms.
        problems
            .into_iter()
            .map(|p| {
                let key = p.key.trim_start_matches("/config/").replace('/', ".");
                format!("{}: {key}: {}", file.display(), p.message)
            })
            .collect::<Vec<_>>()
    })?;
    let clusters = dynamic.clusters.clone();
    validate(dynamic.merge_into(b.config.clone()), &b.base).map_err(located)?;
    let whole = zookeeper::assemble(&nodes, "").map_err(located)?;
    Ok((nodes, whole, clusters))
}

/// Validates `file` with the bootstrap and publishes it as the next version.
pub async fn push(bootstrap_path: &Path, file: &Path) -> Result<String, Vec<String>> {
    let b = bootstrap(bootstrap_path)?;
    let (nodes, whole, clusters) = prepare(&b, file)?;
    let store = connect(&b).await?;
    let read = store.read(false).await.map_err(|e| vec![e])?;
    let (done, version) = publish(&store, &b, &read, &nodes, &whole).await?;
    publish_remote_servers(&b, &clusters, version, done).await
}

/// Publishes the nodes' `remote_servers` for the pushed clusters (minus the replicas the
/// elected proxy has taken out) to every ensemble it belongs in, after the config itself
/// landed. A failure is an error (exit 1) that says the config did land: pushing the same
/// file again publishes what is missing, and the elected proxy, if one runs, retries by
/// itself.
async fn publish_remote_servers(
    b: &Bootstrap,
    clusters: &Clusters,
    version: u64,
    done: String,
) -> Result<String, Vec<String>> {
    let mut publisher = Publisher::new(&b.source, &b.base, CONNECT_TIMEOUT);
    let removed = match publisher.removed().await {
        Ok(r) => r,
        Err(e) => return Err(vec![done, format!("remote_servers not published: {e}")]),
    };
    let outcomes = publisher.publish(clusters, &removed, version).await;
    let mut lines = vec![done];
    let mut failed = false;
    for o in outcomes {
        match o.result {
            Ok(Put::Written) => {
                lines.push(format!("remote_servers: published to {}", o.ensemble))
            }
            Ok(Put::Unchanged) => {
                lines.push(format!("remote_servers: unchanged in {}", o.ensemble))
            }
            Ok(Put::Newer(v)) => lines.push(format!(
                "remote_servers: left in {}: it holds version {v}, newer than {version} (another push landed since)",
                o.ensemble
            )),
            Err(e) => {
                failed = true;
                lines.push(format!(
                    "remote_servers: NOT published to {}: {e} (the config itself landed; push again, or the elected proxy retries)",
                    o.ensemble
                ));
            }
        }
    }
    if failed {
        Err(lines)
    } else {
        Ok(lines.join("\n"))
    }
}

async fn publish(
    store: &Store,
    b: &Bootstrap,
    read: &Snapshot,
    nodes: &Nodes,
    whole: &str,
) -> Result<(String, u64), Vec<String>> {
    if read.nodes == *nodes {
        return Ok((
            format!("{}: unchanged (version {})", store.root(), read.version),
            read.version,
        ));
    }
    let changes = zookeeper::diff(&read.nodes, nodes)
        .iter()
        .filter(|l| !l.starts_with(' '))
        .count();
    let version = store
        .push(read, nodes, whole, b.source.keep_versions)
        .await
        .map_err(|e| vec![e.to_string()])?;
    Ok((
        format!(
            "{}: pushed version {version} ({changes} znode{} changed)",
            store.root(),
            if changes == 1 { "" } else { "s" }
        ),
        version,
    ))
}

/// What pushing `file` would change, one line per znode.
pub async fn diff(bootstrap_path: &Path, file: &Path) -> Result<Vec<String>, Vec<String>> {
    let b = bootstrap(bootstrap_path)?;
    let (nodes, _, clusters) = prepare(&b, file)?;
    let store = connect(&b).await?;
    let read = store.read(false).await.map_err(|e| vec![e])?;
    let mut lines = zookeeper::diff(&read.nodes, &nodes);
    // The nodes' cluster definition, as the root's ensemble holds it now.
    let mut publisher = Publisher::new(&b.source, &b.base, CONNECT_TIMEOUT);
    let removed = publisher.removed().await.map_err(|e| vec![e])?;
    let now = publisher.element().await.map_err(|e| vec![e])?;
    // Compared without its label: the history does not matter here.
    let next = remote_servers::render(
        &clusters,
        &removed,
        remote_servers::Labelled {
            version: read.version + 1,
            history: 0,
        },
    );
    if !remote_servers::same_content(now.as_deref().unwrap_or(""), &next) {
        lines.push(format!(
            "~ {} (the nodes' remote_servers{})",
            remote_servers::ELEMENT,
            if now.is_none() { ", new" } else { "" }
        ));
    }
    Ok(lines)
}

/// The active config as a file that `push` accepts.
pub async fn pull(bootstrap_path: &Path) -> Result<String, Vec<String>> {
    let b = bootstrap(bootstrap_path)?;
    let store = connect(&b).await?;
    let read = store.read(false).await.map_err(|e| vec![e])?;
    let text = zookeeper::assemble(&read.nodes, store.root())
        .map_err(|problems| problems.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    Ok(format!(
        "# chgate config pulled from {} at version {}\n{text}",
        store.root(),
        read.version
    ))
}

/// The kept versions, oldest first, and the active one.
pub async fn versions(bootstrap_path: &Path) -> Result<(Vec<u64>, u64), Vec<String>> {
    let b = bootstrap(bootstrap_path)?;
    let store = connect(&b).await?;
    let read = store.read(false).await.map_err(|e| vec![e])?;
    Ok((store.history().await.map_err(|e| vec![e])?, read.version))
}

/// Publishes kept version `version` again, as the next version (validated again first:
/// the bootstrap or a secret may have changed since).
pub async fn rollback(bootstrap_path: &Path, version: u64) -> Result<String, Vec<String>> {
    let b = bootstrap(bootstrap_path)?;
    let store = connect(&b).await?;
    let text = store.version_text(version).await.map_err(|e| vec![e])?;
    let nodes = zookeeper::split(&text).map_err(|p| {
        p.iter()
            .map(|p| format!("version {version}: {p}"))
            .collect::<Vec<_>>()
    })?;
    let dynamic = zookeeper::parse_nodes(&nodes, store.root())
        .map_err(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let clusters = dynamic.clusters.clone();
    validate(dynamic.merge_into(b.config.clone()), &b.base).map_err(|p| {
        p.iter()
            .map(|p| format!("version {version}: {p}"))
            .collect::<Vec<_>>()
    })?;
    let read = store.read(false).await.map_err(|e| vec![e])?;
    let (done, pushed) = publish(&store, &b, &read, &nodes, &text).await?;
    publish_remote_servers(
        &b,
        &clusters,
        pushed,
        format!("{done}, restoring version {version}"),
    )
    .await
}
