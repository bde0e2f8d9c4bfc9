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

    pub fn varuint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(WalkError::Incomplete)?;
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(WalkError::Malformed("a VarUInt longer than 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WalkError::Malformed("a VarUInt longer than 10 bytes"))
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
