//! The native listeners: one task per accepted connection (TLS handshake, login, relay),
//! and the drain when the proxy shuts down.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{login, relay, Frontend, LOGIN_TIMEOUT};
use crate::metrics::{GaugeGuard, METRICS};
use crate::net::accept;

/// The native frontend's bound listeners.
#[derive(Default)]
pub struct Listeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<(TcpListener, TlsAcceptor)>,
}

impl Listeners {
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn is_empty(&self) -> bool {
        self.plain.is_none() && self.tls.is_none()
    }
}

/// Serves one client connection (TCP, TLS, or an in-memory stream in tests) until it
/// ends. `drain` asks it to close once no query is running.
async fn serve_stream<S>(
    frontend: Arc<Frontend>,
    stream: S,
    peer: SocketAddr,
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _open = GaugeGuard::new(&METRICS.native_open);
    let Some(connection) = login::login(&frontend, stream, peer).await else {
        return;
    };
    relay::run(&frontend, connection, drain).await;
}

/// Serves `listeners` until `shutdown` is cancelled, then drains: the listeners close,
/// idle connections close, and a connection running a query closes when it ends, within
/// the drain timeout.
pub async fn serve(frontend: Arc<Frontend>, listeners: Listeners, shutdown: CancellationToken) {
    if listeners.is_empty() {
        return;
    }
    let tracker = TaskTracker::new();
    let drain = CancellationToken::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(listeners.plain.as_ref()) => {
                if let Some((stream, peer)) = accepted {
                    let (frontend, drain) = (frontend.clone(), drain.clone());
                    tracker.spawn(serve_stream(frontend, stream, peer, drain));
                }
            }
            accepted = accept(listeners.tls.as_ref().map(|(l, _)| l)) => {
                if let (Some((stream, peer)), Some((_, acceptor))) = (accepted, &listeners.tls) {
                    let (frontend, drain, acceptor) = (frontend.clone(), drain.clone(), acceptor.clone());
                    tracker.spawn(async move {
                        match tokio::time::timeout(LOGIN_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => serve_stream(frontend, tls, peer, drain).await,
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "Native TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "Native TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    }
    frontend.gateway.start_draining();
    drop(listeners);
    drain.cancel();
    tracker.close();
    let timeout = frontend.settings.drain_timeout;
    tracing::info!(
        timeout_ms = timeout.as_millis() as u64,
        open = tracker.len(),
        "Draining native connections"
    );
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "Drain timeout reached, closing remaining native connections"
        );
    }
}
