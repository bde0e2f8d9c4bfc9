//! Active/standby: with `[coordination]`, instances of one capture (same slot) elect a
//! leader through an ephemeral znode, `<root>/<slot>/leader`. The others wait on it; when
//! the leader dies its session expires (`session_timeout`), the znode goes, and a standby
//! takes over: opens its key-state store (rebuilt from the topics if they went on without
//! it, see `rebuild.rs`), sends what the outbox holds, and streams from the slot's
//! confirmed position, so nothing is lost.
//!
//! The instances share one `state_dir` (a volume that moves with the leader, or a shared
//! file system; redb's file lock keeps a second writer out), or each has its own, and then
//! a standby rebuilds its store when it takes over, or keeps it current while it waits
//! (`coordination.follow`, `follow.rs`). A leader that loses its session (or stays
//! disconnected for a session timeout) stops at once without sending more; PostgreSQL
//! streams a slot to one connection at a time, which fences a leader that has not noticed
//! yet.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use super::config::CoordinationConfig;
use crate::metrics::METRICS;

/// Held while this instance leads; `lost` is cancelled when it no longer does.
pub struct Leadership {
    _client: zk::Client,
    pub lost: CancellationToken,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// Waits until this instance leads the capture of `slot`; `None` if `stop` comes first.
/// `standing_by` is cancelled once another instance is found leading.
pub async fn acquire(
    cfg: &CoordinationConfig,
    slot: &str,
    stop: &CancellationToken,
    standing_by: &CancellationToken,
) -> anyhow::Result<Option<Leadership>> {
    let servers = cfg.zookeeper.join(",");
    let client = tokio::time::timeout(
        cfg.session_timeout * 2,
        zk::Client::connector()
            .with_session_timeout(cfg.session_timeout)
            .connect(&servers),
    )
    .await
    .map_err(|_| anyhow::anyhow!("cannot reach ZooKeeper {servers}"))?
    .map_err(|e| anyhow::anyhow!("cannot connect to ZooKeeper {servers}: {e}"))?;
    let dir = format!("{}/{slot}", cfg.root.trim_end_matches('/'));
    client
        .mkdir(
            &dir,
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .or_else(|e| match e {
            zk::Error::NodeExists => Ok(()),
            e => Err(anyhow::anyhow!("creating {dir}: {e}")),
        })?;
    let path = format!("{dir}/leader");
    let me = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let mut announced = false;
    loop {
        match client.create(&path, me.as_bytes(), &ephemeral).await {
            Ok(_) => break,
            Err(zk::Error::NodeExists) => {}
            Err(e) => anyhow::bail!("creating {path}: {e}"),
        }
        let (stat, watcher) = client
            .check_and_watch_stat(&path)
            .await
            .map_err(|e| anyhow::anyhow!("watching {path}: {e}"))?;
        let Some(stat) = stat else { continue };
        if stat.ephemeral_owner == client.session_id().0 {
            break;
        }
        if !announced {
            let holder = client
                .get_data(&path)
                .await
                .map(|(d, _)| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default();
            tracing::info!(leader = %holder, "Standing by: another instance captures this slot");
            announced = true;
            standing_by.cancel();
        }
        METRICS.cdc_leader.set(0);
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = watcher.changed() => {}
        }
    }
    tracing::info!(znode = %path, "Leading the capture");
    METRICS.cdc_leader.set(1);
    let lost = CancellationToken::new();
    let watch = tokio::spawn(watch_session(
        client.state_watcher(),
        cfg.session_timeout,
        lost.clone(),
    ));
    Ok(Some(Leadership {
        _client: client,
        lost,
        watch,
    }))
}

/// Cancels `lost` when the session ends, or stays disconnected for a session timeout (the
/// server may have expired it, and a standby may lead already).
async fn watch_session(mut states: zk::StateWatcher, timeout: Duration, lost: CancellationToken) {
    loop {
        let state = states.changed().await;
        if state.is_terminated() {
            tracing::error!(?state, "Lost the ZooKeeper session: no longer leading");
            break;
        }
        if state == zk::SessionState::Disconnected {
            match tokio::time::timeout(timeout, async {
                loop {
                    let s = states.changed().await;
                    if s != zk::SessionState::Disconnected {
                        return s;
                    }
                }
            })
            .await
            {
                Ok(s) if !s.is_terminated() => continue,
                _ => {
                    tracing::error!(
                        "Disconnected from ZooKeeper for a session timeout: no longer leading"
                    );
                    break;
                }
            }
        }
    }
    METRICS.cdc_leader.set(0);
    lost.cancel();
}
