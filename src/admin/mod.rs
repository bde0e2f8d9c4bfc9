//! The admin listener both apps serve: `/metrics`, `/healthz`, `/readyz`, the picker's
//! `/v1/pick` and `/v1/topology` over the app's clusters, and (the proxy) `/v1/config`. It runs on its own thread and
//! single-threaded runtime so that an overloaded data plane cannot starve health checks,
//! scrapes and picks. What it shows comes from an [`AdminSource`]: the proxy's gateway, or
//! the ingest sidecar's own picker.
//!
//! With `admin.token_env`/`token_file` set, every path but `/healthz` and `/readyz` (which
//! kubelets and load balancers probe without credentials, and which reveal nothing)
//! needs `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use ring::hmac;

use crate::metrics::METRICS;
use crate::picker::Clusters;
use crate::secret::Secret;

/// What an app shows on its admin listener.
pub trait AdminSource: Send + Sync + 'static {
    /// The clusters the pick API and the topology answer from (the current generation).
    fn clusters(&self) -> Arc<Clusters>;
    /// `Ok` when the app is ready for traffic; otherwise why not, for `/readyz`.
    fn readiness(&self) -> Result<(), &'static str>;
    /// The bearer token every path but `/healthz` and `/readyz` needs, if one is set.
    fn token(&self) -> Option<Secret>;
    /// The running config's version, source and last refused change, for `/v1/config`.
    fn config_status(&self) -> Option<serde_json::Value> {
        None
    }
    /// The nodes' published `remote_servers`, for `/v1/topology` (configured vs published).
    fn publication(&self) -> Option<crate::picker::removal::Publication> {
        None
    }
}

/// Binds the admin listener (before any runtime serves it: [`spawn`] takes it over).
pub fn bind(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context as _;
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on admin.listen {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `listener` on a thread of its own until `stop` is cancelled.
pub fn spawn(
    listener: std::net::TcpListener,
    source: Arc<dyn AdminSource>,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("chgate-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "Admin listener unusable");
                        return;
                    }
                };
                loop {
                    let (stream, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = listener.accept() => match r {
                            Ok(pair) => pair,
                            Err(e) => {
                                tracing::warn!(error = %e, "Admin accept failed");
                                continue;
                            }
                        },
                    };
                    let source = source.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let source = source.clone();
                            async move { Ok::<_, Infallible>(route(&*source, &req)) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        })?;
    Ok(thread)
}

fn route(source: &dyn AdminSource, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    if !matches!(path, "/healthz" | "/readyz") {
        if let Some(token) = source.token() {
            if !bearer_matches(req, &token) {
                let mut resp = text(
                    StatusCode::UNAUTHORIZED,
                    "this admin listener needs Authorization: Bearer <token>\n",
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"chgate-admin\""),
                );
                return resp;
            }
        }
    }
    match path {
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(METRICS.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match source.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => {
                let mut resp = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                resp
            }
        },
        "/v1/pick" => {
            let (status, body) = crate::picker::api::pick(&source.clusters(), req.uri().query());
            json(status, &body)
        }
        "/v1/topology" => json(
            StatusCode::OK,
            &crate::picker::api::topology(&source.clusters(), source.publication().as_ref()),
        ),
        "/v1/config" => match source.config_status() {
            Some(status) => json(StatusCode::OK, &status),
            None => text(StatusCode::NOT_FOUND, "this app has no config status\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /v1/pick, /v1/topology, /v1/config\n",
        ),
    }
}

/// Compares the presented bearer token with the configured one in constant time (as HMACs
/// under a per-process key, so neither length nor content leaks through timing).
fn bearer_matches(req: &Request<Incoming>, token: &Secret) -> bool {
    static KEY: LazyLock<hmac::Key> = LazyLock::new(|| {
        let rng = ring::rand::SystemRandom::new();
        hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the system RNG works")
    });
    let Some(presented) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let expected = hmac::sign(&KEY, token.expose().as_bytes());
    hmac::verify(&KEY, presented.trim().as_bytes(), expected.as_ref()).is_ok()
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
