//! A logged-in native connection, both ways, packet by packet.
//!
//! - Client to node: a Query is read whole, decided on by the gateway and rewritten
//!   ([`super::query`]); Data blocks (external tables, INSERT data) are walked to find their
//!   end and forwarded as their bytes arrive; Cancel goes on; Ping goes on, or is answered
//!   here while the connection has no node. A refused query's data is read and dropped up to
//!   the empty block that ends it.
//! - Node to client: every packet is walked to find its end and forwarded as its bytes
//!   arrive, unchanged (compressed frames are never recompressed); EndOfStream and Exception
//!   end the query.
//! - A node that closes while the connection is idle is let go; the next query opens a
//!   connection elsewhere and replays the session ([`super::upstream`]). A read whose node
//!   is lost, or declines it with a fan-out error, before any of its result went out moves
//!   to another node the same way and is sent again ([`super::retry`]). Otherwise a node
//!   lost during a query ends that query with an Exception if the client is at a packet
//!   boundary, else the connection closes. Bytes chgate cannot read fail closed the same
//!   way.
//!
//! Walking a large block that arrives over many reads again from its start after every
//! read would cost time quadratic in its size: an uncompressed block is walked again only
//! once the bytes at hand have doubled or the socket has nothing more for now (compressed
//! ones resume frame by frame, see [`ServerPackets`]). Only bytes a walk has shown to be
//! the current packet's are forwarded before the packet is whole: whatever comes after it
//! (a Query right behind an INSERT block, say) is decided on before it reaches the node,
//! and no byte goes out twice.
//!
//! Memory: a block not all here when first read is not held: its rest passes through as
//! it comes and is let go ([`Tail`](crate::clickhouse::native::tail::Tail)): an answer's
//! fixed-width block by its known length, any other block (a node's or a client's) walked
//! as it comes, a compressed one frame by frame. What is held is a packet that is short
//! anyway (a Query, a Log block, a read's packet while the read may still move, a
//! compressed block until its first frame is here), one compressed frame, and an item a
//! read cut off. Between queries, buffers a big packet grew are given back ([`shrink`]).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::login::Connection;
use super::query::{self, Refusal, Running, Status};
use super::retry::{Retry, Verdict, HOLD_MAX};
use super::upstream::{self, exception_code, Target, Upstream};
use super::Frontend;
use crate::clickhouse::codes;
use crate::clickhouse::native::client::{self, Hello, Query};
use crate::clickhouse::native::server::{
    ClientKind, Kind, ServerHello, ServerPackets, Session, PONG,
};
use crate::clickhouse::native::tail::Tail;
use crate::clickhouse::native::WalkError;
use crate::config::HedgeMode;
use crate::gateway::route;
use crate::gateway::sql::SessionEffect;
use crate::gateway::{GatewayError, User};
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::{Backend, Purpose};
use crate::upstream::UpstreamError;

/// The most bytes a Progress packet takes at the revisions chgate speaks (its type and
/// three varuints).
const MAX_PROGRESS: usize = 1 + 3 * 10;
/// The most bytes of one packet held while it is walked, either way. ClickHouse refuses a
/// compressed frame over 1 GiB; a packet that walks past this (a block whose sizes no
/// peer could send, a node's block that big) ends the connection instead of the memory.
const MAX_PACKET_BYTES: usize = 1 << 30;

/// Bytes asked of a socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// The connection is over (the client is gone, or was told why).
struct Close;

type Step = Result<(), Close>;

/// What the session of a connection holds that a new node must be given.
struct SessionState {
    database: String,
    /// Successful `SET` statements, in order.
    sets: Vec<Vec<u8>>,
    /// A temporary table was created: the session cannot move.
    temporary: bool,
}

struct Relay<'f, S> {
    frontend: &'f Frontend,
    client: S,
    peer: std::net::SocketAddr,
    /// Client bytes not yet handled; the first `client_forwarded` of them went on already.
    buf: BytesMut,
    client_forwarded: usize,
    client_incomplete_at: usize,
    client_packets: ServerPackets,
    /// The rest of a client block walked as it comes (see [`Relay::pass_client_tail`]).
    client_tail: Option<Tail>,
    hello: Hello,
    user: Arc<User>,
    revision: u64,
    told: ServerHello,
    upstream: Option<Upstream>,
    running: Option<Running>,
    /// The client's Data packets are dropped up to the next empty block (a refused query's,
    /// or one whose node was lost).
    discarding: bool,
    /// Whether the last Query's blocks are compressed (refused ones' too: their data is
    /// still read).
    compression: bool,
    session: SessionState,
    /// The `readonly` value read-only users' queries carry, as a typed setting value.
    readonly: Vec<u8>,
    /// Close as soon as no query is running (the proxy is draining).
    closing: bool,
    /// Pings sent on to the node and not answered yet: if the node goes first, chgate
    /// answers them.
    pings: u32,
    to_server: IntCounter,
    to_client: IntCounter,
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Idle,
    Drain,
    /// The running query's quota execution limit.
    Deadline,
    /// The limit plus a grace, with the cut still waiting for the end of a packet.
    Overdue,
    /// The running read's node has been silent for the cluster's hedge bound.
    Stalled,
}

/// Relays `conn` until either side closes, it idles out, or the proxy drains.
pub async fn run<S>(frontend: &Frontend, conn: Connection<S>, drain: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = Relay {
        frontend,
        client: conn.client,
        peer: conn.peer,
        buf: conn.buf,
        client_forwarded: 0,
        client_incomplete_at: 0,
        client_packets: ServerPackets::default(),
        client_tail: None,
        session: SessionState {
            database: conn.hello.database.clone(),
            sets: Vec::new(),
            temporary: false,
        },
        hello: conn.hello,
        readonly: client::varuint_value(u64::from(conn.user.upstream_readonly)),
        user: conn.user,
        revision: conn.revision,
        told: conn.told,
        upstream: Some(conn.upstream),
        running: None,
        discarding: false,
        compression: false,
        closing: false,
        pings: 0,
        to_server: METRICS.native_bytes.with_label_values(&["to_server"]),
        to_client: METRICS.native_bytes.with_label_values(&["to_client"]),
    };
    relay.run(drain).await;
}

/// How long past a query's execution limit a write to a client that does not read may wait
/// before the query and the connection are ended (within it, the cut is told in band).
const STALLED_CLIENT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits until `deadline`, or forever without one (no timer is armed then).
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How a bounded write to the client ended.
enum Written {
    Done(std::io::Result<()>),
    /// The quota's deadline (plus its grace) came first.
    Deadline,
    /// `send_timeout` passed with the client reading nothing.
    TimedOut,
}

/// Runs `write`; if it cannot finish at once, until `deadline` or `timeout`, whichever
/// comes first. A write that finishes at once (nearly every one) arms no timer.
async fn at_once_or(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    deadline: impl std::future::Future<Output = ()>,
    timeout: std::time::Duration,
) -> Written {
    let mut write = std::pin::pin!(write);
    if let Some(r) = write.as_mut().now_or_never() {
        return Written::Done(r);
    }
    tokio::select! {
        r = write => Written::Done(r),
        _ = deadline => Written::Deadline,
        _ = tokio::time::sleep(timeout) => Written::TimedOut,
    }
}

/// Gives back a buffer's room past what a connection between queries needs, if a big
/// packet (a block of many rows, a long query) grew it: idle connections, a BI tool's
/// pool of them, must not each keep their biggest packet's room.
fn shrink(buf: &mut BytesMut) {
    const KEEP: usize = 1 << 20;
    if buf.capacity() > KEEP && buf.len() <= READ_CHUNK {
        let mut small = BytesMut::with_capacity(READ_CHUNK);
        small.extend_from_slice(buf);
        *buf = small;
    }
}

/// Whether a socket whose last read filled the buffer's spare room has been read to its
/// end. A packet waiting for more bytes is walked again only once its bytes have doubled
/// or the socket is drained; a read that took exactly the last bytes a peer sent (the
/// peer now waiting for an answer) must count as drained, or the walk never comes and
/// both sides wait on each other. So, while that walk is held back, this reads on
/// without waiting until the socket has nothing or the bytes have doubled.
fn drained_after_full_read<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    incomplete_at: usize,
    read: &IntCounter,
) -> bool {
    while incomplete_at > 0 && buf.len() < 2 * incomplete_at {
        buf.reserve(READ_CHUNK);
        let spare = buf.capacity() - buf.len();
        // What the socket has now, without waiting (`None`: a read would wait).
        match io.read_buf(buf).now_or_never() {
            Some(Ok(n)) if n > 0 => {
                read.inc_by(n as u64);
                if n < spare {
                    return true;
                }
            }
            // Nothing now; or the end or an error, which the next read reports.
            _ => return true,
        }
    }
    false
}

/// Writes `bytes` to a node. A node that takes none of them for `timeout` (its socket
/// accepted the connection and stopped reading: a SIGSTOPped or wedged server, whose
/// kernel answers the zero-window probes for ever) fails the write with `TimedOut`, where
/// nothing else would ever end it. A write that finishes at once arms no timer.
async fn write_upstream<W: AsyncWrite + Unpin>(
    io: &mut W,
    bytes: &[u8],
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    match at_once_or(io.write_all(bytes), until(None), timeout).await {
        Written::Done(r) => r,
        Written::Deadline | Written::TimedOut => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the node took no bytes for proxy.native_send_timeout",
        )),
    }
}

/// A node connection failed: the node's health hears of it, and
/// `chgate_native_errors_total{kind="upstream_lost"}` counts it.
fn node_lost(backend: &Backend, error: std::io::Error) {
    backend.failed(&UpstreamError::Io(error));
    METRICS
        .native_errors
        .with_label_values(&["upstream_lost"])
        .inc();
}

/// Whether an idle connection's node is known to have closed or broken it: what the socket
/// already holds is read without waiting (bytes stay for the walk).
fn closed_while_idle(upstream: &mut Upstream) -> bool {
    match upstream.io.try_read_buf(&mut upstream.buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Reads from the node, or waits forever without one.
async fn read_upstream(upstream: &mut Option<Upstream>) -> std::io::Result<usize> {
    match upstream {
        Some(u) => u.io.read_buf(&mut u.buf).await,
        None => std::future::pending().await,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Relay<'_, S> {
    async fn run(&mut self, drain: CancellationToken) {
        // Bytes that came with the Hello.
        if !self.buf.is_empty() && self.on_client(true).await.is_err() {
            return;
        }
        let idle_timeout = self.frontend.settings.idle_timeout;
        loop {
            if self.closing && self.running.is_none() {
                tracing::debug!(peer = %self.peer, "Native connection closed for the drain");
                break;
            }
            self.buf.reserve(READ_CHUNK);
            if let Some(u) = &mut self.upstream {
                u.buf.reserve(READ_CHUNK);
            }
            let client_spare = self.buf.capacity() - self.buf.len();
            let server_spare = self
                .upstream
                .as_ref()
                .map_or(0, |u| u.buf.capacity() - u.buf.len());
            let idle = self.running.is_none();
            let deadline = self
                .running
                .as_ref()
                .filter(|r| r.cut.is_none())
                .and_then(|r| r.deadline);
            // A cut at the limit waits for the end of the packet under way; a node that
            // stops sending in the middle of one (hung, partitioned) must not hold the
            // query and its slot past the limit plus a grace.
            let overdue_at = self
                .running
                .as_ref()
                .filter(|r| r.cut.is_some())
                .and_then(|r| r.deadline)
                .map(|d| d + STALLED_CLIENT_GRACE);
            let stall_at = self
                .running
                .as_ref()
                .filter(|r| r.retry.as_ref().is_some_and(Retry::movable))
                .and_then(|r| r.stall_at);
            let event = tokio::select! {
                r = self.client.read_buf(&mut self.buf) => Event::Client(r),
                r = read_upstream(&mut self.upstream) => Event::Server(r),
                _ = tokio::time::sleep(idle_timeout), if idle => Event::Idle,
                _ = drain.cancelled(), if !self.closing => Event::Drain,
                _ = until(deadline) => Event::Deadline,
                _ = until(overdue_at) => Event::Overdue,
                _ = until(stall_at) => Event::Stalled,
            };
            let step = match event {
                Event::Client(Ok(0)) => break,
                Event::Client(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "Native client connection failed");
                    METRICS
                        .native_errors
                        .with_label_values(&["client_io"])
                        .inc();
                    break;
                }
                Event::Client(Ok(n)) => {
                    self.to_server.inc_by(n as u64);
                    let drained = n < client_spare
                        || drained_after_full_read(
                            &mut self.client,
                            &mut self.buf,
                            self.client_incomplete_at,
                            &self.to_server,
                        );
                    self.on_client(drained).await
                }
                Event::Server(Ok(0)) => {
                    let eof = std::io::ErrorKind::UnexpectedEof.into();
                    self.upstream_lost(eof).await
                }
                Event::Server(Err(e)) => self.upstream_lost(e).await,
                Event::Server(Ok(n)) => {
                    self.to_client.inc_by(n as u64);
                    if let Some(run) = self.running.as_mut() {
                        run.heard();
                    }
                    let mut drained = n < server_spare;
                    if let (false, Some(u)) = (drained, self.upstream.as_mut()) {
                        drained = drained_after_full_read(
                            &mut u.io,
                            &mut u.buf,
                            u.incomplete_at,
                            &self.to_client,
                        );
                    }
                    self.on_server(drained).await
                }
                Event::Idle => {
                    METRICS
                        .native_errors
                        .with_label_values(&["idle_timeout"])
                        .inc();
                    break;
                }
                Event::Drain => {
                    self.closing = true;
                    Ok(())
                }
                Event::Deadline => self.execution_time_out().await,
                Event::Overdue => self.stalled_past_deadline(),
                Event::Stalled => self.stalled().await,
            };
            if step.is_err() {
                break;
            }
        }
        let _ = self.client.shutdown().await;
    }

    /// Handles the client's packets at hand. `drained`: the socket had nothing more.
    async fn on_client(&mut self, drained: bool) -> Step {
        loop {
            if self.client_tail.is_some() {
                if self.pass_client_tail(0, None).await? {
                    continue;
                }
                return Ok(());
            }
            let Some(&first) = self.buf.first() else {
                return Ok(());
            };
            match u64::from(first) {
                client::QUERY => {
                    if !self.on_query().await? {
                        return Ok(());
                    }
                }
                client::DATA => {
                    if !self.on_data(drained).await? {
                        return Ok(());
                    }
                }
                client::CANCEL => {
                    self.buf.advance(1);
                    // A cancelled read stays where it is: what its node says next ends it.
                    if let Some(retry) = self.running.as_mut().and_then(|r| r.retry.as_mut()) {
                        retry.settle();
                    }
                    if self.running.is_some() {
                        self.send_upstream(&[client::CANCEL as u8]).await?;
                    }
                }
                client::PING => {
                    self.buf.advance(1);
                    if self.upstream.is_some() {
                        self.pings += 1;
                        self.send_upstream(&[client::PING as u8]).await?;
                    } else {
                        // No node now: the connection is alive all the same.
                        self.send_client(&PONG).await?;
                    }
                }
                other => {
                    return self
                        .fail(Refusal::Protocol {
                            code: codes::UNKNOWN_PACKET_FROM_CLIENT,
                            message: format!("Unknown packet {other} from client"),
                        })
                        .await
                }
            }
        }
    }

    /// A Query at the start of the buffer: `Ok(false)` until all of it is there.
    async fn on_query(&mut self) -> Result<bool, Close> {
        if self.running.is_some() {
            return self
                .fail(Refusal::Protocol {
                    code: codes::UNEXPECTED_PACKET_FROM_CLIENT,
                    message: "Unexpected packet Query received from client: a query is running"
                        .into(),
                })
                .await
                .map(|_| false);
        }
        let len = match Query::read(&self.buf, self.revision) {
            Ok((_, len)) => len,
            Err(WalkError::Incomplete) => {
                let max = self.frontend.settings.max_query_bytes;
                if self.buf.len() > max {
                    return self
                        .fail(Refusal::Protocol {
                            code: codes::QUERY_IS_TOO_LARGE,
                            message: format!("Query packet is too large: over {max} bytes (proxy.native_max_query_bytes)"),
                        })
                        .await
                        .map(|_| false);
                }
                return Ok(false);
            }
            Err(WalkError::UnknownSetting(name)) => {
                return self
                    .fail(Refusal::Protocol {
                        code: codes::UNKNOWN_SETTING,
                        message: format!(
                            "Unknown setting {name}: at protocol revision {} settings travel as typed binary values, and chgate does not know this one's type, so it cannot read the rest of the query",
                            self.revision
                        ),
                    })
                    .await
                    .map(|_| false)
            }
            Err(e) => return self.fail(unreadable("query", &e)).await.map(|_| false),
        };
        let packet = self.buf.split_to(len).freeze();
        self.start_query(packet).await?;
        Ok(true)
    }

    /// Decides on a whole Query packet and sends it on, or refuses it.
    async fn start_query(&mut self, packet: Bytes) -> Step {
        let Ok((query, _)) = Query::read(&packet, self.revision) else {
            return Err(Close);
        };
        self.compression = query.compression;
        self.discarding = false;
        // The decision may wait in the user's queue: meanwhile the client is still read (what
        // follows the query is kept for after), so a client that goes away gives up its
        // place instead of having its query run once admitted.
        let decided = {
            let decide = query::decide(&self.user, &query);
            tokio::pin!(decide);
            let room = self.frontend.settings.max_query_bytes;
            loop {
                tokio::select! {
                    d = &mut decide => break d,
                    r = self.client.read_buf(&mut self.buf), if self.buf.len() < room => match r {
                        Ok(0) | Err(_) => {
                            tracing::debug!(peer = %self.peer, "Native client gone while its query waited in the queue");
                            return Err(Close);
                        }
                        Ok(n) => self.to_server.inc_by(n as u64),
                    },
                }
            }
        };
        let decision = match decided {
            Ok(d) => d,
            Err(e) => return self.refuse(e.into(), query.query_id).await,
        };
        let query_id = if query.query_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            String::from_utf8_lossy(query.query_id).into_owned()
        };
        let execution_limit = decision.admission.execution_limit();
        let execution_time = execution_limit
            .map(|l| client::varuint_value(crate::gateway::quota::upstream_execution_seconds(l)));
        let read = decision.statement.is_read();
        let in_order = read && route::steer_in_order(&self.user.cluster);
        let rewritten = query::rewrite(
            &query,
            &self.user,
            self.revision,
            &query_id,
            &self.readonly,
            execution_time.as_deref(),
            in_order,
        );
        let mut out = Vec::with_capacity(packet.len() + 32);
        rewritten.write(&mut out, self.revision);
        let Some(backend) = self.send_query(&out, query.query_id).await? else {
            return Ok(());
        };
        let text = matches!(decision.effect, SessionEffect::Set).then(|| query.text.to_vec());
        let deadline = execution_limit.map(|l| (decision.admission.admitted_at() + l).into());
        // A read may move to another node until its result begins, unless a temporary
        // table of this session holds it here.
        let retry = (read && !self.session.temporary).then(|| {
            let limit = self.frontend.gateway.settings.max_replay_body_bytes;
            Retry::new(out, backend.clone(), limit)
        });
        // While it may move, a read whose node falls silent (a hung replica it waits on, or
        // the node itself hung) moves once the cluster's hedge bound passes, as the HTTP
        // frontend hedges.
        let hedging = &self.user.cluster.hedging;
        let stall_after =
            (retry.is_some() && hedging.mode() != HedgeMode::Off).then(|| hedging.after());
        self.running = Some(Running {
            stall_at: stall_after.map(|d| tokio::time::Instant::now() + d),
            stall_after,
            retry,
            deadline,
            cut: None,
            result_bytes: 0,
            _in_flight: GaugeGuard::new(&backend.node.in_flight),
            decision,
            query_id,
            text,
            backend,
            started: Instant::now(),
            rows: 0,
            bytes_out: 0,
            access_log: self.frontend.settings.access_log,
            done: false,
        });
        Ok(())
    }

    /// Sends a Query packet to the connection's node; one that cannot take it (its
    /// connection found closed, or lost while the packet went) is replaced, as a node that
    /// never got the whole query never ran it, within the cluster's attempts. The node it
    /// went to, or `None` when the query was refused.
    async fn send_query(
        &mut self,
        packet: &[u8],
        query_id: &[u8],
    ) -> Result<Option<Arc<Backend>>, Close> {
        let attempts = self.frontend.gateway.settings.max_attempts().max(1);
        let send_timeout = self.frontend.settings.send_timeout;
        let mut failed: Vec<Arc<Backend>> = Vec::new();
        loop {
            if self.upstream.as_mut().is_some_and(closed_while_idle) {
                if let Some(upstream) = self.upstream.as_ref() {
                    tracing::debug!(
                        node = upstream.backend.label(),
                        "Idle native node connection found closed before a query"
                    );
                }
                self.let_go_idle_upstream().await?;
            }
            if self.upstream.is_none() {
                if let Err((refusal, close)) = self.reconnect(&failed).await {
                    self.refuse(refusal, query_id).await?;
                    return if close { Err(Close) } else { Ok(None) };
                }
            }
            let Some(upstream) = self.upstream.as_mut() else {
                return Err(Close);
            };
            let Err(e) = write_upstream(&mut upstream.io, packet, send_timeout).await else {
                return Ok(Some(upstream.backend.clone()));
            };
            tracing::warn!(node = upstream.backend.label(), error = %e, "A query could not be sent to its node (it never ran there)");
            node_lost(&upstream.backend, e);
            failed.push(upstream.backend.clone());
            self.let_go_idle_upstream().await?;
            if failed.len() >= attempts {
                let refusal = Refusal::Gateway(crate::gateway::GatewayError::UpstreamFailed {
                    reason: "connection lost",
                    why: "could not be sent; send it again",
                });
                self.refuse(refusal, query_id).await?;
                return Ok(None);
            }
        }
    }

    /// Drops the node's connection between queries: pings it did not answer are answered
    /// here, unless part of a packet from it reached the client (nothing can follow that).
    async fn let_go_idle_upstream(&mut self) -> Step {
        let Some(upstream) = self.upstream.take() else {
            return Ok(());
        };
        if upstream.mid_packet() {
            return Err(Close);
        }
        for _ in 0..std::mem::take(&mut self.pings) {
            self.send_client(&PONG).await?;
        }
        Ok(())
    }

    /// Answers a query with an Exception instead of running it; its data, if any follows,
    /// is dropped.
    async fn refuse(&mut self, refusal: Refusal, query_id: &[u8]) -> Step {
        query::refused(
            &self.user,
            &refusal,
            query_id,
            self.frontend.settings.access_log,
        );
        self.discarding = true;
        self.send_client(&refusal.packet()).await
    }

    /// A Data packet at the start of the buffer: `Ok(false)` until all of it is there.
    async fn on_data(&mut self, drained: bool) -> Result<bool, Close> {
        let waiting = self.client_incomplete_at;
        if waiting > 0 && self.buf.len() < 2 * waiting && !drained {
            // Bytes past `waiting` may already be the next packet (a Query right behind
            // this block): they wait for the next walk, which tells.
            return Ok(false);
        }
        // Clients write nothing for a LowCardinality without rows (ClickHouse's own
        // before 19.1 did, and its server of that time could not read it either).
        let session = Session {
            revision: self.revision,
            compression: self.compression,
            empty_low_cardinality_granule: false,
        };
        let packet = match self.client_packets.next_client(&self.buf, &session) {
            Err(WalkError::Incomplete) if self.buf.len() > MAX_PACKET_BYTES => {
                Err(WalkError::Malformed("a data packet over 1 GiB"))
            }
            other => other,
        };
        match packet {
            Ok(p) => {
                self.forward_client_bytes(p.len).await?;
                self.buf.advance(p.len);
                self.client_forwarded = 0;
                self.client_incomplete_at = 0;
                if p.kind == (ClientKind::Data { empty: true }) {
                    self.discarding = false;
                }
                Ok(true)
            }
            Err(WalkError::Incomplete) => {
                if let Some((from, tail)) = self.client_packets.take_tail() {
                    return self.pass_client_tail(from, Some(tail)).await;
                }
                self.forward_client_bytes(self.buf.len()).await?;
                self.client_incomplete_at = self.buf.len();
                Ok(false)
            }
            Err(e) => self.client_block_unreadable(&e).await.map(|_| false),
        }
    }

    /// The client's block cannot be read on: the node may have part of it, so it cannot go
    /// on either.
    async fn client_block_unreadable(&mut self, e: &WalkError) -> Step {
        if let Some(u) = self.upstream.take() {
            tracing::debug!(
                node = u.backend.label(),
                "Native node connection dropped with an unreadable client block"
            );
        }
        if let Some(mut run) = self.running.take() {
            run.finish(Status::Error, None);
        }
        self.fail(unreadable("data block", e)).await
    }

    /// Passes on the bytes at hand of the client block walked as it comes (from `from`:
    /// what comes before is the packet's too) and lets them go: `true` once the block
    /// ended. `fresh`: the tail just found; else the one under way. A client's INSERT
    /// block is thus never held whole, whatever its size: only the few bytes of an item
    /// the last read cut off wait for the next.
    async fn pass_client_tail(&mut self, from: usize, fresh: Option<Tail>) -> Result<bool, Close> {
        if fresh.is_some() {
            self.client_tail = fresh;
        }
        let Some(tail) = self.client_tail.as_mut() else {
            return Ok(true);
        };
        let fed = tail.feed(&self.buf[from..]);
        let (n, done) = match fed {
            Ok(fed) => fed,
            Err(e) => {
                self.client_tail = None;
                return self.client_block_unreadable(&e).await.map(|_| false);
            }
        };
        let end = from + n;
        self.forward_client_bytes(end).await?;
        self.buf.advance(end);
        self.client_forwarded = self.client_forwarded.saturating_sub(end);
        self.client_incomplete_at = 0;
        if done {
            // (Never the empty block that ends the data: that one is whole at once.)
            if let Some(tail) = self.client_tail.take() {
                self.client_packets.give_back(tail);
            }
        }
        Ok(done)
    }

    /// Sends the client's bytes up to `end` of the buffer on to the node (unless they are
    /// being dropped), those not sent yet.
    async fn forward_client_bytes(&mut self, end: usize) -> Step {
        let start = self.client_forwarded;
        self.client_forwarded = end;
        if self.discarding || start >= end {
            return Ok(());
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(());
        };
        if let Some(retry) = self.running.as_mut().and_then(|r| r.retry.as_mut()) {
            retry.client_bytes(&self.buf[start..end]);
        }
        let send_timeout = self.frontend.settings.send_timeout;
        let written = write_upstream(&mut upstream.io, &self.buf[start..end], send_timeout).await;
        self.after_upstream_write(written).await
    }

    /// Writes to the node.
    async fn send_upstream(&mut self, bytes: &[u8]) -> Step {
        let send_timeout = self.frontend.settings.send_timeout;
        let Some(u) = self.upstream.as_mut() else {
            return Ok(());
        };
        let written = write_upstream(&mut u.io, bytes, send_timeout).await;
        self.after_upstream_write(written).await
    }

    /// A failed write to the node is left for the next read from it to report (the node
    /// may have said why before it closed), except a timed-out one: a node that reads
    /// nothing sends nothing either, so it is given up on now.
    async fn after_upstream_write(&mut self, written: std::io::Result<()>) -> Step {
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                METRICS
                    .native_errors
                    .with_label_values(&["node_send_timeout"])
                    .inc();
                self.upstream_lost(e).await
            }
            Err(e) => {
                if let Some(u) = &self.upstream {
                    tracing::debug!(node = u.backend.label(), error = %e, "Writing to the node failed");
                }
                Ok(())
            }
        }
    }

    async fn send_client(&mut self, bytes: &[u8]) -> Step {
        let send_timeout = self.frontend.settings.send_timeout;
        let written = async {
            self.client.write_all(bytes).await?;
            self.client.flush().await
        };
        match at_once_or(written, until(None), send_timeout).await {
            Written::Done(Ok(())) => Ok(()),
            Written::Done(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "Writing to the native client failed");
                Err(Close)
            }
            Written::Deadline => Err(Close),
            Written::TimedOut => self.client_not_reading(),
        }
    }

    /// A write to the client waited `send_timeout` for it to read: its query (if any) is
    /// killed, the node connection dropped (it frees the node's blocked write) and the
    /// connection closed; mid-packet, nothing more can be told.
    fn client_not_reading(&mut self) -> Step {
        METRICS
            .native_errors
            .with_label_values(&["client_send_timeout"])
            .inc();
        let timeout = self.frontend.settings.send_timeout;
        if let Some(mut run) = self.running.take() {
            crate::gateway::kill_query(
                &run.backend,
                &self.user,
                &run.query_id,
                crate::gateway::Abandoned::Disconnected,
            );
            tracing::info!(peer = %self.peer, user = %self.user.name, query_id = %run.query_id, timeout_s = timeout.as_secs_f64(), "The native client read nothing for proxy.native_send_timeout: query killed, connection closed");
            run.finish(Status::ClientClosed, None);
        } else {
            tracing::info!(peer = %self.peer, user = %self.user.name, timeout_s = timeout.as_secs_f64(), "The native client read nothing for proxy.native_send_timeout: connection closed");
        }
        self.upstream = None;
        Err(Close)
    }

    /// Tells the client why and closes: what comes after this point could not be read.
    async fn fail(&mut self, refusal: Refusal) -> Step {
        tracing::info!(peer = %self.peer, user = %self.user.name, error = ?refusal, "Native connection closed");
        METRICS
            .native_errors
            .with_label_values(&[refusal.kind()])
            .inc();
        let _ = self.send_client(&refusal.packet()).await;
        Err(Close)
    }

    /// Handles the node's packets at hand. `drained`: the socket had nothing more.
    async fn on_server(&mut self, drained: bool) -> Step {
        loop {
            let Some(upstream) = self.upstream.as_mut() else {
                return Ok(());
            };
            if upstream.buf.is_empty() {
                return Ok(());
            }
            if upstream.tail.is_some() {
                if self.pass_tail(0, None).await? {
                    continue;
                }
                return Ok(());
            }
            let waiting = upstream.incomplete_at;
            if waiting > 0 && upstream.buf.len() < 2 * waiting && !drained {
                // As on the client side: only bytes known to be this packet's go on.
                return Ok(());
            }
            let session = Session {
                revision: self.revision,
                compression: self.compression,
                empty_low_cardinality_granule: upstream
                    .hello
                    .writes_empty_low_cardinality_granules(),
            };
            let packet = match upstream.packets.next(&upstream.buf, &session) {
                Err(WalkError::Incomplete) if upstream.buf.len() > MAX_PACKET_BYTES => {
                    Err(WalkError::Malformed("a packet over 1 GiB"))
                }
                other => other,
            };
            match packet {
                Ok(p) => {
                    let retry = self.running.as_mut().and_then(|r| r.retry.as_mut());
                    // (A packet of which some bytes went on can only be finished.)
                    let whole = upstream.forwarded == 0;
                    let verdict = match retry.filter(|r| whole && r.active()) {
                        Some(retry) => retry.verdict(p.kind, p.rows, &upstream.buf[..p.len]),
                        None => Verdict::Forward,
                    };
                    match verdict {
                        Verdict::Forward => {}
                        Verdict::Drop | Verdict::Replace(_) => {
                            upstream.buf.advance(p.len);
                            upstream.forwarded = 0;
                            upstream.incomplete_at = 0;
                            if let Verdict::Replace(bytes) = verdict {
                                self.send_client(&bytes).await?;
                            }
                            continue;
                        }
                        Verdict::Move => {
                            let packet = upstream.buf.split_to(p.len).freeze();
                            let Some(old) = self.upstream.take() else {
                                return Ok(());
                            };
                            return self.move_query(old, Moving::Declined(packet)).await;
                        }
                    }
                    self.forward_server_bytes(Some(p.len)).await?;
                    let Some(upstream) = self.upstream.as_mut() else {
                        return Ok(());
                    };
                    let packet = upstream.buf.split_to(p.len);
                    upstream.forwarded = 0;
                    upstream.incomplete_at = 0;
                    if !self.packet_ended(p.kind, p.rows, &packet).await? {
                        return Ok(());
                    }
                }
                Err(WalkError::Incomplete) => {
                    upstream.incomplete_at = upstream.buf.len();
                    let retry = self.running.as_mut().and_then(|r| r.retry.as_mut());
                    if let Some(retry) = retry {
                        // While the read may move, only whole packets go on; once it
                        // moved, whole Progress packets (a few bytes), to be adjusted.
                        let progress = upstream.buf.first() == Some(&3);
                        if retry.movable() && upstream.buf.len() <= HOLD_MAX {
                            return Ok(());
                        }
                        if retry.active() && progress && upstream.buf.len() <= MAX_PROGRESS {
                            return Ok(());
                        }
                        retry.settle();
                    }
                    // A packet whose end is known: passed on and let go as it comes.
                    if let Some((from, tail)) = upstream.packets.take_tail() {
                        if self.pass_tail(from, Some(tail)).await? {
                            continue;
                        }
                        return Ok(());
                    }
                    return self.forward_server_bytes(None).await;
                }
                Err(e) => return self.server_unreadable(e).await,
            }
        }
    }

    /// Passes on the bytes at hand of the packet whose end is known (its
    /// [`Tail`](crate::clickhouse::native::tail::Tail)), from `from` (what comes before is
    /// the packet's too), and lets them go: `true` once the packet ended, and the bytes
    /// after it are the next packet's. `fresh`: the tail just found, the packet's start
    /// still in the buffer; else the one under way.
    ///
    /// A fresh tail becomes the connection's only once some of its packet went out: until
    /// then the packet has not begun for the client, so a quota's cut is told instead of it
    /// and bytes that cannot be read end the query with an Exception, as for a packet held
    /// whole.
    async fn pass_tail(&mut self, from: usize, mut fresh: Option<Tail>) -> Result<bool, Close> {
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(false);
        };
        let tail = match (&mut fresh, &mut upstream.tail) {
            (Some(tail), _) | (None, Some(tail)) => tail,
            (None, None) => return Ok(true),
        };
        let (n, done) = match tail.feed(&upstream.buf[from..]) {
            Ok(fed) => fed,
            Err(e) => return self.server_unreadable(e).await.map(|()| false),
        };
        let (kind, rows) = (tail.kind, tail.rows);
        let end = from + n;
        self.forward_server_bytes(Some(end)).await?;
        let Some(upstream) = self.upstream.as_mut() else {
            // Cut, told instead of the packet.
            return Ok(false);
        };
        upstream.buf.advance(end);
        // (A block walked as it comes may leave a few bytes for its next feed.)
        upstream.forwarded = upstream.forwarded.saturating_sub(end);
        upstream.incomplete_at = 0;
        if !done {
            if fresh.is_some() {
                upstream.tail = fresh;
            }
            return Ok(false);
        }
        if let Some(tail) = upstream.tail.take().or(fresh) {
            upstream.packets.give_back(tail);
        }
        self.packet_ended(kind, rows, &[]).await
    }

    /// A packet from the node went to the client whole (`packet`: its bytes, if kept):
    /// what it means for the query; between queries, the room a big packet grew is given
    /// back; at this packet boundary a quota's cut is told. `false` once the cut let the
    /// node's connection go.
    async fn packet_ended(&mut self, kind: Kind, rows: u64, packet: &[u8]) -> Result<bool, Close> {
        self.observe(kind, rows, packet);
        if self.running.is_none() {
            if let Some(upstream) = self.upstream.as_mut() {
                shrink(&mut upstream.buf);
            }
            shrink(&mut self.buf);
        }
        if self.running.as_ref().is_some_and(|r| r.cut.is_some()) {
            self.cut().await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Sends the node's bytes not sent yet on to the client: up to `end`, or all.
    async fn forward_server_bytes(&mut self, end: Option<usize>) -> Step {
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(());
        };
        let end = end.unwrap_or(upstream.buf.len());
        let start = upstream.forwarded;
        if start >= end {
            return Ok(());
        }
        // The result is what the quota counts: Data, Totals and Extremes packets (types 1, 7
        // and 8; the buffer starts with the current packet's type), not progress or the end.
        // A tail is only ever a block's.
        let result_bytes =
            upstream.tail.is_some() || matches!(upstream.buf.first(), Some(1 | 7 | 8));
        if let Some(run) = self.running.as_mut().filter(|_| result_bytes) {
            let limit = run.decision.admission.result_limit();
            let over = limit.filter(|&l| run.result_bytes + (end - start) as u64 > l);
            if let (Some(limit), true) = (over, run.cut.is_none()) {
                let e = GatewayError::ResultTooLarge {
                    user: self.user.name.to_string(),
                    limit,
                    bytes: run.result_bytes + (end - start) as u64,
                };
                run.cut = Some((e, "result_bytes"));
                if start == 0 && upstream.tail.is_none() {
                    // (A tail under way has gone out in part; a fresh one is not set yet.)
                    // Nothing of this packet went out: the cut is told instead of it.
                    return self.cut().await;
                }
                // Mid-packet: the rest of it goes, and the cut follows at its end.
            }
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(());
        };
        upstream.forwarded = end;
        if let Some(run) = self.running.as_mut() {
            run.bytes_out += (end - start) as u64;
            if result_bytes {
                run.result_bytes += (end - start) as u64;
            }
        }
        // A client that stops reading must not hold its query past the quota's execution
        // limit (the node would be blocked writing, deaf to a KILL): past the limit plus a
        // grace, a write still waiting ends the query and the connection.
        // (Armed with a cut pending too: the cut waits for this packet's end.)
        let stalled_after = self
            .running
            .as_ref()
            .and_then(|r| r.deadline)
            .map(|d| d + STALLED_CLIENT_GRACE);
        let send_timeout = self.frontend.settings.send_timeout;
        let written = async {
            self.client.write_all(&upstream.buf[start..end]).await?;
            self.client.flush().await
        };
        match at_once_or(written, until(stalled_after), send_timeout).await {
            Written::Done(r) => r.map_err(|e| {
                tracing::debug!(peer = %self.peer, error = %e, "Writing to the native client failed");
                Close
            }),
            Written::Deadline => self.stalled_past_deadline(),
            Written::TimedOut => self.client_not_reading(),
        }
    }

    /// The query ran past the quota's execution limit stuck in the middle of a packet (the
    /// client stopped reading, or the node stopped sending): the query is killed, the node
    /// connection dropped (which frees a node's blocked write), and the client's connection
    /// closed (it is mid-packet: nothing more can be told).
    fn stalled_past_deadline(&mut self) -> Step {
        if let Some(mut run) = self.running.take() {
            METRICS
                .quota_kills
                .with_label_values(&[&self.user.name, "execution_time"])
                .inc();
            crate::gateway::kill_query(
                &run.backend,
                &self.user,
                &run.query_id,
                crate::gateway::Abandoned::Disconnected,
            );
            tracing::info!(user = %self.user.name, query_id = %run.query_id, "Query past its execution limit stuck in the middle of a packet (a client that stopped reading, or a node that stopped sending): killed, connection closed");
            let limit = run.decision.admission.execution_limit().unwrap_or_default();
            let e = GatewayError::ExecutionTimeout {
                user: self.user.name.to_string(),
                elapsed: run.decision.admission.admitted_at().elapsed(),
                limit,
            };
            run.finish(Status::Refused, Some(Refusal::Gateway(e).code()));
        }
        self.upstream = None;
        Err(Close)
    }

    /// A whole packet from the node went to the client: what it means for the query.
    fn observe(&mut self, kind: Kind, rows: u64, packet: &[u8]) {
        if kind == Kind::Pong {
            self.pings = self.pings.saturating_sub(1);
        }
        let Some(run) = self.running.as_mut() else {
            return;
        };
        if let Some(retry) = run.retry.as_mut() {
            retry.forwarded(kind, packet);
        }
        match kind {
            Kind::Data | Kind::Totals | Kind::Extremes => run.rows += rows,
            Kind::Exception => {
                run.finish(Status::Exception, exception_code(packet));
                self.running = None;
            }
            Kind::EndOfStream => {
                run.finish(Status::Ok, None);
                match std::mem::replace(&mut run.decision.effect, SessionEffect::None) {
                    SessionEffect::Set => {
                        if let Some(text) = run.text.take() {
                            self.session.sets.push(text);
                        }
                    }
                    SessionEffect::Use(db) => self.session.database = db,
                    SessionEffect::Temporary => self.session.temporary = true,
                    SessionEffect::None => {}
                }
                self.running = None;
            }
            _ => {}
        }
    }

    /// The running query reached its quota's execution limit: cut now if the client is at
    /// a packet boundary, else at the end of the packet it is being sent.
    async fn execution_time_out(&mut self) -> Step {
        let Some(run) = self.running.as_mut() else {
            return Ok(());
        };
        let limit = run.decision.admission.execution_limit().unwrap_or_default();
        let e = GatewayError::ExecutionTimeout {
            user: self.user.name.to_string(),
            elapsed: run.decision.admission.admitted_at().elapsed(),
            limit,
        };
        run.cut = Some((e, "execution_time"));
        if self.upstream.as_ref().is_some_and(Upstream::mid_packet) {
            return Ok(());
        }
        self.cut().await
    }

    /// Ends the running query for its quota, at a packet boundary: it is killed on its node,
    /// the node connection (mid-answer) is let go (the next query moves, with the session),
    /// and the client gets the Exception.
    async fn cut(&mut self) -> Step {
        let Some(mut run) = self.running.take() else {
            return Ok(());
        };
        let Some((e, reason)) = run.cut.take() else {
            self.running = Some(run);
            return Ok(());
        };
        METRICS
            .quota_kills
            .with_label_values(&[&self.user.name, reason])
            .inc();
        crate::gateway::kill_query(
            &run.backend,
            &self.user,
            &run.query_id,
            crate::gateway::Abandoned::Disconnected,
        );
        tracing::info!(user = %self.user.name, query_id = %run.query_id, reason, "Query cut by its quota and killed");
        let refusal = Refusal::Gateway(e);
        run.finish(Status::Refused, Some(refusal.code()));
        self.upstream = None;
        self.pings = 0;
        self.discarding = true;
        self.send_client(&refusal.packet()).await
    }

    /// The node sent something chgate cannot read: an Exception for the query if the
    /// client has had none of it, else the connection closes.
    async fn server_unreadable(&mut self, e: WalkError) -> Step {
        let Some(upstream) = self.upstream.take() else {
            return Ok(());
        };
        tracing::warn!(node = upstream.backend.label(), error = %e, "Native answer unreadable; the node connection is dropped");
        let refusal = unreadable("answer from the node", &e);
        METRICS
            .native_errors
            .with_label_values(&[refusal.kind()])
            .inc();
        if let Some(mut run) = self.running.take() {
            run.finish(Status::Error, Some(refusal.code()));
        }
        if upstream.mid_packet() {
            return Err(Close);
        }
        self.discarding = true;
        self.send_client(&refusal.packet()).await
    }

    /// The node's connection closed or failed.
    async fn upstream_lost(&mut self, error: std::io::Error) -> Step {
        let Some(upstream) = self.upstream.take() else {
            return Ok(());
        };
        let Some(mut run) = self.running.take() else {
            // Idle: nodes close idle connections, restart, go away. The next query moves;
            // pings the node did not answer are answered here, unless part of a packet
            // from it reached the client.
            tracing::debug!(node = upstream.backend.label(), error = %error, "Idle native node connection closed");
            self.upstream = Some(upstream);
            return self.let_go_idle_upstream().await;
        };
        if !upstream.mid_packet() && run.retry.as_ref().is_some_and(Retry::movable) {
            self.running = Some(run);
            return self.move_query(upstream, Moving::Lost(error)).await;
        }
        tracing::warn!(node = upstream.backend.label(), error = %error, query_id = %run.query_id, "Node connection lost during a query");
        node_lost(&upstream.backend, error);
        let refusal = Refusal::Gateway(crate::gateway::GatewayError::UpstreamFailed {
            reason: "connection lost",
            why: "may have run already",
        });
        run.finish(Status::Error, Some(refusal.code()));
        if upstream.mid_packet() {
            // The client has part of a packet: nothing can follow it.
            return Err(Close);
        }
        self.discarding = true;
        self.send_client(&refusal.packet()).await
    }

    /// A connection on another node for the next query, with the session carried over; on
    /// failure, the refusal, and whether the connection must close after it.
    async fn reconnect(&mut self, avoid: &[Arc<Backend>]) -> Result<(), (Refusal, bool)> {
        if self.session.temporary {
            METRICS
                .native_reconnects
                .with_label_values(&["pinned"])
                .inc();
            let refusal = Refusal::Protocol {
                code: codes::NETWORK_ERROR,
                message: "The connection's node went away, and with it the temporary tables of this session: reconnect".into(),
            };
            return Err((refusal, true));
        }
        let purpose = if self.user.readonly {
            Purpose::Read
        } else {
            Purpose::Write
        };
        let connected = upstream::connect(&self.target(purpose, avoid)).await;
        let mut up = match connected {
            Ok(up) => up,
            Err(r) => {
                METRICS
                    .native_reconnects
                    .with_label_values(&["failed"])
                    .inc();
                return Err((r, false));
            }
        };
        if let Err(r) = upstream::replay(
            &mut up,
            &self.session.sets,
            &self.hello,
            &self.user,
            self.revision,
        )
        .await
        {
            METRICS
                .native_reconnects
                .with_label_values(&["failed"])
                .inc();
            return Err((r, true));
        }
        tracing::info!(peer = %self.peer, user = %self.user.name, node = up.backend.label(), "Native connection moved to another node");
        METRICS.native_reconnects.with_label_values(&["ok"]).inc();
        self.pings = 0;
        self.upstream = Some(up);
        Ok(())
    }
}

/// Why a read is moving to another node.
enum Moving {
    /// Its node declined it with this Exception packet (a fan-out error): what the client
    /// gets if no other node takes the query.
    Declined(Bytes),
    /// Its node's connection was lost.
    Lost(std::io::Error),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Relay<'_, S> {
    /// Where a connection to a node goes: for `purpose`, avoiding `avoid`, on a node that
    /// keeps what the client was told true.
    fn target<'a>(&'a self, purpose: Purpose, avoid: &'a [Arc<Backend>]) -> Target<'a> {
        Target {
            user: &self.user,
            client: &self.hello,
            revision: self.revision,
            database: &self.session.database,
            purpose,
            max_attempts: self.frontend.gateway.settings.max_attempts(),
            same_as: Some(&self.told),
            avoid,
        }
    }

    /// Sends the running read, none of whose result went out, to another node (see
    /// [`super::retry`]), with the session carried over, within the cluster's attempts
    /// and retry budget. If no node takes it, the client gets what ended it on `old`.
    async fn move_query(&mut self, old: Upstream, why: Moving) -> Step {
        let Some(mut tried) = self
            .running
            .as_ref()
            .and_then(|r| r.retry.as_ref())
            .map(|r| r.tried.clone())
        else {
            return Ok(());
        };
        // The declining node's exception, kept for the client.
        let declined = match why {
            Moving::Declined(packet) => {
                tracing::info!(node = old.backend.label(), user = %self.user.name, exception = %upstream::exception_text(&packet), "Native read declined by its node (a fan-out error); sent to another node");
                METRICS
                    .declined_reads
                    .with_label_values(&[old.backend.label()])
                    .inc();
                Some(packet)
            }
            Moving::Lost(e) => {
                tracing::warn!(node = old.backend.label(), error = %e, "Node connection lost during a read before its result; sent to another node");
                node_lost(&old.backend, e);
                None
            }
        };
        drop(old);
        // Pings the old node did not answer are answered here.
        for _ in 0..std::mem::take(&mut self.pings) {
            self.send_client(&PONG).await?;
        }
        let refusal = loop {
            let up = match upstream::connect(&self.target(Purpose::Read, &tried)).await {
                Ok(up) => up,
                Err(refusal) => break refusal,
            };
            match self.resend(up).await {
                Ok(()) => return Ok(()),
                Err(failed) => tried.push(failed),
            }
        };
        tracing::info!(user = %self.user.name, error = ?refusal, "No other node took the read");
        if let Some(packet) = declined {
            // As the node said it; the next query opens a connection afresh.
            self.send_client(&packet).await?;
            self.observe(Kind::Exception, 0, &packet);
            return Ok(());
        }
        let refusal = Refusal::Gateway(GatewayError::UpstreamFailed {
            reason: "connection lost",
            why: "may have run already",
        });
        if let Some(mut run) = self.running.take() {
            run.finish(Status::Error, Some(refusal.code()));
        }
        self.discarding = true;
        self.send_client(&refusal.packet()).await
    }

    /// The running read's node has said nothing for the hedge bound: while the hedge mode
    /// allows (`degraded`: a node of the cluster is down or unreachable), the read moves to
    /// another node and is killed on this one; otherwise it is looked at again shortly.
    /// If no other node takes it, it stays where it is.
    async fn stalled(&mut self) -> Step {
        let cluster = self.user.cluster.clone();
        let Some(run) = self.running.as_mut() else {
            return Ok(());
        };
        let (Some(bound), Some(retry)) = (run.stall_after, run.retry.as_ref()) else {
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        if cluster.hedging.mode() == HedgeMode::Degraded && !cluster.view().degraded {
            run.stall_at = Some(now + bound.min(route::HEDGE_RECHECK));
            return Ok(());
        }
        let tried = retry.tried.clone();
        let (old, query_id) = (run.backend.clone(), run.query_id.clone());
        let moved = match upstream::connect(&self.target(Purpose::Read, &tried)).await {
            Ok(up) => self.resend(up).await.is_ok(),
            Err(refusal) => {
                tracing::debug!(error = ?refusal, "No other node for a stalled native read");
                false
            }
        };
        let result = if moved { "moved" } else { "no_node" };
        METRICS
            .hedges
            .with_label_values(&[&cluster.name, result])
            .inc();
        let Some(run) = self.running.as_mut() else {
            return Ok(());
        };
        if !moved {
            run.stall_after = None;
            return Ok(());
        }
        tracing::info!(node = old.label(), %query_id, silent = ?bound, "Native read moved off a silent node");
        crate::gateway::kill_query(
            &old,
            &self.user,
            &query_id,
            crate::gateway::Abandoned::Disconnected,
        );
        run.heard();
        // Pings the old node did not answer are answered here.
        for _ in 0..std::mem::take(&mut self.pings) {
            self.send_client(&PONG).await?;
        }
        Ok(())
    }

    /// Replays the session on `up` and sends it the running read again; on failure, the
    /// node that failed.
    async fn resend(&mut self, mut up: Upstream) -> Result<(), Arc<Backend>> {
        let replayed = upstream::replay(
            &mut up,
            &self.session.sets,
            &self.hello,
            &self.user,
            self.revision,
        )
        .await;
        if let Err(e) = replayed {
            tracing::warn!(node = up.backend.label(), error = ?e, "Session could not be restored on the node a read moved to");
            return Err(up.backend);
        }
        let Some(run) = self.running.as_mut() else {
            return Err(up.backend);
        };
        let Some(retry) = run.retry.as_mut() else {
            return Err(up.backend);
        };
        let send_timeout = self.frontend.settings.send_timeout;
        if let Err(e) = write_upstream(&mut up.io, retry.sent(), send_timeout).await {
            up.backend.failed(&UpstreamError::Io(e));
            return Err(up.backend);
        }
        tracing::info!(node = up.backend.label(), query_id = %run.query_id, "Native read sent again on another node");
        retry.moved_to(up.backend.clone());
        run._in_flight = GaugeGuard::new(&up.backend.node.in_flight);
        run.backend = up.backend.clone();
        self.upstream = Some(up);
        Ok(())
    }
}

/// What chgate tells a client about bytes it could not read (`what`: whose).
fn unreadable(what: &str, e: &WalkError) -> Refusal {
    let code = match e {
        WalkError::Unsupported(_) => codes::NOT_IMPLEMENTED,
        _ => codes::UNEXPECTED_PACKET_FROM_CLIENT,
    };
    Refusal::Protocol {
        code,
        message: format!("chgate cannot relay this {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_a_big_packet_grew_is_given_back_with_its_bytes() {
        let mut buf = BytesMut::with_capacity(32 << 20);
        buf.extend_from_slice(b"the next query's start");
        shrink(&mut buf);
        assert_eq!(&buf[..], b"the next query's start");
        assert!(buf.capacity() < 1 << 20, "{}", buf.capacity());
        // The usual room is kept; so is a big buffer still holding much.
        let mut usual = BytesMut::with_capacity(READ_CHUNK);
        shrink(&mut usual);
        assert_eq!(usual.capacity(), READ_CHUNK);
        let mut full = BytesMut::with_capacity(32 << 20);
        full.resize(READ_CHUNK + 1, 7);
        shrink(&mut full);
        assert!(full.capacity() >= 32 << 20);
    }
}
