//! Where a server packet ends, at the revision negotiated with the client: the packet
//! types a query's answer is made of, each read field by field (blocks walked, compressed
//! ones decompressed to be walked), nothing decoded or kept.
//!
//! Handled up to revision [`MAX_REVISION`] (what ClickHouse 18.16 speaks, and what the
//! fixtures in `tests/fixtures/native` were captured at); a packet type that revision does
//! not send is refused as unsupported, never guessed at.

use super::block::{walk_block, Framing};
use super::reader::{Reader, Result, WalkError};

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
}

/// A server packet's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello,
    Data,
    Exception,
    Progress,
    Pong,
    EndOfStream,
    ProfileInfo,
    Totals,
    Extremes,
    Log,
    TableColumns,
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

/// Reads server packets; keeps a buffer for decompressing blocks between packets.
#[derive(Default)]
pub struct ServerPackets {
    scratch: Vec<u8>,
}

/// A compressed frame: checksum, method, sizes, then the compressed bytes.
const FRAME_CHECKSUM: u64 = 16;
const FRAME_HEADER: u64 = 9;
const LZ4: u8 = 0x82;
const ZSTD: u8 = 0x90;
const NONE: u8 = 0x02;
/// ClickHouse refuses a compressed frame over 1 GiB; so does this reader, decompressed too.
const MAX_FRAME: u64 = 1 << 30;

impl ServerPackets {
    /// The packet at the start of `buf`, or [`WalkError::Incomplete`] until all of it is
    /// there.
    pub fn next(&mut self, buf: &[u8], session: &Session) -> Result<Packet> {
        if session.revision > MAX_REVISION {
            return Err(WalkError::Unsupported("a revision above what chgate reads"));
        }
        let mut r = Reader::new(buf);
        let (kind, rows) = match r.varuint()? {
            0 => (Kind::Hello, hello(&mut r, session.revision)?),
            1 => (Kind::Data, self.data(&mut r, session, session.compression)?),
            2 => (Kind::Exception, exception(&mut r)?),
            3 => (Kind::Progress, progress(&mut r)?),
            4 => (Kind::Pong, 0),
            5 => (Kind::EndOfStream, 0),
            6 => (Kind::ProfileInfo, profile_info(&mut r)?),
            7 => (
                Kind::Totals,
                self.data(&mut r, session, session.compression)?,
            ),
            8 => (
                Kind::Extremes,
                self.data(&mut r, session, session.compression)?,
            ),
            // Log blocks are never compressed at these revisions.
            10 => (Kind::Log, self.data(&mut r, session, false)?),
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

    /// A table name, then a block, plain or in compressed frames; its rows.
    fn data(&mut self, r: &mut Reader<'_>, session: &Session, compressed: bool) -> Result<u64> {
        r.string()?;
        let framing = Framing {
            block_info: session.revision >= WITH_BLOCK_INFO,
            custom_serialization: session.revision >= WITH_CUSTOM_SERIALIZATION,
        };
        if !compressed {
            let start = r.position();
            let rest = r.bytes_after()?;
            let block = walk_block(rest, framing)?;
            r.seek(start + block.len)?;
            return Ok(block.rows);
        }
        // The block ends at the end of one of its frames: decompress frame after frame
        // until it walks to exactly that end.
        self.scratch.clear();
        loop {
            self.frame(r)?;
            match walk_block(&self.scratch, framing) {
                Ok(block) if block.len == self.scratch.len() => return Ok(block.rows),
                Ok(_) => {
                    return Err(WalkError::Malformed(
                        "a block that ends inside a compressed frame",
                    ))
                }
                Err(WalkError::Incomplete) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one compressed frame and appends what it holds to the scratch buffer.
    fn frame(&mut self, r: &mut Reader<'_>) -> Result<()> {
        r.skip(FRAME_CHECKSUM)?;
        let method = r.u8()?;
        let compressed = u64::from(r.u32_le()?);
        let raw = u64::from(r.u32_le()?);
        if !(FRAME_HEADER..=MAX_FRAME).contains(&compressed) || raw > MAX_FRAME {
            return Err(WalkError::Malformed(
                "a compressed frame of an impossible size",
            ));
        }
        if self.scratch.len() as u64 + raw > MAX_FRAME {
            return Err(WalkError::Malformed("a compressed block over 1 GiB"));
        }
        let body = r.bytes(compressed - FRAME_HEADER)?;
        let start = self.scratch.len();
        // Checked above: at most 1 GiB.
        self.scratch.resize(start + raw as usize, 0);
        let out = &mut self.scratch[start..];
        match method {
            LZ4 => match lz4_flex::block::decompress_into(body, out) {
                Ok(n) if n == out.len() => Ok(()),
                _ => Err(WalkError::Malformed(
                    "an LZ4 frame that does not decompress",
                )),
            },
            NONE if body.len() == out.len() => {
                out.copy_from_slice(body);
                Ok(())
            }
            NONE => Err(WalkError::Malformed(
                "an uncompressed frame of the wrong size",
            )),
            ZSTD => Err(WalkError::Unsupported("ZSTD-compressed blocks")),
            _ => Err(WalkError::Unsupported(
                "a compression method chgate does not know",
            )),
        }
    }
}

/// The server's Hello: name, version, revision, then what the revision adds.
fn hello(r: &mut Reader<'_>, revision: u64) -> Result<u64> {
    r.string()?;
    r.varuint()?;
    r.varuint()?;
    r.varuint()?;
    if revision >= WITH_TIMEZONE {
        r.string()?;
    }
    if revision >= WITH_DISPLAY_NAME {
        r.string()?;
    }
    if revision >= WITH_VERSION_PATCH {
        r.varuint()?;
    }
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

    #[test]
    fn packets_without_bodies_and_refusals() {
        let session = Session {
            revision: MAX_REVISION,
            compression: false,
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

    #[test]
    fn a_frame_of_an_impossible_size_is_refused() {
        let session = Session {
            revision: MAX_REVISION,
            compression: true,
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
