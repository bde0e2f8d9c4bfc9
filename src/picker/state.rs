//! What the picker knows about a node and about a shard group's ZooKeeper ensemble,
//! updated by the probe tasks and by the proxy's own traffic, read when weights are
//! published.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::figures::{Capabilities, NodeFigures, ZooKeeperFigures};
use super::health::{Health, HealthConfig, State, Transition};

/// Weight of the newest window in the passive error-rate and latency averages.
const EWMA_ALPHA: f64 = 0.3;

/// The probe side: health with hysteresis and the last figures.
#[derive(Debug, Clone)]
pub struct Probed {
    pub health: Health,
    pub capabilities: Option<Capabilities>,
    /// The last successful probe's figures.
    pub figures: Option<NodeFigures>,
    /// The last probe's error, cleared by a success.
    pub last_error: Option<String>,
    pub last_probe: Option<Instant>,
    pub probes: u64,
    /// Passive figures, folded in once per publish tick.
    pub error_rate: f64,
    pub latency: Option<Duration>,
}

/// A node's picker state. The request path only touches the atomics.
#[derive(Debug)]
pub struct NodeState {
    probed: Mutex<Probed>,
    passive_ok: AtomicU64,
    passive_failed: AtomicU64,
    passive_latency_us: AtomicU64,
}

impl Default for NodeState {
    fn default() -> Self {
        Self {
            probed: Mutex::new(Probed {
                health: Health::new(HealthConfig {
                    fall: 2,
                    rise: 2,
                    slow_start: Duration::from_secs(30),
                }),
                capabilities: None,
                figures: None,
                last_error: None,
                last_probe: None,
                probes: 0,
                error_rate: 0.0,
                latency: None,
            }),
            passive_ok: AtomicU64::new(0),
            passive_failed: AtomicU64::new(0),
            passive_latency_us: AtomicU64::new(0),
        }
    }
}

impl NodeState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Probed> {
        // A panic while holding this lock cannot leave the data inconsistent in a way that
        // matters (every field is replaced whole), so a poisoned lock is used as is.
        self.probed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the probe side.
    pub fn snapshot(&self) -> Probed {
        self.lock().clone()
    }

    /// True while the probes say the node is down.
    pub fn is_down(&self) -> bool {
        self.lock().health.state() == State::Down
    }

    pub fn capabilities(&self) -> Option<Capabilities> {
        self.lock().capabilities
    }

    pub fn set_capabilities(&self, caps: Option<Capabilities>) {
        self.lock().capabilities = caps;
    }

    /// Records one probe; returns the health transition, if any, for the caller to log.
    pub fn record_probe(
        &self,
        config: HealthConfig,
        result: Result<NodeFigures, String>,
    ) -> (Option<Transition>, State) {
        let mut p = self.lock();
        p.health.set_config(config);
        p.last_probe = Some(Instant::now());
        p.probes += 1;
        let transition = match result {
            Ok(figures) => {
                p.figures = Some(figures);
                p.last_error = None;
                p.health.record(true)
            }
            Err(e) => {
                p.last_error = Some(e);
                // Capabilities are asked again once the node answers: it may have been
                // upgraded while it was away.
                p.capabilities = None;
                p.health.record(false)
            }
        };
        (transition, p.health.state())
    }

    /// One request's outcome on this node, as the proxy saw it: whether the node answered
    /// and how long until the response head.
    pub fn record_passive(&self, ok: bool, latency: Duration) {
        if ok {
            self.passive_ok.fetch_add(1, Ordering::Relaxed);
            self.passive_latency_us
                .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        } else {
            self.passive_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Folds the requests since the last call into the error-rate and latency averages.
    /// Called once per publish tick; a window without traffic leaves both as they were.
    pub fn fold_passive(&self) {
        let ok = self.passive_ok.swap(0, Ordering::Relaxed);
        let failed = self.passive_failed.swap(0, Ordering::Relaxed);
        let latency_us = self.passive_latency_us.swap(0, Ordering::Relaxed);
        if ok + failed == 0 {
            return;
        }
        let mut p = self.lock();
        let rate = failed as f64 / (ok + failed) as f64;
        p.error_rate = EWMA_ALPHA * rate + (1.0 - EWMA_ALPHA) * p.error_rate;
        if let Some(mean_us) = latency_us.checked_div(ok) {
            let window = Duration::from_micros(mean_us);
            p.latency = Some(match p.latency {
                None => window,
                Some(prev) => prev.mul_f64(1.0 - EWMA_ALPHA) + window.mul_f64(EWMA_ALPHA),
            });
        }
    }
}

/// One ensemble member's last answer.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub address: String,
    pub result: Result<ZooKeeperFigures, String>,
}

/// A shard group's ZooKeeper ensemble as the probes see it.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub zookeeper: Vec<String>,
    inner: Mutex<GroupState>,
}

#[derive(Debug, Clone)]
pub struct GroupState {
    pub health: Health,
    pub members: Vec<MemberStatus>,
    pub last_probe: Option<Instant>,
}

impl Group {
    pub fn new(name: String, zookeeper: Vec<String>) -> Self {
        Self {
            name,
            zookeeper,
            inner: Mutex::new(GroupState {
                health: Health::new(HealthConfig {
                    fall: 2,
                    rise: 2,
                    slow_start: Duration::ZERO,
                }),
                members: Vec::new(),
                last_probe: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A group without an ensemble of its own is taken as healthy.
    pub fn healthy(&self) -> bool {
        self.zookeeper.is_empty() || self.lock().health.state() == State::Up
    }

    pub fn snapshot(&self) -> GroupState {
        self.lock().clone()
    }

    /// Records one round over the members: healthy while a majority answers.
    pub fn record(
        &self,
        config: HealthConfig,
        members: Vec<MemberStatus>,
    ) -> (Option<Transition>, bool) {
        let answering = members.iter().filter(|m| m.result.is_ok()).count();
        let quorum = answering * 2 > members.len();
        let mut g = self.lock();
        g.health.set_config(HealthConfig {
            slow_start: Duration::ZERO,
            ..config
        });
        g.members = members;
        g.last_probe = Some(Instant::now());
        let t = g.health.record(quorum);
        (t, g.health.state() == State::Up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: HealthConfig = HealthConfig {
        fall: 2,
        rise: 1,
        slow_start: Duration::ZERO,
    };

    #[test]
    fn passive_figures_fold_into_averages() {
        let s = NodeState::default();
        for _ in 0..3 {
            s.record_passive(true, Duration::from_millis(10));
        }
        s.record_passive(false, Duration::ZERO);
        s.fold_passive();
        let p = s.snapshot();
        assert!((p.error_rate - EWMA_ALPHA * 0.25).abs() < 1e-9);
        assert_eq!(p.latency, Some(Duration::from_millis(10)));
        // An idle window changes nothing; a clean one decays the error rate.
        s.fold_passive();
        assert!((s.snapshot().error_rate - EWMA_ALPHA * 0.25).abs() < 1e-9);
        s.record_passive(true, Duration::from_millis(20));
        s.fold_passive();
        let p = s.snapshot();
        assert!(p.error_rate < EWMA_ALPHA * 0.25);
        assert_eq!(p.latency, Some(Duration::from_millis(13)));
    }

    #[test]
    fn a_failed_probe_forgets_capabilities_and_keeps_the_last_figures() {
        let s = NodeState::default();
        s.set_capabilities(Some(Capabilities::default()));
        s.record_probe(CONFIG, Ok(NodeFigures::default()));
        let (t, state) = s.record_probe(CONFIG, Err("timeout".into()));
        assert_eq!((t, state), (None, State::Up));
        assert_eq!(s.capabilities(), None);
        let (t, state) = s.record_probe(CONFIG, Err("timeout".into()));
        assert_eq!((t, state), (Some(Transition::WentDown), State::Down));
        let p = s.snapshot();
        assert!(p.figures.is_some());
        assert_eq!(p.last_error.as_deref(), Some("timeout"));
    }

    #[test]
    fn an_ensemble_needs_a_majority() {
        let member = |ok: bool| MemberStatus {
            address: "z:2181".into(),
            result: if ok {
                Ok(ZooKeeperFigures::default())
            } else {
                Err("refused".into())
            },
        };
        let g = Group::new("g".into(), vec!["a:1".into(), "b:1".into(), "c:1".into()]);
        assert!(g.healthy());
        assert_eq!(
            g.record(CONFIG, vec![member(true), member(false), member(true)]),
            (None, true)
        );
        g.record(CONFIG, vec![member(true), member(false), member(false)]);
        assert!(g.healthy(), "one bad round is not enough (fall = 2)");
        let (t, up) = g.record(CONFIG, vec![member(false), member(false), member(true)]);
        assert_eq!((t, up), (Some(Transition::WentDown), false));
        assert!(!g.healthy());
        assert!(Group::new("none".into(), vec![]).healthy());
    }
}
