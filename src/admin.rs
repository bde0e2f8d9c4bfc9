//! The admin listener: `/metrics`, `/healthz`, `/readyz`. It runs on its own thread and
//! single-threaded runtime so that an overloaded data plane cannot starve health checks
//! and scrapes.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::metrics::METRICS;
use crate::proxy::Proxy;

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
    match req.uri().path() {
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
            "not ready: a cluster has no reachable node\n",
        ),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
