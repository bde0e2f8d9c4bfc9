//! A node as the picker tracks it: the connection side (`upstream::Node`: its pool and its
//! connection backoff) beside what the probes and real traffic say about it.
//!
//! Callers that send to a backend report back through [`Backend::answered`] and
//! [`Backend::failed`], so the picker's passive figures and the node's backoff move
//! together and in one place.

use std::time::Duration;

use prometheus::IntCounter;

use super::purpose::Purpose;
use super::state::NodeState;
use crate::metrics::METRICS;
use crate::upstream::{Node, UpstreamError};

pub struct Backend {
    /// Held inline, not behind another pointer: a pick reads the load of two candidates,
    /// and one more dependent load each was measurable with a thousand nodes.
    pub node: Node,
    /// Probe results, health and passive figures.
    pub state: NodeState,
    /// Picks by purpose (read, write): the proxy's and the pick API's.
    picks: [IntCounter; 2],
}

impl Backend {
    pub fn new(node: Node) -> Self {
        let label = node.label.as_str();
        Self {
            picks: [
                METRICS.picks.with_label_values(&[label, "read"]),
                METRICS.picks.with_label_values(&[label, "write"]),
            ],
            state: NodeState::default(),
            node,
        }
    }

    pub fn label(&self) -> &str {
        &self.node.label
    }

    /// Counts a pick of this backend for `purpose`.
    pub fn picked(&self, purpose: Purpose) {
        self.picks[purpose.index()].inc();
    }

    /// A request sent here was answered (its head came back) after `latency`.
    pub fn answered(&self, latency: Duration) {
        self.node.recovered();
        self.state.record_passive(true, latency);
    }

    /// A request sent here failed. Counted by kind; a failure that is the node's (not a
    /// stale pooled connection) also counts against its passive figures and backs it off.
    pub fn failed(&self, error: &UpstreamError) {
        self.node.count_error(error);
        if error.node_at_fault() {
            self.state.record_passive(false, Duration::ZERO);
            self.node.back_off(error);
        }
    }
}
