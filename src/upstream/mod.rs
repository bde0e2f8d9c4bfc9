//! The ClickHouse side: clusters, their nodes, and connections to them.
//!
//! A [`Node`] owns a small pool of idle HTTP/1.1 connections and a passive health state (a
//! node that refuses connections is skipped for a backoff period). A [`Cluster`] orders its
//! nodes for one request. The health-weighted picker will replace this ordering; the
//! connection handling stays.

mod cluster;
mod node;

pub use cluster::{Account, Cluster};
pub use node::{Node, SendFailure, Upstream, UpstreamError};
