//! One HTTP/1.1 connection to a node, and why using one failed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::Body;
use crate::wake::Passes;

/// Why talking to a node failed, and so whether the request may go elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection refused or unreachable: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connection timed out")]
    ConnectTimeout,
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("request failed: {0}")]
    Send(#[source] hyper::Error),
    /// The connection closed before the request was written: the node is not at fault and
    /// the request can go anywhere.
    #[error("connection closed before the request was sent")]
    Stale,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the answer failed: {0}")]
    Body(#[source] hyper::Error),
    /// A native-protocol connection failed after it was open.
    #[error("the connection failed: {0}")]
    Io(#[source] std::io::Error),
    /// A native-protocol node answered with something chgate cannot take.
    #[error("{0}")]
    Protocol(String),
}

impl UpstreamError {
    /// True if this says something about the node's health (a stale pooled connection
    /// does not).
    pub fn node_at_fault(&self) -> bool {
        !matches!(self, Self::Stale)
    }

    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handshake(_) => "handshake",
            Self::Send(_) => "send",
            Self::Stale => "stale_connection",
            Self::Timeout(_) => "timeout",
            Self::Body(_) => "body",
            Self::Io(_) => "io",
            Self::Protocol(_) => "protocol",
        }
    }

    /// A connection that was used before closed after the request went out and before any
    /// of the answer came back: most likely the server closing an idle keep-alive
    /// connection just as the request arrived (it never read it), though a crash at that
    /// moment looks the same.
    fn closed_unanswered(&self) -> bool {
        matches!(self, Self::Send(e) if e.is_incomplete_message())
    }
}

/// A failed send: why, and the request if it never left.
pub struct SendFailure {
    pub error: UpstreamError,
    pub unsent: Option<http::Request<Body>>,
}

impl SendFailure {
    /// The request never reached the node and comes back whole.
    pub fn unsent(error: UpstreamError, req: http::Request<Body>) -> Self {
        Self {
            error,
            unsent: Some(req),
        }
    }
}

type Conn = Connection<TokioIo<TcpStream>, Body>;

/// One HTTP/1.1 connection to a node, driven by whichever task is using it.
///
/// hyper's usual pattern spawns the connection as its own task and passes response bodies
/// through a channel. Here the request's task polls the connection itself, right before it
/// polls the body: a small response's data and its end then arrive in the same turn and
/// leave in one write to the client, with no cross-task wake-up in between (measured: one
/// `writev` and ~10% CPU less per `SELECT 1`). Idle pooled connections are polled by no
/// one; checkout polls them once, which notices a connection the server closed meanwhile.
///
/// Everything that waits on the connection (the request channel, the response, the body's
/// channel) is woken by the connection itself, which is polled in the same task: see
/// [`Self::drive`].
pub struct Upstream {
    sender: SendRequest<Body>,
    /// `None` once the connection has ended. Invariant: it is dropped right then, which
    /// cancels whatever waits on it (readiness, a response): keeping a completed
    /// connection around would leave those futures pending forever.
    conn: Option<Pin<Box<Conn>>>,
    /// Taken from the pool: it carried a request before.
    pub(super) reused: bool,
    /// The connection and what waits on it are polled through this (see [`Self::drive`]).
    passes: Passes,
    /// The socket's descriptor, open while `conn` is (see [`Self::socket_duplicate`]).
    fd: std::os::fd::RawFd,
}

impl Upstream {
    pub(super) fn new(sender: SendRequest<Body>, conn: Conn, fd: std::os::fd::RawFd) -> Self {
        Self {
            sender,
            conn: Some(Box::pin(conn)),
            reused: false,
            passes: Passes::default(),
            fd,
        }
    }

    /// A descriptor of its own for the socket (a duplicate), while the connection is open:
    /// the quota watchdog in `http::body` reads a stalled answer through it. `None` once
    /// the connection has ended (its socket closed, the number possibly reused).
    pub fn socket_duplicate(&self) -> Option<std::os::fd::OwnedFd> {
        self.conn.as_ref()?;
        // SAFETY: `conn` owns the socket and is alive (checked just above, and `&self` keeps
        // it so for this call), so `fd` is an open descriptor of this connection.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        socket.try_clone_to_owned().ok()
    }

    /// Polls `f`, which drives this connection and whatever waits on it, for the task
    /// polling with `cx`: the connection wakes that same task while it runs (handing it a
    /// request wakes its request receiver, delivering the response head wakes the
    /// response's receiver, taking a body frame frees the body channel), and those wakes
    /// are another pass here rather than a reschedule of the running task (see
    /// [`crate::wake`]). Measured on `SELECT 1`, 8 connections, 2 workers: 0.85 such
    /// reschedules per request, each waking the idle worker (futex 2.8 and 4.1 context
    /// switches per request, nginx 0 and 2.5).
    pub fn drive<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let passes = self.passes.clone();
        passes.poll(cx, |cx| f(self, cx))
    }

    /// Drives reads and writes on the connection; false once it has ended.
    pub fn poll_conn(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match conn.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                self.conn = None;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "Upstream connection ended with an error");
                }
                false
            }
        }
    }

    /// Sends a request and waits for the response head, driving the connection meanwhile.
    /// If the request was never written, it comes back with the error, body untouched.
    pub async fn send(
        &mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        let ready = std::future::poll_fn(|cx| {
            self.drive(cx, |up, cx| {
                up.poll_conn(cx);
                up.sender.poll_ready(cx)
            })
        })
        .await;
        if ready.is_err() {
            return Err(SendFailure::unsent(UpstreamError::Stale, req));
        }
        // Handing over the request wakes the connection's receiver, which the next `drive`
        // polls anyway: not a wake for the task.
        let mut response =
            std::pin::pin!(self.passes.quietly(|| self.sender.try_send_request(req)));
        std::future::poll_fn(|cx| {
            self.drive(cx, |up, cx| {
                up.poll_conn(cx);
                response.as_mut().poll(cx)
            })
        })
        .await
        .map_err(|mut e| match e.take_message() {
            Some(req) => SendFailure::unsent(UpstreamError::Stale, req),
            None => SendFailure {
                error: UpstreamError::Send(e.into_error()),
                unsent: None,
            },
        })
    }

    /// Reads a whole (small) response body, driving the connection meanwhile: this task
    /// owns it. For probes, queries and inserts, not for proxied responses (those stream).
    pub async fn read_body(&mut self, body: Incoming) -> Result<bytes::Bytes, hyper::Error> {
        use http_body::Body as _;
        let mut body = body;
        let mut out = bytes::BytesMut::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                self.drive(cx, |up, cx| {
                    up.poll_conn(cx);
                    Pin::new(&mut body).poll_frame(cx)
                })
            })
            .await;
            match frame {
                None => return Ok(out.freeze()),
                Some(Err(e)) => return Err(e),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        out.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// True if another request can go on this connection.
    pub fn reusable(&self) -> bool {
        self.conn.is_some() && !self.sender.is_closed()
    }

    /// Whether a failure of a request on this connection is worth one more try on a fresh
    /// connection to the same node (see [`super::Node::exchange`]).
    pub(super) fn worth_a_fresh_try(&self, error: &UpstreamError) -> bool {
        matches!(error, UpstreamError::Stale) || (self.reused && error.closed_unanswered())
    }
}
