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
///
/// Rows may be glued to the row after them: a change applied as a cancel row and a state
/// row must go in together or not at all (one without the other leaves a key with two
/// live states, or none), so a refused batch is never split between them.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub data: Vec<u8>,
    pub row_ends: Vec<usize>,
    /// Indexes of the rows glued to their successor, ascending.
    pub glued: Vec<usize>,
}

impl Rows {
    pub fn rows(&self) -> usize {
        self.row_ends.len()
    }

    /// Marks the end of a row just written into `data`.
    pub fn end_row(&mut self) {
        self.row_ends.push(self.data.len());
    }

    /// Marks the end of a row that goes in with the next one (see [`Rows`]).
    // Invariant: the next row is always ended too (a glued last row glues nothing).
    pub fn end_row_glued(&mut self) {
        self.glued.push(self.row_ends.len());
        self.end_row();
    }

    /// Appends `other`'s rows, glue included.
    pub fn append(&mut self, other: &Rows) {
        let (bytes, rows) = (self.data.len(), self.rows());
        self.data.extend_from_slice(&other.data);
        self.row_ends
            .extend(other.row_ends.iter().map(|end| end + bytes));
        self.glued.extend(other.glued.iter().map(|row| row + rows));
    }

    /// Keeps the first `rows` rows (and drops any row begun after them).
    pub fn truncate(&mut self, rows: usize) {
        let end = match rows.checked_sub(1) {
            None => 0,
            Some(last) => self.row_ends.get(last).copied().unwrap_or(self.data.len()),
        };
        self.data.truncate(end);
        self.row_ends.truncate(rows);
        self.glued.retain(|&row| row + 1 < rows);
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.row_ends.clear();
        self.glued.clear();
    }

    /// Where rows `[from, to)` are cut in two: the row boundary nearest their middle (the
    /// later one first) that no glue crosses; `None` when they are one row, or rows glued
    /// together. The same rows always split the same way (a rebuilt batch's inserts must
    /// match its first attempt's, deduplication tokens included).
    pub fn split_point(&self, from: usize, to: usize) -> Option<usize> {
        let mid = from + (to - from) / 2;
        let free = |at: &usize| *at > from && self.glued.binary_search(&(at - 1)).is_err();
        (mid..to)
            .find(free)
            .or_else(|| (from + 1..mid).rev().find(free))
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

    #[test]
    fn glued_rows_are_never_split() {
        let mut r = Rows::default();
        // 0, [1 2], [3 4], 5
        r.data.push(0);
        r.end_row();
        for pair in [[1u8, 2], [3, 4]] {
            r.data.push(pair[0]);
            r.end_row_glued();
            r.data.push(pair[1]);
            r.end_row();
        }
        r.data.push(5);
        r.end_row();
        assert_eq!(r.glued, [1, 3]);
        assert_eq!(r.split_point(0, 6), Some(3), "the middle is free");
        assert_eq!(r.split_point(0, 3), Some(1), "1|2 is glued: before it");
        assert_eq!(r.split_point(1, 3), None, "one glued pair");
        assert_eq!(r.split_point(1, 5), Some(3));
        assert_eq!(r.split_point(3, 6), Some(5));
        assert_eq!(r.split_point(5, 6), None);
        let mut joined = Rows::default();
        joined.append(&r);
        joined.append(&r);
        assert_eq!(joined.glued, [1, 3, 7, 9]);
        assert_eq!(joined.slice(6, 12), joined.slice(0, 6));
        assert_eq!(joined.split_point(7, 9), None);
        joined.data.push(9);
        joined.truncate(8);
        assert_eq!((joined.rows(), joined.data.len()), (8, 8));
        assert_eq!(joined.glued, [1, 3], "row 7 lost the row it was glued to");
        joined.clear();
        assert_eq!((joined.rows(), joined.glued.len()), (0, 0));
    }
}
