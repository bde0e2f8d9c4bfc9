//! Talking to ClickHouse nodes over HTTP: one [`Node`] per endpoint with its keep-alive
//! pool and connection backoff, the request [`Body`] every caller sends, one [`Node::send`]
//! (streamed answers) and [`Node::exchange`] (whole answers) that both retry a stale pooled
//! connection on the same node, SQL for chgate's own use ([`query`]), inserts, and the
//! cluster accounts requests are made as.
//!
//! Nothing here knows about health, weights or clients: the picker decides which node, the
//! gateway what may be sent.

mod account;
mod body;
mod connection;
mod insert;
mod node;
pub mod query;

pub use account::Account;
pub use body::Body;
pub use connection::{SendFailure, Upstream, UpstreamError};
pub use node::{label, Answer, Node};
pub use query::{Dedicated, QueryError};
