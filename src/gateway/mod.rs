//! The gateway core every frontend shares: who the client is, what it may run, where its
//! query goes and what happens when that node fails. Nothing here speaks a client protocol:
//! a frontend (the HTTP interface, the native protocol to come) reads the client's
//! credentials and query its own way, asks the gateway, and renders [`GatewayError`] its
//! own way.
//!
//! - [`users`]: client-facing users of a config generation;
//! - [`authenticate`]: credentials, throttling, allowed networks;
//! - [`sql`] and [`policy`]: what a statement is, and whether the user may run it;
//! - [`admission`] and [`quota`]: every query passes admission, where its user's quota
//!   decides (concurrency with a queue, rate, execution time, result bytes);
//! - [`route`]: node choice and failover, generic over one send attempt;
//! - [`error`]: what the gateway refuses or fails with.
//!
//! Users and clusters live in a [`Generation`] behind an `ArcSwap`: a reload builds a
//! whole new one from a validated config and swaps it in, so a query sees either the old
//! config or the new one, never a mix, and never waits on a lock.

pub mod admission;
pub mod authenticate;
pub mod error;
pub mod policy;
pub mod quota;
pub mod route;
pub mod sql;
pub mod users;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

pub use admission::Admission;
pub use authenticate::Credentials;
pub use error::{ErrorKind, GatewayError};
pub use sql::Statement;
pub use users::User;

use crate::auth::{Throttle, Verifier};
use crate::config::Validated;
use crate::picker::{ClusterConfigs, Clusters};
use quota::Fleet;

/// Users and clusters of one config generation.
pub struct Generation {
    pub users: HashMap<String, Arc<User>>,
    pub clusters: Arc<Clusters>,
}

impl Generation {
    /// Builds from a validated config, taking over from `previous` what is still
    /// configured (see [`Clusters::reconcile`], [`users::build`]).
    pub fn build(v: &Validated, previous: Option<&Generation>, fleet: &Arc<Fleet>) -> Self {
        let configs = ClusterConfigs {
            clusters: &v.config.clusters,
            secrets: &v.secrets,
            upstream: &v.config.upstream,
            picker: &v.config.picker,
        };
        let clusters = match previous {
            Some(p) => p.clusters.reconcile(&configs),
            None => Clusters::default().reconcile(&configs),
        };
        let users = users::build(
            &v.config.users,
            &v.config.quotas,
            &clusters,
            previous.map(|p| &p.users),
            fleet,
        );
        Self {
            users,
            clusters: Arc::new(clusters),
        }
    }
}

/// Query settings of the gateway: `max_replay_body_bytes` fixed for the life of the
/// process (listener-level config), `max_attempts` followed on reload.
#[derive(Debug)]
pub struct Settings {
    /// A read whose body is at most this long is kept, so it can be sent again elsewhere.
    pub max_replay_body_bytes: usize,
    /// Nodes tried for one query (`upstream.max_attempts`, followed on reload).
    max_attempts: AtomicUsize,
}

impl Settings {
    pub fn max_attempts(&self) -> usize {
        self.max_attempts.load(Ordering::Relaxed)
    }
}

pub struct Gateway {
    generation: ArcSwap<Generation>,
    verifier: Verifier,
    throttle: Throttle,
    pub settings: Settings,
    draining: AtomicBool,
    /// The chgate instances sharing this one's config root; quotas are divided among them.
    pub fleet: Arc<Fleet>,
}

impl Gateway {
    pub fn new(v: &Validated) -> Self {
        let c = &v.config;
        let fleet = Arc::new(Fleet::new());
        Self {
            generation: ArcSwap::from_pointee(Generation::build(v, None, &fleet)),
            fleet,
            verifier: Verifier::new(c.auth.max_concurrent_verifications),
            throttle: Throttle::new(&c.auth),
            settings: Settings {
                max_replay_body_bytes: c.proxy.max_replay_body_bytes,
                max_attempts: AtomicUsize::new(c.upstream.max_attempts),
            },
            draining: AtomicBool::new(false),
        }
    }

    /// The current generation. Hold it briefly: it pins one config.
    pub fn generation(&self) -> Guard<Arc<Generation>> {
        self.generation.load()
    }

    /// Swaps in users and clusters from a newly validated config.
    pub fn reload(&self, v: &Validated) {
        let next = Generation::build(v, Some(&self.generation.load()), &self.fleet);
        self.generation.store(Arc::new(next));
        self.settings
            .max_attempts
            .store(v.config.upstream.max_attempts, Ordering::Relaxed);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready to serve: not draining, and every cluster has a node that can take reads.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining() {
            return Err("draining");
        }
        if !self.generation.load().clusters.readable() {
            return Err("not ready: a cluster has no node that can take reads");
        }
        Ok(())
    }
}

/// Keeps `admission` (its concurrency slot) while the write `query_id` runs on on its node
/// after its client went away: ClickHouse does not stop a write for a closed connection,
/// so the slot is given back only when the node no longer lists the query (polled once a
/// second), and a query past the quota's execution limit is killed there, as it would
/// have been with its client. Without this, a client cutting its writes short could run
/// any number of them at once.
pub fn hold_until_done(
    backend: Arc<crate::picker::Backend>,
    query_id: String,
    admission: admission::Admission,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        const POLL: std::time::Duration = std::time::Duration::from_secs(1);
        const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
        let user = admission.user().clone();
        let deadline = admission
            .execution_limit()
            .and_then(|l| admission.admitted_at().checked_add(l));
        let mut failures = 0;
        loop {
            tokio::time::sleep(POLL).await;
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                tracing::info!(node = %backend.label(), user = %user.name, %query_id, "A write whose client went away reached its execution limit: killed");
                kill_query(&backend, &user, &query_id, Abandoned::Ended);
                break;
            }
            match backend
                .node
                .query_running(&user.account, &query_id, TIMEOUT)
                .await
            {
                Ok(true) => failures = 0,
                Ok(false) => break,
                Err(e) => {
                    failures += 1;
                    if failures >= 3 {
                        tracing::info!(node = %backend.label(), %query_id, error = %e, "Cannot tell whether a write whose client went away still runs; its slot is given back");
                        break;
                    }
                }
            }
        }
        drop(admission);
    });
}

/// Where a query the gateway gives up on stands, which decides whether `KILL QUERY` may be
/// risked on a server whose kill holds its process list (see [`kill_freezes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// It lost a hedge's race: its node said nothing while another node answered, so it
    /// may be waiting on a node that does not answer.
    Silent,
    /// Its native node connection is closed: the node notices by itself (it looks at the
    /// client's socket every `interactive_delay` while a query runs).
    Disconnected,
    /// Its request ended: an execution or result limit reached, a deadline passed, a
    /// client that stopped reading or went away. Most such queries are working (a heavy
    /// query a dashboard gave up on), and are killed unless a node is known not to answer.
    Ended,
}

/// Cancels a query on its node, in the background (`KILL QUERY ... ASYNC` as the user's
/// cluster account): a hedge that lost, a read past `first_byte_timeout`, one past its
/// quota's limits, or one whose client went away. ClickHouse 18.16 does not notice a closed
/// HTTP connection until it writes to it, so without this the query would run on.
///
/// Withheld where [`kill_freezes`] says the kill could stall the node: the query then ends
/// when it ends on its own (its client's connection is gone either way).
pub fn kill_query(
    backend: &Arc<crate::picker::Backend>,
    user: &User,
    query_id: &str,
    how: Abandoned,
) {
    let label = backend.label();
    if kill_freezes(backend, &user.cluster, how) {
        tracing::info!(node = %label, %query_id, abandoned = ?how, "Query not killed: this server cancels while holding its process list, and the query may be waiting on a node that does not answer (a kill could stall every query of the node)");
        crate::metrics::METRICS
            .query_kills
            .with_label_values(&[label, "withheld"])
            .inc();
        return;
    }
    let backend = backend.clone();
    let account = user.account.clone();
    let query_id = query_id.to_owned();
    tokio::spawn(async move {
        let timeout = std::time::Duration::from_secs(5);
        let label = backend.label();
        let result = match backend.node.kill_query(&account, &query_id, timeout).await {
            Ok(()) => {
                tracing::debug!(node = %label, %query_id, "Query killed");
                "sent"
            }
            Err(e) => {
                tracing::info!(node = %label, %query_id, error = %e, "Could not kill a query");
                "failed"
            }
        };
        crate::metrics::METRICS
            .query_kills
            .with_label_values(&[label, result])
            .inc();
    });
}

/// Whether `KILL QUERY` could stall the whole node. Before 22.9 (ClickHouse PR #41467) a
/// server cancels a query while holding its process list; a Distributed read waiting on a
/// stopped replica cannot be cancelled until `receive_timeout` (300 s) passes, and every new
/// query of the server waits as long, as do the other nodes' queries that need this one.
/// Seen in the fault run: one hedged native read killed on two nodes while a replica was
/// stopped froze all four nodes for five minutes. So on such a server (or one whose
/// version is not known yet) a query is killed only when its request ended and every node
/// of the cluster answers; one that lost a hedge's race may be waiting on a node that does
/// not (one chgate does not probe, too), and a native one whose connection is closed needs
/// no kill.
pub fn kill_freezes(
    backend: &crate::picker::Backend,
    cluster: &crate::picker::Cluster,
    how: Abandoned,
) -> bool {
    let holds = backend
        .state
        .capabilities()
        .is_none_or(|c| c.kill_holds_process_list);
    holds && (how != Abandoned::Ended || cluster.view().degraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of cluster `demo` (one replica: `replica`, a TOML inline table's fields)
    /// and a user `bi`, with the account's password in `secret_env`; `extra` goes first.
    fn demo_config(extra: &str, replica: &str, secret_env: &str) -> crate::config::Validated {
        std::env::set_var(secret_env, "s3cret");
        let text = format!(
            r#"
            {extra}
            [clusters.demo]
            shards = [{{ replicas = [{{ {replica} }}] }}]
            [clusters.demo.accounts.chgate]
            user = "chgate"
            password_env = "{secret_env}"
            [users.bi]
            password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0Q0cBJqm8bGZ0c2r0l1f0mYvSxQ2nM+4rW3W1QqkQ3E"
            cluster = "demo"
            account = "chgate"
            "#
        );
        crate::config::parse(&text, std::path::Path::new(".")).expect("valid")
    }

    /// Generations a reload replaced but connections still hold stop probing: the nodes
    /// get one generation's probes, not one set per generation held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_old_generation_stops_probing() {
        // A node that accepts and closes: every probe is one connection and fails at once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                drop(socket);
            }
        });
        let v = demo_config(
            "[picker]\nprobe_interval = \"200ms\"\nprobe_retry_interval = \"100ms\"\nprobe_timeout = \"100ms\"",
            &format!("host = \"127.0.0.1\", http_port = {port}"),
            "CHGATE_TEST_SECRET_GATEWAY_PROBES",
        );
        let gateway = Gateway::new(&v);
        // How long the node takes to get 10 more probes (failed ones come back every
        // 100 ms: about a second for one generation).
        let ten_probes = || async {
            let (from, started) = (accepted.load(Ordering::Relaxed), std::time::Instant::now());
            let deadline = started + std::time::Duration::from_secs(10);
            while accepted.load(Ordering::Relaxed) < from + 10 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the node is not probed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            started.elapsed()
        };
        let one = ten_probes().await;
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(gateway.generation().clone());
            gateway.reload(&v);
        }
        let six = ten_probes().await;
        assert!(
            six >= one / 2,
            "10 probes took {one:?} with one generation, {six:?} with six held"
        );
        drop(held);
    }

    #[tokio::test]
    async fn max_attempts_follows_a_reload() {
        let config = |attempts: usize| {
            demo_config(
                &format!("[upstream]\nmax_attempts = {attempts}"),
                "host = \"127.0.0.11\"",
                "CHGATE_TEST_SECRET_GATEWAY",
            )
        };
        let gateway = Gateway::new(&config(3));
        assert_eq!(gateway.settings.max_attempts(), 3);
        gateway.reload(&config(1));
        assert_eq!(gateway.settings.max_attempts(), 1);
    }
}
