//! The properties chgate's native-protocol readers (`chgate::clickhouse::native`) keep on
//! any bytes whatsoever. Checked by the `native_packets` fuzz target and, over the stored
//! seeds and regressions, by `tests/native_corpus.rs`: both include this file with
//! `#[path]`, so they check the very same things. A violation panics.
//!
//! An input is two selector bytes, then the bytes walked:
//!
//! - byte 0: bits 0-2 pick the revision ([`REVISIONS`]); bit 3, compressed blocks; bit 4,
//!   a `LowCardinality` without rows written as one granule (servers before 19.1); bits 5
//!   and 6, a bare block's framing (`BlockInfo`, custom serialization); bit 7, the client's
//!   bytes start with its Hello;
//! - byte 1, `b`: a relay receives the bytes `1 + b²` at a time.
//!
//! The bytes are walked every way: as a server's stream, packet after packet; as a
//! client's (its Hello, Queries, then Data, Cancel, Ping); each of those whole, and as a
//! relay receiving the bytes a few at a time with one reader keeping its state; as blocks
//! of the Native format one after another; as a lone client Hello, Query and server Hello.
//! For every walk that succeeds:
//!
//! - its length is not zero and within the bytes (never an over-read);
//! - the same walk over exactly those bytes gives the same answer, and over any fewer it
//!   is `Incomplete`: a relay waits for more, never refuses what it would accept later;
//! - what is written back is read back the same (Hellos, Query, Exception).
//!
//! And a reader that keeps state between calls (a compressed block's frames resumed)
//! answers every call as a new reader would: a relay receiving the stream a few bytes at a
//! time finds the same packets, and stops at the same error, as one walk over all of it,
//! including the packets whose end it knew early and passed on as a tail.
//! Hangs are left to the fuzzer's `-timeout`.

use std::fmt::Debug;

use chgate::clickhouse::native::client::{Hello, Query};
use chgate::clickhouse::native::server::{
    write_exception, ClientKind, ClientPacket, HelloAnswer, Packet, ServerHello, ServerPackets,
    Session,
};
use chgate::clickhouse::native::tail::Tail;
use chgate::clickhouse::native::{walk_block, Framing, WalkError};

/// The revisions byte 0 picks from: 18.16's (what chgate negotiates at most); some at
/// which a packet's fields change (quota key, version patch, `TableColumns`); one above
/// what chgate reads (refused); one before blocks had `BlockInfo`; one before Queries had
/// `ClientInfo`.
pub const REVISIONS: [u64; 8] = [54412, 54060, 54401, 54405, 54410, 54429, 51902, 54031];

/// What the walks of one input found (so the corpus test can tell that the seeds still
/// walk as far as they were made to).
// The fuzz target reads none of it.
#[allow(dead_code)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Server packets walked, one after another from the start.
    pub server_packets: usize,
    /// Client packets walked, one after another from the start.
    pub client_packets: usize,
    /// Blocks of the Native format walked, one after another from the start.
    pub blocks: usize,
    /// A lone client Hello, Query or server Hello read at the start.
    pub lone: usize,
}

/// Checks every property over `data` (selector bytes, then the bytes walked).
pub fn check(data: &[u8]) -> Found {
    let Some((&[select, chunk], bytes)) = data.split_first_chunk::<2>() else {
        return Found::default();
    };
    let revision = REVISIONS[usize::from(select & 7)];
    let session = Session {
        revision,
        compression: select & 8 != 0,
        empty_low_cardinality_granule: select & 16 != 0,
    };
    let framing = Framing {
        block_info: select & 32 != 0,
        custom_serialization: select & 64 != 0,
        empty_low_cardinality_granule: session.empty_low_cardinality_granule,
    };
    let chunk = 1 + usize::from(chunk).pow(2);
    let server = || Server {
        packets: ServerPackets::default(),
        session,
    };
    let client = || Client {
        packets: ServerPackets::default(),
        session,
        hello_read: select & 128 == 0,
    };
    Found {
        server_packets: stream("server packet", bytes, server, chunk),
        client_packets: stream("client packet", bytes, client, chunk),
        blocks: blocks(bytes, framing),
        lone: lone(bytes, &session),
    }
}

/// Where to cut a walk of `len` bytes to check that a shorter walk is incomplete: at every
/// byte of a short one; else at spread bytes, and at each of the first and last few.
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    let step = (len / 24).max(1);
    (0..len).filter(move |&cut| len <= 48 || cut < 8 || cut % step == 0 || cut + 8 >= len)
}

/// Walks `buf` with `walk` (a new reader each call) and checks what a successful walk must
/// keep (see the module doc); the walk's answer over `buf`.
fn stable<'a, T: Clone + PartialEq + Debug>(
    what: &str,
    buf: &'a [u8],
    walk: impl Fn(&'a [u8]) -> Result<(T, usize), WalkError>,
) -> Result<(T, usize), WalkError> {
    let got = walk(buf);
    if let Ok((_, len)) = &got {
        let len = *len;
        assert!(
            len > 0 && len <= buf.len(),
            "{what}: a length of {len} out of {} bytes",
            buf.len()
        );
        assert_eq!(walk(&buf[..len]), got, "{what}: over its own {len} bytes");
        for cut in cuts(len) {
            assert_eq!(
                walk(&buf[..cut]),
                Err(WalkError::Incomplete),
                "{what}: cut at {cut} of its {len} bytes"
            );
        }
    }
    got
}

/// A reader of packets one after another, keeping what it must between them.
trait Stream {
    type Packet: Copy + PartialEq + Debug;
    /// The packet at the start of `buf` and its length.
    fn next(&mut self, buf: &[u8]) -> Result<(Self::Packet, usize), WalkError>;
    /// A new reader in the state this one is in between packets: the same session and
    /// answer's block layout, none of the decompressed frames kept for a packet not yet
    /// whole.
    fn renewed(&self) -> Self;
    /// After `next` found a packet incomplete: its end, if known all the same, as where
    /// its rest starts and a [`Tail`] to find that rest's end.
    fn take_tail(&mut self) -> Option<(usize, Tail)> {
        None
    }
    /// The packet a tail ended, `len` bytes long.
    fn tail_packet(_tail: &Tail, _len: usize) -> Option<Self::Packet> {
        None
    }
    /// A tail this reader made ended: what it learned goes back to the reader, as the
    /// relay gives it back.
    fn tail_done(&mut self, _tail: Tail) {}
}

/// The server's side: [`ServerPackets::next`].
struct Server {
    packets: ServerPackets,
    session: Session,
}

impl Stream for Server {
    type Packet = Packet;

    fn next(&mut self, buf: &[u8]) -> Result<(Packet, usize), WalkError> {
        self.packets.next(buf, &self.session).map(|p| (p, p.len))
    }

    fn renewed(&self) -> Self {
        Server {
            packets: self.packets.renewed(),
            session: self.session,
        }
    }

    fn take_tail(&mut self) -> Option<(usize, Tail)> {
        self.packets.take_tail()
    }

    fn tail_packet(tail: &Tail, len: usize) -> Option<Packet> {
        Some(Packet {
            kind: tail.kind,
            len,
            rows: tail.rows,
        })
    }

    fn tail_done(&mut self, tail: Tail) {
        self.packets.give_back(tail);
    }
}

/// A client packet as the relay reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientItem {
    Hello,
    /// Whether the query's blocks are compressed.
    Query(bool),
    /// Data, Cancel or Ping: [`ServerPackets::next_client`].
    Other(ClientPacket),
}

/// The client's side, as the relay reads it: its Hello first, then Queries (read whole,
/// each saying whether the blocks after it are compressed) and the packets between.
struct Client {
    packets: ServerPackets,
    session: Session,
    hello_read: bool,
}

impl Stream for Client {
    type Packet = ClientItem;

    fn next(&mut self, buf: &[u8]) -> Result<(ClientItem, usize), WalkError> {
        if !self.hello_read {
            let (_, len) = Hello::read(buf)?;
            self.hello_read = true;
            return Ok((ClientItem::Hello, len));
        }
        let p = self.packets.next_client(buf, &self.session)?;
        match p.kind {
            ClientKind::Hello | ClientKind::Query => {
                // Only their type was read: they are read whole elsewhere.
                assert_eq!(p.len, 0, "a client {:?} with a length", p.kind);
                if p.kind == ClientKind::Hello {
                    return Err(WalkError::Malformed("a second Hello"));
                }
                let (query, len) = Query::read(buf, self.session.revision)?;
                self.session.compression = query.compression;
                Ok((ClientItem::Query(query.compression), len))
            }
            _ => Ok((ClientItem::Other(p), p.len)),
        }
    }

    fn renewed(&self) -> Self {
        Client {
            packets: self.packets.renewed(),
            session: self.session,
            hello_read: self.hello_read,
        }
    }
}

/// Walks `bytes` packet after packet with one reader, each packet checked (against a new
/// reader too); then again as a relay that receives them `chunk` bytes at a time and walks
/// what it has after each read, which must find the same packets and stop the same way.
/// How many packets were found.
fn stream<S: Stream>(what: &str, bytes: &[u8], new: impl Fn() -> S, chunk: usize) -> usize {
    let mut reader = new();
    let mut found = Vec::new();
    let mut at = 0;
    let end = loop {
        if at == bytes.len() {
            break Ok(());
        }
        let rest = &bytes[at..];
        let expected = stable(what, rest, |b| reader.renewed().next(b));
        let got = reader.next(rest);
        assert_eq!(
            got,
            expected,
            "{what} {} at byte {at}: a reader with state differs from a new one",
            found.len()
        );
        match got {
            Ok((packet, len)) => {
                found.push((packet, len));
                at += len;
            }
            Err(e) => break Err(e),
        }
    };
    // At most about 64 reads, however long the bytes: each walks the packet from its start.
    let chunk = chunk.max(bytes.len() / 64 + 1);
    let mut relay = new();
    let (mut at, mut received, mut seen) = (0, 0, 0);
    let relay_end = loop {
        if at == received {
            if received == bytes.len() {
                break Ok(());
            }
            received = bytes.len().min(received + chunk);
            continue;
        }
        match relay.next(&bytes[at..received]) {
            Ok((packet, len)) => {
                assert_eq!(
                    found.get(seen),
                    Some(&(packet, len)),
                    "{what} {seen} at byte {at}, received {chunk} bytes at a time, \
                     differs from the walk over all the bytes"
                );
                seen += 1;
                at += len;
            }
            Err(WalkError::Incomplete) if received < bytes.len() => {
                let Some((from, mut tail)) = relay.take_tail() else {
                    received = bytes.len().min(received + chunk);
                    continue;
                };
                // The rest of the packet passes as it comes: where it ends must be where
                // the walk over all the bytes found it to end.
                let mut end = at + from;
                assert!(end <= received, "{what}: a tail that starts past the bytes");
                let passed = loop {
                    match tail.feed(&bytes[end..received]) {
                        Ok((n, true)) => break Ok(end + n),
                        Ok((n, false)) => {
                            // A block walked as it comes leaves an item the bytes cut off
                            // (a few bytes, a column's name and type at most) for the next.
                            end += n;
                            assert!(
                                received - end < 16 << 20,
                                "{what}: a tail left {} bytes unread",
                                received - end
                            );
                            if received == bytes.len() {
                                break Err(WalkError::Incomplete);
                            }
                            received = bytes.len().min(received + chunk);
                        }
                        Err(e) => break Err(e),
                    }
                };
                match passed {
                    Ok(end) => {
                        let packet = S::tail_packet(&tail, end - at).expect("a tail's packet");
                        assert_eq!(
                            found.get(seen),
                            Some(&(packet, end - at)),
                            "{what} {seen} at byte {at}, passed as a tail {chunk} bytes at \
                             a time, differs from the walk over all the bytes"
                        );
                        seen += 1;
                        at = end;
                        relay.tail_done(tail);
                    }
                    Err(e) => break Err(e),
                }
            }
            Err(e) => break Err(e),
        }
    };
    // A block passed on as a tail that walks its frames as they come decompresses a frame
    // as soon as the walk's next item runs into it; a walk of all the bytes at once may
    // first see that the item's length runs past every frame at hand and wait. So where
    // that walk waits, the tail may already have found the frame unreadable: the same
    // stop, found earlier, as the waiting walk must read that frame to go on.
    let earlier = matches!(
        (&relay_end, &end),
        (Err(e), Err(WalkError::Incomplete)) if *e != WalkError::Incomplete
    );
    // Likewise where both refuse the same packet: a walk of all the bytes may first find
    // a later frame's header impossible, the tail (which reads each frame as it comes) an
    // earlier frame undecodable. The same refusal; only the reason named differs.
    let both_refuse = matches!(
        (&relay_end, &end),
        (Err(WalkError::Malformed("an LZ4 frame that does not decompress")), Err(e))
            if *e != WalkError::Incomplete
    );
    if !((earlier || both_refuse) && seen == found.len()) {
        assert_eq!(
            (seen, relay_end),
            (found.len(), end),
            "{what}s received {chunk} bytes at a time end otherwise than those walked at once"
        );
    }
    found.len()
}

/// Walks `bytes` as blocks of the Native format one after another, each checked; how many.
fn blocks(bytes: &[u8], framing: Framing) -> usize {
    let (mut at, mut n) = (0, 0);
    while at < bytes.len() {
        let walked = stable("a block", &bytes[at..], |b| {
            walk_block(b, framing).map(|block| (block, block.len))
        });
        match walked {
            Ok((_, len)) => {
                at += len;
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

/// Reads `bytes` as a lone client Hello, Query and server Hello, and the first client
/// packet as [`ServerPackets::next_client`] sees it; each read checked, and what reads
/// written back and read again. How many read.
fn lone(bytes: &[u8], session: &Session) -> usize {
    let revision = session.revision;
    let mut n = 0;
    if let Ok((hello, _)) = stable("a client Hello", bytes, Hello::read) {
        let mut out = Vec::new();
        hello.write(&mut out);
        assert_eq!(
            Hello::read(&out),
            Ok((hello, out.len())),
            "a client Hello written back"
        );
        n += 1;
    }
    if let Ok((query, _)) = stable("a Query", bytes, |b| Query::read(b, revision)) {
        let mut out = Vec::new();
        query.write(&mut out, revision);
        assert_eq!(
            Query::read(&out, revision),
            Ok((query, out.len())),
            "a Query written back"
        );
        n += 1;
    }
    let answer = stable("a server Hello", bytes, |b| ServerHello::read(b, revision));
    if let Ok((answer, _)) = answer {
        let mut out = Vec::new();
        match &answer {
            // As chgate tells its own Hello to a client of this revision (no lower than
            // the server's own, as with any real server).
            HelloAnswer::Hello(hello) if hello.revision >= revision => {
                hello.write(&mut out, revision)
            }
            HelloAnswer::Hello(_) => {}
            HelloAnswer::Refused { code, message } => write_exception(&mut out, *code, message),
        }
        if !out.is_empty() {
            assert_eq!(
                ServerHello::read(&out, revision),
                Ok((answer, out.len())),
                "a server Hello written back"
            );
        }
        n += 1;
    }
    // Hello and Query are read whole elsewhere: only their type is read, and their length
    // is 0; any other packet has one within the bytes.
    if let Ok(p) = ServerPackets::default().next_client(bytes, session) {
        let whole = matches!(p.kind, ClientKind::Hello | ClientKind::Query);
        assert!(
            (p.len == 0) == whole && p.len <= bytes.len(),
            "a client {:?} of {} bytes out of {}",
            p.kind,
            p.len,
            bytes.len()
        );
    }
    n
}
