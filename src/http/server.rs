//! The HTTP and HTTPS listeners' connections. Every client connection is one task watched
//! by a graceful shutdown: on cancel, accept loops stop, idle keep-alive connections close,
//! and in-flight requests get `drain_timeout` to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::RespBody;
use super::Frontend;
use crate::net::accept;
use crate::wake::SelfWaking;

/// How long a client gets to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The frontend's bound listeners.
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub tls: Option<(TcpListener, TlsAcceptor)>,
}

impl Listeners {
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

impl Frontend {
    fn builder(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        // hyper runs one timer from the moment a connection waits for its next request until
        // that request's head is read: it is both the idle timeout and the head's.
        let idle = self
            .settings
            .keep_alive
            .min(self.settings.header_read_timeout);
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(idle)
            .preserve_header_case(true)
            .keep_alive(true);
        builder
    }

    /// Serves one client connection (TCP, TLS, or an in-memory stream in tests) until it
    /// ends.
    pub async fn serve_stream<S>(self: Arc<Self>, stream: S, peer: SocketAddr) -> hyper::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self
            .builder()
            .serve_connection(TokioIo::new(stream), service(self.clone(), peer));
        SelfWaking::new(conn).await
    }
}

/// Serves `listeners` until `shutdown` is cancelled, then drains: the gateway starts
/// draining (readiness says so), the listeners close, and connections get the drain
/// timeout to finish.
pub async fn serve(frontend: Arc<Frontend>, listeners: Listeners, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let builder = frontend.builder();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(listeners.http.as_ref()) => {
                if let Some((stream, peer)) = accepted {
                    let conn = builder.serve_connection(TokioIo::new(stream), service(frontend.clone(), peer));
                    // The connection wakes itself while it runs (a request body read for
                    // the handler waiting on it): another pass, not a reschedule that wakes
                    // an idle worker (see crate::wake).
                    let conn = SelfWaking::new(graceful.watch(conn));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %e, "Client connection ended with an error");
                        }
                    });
                }
            }
            accepted = accept(listeners.tls.as_ref().map(|(l, _)| l)) => {
                if let (Some((stream, peer)), Some((_, acceptor))) = (accepted, &listeners.tls) {
                    serve_tls(&frontend, &builder, &graceful, acceptor.clone(), stream, peer);
                }
            }
        }
    }
    frontend.gateway.start_draining();
    drop(listeners);
    let drain_timeout = frontend.settings.drain_timeout;
    tracing::info!(
        timeout_ms = drain_timeout.as_millis() as u64,
        "Draining connections"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("All connections drained"),
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("Drain timeout reached, closing remaining connections");
        }
    }
}

fn serve_tls(
    frontend: &Arc<Frontend>,
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let frontend = frontend.clone();
    let builder = builder.clone();
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let conn = builder.serve_connection(TokioIo::new(tls), service(frontend, peer));
                if let Err(e) = SelfWaking::new(watcher.watch(conn)).await {
                    tracing::debug!(%peer, error = %e, "Client connection ended with an error");
                }
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    });
}

fn service(
    frontend: Arc<Frontend>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<RespBody>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req| {
        let frontend = frontend.clone();
        async move { Ok::<_, std::convert::Infallible>(frontend.handle(req, peer).await) }
    })
}
