//! Listeners and connections. Every client connection is one task watched by a graceful
//! shutdown: on cancel, accept loops stop, idle keep-alive connections close, and in-flight
//! requests get `drain_timeout` to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Proxy;
use crate::admin;
use crate::config::Validated;

/// How long a client gets to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    proxy: Arc<Proxy>,
    http: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    admin: Option<std::net::TcpListener>,
    drain_timeout: Duration,
    header_read_timeout: Duration,
}

impl Server {
    /// Binds every listener of the config. Nothing is served until [`Server::serve`].
    pub async fn bind(v: Validated) -> anyhow::Result<Self> {
        let c = &v.config;
        let http = match c.proxy.http_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on proxy.http_listen {addr}"))?,
            ),
            None => None,
        };
        let tls = match (&c.proxy.tls, &v.tls) {
            (Some(t), Some(server_config)) => {
                let l = TcpListener::bind(t.listen)
                    .await
                    .with_context(|| format!("cannot listen on proxy.tls.listen {}", t.listen))?;
                Some((l, TlsAcceptor::from(server_config.clone())))
            }
            _ => None,
        };
        let admin = match c.admin.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on admin.listen {addr}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        Ok(Self {
            proxy: Arc::new(Proxy::new(&v)),
            http,
            tls,
            admin,
            drain_timeout: c.proxy.drain_timeout,
            header_read_timeout: c.proxy.header_read_timeout,
        })
    }

    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then drains.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for (kind, addr) in [
            ("http", self.http_addr()),
            ("https", self.https_addr()),
            ("admin", self.admin_addr()),
        ] {
            if let Some(addr) = addr {
                tracing::info!(kind, %addr, "Listening");
            }
        }
        // The admin listener outlives the drain so /readyz can say "draining".
        let admin_stop = CancellationToken::new();
        let admin_thread = match self.admin {
            Some(l) => Some(admin::spawn(l, self.proxy.clone(), admin_stop.clone())?),
            None => None,
        };

        let graceful = GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(true);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = accept(self.http.as_ref()) => {
                    if let Some((stream, peer)) = accepted {
                        serve_connection(&graceful, &builder, &self.proxy, stream, peer);
                    }
                }
                accepted = accept(self.tls.as_ref().map(|(l, _)| l)) => {
                    if let (Some((stream, peer)), Some((_, acceptor))) = (accepted, &self.tls) {
                        let acceptor = acceptor.clone();
                        let proxy = self.proxy.clone();
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let conn = builder.serve_connection(TokioIo::new(tls), service(proxy, peer));
                                    if let Err(e) = watcher.watch(conn).await {
                                        tracing::debug!(%peer, error = %e, "Client connection ended with an error");
                                    }
                                }
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        }

        self.proxy.start_draining();
        drop(self.http);
        drop(self.tls);
        tracing::info!(
            timeout_ms = self.drain_timeout.as_millis() as u64,
            "Draining connections"
        );
        tokio::select! {
            _ = graceful.shutdown() => tracing::info!("All connections drained"),
            _ = tokio::time::sleep(self.drain_timeout) => {
                tracing::warn!("Drain timeout reached, closing remaining connections");
            }
        }
        admin_stop.cancel();
        if let Some(t) = admin_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }
}

fn service(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<super::body::RespBody>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer).await) }
    })
}

fn serve_connection<S>(
    graceful: &GracefulShutdown,
    builder: &http1::Builder,
    proxy: &Arc<Proxy>,
    stream: S,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(stream), service(proxy.clone(), peer));
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "Client connection ended with an error");
        }
    });
}

/// Accepts one connection, or waits forever if there is no listener. Accept errors (e.g.
/// out of file descriptors) are logged and paced instead of spinning.
async fn accept(listener: Option<&TcpListener>) -> Option<(TcpStream, SocketAddr)> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            tracing::warn!(error = %e, "Accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
