//! Talking to ClickHouse nodes: connection pools per node and the cluster accounts.

mod account;
mod node;

pub use account::Account;
pub use node::{Node, SendFailure, Upstream, UpstreamError};
