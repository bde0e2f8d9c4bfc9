//! A cursor over received bytes, and why reading them failed: what every walk of the
//! native protocol's data (blocks, packets) reads with.

/// Why a block or packet could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The block goes on past the bytes at hand: read more and walk again.
    #[error("the block goes on past the bytes received so far")]
    Incomplete,
    #[error("unsupported column type: {0}")]
    Unsupported(&'static str),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A Query setting whose binary form is not known (below revision 54429 a setting's
    /// value can be stepped over only by knowing its type).
    #[error("unknown setting {0}")]
    UnknownSetting(String),
    /// A byte at this position of a compressed block lies in a frame not decompressed
    /// yet (see [`Reader::sparse`]); only the walk of such a block sees this.
    #[error("a compressed frame not decompressed yet, at byte {0} of its block")]
    Absent(usize),
}

pub type Result<T> = std::result::Result<T, WalkError>;

/// The longest VarUInt read. ClickHouse 18.16's own reader stops after 9 bytes (63 bits)
/// whatever the 9th byte says, so a longer one would be one number to chgate and a number
/// plus the start of the next field to the node: bytes chgate checked as a setting's value
/// would reach the node as a query of their own. Refused instead, in both directions (no
/// field of these revisions needs 64 bits).
pub const MAX_VARUINT_BYTES: u64 = 9;

/// A cursor over received bytes.
///
/// A sparse reader stands over a compressed block of which only some frames were
/// decompressed, each kept somewhere in `buf` ([`Present`]). Positions are the block's.
/// Skipping needs no bytes, so a walk steps over fixed-width data in frames nobody
/// decompressed; reading a byte of one answers [`WalkError::Absent`] with its position.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// How many bytes there are to walk (`buf`'s length, unless sparse).
    len: usize,
    /// The range of positions known to be readable around `pos` (all, unless sparse)...
    valid: (usize, usize),
    /// ...and where position `p` of it is in `buf`: at `p - base` (wrapping).
    base: usize,
    present: Option<&'a [Present]>,
}

/// Bytes of a sparse reader's block that are at hand: positions `start..end`, kept in its
/// buffer from `at`. Sorted by `start`; runs adjacent both in the block and in the buffer
/// are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub start: usize,
    pub end: usize,
    pub at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            len: buf.len(),
            valid: (0, buf.len()),
            base: 0,
            present: None,
        }
    }

    /// A reader of a block of `len` bytes whose readable ones are `present`, kept in `buf`.
    /// Every run must lie within `buf` (a run that does not is never read).
    pub fn sparse(buf: &'a [u8], len: usize, present: &'a [Present]) -> Self {
        Self {
            buf,
            pos: 0,
            len,
            valid: (0, 0),
            base: 0,
            present: Some(present),
        }
    }

    /// Makes `start..end` readable, or says why not: past the bytes at hand
    /// ([`WalkError::Incomplete`]) or in a frame not decompressed ([`WalkError::Absent`]).
    #[cold]
    fn cover(&mut self, start: usize, end: usize) -> Result<()> {
        if end > self.len {
            return Err(WalkError::Incomplete);
        }
        let Some(present) = self.present else {
            return Ok(());
        };
        // The last run starting at or before `start`.
        let i = present.partition_point(|run| run.start <= start);
        let Some(run) = i.checked_sub(1).and_then(|i| present.get(i)) else {
            return Err(WalkError::Absent(start));
        };
        if start >= run.end {
            return Err(WalkError::Absent(start));
        }
        if end > run.end {
            // What follows is not at hand with it (such runs are merged): a gap.
            return Err(WalkError::Absent(run.end));
        }
        if run
            .at
            .checked_add(run.end - run.start)
            .is_none_or(|e| e > self.buf.len())
        {
            return Err(WalkError::Malformed(
                "a decompressed frame outside its buffer",
            ));
        }
        self.valid = (run.start, run.end);
        self.base = run.start.wrapping_sub(run.at);
        Ok(())
    }

    /// Checks that `n` bytes from the position can be read.
    #[inline]
    fn readable(&mut self, n: usize) -> Result<usize> {
        let end = self.pos.checked_add(n).ok_or(WalkError::Incomplete)?;
        if self.pos < self.valid.0 || end > self.valid.1 {
            self.cover(self.pos, end)?;
        }
        Ok(end)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// A VarUInt of at most [`MAX_VARUINT_BYTES`] bytes.
    pub fn varuint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..7 * MAX_VARUINT_BYTES).step_by(7) {
            self.readable(1)?;
            let byte = self.buf[self.pos.wrapping_sub(self.base)];
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WalkError::Malformed("a VarUInt longer than 9 bytes"))
    }

    pub fn bytes(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| WalkError::Incomplete)?;
        let end = self.readable(n)?;
        let out = &self.buf[self.pos.wrapping_sub(self.base)..end.wrapping_sub(self.base)];
        self.pos = end;
        Ok(out)
    }

    /// Steps over `n` bytes, which need not be readable (only there).
    pub fn skip(&mut self, n: u64) -> Result<()> {
        let n = usize::try_from(n).map_err(|_| WalkError::Incomplete)?;
        let end = self.pos.checked_add(n).ok_or(WalkError::Incomplete)?;
        if end > self.len {
            return Err(WalkError::Incomplete);
        }
        self.pos = end;
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u32_le(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        let mut le = [0u8; 4];
        le.copy_from_slice(b);
        Ok(u32::from_le_bytes(le))
    }

    /// Everything after the current position (the position does not move); not for a
    /// sparse reader.
    pub fn bytes_after(&self) -> Result<&'a [u8]> {
        debug_assert!(self.present.is_none());
        self.buf.get(self.pos..).ok_or(WalkError::Incomplete)
    }

    /// The bytes at `start..end` of the buffer, wherever the position is; not for a sparse
    /// reader.
    pub fn slice(&self, start: usize, end: usize) -> Result<&'a [u8]> {
        debug_assert!(self.present.is_none());
        self.buf.get(start..end).ok_or(WalkError::Incomplete)
    }

    /// Moves to `pos`, which must be within the bytes at hand.
    pub fn seek(&mut self, pos: usize) -> Result<()> {
        if pos > self.len {
            return Err(WalkError::Incomplete);
        }
        self.pos = pos;
        Ok(())
    }

    pub fn u64_le(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(b);
        Ok(u64::from_le_bytes(le))
    }

    /// Steps over `count` length-prefixed strings: a column of `String` values. Lengths
    /// under 128 (one VarUInt byte, nearly every value in practice) are taken in a tight
    /// loop; a longer one goes through [`Reader::varuint`].
    pub fn skip_strings(&mut self, count: u64) -> Result<()> {
        let mut pos = self.pos;
        let (mut from, mut to) = self.valid;
        for _ in 0..count {
            // Each step moves at least one byte, so a count far beyond the bytes at hand
            // ends at the first missing one. Only the lengths are read: a long string's
            // bytes may lie in frames nobody decompressed.
            if pos < from || pos >= to {
                self.cover(pos, pos + 1)?;
                (from, to) = self.valid;
            }
            match self.buf[pos.wrapping_sub(self.base)] {
                len if len < 0x80 => pos += 1 + usize::from(len),
                _ => {
                    self.pos = pos;
                    let len = self.varuint()?;
                    self.skip(len)?;
                    pos = self.pos;
                    (from, to) = self.valid;
                }
            }
        }
        if pos > self.len {
            return Err(WalkError::Incomplete);
        }
        self.pos = pos;
        Ok(())
    }

    /// A length-prefixed string, borrowed.
    pub fn string(&mut self) -> Result<&'a [u8]> {
        let len = self.varuint()?;
        self.bytes(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_varuint_ends_within_nine_bytes() {
        let nine = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(Reader::new(&nine).varuint(), Ok(u64::MAX >> 1));
        // What 18.16 reads as nine bytes and a next field, chgate refuses.
        let ten = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert!(matches!(
            Reader::new(&ten).varuint(),
            Err(WalkError::Malformed(_))
        ));
        assert_eq!(Reader::new(&ten[..8]).varuint(), Err(WalkError::Incomplete));
    }

    #[test]
    fn a_sparse_reader_steps_over_gaps_and_reads_only_present_bytes() {
        // Block bytes 0..10 and 20..30 at hand, kept the other way round.
        let block: Vec<u8> = (0..40).collect();
        let buf = [&block[20..30], &block[0..10]].concat();
        let present = [
            Present {
                start: 0,
                end: 10,
                at: 10,
            },
            Present {
                start: 20,
                end: 30,
                at: 0,
            },
        ];
        let mut r = Reader::sparse(&buf, 40, &present);
        assert_eq!(r.u8(), Ok(0));
        r.skip(8).unwrap();
        // Byte 9 is there, byte 10 is not.
        assert_eq!(r.bytes(2), Err(WalkError::Absent(10)));
        assert_eq!(r.u8(), Ok(9));
        r.skip(12).unwrap();
        assert_eq!(r.u8(), Ok(22));
        r.skip(7).unwrap();
        assert_eq!(r.u8(), Err(WalkError::Absent(30)));
        r.skip(10).unwrap();
        assert_eq!(r.skip(1), Err(WalkError::Incomplete));
        assert_eq!(r.u8(), Err(WalkError::Incomplete));
        // Strings: their lengths must be present, their bytes need not be.
        let mut strings = vec![3, b'a', b'b', b'c', 12];
        strings.extend_from_slice(&[0; 12]);
        strings.extend_from_slice(&[1, b'z']);
        let buf = [&strings[0..5], &strings[17..19]].concat();
        let present = [
            Present {
                start: 0,
                end: 5,
                at: 0,
            },
            Present {
                start: 17,
                end: 19,
                at: 5,
            },
        ];
        let mut r = Reader::sparse(&buf, strings.len(), &present);
        r.skip_strings(3).unwrap();
        assert_eq!(r.position(), strings.len());
        let mut r = Reader::sparse(&buf, strings.len(), &present[..1]);
        assert_eq!(r.skip_strings(3), Err(WalkError::Absent(17)));
    }
}
