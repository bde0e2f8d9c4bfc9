//! `chgate proxy`: the gateway behind its frontends (the HTTP interface and the native
//! protocol), the admin listener, config reload on SIGHUP and drain on SIGTERM. The wiring
//! of the app: every decision about a query is the gateway's, every byte of a protocol its
//! frontend's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSource};
use crate::config::{self, Validated};
use crate::gateway::Gateway;
use crate::http::{self, Listeners};
use crate::metrics::METRICS;
use crate::native;
use crate::picker::Clusters;
use crate::secret::Secret;

/// What the proxy's admin listener shows: the gateway's clusters and readiness.
struct Admin {
    gateway: Arc<Gateway>,
    token: ArcSwapOption<Secret>,
}

impl AdminSource for Admin {
    fn clusters(&self) -> Arc<Clusters> {
        self.gateway.generation().clusters.clone()
    }

    fn readiness(&self) -> Result<(), &'static str> {
        self.gateway.ready()
    }

    fn token(&self) -> Option<Secret> {
        self.token.load_full().map(|t| (*t).clone())
    }
}

/// The proxy with its listeners bound; nothing is served until [`Server::serve`].
pub struct Server {
    gateway: Arc<Gateway>,
    admin: Arc<Admin>,
    frontend: Arc<http::Frontend>,
    listeners: Listeners,
    native: Arc<native::Frontend>,
    native_listeners: native::Listeners,
    admin_listener: Option<std::net::TcpListener>,
}

impl Server {
    /// Binds every listener of the config.
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
        let native_plain = match c.proxy.native_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on proxy.native_listen {addr}"))?,
            ),
            None => None,
        };
        let native_tls = match (&c.proxy.native_tls, &v.native_tls) {
            (Some(t), Some(server_config)) => {
                let l = TcpListener::bind(t.listen).await.with_context(|| {
                    format!("cannot listen on proxy.native_tls.listen {}", t.listen)
                })?;
                Some((l, TlsAcceptor::from(server_config.clone())))
            }
            _ => None,
        };
        let admin_listener = match c.admin.listen {
            Some(addr) => Some(admin::bind(addr)?),
            None => None,
        };
        let gateway = Arc::new(Gateway::new(&v));
        Ok(Self {
            admin: Arc::new(Admin {
                gateway: gateway.clone(),
                token: ArcSwapOption::from(v.admin_token.clone().map(Arc::new)),
            }),
            frontend: http::Frontend::new(gateway.clone(), http::Settings::from(&c.proxy)).await,
            native: Arc::new(native::Frontend::new(
                gateway.clone(),
                native::Settings::from(&c.proxy),
            )),
            gateway,
            listeners: Listeners { http, tls },
            native_listeners: native::Listeners {
                plain: native_plain,
                tls: native_tls,
            },
            admin_listener,
        })
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// The HTTP frontend, to serve connections of a test's own (in-memory streams).
    pub fn frontend(&self) -> Arc<http::Frontend> {
        self.frontend.clone()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listeners.http_addr()
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.listeners.https_addr()
    }

    pub fn native_addr(&self) -> Option<SocketAddr> {
        self.native_listeners.plain_addr()
    }

    pub fn native_tls_addr(&self) -> Option<SocketAddr> {
        self.native_listeners.tls_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Swaps in a newly validated config: users, clusters, the admin token.
    pub fn reloader(&self) -> impl Fn(&Validated) + Send + 'static {
        let (gateway, admin) = (self.gateway.clone(), self.admin.clone());
        move |v| {
            gateway.reload(v);
            admin.token.store(v.admin_token.clone().map(Arc::new));
        }
    }

    /// Serves until `shutdown` is cancelled, then drains.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for (kind, addr) in [
            ("http", self.http_addr()),
            ("https", self.https_addr()),
            ("native", self.native_addr()),
            ("native_tls", self.native_tls_addr()),
            ("admin", self.admin_addr()),
        ] {
            if let Some(addr) = addr {
                tracing::info!(kind, %addr, "Listening");
            }
        }
        // The admin listener outlives the drain so /readyz can say "draining".
        let admin_stop = CancellationToken::new();
        let admin_thread = match self.admin_listener {
            Some(l) => Some(admin::spawn(l, self.admin.clone(), admin_stop.clone())?),
            None => None,
        };
        // Both frontends drain at once; the gateway says "draining" from the start of it.
        let native = native::serve(self.native, self.native_listeners, shutdown.clone());
        tokio::join!(http::serve(self.frontend, self.listeners, shutdown), native);
        admin_stop.cancel();
        if let Some(t) = admin_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        Ok(())
    }
}

/// Runs the proxy from a config file until SIGTERM or SIGINT, then drains. SIGHUP reloads
/// users and clusters from the same file; a config that fails validation is logged and
/// ignored, the running one stays.
pub async fn run(path: PathBuf, validated: config::Validated) -> anyhow::Result<()> {
    let server = Server::bind(validated).await?;
    let shutdown = crate::signals::shutdown()?;
    let reload = server.reloader();
    let mut hup = crate::signals::reloads()?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match config::load(&path) {
                Ok(v) => {
                    reload(&v);
                    METRICS.config_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(path = %path.display(), users = v.config.users.len(), "Config reloaded");
                }
                Err(problems) => {
                    METRICS
                        .config_reloads
                        .with_label_values(&["rejected"])
                        .inc();
                    for p in &problems {
                        tracing::error!(path = %path.display(), problem = %p, "Config rejected, keeping the running one");
                    }
                }
            }
        }
    });
    server.serve(shutdown).await
}
