//! Where a server packet ends, at the revision negotiated with the client: the packet
//! types a query's answer is made of, each read field by field (blocks walked, compressed
//! ones decompressed to be walked), nothing decoded or kept.
//!
//! Handled up to revision [`MAX_REVISION`] (what ClickHouse 18.16 speaks, and what the
//! fixtures in `tests/fixtures/native` were captured at); a packet type that revision does
//! not send is refused as unsupported, never guessed at.

use super::block::{block_prefix, walk_block, walk_block_sparse, Block, Framing, Shape};
use super::client::put_str;
pub use super::kind::Kind;
use super::lz4;
use super::reader::{Present, Reader, Result, WalkError};
use super::stream::BlockStream;
use super::tail::{self, misfit, FrameHeader, Tail, FRAME_CHECKSUM, LZ4, MAX_FRAME};
use crate::clickhouse::rowbinary::write_varint;

/// The highest revision whose server packets this module reads.
pub const MAX_REVISION: u64 = 54412;

/// Revisions at which a packet's fields change.
const WITH_TIMEZONE: u64 = 54058;
const WITH_DISPLAY_NAME: u64 = 54372;
const WITH_VERSION_PATCH: u64 = 54401;
const WITH_BLOCK_INFO: u64 = 51903;
const WITH_CUSTOM_SERIALIZATION: u64 = 54454;

/// What is known of the connection when reading its packets.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    /// The revision both sides speak (the lower of the two Hellos').
    pub revision: u64,
    /// The client asked for compressed data blocks.
    pub compression: bool,
    /// The side being read writes a granule for a `LowCardinality` without rows (see
    /// [`Framing::empty_low_cardinality_granule`]): servers before 19.1.
    pub empty_low_cardinality_granule: bool,
}

/// A packet found at the start of the bytes at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub kind: Kind,
    /// Its length in bytes (its type included).
    pub len: usize,
    /// Rows, for the packets that carry a block.
    pub rows: u64,
}

/// A client packet found at the start of the bytes at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPacket {
    pub kind: ClientKind,
    /// Its length in bytes (its type included); 0 for the packets read whole elsewhere.
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Hello,
    Query,
    /// A block of the query's data; the empty one ends it.
    Data {
        empty: bool,
    },
    Cancel,
    Ping,
}

/// Reads packets of one direction; keeps a buffer for decompressing blocks between
/// packets, and how far a compressed block's frames were read, so a block arriving over
/// many reads is decompressed once, not again from its start at every read.
///
/// A compressed block's frames are decompressed only where the walk must read: fixed-width
/// columns are stepped over by their size, so the frames that hold nothing but such data
/// are never decompressed (each frame is an LZ4 block of its own, and its header says how
/// many bytes of the block it holds).
#[derive(Default)]
pub struct ServerPackets {
    /// The decompressed frames of the block being walked, one after another in the order
    /// they were decompressed: the first `used` bytes. What lies past them is left from
    /// earlier blocks and never read: the buffer is not zeroed again for every block.
    scratch: Vec<u8>,
    used: usize,
    /// The block's bytes in the frames read so far.
    filled: usize,
    /// `filled` when the block was last walked (and found incomplete).
    walked: usize,
    /// The frames of the block read so far (header and body at hand).
    frames: Vec<Frame>,
    /// The decompressed frames' bytes of the block, as the walk finds them.
    present: Vec<Present>,
    resume: Option<Resume>,
    /// The last block of several frames needed every one (strings, read through): the
    /// blocks after it, of the same query and so of the same columns, are decompressed
    /// whole at once rather than found out again. Until the query's end.
    whole: bool,
    /// The layout of the answer's blocks, when its columns are all fixed-width: the
    /// server's blocks of one answer share their columns, so the next block's length
    /// follows from its row count, its first bytes (see [`ServerPackets::by_shape`]).
    /// Until the query's end.
    shape: Option<Shape>,
    /// Left by the last call that found a packet incomplete, if the packet's end is known
    /// all the same: where in its bytes the rest of it starts, and that rest.
    tail: Option<(usize, Tail)>,
    /// The last tail left is a block of the answer walked as it comes: once it ends, its
    /// layout is the answer's ([`ServerPackets::give_back`]), as when a block is walked
    /// whole.
    tail_answer: bool,
    /// The decompression room of the last compressed block walked as its frames came,
    /// given back ([`ServerPackets::give_back`]) for the next: a fresh one would be
    /// allocated and faulted in again for every block.
    spare: Vec<u8>,
}

/// What a block is to the reader: how much it may know of it beforehand, and whether it
/// may be passed on before its end is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A block of the server's answer (Data, Totals, Extremes): the answer's blocks share
    /// their layout.
    Answer,
    /// A server's Log block: small, held whole.
    Log,
    /// A client's block (external table, INSERT data).
    ClientData,
}

/// What a compressed server block's shape says of where it ends.
enum ByShape {
    /// At the end of this frame.
    End { frame: usize, rows: u64 },
    /// Past the frames at hand: the block is `len` bytes.
    Later { len: u64, rows: u64 },
    /// Nothing known (no shape, other columns, a first frame not read): the block is walked.
    Unknown,
}

/// A compressed frame of the block being walked.
struct Frame {
    /// Where its compressed body starts and ends (the frame's end) in the packet.
    body: (usize, usize),
    method: u8,
    /// The range of the block's bytes it holds.
    raw: (usize, usize),
    /// Where its bytes are in the scratch buffer, once decompressed.
    at: Option<usize>,
}

/// Where the walk of a compressed block stopped for lack of bytes: the frames before
/// `frames_end` are in the scratch buffer. Valid only for the same packet, which the first
/// frame's checksum identifies.
#[derive(Clone, Copy)]
struct Resume {
    blocks_at: usize,
    frames_end: usize,
    checksum: [u8; 16],
}

/// How many times a block's walk may stop at a frame not decompressed (each time it walks
/// again from the block's start) before every frame is decompressed at once: a block whose
/// columns send the walk into a new frame each is walked a bounded number of times, not
/// once per column.
const LAZY_STOPS: usize = 32;
/// The scratch buffer a connection keeps between queries: a block of the server's usual
/// size (`max_compress_block_size`, 1 MiB) decompresses into it.
const IDLE_SCRATCH: usize = 2 << 20;

impl ServerPackets {
    /// A new reader that knows what this one carries from packet to packet and that
    /// changes answers (the layout of the answer's blocks), and none of a packet's frames:
    /// it answers as this one does.
    pub fn renewed(&self) -> Self {
        Self {
            shape: self.shape,
            ..Self::default()
        }
    }

    /// The packet at the start of `buf`, or [`WalkError::Incomplete`] until all of it is
    /// there.
    pub fn next(&mut self, buf: &[u8], session: &Session) -> Result<Packet> {
        self.tail = None;
        self.tail_answer = false;
        let packet = self.server_packet(buf, session);
        if !matches!(packet, Err(WalkError::Incomplete)) {
            self.resume = None;
        }
        if let Ok(Packet {
            kind: Kind::EndOfStream | Kind::Exception,
            ..
        }) = packet
        {
            self.whole = false;
            self.shape = None;
            // Between queries a connection keeps what the usual blocks need, not what
            // its biggest took.
            self.release_scratch_over(IDLE_SCRATCH);
        }
        packet
    }

    /// After [`ServerPackets::next`] or [`ServerPackets::next_client`] found a packet
    /// incomplete: whether its rest can be passed on as it comes (a block of the answer
    /// whose columns are all fixed-width, past its first bytes: its end is known; any plain
    /// block but a Log one: walked as it comes), as where in the bytes it was given the
    /// rest of the packet starts and a [`Tail`] to find that rest's end in the bytes to
    /// come. The bytes before that point are the packet's; this reader needs none of them
    /// again: the packet is done with here, the next call reads the packet after it.
    pub fn take_tail(&mut self) -> Option<(usize, Tail)> {
        let tail = self.tail.take();
        if tail.is_some() {
            // The packet goes on without this reader; a block walked is resumed instead.
            self.resume = None;
        }
        tail
    }

    /// Takes back what a [`Tail`] this reader made is done with: the layout of an answer's
    /// block walked as it came (the next blocks are found from it, as after a block walked
    /// whole: the answer must not depend on how its bytes were cut into reads), and its
    /// decompression room, for the next block's. Called for the tail last taken, once it
    /// ended, before the next packet is read.
    pub fn give_back(&mut self, tail: Tail) {
        if std::mem::take(&mut self.tail_answer) {
            if let Some(shape) = tail.walked_shape() {
                self.shape = shape;
            }
        }
        if let Some(room) = tail.into_room() {
            if room.len() > self.spare.len() {
                self.spare = room;
            }
        }
    }

    /// The client packet at the start of `buf`, other than a Hello or a Query (read whole
    /// by [`super::client`]): a Data block of the query under way (compressed if the query
    /// said so), a Cancel or a Ping.
    pub fn next_client(&mut self, buf: &[u8], session: &Session) -> Result<ClientPacket> {
        self.tail = None;
        self.tail_answer = false;
        let mut r = Reader::new(buf);
        let kind = match r.varuint()? {
            super::client::DATA => {
                let block = self.data(&mut r, session, session.compression, Role::ClientData);
                if !matches!(block, Err(WalkError::Incomplete)) {
                    self.resume = None;
                }
                let (columns, rows) = block?;
                let empty = columns == 0 && rows == 0;
                if empty {
                    // The end of the query's data.
                    self.whole = false;
                    self.release_scratch_over(IDLE_SCRATCH);
                }
                ClientKind::Data { empty }
            }
            super::client::CANCEL => ClientKind::Cancel,
            super::client::PING => ClientKind::Ping,
            super::client::QUERY => ClientKind::Query,
            super::client::HELLO => ClientKind::Hello,
            _ => {
                return Err(WalkError::Unsupported(
                    "a client packet type chgate does not relay",
                ))
            }
        };
        let len = match kind {
            // Read whole elsewhere: only their type was read here.
            ClientKind::Query | ClientKind::Hello => 0,
            _ => r.position(),
        };
        Ok(ClientPacket { kind, len })
    }

    fn server_packet(&mut self, buf: &[u8], session: &Session) -> Result<Packet> {
        if session.revision > MAX_REVISION {
            return Err(WalkError::Unsupported("a revision above what chgate reads"));
        }
        let mut r = Reader::new(buf);
        let (kind, rows) = match r.varuint()? {
            0 => (Kind::Hello, hello(&mut r, session.revision)?),
            1 => (Kind::Data, self.answer(&mut r, session, Kind::Data)?),
            2 => (Kind::Exception, exception(&mut r)?),
            3 => (Kind::Progress, progress(&mut r)?),
            4 => (Kind::Pong, 0),
            5 => (Kind::EndOfStream, 0),
            6 => (Kind::ProfileInfo, profile_info(&mut r)?),
            7 => (Kind::Totals, self.answer(&mut r, session, Kind::Totals)?),
            8 => (
                Kind::Extremes,
                self.answer(&mut r, session, Kind::Extremes)?,
            ),
            // Log blocks are never compressed at these revisions.
            10 => (Kind::Log, self.data(&mut r, session, false, Role::Log)?.1),
            11 => {
                r.string()?;
                r.string()?;
                (Kind::TableColumns, 0)
            }
            _ => {
                return Err(WalkError::Unsupported(
                    "a server packet type of a later revision",
                ))
            }
        };
        Ok(Packet {
            kind,
            len: r.position(),
            rows,
        })
    }

    /// A block of the answer (a `kind` packet's, past its type): its rows.
    fn answer(&mut self, r: &mut Reader<'_>, session: &Session, kind: Kind) -> Result<u64> {
        let block = self.data(r, session, session.compression, Role::Answer);
        if let Some((_, tail)) = self.tail.as_mut() {
            tail.kind = kind;
        }
        Ok(block?.1)
    }

    /// A table name, then a block, plain or in compressed frames; its columns and rows.
    /// A plain block not all at hand leaves a [`Tail`] that walks the rest as it comes,
    /// unless it is a Log block.
    fn data(
        &mut self,
        r: &mut Reader<'_>,
        session: &Session,
        compressed: bool,
        role: Role,
    ) -> Result<(u64, u64)> {
        r.string()?;
        let framing = Framing {
            block_info: session.revision >= WITH_BLOCK_INFO,
            custom_serialization: session.revision >= WITH_CUSTOM_SERIALIZATION,
            empty_low_cardinality_granule: session.empty_low_cardinality_granule,
        };
        let answer = role == Role::Answer;
        if !compressed {
            return self.plain(r, framing, role);
        }
        // The block ends at the end of one of its frames: read the frames at hand (their
        // headers: nothing is decompressed yet) and walk to exactly one of those ends,
        // going on from where the last call stopped if this is the same packet (the
        // resume point is taken, so it is only ever used by the call right after the one
        // that left it: an identical packet later on starts afresh). The block is walked
        // once no further frame can be read: the bytes after the block's end are the next
        // packet's (which may even read as a frame; the walk ends before it), or not here
        // yet. The relay walks a packet again only once its bytes have doubled, so a block
        // sent in many tiny frames costs linear time, not quadratic.
        let blocks_at = r.position();
        let mut checksum = [0u8; 16];
        if let Some(first) = r.bytes_after()?.get(..16) {
            checksum.copy_from_slice(first);
        }
        match self.resume.take() {
            Some(at) if at.blocks_at == blocks_at && at.checksum == checksum => {
                r.seek(at.frames_end)?;
            }
            _ => {
                self.used = 0;
                self.filled = 0;
                self.walked = 0;
                self.frames.clear();
            }
        }
        loop {
            let frame_start = r.position();
            let read = self.frame(r);
            if read.is_ok() {
                continue;
            }
            match self.by_shape(r, framing, answer)? {
                ByShape::End { frame, rows } => {
                    r.seek(self.frames[frame].body.1)?;
                    return Ok((self.shape.map_or(0, |s| s.columns), rows));
                }
                ByShape::Later { len, rows } => {
                    if read == Err(WalkError::Incomplete) {
                        self.resume = Some(Resume {
                            blocks_at,
                            frames_end: frame_start,
                            checksum,
                        });
                        // The frames from here on hold the rest of the block.
                        let tail = Tail::frames(Kind::Data, rows, self.filled as u64, len);
                        self.tail = Some((frame_start, tail));
                    }
                    // (A frame that cannot be read: the walk would stop there too.)
                    return read.and(Err(WalkError::Incomplete));
                }
                ByShape::Unknown => {}
            }
            if self.walked < self.filled {
                self.walked = self.filled;
                match self.walk_frames(r, framing) {
                    Ok(block) => {
                        // Where the block ended: the end of one of the frames read.
                        let Some(last) = self.frames.iter().position(|f| f.raw.1 == block.len)
                        else {
                            return Err(WalkError::Malformed(
                                "a block that ends inside a compressed frame",
                            ));
                        };
                        r.seek(self.frames[last].body.1)?;
                        // (A block of one frame tells nothing: every walk reads it.)
                        self.whole =
                            last > 0 && self.frames[..=last].iter().all(|f| f.at.is_some());
                        if answer {
                            self.shape = block.shape;
                        }
                        self.release_big_scratch();
                        return Ok((block.columns, block.rows));
                    }
                    Err(WalkError::Incomplete) => {}
                    Err(e) => return Err(e),
                }
            }
            match read {
                Ok(()) => {}
                Err(WalkError::Incomplete) => {
                    self.resume = Some(Resume {
                        blocks_at,
                        frames_end: frame_start,
                        checksum,
                    });
                    // Or walked on as its frames come, from its first; unless the
                    // answer's layout will tell its end from its first frame, which is
                    // not all here yet.
                    if !(answer && self.shape.is_some() && self.frames.is_empty()) {
                        let walk = BlockStream::new(framing);
                        let room = std::mem::take(&mut self.spare);
                        self.tail = Some((blocks_at, Tail::walk_frames(Kind::Data, walk, room)));
                        self.tail_answer = answer;
                    }
                    return Err(WalkError::Incomplete);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Where a compressed block of the server's answer ends, from the layout of the
    /// answer's blocks walked before it: only the start of its first frame is
    /// decompressed, for its row count, and its length must be exactly the end of one of
    /// its frames (the frames' headers say how many bytes each holds). A block of another
    /// column count is walked instead; one of as many columns whose length falls inside a
    /// frame is refused ([`misfit`]), not walked: a relay may already have passed its
    /// first frames on as a [`Tail`], and the answer must not depend on how the bytes
    /// were cut into reads.
    ///
    /// Only the server's blocks: ClickHouse writes every block of an answer with the
    /// columns of its first. A client's INSERT blocks are always walked: a client could
    /// send a block whose columns differ from the last one's and whose length, as the
    /// server reads it, ends at another frame than this arithmetic says, and hide a packet
    /// from chgate there.
    fn by_shape(&self, packet: &Reader<'_>, framing: Framing, answer: bool) -> Result<ByShape> {
        let (Some(shape), Some(first), true) = (self.shape, self.frames.first(), answer) else {
            return Ok(ByShape::Unknown);
        };
        let Ok(body) = packet.slice(first.body.0, first.body.1) else {
            return Ok(ByShape::Unknown);
        };
        // BlockInfo (8 bytes at these revisions) and two VarUInts of at most 9.
        let mut start = [0u8; 32];
        let n = match first.method {
            LZ4 => lz4::decompress_prefix(body, &mut start),
            _ => {
                let n = body.len().min(start.len());
                start[..n].copy_from_slice(&body[..n]);
                Some(n)
            }
        };
        let Some(n) = n else {
            return Ok(ByShape::Unknown);
        };
        let Ok((columns, rows, prefix)) = block_prefix(&start[..n], framing) else {
            return Ok(ByShape::Unknown);
        };
        if columns != shape.columns {
            return Ok(ByShape::Unknown);
        }
        let len = shape_len(shape, prefix, rows)?;
        Ok(
            match self.frames.iter().position(|f| f.raw.1 as u64 == len) {
                Some(frame) => ByShape::End { frame, rows },
                None if (self.filled as u64) < len => ByShape::Later { len, rows },
                None => return Err(misfit()),
            },
        )
    }

    /// A plain block: walked, or (one of the answer's, whose layout is known) found from
    /// its row count, whether all of it is here (its length) or not (a tail).
    fn plain(&mut self, r: &mut Reader<'_>, framing: Framing, role: Role) -> Result<(u64, u64)> {
        let answer = role == Role::Answer;
        let start = r.position();
        let rest = r.bytes_after()?;
        let shape = self.shape.filter(|_| answer);
        let prefix = shape.map(|_| block_prefix(rest, framing));
        if let Some(Err(WalkError::Incomplete)) = prefix {
            // Not even the block's first bytes (its row count) are here: wait for them (a
            // few bytes), so the block is found from its shape as a walk of all its bytes
            // finds it, not walked as it comes (the two could tell a block whose columns
            // differ from the answer's apart differently).
            return Err(WalkError::Incomplete);
        }
        let fits = shape
            .zip(prefix.and_then(Result::ok))
            .filter(|(shape, (columns, _, _))| *columns == shape.columns);
        if let Some((shape, (columns, rows, prefix))) = fits {
            let len = shape_len(shape, prefix, rows)?;
            if len > rest.len() as u64 {
                self.tail = Some((start, Tail::plain(Kind::Data, rows, len)));
                return Err(WalkError::Incomplete);
            }
            // At most the bytes at hand.
            r.seek(start + len as usize)?;
            return Ok((columns, rows));
        }
        let block = match walk_block(rest, framing) {
            Err(WalkError::Incomplete) if role != Role::Log => {
                // Walked on as its bytes come, and passed on and let go (a Log block is
                // small, and held).
                let tail = Tail::walk(Kind::Data, BlockStream::new(framing));
                self.tail = Some((start, tail));
                self.tail_answer = answer;
                return Err(WalkError::Incomplete);
            }
            other => other?,
        };
        if answer {
            self.shape = block.shape;
        }
        r.seek(start + block.len)?;
        Ok((block.columns, block.rows))
    }

    /// Gives back a scratch buffer a big block grew (a block can decompress to 1 GiB):
    /// blocks of the usual size (a megabyte or so) keep theirs.
    fn release_big_scratch(&mut self) {
        self.release_scratch_over(16 << 20);
    }

    /// Gives back the scratch buffer if it is over `keep` bytes.
    fn release_scratch_over(&mut self, keep: usize) {
        if self.spare.len() > keep {
            self.spare = Vec::new();
        }
        if self.scratch.len() > keep {
            self.scratch = Vec::new();
            self.used = 0;
            self.filled = 0;
            self.walked = 0;
        }
    }

    /// Walks the block in the frames read so far, decompressing the frames it must read.
    fn walk_frames(&mut self, packet: &Reader<'_>, framing: Framing) -> Result<Block> {
        if self.whole {
            self.decompress_ahead(packet, 0);
        }
        let mut stops = 0;
        loop {
            self.present.clear();
            for f in &self.frames {
                let Some(at) = f.at else { continue };
                match self.present.last_mut() {
                    Some(last)
                        if last.end == f.raw.0 && last.at + (last.end - last.start) == at =>
                    {
                        last.end = f.raw.1;
                    }
                    _ => self.present.push(Present {
                        start: f.raw.0,
                        end: f.raw.1,
                        at,
                    }),
                }
            }
            let scratch = &self.scratch[..self.used];
            match walk_block_sparse(scratch, self.filled, &self.present, framing) {
                Err(WalkError::Absent(at)) => {
                    stops += 1;
                    if stops == LAZY_STOPS {
                        self.decompress_ahead(packet, 0);
                        let k = self.frames.partition_point(|f| f.raw.1 <= at);
                        if self.frames.get(k).is_some_and(|f| f.at.is_some()) {
                            continue;
                        }
                    }
                    // (Past the stops, only a frame that does not decompress is left.)
                    self.decompress_for(packet, at)?;
                }
                other => return other,
            }
        }
    }

    /// Decompresses the frame that holds the block's byte `at`. A walk that went on from
    /// the frame before it (variable-width data read through, a string's bytes crossing
    /// into it) will most likely read the frames after it too: they are decompressed at
    /// once, rather than one walk each.
    fn decompress_for(&mut self, packet: &Reader<'_>, at: usize) -> Result<()> {
        let k = self.frames.partition_point(|f| f.raw.1 <= at);
        if k >= self.frames.len() {
            return Err(WalkError::Malformed("a block read past its frames"));
        }
        if self.frames[k].at.is_some() {
            return Err(WalkError::Malformed(
                "a block walk that stopped in a read frame",
            ));
        }
        self.decompress(packet, k)?;
        if k > 0 && self.frames[k - 1].at.is_some() {
            self.decompress_ahead(packet, k + 1);
        }
        Ok(())
    }

    /// Decompresses the frames from `first` on that are not yet, passing over those that
    /// do not decompress: the bytes after a block's last frame may be the next packet's,
    /// read as a frame, and a frame of skipped data is nobody's business here (the walk
    /// tells, if it ever needs such a frame).
    fn decompress_ahead(&mut self, packet: &Reader<'_>, first: usize) {
        for i in first..self.frames.len() {
            if self.frames[i].at.is_none() {
                let _ = self.decompress(packet, i);
            }
        }
    }

    /// Reads one compressed frame's header and steps over its body: its bytes' place in
    /// the block follows the frames before it.
    fn frame(&mut self, r: &mut Reader<'_>) -> Result<()> {
        r.skip(FRAME_CHECKSUM as u64)?;
        let method = r.u8()?;
        let compressed = r.u32_le()?;
        let raw = r.u32_le()?;
        let header = FrameHeader::read(method, compressed, raw)?;
        if self.filled as u64 + header.raw > MAX_FRAME {
            return Err(WalkError::Malformed("a compressed block over 1 GiB"));
        }
        let start = r.position();
        r.skip(header.body_len)?;
        // Checked above: at most 1 GiB.
        let end = self.filled + header.raw as usize;
        self.frames.push(Frame {
            body: (start, r.position()),
            method,
            raw: (self.filled, end),
            at: None,
        });
        self.filled = end;
        Ok(())
    }

    /// Decompresses frame `i` after the others in the scratch buffer.
    fn decompress(&mut self, packet: &Reader<'_>, i: usize) -> Result<()> {
        let frame = &mut self.frames[i];
        let body = packet.slice(frame.body.0, frame.body.1)?;
        let at = self.used;
        let end = at + (frame.raw.1 - frame.raw.0);
        if self.scratch.len() < end {
            self.scratch.resize(end, 0);
        }
        tail::decompress(frame.method, body, &mut self.scratch[at..end])?;
        frame.at = Some(at);
        self.used = end;
        Ok(())
    }
}

/// The length of a block of `shape` and `rows` rows whose start takes `prefix` bytes; a
/// block over 1 GiB is refused, as a walk refuses one.
fn shape_len(shape: Shape, prefix: usize, rows: u64) -> Result<u64> {
    shape
        .len(prefix, rows)
        .filter(|&len| len <= MAX_FRAME)
        .ok_or(WalkError::Malformed("a block over 1 GiB"))
}

/// The server's Hello: name, version, revision, then what the client's revision lets it
/// add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    pub name: String,
    pub major: u64,
    pub minor: u64,
    /// The server's own revision (what it can speak, not what it will speak with a client).
    pub revision: u64,
    pub timezone: String,
    pub display_name: String,
    pub patch: u64,
}

impl ServerHello {
    /// Reads the Hello's fields (after its type), as written to a client that said
    /// `client_revision`.
    fn read_fields(r: &mut Reader<'_>, client_revision: u64) -> Result<Self> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let name = text(r.string()?);
        let major = r.varuint()?;
        let minor = r.varuint()?;
        let revision = r.varuint()?;
        let mut hello = ServerHello {
            name,
            major,
            minor,
            revision,
            timezone: String::new(),
            display_name: String::new(),
            patch: 0,
        };
        let spoken = revision.min(client_revision);
        if spoken >= WITH_TIMEZONE {
            hello.timezone = text(r.string()?);
        }
        if spoken >= WITH_DISPLAY_NAME {
            hello.display_name = text(r.string()?);
        }
        if spoken >= WITH_VERSION_PATCH {
            hello.patch = r.varuint()?;
        }
        Ok(hello)
    }

    /// The server's answer to a client Hello sent at `client_revision`, at the start of
    /// `buf`: its Hello, or the Exception it refused the client with.
    /// Whether this server writes a granule for a `LowCardinality` without rows (before
    /// 19.1; see [`Framing::empty_low_cardinality_granule`]).
    pub fn writes_empty_low_cardinality_granules(&self) -> bool {
        self.major < 19
    }

    pub fn read(buf: &[u8], client_revision: u64) -> Result<(HelloAnswer, usize)> {
        if client_revision > MAX_REVISION {
            return Err(WalkError::Unsupported("a revision above what chgate reads"));
        }
        let mut r = Reader::new(buf);
        let answer = match r.varuint()? {
            0 => HelloAnswer::Hello(Self::read_fields(&mut r, client_revision)?),
            2 => {
                let start = r.position();
                exception(&mut r)?;
                let mut e = Reader::new(&buf[start..]);
                let code = e.u32_le()? as i32;
                e.string()?;
                let message = String::from_utf8_lossy(e.string()?).into_owned();
                HelloAnswer::Refused { code, message }
            }
            _ => {
                return Err(WalkError::Malformed(
                    "a server that answers a Hello with something else",
                ))
            }
        };
        Ok((answer, r.position()))
    }

    /// The Hello for a client speaking `revision`: what that revision carries.
    pub fn write(&self, out: &mut Vec<u8>, revision: u64) {
        write_varint(out, 0);
        put_str(out, self.name.as_bytes());
        write_varint(out, self.major);
        write_varint(out, self.minor);
        write_varint(out, self.revision);
        if revision >= WITH_TIMEZONE {
            put_str(out, self.timezone.as_bytes());
        }
        if revision >= WITH_DISPLAY_NAME {
            put_str(out, self.display_name.as_bytes());
        }
        if revision >= WITH_VERSION_PATCH {
            write_varint(out, self.patch);
        }
    }
}

/// What a server answered a client's Hello with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloAnswer {
    Hello(ServerHello),
    Refused { code: i32, message: String },
}

/// An Exception packet as ClickHouse writes one: code, `DB::Exception`, the display text
/// (which ClickHouse starts with the name too: `DB::Exception: ...`), no stack trace,
/// nothing nested.
pub fn write_exception(out: &mut Vec<u8>, code: i32, display_text: &str) {
    write_varint(out, 2);
    out.extend_from_slice(&code.to_le_bytes());
    put_str(out, b"DB::Exception");
    put_str(out, display_text.as_bytes());
    put_str(out, b"");
    out.push(0);
}

/// A Pong packet.
pub const PONG: [u8; 1] = [4];

/// The server's Hello: skipped as a packet of the stream.
fn hello(r: &mut Reader<'_>, revision: u64) -> Result<u64> {
    ServerHello::read_fields(r, revision)?;
    Ok(0)
}

/// An exception: code, name, message, stack trace, and a nested one if it says so.
fn exception(r: &mut Reader<'_>) -> Result<u64> {
    // Nested exceptions are a chain; a peer cannot make it longer than the bytes it sent.
    loop {
        r.skip(4)?;
        r.string()?;
        r.string()?;
        r.string()?;
        if r.u8()? == 0 {
            return Ok(0);
        }
    }
}

/// Progress at these revisions: rows, bytes, total rows.
fn progress(r: &mut Reader<'_>) -> Result<u64> {
    for _ in 0..3 {
        r.varuint()?;
    }
    Ok(0)
}

/// ProfileInfo: rows, blocks, bytes, applied_limit, rows_before_limit,
/// calculated_rows_before_limit.
fn profile_info(r: &mut Reader<'_>) -> Result<u64> {
    r.varuint()?;
    r.varuint()?;
    r.varuint()?;
    r.u8()?;
    r.varuint()?;
    r.u8()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session of 18.16's revision with compressed blocks.
    const COMPRESSED: Session = Session {
        revision: 54412,
        compression: true,
        empty_low_cardinality_granule: false,
    };

    /// A server Data packet: 1000 UInt64 rows in two LZ4 frames.
    fn two_frame_data() -> Vec<u8> {
        let mut block = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
        block.extend_from_slice(&[1, 0xe8, 0x07, 1, b'x', 6]); // 1 column, 1000 rows, "x"
        block.extend_from_slice(b"UInt64");
        block.extend((0..8000u32).map(|i| (i % 7) as u8));
        let mut packet = vec![1, 0]; // Data, no table name
        for half in block.chunks(block.len() / 2 + 1) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(half).unwrap());
        }
        packet
    }

    #[test]
    fn a_packet_resumed_after_a_cut_and_then_the_same_packet_again() {
        let session = COMPRESSED;
        let packet = two_frame_data();
        let mut reader = ServerPackets::default();
        // The first frame and part of the second, then all of it: resumed.
        let cut = packet.len() - 10;
        assert_eq!(
            reader.next(&packet[..cut], &session),
            Err(WalkError::Incomplete)
        );
        let whole = reader.next(&packet, &session).unwrap();
        assert_eq!(
            (whole.kind, whole.len, whole.rows),
            (Kind::Data, packet.len(), 1000)
        );
        // The same bytes again (a server sends identical blocks): a packet of its own,
        // never taken for the one resumed before.
        for _ in 0..3 {
            let again = reader.next(&packet, &session).unwrap();
            assert_eq!((again.len, again.rows), (packet.len(), 1000));
        }
    }

    #[test]
    fn packets_without_bodies_and_refusals() {
        let session = Session {
            revision: MAX_REVISION,
            compression: false,
            empty_low_cardinality_granule: false,
        };
        let mut p = ServerPackets::default();
        assert_eq!(p.next(&[4], &session).unwrap().kind, Kind::Pong);
        assert_eq!(p.next(&[5, 9, 9], &session).unwrap().len, 1);
        assert_eq!(p.next(&[], &session), Err(WalkError::Incomplete));
        assert!(matches!(
            p.next(&[17], &session),
            Err(WalkError::Unsupported(_))
        ));
        // A nested exception: two links.
        let mut e = vec![2];
        for nested in [1u8, 0] {
            e.extend_from_slice(&[47, 0, 0, 0, 1, b'N', 1, b'M', 0, nested]);
        }
        assert_eq!(p.next(&e, &session).unwrap().len, e.len());
        for end in 0..e.len() {
            assert_eq!(p.next(&e[..end], &session), Err(WalkError::Incomplete));
        }
    }

    /// A Data packet of 1000 rows of `x UInt64, s String`, in LZ4 frames of `frame`
    /// bytes of the block; the block's bytes where `x`'s data lies.
    fn numbers_then_strings(frame: usize) -> (Vec<u8>, std::ops::Range<usize>) {
        let mut block = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
        block.extend_from_slice(&[2, 0xe8, 0x07, 1, b'x', 6]);
        block.extend_from_slice(b"UInt64");
        let numbers = block.len()..block.len() + 8000;
        block.extend((0..8000u32).map(|i| (i % 251) as u8));
        block.extend_from_slice(&[1, b's', 6]);
        block.extend_from_slice(b"String");
        for i in 0..1000u32 {
            let value = format!("value {i}");
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        let mut packet = vec![1, 0];
        for part in block.chunks(frame) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(part).unwrap());
        }
        (packet, numbers)
    }

    /// The frames of a packet: where each one's body lies, and the block's bytes it holds.
    fn frames_of(packet: &[u8]) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let (mut at, mut raw, mut out) = (2, 0, Vec::new());
        while at < packet.len() {
            let size = |i: usize| u32::from_le_bytes(packet[i..i + 4].try_into().unwrap());
            let (compressed, len) = (size(at + 17) as usize, size(at + 21) as usize);
            out.push((at + 25..at + 16 + compressed, raw..raw + len));
            at += 16 + compressed;
            raw += len;
        }
        out
    }

    /// Frames that hold nothing but fixed-width data are stepped over undecompressed:
    /// spoiled, the walk still ends where the block does. Spoiling a frame the walk must
    /// read (a column's name, a string's length) is found.
    #[test]
    fn frames_of_fixed_width_data_alone_are_never_decompressed() {
        let session = COMPRESSED;
        for frame in [700, 1000, 3000] {
            let (packet, numbers) = numbers_then_strings(frame);
            let frames = frames_of(&packet);
            assert!(frames.len() > 3);
            let mut spoiled = packet.clone();
            let mut inside = 0;
            for (body, raw) in &frames {
                if numbers.start <= raw.start && raw.end <= numbers.end {
                    spoiled[body.clone()].fill(0xff);
                    inside += 1;
                }
            }
            assert!(inside > 0, "frames of {frame}");
            for bytes in [&packet, &spoiled] {
                let p = ServerPackets::default().next(bytes, &session).unwrap();
                assert_eq!((p.kind, p.len, p.rows), (Kind::Data, packet.len(), 1000));
            }
            // Each cut short is incomplete, resumed or not.
            let mut reader = ServerPackets::default();
            for cut in (0..packet.len()).step_by(97) {
                assert_eq!(
                    reader.next(&spoiled[..cut], &session),
                    Err(WalkError::Incomplete)
                );
            }
            assert_eq!(reader.next(&spoiled, &session).unwrap().len, packet.len());
            // A block of one frame first (a query's header block) leaves the next one lazy.
            let mut reader = ServerPackets::default();
            let (small, _) = numbers_then_strings(1 << 20);
            assert_eq!(frames_of(&small).len(), 1);
            assert_eq!(reader.next(&small, &session).unwrap().len, small.len());
            assert_eq!(reader.next(&packet, &session).unwrap().len, packet.len());
            let block = frames_of(&packet).last().unwrap().1.end;
            assert!(
                reader.used < block,
                "{} of {block} bytes decompressed",
                reader.used
            );
            // Bytes after the block that read as a frame which does not decompress (the
            // next packet's, say): not the block's business, walked lazily or whole.
            let mut followed = spoiled.clone();
            followed.extend_from_slice(&[0; 16]);
            followed.push(LZ4);
            followed.extend_from_slice(&13u32.to_le_bytes());
            followed.extend_from_slice(&10u32.to_le_bytes());
            followed.extend_from_slice(&[0xff; 4]);
            let mut reader = ServerPackets::default();
            for _ in 0..3 {
                assert_eq!(reader.next(&followed, &session).unwrap().len, packet.len());
            }
            // The last frame holds string lengths: spoiled, it is read and refused.
            let (body, _) = frames.last().unwrap();
            let mut bad = packet.clone();
            bad[body.clone()].fill(0xff);
            assert!(matches!(
                ServerPackets::default().next(&bad, &session),
                Err(WalkError::Malformed(_))
            ));
        }
    }

    /// A Data packet (`packet_type` 1 from the server, 2 from a client) of `rows` rows of
    /// `x UInt64, n Nullable(Int32), t Tuple(UInt8, Float64)`, in LZ4 frames of `frame`
    /// bytes of the block; and how many frames it has.
    fn fixed_columns(packet_type: u8, rows: u64, frame: usize) -> (Vec<u8>, usize) {
        let block = fixed_block(rows);
        let mut packet = vec![packet_type, 0];
        let frames = block.chunks(frame).count();
        for part in block.chunks(frame) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(part).unwrap());
        }
        (packet, frames)
    }

    /// A block of three fixed-width columns (one Nullable, one Tuple).
    fn fixed_block(rows: u64) -> Vec<u8> {
        let mut block = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
        write_varint(&mut block, 3);
        write_varint(&mut block, rows);
        for (name, ty, width) in [
            ("x", "UInt64", 8),
            ("n", "Nullable(Int32)", 5),
            ("t", "Tuple(UInt8, Float64)", 9),
        ] {
            put_str(&mut block, name.as_bytes());
            put_str(&mut block, ty.as_bytes());
            block.extend((0..rows * width).map(|i| (i % 11) as u8));
        }
        block
    }

    /// Where the tail `reader` left (after it found `bytes[..cut]` incomplete) says the
    /// packet ends, fed the bytes from where it starts in pieces of `piece` bytes; `None`
    /// if it left none.
    fn tail_end(
        reader: &mut ServerPackets,
        bytes: &[u8],
        cut: usize,
        piece: usize,
    ) -> Option<(usize, Tail)> {
        let (from, mut tail) = reader.take_tail()?;
        assert!(from <= cut);
        // Each feed is given what the last did not take (a frame not all here, an item
        // cut off) and `piece` more bytes.
        let (mut at, mut given) = (from, from);
        loop {
            given = (given + piece).min(bytes.len());
            let (n, done) = tail.feed(&bytes[at..given]).unwrap();
            at += n;
            if done {
                return Some((at, tail));
            }
            assert!(given < bytes.len(), "the tail never ended");
        }
    }

    /// Once the shape of an answer's blocks is known, a block that is not all here yet
    /// leaves a tail as soon as its first bytes are (a compressed block: its first frame):
    /// the rest of the packet is found from the frames' headers alone, or its length, and
    /// ends where the packet does. Without a shape, or past the answer's end, no tail for a
    /// compressed block; a plain one is walked as it comes.
    #[test]
    fn an_answers_fixed_width_blocks_leave_a_tail_once_their_first_bytes_are_here() {
        let session = COMPRESSED;
        let (header, _) = fixed_columns(1, 0, 1 << 20);
        for kind in [1u8, 7, 8] {
            let (data, frames) = fixed_columns(kind, 5000, 3000);
            assert!(frames > 20);
            let first_frame_end = frames_of(&data)[0].0.end;
            let mut followed = spoil_after_first_frame(&data);
            followed.push(5);
            let mut reader = ServerPackets::default();
            assert_eq!(reader.next(&header, &session).unwrap().rows, 0);
            for cut in (3..data.len()).step_by(157) {
                assert_eq!(
                    reader.next(&followed[..cut], &session),
                    Err(WalkError::Incomplete)
                );
                let tail = tail_end(&mut reader, &followed, cut, 1 + cut % 4000);
                if cut < first_frame_end {
                    assert!(tail.is_none(), "{cut}");
                    continue;
                }
                let (end, tail) = tail.unwrap();
                assert_eq!(end, data.len(), "{cut}");
                assert_eq!((tail.rows, tail.kind as u8), (5000, kind_of(kind) as u8));
            }
            // Whole, it is a packet, and no tail is left.
            assert_eq!(reader.next(&followed, &session).unwrap().len, data.len());
            assert!(reader.take_tail().is_none());
            // The answer's end forgets the shape: the next block is walked as its frames
            // come.
            assert_eq!(reader.next(&[5], &session).unwrap().kind, Kind::EndOfStream);
            let cut = first_frame_end + 10;
            assert_eq!(
                reader.next(&data[..cut], &session),
                Err(WalkError::Incomplete)
            );
            let tail = tail_end(&mut reader, &data, cut, 4000);
            assert_eq!(tail.map(|(end, t)| (end, t.rows)), Some((data.len(), 5000)));
        }
        // Plain blocks: the tail is the block's length, once its row count is here.
        let plain = Session {
            compression: false,
            ..session
        };
        let mut header = vec![1, 0];
        header.extend(fixed_block(0));
        let mut data = vec![1, 0];
        data.extend(fixed_block(3000));
        let mut reader = ServerPackets::default();
        assert!(reader.next(&data[..100], &plain).is_err());
        // No shape yet: the block is walked as it comes.
        let tail = tail_end(&mut reader, &data, 100, 999);
        assert_eq!(tail.map(|(end, t)| (end, t.rows)), Some((data.len(), 3000)));
        assert_eq!(reader.next(&header, &plain).unwrap().len, header.len());
        // Type, table name, BlockInfo, the column count, then two bytes of rows: from 13
        // bytes on, the block's length is known; before, the reader waits for those bytes
        // (no tail), so the block is found from its shape however the bytes are cut.
        for cut in [2, 5, 12] {
            assert_eq!(
                reader.next(&data[..cut], &plain),
                Err(WalkError::Incomplete)
            );
            assert!(reader.take_tail().is_none(), "{cut}");
        }
        for cut in [13, 100, data.len() - 1] {
            assert_eq!(
                reader.next(&data[..cut], &plain),
                Err(WalkError::Incomplete)
            );
            let tail = tail_end(&mut reader, &data, cut, 999);
            assert_eq!(tail.map(|(end, t)| (end, t.rows)), Some((data.len(), 3000)));
        }
        // A client's plain block is walked as it comes.
        let mut insert = vec![super::super::client::DATA as u8, 0];
        insert.extend(fixed_block(3000));
        let mut client = ServerPackets::default();
        assert!(client.next_client(&insert[..100], &plain).is_err());
        let tail = tail_end(&mut client, &insert, 100, 999);
        assert_eq!(tail.map(|(end, _)| end), Some(insert.len()));
        // A client's compressed blocks never end by a layout: they are walked as their
        // frames come.
        let mut client = ServerPackets::default();
        let (client_header, _) = fixed_columns(2, 0, 1 << 20);
        let (client_data, _) = fixed_columns(2, 5000, 3000);
        client.next_client(&client_header, &session).unwrap();
        let cut = client_data.len() - 1;
        assert_eq!(
            client.next_client(&client_data[..cut], &session),
            Err(WalkError::Incomplete)
        );
        let tail = tail_end(&mut client, &client_data, cut, 4000);
        assert_eq!(tail.map(|(end, _)| end), Some(client_data.len()));
    }

    /// A block of strings must be decompressed whole to be walked; what it grew is given
    /// back at the answer's end, down to what a usual block needs.
    #[test]
    fn the_scratch_a_big_block_grew_is_given_back_at_the_answers_end() {
        let session = COMPRESSED;
        let mut block = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 1];
        write_varint(&mut block, 300_000);
        put_str(&mut block, b"s");
        put_str(&mut block, b"String");
        for i in 0..300_000u32 {
            put_str(&mut block, format!("value {i:05}").as_bytes());
        }
        let mut packet = vec![1, 0];
        for part in block.chunks(1 << 20) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(part).unwrap());
        }
        let mut reader = ServerPackets::default();
        assert_eq!(reader.next(&packet, &session).unwrap().len, packet.len());
        assert!(
            reader.scratch.len() > IDLE_SCRATCH,
            "{}",
            reader.scratch.len()
        );
        assert_eq!(reader.next(&[5], &session).unwrap().kind, Kind::EndOfStream);
        assert!(
            reader.scratch.len() <= IDLE_SCRATCH,
            "{}",
            reader.scratch.len()
        );
        // And the reader reads on.
        assert_eq!(reader.next(&packet, &session).unwrap().rows, 300_000);
    }

    /// A tail stops where the walk of the whole packet stops, with the same error: here a
    /// frame that claims more than a block may hold (1 GiB).
    #[test]
    fn a_tail_stops_with_the_error_the_whole_packet_gets() {
        let session = COMPRESSED;
        let (header, _) = fixed_columns(1, 0, 1 << 20);
        let (data, _) = fixed_columns(1, 5000, 3000);
        let frames = frames_of(&data);
        let mut packet = data[..frames[1].0.end].to_vec();
        packet.extend_from_slice(&[7u8; 16]);
        packet.push(0x82);
        packet.extend_from_slice(&(9u32 + 5_000_000).to_le_bytes());
        packet.extend_from_slice(&(1u32 << 30).to_le_bytes());
        packet.extend_from_slice(&[0u8; 100]);
        let mut whole = ServerPackets::default();
        whole.next(&header, &session).unwrap();
        let want = whole.next(&packet, &session).unwrap_err();
        assert_eq!(want, WalkError::Malformed("a compressed block over 1 GiB"));
        let mut relay = ServerPackets::default();
        relay.next(&header, &session).unwrap();
        let cut = frames[1].0.start + 5;
        assert_eq!(
            relay.next(&packet[..cut], &session),
            Err(WalkError::Incomplete)
        );
        let (from, mut tail) = relay.take_tail().expect("a tail");
        assert_eq!(tail.feed(&packet[from..]), Err(want));
    }

    /// A compressed block that must be walked, not all here, keeps where its walk stopped:
    /// the next read goes on from there, not from the block's start. Or, asked for, a tail
    /// walks its frames as they come, from the first.
    #[test]
    fn a_block_not_all_here_is_resumed_or_walked_as_its_frames_come() {
        let session = COMPRESSED;
        let (packet, _) = numbers_then_strings(1000);
        let mut reader = ServerPackets::default();
        let cut = packet.len() / 2;
        assert_eq!(
            reader.next(&packet[..cut], &session),
            Err(WalkError::Incomplete)
        );
        assert!(reader.resume.is_some(), "the resume point was dropped");
        assert_eq!(reader.next(&packet, &session).unwrap().len, packet.len());
        // Or the block's frames are walked as they come, from its first.
        assert_eq!(
            reader.next(&packet[..cut], &session),
            Err(WalkError::Incomplete)
        );
        let tail = tail_end(&mut reader, &packet, cut, 1000);
        assert_eq!(
            tail.map(|(end, t)| (end, t.rows)),
            Some((packet.len(), 1000))
        );
        assert!(reader.resume.is_none());
    }

    fn kind_of(packet_type: u8) -> Kind {
        match packet_type {
            1 => Kind::Data,
            7 => Kind::Totals,
            _ => Kind::Extremes,
        }
    }

    /// Every frame but the first filled with 0xff: undecompressable.
    fn spoil_after_first_frame(packet: &[u8]) -> Vec<u8> {
        let mut spoiled = packet.to_vec();
        for (body, _) in frames_of(packet).iter().skip(1) {
            spoiled[body.clone()].fill(0xff);
        }
        spoiled
    }

    /// Once an answer's header block has shown its columns to be all fixed-width, its
    /// next blocks end where their row count says: only the start of the first frame is
    /// decompressed. A block of other columns is walked; one of as many columns whose
    /// length misses its frames' ends is refused; the answer's end forgets the shape; a
    /// client's blocks are always walked.
    #[test]
    fn an_answers_blocks_end_where_their_columns_and_rows_say() {
        let session = COMPRESSED;
        let (header, _) = fixed_columns(1, 0, 1 << 20);
        let (data, frames) = fixed_columns(1, 5000, 3000);
        assert!(frames > 20);
        let spoiled = spoil_after_first_frame(&data);
        // Without the header first, the spoiled block cannot be walked.
        assert!(matches!(
            ServerPackets::default().next(&spoiled, &session),
            Err(WalkError::Malformed(_))
        ));
        let mut reader = ServerPackets::default();
        assert_eq!(reader.next(&header, &session).unwrap().rows, 0);
        for _ in 0..3 {
            let p = reader.next(&spoiled, &session).unwrap();
            assert_eq!((p.kind, p.len, p.rows), (Kind::Data, data.len(), 5000));
            assert!(reader.frames.iter().all(|f| f.at.is_none()));
        }
        // Arriving in pieces: incomplete until the last frame is there.
        for cut in (0..data.len()).step_by(211) {
            assert_eq!(
                reader.next(&spoiled[..cut], &session),
                Err(WalkError::Incomplete)
            );
        }
        assert_eq!(reader.next(&spoiled, &session).unwrap().len, data.len());
        // Followed by the next packet (EndOfStream): found all the same.
        let mut followed = spoiled.clone();
        followed.push(5);
        assert_eq!(reader.next(&followed, &session).unwrap().len, data.len());
        // Blocks of other columns: walked, and right.
        let (other, _) = numbers_then_strings(1000);
        assert_eq!(reader.next(&other, &session).unwrap().len, other.len());
        assert_eq!(reader.next(&header, &session).unwrap().rows, 0);
        let (one_column, _) = (two_frame_data(), ());
        assert_eq!(
            reader.next(&one_column, &session).unwrap().len,
            one_column.len()
        );
        // As many columns, other types (no server sends that within one answer): the
        // length the shape gives falls inside a frame, and the block is refused, whether
        // its frames are all here or not (a relay that passed the first ones on cannot
        // walk it instead).
        let mut strings = vec![
            1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 1, 0xe8, 0x07, 1, b'x', 6,
        ];
        strings.extend_from_slice(b"String");
        for i in 0..1000u32 {
            put_str(&mut strings, format!("value {i}").as_bytes());
        }
        let mut packet = vec![1, 0];
        for part in strings.chunks(1000) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(part).unwrap());
        }
        assert_eq!(reader.next(&packet, &session), Err(misfit()));
        assert_eq!(
            reader.next(&packet[..3000], &session),
            Err(WalkError::Incomplete)
        );
        let (from, mut tail) = reader.take_tail().unwrap();
        assert_eq!(tail.feed(&packet[from..]), Err(misfit()));
        // Another answer: walked.
        assert_eq!(reader.next(&[5], &session).unwrap().kind, Kind::EndOfStream);
        let p = reader.next(&packet, &session).unwrap();
        assert_eq!((p.len, p.rows), (packet.len(), 1000));
        // The answer's end forgets the shape.
        assert_eq!(reader.next(&header, &session).unwrap().rows, 0);
        assert_eq!(reader.next(&[5], &session).unwrap().kind, Kind::EndOfStream);
        assert!(matches!(
            reader.next(&spoiled, &session),
            Err(WalkError::Malformed(_))
        ));
        // A client's INSERT blocks are walked, header or not.
        let (client_header, _) = fixed_columns(2, 0, 1 << 20);
        let (client_data, _) = fixed_columns(2, 5000, 3000);
        let mut client = ServerPackets::default();
        let h = client.next_client(&client_header, &session).unwrap();
        assert_eq!(h.len, client_header.len());
        assert_eq!(
            client.next_client(&client_data, &session).unwrap().len,
            client_data.len()
        );
        assert!(matches!(
            client.next_client(&spoil_after_first_frame(&client_data), &session),
            Err(WalkError::Malformed(_))
        ));
    }

    /// A block whose every column sends the walk into a frame of its own is walked a
    /// bounded number of times: past `LAZY_STOPS` stops, every frame is decompressed.
    #[test]
    fn a_walk_that_stops_in_every_frame_decompresses_them_all() {
        let session = COMPRESSED;
        let columns = 4 * LAZY_STOPS;
        let mut block = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
        write_varint(&mut block, columns as u64);
        write_varint(&mut block, 300);
        // Each column's data spans more than two frames: its name lies two or three frames
        // on from the last one, never in the frame right after a decompressed one.
        for c in 0..columns {
            put_str(&mut block, format!("c{c}").as_bytes());
            put_str(&mut block, b"UInt64");
            block.extend((0..2400u32).map(|i| (i % 13) as u8));
        }
        let mut packet = vec![1, 0];
        for part in block.chunks(1000) {
            packet.extend_from_slice(&crate::clickhouse::compress::lz4_block(part).unwrap());
        }
        let mut reader = ServerPackets::default();
        let p = reader.next(&packet, &session).unwrap();
        assert_eq!((p.len, p.rows), (packet.len(), 300));
        assert_eq!(
            reader.used,
            block.len(),
            "every frame decompressed in the end"
        );
    }

    #[test]
    fn a_frame_of_an_impossible_size_is_refused() {
        let session = Session {
            revision: MAX_REVISION,
            compression: true,
            empty_low_cardinality_granule: false,
        };
        let mut d = vec![1, 0];
        d.extend_from_slice(&[0; 16]);
        d.push(LZ4);
        d.extend_from_slice(&3u32.to_le_bytes());
        d.extend_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            ServerPackets::default().next(&d, &session),
            Err(WalkError::Malformed(_))
        ));
    }
}
