//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the picker's `/v1/pick` and
//! `/v1/topology`. It runs on its own thread and single-threaded runtime so that an
//! overloaded data plane cannot starve health checks, scrapes and picks.
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
use crate::proxy::Proxy;
use crate::secret::Secret;

pub fn spawn(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
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
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let proxy = proxy.clone();
                            async move { Ok::<_, Infallible>(route(&proxy, &req)) }
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

fn route(proxy: &Proxy, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    let state = proxy.state.load();
    if !matches!(path, "/healthz" | "/readyz") {
        if let Some(token) = &state.admin_token {
            if !bearer_matches(req, token) {
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
        "/readyz" if proxy.draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if !proxy.ready() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: a cluster has no node that can take reads\n",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/v1/pick" => {
            let (status, body) = crate::picker::api::pick(&state.clusters, req.uri().query());
            json(status, &body)
        }
        "/v1/topology" => json(
            StatusCode::OK,
            &crate::picker::api::topology(&state.clusters),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /v1/pick, /v1/topology\n",
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
