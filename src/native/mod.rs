//! The native-protocol frontend: ClickHouse's TCP interface (clickhouse-client, the
//! drivers behind BI tools), with chgate's mapped users in front of the cluster's accounts.
//!
//! A connection logs in with a Hello, which chgate answers itself after it has checked the
//! user and connected to the node the picker chose ([`login`]); from then on every packet of
//! both directions is read at the packet level, the client's Queries whole (checked,
//! rewritten, forwarded), everything else walked to find its end and forwarded as it came
//! ([`relay`]). A connection whose node went away while it was idle moves to another node
//! at its next query, with its session (`USE`, `SET`) carried over ([`upstream`]).
//!
//! - [`login`]: the client's Hello, authentication, the effective revision;
//! - [`upstream`]: a connection to a node: open, Hello, failover, session replay;
//! - [`relay`]: the packets of a logged-in connection, both ways;
//! - [`query`]: one Query: policy, rewrite, accounting;
//! - [`retry`]: a read that may still move to another node, until its result begins;
//! - [`server`]: the listeners, one task per connection, the drain.
//!
//! Every decision about a user or a query is the gateway's; this module only speaks the
//! protocol. The revision both legs speak is at most
//! [`MAX_REVISION`](crate::clickhouse::native::server::MAX_REVISION), so neither side sends
//! chgate something it cannot read.

mod login;
mod query;
mod relay;
mod retry;
mod server;
mod upstream;

pub use server::{serve, Listeners};

use std::sync::Arc;
use std::time::Duration;

use crate::config::ProxyConfig;
use crate::gateway::Gateway;

/// How long a client gets to finish the TLS handshake and send its Hello.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Listener-level settings of the native frontend.
#[derive(Debug, Clone)]
pub struct Settings {
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub max_query_bytes: usize,
    pub drain_timeout: Duration,
    pub access_log: bool,
}

impl From<&ProxyConfig> for Settings {
    fn from(c: &ProxyConfig) -> Self {
        Self {
            idle_timeout: c.native_idle_timeout,
            send_timeout: c.native_send_timeout,
            max_query_bytes: c.native_max_query_bytes,
            drain_timeout: c.drain_timeout,
            access_log: c.access_log,
        }
    }
}

pub struct Frontend {
    pub gateway: Arc<Gateway>,
    pub settings: Settings,
}

impl Frontend {
    pub fn new(gateway: Arc<Gateway>, settings: Settings) -> Self {
        Self { gateway, settings }
    }
}
