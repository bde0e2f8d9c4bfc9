//! Reading just enough of a request to know what its statement is, and keeping a small
//! read's body whole so the gateway can send it again elsewhere.
//!
//! The `query` parameter comes first; ClickHouse appends the body to it, so the body only
//! matters while the parameter is blank or a comment. A body the frontend cannot read
//! (compressed: `Content-Encoding`, or ClickHouse's own block format with `decompress=1`)
//! makes the statement [`Statement::Unknown`].

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;

use super::error::HttpError;
use crate::gateway::sql::{classify, StatementKind};
use crate::gateway::Statement;
use crate::upstream::Body;

/// Bytes of a request body read at most to find the first keyword of the statement.
const SNIFF_LIMIT: usize = 64 * 1024;

/// What is read and dropped of a refused request's body, at most.
const DISCARD_LIMIT: usize = 1 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(1);

/// A request's statement and the part of its body read to find it.
pub struct Sniffed {
    pub statement: Statement,
    head: BytesMut,
    ended: bool,
}

/// Reads the body (up to [`SNIFF_LIMIT`], within `time`) until the statement is known.
/// `param` is the decoded `query` parameter; `opaque` says the body cannot be read.
pub async fn statement(
    body: &mut Incoming,
    param: Option<&str>,
    opaque: bool,
    time: Duration,
) -> Result<Sniffed, HttpError> {
    let mut head = BytesMut::new();
    let mut ended = body.is_end_stream();
    let param = param.unwrap_or("").as_bytes();
    let mut kind = classify(param, ended);
    if kind == StatementKind::Incomplete && opaque {
        return Ok(Sniffed {
            statement: Statement::Unknown,
            head,
            ended,
        });
    }
    let deadline = tokio::time::Instant::now() + time;
    // The body so far is looked at again only once it has doubled (or is all there): a
    // body sent a byte at a time costs linear time, not quadratic.
    let mut looked_at = 0;
    while kind == StatementKind::Incomplete {
        ended = tokio::time::timeout_at(deadline, read_more(body, &mut head, SNIFF_LIMIT))
            .await
            .map_err(|_| late("the statement", time))??;
        let complete = ended || head.len() >= SNIFF_LIMIT;
        if !complete && head.len() < 2 * looked_at {
            continue;
        }
        looked_at = head.len();
        kind = if param.is_empty() {
            classify(&head, complete)
        } else {
            let mut joined = Vec::with_capacity(param.len() + 1 + head.len());
            joined.extend_from_slice(param);
            joined.push(b'\n');
            joined.extend_from_slice(&head);
            classify(&joined, complete)
        };
    }
    let statement = if kind == StatementKind::Read {
        Statement::Read
    } else {
        Statement::Write
    };
    Ok(Sniffed {
        statement,
        head,
        ended,
    })
}

/// The request body across attempts: a kept body can be sent any number of times, a
/// streamed one once.
pub enum Payload {
    Replayable(Bytes),
    Streaming(Option<Body>),
}

impl Payload {
    pub fn replayable(&self) -> bool {
        matches!(self, Payload::Replayable(_))
    }

    /// The body for the next attempt; `None` once a streamed body has gone.
    pub fn next_body(&mut self) -> Option<Body> {
        match self {
            Payload::Replayable(b) => Some(Body::full(b.clone())),
            Payload::Streaming(body) => body.take(),
        }
    }
}

impl Sniffed {
    /// The body to send: a read of at most `limit` bytes is read whole (so it can be sent
    /// again) within `time`; anything else streams on after what was read. `counted` takes
    /// the client's request bytes.
    pub async fn payload(
        mut self,
        mut body: Incoming,
        limit: usize,
        time: Duration,
        counted: &IntCounter,
    ) -> Result<Payload, HttpError> {
        if self.statement.is_read() && !self.ended {
            let deadline = tokio::time::Instant::now() + time;
            let whole = async {
                self.ended = read_more(&mut body, &mut self.head, limit).await?;
                while !self.ended && self.head.len() < limit {
                    self.ended = read_more(&mut body, &mut self.head, limit).await?;
                }
                Ok::<_, HttpError>(())
            };
            tokio::time::timeout_at(deadline, whole)
                .await
                .map_err(|_| late("the request body", time))??;
        }
        let head = self.head.freeze();
        counted.inc_by(head.len() as u64);
        Ok(if self.ended {
            Payload::Replayable(head)
        } else {
            Payload::Streaming(Some(Body::Stream {
                head: (!head.is_empty()).then_some(head),
                rest: body,
                counted: counted.clone(),
            }))
        })
    }
}

/// The error for a body whose `what` did not arrive within `time`.
fn late(what: &str, time: Duration) -> HttpError {
    HttpError::RequestBody(format!(
        "{what} did not arrive within {:?} (proxy.http_receive_timeout)",
        time
    ))
}

/// Reads body frames into `buf` until it holds more than it did, the body ends (returns
/// true) or `buf` reaches `limit`.
async fn read_more(
    body: &mut Incoming,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<bool, HttpError> {
    let before = buf.len();
    while buf.len() == before && buf.len() < limit {
        match body.frame().await {
            None => return Ok(true),
            Some(Err(e)) => return Err(HttpError::RequestBody(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(body.is_end_stream())
}

/// Reads and drops what is left of a refused request's body (up to `DISCARD_LIMIT`
/// bytes or `DISCARD_TIME`): a client still sending it would otherwise have the connection
/// closed under it (seen as "channel closed") instead of reading the answer.
pub async fn discard(body: &mut Incoming) {
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
