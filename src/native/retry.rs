//! A native read that may still move to another node: what it keeps while none of its
//! result has reached the client, so that a node which cannot answer it is replaced and
//! the query sent again, as the HTTP frontend does (see `route::Attempt::Declined`).
//!
//! A node "cannot answer" a read when it ends it with an exception saying it could not
//! reach a node the query needed (a fan-out error: a shard's replicas down, for a
//! Distributed table; [`codes::is_fan_out_error`]), or when its connection is lost.
//!
//! Before its first row, a read's answer is a header block (the columns, no rows),
//! Progress packets and perhaps Log blocks. They go on to the client as they come, so a
//! progress bar keeps moving, and what went is remembered: when the query runs again
//! elsewhere, the new node's header is dropped (the client has one) and its progress is
//! passed on only beyond the totals the client was already given, so no row is counted
//! twice. The first packet that is more than that (rows, totals, extremes, profile info,
//! the end, another exception) settles the query where it is. Meanwhile only whole
//! packets go on (a header is small; a packet that grows past [`HOLD_MAX`] without ending
//! is a result, and settles the query).

use std::sync::Arc;

use crate::clickhouse::codes;
use crate::clickhouse::native::server::Kind;
use crate::clickhouse::native::Reader;
use crate::clickhouse::rowbinary::write_varint;
use crate::picker::Backend;

/// While a query may move, at most this many bytes of a node's packet wait to be whole.
pub const HOLD_MAX: usize = 1 << 20;

/// The figures of a Progress packet at the revisions chgate speaks (rows, bytes, total
/// rows to read), as deltas the client adds up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress([u64; 3]);

impl Progress {
    /// Reads a whole Progress packet (its type included).
    pub fn read(packet: &[u8]) -> Option<Progress> {
        let mut r = Reader::new(packet);
        r.varuint().ok()?;
        let mut p = [0; 3];
        for v in &mut p {
            *v = r.varuint().ok()?;
        }
        Some(Progress(p))
    }

    fn packet(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        write_varint(&mut out, 3);
        for v in self.0 {
            write_varint(&mut out, v);
        }
        out
    }

    fn is_zero(&self) -> bool {
        self.0 == [0; 3]
    }
}

/// What to do with one whole packet from the node.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on as it is.
    Forward,
    /// Pass this on instead (progress beyond what the client was given).
    Replace(Vec<u8>),
    /// The client has it already.
    Drop,
    /// Send the query to another node: this exception is what the client gets if none
    /// does better.
    Move,
}

/// A read's retry state, from its Query until it ends.
pub struct Retry {
    /// The Query as the nodes get it, then the client's bytes that followed it (external
    /// tables and the empty block that ends them): what a new node is sent. Emptied
    /// once the query settles.
    sent: Vec<u8>,
    /// The most bytes `sent` may hold; past it the query settles.
    limit: usize,
    /// The query may still move.
    movable: bool,
    /// Nodes the query was sent to, the current one last.
    pub tried: Vec<Arc<Backend>>,
    /// A header block went to the client.
    header_given: bool,
    /// The current node's header came (and went on, or was dropped).
    header_seen: bool,
    /// Progress totals the client was given.
    given: Progress,
    /// Progress totals the current node reported.
    reported: Progress,
}

impl Retry {
    /// The state of a read sent to `backend` as `query` (the Query packet's bytes).
    pub fn new(query: Vec<u8>, backend: Arc<Backend>, limit: usize) -> Retry {
        let movable = query.len() <= limit;
        Retry {
            sent: if movable { query } else { Vec::new() },
            limit,
            movable,
            tried: vec![backend],
            header_given: false,
            header_seen: false,
            given: Progress::default(),
            reported: Progress::default(),
        }
    }

    /// Whether the query may still move (and the node's packets go on only whole).
    pub fn movable(&self) -> bool {
        self.movable
    }

    /// The bytes a new node is sent: the query and what followed it.
    pub fn sent(&self) -> &[u8] {
        &self.sent
    }

    /// The client's bytes that went to the node after the query.
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if !self.movable {
            return;
        }
        if self.sent.len() + bytes.len() > self.limit {
            self.settle();
        } else {
            self.sent.extend_from_slice(bytes);
        }
    }

    /// The query stays where it is from now on.
    pub fn settle(&mut self) {
        self.movable = false;
        self.sent = Vec::new();
    }

    /// The query went to `backend` as its next node.
    pub fn moved_to(&mut self, backend: Arc<Backend>) {
        self.tried.push(backend);
        self.header_seen = false;
        self.reported = Progress::default();
    }

    /// Whether the query ran on more than one node (its progress is adjusted then).
    fn moved(&self) -> bool {
        self.tried.len() > 1
    }

    /// Whether [`Retry::verdict`] has anything to say: the query may move, or it did.
    pub fn active(&self) -> bool {
        self.movable || self.moved()
    }

    /// What to do with a whole packet of `kind` (`rows` rows) from the current node.
    pub fn verdict(&mut self, kind: Kind, rows: u64, packet: &[u8]) -> Verdict {
        match kind {
            Kind::Progress if self.moved() => self.progress(packet),
            Kind::Progress | Kind::Log | Kind::Pong => Verdict::Forward,
            Kind::Data if rows == 0 && !self.header_seen => {
                self.header_seen = true;
                if std::mem::replace(&mut self.header_given, true) {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            }
            Kind::Exception if self.movable && fan_out_code(packet) => Verdict::Move,
            _ => {
                self.settle();
                Verdict::Forward
            }
        }
    }

    /// A Progress packet from a node after the first: only what goes beyond the totals
    /// the client has, per figure.
    fn progress(&mut self, packet: &[u8]) -> Verdict {
        let Some(delta) = Progress::read(packet) else {
            return Verdict::Forward;
        };
        let mut out = Progress::default();
        for i in 0..3 {
            let before = self.reported.0[i];
            let after = before.saturating_add(delta.0[i]);
            self.reported.0[i] = after;
            let given = self.given.0[i];
            out.0[i] = after.max(given) - before.max(given);
            self.given.0[i] = given.max(after);
        }
        if out.is_zero() {
            Verdict::Drop
        } else {
            Verdict::Replace(out.packet())
        }
    }

    /// A Progress packet went on to the client unchanged (from the first node).
    pub fn forwarded(&mut self, kind: Kind, packet: &[u8]) {
        if kind != Kind::Progress || self.moved() {
            return;
        }
        if let Some(p) = Progress::read(packet) {
            for i in 0..3 {
                self.given.0[i] = self.given.0[i].saturating_add(p.0[i]);
            }
        }
    }
}

/// Whether an Exception packet's code says the node could not reach a node the query
/// needed.
fn fan_out_code(packet: &[u8]) -> bool {
    let mut r = Reader::new(packet);
    let code = (|| {
        r.varuint().ok()?;
        r.u32_le().ok()
    })();
    code.is_some_and(codes::is_fan_out_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::native::server::write_exception;

    fn backend(host: &str) -> Arc<Backend> {
        let config = crate::config::UpstreamConfig::default();
        Arc::new(Backend::new(crate::upstream::Node::new(
            host, 8123, 9000, &config,
        )))
    }

    fn progress(rows: u64, bytes: u64, total: u64) -> Vec<u8> {
        Progress([rows, bytes, total]).packet()
    }

    fn exception(code: i32) -> Vec<u8> {
        let mut out = Vec::new();
        write_exception(&mut out, code, "DB::Exception: test");
        out
    }

    #[test]
    fn a_fan_out_exception_before_any_row_moves_the_query() {
        let mut r = Retry::new(b"query".to_vec(), backend("127.0.0.251"), 100);
        assert_eq!(r.verdict(Kind::Data, 0, b""), Verdict::Forward, "header");
        assert_eq!(
            r.verdict(Kind::Progress, 0, &progress(10, 80, 100)),
            Verdict::Forward
        );
        r.forwarded(Kind::Progress, &progress(10, 80, 100));
        assert_eq!(
            r.verdict(Kind::Exception, 0, &exception(279)),
            Verdict::Move
        );
        r.client_bytes(b"+data");
        assert_eq!(r.sent(), b"query+data");
        r.moved_to(backend("127.0.0.252"));
        // The new node's header is dropped; its progress goes on past what was given.
        assert_eq!(r.verdict(Kind::Data, 0, b""), Verdict::Drop);
        assert_eq!(
            r.verdict(Kind::Progress, 0, &progress(4, 32, 100)),
            Verdict::Drop
        );
        assert_eq!(
            r.verdict(Kind::Progress, 0, &progress(10, 80, 0)),
            Verdict::Replace(progress(4, 32, 0))
        );
        assert_eq!(
            r.verdict(Kind::Progress, 0, &progress(5, 40, 0)),
            Verdict::Replace(progress(5, 40, 0))
        );
        // The first row settles it; an exception after that is the client's.
        assert_eq!(r.verdict(Kind::Data, 3, b""), Verdict::Forward);
        assert!(!r.movable());
        assert!(r.sent().is_empty());
        assert_eq!(
            r.verdict(Kind::Exception, 0, &exception(210)),
            Verdict::Forward
        );
    }

    #[test]
    fn other_exceptions_and_ends_settle_it() {
        let mut r = Retry::new(b"q".to_vec(), backend("127.0.0.251"), 100);
        assert_eq!(
            r.verdict(Kind::Exception, 0, &exception(60)),
            Verdict::Forward
        );
        assert!(!r.movable());
        let mut r = Retry::new(b"q".to_vec(), backend("127.0.0.251"), 100);
        assert_eq!(r.verdict(Kind::EndOfStream, 0, b""), Verdict::Forward);
        assert!(!r.active(), "never moved: nothing more to adjust");
        let mut r = Retry::new(b"q".to_vec(), backend("127.0.0.251"), 100);
        assert_eq!(r.verdict(Kind::ProfileInfo, 0, b""), Verdict::Forward);
        assert!(!r.movable());
    }

    #[test]
    fn too_much_to_keep_settles_it() {
        let r = Retry::new(vec![0; 101], backend("127.0.0.251"), 100);
        assert!(!r.movable());
        let mut r = Retry::new(vec![0; 60], backend("127.0.0.251"), 100);
        r.client_bytes(&[0; 40]);
        assert!(r.movable());
        r.client_bytes(&[0; 1]);
        assert!(!r.movable());
        assert!(r.sent().is_empty());
        let mut garbage = exception(279);
        garbage.truncate(3);
        let mut r = Retry::new(b"q".to_vec(), backend("127.0.0.251"), 100);
        assert_eq!(r.verdict(Kind::Exception, 0, &garbage), Verdict::Forward);
    }
}
