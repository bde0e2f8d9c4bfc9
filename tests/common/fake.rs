//! A fake ClickHouse node for tests that need a node to misbehave on cue: an HTTP server
//! on port 0 (hyper) that answers the picker's probes like a healthy idle node and every
//! other request as the test's handler says: an answer (optionally slow), a cut body, a
//! connection closed without an answer, or no answer at all. It records what it was sent.
//! No stack needed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request the fake was sent (probes aside).
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which connection it came on (counted from 0 per fake).
    pub conn: usize,
    /// Which request it was on that connection (from 0).
    pub nth_on_conn: usize,
    pub method: String,
    pub uri: String,
    /// The decoded `query` parameter.
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// A URL parameter's decoded value.
    pub fn param(&self, name: &str) -> Option<String> {
        let q = self.uri.split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// What the fake does with a request.
pub enum Reply {
    /// Status and body (after `delay`).
    Answer {
        status: u16,
        body: String,
        delay: Duration,
    },
    /// Headers promising `promised` bytes, `sent` of them, then the connection closes.
    CutBody { sent: String, promised: usize },
    /// The connection closes without an answer (the request was read).
    Close,
    /// No answer, ever (until the client gives up).
    Hang,
}

impl Reply {
    pub fn ok(body: impl Into<String>) -> Self {
        Reply::Answer {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn error(status: u16, body: impl Into<String>) -> Self {
        Reply::Answer {
            status,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

struct State {
    handler: Box<Handler>,
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    /// Probes hang instead of answering (the node looks down to the picker).
    probes_hang: AtomicBool,
    /// What `version()` gives the picker's capabilities query.
    version: Mutex<String>,
}

pub struct FakeClickHouse {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl FakeClickHouse {
    /// Starts a fake on 127.0.0.1, port 0, answering requests with `handler`.
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            handler: Box::new(handler),
            seen: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            probes_hang: AtomicBool::new(false),
            version: Mutex::new("24.8.4.13".into()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, state.clone(), stop.clone()));
        Self { addr, state, stop }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What it was sent, probes aside.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far (probes' included).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The server version the picker is told (24.8.4.13 unless set), for capabilities it
    /// asks from now on.
    pub fn set_version(&self, version: &str) {
        *self.state.version.lock().unwrap() = version.into();
    }

    /// From now on the picker's probes get no answer.
    pub fn hang_probes(&self) {
        self.state.probes_hang.store(true, Ordering::SeqCst);
    }

    /// Stops listening and drops every connection: the node refuses connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeClickHouse {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A port nothing listens on (bound, then closed): connections to it are refused.
pub async fn refused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        let conn = state.connections.fetch_add(1, Ordering::SeqCst);
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let nth = Arc::new(AtomicUsize::new(0));
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (state, nth) = (state.clone(), nth.clone());
                async move { serve(&state, conn, &nth, req).await }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = served => {}
            }
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(status: u16, text: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp
}

/// What the picker asks of a node, answered as by a healthy idle one of `version`.
fn probe_answer(uri: &str, query: &str, version: &str) -> Option<String> {
    if uri.starts_with("/ping") {
        return Some("Ok.\n".into());
    }
    if query.contains("FROM system.tables WHERE database = 'system'") {
        return Some(format!("version={version}\n"));
    }
    if query.contains("FROM system.processes") {
        return Some("0\t0\t0\t0\t0\t0\t0\t0\t\\N\n".into());
    }
    None
}

async fn serve(
    state: &State,
    conn: usize,
    nth: &AtomicUsize,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let uri = parts.uri.to_string();
    let query = parts
        .uri
        .query()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "query")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let version = state.version.lock().unwrap().clone();
    if let Some(answer) = probe_answer(&uri, &query, &version) {
        if state.probes_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        return Ok(full(200, answer));
    }
    let seen = Seen {
        conn,
        nth_on_conn: nth.fetch_add(1, Ordering::SeqCst),
        method: parts.method.to_string(),
        uri,
        query,
        headers: parts.headers,
        body,
    };
    let reply = (state.handler)(&seen);
    state.seen.lock().unwrap().push(seen);
    match reply {
        Reply::Answer {
            status,
            body,
            delay,
        } => {
            tokio::time::sleep(delay).await;
            Ok(full(status, body))
        }
        Reply::CutBody { sent, promised } => {
            // The part goes out (and is flushed) before the connection is cut.
            let frames = futures_util::stream::unfold(Some(sent), |sent| async move {
                match sent {
                    Some(s) => Some((Ok(Frame::data(Bytes::from(s))), None)),
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Err(std::io::Error::other("cut")), None))
                    }
                }
            });
            let mut resp = Response::new(StreamBody::new(frames).boxed());
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, promised.into());
            Ok(resp)
        }
        // A service error makes hyper close the connection without answering.
        Reply::Close => Err(std::io::Error::other("closing without an answer")),
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// A config for a cluster of fake nodes (one shard, `ports` its replicas on 127.0.0.1),
/// with users `bi` (read-only) and `etl`, listening on port 0; the cluster account's
/// password is in a file of its own. `extra` is appended.
pub fn config(ports: &[u16], extra: &str) -> String {
    let secret = super::tempfile_path("fake-secret");
    std::fs::write(&secret, "fake-password\n").unwrap();
    let replicas: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ host = \"127.0.0.1\", http_port = {p} }}"))
        .collect();
    format!(
        r#"
[proxy]
http_listen = "127.0.0.1:0"
access_log = false
[admin]
listen = "127.0.0.1:0"
[upstream]
connect_timeout = "500ms"
[picker]
probe_interval = "200ms"
probe_retry_interval = "100ms"
probe_timeout = "150ms"
slow_start = "0s"
[[clusters.fake.shards]]
replicas = [{replicas}]
[clusters.fake.accounts.chgate]
user = "chgate"
password_file = "{secret}"
[users.bi]
password_hash = "{bi}"
cluster = "fake"
account = "chgate"
readonly = true
[users.etl]
password_hash = "{etl}"
cluster = "fake"
account = "chgate"
{extra}
"#,
        replicas = replicas.join(", "),
        secret = secret.display(),
        bi = super::hash("bi-pass"),
        etl = super::hash("etl-pass"),
    )
}
