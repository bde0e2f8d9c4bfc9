//! The rest of a server packet whose end is known before its bytes are all at hand: it is
//! passed on as it comes and let go, instead of held until it is whole.
//!
//! The blocks of one answer whose columns are all fixed-width have a length that follows
//! from their row count ([`super::block::Shape`]). Once such a block's first bytes are read
//! (for a compressed block, its first frame), what is left of the packet is known without
//! walking it: so many bytes of a plain block, or compressed frames that hold so many more
//! bytes of the block. Those frames' headers are read as they pass (and checked as the
//! walk checks them); their bodies are not read at all. A relay holds at most a frame
//! header of such a packet, whatever the block's size (a driver's 16 MiB batches, a
//! `max_block_size` of millions of rows).
//!
//! Frames that do not end exactly where the block must are a stream chgate cannot follow:
//! the packet is refused as malformed, as a walk would refuse it.

use super::block::Shape;
use super::kind::Kind;
use super::reader::{Result, WalkError};
use super::stream::BlockStream;

/// A compressed frame: a 16-byte checksum, the method, the compressed size (header
/// included) and the decompressed size, both u32 little-endian; then the body.
pub(super) const FRAME_CHECKSUM: usize = 16;
pub(super) const FRAME_HEADER: usize = 9;
const HEADER: usize = FRAME_CHECKSUM + FRAME_HEADER;
pub(super) const LZ4: u8 = 0x82;
pub(super) const ZSTD: u8 = 0x90;
pub(super) const NONE: u8 = 0x02;
/// ClickHouse refuses a compressed frame over 1 GiB; so does this reader, decompressed too,
/// and a block over 1 GiB.
pub(super) const MAX_FRAME: u64 = 1 << 30;

/// A compressed frame's header: its method, its body's length and the bytes of the block
/// it holds, checked to be possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub method: u8,
    pub body_len: u64,
    pub raw: u64,
}

impl FrameHeader {
    /// Reads the method and sizes that follow a frame's checksum.
    pub(super) fn read(method: u8, compressed: u32, raw: u32) -> Result<Self> {
        let (compressed, raw) = (u64::from(compressed), u64::from(raw));
        if !(FRAME_HEADER as u64..=MAX_FRAME).contains(&compressed) || raw > MAX_FRAME {
            return Err(WalkError::Malformed(
                "a compressed frame of an impossible size",
            ));
        }
        let body_len = compressed - FRAME_HEADER as u64;
        // A frame cannot hold more than this: LZ4 gets at most 255 bytes out of one (a
        // long match's length bytes), an uncompressed frame exactly its own.
        let holds = match method {
            LZ4 => body_len.saturating_mul(255).saturating_add(16),
            NONE => body_len,
            ZSTD => return Err(WalkError::Unsupported("ZSTD-compressed blocks")),
            _ => {
                return Err(WalkError::Unsupported(
                    "a compression method chgate does not know",
                ))
            }
        };
        if method == NONE && raw != body_len {
            return Err(WalkError::Malformed(
                "an uncompressed frame of the wrong size",
            ));
        }
        if raw > holds {
            return Err(WalkError::Malformed(
                "a compressed frame that claims more than it holds",
            ));
        }
        Ok(Self {
            method,
            body_len,
            raw,
        })
    }
}

/// What is left of a packet whose end is known, or found as it comes: its kind and rows
/// (for the relay's accounting once it ends), and the bytes it still takes.
#[derive(Debug)]
pub struct Tail {
    pub kind: Kind,
    pub rows: u64,
    left: Left,
}

#[derive(Debug)]
enum Left {
    /// Bytes of a plain block.
    Bytes(u64),
    /// A plain block walked as it comes (its columns are not all fixed-width, or its
    /// layout is not known yet).
    Walk(Box<BlockStream>),
    /// A compressed block walked as its frames come.
    WalkFrames(Box<WalkedFrames>),
    /// Compressed frames that hold `raw` more bytes of the block, whose frames so far held
    /// `filled`; of the frame under way, the header's first `have` bytes, and `body` bytes
    /// of its body still to come; `over`: that frame holds more than the block has left.
    Frames {
        raw: u64,
        filled: u64,
        over: bool,
        header: [u8; HEADER],
        have: usize,
        body: u64,
    },
}

impl Tail {
    /// The rest of a plain block: `bytes` more.
    pub(super) fn plain(kind: Kind, rows: u64, bytes: u64) -> Self {
        Self {
            kind,
            rows,
            left: Left::Bytes(bytes),
        }
    }

    /// A plain block walked as it comes, from its start.
    pub(super) fn walk(kind: Kind, walk: BlockStream) -> Self {
        Self {
            kind,
            rows: 0,
            left: Left::Walk(Box::new(walk)),
        }
    }

    /// A compressed block walked as its frames come, from its first frame; `room`: a
    /// decompression buffer to use (an earlier tail's, see [`Tail::into_room`]).
    pub(super) fn walk_frames(kind: Kind, walk: BlockStream, room: Vec<u8>) -> Self {
        Self {
            kind,
            rows: 0,
            left: Left::WalkFrames(Box::new(WalkedFrames {
                walk,
                scratch: room,
                have: 0,
                skipping: None,
                filled: 0,
            })),
        }
    }

    /// The rest of a compressed block of `len` bytes whose frames so far held `filled`:
    /// frames from where the tail is first fed.
    pub(super) fn frames(kind: Kind, rows: u64, filled: u64, len: u64) -> Self {
        Self {
            kind,
            rows,
            left: Left::Frames {
                raw: len.saturating_sub(filled),
                filled,
                over: false,
                header: [0; HEADER],
                have: 0,
                body: 0,
            },
        }
    }

    /// The layout of a block walked as it came (`Some(None)`: not all fixed-width), once
    /// its end was found; `None` for a tail not walked or not done.
    pub fn walked_shape(&self) -> Option<Option<Shape>> {
        match &self.left {
            Left::Walk(walk) => walk.shape(),
            Left::WalkFrames(frames) => frames.walk.shape(),
            Left::Bytes(_) | Left::Frames { .. } => None,
        }
    }

    /// The decompression buffer of a tail that is done with, for the next one: its
    /// contents are never read before they are written again.
    pub fn into_room(self) -> Option<Vec<u8>> {
        match self.left {
            Left::WalkFrames(frames) => Some(frames.scratch),
            _ => None,
        }
    }

    /// Takes what of `bytes` (the next bytes from the peer) is the packet's: how many, and
    /// whether the packet ends there. Bytes after its end are not looked at. A block walked
    /// as it comes may leave the last few bytes (an item they cut off, a column's name and
    /// type at most): they must come again, first, in the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool)> {
        match &mut self.left {
            Left::Walk(walk) => {
                let fed = walk.feed(bytes)?;
                self.rows = walk.rows().unwrap_or(0);
                Ok(fed)
            }
            Left::WalkFrames(frames) => {
                let fed = frames.feed(bytes)?;
                self.rows = frames.walk.rows().unwrap_or(0);
                Ok(fed)
            }
            Left::Bytes(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                // At most `bytes.len()`.
                Ok((take as usize, *left == 0))
            }
            Left::Frames {
                raw,
                filled,
                over,
                header,
                have,
                body,
            } => {
                let mut at = 0;
                loop {
                    if *body > 0 {
                        let take = (*body).min((bytes.len() - at) as u64);
                        *body -= take;
                        at += take as usize;
                    } else if *have < HEADER {
                        let take = (HEADER - *have).min(bytes.len() - at);
                        header[*have..*have + take].copy_from_slice(&bytes[at..at + take]);
                        *have += take;
                        at += take;
                        if *have == HEADER {
                            let frame = parse(header)?;
                            // As a walk of the whole block tells them.
                            if *filled + frame.raw > MAX_FRAME {
                                return Err(WalkError::Malformed("a compressed block over 1 GiB"));
                            }
                            *filled += frame.raw;
                            // A frame past the block's end is found out once it is whole,
                            // where a walk of the whole packet finds it out.
                            *over = frame.raw > *raw;
                            *raw = raw.saturating_sub(frame.raw);
                            *body = frame.body_len;
                        }
                    }
                    let whole = *have == HEADER && *body == 0;
                    if whole && *over {
                        return Err(misfit());
                    }
                    if whole && *raw == 0 {
                        return Ok((at, true));
                    }
                    if whole {
                        *have = 0;
                    }
                    if at == bytes.len() {
                        return Ok((at, false));
                    }
                }
            }
        }
    }
}

/// A compressed block walked as its frames come. A frame is taken whole (an LZ4 block
/// decompresses only whole): the bytes of one not all here are left for the next call.
/// Decompressed, it is walked, and let go but for an item its end cut off, which the next
/// frame's bytes are put after. A frame that holds nothing the walk reads (fixed-width
/// values, a long string's middle) is stepped over as it comes, never decompressed. What
/// is held: one frame, decompressed, and the compressed bytes of one frame.
#[derive(Debug)]
struct WalkedFrames {
    walk: BlockStream,
    /// Decompressed bytes: the first `have` are an item the walk has not taken yet.
    scratch: Vec<u8>,
    have: usize,
    /// The body bytes, still to come, of a frame stepped over unread.
    skipping: Option<u64>,
    /// The block's bytes in its frames so far.
    filled: u64,
}

impl WalkedFrames {
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool)> {
        let mut at = 0;
        loop {
            if let Some(left) = self.skipping {
                let take = left.min((bytes.len() - at) as u64);
                // At most the bytes at hand.
                at += take as usize;
                if take < left {
                    self.skipping = Some(left - take);
                    return Ok((at, false));
                }
                self.skipping = None;
                // The frame stepped over may have held the end of the block.
                if self.walk.feed(&[])?.1 {
                    return Ok((at, true));
                }
            }
            let Some(header) = bytes.get(at..at + HEADER) else {
                return Ok((at, false));
            };
            let mut h = [0u8; HEADER];
            h.copy_from_slice(header);
            let frame = parse(&h)?;
            if self.filled + frame.raw > MAX_FRAME {
                return Err(WalkError::Malformed("a compressed block over 1 GiB"));
            }
            if self.have == 0 && frame.raw > 0 && self.walk.skippable() >= frame.raw {
                self.filled += frame.raw;
                self.walk.skip(frame.raw);
                self.skipping = Some(frame.body_len);
                at += HEADER;
                continue;
            }
            // At most 1 GiB (checked by `parse`).
            let end = at + HEADER + frame.body_len as usize;
            let Some(body) = bytes.get(at + HEADER..end) else {
                return Ok((at, false));
            };
            self.filled += frame.raw;
            let total = self.have + frame.raw as usize;
            if self.scratch.len() < total {
                // As big as a frame needs, not twice that: the frames of one block hold
                // about the same (the writer's buffer size).
                self.scratch.reserve_exact(total - self.scratch.len());
                self.scratch.resize(total, 0);
            }
            decompress(frame.method, body, &mut self.scratch[self.have..total])?;
            at = end;
            let (n, done) = self.walk.feed(&self.scratch[..total])?;
            if done {
                if n != total {
                    return Err(WalkError::Malformed(
                        "a block that ends inside a compressed frame",
                    ));
                }
                return Ok((at, true));
            }
            self.scratch.copy_within(n..total, 0);
            self.have = total - n;
        }
    }
}

/// Decompresses a frame's `body` into `out`, which is exactly the bytes it holds.
pub(super) fn decompress(method: u8, body: &[u8], out: &mut [u8]) -> Result<()> {
    match method {
        LZ4 => match lz4_flex::block::decompress_into(body, out) {
            Ok(n) if n == out.len() => Ok(()),
            _ => Err(WalkError::Malformed(
                "an LZ4 frame that does not decompress",
            )),
        },
        // Only LZ4 and stored frames (checked to be of the right size) get here.
        _ => {
            out.copy_from_slice(body);
            Ok(())
        }
    }
}

/// A block of the answer's columns whose length (from its row count) is not where its
/// frames end: not a block of this answer's layout, which every block of it has.
pub fn misfit() -> WalkError {
    WalkError::Malformed("a block of the answer's columns that ends inside a compressed frame")
}

fn parse(header: &[u8; HEADER]) -> Result<FrameHeader> {
    let word = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[at..at + 4]);
        u32::from_le_bytes(b)
    };
    FrameHeader::read(
        header[FRAME_CHECKSUM],
        word(FRAME_CHECKSUM + 1),
        word(FRAME_CHECKSUM + 5),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(method: u8, body: &[u8], raw: u32) -> Vec<u8> {
        let mut out = vec![7u8; FRAME_CHECKSUM];
        out.push(method);
        out.extend_from_slice(&((body.len() + FRAME_HEADER) as u32).to_le_bytes());
        out.extend_from_slice(&raw.to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Feeds `bytes` in pieces of `piece` bytes: where the tail said the packet ended.
    fn end_in_pieces(mut tail: Tail, bytes: &[u8], piece: usize) -> Result<Option<usize>> {
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + piece).min(bytes.len());
            let (n, done) = tail.feed(&bytes[at..end])?;
            assert!(n <= end - at);
            at += n;
            if done {
                return Ok(Some(at));
            }
            assert_eq!(at, end, "a tail not done takes all it is given");
        }
        Ok(None)
    }

    #[test]
    fn a_plain_tail_takes_its_bytes_and_no_more() {
        let bytes = [1u8; 100];
        for piece in [1, 7, 60, 100] {
            let tail = Tail::plain(Kind::Data, 5, 60);
            assert_eq!(end_in_pieces(tail, &bytes, piece), Ok(Some(60)));
        }
        let tail = Tail::plain(Kind::Data, 5, 160);
        assert_eq!(end_in_pieces(tail, &bytes, 33), Ok(None));
    }

    #[test]
    fn frames_end_where_they_hold_the_blocks_bytes() {
        // Three frames holding 10 + 20 + 5 bytes, then the next packet (an EndOfStream).
        let mut bytes = frame(NONE, &[0; 10], 10);
        bytes.extend(frame(LZ4, &[0; 4], 20));
        bytes.extend(frame(NONE, &[0; 5], 5));
        let end = bytes.len();
        bytes.push(5);
        for piece in 1..=bytes.len() {
            let tail = Tail::frames(Kind::Data, 3, 0, 35);
            assert_eq!(end_in_pieces(tail, &bytes, piece), Ok(Some(end)), "{piece}");
        }
        // Fewer bytes of the block than the frames hold: one frame would end past it.
        let tail = Tail::frames(Kind::Data, 3, 0, 33);
        assert_eq!(end_in_pieces(tail, &bytes, 1000), Err(misfit()));
        // More: the tail is not done with these frames.
        let tail = Tail::frames(Kind::Data, 3, 0, 36);
        assert_eq!(end_in_pieces(tail, &bytes[..end], 1000), Ok(None));
    }

    #[test]
    fn impossible_or_unknown_frames_are_refused() {
        let cases: [(Vec<u8>, WalkError); 4] = [
            (
                frame(NONE, &[0; 10], 11),
                WalkError::Malformed("an uncompressed frame of the wrong size"),
            ),
            (
                frame(LZ4, &[0; 1], 1000),
                WalkError::Malformed("a compressed frame that claims more than it holds"),
            ),
            (
                frame(ZSTD, &[0; 10], 10),
                WalkError::Unsupported("ZSTD-compressed blocks"),
            ),
            (
                frame(0x42, &[0; 10], 10),
                WalkError::Unsupported("a compression method chgate does not know"),
            ),
        ];
        for (bytes, want) in cases {
            let mut tail = Tail::frames(Kind::Data, 1, 0, 10);
            assert_eq!(tail.feed(&bytes), Err(want));
        }
        let mut short = frame(NONE, &[], 0);
        short[FRAME_CHECKSUM + 1] = 8; // a compressed size below the header's own
        let mut tail = Tail::frames(Kind::Data, 1, 0, 10);
        assert_eq!(
            tail.feed(&short),
            Err(WalkError::Malformed(
                "a compressed frame of an impossible size"
            ))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut next = crate::clickhouse::native::test_random(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let raw = next() % 5000;
            let piece = 1 + (next() % 50) as usize;
            let _ = end_in_pieces(Tail::frames(Kind::Data, 1, 0, raw), &bytes, piece);
            let _ = end_in_pieces(Tail::plain(Kind::Totals, 1, raw), &bytes, piece);
        }
    }

    /// `block` in frames of `size()` bytes of it each, LZ4 or stored by turns.
    fn in_frames(block: &[u8], mut size: impl FnMut() -> usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut lz4 = true;
        while at < block.len() {
            let end = (at + size().max(1)).min(block.len());
            let raw = &block[at..end];
            let body = if lz4 {
                lz4_flex::block::compress(raw)
            } else {
                raw.to_vec()
            };
            out.extend(frame(if lz4 { LZ4 } else { NONE }, &body, raw.len() as u32));
            lz4 = !lz4;
            at = end;
        }
        out
    }

    /// Feeds `bytes` to `tail`, each call given what the last did not take and `piece`
    /// more: where the packet ended, `None` if not in these bytes.
    fn end_given_again(mut tail: Tail, bytes: &[u8], piece: usize) -> Result<Option<usize>> {
        let (mut at, mut given) = (0, 0);
        loop {
            given = (given + piece).min(bytes.len());
            let (n, done) = tail.feed(&bytes[at..given])?;
            at += n;
            if done {
                return Ok(Some(at));
            }
            if given == bytes.len() {
                return Ok(None);
            }
        }
    }

    fn walk_frames(framing: crate::clickhouse::native::Framing) -> Tail {
        Tail::walk_frames(Kind::Data, BlockStream::new(framing), Vec::new())
    }

    #[test]
    fn walked_frames_end_with_the_frame_that_ends_the_block() {
        use crate::clickhouse::native::stream::tests::{random_block, HTTP, NATIVE};
        let mut rnd = crate::clickhouse::native::test_random(0xf4a3e5);
        for round in 0..300 {
            let framing = if round % 2 == 0 { HTTP } else { NATIVE };
            let block = random_block(framing, &mut rnd);
            let mut bytes = in_frames(&block, || (rnd() % 300) as usize);
            let end = bytes.len();
            // The next packet (an EndOfStream) is not looked at.
            bytes.push(5);
            for piece in [1, 30, 1000, 1 << 20] {
                assert_eq!(
                    end_given_again(walk_frames(framing), &bytes, piece),
                    Ok(Some(end)),
                    "round {round}, pieces of {piece}"
                );
            }
            assert_eq!(
                end_given_again(walk_frames(framing), &bytes[..end - 1], 64),
                Ok(None)
            );
            // A block whose last frame holds a byte more ends inside it.
            let mut longer = block.clone();
            longer.push(0);
            let bytes = in_frames(&longer, || 1 << 20);
            assert_eq!(
                end_given_again(walk_frames(framing), &bytes, 1 << 20),
                Err(WalkError::Malformed(
                    "a block that ends inside a compressed frame"
                )),
                "round {round}"
            );
        }
    }

    #[test]
    fn frames_of_nothing_but_fixed_width_values_are_never_decompressed() {
        use crate::clickhouse::native::stream::tests::{write_string, HTTP};
        // One UInt64 column of 10,000 rows, then one String column.
        let mut block = vec![2];
        crate::clickhouse::rowbinary::write_varint(&mut block, 10_000);
        write_string(&mut block, "n");
        write_string(&mut block, "UInt64");
        block.extend((0..80_000).map(|i| i as u8));
        write_string(&mut block, "s");
        write_string(&mut block, "String");
        for _ in 0..10_000 {
            write_string(&mut block, "value");
        }
        let mut bytes = in_frames(&block, || 1000);
        // Spoil the bodies of the frames inside the numbers (frames 2 to 79; each stored
        // one is 1025 bytes, each LZ4 one less): decompressing one would fail.
        let mut at = 0;
        let mut spoiled = 0;
        for i in 0..in_frames(&block, || 1000).len() {
            if at >= bytes.len() {
                break;
            }
            let len = u32::from_le_bytes(bytes[at + 17..at + 21].try_into().unwrap()) as usize;
            if (2..79).contains(&i) && bytes[at + FRAME_CHECKSUM] == LZ4 {
                bytes[at + HEADER..at + FRAME_CHECKSUM + len].fill(0xff);
                spoiled += 1;
            }
            at += FRAME_CHECKSUM + len;
        }
        assert!(spoiled > 30);
        for piece in [7, 4096, 1 << 20] {
            assert_eq!(
                end_given_again(walk_frames(HTTP), &bytes, piece),
                Ok(Some(bytes.len())),
                "pieces of {piece}"
            );
        }
        // The same spoiling in the strings is found.
        let mut strings = in_frames(&block, || 1000);
        let last = strings.len() - 300;
        strings[last..].fill(0xff);
        assert!(end_given_again(walk_frames(HTTP), &strings, 4096).is_err());
    }
}
