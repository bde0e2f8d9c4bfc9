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
//! - A read whose body was kept and that is not tied to a session is hedged: still without
//!   an answer after the cluster's hedge bound (see [`crate::picker::hedge`]), it goes to a
//!   second node as well, within the retry budget, and the first answer wins. A read with
//!   no answer within `first_byte_timeout` is given up.
//! - Every attempt counts a pick, holds the node's in-flight gauge, and reports its outcome
//!   to the picker ([`Backend::answered`], [`Backend::failed`]). A read's attempt given up
//!   before it answered (the hedge that lost, a timeout, a client that went away) is passed
//!   to the caller's `abandon`, which cancels its query on the node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::error::GatewayError;
use super::sql::Statement;
use super::Abandoned;
use crate::config::HedgeMode;
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::{Backend, Cluster, Purpose, View};
use http::{header, Request, Response};
use hyper::body::Incoming;

use crate::upstream::{Body, SendFailure, Upstream, UpstreamError};

/// While the hedge mode waits for a node to be down, a read past its hedge bound is looked
/// at again this often.
pub const HEDGE_RECHECK: Duration = Duration::from_millis(200);

/// What became of one attempt on one node.
pub enum Attempt<T, R> {
    /// The node answered (at least the head of its answer came back).
    Answered(T),
    /// The request never reached the node (no connection could be made): it comes back
    /// whole and may go anywhere.
    Unsent(R, UpstreamError),
    /// The request went out and the connection failed before an answer.
    Lost(UpstreamError),
    /// The node answered a read with an error another node may not give: it could not
    /// reach a node the query needed (a shard's replicas, for a Distributed table). The
    /// read goes to another node, within `max_attempts` and the retry budget; this answer
    /// is what the client gets if none does better. Not the node's own failure: the
    /// picker is not told of it.
    Declined(T),
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
    /// A quota's `max_execution_time` and whose it is: a query of any kind with no answer
    /// by then is given up and its attempts killed.
    pub execution_limit: Option<(Duration, &'a str)>,
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
    /// (it changes nothing) whose body was kept, outside a session (whose temporary tables
    /// and settings are on the node that had it: elsewhere the same query could read
    /// something else).
    fn resend_after_loss(&self) -> Result<(), GatewayError> {
        if self.session.is_some() {
            return Err(GatewayError::UpstreamFailed {
                reason: "connection lost",
                why: "belongs to a session, whose state is on that node",
            });
        }
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

    /// Whether the query may go to another node while or after one has it (a hedge, a
    /// declined answer): a read (it changes nothing) that can be built again and is not
    /// tied to one node by a session.
    pub fn movable(&self) -> bool {
        self.statement.is_read() && self.replayable && self.session.is_none()
    }

    /// Whether the query may be hedged: movable, and the cluster hedges.
    fn hedgeable(&self) -> bool {
        self.movable() && self.cluster.hedging.mode() != HedgeMode::Off
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

/// One attempt under way.
struct Running<Fut> {
    backend: Arc<Backend>,
    started: Instant,
    /// This attempt is the hedge of another.
    hedge: bool,
    future: Pin<Box<Fut>>,
    in_flight: GaugeGuard,
}

/// The attempts under way. Whatever is still here when it drops was given up before it
/// answered, and the caller's `abandon` hears of it, with how, when its query is to be
/// cancelled (a read, or anything at its quota's limit), or `None` to leave it running (a
/// write whose client went away: ClickHouse runs it to its end, and so must the quota's
/// count of it).
struct Underway<'a, Fut, A: Fn(&Arc<Backend>, Option<Abandoned>)> {
    running: Vec<Running<Fut>>,
    abandon: &'a A,
    read: bool,
    /// Another attempt answered: those left lost the race (they were silent).
    answered: bool,
}

impl<Fut, A: Fn(&Arc<Backend>, Option<Abandoned>)> Drop for Underway<'_, Fut, A> {
    fn drop(&mut self) {
        let how = if self.answered {
            Abandoned::Silent
        } else {
            Abandoned::Ended
        };
        for r in self.running.drain(..) {
            (self.abandon)(&r.backend, self.read.then_some(how));
        }
    }
}

enum Event<T, R> {
    Done(usize, Attempt<T, R>),
    Hedge,
    Deadline,
}

/// Routes one query. `request` builds the request for an attempt (`None` once it cannot
/// be built again: a streamed body goes once); `send` makes one attempt on a node;
/// `abandon` is told of every attempt given up before it answered, and whether to cancel
/// its query: yes for a read, and for any query at its quota's execution limit; no for a
/// write whose caller went away. A cancelled one is [`Abandoned::Silent`] when another
/// attempt answered first, else [`Abandoned::Ended`] (the request ended: its client
/// went away, or a deadline passed).
pub async fn route<T, R, Fut>(
    plan: Plan<'_>,
    mut request: impl FnMut() -> Option<R>,
    mut send: impl FnMut(Arc<Backend>, R) -> Fut,
    abandon: impl Fn(&Arc<Backend>, Option<Abandoned>),
) -> Result<Routed<T>, GatewayError>
where
    Fut: Future<Output = Attempt<T, R>>,
{
    let cluster = plan.cluster;
    let purpose = plan.purpose();
    cluster.budget.deposit();
    let first = {
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
    let read = plan.statement.is_read();
    let movable = plan.movable();
    // Timers are armed only when they apply; an unarmed one is never polled.
    let mut hedge_armed = plan.hedgeable();
    let hedge_after = if hedge_armed {
        cluster.hedging.after()
    } else {
        Duration::ZERO
    };
    let hedge_timer = tokio::time::sleep(hedge_after);
    let first_byte_timeout = cluster.first_byte_timeout.filter(|_| read);
    let (deadline, by_quota) = match (first_byte_timeout, plan.execution_limit) {
        (Some(f), Some((e, _))) if f < e => (Some(f), false),
        (_, Some((e, _))) => (Some(e), true),
        (f, None) => (f, false),
    };
    let deadline_timer = tokio::time::sleep(deadline.unwrap_or_default());
    tokio::pin!(hedge_timer, deadline_timer);

    let mut underway = Underway {
        running: Vec::with_capacity(2),
        abandon: &abandon,
        read,
        answered: false,
    };
    // Nodes that failed this request; allocates only on a failover.
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut reached = 0usize;
    let mut hedged = false;
    let mut unsent: Option<R> = None;
    // The last declined answer, for the client if no node does better.
    let mut declined: Option<Routed<T>> = None;
    let mut next = Some(first);
    loop {
        if let Some(backend) = next.take() {
            if let Some(req) = unsent.take().or_else(&mut request) {
                start(&mut underway, backend, req, &mut send, purpose, false);
            }
        }
        if underway.running.is_empty() {
            break;
        }
        let event = std::future::poll_fn(|cx| {
            for (i, r) in underway.running.iter_mut().enumerate() {
                if let Poll::Ready(outcome) = r.future.as_mut().poll(cx) {
                    return Poll::Ready(Event::Done(i, outcome));
                }
            }
            if hedge_armed && hedge_timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Hedge);
            }
            if deadline.is_some() {
                let at = deadline_timer.deadline();
                if tokio::time::Instant::now() >= at {
                    return Poll::Ready(Event::Deadline);
                }
                // The deadline's timer is registered only once no earlier timer (the
                // hedge's) will wake this first: most answers come before either, and
                // then pay for one timer, not two.
                let woken_earlier = hedge_armed && hedge_timer.deadline() <= at;
                if !woken_earlier && deadline_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Deadline);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(i, outcome) => {
                let r = underway.running.swap_remove(i);
                match outcome {
                    Attempt::Answered(answer) => {
                        let first_byte = r.started.elapsed();
                        r.backend.answered(first_byte);
                        if read {
                            cluster.hedging.record(first_byte);
                        }
                        if hedged {
                            let result = if r.hedge { "won" } else { "lost" };
                            METRICS
                                .hedges
                                .with_label_values(&[&cluster.name, result])
                                .inc();
                        }
                        // The other attempt, if any, is abandoned as `underway` drops.
                        underway.answered = true;
                        return Ok(Routed {
                            answer,
                            backend: r.backend,
                            attempts: reached + 1 + underway.running.len(),
                            in_flight: r.in_flight,
                        });
                    }
                    Attempt::Unsent(req, error) => {
                        r.backend.failed(&error);
                        unsent = Some(req);
                    }
                    Attempt::Lost(error) => {
                        reached += 1;
                        r.backend.failed(&error);
                        // With another attempt still under way there is nothing to resend.
                        if underway.running.is_empty() {
                            plan.resend_after_loss()?;
                        }
                    }
                    Attempt::Declined(answer) if !movable => {
                        // A session's query, or one that cannot be sent again: as it is.
                        r.backend.answered(r.started.elapsed());
                        underway.answered = true;
                        return Ok(Routed {
                            answer,
                            backend: r.backend,
                            attempts: reached + 1 + underway.running.len(),
                            in_flight: r.in_flight,
                        });
                    }
                    Attempt::Declined(answer) => {
                        reached += 1;
                        r.backend.answered(r.started.elapsed());
                        METRICS
                            .declined_reads
                            .with_label_values(&[r.backend.label()])
                            .inc();
                        tried.push(r.backend.clone());
                        declined = Some(Routed {
                            answer,
                            backend: r.backend,
                            attempts: reached,
                            in_flight: r.in_flight,
                        });
                        if !underway.running.is_empty() {
                            continue;
                        }
                        let declining = &tried[tried.len() - 1];
                        match failover(&plan, purpose, &tried, declining) {
                            Ok(Some(backend)) => {
                                next = Some(backend);
                                continue;
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                tried.push(r.backend.clone());
                // With another attempt still under way, wait for it.
                if underway.running.is_empty() {
                    match failover(&plan, purpose, &tried, &r.backend) {
                        Ok(Some(backend)) => next = Some(backend),
                        Ok(None) => break,
                        Err(e) => return declined.ok_or(e),
                    }
                }
            }
            Event::Hedge => {
                if cluster.hedging.mode() == HedgeMode::Degraded && !cluster.view().degraded {
                    // Nothing is down (yet): look again shortly, so a read stuck on a node
                    // that hung after it was sent is hedged as soon as the node is seen
                    // down, not a whole bound later.
                    let again = tokio::time::Instant::now() + hedge_after.min(HEDGE_RECHECK);
                    hedge_timer.as_mut().reset(again);
                    continue;
                }
                hedge_armed = false;
                let result = hedge(cluster, purpose, &tried, &mut underway, &mut request);
                match result {
                    Ok((backend, req)) => {
                        hedged = true;
                        start(&mut underway, backend, req, &mut send, purpose, true);
                    }
                    Err(why) => METRICS
                        .hedges
                        .with_label_values(&[&cluster.name, why])
                        .inc(),
                }
            }
            Event::Deadline => {
                if let (true, Some((limit, user))) = (by_quota, plan.execution_limit) {
                    // Whatever it is, it is killed where it runs.
                    underway.read = true;
                    return Err(GatewayError::ExecutionTimeout {
                        user: user.to_owned(),
                        elapsed: limit,
                        limit,
                    });
                }
                return Err(GatewayError::Timeout {
                    cluster: cluster.name.clone(),
                    after: deadline.unwrap_or_default(),
                });
            }
        }
    }
    if let Some(answer) = declined {
        return Ok(answer);
    }
    Err(GatewayError::NoNodeAvailable {
        cluster: cluster.name.clone(),
        tried: tried.len(),
        why: "every node tried failed before answering".into(),
    })
}

/// The node to send a request to after `failed` failed it and nothing else is under way:
/// `None` once `max_attempts` nodes were tried or none is left; an error once the retry
/// budget is spent.
fn failover(
    plan: &Plan<'_>,
    purpose: Purpose,
    tried: &[Arc<Backend>],
    failed: &Backend,
) -> Result<Option<Arc<Backend>>, GatewayError> {
    let cluster = plan.cluster;
    if tried.len() >= plan.max_attempts {
        return Ok(None);
    }
    let Some(backend) = next_untried::<()>(cluster, purpose, tried, &[]) else {
        return Ok(None);
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
    METRICS.failovers.with_label_values(&[failed.label()]).inc();
    Ok(Some(backend))
}

/// The node for a new connection that will carry queries of `purpose` (the native
/// protocol routes a connection, not each query): the first node as for a query, and after
/// the nodes in `tried` failed, the next best of the others, within the retry budget.
pub fn connection_node(
    cluster: &Cluster,
    purpose: Purpose,
    tried: &[Arc<Backend>],
) -> Result<Option<Arc<Backend>>, GatewayError> {
    if tried.is_empty() {
        cluster.budget.deposit();
        let view = cluster.view();
        return Ok(first_node(&view, purpose, None).map(|i| view.topology.nodes[i].clone()));
    }
    let Some(backend) = next_untried::<()>(cluster, purpose, tried, &[]) else {
        return Ok(None);
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
    if let Some(failed) = tried.last() {
        METRICS.failovers.with_label_values(&[failed.label()]).inc();
    }
    backend.picked(purpose);
    Ok(Some(backend))
}

/// Whether a read should carry ClickHouse's `load_balancing=in_order` (both frontends ask):
/// while a replica is down and the `in_order` order avoids it (the first replica of every
/// shard with one down is up), a node fanning the read out then never sends a shard's part
/// to the down replica (see `upstream.avoid_down_replicas`). Counted in
/// `chgate_steered_reads_total` when it says yes.
pub fn steer_in_order(cluster: &Cluster) -> bool {
    if !cluster.avoid_down_replicas {
        return false;
    }
    let view = cluster.view();
    let steer = view.degraded && view.in_order_avoids_down;
    if steer {
        METRICS
            .steered_reads
            .with_label_values(&[&cluster.name])
            .inc();
    }
    steer
}

/// Starts one attempt.
fn start<T, R, Fut, A: Fn(&Arc<Backend>, Option<Abandoned>)>(
    underway: &mut Underway<'_, Fut, A>,
    backend: Arc<Backend>,
    req: R,
    send: &mut impl FnMut(Arc<Backend>, R) -> Fut,
    purpose: Purpose,
    hedge: bool,
) where
    Fut: Future<Output = Attempt<T, R>>,
{
    backend.picked(purpose);
    let in_flight = GaugeGuard::new(&backend.node.in_flight);
    underway.running.push(Running {
        future: Box::pin(send(backend.clone(), req)),
        backend,
        started: Instant::now(),
        hedge,
        in_flight,
    });
}

/// A node not tried yet and not busy with this query now, for a failover or a hedge.
fn next_untried<Fut>(
    cluster: &Cluster,
    purpose: Purpose,
    tried: &[Arc<Backend>],
    running: &[Running<Fut>],
) -> Option<Arc<Backend>> {
    let view = cluster.view();
    let nodes = &view.topology.nodes;
    let excluded: Vec<usize> = (0..nodes.len())
        .filter(|&i| {
            tried.iter().any(|t| Arc::ptr_eq(t, &nodes[i]))
                || running.iter().any(|r| Arc::ptr_eq(&r.backend, &nodes[i]))
        })
        .collect();
    next_node(&view, purpose, &excluded).map(|i| nodes[i].clone())
}

/// The node and request for a hedge, or why there is none (a `chgate_hedges_total`
/// result).
fn hedge<R, Fut, A: Fn(&Arc<Backend>, Option<Abandoned>)>(
    cluster: &Cluster,
    purpose: Purpose,
    tried: &[Arc<Backend>],
    underway: &mut Underway<'_, Fut, A>,
    request: &mut impl FnMut() -> Option<R>,
) -> Result<(Arc<Backend>, R), &'static str> {
    let backend = next_untried(cluster, purpose, tried, &underway.running).ok_or("no_node")?;
    if !cluster.budget.try_withdraw() {
        return Err("no_budget");
    }
    let req = request().ok_or("no_node")?;
    METRICS
        .hedges
        .with_label_values(&[&cluster.name, "sent"])
        .inc();
    Ok((backend, req))
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

    use crate::config::{ClusterConfig, HedgeMode, UpstreamConfig};

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
            execution_limit: None,
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
        let result = route(
            plan,
            request,
            |backend, _req| {
                let label = backend.node.host.clone();
                tried.lock().unwrap().push(label.clone());
                let attempt = outcome(&label);
                async move { attempt }
            },
            |_, _| {},
        )
        .await;
        (tried.into_inner().unwrap(), result)
    }

    /// What one node does with an attempt: answer after a delay, or never (`None`).
    type Timed = (Option<Duration>, &'static str);

    struct TimedRun {
        tried: Vec<String>,
        abandoned: Vec<String>,
        result: Result<Routed<&'static str>, GatewayError>,
        took: Duration,
    }

    /// Routes one read on paused time; each node answers as `behaviour` says.
    async fn run_timed(plan: Plan<'_>, behaviour: impl Fn(&str) -> Timed) -> TimedRun {
        let tried = Mutex::new(Vec::new());
        let abandoned = Mutex::new(Vec::new());
        let started = tokio::time::Instant::now();
        let result = route(
            plan,
            || Some(0u32),
            |backend, _req| {
                let label = backend.node.host.clone();
                tried.lock().unwrap().push(label.clone());
                let (delay, answer) = behaviour(&label);
                async move {
                    match delay {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending::<()>().await,
                    }
                    Attempt::Answered(answer)
                }
            },
            |backend, cancel| {
                if cancel.is_some() {
                    abandoned.lock().unwrap().push(backend.node.host.clone())
                }
            },
        )
        .await;
        TimedRun {
            took: started.elapsed(),
            tried: tried.into_inner().unwrap(),
            abandoned: abandoned.into_inner().unwrap(),
            result,
        }
    }

    fn hedging(mode: HedgeMode, first_byte_timeout: Option<Duration>) -> UpstreamConfig {
        UpstreamConfig {
            hedge: mode,
            hedge_after: crate::config::HedgeAfter::Fixed(Duration::from_millis(100)),
            first_byte_timeout,
            ..UpstreamConfig::default()
        }
    }

    /// Runs until the first attempt went to node `a` (the first pick is random).
    async fn with_a_first(
        config: &UpstreamConfig,
        statement: Statement,
        behaviour: impl Fn(&str) -> Timed + Copy,
    ) -> TimedRun {
        for _ in 0..200 {
            let c = cluster(config);
            let run = run_timed(plan(&c, statement, true), behaviour).await;
            if run.tried[0] == "a" {
                return run;
            }
        }
        panic!("a was never picked first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_still_waiting_is_hedged_and_the_first_answer_wins() {
        let config = hedging(HedgeMode::Always, None);
        let hung_a = |l: &str| match l {
            "a" => (None, "a"),
            "b" => (Some(Duration::from_millis(10)), "b"),
            _ => (Some(Duration::from_millis(10)), "c"),
        };
        let run = with_a_first(&config, Statement::Read, hung_a).await;
        let routed = run.result.unwrap();
        assert_ne!(routed.answer, "a");
        assert_eq!(run.tried.len(), 2, "one hedge");
        assert_eq!(
            run.took,
            Duration::from_millis(110),
            "hedge bound + its answer"
        );
        assert_eq!(run.abandoned, ["a"], "the hung attempt is cancelled");
        assert_eq!(routed.attempts, 2);
        // The first attempt answers before the hedge: it wins, the hedge is cancelled.
        let slow_a = |l: &str| match l {
            "a" => (Some(Duration::from_millis(150)), "a"),
            _ => (Some(Duration::from_millis(200)), "other"),
        };
        let run = with_a_first(&config, Statement::Read, slow_a).await;
        assert_eq!(run.result.unwrap().answer, "a");
        assert_eq!(run.took, Duration::from_millis(150));
        assert_eq!(run.abandoned.len(), 1);
        assert_ne!(run.abandoned[0], "a");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_sessions_and_healthy_clusters_are_not_hedged() {
        let late_a = |l: &str| match l {
            "a" => (Some(Duration::from_secs(2)), "a"),
            _ => (Some(Duration::from_millis(1)), "other"),
        };
        // A write waits for its node, however long.
        let always = hedging(HedgeMode::Always, None);
        let run = with_a_first(&always, Statement::Write, late_a).await;
        assert_eq!(run.tried, ["a"]);
        assert_eq!(run.result.unwrap().answer, "a");
        // A session's read stays on its node.
        let c = cluster(&always);
        let run = run_timed(
            Plan {
                session: Some(b"s1"),
                ..plan(&c, Statement::Read, true)
            },
            |_| (Some(Duration::from_secs(2)), "x"),
        )
        .await;
        assert_eq!(run.tried.len(), 1);
        // By default hedges go out only while a node of the cluster is down; none is.
        let degraded = hedging(HedgeMode::Degraded, None);
        let run = with_a_first(&degraded, Statement::Read, late_a).await;
        assert_eq!(run.tried, ["a"]);
        assert_eq!(run.took, Duration::from_secs(2));
        assert!(run.abandoned.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_without_an_answer_by_the_first_byte_timeout_is_given_up() {
        let config = hedging(HedgeMode::Always, Some(Duration::from_secs(1)));
        let c = cluster(&config);
        let run = run_timed(plan(&c, Statement::Read, true), |_| (None, "never")).await;
        assert_eq!(run.took, Duration::from_secs(1));
        assert_eq!(run.tried.len(), 2, "the first attempt and its hedge");
        let mut abandoned = run.abandoned.clone();
        abandoned.sort();
        let mut tried = run.tried.clone();
        tried.sort();
        assert_eq!(abandoned, tried, "both are cancelled");
        let e = run.result.err().unwrap();
        assert!(matches!(e, GatewayError::Timeout { .. }), "{e}");
        assert_eq!(e.code().number, 159);
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_past_its_quota_execution_limit_is_given_up_and_killed_even_a_write() {
        let c = cluster(&hedging(HedgeMode::Off, None));
        let run = run_timed(
            Plan {
                execution_limit: Some((Duration::from_secs(2), "bi")),
                ..plan(&c, Statement::Write, false)
            },
            |_| (None, "never"),
        )
        .await;
        assert_eq!(run.took, Duration::from_secs(2));
        assert_eq!(run.abandoned, run.tried, "the write is killed too");
        let e = run.result.err().unwrap();
        assert!(matches!(e, GatewayError::ExecutionTimeout { .. }), "{e}");
        assert_eq!(e.code().number, 159);
        assert!(e.to_string().contains("maximum: 2"), "{e}");
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
