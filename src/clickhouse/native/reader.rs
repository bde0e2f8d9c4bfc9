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
}

pub type Result<T> = std::result::Result<T, WalkError>;

/// The longest VarUInt read. ClickHouse 18.16's own reader stops after 9 bytes (63 bits)
/// whatever the 9th byte says, so a longer one would be one number to chgate and a number
/// plus the start of the next field to the node: bytes chgate checked as a setting's value
/// would reach the node as a query of their own. Refused instead, in both directions (no
/// field of these revisions needs 64 bits).
pub const MAX_VARUINT_BYTES: u64 = 9;

/// A cursor over received bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// A VarUInt of at most [`MAX_VARUINT_BYTES`] bytes.
    pub fn varuint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..7 * MAX_VARUINT_BYTES).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(WalkError::Incomplete)?;
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
        let end = self.pos.checked_add(n).ok_or(WalkError::Incomplete)?;
        let out = self.buf.get(self.pos..end).ok_or(WalkError::Incomplete)?;
        self.pos = end;
        Ok(out)
    }

    pub fn skip(&mut self, n: u64) -> Result<()> {
        self.bytes(n).map(|_| ())
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

    /// Everything after the current position (the position does not move).
    pub fn bytes_after(&self) -> Result<&'a [u8]> {
        self.buf.get(self.pos..).ok_or(WalkError::Incomplete)
    }

    /// Moves to `pos`, which must be within the bytes at hand.
    pub fn seek(&mut self, pos: usize) -> Result<()> {
        if pos > self.buf.len() {
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
        for _ in 0..count {
            // Each step moves at least one byte, so a count far beyond the bytes at hand
            // ends at the first missing one.
            match self.buf.get(pos) {
                Some(&len) if len < 0x80 => pos += 1 + usize::from(len),
                Some(_) => {
                    self.pos = pos;
                    let len = self.varuint()?;
                    self.skip(len)?;
                    pos = self.pos;
                }
                None => return Err(WalkError::Incomplete),
            }
        }
        if pos > self.buf.len() {
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
}
