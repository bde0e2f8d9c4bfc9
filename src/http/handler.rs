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
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;

use super::body::{Exchange, RespBody, UpstreamBody};
use super::credentials::extract;
use super::error::HttpError;
use super::rewrite::{self, HOP_BY_HOP};
use super::sniff;
use super::Frontend;
use crate::gateway::route::{self, Plan, Routed};
use crate::gateway::{admission, policy, Admission, User};
use crate::metrics::{GaugeGuard, METRICS};
use crate::upstream::Upstream;

impl Frontend {
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
                let e = HttpError::UnknownHandler(other.chars().take(128).collect());
                return self.error_response(e, "-");
            }
        }
        let started = Instant::now();
        // Held by the response's `Exchange` until it has streamed, or dropped with an error.
        let in_flight = GaugeGuard::new(&METRICS.http_in_flight);
        match self.query(req, peer.ip(), started, in_flight).await {
            Ok(resp) => resp,
            Err((e, user)) => self.error_response(e, user.as_deref().unwrap_or("-")),
        }
    }

    fn error_response(&self, e: HttpError, user: &str) -> Response<RespBody> {
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

    /// The response, or the error with the authenticated user's name (for labelling it).
    async fn query(
        &self,
        req: Request<Incoming>,
        ip: IpAddr,
        started: Instant,
        in_flight: GaugeGuard,
    ) -> Result<Response<RespBody>, (HttpError, Option<Arc<str>>)> {
        let user = match self.authenticate(&req, ip).await {
            Ok(user) => user,
            Err(e) => {
                sniff::discard(&mut req.into_body()).await;
                return Err((e, None));
            }
        };
        let name = user.name.clone();
        self.forward(req, user, ip, started, in_flight)
            .await
            .map_err(|e| (e, Some(name)))
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
        started: Instant,
        in_flight: GaugeGuard,
    ) -> Result<Response<RespBody>, HttpError> {
        let (parts, mut body) = req.into_parts();
        let rewritten = rewrite::query(parts.uri.query(), &user, &parts.method);
        // The body cannot be read by us if it is compressed: by Content-Encoding, or in
        // ClickHouse's own block format (`decompress=1`).
        let opaque = rewritten.decompress || parts.headers.contains_key(header::CONTENT_ENCODING);
        let sniffed = sniff::statement(&mut body, rewritten.query.as_deref(), opaque).await?;
        if let Err(e) = policy::allows(&user, sniffed.statement) {
            sniff::discard(&mut body).await;
            return Err(e.into());
        }
        let admission = admission::admit(&user)?;
        let statement = sniffed.statement;
        let mut payload = sniffed
            .payload(
                body,
                self.gateway.settings.max_replay_body_bytes,
                &user.traffic.request_bytes,
            )
            .await?;
        let uri: Uri = rewritten
            .path_and_query
            .parse()
            .map_err(|_| HttpError::RequestBody("the request URI cannot be forwarded".into()))?;
        let plan = Plan {
            cluster: &user.cluster,
            statement,
            session: rewritten.session.as_deref().map(str::as_bytes),
            replayable: payload.replayable(),
            max_attempts: self.gateway.settings.max_attempts,
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
        let routed = route::route(plan, request, route::send_http).await?;
        Ok(self.respond(routed, admission, rewritten.query_id, started, in_flight))
    }

    fn respond(
        &self,
        routed: Routed<(Response<Incoming>, Upstream)>,
        admission: Admission,
        query_id: String,
        started: Instant,
        http_in_flight: GaugeGuard,
    ) -> Response<RespBody> {
        let Routed {
            answer: (resp, upstream),
            backend,
            attempts,
            in_flight: node_in_flight,
        } = routed;
        let (mut parts, inner) = resp.into_parts();
        rewrite::strip(&mut parts.headers, HOP_BY_HOP);
        // 18.16 does not send the query id back; later versions do. Either way the client
        // gets it.
        if !parts.headers.contains_key("x-clickhouse-query-id") {
            if let Ok(v) = HeaderValue::from_str(&query_id) {
                parts.headers.insert("x-clickhouse-query-id", v);
            }
        }
        METRICS
            .http_requests
            .with_label_values(&[
                &admission.user().name,
                parts.status.as_str(),
                backend.label(),
            ])
            .inc();
        let exchange = Exchange {
            admission,
            backend: backend.clone(),
            status: parts.status.as_u16(),
            query_id,
            started,
            bytes_out: 0,
            access_log: self.settings.access_log,
            attempts: attempts as u32,
            node_in_flight,
            http_in_flight,
        };
        if inner.is_end_stream() {
            backend.node.checkin(upstream);
            drop(exchange);
            return Response::from_parts(parts, RespBody::full(Bytes::new()));
        }
        Response::from_parts(
            parts,
            RespBody::Upstream(Box::new(UpstreamBody::new(inner, upstream, exchange))),
        )
    }
}
