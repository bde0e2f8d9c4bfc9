//! Batch intents in ZooKeeper: what makes a crash exactly-once.
//!
//! Per (group, topic, partition) one znode holds the partition's current segment:
//! `{first, last, clock, shard, done}`. A writer records it (`done = false`) before the
//! first insert of a segment and marks it done after the last; Kafka's committed offset
//! follows. After a crash or a rebalance, whoever consumes the partition reads the intent
//! first:
//!
//! - messages below `first` belong to earlier segments, which were all done: skipped;
//! - `done`: messages up to `last` are in ClickHouse: skipped;
//! - not done: the segment `[first, last]` is rebuilt exactly (same messages, same
//!   `clock` for the time window, same shard) and inserted again, so ClickHouse's
//!   replicated-block deduplication drops whatever part of it had already landed.
//!
//! Kafka's commit is then only an optimisation (where to start reading); ZooKeeper is the
//! source of truth. (The test broker does not keep commit metadata, so the intent cannot
//! live there.)
//!
//! Fencing: whoever takes a partition over *claims* its znode (a write that bumps its
//! version) before reading further, and every later write names the version it last saw.
//! A writer that still believes it owns the partition (a consumer whose group session ran
//! out, or a writer of this process still finishing after a revocation) fails its next
//! write and stops before inserting anything more; what it had recorded before the claim
//! is what the new owner reads and rebuilds.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zookeeper_client as zk;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub first: i64,
    pub last: i64,
    /// Unix seconds the segment's time window was measured from.
    pub clock: i64,
    /// The shard of a random-sharded segment.
    pub shard: Option<u32>,
    pub done: bool,
}

/// What to do with a message of a partition, given its intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Already in ClickHouse.
    Skip,
    /// Part of the unfinished segment: rebuild it exactly.
    Replay,
    /// New.
    Fresh,
}

impl Intent {
    pub fn disposition(&self, offset: i64) -> Disposition {
        if offset < self.first || (self.done && offset <= self.last) {
            Disposition::Skip
        } else if offset <= self.last {
            Disposition::Replay
        } else {
            Disposition::Fresh
        }
    }
}

/// Why an intent could not be recorded.
#[derive(Debug)]
pub enum RecordError {
    /// Another writer claimed the partition since this one did.
    Fenced,
    /// The topic's alter fence moved since the writer read it (a task adding columns):
    /// read it again, and wait while it says `altering`.
    FenceMoved,
    /// ZooKeeper did not answer or refused: worth retrying.
    Other(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fenced => f.write_str("another consumer has claimed the partition"),
            Self::FenceMoved => f.write_str("the topic's alter fence moved"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

/// The intents of one ZooKeeper root. The session is replaced when it expires (the
/// sidecar stopped, or the ensemble away, past the session timeout): intents are persistent
/// znodes fenced by their versions, which outlive any session.
pub struct Intents {
    client: arc_swap::ArcSwap<zk::Client>,
    servers: String,
    renewing: tokio::sync::Mutex<()>,
    root: String,
}

const SESSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn session(servers: &str) -> Result<zk::Client, String> {
    zk::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .connect(servers)
        .await
        .map_err(|e| format!("cannot connect to ZooKeeper {servers}: {e}"))
}

impl Intents {
    pub async fn connect(servers: &[String], root: &str) -> Result<Self, String> {
        let servers = servers.join(",");
        let client = session(&servers).await?;
        let root = root.trim_end_matches('/').to_string();
        client
            .mkdir(
                &root,
                &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
            )
            .await
            .map_err(|e| format!("cannot create {root} in ZooKeeper: {e}"))?;
        Ok(Self {
            client: arc_swap::ArcSwap::from_pointee(client),
            servers,
            renewing: tokio::sync::Mutex::new(()),
            root,
        })
    }

    /// [`Self::client`], its error as text.
    async fn zk(&self) -> Result<Arc<zk::Client>, String> {
        self.client()
            .await
            .map_err(|e| format!("ZooKeeper {}: {e}", self.servers))
    }

    /// The client, with a new session if the last one has ended (an error to the caller,
    /// who retries, if ZooKeeper cannot be reached yet).
    async fn client(&self) -> Result<Arc<zk::Client>, zk::Error> {
        let client = self.client.load_full();
        if !client.state().is_terminated() {
            return Ok(client);
        }
        let _one_at_a_time = self.renewing.lock().await;
        let client = self.client.load_full();
        if !client.state().is_terminated() {
            return Ok(client);
        }
        match session(&self.servers).await {
            Ok(fresh) => {
                tracing::info!(servers = %self.servers, "ZooKeeper session for the batch intents renewed (the last one ended)");
                let fresh = Arc::new(fresh);
                self.client.store(fresh.clone());
                Ok(fresh)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot renew the batch intents' ZooKeeper session");
                Err(zk::Error::SessionExpired)
            }
        }
    }

    fn path(&self, group: &str, topic: &str, partition: i32) -> String {
        format!("{}/{group}/{topic}/{partition}", self.root)
    }

    pub async fn load(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<Intent>, String> {
        let path = self.path(group, topic, partition);
        match self.zk().await?.get_data(&path).await {
            Ok((data, _)) => Self::decode(&path, &data),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }

    /// A claimed znode without a segment yet is empty.
    fn decode(path: &str, data: &[u8]) -> Result<Option<Intent>, String> {
        if data.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(data)
            .map(Some)
            .map_err(|e| format!("{path} holds something that is not an intent: {e}"))
    }

    /// Takes a partition over: reads its intent and bumps the znode's version (creating it
    /// empty if there is none), so that writes by whoever held it before fail. Returns the
    /// intent and the version to name in [`Self::record`].
    pub async fn claim(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(Option<Intent>, i32), String> {
        let path = self.path(group, topic, partition);
        loop {
            let client = self.zk().await?;
            match client.get_data(&path).await {
                Ok((data, stat)) => {
                    let intent = Self::decode(&path, &data)?;
                    match client.set_data(&path, &data, Some(stat.version)).await {
                        Ok(stat) => return Ok((intent, stat.version)),
                        // Written or dropped meanwhile: read it again.
                        Err(zk::Error::BadVersion | zk::Error::NoNode) => continue,
                        Err(e) => return Err(format!("claiming {path}: {e}")),
                    }
                }
                Err(zk::Error::NoNode) => {
                    self.mkdir_parent(&path).await?;
                    match client.create(&path, &[], &Self::options()).await {
                        Ok((stat, _)) => return Ok((None, stat.version)),
                        Err(zk::Error::NodeExists) => continue,
                        Err(e) => return Err(format!("creating {path}: {e}")),
                    }
                }
                Err(e) => return Err(format!("reading {path}: {e}")),
            }
        }
    }

    fn options() -> zk::CreateOptions<'static> {
        zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
    }

    async fn mkdir_parent(&self, path: &str) -> Result<(), String> {
        let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or(&self.root);
        self.zk()
            .await?
            .mkdir(parent, &Self::options())
            .await
            .map_err(|e| format!("creating {parent}: {e}"))
    }

    /// [`Self::claim`] from a plain thread, retrying every second while ZooKeeper cannot
    /// answer. `None` only if `stop` is cancelled before an answer.
    pub fn claim_waiting(
        &self,
        handle: &tokio::runtime::Handle,
        group: &str,
        topic: &str,
        partition: i32,
        stop: Option<&tokio_util::sync::CancellationToken>,
    ) -> Option<(Option<Intent>, i32)> {
        Self::waiting(
            handle,
            stop,
            topic,
            partition,
            "claim the partition's batch intent",
            || self.claim(group, topic, partition),
        )
    }

    /// [`Self::load`] from a plain thread, retrying every second while ZooKeeper cannot
    /// answer. `None` only if `stop` is cancelled before an answer.
    pub fn load_waiting(
        &self,
        handle: &tokio::runtime::Handle,
        group: &str,
        topic: &str,
        partition: i32,
        stop: Option<&tokio_util::sync::CancellationToken>,
    ) -> Option<Option<Intent>> {
        Self::waiting(
            handle,
            stop,
            topic,
            partition,
            "read the batch intent",
            || self.load(group, topic, partition),
        )
    }

    /// [`Self::forget`] from a plain thread, retrying every second while ZooKeeper cannot
    /// answer (a stale intent kept would make the worker skip every new message below it).
    pub fn forget_waiting(
        &self,
        handle: &tokio::runtime::Handle,
        group: &str,
        topic: &str,
        partition: i32,
    ) {
        Self::waiting(
            handle,
            None,
            topic,
            partition,
            "drop the stale batch intent",
            || self.forget(group, topic, partition),
        );
    }

    /// Runs `op` until it succeeds, pausing a second after each failure; `None` only if
    /// `stop` is cancelled first.
    fn waiting<T, F: std::future::Future<Output = Result<T, String>>>(
        handle: &tokio::runtime::Handle,
        stop: Option<&tokio_util::sync::CancellationToken>,
        topic: &str,
        partition: i32,
        what: &str,
        op: impl Fn() -> F,
    ) -> Option<T> {
        loop {
            match handle.block_on(op()) {
                Ok(v) => return Some(v),
                Err(e) => {
                    if stop.is_some_and(|s| s.is_cancelled()) {
                        return None;
                    }
                    tracing::warn!(topic, partition, error = %e, "Cannot {what}; retrying in 1 s");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Drops a partition's intent (its topic was recreated: the recorded offsets name
    /// messages that no longer exist).
    pub async fn forget(&self, group: &str, topic: &str, partition: i32) -> Result<(), String> {
        self.delete(&self.path(group, topic, partition)).await
    }

    /// Deletes `path`; one already gone is fine.
    async fn delete(&self, path: &str) -> Result<(), String> {
        match self.zk().await?.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(format!("deleting {path}: {e}")),
        }
    }

    /// Writes a partition's intent if the znode is still at `version` (the one its claim
    /// or this writer's last record left); returns the new version.
    pub async fn record(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        intent: &Intent,
        version: i32,
    ) -> Result<i32, RecordError> {
        let path = self.path(group, topic, partition);
        let data = serde_json::to_vec(intent).map_err(|e| RecordError::Other(e.to_string()))?;
        let client = self.zk().await.map_err(RecordError::Other)?;
        match client.set_data(&path, &data, Some(version)).await {
            Ok(stat) => Ok(stat.version),
            // Claimed by another writer, or dropped by one that found the topic recreated.
            Err(zk::Error::BadVersion | zk::Error::NoNode) => Err(RecordError::Fenced),
            Err(e) => Err(RecordError::Other(format!("writing {path}: {e}"))),
        }
    }

    fn fence_path(&self, group: &str, topic: &str) -> String {
        format!("{}/{group}/{topic}/fence", self.root)
    }

    fn lock_path(&self, group: &str, topic: &str) -> String {
        format!("{}/{group}/{topic}/alter-lock", self.root)
    }

    /// The topic's alter fence (`DESIGN.md`, "New columns"): whether a writer is adding
    /// columns to the table, and the znode's version, which every pending record of a task
    /// that may add columns checks. Created (not altering) if missing.
    pub async fn fence(&self, group: &str, topic: &str) -> Result<(bool, i32), String> {
        let path = self.fence_path(group, topic);
        loop {
            let client = self.zk().await?;
            match client.get_data(&path).await {
                Ok((data, stat)) => return Ok((data.as_slice() == b"altering", stat.version)),
                Err(zk::Error::NoNode) => {
                    self.mkdir_parent(&path).await?;
                    match client.create(&path, b"stable", &Self::options()).await {
                        Ok(_) | Err(zk::Error::NodeExists) => continue,
                        Err(e) => return Err(format!("creating {path}: {e}")),
                    }
                }
                Err(e) => return Err(format!("reading {path}: {e}")),
            }
        }
    }

    /// [`Self::record`] in one multi with a check that the fence is still at
    /// `fence_version`.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_fenced(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        intent: &Intent,
        version: i32,
        fence_version: i32,
    ) -> Result<i32, RecordError> {
        let path = self.path(group, topic, partition);
        let fence = self.fence_path(group, topic);
        let data = serde_json::to_vec(intent).map_err(|e| RecordError::Other(e.to_string()))?;
        let client = self.zk().await.map_err(RecordError::Other)?;
        let mut multi = client.new_multi_writer();
        multi
            .add_check_version(&fence, fence_version)
            .and_then(|()| multi.add_set_data(&path, &data, Some(version)))
            .map_err(|e| RecordError::Other(e.to_string()))?;
        match multi.commit().await {
            Ok(results) => match results.into_iter().nth(1) {
                Some(zk::MultiWriteResult::SetData { stat }) => Ok(stat.version),
                other => Err(RecordError::Other(format!(
                    "writing {path}: unexpected answer {other:?}"
                ))),
            },
            Err(zk::MultiWriteError::OperationFailed { index: 0, .. }) => {
                Err(RecordError::FenceMoved)
            }
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::BadVersion | zk::Error::NoNode,
                ..
            }) => Err(RecordError::Fenced),
            Err(e) => Err(RecordError::Other(format!("writing {path}: {e}"))),
        }
    }

    /// Takes the topic's alter lock (an ephemeral znode): false if another writer holds it.
    pub async fn lock_alter(&self, group: &str, topic: &str) -> Result<bool, String> {
        let path = self.lock_path(group, topic);
        let client = self.zk().await?;
        self.mkdir_parent(&path).await?;
        let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        match client.create(&path, &[], &ephemeral).await {
            Ok(_) => Ok(true),
            Err(zk::Error::NodeExists) => Ok(false),
            Err(e) => Err(format!("creating {path}: {e}")),
        }
    }

    /// Whether some writer holds the topic's alter lock.
    pub async fn alter_locked(&self, group: &str, topic: &str) -> Result<bool, String> {
        let path = self.lock_path(group, topic);
        match self.zk().await?.check_stat(&path).await {
            Ok(stat) => Ok(stat.is_some()),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }

    pub async fn unlock_alter(&self, group: &str, topic: &str) -> Result<(), String> {
        self.delete(&self.lock_path(group, topic)).await
    }

    /// Sets the fence (`altering` or not), moving its version; with `expected`, only if it
    /// is still at that version (false if not).
    pub async fn set_fence(
        &self,
        group: &str,
        topic: &str,
        altering: bool,
        expected: Option<i32>,
    ) -> Result<bool, String> {
        // Made first if missing: an alter may come before any pending record read it.
        self.fence(group, topic).await?;
        let path = self.fence_path(group, topic);
        let data: &[u8] = if altering { b"altering" } else { b"stable" };
        match self.zk().await?.set_data(&path, data, expected).await {
            Ok(_) => Ok(true),
            Err(zk::Error::BadVersion) => Ok(false),
            Err(e) => Err(format!("writing {path}: {e}")),
        }
    }

    /// The topic's partitions whose intent is pending (recorded, not done).
    pub async fn pending(&self, group: &str, topic: &str) -> Result<Vec<i32>, String> {
        let dir = format!("{}/{group}/{topic}", self.root);
        let client = self.zk().await?;
        let children = match client.list_children(&dir).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => return Err(format!("listing {dir}: {e}")),
        };
        let mut pending = Vec::new();
        for partition in children.iter().filter_map(|c| c.parse::<i32>().ok()) {
            if let Some(i) = self.load(group, topic, partition).await? {
                if !i.done {
                    pending.push(partition);
                }
            }
        }
        pending.sort_unstable();
        Ok(pending)
    }

    /// After a write whose outcome is unknown (ZooKeeper stopped answering mid-request) and
    /// a retry refused for its version: whether that first write landed. It did if the
    /// znode is exactly one version past `version` and holds `intent`. A claim by another
    /// consumer writes back the data it read, which is never the intent being recorded
    /// (every record changes the segment or its `done`), and a claim after the write landed
    /// leaves the version further on: either way the writer is fenced. Returns the version
    /// to go on from.
    pub async fn landed(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        intent: &Intent,
        version: i32,
    ) -> Result<Option<i32>, String> {
        let path = self.path(group, topic, partition);
        match self.zk().await?.get_data(&path).await {
            Ok((data, stat)) => {
                let ours = serde_json::to_vec(intent).map_err(|e| e.to_string())?;
                Ok((stat.version == version + 1 && data == ours).then_some(stat.version))
            }
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        let pending = Intent {
            first: 10,
            last: 19,
            clock: 0,
            shard: Some(2),
            done: false,
        };
        assert_eq!(pending.disposition(9), Disposition::Skip);
        assert_eq!(pending.disposition(10), Disposition::Replay);
        assert_eq!(pending.disposition(19), Disposition::Replay);
        assert_eq!(pending.disposition(20), Disposition::Fresh);
        let done = Intent {
            done: true,
            ..pending
        };
        assert_eq!(done.disposition(15), Disposition::Skip);
        assert_eq!(done.disposition(20), Disposition::Fresh);
    }
}
