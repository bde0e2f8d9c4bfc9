//! One HTTP request, through its stages: authenticate the client, apply its policy, rewrite
//! the request for the cluster account, look at just enough of the body to know what the
//! statement is, then send it to a node (retrying a read elsewhere if the node fails before
//! answering) and stream the answer back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{Exchange, ReqBody, RespBody, UpstreamBody};
use super::error::ClientError;
use super::sql::{classify, StatementKind};
use super::state::{Proxy, User};
use crate::auth::credentials::{decode_component, extract};
use crate::metrics::METRICS;
use crate::picker::{Purpose, View};
use crate::upstream::{Node, SendFailure, Upstream, UpstreamError};

/// Bytes of a request body read at most to find the first keyword of the statement.
const SNIFF_LIMIT: usize = 64 * 1024;

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus `expect`: the
/// proxy answers `100-continue` itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Client credentials, never forwarded.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-clickhouse-user",
    "x-clickhouse-key",
    "x-clickhouse-ssl-certificate-auth",
];

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<RespBody> {
        match req.uri().path() {
            "/" => {}
            "/ping" if matches!(*req.method(), Method::GET | Method::HEAD) => {
                let mut resp = Response::new(RespBody::full("Ok.\n"));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=UTF-8"),
                );
                return resp;
            }
            other => {
                let e = ClientError::UnknownHandler(other.chars().take(128).collect());
                return self.error_response(e, "-");
            }
        }
        let started = Instant::now();
        METRICS.http_in_flight.inc();
        let (user, result) = self.query(req, peer.ip(), started).await;
        match result {
            // The in-flight gauge is decremented by the response body's `Exchange`.
            Ok(resp) => resp,
            Err(e) => {
                METRICS.http_in_flight.dec();
                self.error_response(e, user.as_deref().unwrap_or("-"))
            }
        }
    }

    fn error_response(&self, e: ClientError, user: &str) -> Response<RespBody> {
        let resp = e.to_response();
        METRICS.http_errors.with_label_values(&[e.kind()]).inc();
        METRICS
            .http_requests
            .with_label_values(&[user, resp.status().as_str(), "-"])
            .inc();
        if self.settings.access_log {
            tracing::info!(target: "chgate::access", user = %user, status = resp.status().as_u16(), error = e.kind(), "Request refused");
        }
        resp
    }

    /// Returns the authenticated user's name (for labelling errors) and the response.
    async fn query(
        &self,
        req: Request<Incoming>,
        ip: IpAddr,
        started: Instant,
    ) -> (Option<Arc<str>>, Result<Response<RespBody>, ClientError>) {
        let user = match self.authenticate(&req, ip).await {
            Ok(user) => user,
            Err(e) => {
                discard(&mut req.into_body()).await;
                return (None, Err(e));
            }
        };
        let name = user.name.clone();
        (Some(name), self.forward(req, user, ip, started).await)
    }

    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        ip: IpAddr,
    ) -> Result<Arc<User>, ClientError> {
        let creds = extract(req.headers(), req.uri().query()).map_err(|e| {
            METRICS
                .auth_failures
                .with_label_values(&["bad_credentials"])
                .inc();
            ClientError::BadCredentials(e)
        })?;
        if let Some(delay) = self.throttle.delay(ip) {
            tokio::time::sleep(delay).await;
        }
        // Both failures look the same to the client; only the metric tells them apart.
        let failed = |reason: &str, user: String| {
            self.throttle.failure(ip);
            METRICS.auth_failures.with_label_values(&[reason]).inc();
            Err(ClientError::AuthFailed { user })
        };
        let state = self.state.load();
        let Some(user) = state.users.get(creds.user.as_str()).cloned() else {
            self.verifier.reject_unknown(&creds.password).await;
            return failed("unknown_user", creds.user);
        };
        if !self.verifier.verify(&user.password, &creds.password).await {
            return failed("bad_password", creds.user);
        }
        self.throttle.success(ip);
        if !user.networks.is_empty() && !user.networks.iter().any(|n| n.contains(&ip)) {
            METRICS
                .auth_failures
                .with_label_values(&["network_not_allowed"])
                .inc();
            return Err(ClientError::NetworkNotAllowed {
                user: creds.user,
                ip,
            });
        }
        Ok(user)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        user: Arc<User>,
        ip: IpAddr,
        started: Instant,
    ) -> Result<Response<RespBody>, ClientError> {
        let (parts, mut body) = req.into_parts();
        let rewritten = rewrite_query(parts.uri.query(), &user, &parts.method);
        // Taken by the first attempt; a retry (rare) builds them again.
        let mut headers = Some(upstream_headers(&parts.headers, &user, ip));
        // The body cannot be read by us if it is compressed: by Content-Encoding, or in
        // ClickHouse's own block format (`decompress=1`).
        let opaque = rewritten.decompress || parts.headers.contains_key(header::CONTENT_ENCODING);

        // What is the statement? The `query` parameter comes first; ClickHouse appends the
        // body to it, so the body only matters while the parameter is blank or a comment.
        let mut head = BytesMut::new();
        let mut ended = body.is_end_stream();
        let param = rewritten.query.as_deref().unwrap_or("").as_bytes();
        let mut kind = classify(param, ended);
        // Unknown: compressed, so we could not tell; treated as a write for retries.
        let unknown = kind == StatementKind::Incomplete && opaque;
        if unknown {
            kind = StatementKind::Write;
        }
        while kind == StatementKind::Incomplete {
            ended = read_more(&mut body, &mut head, SNIFF_LIMIT).await?;
            kind = if param.is_empty() {
                classify(&head, ended || head.len() >= SNIFF_LIMIT)
            } else {
                let mut joined = Vec::with_capacity(param.len() + 1 + head.len());
                joined.extend_from_slice(param);
                joined.push(b'\n');
                joined.extend_from_slice(&head);
                classify(&joined, ended || head.len() >= SNIFF_LIMIT)
            };
        }
        // Read-only users: refuse what is not a read. A compressed body we cannot look into
        // still meets the server-side guard (`readonly=1`, or GET's implied readonly).
        if user.readonly && kind == StatementKind::Write && !unknown {
            discard(&mut body).await;
            return Err(ClientError::ReadOnly {
                user: user.name.to_string(),
            });
        }
        // A read small enough to keep is kept whole, so it can be sent again elsewhere.
        let limit = self.settings.max_replay_body_bytes;
        if kind == StatementKind::Read && !ended {
            ended = read_more(&mut body, &mut head, limit).await?;
            while !ended && head.len() < limit {
                ended = read_more(&mut body, &mut head, limit).await?;
            }
        }
        let head = head.freeze();
        user.request_bytes.inc_by(head.len() as u64);
        let mut payload = if ended {
            Payload::Replayable(head)
        } else {
            Payload::Streaming(Some(ReqBody::Stream {
                head: (!head.is_empty()).then_some(head),
                rest: body,
                counted: user.request_bytes.clone(),
            }))
        };

        let uri: Uri = rewritten
            .path_and_query
            .parse()
            .map_err(|_| ClientError::RequestBody("the request URI cannot be forwarded".into()))?;
        let cluster = &user.cluster;
        cluster.budget.deposit();
        let purpose = if kind == StatementKind::Read {
            Purpose::Read
        } else {
            Purpose::Write
        };
        let session = rewritten.session.as_deref().map(str::as_bytes);
        let mut node = {
            let view = cluster.view();
            match first_node(&view, purpose, session) {
                Some(i) => view.topology.nodes[i].clone(),
                None => {
                    return Err(ClientError::NoNodeAvailable {
                        cluster: cluster.name.clone(),
                        tried: 0,
                        why: summary(&view, purpose),
                    })
                }
            }
        };
        // Nodes that failed this request; allocates only on a failover.
        let mut tried: Vec<Arc<Node>> = Vec::new();
        let mut sent = 0usize;
        // A request that never reached a node (it could not connect) comes back whole and
        // goes to the next one, whatever its kind.
        let mut unsent: Option<Request<ReqBody>> = None;
        loop {
            let mut upstream_req = match unsent.take() {
                Some(req) => req,
                None => {
                    let Some(body) = payload.next_body() else {
                        break;
                    };
                    let mut req = Request::new(body);
                    *req.method_mut() = parts.method.clone();
                    *req.uri_mut() = uri.clone();
                    *req.headers_mut() = headers
                        .take()
                        .unwrap_or_else(|| upstream_headers(&parts.headers, &user, ip));
                    req
                }
            };
            upstream_req
                .headers_mut()
                .insert(header::HOST, node.authority.clone());
            node.picks[purpose.index()].inc();
            node.in_flight.inc();
            let attempt_started = Instant::now();
            match send_to(&node, upstream_req).await {
                Ok((resp, upstream)) => {
                    sent += 1;
                    node.mark_up();
                    node.state.record_passive(true, attempt_started.elapsed());
                    return Ok(self.respond(
                        resp,
                        upstream,
                        node,
                        user.clone(),
                        rewritten.query_id,
                        started,
                        sent,
                    ));
                }
                Err(SendFailure {
                    error,
                    unsent: Some(req),
                }) => {
                    node.in_flight.dec();
                    note_failure(&node, &error);
                    unsent = Some(req);
                }
                Err(SendFailure {
                    error,
                    unsent: None,
                }) => {
                    sent += 1;
                    node.in_flight.dec();
                    note_failure(&node, &error);
                    let replayable = matches!(payload, Payload::Replayable(_));
                    if !(kind == StatementKind::Read && replayable) {
                        return Err(ClientError::UpstreamFailed {
                            reason: "connection lost",
                            why: if kind == StatementKind::Read {
                                "had a body too large to keep for a retry"
                            } else {
                                "is not a read, and might have been executed"
                            },
                        });
                    }
                }
            }
            tried.push(node.clone());
            if tried.len() >= self.settings.max_attempts {
                break;
            }
            let next = {
                let view = cluster.view();
                let tried_here: Vec<usize> = (0..view.topology.nodes.len())
                    .filter(|&i| {
                        tried
                            .iter()
                            .any(|t| Arc::ptr_eq(t, &view.topology.nodes[i]))
                    })
                    .collect();
                next_node(&view, purpose, &tried_here).map(|i| view.topology.nodes[i].clone())
            };
            let Some(next) = next else {
                break;
            };
            if !cluster.budget.try_withdraw() {
                METRICS
                    .retry_budget_exhausted
                    .with_label_values(&[&cluster.name])
                    .inc();
                return Err(ClientError::RetryBudgetExhausted {
                    cluster: cluster.name.clone(),
                });
            }
            METRICS.failovers.with_label_values(&[&node.label]).inc();
            node = next;
        }
        Err(ClientError::NoNodeAvailable {
            cluster: cluster.name.clone(),
            tried: tried.len(),
            why: "every node tried failed before answering".into(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        resp: Response<Incoming>,
        upstream: Upstream,
        node: Arc<Node>,
        user: Arc<User>,
        query_id: String,
        started: Instant,
        attempts: usize,
    ) -> Response<RespBody> {
        let (mut parts, inner) = resp.into_parts();
        strip(&mut parts.headers, HOP_BY_HOP);
        // 18.16 does not send the query id back; later versions do. Either way the client
        // gets it.
        if !parts.headers.contains_key("x-clickhouse-query-id") {
            if let Ok(v) = HeaderValue::from_str(&query_id) {
                parts.headers.insert("x-clickhouse-query-id", v);
            }
        }
        METRICS
            .http_requests
            .with_label_values(&[&user.name, parts.status.as_str(), &node.label])
            .inc();
        let exchange = Exchange {
            user,
            node: node.clone(),
            status: parts.status.as_u16(),
            query_id,
            started,
            bytes_out: 0,
            access_log: self.settings.access_log,
            attempts: attempts as u32,
        };
        if inner.is_end_stream() {
            node.checkin(upstream);
            drop(exchange);
            return Response::from_parts(parts, RespBody::full(Bytes::new()));
        }
        Response::from_parts(
            parts,
            RespBody::Upstream(Box::new(UpstreamBody::new(inner, upstream, exchange))),
        )
    }
}

/// Sends on a pooled (or new) connection to `node`. A pooled connection that turns out to
/// have closed before the request left is not the node's fault: the request goes once more
/// on a fresh connection to the same node.
async fn send_to(
    node: &Node,
    req: Request<ReqBody>,
) -> Result<(Response<Incoming>, Upstream), SendFailure> {
    let mut upstream = match node.checkout().await {
        Ok(u) => u,
        Err(error) => return Err(SendFailure::unsent(error, req)),
    };
    let req = match upstream.send(req).await {
        Ok(resp) => return Ok((resp, upstream)),
        Err(SendFailure {
            error: UpstreamError::Stale,
            unsent: Some(req),
        }) => {
            note_failure(node, &UpstreamError::Stale);
            req
        }
        Err(failure) => return Err(failure),
    };
    let mut fresh = match node.connect().await {
        Ok(u) => u,
        Err(error) => return Err(SendFailure::unsent(error, req)),
    };
    let resp = fresh.send(req).await?;
    Ok((resp, fresh))
}

fn note_failure(node: &Node, e: &UpstreamError) {
    METRICS
        .upstream_errors
        .with_label_values(&[&node.label, e.kind()])
        .inc();
    if e.node_at_fault() {
        node.state.record_passive(false, Duration::ZERO);
        node.mark_down(e);
    }
}

/// The first node for a request. A statement that is not a read goes where writes can go;
/// if nowhere can (every ensemble down, say), it goes where reads can, so the client gets
/// ClickHouse's own answer. A read with no eligible node falls back to the least lagging
/// replica.
fn first_node(view: &View, purpose: Purpose, session: Option<&[u8]>) -> Option<usize> {
    let random = [rand::random(), rand::random()];
    view.choose(purpose, session, random)
        .or_else(|| {
            (purpose == Purpose::Write)
                .then(|| view.choose(Purpose::Read, session, random))
                .flatten()
        })
        .or_else(|| view.fallback(Purpose::Read, &[]))
}

/// The next node after `tried` failed.
fn next_node(view: &View, purpose: Purpose, tried: &[usize]) -> Option<usize> {
    view.fallback(purpose, tried).or_else(|| {
        (purpose == Purpose::Write)
            .then(|| view.fallback(Purpose::Read, tried))
            .flatten()
    })
}

/// Why no node can take a request, for the client: counts by reason, no addresses.
fn summary(view: &View, purpose: Purpose) -> String {
    let mut reasons: Vec<(&'static str, usize)> = Vec::new();
    for s in view.standings.iter() {
        let label = match s.get(purpose) {
            Ok(_) => continue,
            Err(e) => e.short(),
        };
        match reasons.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => reasons.push((label, 1)),
        }
    }
    if reasons.is_empty() {
        return "the cluster has no nodes".into();
    }
    let parts: Vec<String> = reasons.iter().map(|(l, n)| format!("{n} {l}")).collect();
    format!("none is healthy ({})", parts.join(", "))
}

/// The request body across attempts: a kept body can be sent any number of times, a
/// streamed one once.
enum Payload {
    Replayable(Bytes),
    Streaming(Option<ReqBody>),
}

impl Payload {
    fn next_body(&mut self) -> Option<ReqBody> {
        match self {
            Payload::Replayable(b) if b.is_empty() => Some(ReqBody::Empty),
            Payload::Replayable(b) => Some(ReqBody::Full(http_body_util::Full::new(b.clone()))),
            Payload::Streaming(body) => body.take(),
        }
    }
}

/// Reads body frames into `buf` until it holds more than it did, the body ends (returns
/// true) or `buf` reaches `limit`.
/// What is read and dropped of a refused request's body, at most.
const DISCARD_LIMIT: usize = 1 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(1);

/// Reads and drops what is left of a refused request's body (up to `DISCARD_LIMIT`
/// bytes or `DISCARD_TIME`): a client still sending it would otherwise have the connection
/// closed under it (seen as "channel closed") instead of reading the answer.
async fn discard(body: &mut Incoming) {
    let mut left = DISCARD_LIMIT;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while left > 0 {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    left = left.saturating_sub(n);
                }
                _ => break,
            }
        }
    })
    .await;
}

async fn read_more(
    body: &mut Incoming,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<bool, ClientError> {
    let before = buf.len();
    while buf.len() == before && buf.len() < limit {
        match body.frame().await {
            None => return Ok(true),
            Some(Err(e)) => return Err(ClientError::RequestBody(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(body.is_end_stream())
}

/// The URL query as forwarded, and what the proxy needs from it.
#[derive(Debug, Default)]
struct Rewritten {
    path_and_query: String,
    /// The decoded `query` parameter.
    query: Option<String>,
    query_id: String,
    /// The client's own session id (before namespacing), for stickiness.
    session: Option<String>,
    decompress: bool,
}

/// Drops the client's credentials (and, for read-only users, any `readonly` it sent),
/// namespaces `session_id` by user, makes sure there is a `query_id`, and adds `readonly=1`
/// for read-only users' POSTs. Every other parameter is forwarded byte for byte.
fn rewrite_query(query: Option<&str>, user: &User, method: &Method) -> Rewritten {
    let mut out = Rewritten {
        path_and_query: String::with_capacity(query.map_or(0, str::len) + 64),
        ..Default::default()
    };
    out.path_and_query.push_str("/?");
    let push_raw = |out: &mut Rewritten, raw: &str| {
        if out.path_and_query.len() > 2 {
            out.path_and_query.push('&');
        }
        out.path_and_query.push_str(raw);
    };
    for raw in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = raw.split_once('=').unwrap_or((raw, ""));
        let name = decode_component(raw_name);
        match name.as_ref() {
            "user" | "password" => continue,
            "readonly" if user.readonly => continue,
            "query" => out.query = Some(decode_component(raw_value).into_owned()),
            "query_id" => {
                out.query_id = decode_component(raw_value).into_owned();
                if out.query_id.is_empty() {
                    continue;
                }
            }
            "decompress" => out.decompress = raw_value != "0" && !raw_value.is_empty(),
            "session_id" => {
                let session = decode_component(raw_value).into_owned();
                let namespaced = format!("{}/{}", user.name, session);
                let encoded: String =
                    form_urlencoded::byte_serialize(namespaced.as_bytes()).collect();
                push_raw(&mut out, &format!("session_id={encoded}"));
                out.session = Some(session);
                continue;
            }
            _ => {}
        }
        push_raw(&mut out, raw);
    }
    if out.query_id.is_empty() {
        out.query_id = uuid::Uuid::new_v4().to_string();
        let id = out.query_id.clone();
        push_raw(&mut out, &format!("query_id={id}"));
    }
    // GET already implies readonly on the server, and ClickHouse refuses to change it there.
    if user.readonly && method != Method::GET && method != Method::HEAD {
        push_raw(
            &mut out,
            if user.upstream_readonly == 2 {
                "readonly=2"
            } else {
                "readonly=1"
            },
        );
    }
    out
}

fn strip(headers: &mut HeaderMap, names: &[&str]) {
    // Connection may name further hop-by-hop headers.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in names {
        headers.remove(*name);
    }
}

fn upstream_headers(client: &HeaderMap, user: &User, ip: IpAddr) -> HeaderMap {
    let mut h = client.clone();
    strip(&mut h, HOP_BY_HOP);
    strip(&mut h, CREDENTIAL_HEADERS);
    h.remove(header::HOST);
    h.insert(header::AUTHORIZATION, user.account.authorization.clone());
    let forwarded = match client.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.insert("x-forwarded-for", v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::state::tests::test_user;

    #[test]
    fn rewrite_strips_credentials_and_namespaces_sessions() {
        let user = test_user("bi", true);
        let r = rewrite_query(
            Some(
                "user=bi&password=se%26cret&query=SELECT+1&readonly=0&session_id=s+1&max_threads=2",
            ),
            &user,
            &Method::POST,
        );
        let pq = &r.path_and_query;
        assert!(!pq.contains("password") && !pq.contains("user=bi"), "{pq}");
        assert!(!pq.contains("readonly=0"), "{pq}");
        assert!(
            pq.contains("query=SELECT+1&"),
            "raw parameters are kept: {pq}"
        );
        assert!(pq.contains("session_id=bi%2Fs+1"), "{pq}");
        assert!(pq.contains("max_threads=2"));
        assert!(pq.ends_with("&readonly=1"), "{pq}");
        assert_eq!(r.query.as_deref(), Some("SELECT 1"));
        assert_eq!(r.session.as_deref(), Some("s 1"));
        assert_eq!(r.query_id.len(), 36, "a query id is generated");
        assert!(pq.contains(&format!("query_id={}", r.query_id)));
    }

    #[test]
    fn rewrite_keeps_client_query_id_and_leaves_get_readonly_to_the_server() {
        let user = test_user("bi", true);
        let r = rewrite_query(Some("query_id=mine&query=SELECT+1"), &user, &Method::GET);
        assert_eq!(r.query_id, "mine");
        assert_eq!(r.path_and_query, "/?query_id=mine&query=SELECT+1");
        let rw = test_user("etl", false);
        let r = rewrite_query(Some("readonly=2&decompress=1"), &rw, &Method::POST);
        assert!(r
            .path_and_query
            .starts_with("/?readonly=2&decompress=1&query_id="));
        assert!(r.decompress);
    }

    #[test]
    fn headers_swap_credentials() {
        let user = test_user("bi", false);
        let mut client = HeaderMap::new();
        client.insert("authorization", HeaderValue::from_static("Basic Ymk6cA=="));
        client.insert("x-clickhouse-key", HeaderValue::from_static("p"));
        client.insert("x-clickhouse-format", HeaderValue::from_static("JSON"));
        client.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        client.insert("x-secret", HeaderValue::from_static("1"));
        client.insert("host", HeaderValue::from_static("proxy:8123"));
        let h = upstream_headers(&client, &user, "10.0.0.9".parse().unwrap());
        assert_eq!(h["authorization"], user.account.authorization);
        assert!(h.get("x-clickhouse-key").is_none());
        assert!(
            h.get("x-secret").is_none(),
            "headers named by Connection are dropped"
        );
        assert!(h.get("host").is_none());
        assert_eq!(h["x-clickhouse-format"], "JSON");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
    }
}
