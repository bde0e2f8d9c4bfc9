//! `chgate proxy`: the gateway behind its frontends (the HTTP interface and the native
//! protocol), the admin listener, config reload on SIGHUP and drain on SIGTERM. The wiring
//! of the app: every decision about a query is the gateway's, every byte of a protocol its
//! frontend's.

mod keeper;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSource};
use crate::config::source::{self, Reloader, Started, Tracker};
use crate::config::{self, Validated};
use crate::gateway::Gateway;
use crate::http::{self, Listeners};
use crate::native;
use crate::picker::removal::Publication;
use crate::picker::Clusters;
use crate::secret::Secret;

/// What the proxy's admin listener shows: the gateway's clusters and readiness, and the
/// config's status.
struct Admin {
    gateway: Arc<Gateway>,
    token: ArcSwapOption<Secret>,
    config: ArcSwapOption<Tracker>,
    /// What the keeper knows of the nodes' published `remote_servers` (ZooKeeper only).
    publication: Arc<ArcSwapOption<Publication>>,
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

    fn config_status(&self) -> Option<serde_json::Value> {
        let tracker = self.config.load_full()?;
        serde_json::to_value(tracker.status()).ok()
    }

    fn publication(&self) -> Option<Publication> {
        self.publication.load_full().map(|p| (*p).clone())
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
                config: ArcSwapOption::empty(),
                publication: Arc::new(ArcSwapOption::empty()),
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

    /// Swaps in a newly validated config: users, clusters, the admin token; and loads the
    /// listeners' TLS certificates again if their files changed.
    pub fn reloader(&self) -> impl Fn(&Validated) + Send + 'static {
        let (gateway, admin) = (self.gateway.clone(), self.admin.clone());
        move |v| {
            gateway.reload(v);
            admin.token.store(v.admin_token.clone().map(Arc::new));
            crate::tls::reload_changed();
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

/// Runs the proxy until SIGTERM or SIGINT, then drains. The config's later changes come
/// from its source: SIGHUP reloads a file; a ZooKeeper root is watched (and this instance
/// joins its fleet). Either way an invalid change is logged and refused, and the running
/// config stays. TLS certificates are loaded again when their files change.
pub async fn run(path: PathBuf, started: Started) -> anyhow::Result<()> {
    let Started {
        validated,
        tracker,
        watch,
    } = started;
    let running = validated.config.clone();
    let server = Server::bind(validated).await?;
    server.admin.config.store(Some(tracker.clone()));
    let shutdown = crate::signals::shutdown()?;
    // The keeper reads the running clusters' config; the reload swaps it with the rest.
    let configs = Arc::new(ArcSwap::from_pointee(running.clusters.clone()));
    let apply = {
        let (apply, configs) = (server.reloader(), configs.clone());
        move |v: &Validated| {
            apply(v);
            configs.store(Arc::new(v.config.clusters.clone()));
        }
    };
    let reloader = Arc::new(Reloader::new(apply, tracker.clone(), &running));
    let stop = CancellationToken::new();
    tracker.spawn_stale_gauge(stop.clone());
    spawn_certificate_watch(stop.clone());
    let mut watching = None;
    // SIGHUP is always handled (its default would end the process, and `systemctl reload`
    // sends it): a file is loaded again; with ZooKeeper, which is watched anyway, the TLS
    // certificates are looked at again and the bootstrap file is checked for changes only
    // a restart applies.
    let mut hup = crate::signals::reloads()?;
    match watch {
        Some(watch) => {
            let fleet = server.gateway.fleet.clone();
            let id = member_id(&server);
            spawn_keeper(
                &server,
                &watch,
                configs,
                tracker.clone(),
                id.clone(),
                stop.clone(),
            );
            let (reloader, stop) = (reloader.clone(), stop.clone());
            watching = Some(tokio::spawn(async move {
                source::watch(watch, reloader, |n| fleet.set_members(n), id, stop).await;
            }));
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let renewed = crate::tls::reload_changed();
                    tracing::info!(renewed_certificates = renewed, "SIGHUP: the config comes from ZooKeeper and follows it; TLS certificates looked at again");
                    source::report_bootstrap_changes(&path, &running);
                }
            });
        }
        None => {
            crate::metrics::METRICS.fleet_members.set(1);
            for (cluster, ..) in config::remote_servers::published(&running.clusters) {
                tracing::warn!(cluster = %cluster, "remote_servers is published to the nodes by `chgate config push` to a ZooKeeper root; with a config file it is not published, and failed replicas are not taken out");
            }
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    reloader.offer(config::load(&path), 0);
                }
            });
        }
    }
    // Leave the fleet as the drain begins: the others take over this one's share.
    let drain = shutdown.clone();
    let leave = stop.clone();
    tokio::spawn(async move {
        drain.cancelled().await;
        leave.cancel();
    });
    let served = server.serve(shutdown).await;
    stop.cancel();
    if let Some(w) = watching {
        // It leaves the fleet as it ends; give it the moment that takes.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), w).await;
    }
    served
}

/// Starts the cluster keeper (see [`keeper`]): with a ZooKeeper source, the elected
/// instance keeps the nodes' published `remote_servers` true.
fn spawn_keeper(
    server: &Server,
    watch: &source::Watch,
    configs: Arc<ArcSwap<std::collections::BTreeMap<String, config::ClusterConfig>>>,
    tracker: Arc<Tracker>,
    id: String,
    stop: CancellationToken,
) {
    let gateway = server.gateway.clone();
    let inputs = keeper::Inputs {
        source: watch.source().clone(),
        base: watch.base().to_path_buf(),
        configs,
        picker: Box::new(move || gateway.generation().clusters.clone()),
        tracker,
        id,
    };
    // The admin listener shows the keeper's latest round.
    tokio::spawn(keeper::run(inputs, server.admin.publication.clone(), stop));
}

/// How often the TLS listeners' certificate files are looked at for a renewal.
const CERTIFICATE_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Reloads the TLS listeners' certificates when their files change, until `stop`.
fn spawn_certificate_watch(stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CERTIFICATE_CHECK) => {}
                _ = stop.cancelled() => return,
            }
            let _ = tokio::task::spawn_blocking(crate::tls::reload_changed).await;
        }
    });
}

/// This instance's name in the fleet: host, listener and pid, unique while it runs.
fn member_id(server: &Server) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let addr = server
        .http_addr()
        .or(server.native_addr())
        .map_or_else(|| "-".into(), |a| a.to_string());
    format!("{host}_{addr}_{}", std::process::id()).replace('/', "_")
}
