//! `chgate proxy`: ClickHouse's HTTP interface in front of a cluster, with mapped accounts.
//!
//! - [`server`]: listeners (HTTP, HTTPS), connection tasks, graceful drain.
//! - `handler`: one request, from credentials to the streamed response.
//! - [`state`]: users and clusters, swapped atomically on reload.
//! - [`sql`]: telling reads from writes.
//! - [`body`], [`error`]: what flows back and forth, and the errors the proxy answers itself.

pub mod body;
pub mod error;
mod handler;
pub mod server;
pub mod sql;
pub mod state;

use std::path::PathBuf;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::METRICS;
pub use server::Server;
pub use state::Proxy;

/// Runs the proxy from a config file until SIGTERM or SIGINT, then drains. SIGHUP reloads
/// users and clusters from the same file; a config that fails validation is logged and
/// ignored, the running one stays.
pub async fn run(path: PathBuf, validated: config::Validated) -> anyhow::Result<()> {
    let server = Server::bind(validated).await?;
    let shutdown = CancellationToken::new();

    let proxy = server.proxy();
    let reload_path = path.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match config::load(&reload_path) {
                Ok(v) => {
                    proxy.reload(&v);
                    METRICS.config_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(path = %reload_path.display(), users = v.config.users.len(), "Config reloaded");
                }
                Err(problems) => {
                    METRICS
                        .config_reloads
                        .with_label_values(&["rejected"])
                        .inc();
                    for p in &problems {
                        tracing::error!(path = %reload_path.display(), problem = %p, "Config rejected, keeping the running one");
                    }
                }
            }
        }
    });

    let token = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, draining"),
        }
        token.cancel();
    });

    server.serve(shutdown).await
}
