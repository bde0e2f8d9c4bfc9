//! The HTTP frontend: ClickHouse's HTTP interface (and HTTPS), in front of the gateway.
//! It keeps only what is HTTP: parsing the request and its credentials, rewriting
//! parameters and headers for the cluster account, sniffing the body for the statement,
//! streaming bodies both ways, and rendering errors as ClickHouse's HTTP errors.
//!
//! - [`server`]: listeners, connection tasks, graceful drain;
//! - `handler`: one request, from credentials to the streamed response;
//! - [`credentials`]: the three ways ClickHouse's HTTP clients log in;
//! - [`routes`]: which handler a request goes to, as ClickHouse dispatches them, and the
//!   ones chgate answers itself (`/`, `/ping`, `/replicas_status`, `OPTIONS`, 404, 501);
//! - [`rewrite`]: the URL and headers as forwarded, and the response's connection headers;
//! - [`sniff`]: the statement, and keeping a small read's body for a retry;
//! - [`body`], [`error`]: what goes back to the client; [`case`]: chgate's own answers with
//!   ClickHouse's header lines; `stall`: frees the node when a client stops reading past its
//!   quota's execution limit.

pub mod body;
pub mod case;
pub mod credentials;
pub mod error;
mod handler;
pub mod rewrite;
pub mod routes;
pub mod server;
pub mod sniff;
mod stall;

use std::sync::Arc;
use std::time::Duration;

use crate::config::ProxyConfig;
use crate::gateway::Gateway;

pub use server::{serve, Listeners};

/// Listener-level settings, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Log one line per request.
    pub access_log: bool,
    pub header_read_timeout: Duration,
    /// How long the body chgate reads before forwarding may take to arrive.
    pub receive_timeout: Duration,
    /// An idle client connection is closed after this long (advertised in `Keep-Alive`).
    pub keep_alive: Duration,
    pub drain_timeout: Duration,
}

impl From<&ProxyConfig> for Settings {
    fn from(c: &ProxyConfig) -> Self {
        Self {
            access_log: c.access_log,
            header_read_timeout: c.header_read_timeout,
            receive_timeout: c.http_receive_timeout,
            keep_alive: c.keep_alive_timeout,
            drain_timeout: c.drain_timeout,
        }
    }
}

/// The HTTP frontend of one gateway.
pub struct Frontend {
    pub gateway: Arc<Gateway>,
    pub settings: Settings,
    /// The header-name case of chgate's own answers (see [`case`]).
    own_case: http::Extensions,
}

impl Frontend {
    pub async fn new(gateway: Arc<Gateway>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            gateway,
            settings,
            own_case: case::learn().await,
        })
    }
}
