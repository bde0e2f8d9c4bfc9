//! Process signals, the same for every app: SIGTERM or SIGINT cancel one token (the app
//! stops taking work and drains), SIGHUP asks for a reload.

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT (logged). Listening starts before this
/// returns, so a signal sent right after is not missed.
pub fn shutdown() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, draining"),
            _ = int.recv() => tracing::info!("SIGINT received, draining"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// SIGHUPs, one `recv` per signal.
pub fn reloads() -> anyhow::Result<Signal> {
    signal(SignalKind::hangup()).context("cannot listen for SIGHUP")
}
