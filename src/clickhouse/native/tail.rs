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
}
