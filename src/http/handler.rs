//! One HTTP request, through its stages: read the client's credentials and have the gateway
//! log it in, rewrite the request for the cluster account, look at just enough of the body
//! to know what the statement is, let the gateway apply policy, admit and route it (with
//! failover), and stream the answer back. Everything here is HTTP; every decision is the
//! gateway's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;

use super::body::{Exchange, RespBody, Unanswered, UpstreamBody};
use super::case;
use super::credentials::extract;
use super::error::HttpError;
use super::rewrite;
use super::routes::{self, Route};
use super::sniff;
use super::Frontend;
use crate::gateway::route::{self, Attempt, Plan, Routed};
use crate::gateway::{admission, kill_query as kill, policy, Admission, GatewayError, User};
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::Backend;
use crate::upstream::{Upstream, UpstreamError};

/// A web UI page is read whole within this long, up to this size.
const WEB_UI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const WEB_UI_MAX_BYTES: usize = 16 << 20;

impl Frontend {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<RespBody> {
        let version = req.version();
        let mut keep_alive = rewrite::wants_keep_alive(version, req.headers());
        let route = routes::route_of(req.method(), req.uri());
        let mut resp = match route {
            Route::Query => self.query_request(req, peer).await,
            Route::Root | Route::Ping => routes::ok(),
            Route::ReplicasStatus { verbose } => {
                routes::replicas_status(&self.gateway.generation(), verbose)
            }
            Route::WebUi => self.web_ui(req, peer.ip()).await,
            Route::Options => routes::options(),
            Route::NotFound => routes::not_found(req.uri().path()),
            Route::NotImplemented => routes::not_implemented(),
        };
        if version == http::Version::HTTP_10 {
            // An HTTP/1.0 answer of unknown length ends when the connection does; said as
            // an HTTP/1.0 answer, hyper then adds nothing to its `Connection`.
            *resp.version_mut() = http::Version::HTTP_10;
            if resp.body().size_hint().exact().is_none() {
                keep_alive = false;
            }
        }
        if resp.extensions().get::<case::Own>().is_some() {
            let connection = rewrite::own_connection_headers(
                resp.status(),
                keep_alive,
                self.settings.keep_alive,
            );
            case::finish(&mut resp, &self.own_case, connection);
        } else {
            rewrite::connection_headers(resp.headers_mut(), keep_alive, self.settings.keep_alive);
        }
        resp
    }

    async fn query_request(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
        let started = Instant::now();
        // Held by the response's `Exchange` until it has streamed, or dropped with an error.
        let in_flight = GaugeGuard::new(&METRICS.http_in_flight);
        let mut unanswered = Unanswered::new(started, self.settings.access_log);
        let resp = match self.query(req, peer.ip(), &mut unanswered, in_flight).await {
            Ok(resp) => resp,
            Err(e) => self.error_response(e, unanswered.user.as_deref().unwrap_or("-"), peer.ip()),
        };
        unanswered.answered();
        resp
    }

    /// The web UIs of ClickHouse 23.x+ (`/play`, `/dashboard`, `/binary`, `/js/...`): static
    /// pages, served by any healthy node without a login (the pages log in through the
    /// queries they send back, to chgate); 18.16 answers 404. No credential goes upstream.
    async fn web_ui(&self, req: Request<Incoming>, client: IpAddr) -> Response<RespBody> {
        let generation = self.gateway.generation();
        let Some(cluster) = generation
            .clusters
            .values()
            .min_by(|a, b| a.name.cmp(&b.name))
        else {
            return routes::not_found(req.uri().path());
        };
        let (parts, _) = req.into_parts();
        let headers = rewrite::forwardable(&parts.headers, |n| {
            rewrite::credential(n) || n == header::COOKIE
        });
        let plan = Plan {
            cluster,
            statement: crate::gateway::Statement::Read,
            session: None,
            replayable: true,
            max_attempts: self.gateway.settings.max_attempts(),
            execution_limit: None,
        };
        let request = || {
            let mut req = Request::new(crate::upstream::Body::Empty);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = Uri::from(parts.uri.path().parse::<http::uri::PathAndQuery>().ok()?);
            *req.headers_mut() = headers.clone();
            Some(req)
        };
        let routed = match route::route(plan, request, route::send_http, |_, _| {}).await {
            Ok(r) => r,
            Err(e) => return self.error_response(HttpError::from(e), "-", client),
        };
        let (resp, mut upstream) = routed.answer;
        let (mut parts, body) = resp.into_parts();
        // Pages and scripts of a few hundred KiB: read whole, with a bound.
        let body = match tokio::time::timeout(WEB_UI_TIMEOUT, upstream.read_body(body)).await {
            Ok(Ok(b)) if b.len() <= WEB_UI_MAX_BYTES => b,
            _ => {
                let e = GatewayError::UpstreamFailed {
                    reason: "reading the page failed",
                    why: "is a page, not a query",
                };
                return self.error_response(HttpError::from(e), "-", client);
            }
        };
        routed.backend.node.checkin(upstream);
        rewrite::strip_response(&mut parts.headers);
        parts.headers.remove(header::TRANSFER_ENCODING);
        Response::from_parts(parts, RespBody::full(body))
    }

    /// The answer to a request chgate refused or could not serve, counted and logged with
    /// the client's address (a refused login has no user to name it by).
    fn error_response(&self, e: HttpError, user: &str, client: IpAddr) -> Response<RespBody> {
        let resp = e.to_response();
        METRICS.http_errors.with_label_values(&[e.kind()]).inc();
        METRICS
            .http_requests
            .with_label_values(&[user, resp.status().as_str(), "-"])
            .inc();
        if self.settings.access_log {
            tracing::info!(target: "chgate::access", user = %user, %client, status = resp.status().as_u16(), error = e.kind(), "Request refused");
        }
        resp
    }

    /// The response, or the error; `unanswered` learns the user once authenticated (for
    /// labelling the request however it ends).
    async fn query(
        &self,
        req: Request<Incoming>,
        ip: IpAddr,
        unanswered: &mut Unanswered,
        in_flight: GaugeGuard,
    ) -> Result<Response<RespBody>, HttpError> {
        let user = match self.authenticate(&req, ip).await {
            Ok(user) => user,
            Err(e) => {
                sniff::discard(&mut req.into_body()).await;
                return Err(e);
            }
        };
        unanswered.user = Some(user.name.clone());
        self.forward(req, user, ip, unanswered, in_flight).await
    }

    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        ip: IpAddr,
    ) -> Result<Arc<User>, HttpError> {
        let creds = extract(req.headers(), req.uri().query())
            .map_err(|e| self.gateway.bad_credentials(e.to_string()))?;
        Ok(self.gateway.authenticate(&creds, ip).await?)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        user: Arc<User>,
        ip: IpAddr,
        unanswered: &mut Unanswered,
        in_flight: GaugeGuard,
    ) -> Result<Response<RespBody>, HttpError> {
        let started = unanswered.started;
        let (parts, mut body) = req.into_parts();
        let execution_limit = user
            .quota
            .as_ref()
            .and_then(|q| q.config().max_execution_time);
        let mut rewritten =
            rewrite::query(parts.uri.query(), &user, &parts.method, execution_limit);
        if let Some(refusal) = refuse_as_sent(&rewritten, &parts.headers, &user) {
            sniff::discard(&mut body).await;
            return Err(HttpError::BadRequest(refusal));
        }
        // Kept by `unanswered` (for the access log, however the request ends), lent from there.
        unanswered.query_id = Some(std::mem::take(&mut rewritten.query_id));
        // The body cannot be read by us if it is compressed: by Content-Encoding, or in
        // ClickHouse's own block format (`decompress=1`).
        let opaque = rewritten.decompress || parts.headers.contains_key(header::CONTENT_ENCODING);
        let receive = self.settings.receive_timeout;
        let sniffed =
            sniff::statement(&mut body, rewritten.query.as_deref(), opaque, receive).await?;
        if let Err(e) = policy::allows(&user, sniffed.statement) {
            sniff::discard(&mut body).await;
            return Err(e.into());
        }
        let admission = match admission::admit(&user).await {
            Ok(a) => a,
            Err(e) => {
                sniff::discard(&mut body).await;
                return Err(e.into());
            }
        };
        let held = Held {
            admission: Some(admission),
            orphan: std::sync::Mutex::new(None),
        };
        let admission = held.admission.as_ref().expect("just set");
        let statement = sniffed.statement;
        let mut payload = sniffed
            .payload(
                body,
                self.gateway.settings.max_replay_body_bytes,
                receive,
                &user.traffic.request_bytes,
            )
            .await?;
        let mut path_and_query = std::mem::take(&mut rewritten.path_and_query);
        if statement.is_read() && !rewritten.load_balancing {
            avoid_down_replicas(&mut path_and_query, &user.cluster);
        }
        let uri: Uri = path_and_query
            .parse()
            .map_err(|_| HttpError::RequestBody("the request URI cannot be forwarded".into()))?;
        let plan = Plan {
            cluster: &user.cluster,
            statement,
            session: rewritten.session.as_deref().map(str::as_bytes),
            replayable: payload.replayable(),
            max_attempts: self.gateway.settings.max_attempts(),
            execution_limit: admission.execution_limit().map(|l| (l, &*user.name)),
        };
        // Taken by the first attempt; a retry (rare) builds them again.
        let mut headers = Some(rewrite::headers(&parts.headers, &user, ip));
        let request = || {
            let body = payload.next_body()?;
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers
                .take()
                .unwrap_or_else(|| rewrite::headers(&parts.headers, &user, ip));
            Some(req)
        };
        let query_id = unanswered.query_id.as_deref().unwrap_or_default();
        // An error answer to a read that may move is read whole, to see whether another
        // node might answer it (see `route::Attempt::Declined`).
        let movable = plan.movable();
        let routed = route::route(
            plan,
            request,
            |backend, req| send_query(backend, req, movable),
            |backend, cancel| {
                if let Some(how) = cancel {
                    kill(backend, &user, query_id, how);
                } else if let Ok(mut orphan) = held.orphan.lock() {
                    *orphan = Some((backend.clone(), query_id.to_owned()));
                }
            },
        )
        .await?;
        let query_id = unanswered.query_id.take().unwrap_or_default();
        let compressed = rewritten.compress;
        let admission = held.take();
        Ok(self.respond(routed, admission, query_id, started, in_flight, compressed))
    }

    fn respond(
        &self,
        routed: Routed<Answer>,
        admission: Admission,
        query_id: String,
        started: Instant,
        http_in_flight: GaugeGuard,
        compressed: bool,
    ) -> Response<RespBody> {
        let Routed {
            answer,
            backend,
            attempts,
            in_flight: node_in_flight,
        } = routed;
        let (mut parts, inner, upstream) = match answer {
            Answer::Streamed(resp, upstream) => {
                let (parts, inner) = resp.into_parts();
                (parts, Ok(inner), upstream)
            }
            Answer::Whole(parts, text, upstream) => (parts, Err(text), upstream),
        };
        rewrite::strip_response(&mut parts.headers);
        // 18.16 does not send the query id back; later versions do. Either way the client
        // gets it.
        if !parts.headers.contains_key("x-clickhouse-query-id") {
            if let Ok(v) = HeaderValue::from_str(&query_id) {
                parts.headers.insert("x-clickhouse-query-id", v);
            }
        }
        let limited = admission.execution_limit().is_some() || admission.result_limit().is_some();
        if limited {
            // A body a quota may cut ends early: its length is not known in advance.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let encoded = compressed || parts.headers.contains_key(header::CONTENT_ENCODING);
        let mut exchange = Exchange {
            admission,
            backend: backend.clone(),
            status: parts.status,
            query_id,
            started,
            bytes_out: 0,
            access_log: self.settings.access_log,
            attempts: attempts as u32,
            node_in_flight,
            http_in_flight,
            done: false,
        };
        let inner = match inner {
            Ok(inner) if !inner.is_end_stream() => inner,
            whole => {
                let text = whole.err().unwrap_or_default();
                backend.node.checkin(upstream);
                exchange.bytes_out = text.len() as u64;
                exchange.finish(true);
                return Response::from_parts(parts, RespBody::full(text));
            }
        };
        Response::from_parts(
            parts,
            RespBody::Upstream(Box::new(UpstreamBody::new(
                inner, upstream, exchange, encoded,
            ))),
        )
    }
}

/// A node's answer to a query: streamed on as it comes, or (an error answer to a read,
/// read to find its code) whole.
pub(super) enum Answer {
    Streamed(Response<Incoming>, Upstream),
    Whole(http::response::Parts, Bytes, Upstream),
}

/// An error answer is read whole within this long (ClickHouse writes its exception text
/// at once).
const ERROR_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One attempt of a query on a node. With `movable` (a read that may go to another node),
/// an error answer is read whole, and declined if its code says the node could not reach
/// a node the query needed.
async fn send_query(
    backend: Arc<Backend>,
    req: Request<crate::upstream::Body>,
    movable: bool,
) -> Attempt<Answer, Request<crate::upstream::Body>> {
    let (resp, mut upstream) = match route::send_http(backend, req).await {
        Attempt::Answered(answer) => answer,
        Attempt::Declined((resp, upstream)) => {
            return Attempt::Declined(Answer::Streamed(resp, upstream))
        }
        Attempt::Unsent(req, e) => return Attempt::Unsent(req, e),
        Attempt::Lost(e) => return Attempt::Lost(e),
    };
    if !movable || resp.status() != http::StatusCode::INTERNAL_SERVER_ERROR {
        return Attempt::Answered(Answer::Streamed(resp, upstream));
    }
    let (parts, body) = resp.into_parts();
    let text = match tokio::time::timeout(ERROR_BODY_TIMEOUT, upstream.read_body(body)).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => return Attempt::Lost(UpstreamError::Body(e)),
        Err(_) => return Attempt::Lost(UpstreamError::Timeout(ERROR_BODY_TIMEOUT)),
    };
    let head = String::from_utf8_lossy(&text[..text.len().min(512)]);
    let code = crate::clickhouse::codes::from_answer(&parts.headers, &head);
    let answer = Answer::Whole(parts, text, upstream);
    if code.is_some_and(crate::clickhouse::codes::is_fan_out_error) {
        Attempt::Declined(answer)
    } else {
        Attempt::Answered(answer)
    }
}

/// Puts `load_balancing=in_order` first in a read's URI while
/// [`route::steer_in_order`] says so. First: settings after a `readonly=1` could not be
/// changed.
fn avoid_down_replicas(path_and_query: &mut String, cluster: &crate::picker::Cluster) {
    if route::steer_in_order(cluster) {
        path_and_query.insert_str(2, "load_balancing=in_order&");
    }
}

/// A request that cannot go on as sent: a parameter chgate decides on given twice (the
/// server would run another statement than the one checked), or a read-only user's
/// `multipart/form-data` body (its form fields become settings the server applies after
/// the `readonly` chgate adds, a `readonly=0` among them on 18.16).
fn refuse_as_sent(
    rewritten: &rewrite::Rewritten,
    headers: &http::HeaderMap,
    user: &User,
) -> Option<String> {
    if let Some(name) = rewritten.ambiguous {
        return Some(format!(
            "The parameter {name} is given more than once; give it once"
        ));
    }
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..19)
                .is_some_and(|t| t.eq_ignore_ascii_case("multipart/form-data"))
        });
    (user.readonly && multipart).then(|| {
        format!(
            "{}: multipart/form-data bodies (form fields, external tables) are not accepted for read-only users",
            user.name
        )
    })
}

/// A request's admission while it is routed. A write given up with its query still
/// running on a node (its client went away) leaves the admission to
/// [`crate::gateway::hold_until_done`], so its concurrency slot stays taken while the
/// node runs it.
struct Held {
    admission: Option<Admission>,
    /// The node and query id of a write left running (rare: its query id is copied then).
    orphan: std::sync::Mutex<Option<(Arc<Backend>, String)>>,
}

impl Held {
    /// The admission, for the answer.
    fn take(mut self) -> Admission {
        self.admission.take().expect("taken once")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let orphan = self.orphan.get_mut().ok().and_then(Option::take);
        if let (Some(admission), Some((backend, query_id))) = (self.admission.take(), orphan) {
            crate::gateway::hold_until_done(backend, query_id, admission);
        }
    }
}
