//! Which handler an HTTP request goes to, dispatched the way ClickHouse's own HTTP server
//! does it, and the handlers chgate answers itself.
//!
//! | request | ClickHouse | chgate |
//! |---|---|---|
//! | `GET`/`HEAD /` (no query string) | `Ok.` | the same, locally |
//! | `GET`/`HEAD /ping` | `Ok.` | the same, locally |
//! | `GET`/`HEAD /replicas_status...` | the node's replicated tables | every cluster, from the picker's view |
//! | `GET`/`HEAD /play`, `/dashboard`, `/binary`, `/js/...` (23.x+) | web UIs | passed to a healthy node, no login (they log in through the queries they send back) |
//! | `OPTIONS` | 23.x+: `204` with CORS headers (18.16: `501`) | `204` with the same headers |
//! | any URI with a query string, any `POST` | the query handler (18.16: on any path; 23.x+: on `/` and `/query`) | the query handler, on any path |
//! | anything else with `GET`/`HEAD`/`POST` | `404`, "There is no handle" | the same |
//! | other methods | `501` | the same |

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Uri};

use super::body::RespBody;
use super::case::own;
use crate::gateway::Generation;
use crate::picker::Purpose;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Root,
    Ping,
    ReplicasStatus { verbose: bool },
    WebUi,
    Options,
    Query,
    NotFound,
    NotImplemented,
}

/// The handler for a request, by ClickHouse's rules (see the module docs).
pub fn route_of(method: &Method, uri: &Uri) -> Route {
    let get = matches!(*method, Method::GET | Method::HEAD);
    let path = uri.path();
    let full = uri.path_and_query().map_or(path, |pq| pq.as_str());
    if *method == Method::OPTIONS {
        return Route::Options;
    }
    if get && full == "/" {
        return Route::Root;
    }
    if get && full == "/ping" {
        return Route::Ping;
    }
    if get && path.starts_with("/replicas_status") {
        let verbose = uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "verbose=1"));
        return Route::ReplicasStatus { verbose };
    }
    if get
        && uri.query().is_none()
        && (matches!(path, "/play" | "/dashboard" | "/binary") || path.starts_with("/js/"))
    {
        return Route::WebUi;
    }
    let query = uri.query().is_some() || full.ends_with('?');
    match *method {
        Method::GET | Method::HEAD | Method::POST if query || *method == Method::POST => {
            Route::Query
        }
        Method::GET | Method::HEAD | Method::POST => Route::NotFound,
        _ => Route::NotImplemented,
    }
}

fn text(
    status: StatusCode,
    body: &'static str,
    content_type: Option<&'static str>,
) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    own(resp)
}

/// `GET /` and `GET /ping`: `Ok.`, as ClickHouse answers a client that is not a browser.
pub fn ok() -> Response<RespBody> {
    text(StatusCode::OK, "Ok.\n", Some("text/html; charset=UTF-8"))
}

/// ClickHouse's answer to a path it has no handler for.
pub fn not_found(path: &str) -> Response<RespBody> {
    let path: String = path.chars().take(256).collect();
    let body = format!(
        "There is no handle {path}\n\nUse / or /ping for health checks.\nOr /replicas_status for more sophisticated health checks.\n\nSend queries from your program with POST method or GET /?query=...\n"
    );
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    own(resp)
}

pub fn not_implemented() -> Response<RespBody> {
    text(StatusCode::NOT_IMPLEMENTED, "", None)
}

/// A CORS preflight, answered as ClickHouse 23.11+ does with its shipped configuration.
pub fn options() -> Response<RespBody> {
    let mut resp = text(StatusCode::NO_CONTENT, "", None);
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "origin, x-requested-with, x-clickhouse-format, x-clickhouse-user, x-clickhouse-key, Authorization",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    resp
}

/// `/replicas_status` for chgate as a whole: `200 Ok.` while every cluster has a node that
/// can take reads, `503` otherwise (what a load balancer in front of several gateways needs
/// to know). `verbose=1` lists every replica of every cluster, by cluster, shard and
/// replica number (never by address), with the reason it takes no reads, if any, in
/// ClickHouse's `name:\tstate` line format.
pub fn replicas_status(generation: &Generation, verbose: bool) -> Response<RespBody> {
    let readable = generation.clusters.readable();
    let status = if readable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !verbose && readable {
        return text(status, "Ok.\n", None);
    }
    let mut clusters: Vec<_> = generation.clusters.iter().collect();
    clusters.sort_by(|a, b| a.0.cmp(b.0));
    let mut body = String::new();
    for (name, cluster) in clusters {
        let view = cluster.view();
        for (i, replica) in view.topology.replicas.iter().enumerate() {
            let shard = view.topology.shards[replica.shard].number;
            let state = match view.standings[i].get(Purpose::Read) {
                Ok(_) => "Ok.".to_string(),
                Err(e) => format!("{e}."),
            };
            body.push_str(&format!(
                "{name}.shard{shard}.replica{}:\t{state}\n",
                replica.replica_num
            ));
        }
    }
    let mut resp = Response::new(RespBody::full(body));
    *resp.status_mut() = status;
    own(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: Method, uri: &str) -> Route {
        route_of(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_go_where_clickhouse_sends_them() {
        assert_eq!(of(Method::GET, "/"), Route::Root);
        assert_eq!(of(Method::HEAD, "/"), Route::Root);
        assert_eq!(
            of(Method::GET, "/?"),
            Route::Query,
            "an empty query string is a query"
        );
        assert_eq!(of(Method::GET, "/ping"), Route::Ping);
        assert_eq!(of(Method::GET, "/ping?x=1"), Route::Query);
        assert_eq!(of(Method::POST, "/ping"), Route::Query);
        assert_eq!(
            of(Method::GET, "/replicas_status?verbose=1"),
            Route::ReplicasStatus { verbose: true }
        );
        assert_eq!(
            of(Method::GET, "/replicas_status"),
            Route::ReplicasStatus { verbose: false }
        );
        assert_eq!(of(Method::GET, "/play"), Route::WebUi);
        assert_eq!(of(Method::GET, "/js/uplot.js"), Route::WebUi);
        assert_eq!(of(Method::GET, "/anything?query=SELECT+1"), Route::Query);
        assert_eq!(of(Method::POST, "/anything"), Route::Query);
        assert_eq!(of(Method::GET, "/anything"), Route::NotFound);
        assert_eq!(of(Method::OPTIONS, "/"), Route::Options);
        assert_eq!(of(Method::PUT, "/"), Route::NotImplemented);
        assert_eq!(
            of(Method::DELETE, "/?query=SELECT+1"),
            Route::NotImplemented
        );
    }
}
