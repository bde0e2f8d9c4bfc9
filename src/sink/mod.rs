//! Writing rows into a cluster's local tables, for the apps that carry data in (the ingest
//! sidecar, and the CDC apply to come): one part of RowBinary rows to one picked node of
//! its shard, failover within the shard, refused rows isolated by splitting, and the
//! proxy's pick API as the first source of nodes.
//!
//! - [`writer`]: a part to its shard, whatever it takes;
//! - [`pick_api`]: `/v1/pick` as a client.

pub mod pick_api;
pub mod writer;

pub use pick_api::PickApi;
pub use writer::{Target, Written};

/// Rows in RowBinary, with where each ends so a refused batch can be split.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub data: Vec<u8>,
    pub row_ends: Vec<usize>,
}

impl Rows {
    pub fn rows(&self) -> usize {
        self.row_ends.len()
    }

    /// Marks the end of a row just written into `data`.
    pub fn end_row(&mut self) {
        self.row_ends.push(self.data.len());
    }

    /// Rows `[from, to)` as one RowBinary body.
    pub fn slice(&self, from: usize, to: usize) -> &[u8] {
        let start = if from == 0 {
            0
        } else {
            self.row_ends[from - 1]
        };
        let end = if to == 0 { 0 } else { self.row_ends[to - 1] };
        &self.data[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_by_row() {
        let mut r = Rows::default();
        for row in [&b"ab"[..], b"c", b"def"] {
            r.data.extend_from_slice(row);
            r.end_row();
        }
        assert_eq!(r.rows(), 3);
        assert_eq!(r.slice(0, 3), b"abcdef");
        assert_eq!(r.slice(1, 2), b"c");
        assert_eq!(r.slice(2, 3), b"def");
        assert_eq!(r.slice(0, 0), b"");
    }
}
