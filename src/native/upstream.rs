//! A native connection to a node: opened on the node the gateway picks, logged in with the
//! user's cluster account, and, when a connection moves to another node, given the
//! session it had (`USE`, then every successful `SET` again).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::query::Refusal;
use crate::clickhouse::codes;
use crate::clickhouse::native::client::{self, ClientInfo, Hello, Query, Setting};
use crate::clickhouse::native::server::{HelloAnswer, Kind, ServerHello, ServerPackets, Session};
use crate::clickhouse::native::tail::Tail;
use crate::clickhouse::native::WalkError;
use crate::gateway::route::connection_node;
use crate::gateway::{GatewayError, User};
use crate::picker::{Backend, Purpose};
use crate::upstream::UpstreamError;

/// Server error codes that say the node refused chgate's cluster account: a config
/// problem to log, not something to show the client (it would name the account).
const ACCOUNT_REFUSED: [i32; 4] = [192, 193, 194, 516];

/// The most bytes a node's Hello (or a replayed statement's answer) may take.
const MAX_HANDSHAKE: usize = 1 << 20;

/// How long a node may take to answer chgate's Hello, or a replayed statement: a healthy
/// node takes milliseconds; a hung one (SIGSTOPped: its kernel still accepts the
/// connection) never answers, and is given up after this to try the next.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A logged-in connection to a node.
pub struct Upstream {
    pub io: TcpStream,
    /// Bytes received and not yet handled.
    pub buf: BytesMut,
    /// How many bytes at the start of `buf` were already sent on to the client.
    pub forwarded: usize,
    /// `buf`'s length when its first packet was last found incomplete (0: not waiting).
    pub incomplete_at: usize,
    pub packets: ServerPackets,
    /// The rest of a packet whose end was known before it was all here, passed on as it
    /// comes (its bytes before `buf` went to the client and were let go).
    pub tail: Option<Tail>,
    pub backend: Arc<Backend>,
    pub hello: ServerHello,
}

impl Upstream {
    /// Part of a packet went to the client and not the rest: nothing else can be told it
    /// before that packet's end.
    pub fn mid_packet(&self) -> bool {
        self.forwarded > 0 || self.tail.is_some()
    }
}

/// What a connection to a node is opened for.
pub struct Target<'a> {
    pub user: &'a User,
    /// The client's Hello: its name and version go on to the node.
    pub client: &'a Hello,
    /// The revision chgate speaks with the node.
    pub revision: u64,
    pub database: &'a str,
    pub purpose: Purpose,
    /// Nodes tried at most.
    pub max_attempts: usize,
    /// For a connection that moves: the node must have this timezone and speak at least
    /// `revision` (what the client was told must stay true).
    pub same_as: Option<&'a ServerHello>,
    /// Nodes not to use (a moving read's): they count against `max_attempts`, and any
    /// other node is a failover, paid from the retry budget.
    pub avoid: &'a [Arc<Backend>],
}

impl Target<'_> {
    fn eligible(&self, hello: &ServerHello) -> bool {
        match self.same_as {
            None => true,
            Some(told) => hello.timezone == told.timezone && hello.revision >= self.revision,
        }
    }
}

/// Why a node could not be used.
enum OpenError {
    /// The node failed (counted against its health).
    Node(UpstreamError),
    /// The node refused the login for a reason that is the client's (an unknown
    /// database): every node would.
    Refused { code: i32, message: String },
    /// The node cannot be used for this connection, through no fault of its own.
    Skip(&'static str),
}

/// A connection on the best node for `target`, failing over to the next ones within the
/// cluster's attempts and retry budget.
pub async fn connect(target: &Target<'_>) -> Result<Upstream, Refusal> {
    let cluster = &target.user.cluster;
    let max_attempts = target.max_attempts.max(1);
    let mut tried: Vec<Arc<Backend>> = target.avoid.to_vec();
    let mut why = "every node tried failed";
    while tried.len() < max_attempts {
        let Some(backend) = connection_node(cluster, target.purpose, &tried)? else {
            break;
        };
        match open(&backend, target).await {
            Ok(upstream) => return Ok(upstream),
            Err(OpenError::Node(e)) => {
                tracing::warn!(node = backend.label(), error = %e, "Native connection to a node failed");
                backend.failed(&e);
            }
            Err(OpenError::Refused { code, message }) => {
                return Err(Refusal::Server { code, message })
            }
            Err(OpenError::Skip(reason)) => {
                tracing::debug!(
                    node = backend.label(),
                    reason,
                    "Node skipped for a native connection"
                );
                why = reason;
            }
        }
        tried.push(backend);
    }
    Err(Refusal::Gateway(GatewayError::NoNodeAvailable {
        cluster: cluster.name.clone(),
        tried: tried.len(),
        why: why.into(),
    }))
}

/// Opens a connection to `backend` and logs in, within [`HANDSHAKE_TIMEOUT`] of the
/// connection being made.
async fn open(backend: &Arc<Backend>, target: &Target<'_>) -> Result<Upstream, OpenError> {
    let mut io = backend
        .node
        .connect_native()
        .await
        .map_err(OpenError::Node)?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, log_in(&mut io, backend, target)).await {
        Ok(Ok((buf, hello))) => Ok(Upstream {
            io,
            buf,
            forwarded: 0,
            incomplete_at: 0,
            packets: ServerPackets::default(),
            tail: None,
            backend: backend.clone(),
            hello,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Node(UpstreamError::Timeout(HANDSHAKE_TIMEOUT))),
    }
}

/// Chgate's Hello with the user's cluster account, and the node's answer: the bytes read
/// past it, and its Hello.
async fn log_in(
    io: &mut TcpStream,
    backend: &Arc<Backend>,
    target: &Target<'_>,
) -> Result<(BytesMut, ServerHello), OpenError> {
    let account = &target.user.account;
    let hello = Hello {
        client_name: target.client.client_name.clone(),
        major: target.client.major,
        minor: target.client.minor,
        revision: target.revision,
        database: target.database.to_string(),
        user: account.user.clone(),
        password: account.password.expose().to_string(),
    };
    let mut out = Vec::with_capacity(128);
    hello.write(&mut out);
    let io_error = |e| OpenError::Node(UpstreamError::Io(e));
    io.write_all(&out).await.map_err(io_error)?;
    let mut buf = BytesMut::with_capacity(4096);
    let (answer, len) = loop {
        match ServerHello::read(&buf, target.revision) {
            Ok(done) => break done,
            Err(WalkError::Incomplete) if buf.len() < MAX_HANDSHAKE => {
                if io.read_buf(&mut buf).await.map_err(io_error)? == 0 {
                    return Err(io_error(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            Err(e) => {
                return Err(OpenError::Node(UpstreamError::Protocol(format!(
                    "its Hello: {e}"
                ))))
            }
        }
    };
    let _ = buf.split_to(len);
    let hello = match answer {
        HelloAnswer::Hello(hello) => hello,
        HelloAnswer::Refused { code, message } if ACCOUNT_REFUSED.contains(&code) => {
            tracing::error!(node = backend.label(), account = %account.user, code, %message, "A node refused chgate's cluster account: check the account's password");
            return Err(OpenError::Node(UpstreamError::Protocol(format!(
                "the node refused the cluster account (code {code})"
            ))));
        }
        HelloAnswer::Refused { code, message } => return Err(OpenError::Refused { code, message }),
    };
    if !target.eligible(&hello) {
        return Err(OpenError::Skip(
            "no other node has the timezone and protocol revision the client was given",
        ));
    }
    Ok((buf, hello))
}

/// A Query of chgate's own on behalf of the client (a replayed `SET`), as the client's
/// would look: the client's name and version, the user's quota key, the user's `readonly`.
pub fn own_query<'a>(
    client: &'a Hello,
    user: &'a User,
    revision: u64,
    readonly: &'a [u8],
    text: &'a [u8],
) -> Query<'a> {
    let mut settings = Vec::new();
    if user.readonly {
        settings.push(Setting {
            name: "readonly",
            value: readonly,
        });
    }
    Query {
        query_id: b"",
        info: Some(ClientInfo::initial_tcp(
            client.client_name.as_bytes(),
            (client.major, client.minor),
            revision,
            user.name.as_bytes(),
        )),
        settings,
        stage: 2,
        compression: false,
        text,
    }
}

impl Upstream {
    /// Runs `query` (uncompressed, no data) and reads its answer to the end, within
    /// [`HANDSHAKE_TIMEOUT`]: Ok, or the server's exception text.
    pub async fn run(&mut self, query: &Query<'_>, revision: u64) -> Result<(), String> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.run_inner(query, revision))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {HANDSHAKE_TIMEOUT:?}")))
    }

    async fn run_inner(&mut self, query: &Query<'_>, revision: u64) -> Result<(), String> {
        let mut out = Vec::with_capacity(256);
        query.write(&mut out, revision);
        client::write_empty_data(&mut out);
        self.io
            .write_all(&out)
            .await
            .map_err(|e| format!("the connection failed: {e}"))?;
        let session = Session {
            revision,
            compression: false,
            empty_low_cardinality_granule: self.hello.writes_empty_low_cardinality_granules(),
        };
        loop {
            match self.packets.next(&self.buf, &session) {
                Ok(p) => {
                    let packet = self.buf.split_to(p.len);
                    match p.kind {
                        Kind::EndOfStream => return Ok(()),
                        Kind::Exception => return Err(exception_text(&packet)),
                        _ => continue,
                    }
                }
                Err(WalkError::Incomplete) if self.buf.len() < MAX_HANDSHAKE => {
                    match self.io.read_buf(&mut self.buf).await {
                        Ok(0) => return Err("the node closed the connection".into()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("the connection failed: {e}")),
                    }
                }
                Err(e) => return Err(format!("its answer could not be read: {e}")),
            }
        }
    }
}

/// The display text of an Exception packet (type included).
pub fn exception_text(packet: &[u8]) -> String {
    let mut r = crate::clickhouse::native::Reader::new(packet);
    let text = (|| {
        r.varuint()?;
        r.skip(4)?;
        r.string()?;
        r.string()
    })();
    match text {
        Ok(t) => String::from_utf8_lossy(t).into_owned(),
        Err(_) => "an exception chgate could not read".into(),
    }
}

/// The code of an Exception packet (type included).
pub fn exception_code(packet: &[u8]) -> Option<i32> {
    let mut r = crate::clickhouse::native::Reader::new(packet);
    r.varuint().ok()?;
    r.u32_le().ok().map(|c| c as i32)
}

/// Replays a session on a fresh connection: every `SET` that succeeded, in order.
pub async fn replay(
    upstream: &mut Upstream,
    sets: &[Vec<u8>],
    client: &Hello,
    user: &User,
    revision: u64,
) -> Result<(), Refusal> {
    let readonly = client::varuint_value(u64::from(user.upstream_readonly));
    for text in sets {
        let query = own_query(client, user, revision, &readonly, text);
        if let Err(why) = upstream.run(&query, revision).await {
            return Err(Refusal::Protocol {
                code: codes::NETWORK_ERROR,
                message: format!(
                    "The connection moved to another node and its session could not be restored there ({}: {why}); reconnect",
                    String::from_utf8_lossy(text)
                ),
            });
        }
    }
    Ok(())
}
