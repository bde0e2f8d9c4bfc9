//! Choosing a node for a query and failing over: generic over one send attempt, so every
//! frontend gets the same routing, the same retry rules and the same accounting.
//!
//! - The first node: a read by weighted power-of-two-choices among the nodes eligible for
//!   reads (or the session's node); anything else where writes can land, or, if nowhere
//!   can, where reads can, so the client gets ClickHouse's own answer; a read with no
//!   eligible node falls back to the least lagging replica.
//! - After a failure, the next best node not yet tried, within `max_attempts` and the
//!   cluster's retry budget. A request that never reached a node goes to the next one
//!   whatever it is. One that was sent and lost goes again only if it is a read whose body
//!   was kept; otherwise the client is told it was not retried, and why.
//! - Every attempt counts a pick, holds the node's in-flight gauge, and reports its outcome
//!   to the picker ([`Backend::answered`], [`Backend::failed`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::error::GatewayError;
use super::sql::Statement;
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::{Backend, Cluster, Purpose, View};
use http::{header, Request, Response};
use hyper::body::Incoming;

use crate::upstream::{Body, SendFailure, Upstream, UpstreamError};

/// What became of one attempt on one node.
pub enum Attempt<T, R> {
    /// The node answered (at least the head of its answer came back).
    Answered(T),
    /// The request never reached the node (no connection could be made): it comes back
    /// whole and may go anywhere.
    Unsent(R, UpstreamError),
    /// The request went out and the connection failed before an answer.
    Lost(UpstreamError),
}

/// How a query may be routed.
pub struct Plan<'a> {
    pub cluster: &'a Cluster,
    pub statement: Statement,
    /// The client's session: it stays on one node while that node is up.
    pub session: Option<&'a [u8]>,
    /// The request's body is kept whole, so the request can be built again.
    pub replayable: bool,
    pub max_attempts: usize,
}

impl Plan<'_> {
    fn purpose(&self) -> Purpose {
        if self.statement.is_read() {
            Purpose::Read
        } else {
            Purpose::Write
        }
    }

    /// Whether a request lost after it was sent may be sent to another node: only a read
    /// (it changes nothing) whose body was kept.
    fn resend_after_loss(&self) -> Result<(), GatewayError> {
        match (self.statement.is_read(), self.replayable) {
            (true, true) => Ok(()),
            (true, false) => Err(GatewayError::UpstreamFailed {
                reason: "connection lost",
                why: "had a body too large to keep for a retry",
            }),
            (false, _) => Err(GatewayError::UpstreamFailed {
                reason: "connection lost",
                why: "is not a read, and might have been executed",
            }),
        }
    }
}

/// An answered query: the answer, the node it came from, and that node's in-flight count,
/// held until the answer has been passed on.
pub struct Routed<T> {
    pub answer: T,
    pub backend: Arc<Backend>,
    /// Nodes the request reached, the one that answered included.
    pub attempts: usize,
    pub in_flight: GaugeGuard,
}

/// Routes one query. `request` builds the request for an attempt (`None` once it cannot
/// be built again: a streamed body goes once); `send` makes one attempt on a node.
pub async fn route<T, R, Fut>(
    plan: Plan<'_>,
    mut request: impl FnMut() -> Option<R>,
    mut send: impl FnMut(Arc<Backend>, R) -> Fut,
) -> Result<Routed<T>, GatewayError>
where
    Fut: Future<Output = Attempt<T, R>>,
{
    let cluster = plan.cluster;
    let purpose = plan.purpose();
    cluster.budget.deposit();
    let mut backend = {
        let view = cluster.view();
        match first_node(&view, purpose, plan.session) {
            Some(i) => view.topology.nodes[i].clone(),
            None => {
                return Err(GatewayError::NoNodeAvailable {
                    cluster: cluster.name.clone(),
                    tried: 0,
                    why: summary(&view, purpose),
                })
            }
        }
    };
    // Nodes that failed this request; allocates only on a failover.
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut sent = 0usize;
    let mut unsent: Option<R> = None;
    loop {
        let Some(req) = unsent.take().or_else(&mut request) else {
            break;
        };
        backend.picked(purpose);
        let in_flight = GaugeGuard::new(&backend.node.in_flight);
        let started = Instant::now();
        match send(backend.clone(), req).await {
            Attempt::Answered(answer) => {
                backend.answered(started.elapsed());
                return Ok(Routed {
                    answer,
                    backend,
                    attempts: sent + 1,
                    in_flight,
                });
            }
            Attempt::Unsent(req, error) => {
                drop(in_flight);
                backend.failed(&error);
                unsent = Some(req);
            }
            Attempt::Lost(error) => {
                sent += 1;
                drop(in_flight);
                backend.failed(&error);
                plan.resend_after_loss()?;
            }
        }
        tried.push(backend.clone());
        if tried.len() >= plan.max_attempts {
            break;
        }
        let next = {
            let view = cluster.view();
            let tried_here: Vec<usize> = (0..view.topology.nodes.len())
                .filter(|&i| {
                    tried
                        .iter()
                        .any(|t| Arc::ptr_eq(t, &view.topology.nodes[i]))
                })
                .collect();
            next_node(&view, purpose, &tried_here).map(|i| view.topology.nodes[i].clone())
        };
        let Some(next) = next else {
            break;
        };
        if !cluster.budget.try_withdraw() {
            METRICS
                .retry_budget_exhausted
                .with_label_values(&[&cluster.name])
                .inc();
            return Err(GatewayError::RetryBudgetExhausted {
                cluster: cluster.name.clone(),
            });
        }
        METRICS
            .failovers
            .with_label_values(&[backend.label()])
            .inc();
        backend = next;
    }
    Err(GatewayError::NoNodeAvailable {
        cluster: cluster.name.clone(),
        tried: tried.len(),
        why: "every node tried failed before answering".into(),
    })
}

/// One attempt over HTTP: the request on a pooled connection to the backend's node (with
/// the stale-connection retry of [`crate::upstream::Node::send`]).
pub async fn send_http(
    backend: Arc<Backend>,
    mut req: Request<Body>,
) -> Attempt<(Response<Incoming>, Upstream), Request<Body>> {
    req.headers_mut()
        .insert(header::HOST, backend.node.authority.clone());
    match backend.node.send(req).await {
        Ok(answer) => Attempt::Answered(answer),
        Err(SendFailure {
            error,
            unsent: Some(req),
        }) => Attempt::Unsent(req, error),
        Err(SendFailure {
            error,
            unsent: None,
        }) => Attempt::Lost(error),
    }
}

/// The first node for a request (see the module docs).
fn first_node(view: &View, purpose: Purpose, session: Option<&[u8]>) -> Option<usize> {
    let random = [rand::random(), rand::random()];
    view.choose(purpose, session, random)
        .or_else(|| {
            (purpose == Purpose::Write)
                .then(|| view.choose(Purpose::Read, session, random))
                .flatten()
        })
        .or_else(|| view.fallback(Purpose::Read, &[]))
}

/// The next node after `tried` failed.
fn next_node(view: &View, purpose: Purpose, tried: &[usize]) -> Option<usize> {
    view.fallback(purpose, tried).or_else(|| {
        (purpose == Purpose::Write)
            .then(|| view.fallback(Purpose::Read, tried))
            .flatten()
    })
}

/// Why no node can take a request, for the client: counts by reason, no addresses.
fn summary(view: &View, purpose: Purpose) -> String {
    let mut reasons: Vec<(&'static str, usize)> = Vec::new();
    for s in view.standings.iter() {
        let label = match s.get(purpose) {
            Ok(_) => continue,
            Err(e) => e.short(),
        };
        match reasons.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => reasons.push((label, 1)),
        }
    }
    if reasons.is_empty() {
        return "the cluster has no nodes".into();
    }
    let parts: Vec<String> = reasons.iter().map(|(l, n)| format!("{n} {l}")).collect();
    format!("none is healthy ({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use crate::config::{ClusterConfig, UpstreamConfig};

    fn cluster(upstream: &UpstreamConfig) -> Cluster {
        let c: ClusterConfig = toml::from_str(
            r#"shards = [{ replicas = [{ host = "a" }, { host = "b" }, { host = "c" }] }]"#,
        )
        .unwrap();
        Cluster::new("t", &c, &Default::default(), upstream, &Default::default())
    }

    fn plan(cluster: &Cluster, statement: Statement, replayable: bool) -> Plan<'_> {
        Plan {
            cluster,
            statement,
            session: None,
            replayable,
            max_attempts: 3,
        }
    }

    fn refused() -> UpstreamError {
        UpstreamError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    fn lost() -> UpstreamError {
        UpstreamError::Timeout(std::time::Duration::from_secs(1))
    }

    /// Routes one request whose attempts go as `outcome` says per node label ('a', 'b',
    /// 'c'); the labels tried, in order, and the result.
    async fn run(
        plan: Plan<'_>,
        outcome: impl Fn(&str) -> Attempt<&'static str, u32>,
        bodies: u32,
    ) -> (Vec<String>, Result<Routed<&'static str>, GatewayError>) {
        let tried = Mutex::new(Vec::new());
        let mut made = 0;
        let request = || {
            made += 1;
            (made <= bodies).then_some(made)
        };
        let result = route(plan, request, |backend, _req| {
            let label = backend.node.host.clone();
            tried.lock().unwrap().push(label.clone());
            let attempt = outcome(&label);
            async move { attempt }
        })
        .await;
        (tried.into_inner().unwrap(), result)
    }

    #[tokio::test]
    async fn an_unsent_request_goes_to_the_next_node_whatever_it_is() {
        let c = cluster(&UpstreamConfig::default());
        let (tried, result) = run(
            plan(&c, Statement::Write, false),
            |l| match l {
                "b" => Attempt::Answered("b"),
                _ => Attempt::Unsent(7, refused()),
            },
            1,
        )
        .await;
        let routed = result.unwrap();
        assert_eq!(routed.answer, "b");
        assert_eq!(
            routed.attempts, 1,
            "only the node that answered was reached"
        );
        assert_eq!(tried.last().map(String::as_str), Some("b"));
        assert!(tried.len() <= 3);
        for t in &tried[..tried.len() - 1] {
            let view = c.view();
            let i = view
                .topology
                .nodes
                .iter()
                .position(|n| n.node.host == *t)
                .unwrap();
            assert!(
                view.topology.nodes[i].node.backing_off(),
                "{t} failed: backed off"
            );
        }
    }

    #[tokio::test]
    async fn a_lost_request_goes_again_only_if_it_is_a_kept_read() {
        let fail_a_first = |l: &str| match l {
            "a" => Attempt::Lost(lost()),
            other => Attempt::Answered(if other == "b" { "b" } else { "c" }),
        };
        // Retried: a read whose body is kept. Make `a` the only first choice by sending
        // until it is tried first.
        for _ in 0..50 {
            let c = cluster(&UpstreamConfig::default());
            let (tried, result) = run(plan(&c, Statement::Read, true), fail_a_first, 3).await;
            if tried[0] != "a" {
                continue;
            }
            let routed = result.unwrap();
            assert_eq!(routed.attempts, 2);
            assert_ne!(routed.answer, "a");
            break;
        }
        let always_lost = |_: &str| Attempt::Lost(lost());
        let c = cluster(&UpstreamConfig::default());
        let (tried, result) = run(plan(&c, Statement::Write, true), always_lost, 3).await;
        assert_eq!(tried.len(), 1);
        match result {
            Err(e @ GatewayError::UpstreamFailed { why, .. }) => {
                assert!(why.contains("might have been executed"));
                assert!(!e.could_retry());
            }
            other => panic!("{:?}", other.err()),
        }
        let c = cluster(&UpstreamConfig::default());
        let (tried, result) = run(plan(&c, Statement::Read, false), always_lost, 1).await;
        assert_eq!(tried.len(), 1);
        assert!(matches!(
            result.err(),
            Some(GatewayError::UpstreamFailed { why, .. }) if why.contains("too large")
        ));
    }

    #[tokio::test]
    async fn attempts_stop_at_max_attempts_and_at_the_budget() {
        let c = cluster(&UpstreamConfig::default());
        let (tried, result) = run(
            Plan {
                max_attempts: 2,
                ..plan(&c, Statement::Read, true)
            },
            |_| Attempt::Unsent(1, refused()),
            1,
        )
        .await;
        assert_eq!(tried.len(), 2);
        let counts: HashMap<&String, usize> = tried.iter().fold(HashMap::new(), |mut m, t| {
            *m.entry(t).or_default() += 1;
            m
        });
        assert!(
            counts.values().all(|&n| n == 1),
            "never the same node twice"
        );
        assert!(matches!(
            result.err(),
            Some(GatewayError::NoNodeAvailable { tried: 2, .. })
        ));
        // The budget spent (it starts with ten retries and earns none here): the first
        // failure is the last attempt.
        let broke = UpstreamConfig {
            retry_budget_ratio: 0.0,
            retry_budget_min_per_second: 0,
            ..UpstreamConfig::default()
        };
        let c = cluster(&broke);
        while c.budget.try_withdraw() {}
        let (tried, result) = run(
            plan(&c, Statement::Read, true),
            |_| Attempt::Unsent(1, refused()),
            1,
        )
        .await;
        assert_eq!(tried.len(), 1);
        let e = result.err().unwrap();
        assert!(matches!(e, GatewayError::RetryBudgetExhausted { .. }));
        assert!(e.could_retry());
    }

    #[tokio::test]
    async fn a_streamed_body_goes_once() {
        let c = cluster(&UpstreamConfig::default());
        // The request cannot be built a second time (a streamed body): after it never
        // reached the first node it comes back whole and goes on; once it has been sent and
        // lost there is nothing to send again.
        let (tried, result) = run(
            plan(&c, Statement::Write, false),
            |l| match l {
                "c" => Attempt::Answered("c"),
                _ => Attempt::Unsent(1, refused()),
            },
            1,
        )
        .await;
        assert_eq!(result.unwrap().answer, "c");
        assert_eq!(tried.last().map(String::as_str), Some("c"));
    }
}
