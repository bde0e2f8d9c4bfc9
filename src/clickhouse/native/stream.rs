//! A block walked as its bytes come, piece by piece, so that a relay can pass each piece on
//! and let it go instead of holding the block until its end is found.
//!
//! [`super::block`] walks a block whose bytes are all at hand, recursing over its column
//! types. This walk keeps the same steps on a stack of its own ([`Task`]) and stops
//! wherever the bytes run out: at the next call it goes on from there with the next
//! bytes. It takes whole items only (a length, an offset, a column's name and type); one
//! cut off by the end of the bytes given is left unread, and the caller gives those
//! bytes again at the front of the next ones. What it keeps between calls is the stack
//! and the type name of the column under way; a value's bytes are stepped over (a
//! string's or a fixed-width column's, even when they span many calls) and never held.
//!
//! The two walks agree on every block, its length and its errors, whatever the cuts
//! (`tests` below checks this on every cut of the module's test blocks and of the captured
//! sessions in `tests/fixtures/native`).

use super::block::{
    block_prefix, column_bytes, column_header, element, first_arg, granule_indexes, key_version,
    layout, row_width, Framing, IndexType, Layout, Shape, MAX_DEPTH,
};
use super::reader::{Reader, Result, WalkError, MAX_VARUINT_BYTES};

/// A type name being walked: a part of the column's type name, or one of the names the
/// geo types are laid out as.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Column { start: u32, end: u32 },
    Static(&'static str),
}

/// A step of the walk, in the order [`super::block`]'s recursion takes them.
#[derive(Debug, Clone, Copy)]
enum Task {
    /// A type's state prefix (a `LowCardinality` key version, wherever nested).
    Prefix {
        ty: Ty,
        depth: u32,
    },
    /// The prefixes of a tuple's element types, from the first in `list`.
    Prefixes {
        list: Ty,
        depth: u32,
    },
    KeyVersion,
    /// `rows` values of a type.
    Data {
        ty: Ty,
        rows: u64,
        depth: u32,
    },
    /// `rows` values of each of a tuple's element types, from the first in `list`.
    Elements {
        list: Ty,
        rows: u64,
        depth: u32,
    },
    /// An array's offsets, `left` more to read, the last read `last`; then its elements.
    Offsets {
        left: u64,
        last: u64,
        then: Ty,
        tuple: bool,
        depth: u32,
    },
    Skip(u64),
    Strings(u64),
    /// `LowCardinality` granules covering `left` rows (none: the one a writer puts for
    /// no rows), from the next one's index type.
    Granule {
        keys: Option<u64>,
        left: u64,
    },
    /// A count of dictionary keys, then the keys.
    Keys {
        keys: Option<u64>,
    },
    /// A granule's index count, then its indexes; more granules if they leave rows.
    Indexes {
        keys: Option<u64>,
        width: u64,
        left: u64,
    },
}

/// A block walked as its bytes come.
#[derive(Debug)]
pub struct BlockStream {
    framing: Framing,
    /// The block's columns and rows, once its start was read.
    counts: Option<(u64, u64)>,
    columns_left: u64,
    /// The type name of the column under way.
    ty: String,
    stack: Vec<Task>,
    done: bool,
    /// The block's layout so far, as [`super::block`]'s walk finds it: `None` once a
    /// column is not fixed-width.
    shape: Option<Shape>,
}

/// How many steps the stack may hold: a tuple's elements are taken one by one, so the stack
/// grows with the type's nesting, which is bounded ([`MAX_DEPTH`]), not with its width.
const MAX_STACK: usize = 4 * MAX_DEPTH as usize + 8;

/// The most bytes an item may take (a column's name and type, read whole): past this the
/// bytes left for the next call would grow without end.
const MAX_ITEM: usize = 16 << 20;

impl BlockStream {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            counts: None,
            columns_left: 0,
            ty: String::new(),
            stack: Vec::new(),
            done: false,
            shape: None,
        }
    }

    /// The block's layout (`Some(None)`: not all its columns are fixed-width), once its
    /// end was found: what a walk of all its bytes says ([`super::block::Block::shape`]).
    pub fn shape(&self) -> Option<Option<Shape>> {
        self.done.then_some(self.shape)
    }

    /// The block's rows, once its start was read.
    pub fn rows(&self) -> Option<u64> {
        self.counts.map(|(_, rows)| rows)
    }

    /// Whether the block's end was found.
    pub fn done(&self) -> bool {
        self.done
    }

    /// How many bytes the walk will step over next without reading them (fixed-width
    /// values, a string's bytes; the null map and values of a `Nullable` of fixed width, a
    /// tuple's fixed-width elements, one after the other): a compressed frame that holds no
    /// more than this need not be decompressed ([`BlockStream::skip`]).
    pub fn skippable(&self) -> u64 {
        let mut total: u64 = 0;
        for &task in self.stack.iter().rev() {
            match self.unread(task).and_then(|bytes| total.checked_add(bytes)) {
                Some(sum) => total = sum,
                None => break,
            }
        }
        total
    }

    /// Steps over `n` bytes that the walk would not read, at most [`BlockStream::skippable`].
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 {
            let Some(&task) = self.stack.last() else {
                return;
            };
            if let Task::Skip(left) = task {
                let take = n.min(left);
                n -= take;
                self.stack.pop();
                if take < left {
                    self.stack.push(Task::Skip(left - take));
                }
                continue;
            }
            // A step of fixed-width bytes only: those bytes, as one to step over.
            let Some(bytes) = self.unread(task) else {
                return;
            };
            self.stack.pop();
            if bytes > 0 {
                self.stack.push(Task::Skip(bytes));
            }
        }
    }

    /// The bytes a step takes if they are all stepped over unread (the step would become
    /// skips, as [`BlockStream::data`] and [`BlockStream::prefix`] lay a type out); `None`
    /// if it reads any, or would refuse the type.
    fn unread(&self, task: Task) -> Option<u64> {
        match task {
            Task::Skip(n) => Some(n),
            Task::Data { ty, rows, depth } => self.fixed_bytes(ty, rows, depth),
            Task::Elements { list, rows, depth } => self.fixed_elements(list, rows, depth),
            // No bytes: a type of fixed width has no state prefix.
            Task::Prefix { ty, depth } => self.fixed_bytes(ty, 1, depth).map(|_| 0),
            Task::Prefixes { list, depth } => self.fixed_elements(list, 1, depth).map(|_| 0),
            _ => None,
        }
    }

    /// The bytes of `rows` values of `ty` at `depth`, if they are all fixed-width.
    fn fixed_bytes(&self, ty: Ty, rows: u64, depth: u32) -> Option<u64> {
        if depth > MAX_DEPTH {
            return None;
        }
        match layout(self.text(ty)).ok()? {
            Layout::Fixed(width) => column_bytes(rows, width).ok(),
            Layout::Nullable(inner) => {
                let values = self.fixed_bytes(self.within(ty, inner), rows, depth + 1)?;
                values.checked_add(rows)
            }
            Layout::Tuple(list) => self.fixed_elements(self.within(ty, list), rows, depth),
            Layout::As(other) => self.fixed_bytes(self.within(ty, other), rows, depth + 1),
            _ => None,
        }
    }

    /// The bytes of `rows` values of each of a tuple's element types in `list` (at
    /// `depth + 1`, as [`Task::Elements`] walks them), if they are all fixed-width.
    fn fixed_elements(&self, list: Ty, rows: u64, depth: u32) -> Option<u64> {
        let mut total: u64 = 0;
        let mut next = Some(list);
        while let Some(list) = next {
            let (first, rest) = self.first_element(list);
            total = total.checked_add(self.fixed_bytes(first, rows, depth + 1)?)?;
            next = rest;
        }
        Some(total)
    }

    /// Walks on over `bytes`, the block's next bytes after those taken so far: how many of
    /// them it took, and whether the block ended there (what follows is not looked at).
    /// The bytes not taken (an item cut off by their end) must come again, first, in the
    /// next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool)> {
        let mut at = 0;
        while !self.done {
            let going_on = match self.stack.pop() {
                Some(task) => self.step(task, bytes, &mut at)?,
                None => self.next_column(bytes, &mut at)?,
            };
            if !going_on {
                break;
            }
            if self.stack.len() > MAX_STACK {
                return Err(WalkError::Malformed("a type nested too deeply"));
            }
        }
        if !self.done && bytes.len() - at > MAX_ITEM {
            return Err(WalkError::Malformed("a column name or type over 16 MiB"));
        }
        Ok((at, self.done))
    }

    /// The block's start, or the next column's header: `false` if its bytes are not all
    /// here.
    fn next_column(&mut self, bytes: &[u8], at: &mut usize) -> Result<bool> {
        let rest = &bytes[*at..];
        let Some((_, rows)) = self.counts else {
            return match block_prefix(rest, self.framing) {
                Ok((columns, rows, len)) => {
                    self.counts = Some((columns, rows));
                    self.columns_left = columns;
                    self.shape = Some(Shape {
                        columns,
                        headers: 0,
                        row_width: 0,
                    });
                    *at += len;
                    Ok(true)
                }
                Err(WalkError::Incomplete) => Ok(false),
                Err(e) => Err(e),
            };
        };
        if self.columns_left == 0 {
            self.done = true;
            return Ok(true);
        }
        let mut r = Reader::new(rest);
        let ty = match column_header(&mut r, self.framing) {
            Ok(ty) => ty,
            Err(WalkError::Incomplete) => return Ok(false),
            Err(e) => return Err(e),
        };
        if let Some(shape) = self.shape.as_mut() {
            match row_width(ty, 0) {
                Some(width) => {
                    shape.headers += r.position() as u64;
                    shape.row_width = shape.row_width.saturating_add(width);
                }
                None => self.shape = None,
            }
        }
        self.ty.clear();
        self.ty.push_str(ty);
        *at += r.position();
        self.columns_left -= 1;
        // Zero rows of data are zero bytes: no state prefix either.
        if rows > 0 {
            let ty = Ty::Column {
                start: 0,
                end: u32::try_from(self.ty.len())
                    .map_err(|_| WalkError::Malformed("a column type name over 4 GiB"))?,
            };
            self.stack.push(Task::Data { ty, rows, depth: 0 });
            self.stack.push(Task::Prefix { ty, depth: 0 });
        }
        Ok(true)
    }

    /// Takes one step; `false` if it needs bytes not here yet (what is left of it is back
    /// on the stack).
    fn step(&mut self, task: Task, bytes: &[u8], at: &mut usize) -> Result<bool> {
        let avail = (bytes.len() - *at) as u64;
        match task {
            Task::Skip(n) => {
                let take = n.min(avail);
                // At most the bytes at hand.
                *at += take as usize;
                if take < n {
                    return self.wait(Task::Skip(n - take));
                }
                Ok(true)
            }
            Task::Strings(count) => self.strings(count, bytes, at),
            Task::Offsets {
                left,
                last,
                then,
                tuple,
                depth,
            } => self.offsets(left, last, (then, tuple, depth), bytes, at),
            Task::KeyVersion => match take_u64(bytes, at) {
                Some(version) => key_version(version).map(|()| true),
                None => self.wait(task),
            },
            Task::Granule { keys, left } => {
                let Some(index_type) = take_u64(bytes, at) else {
                    return self.wait(task);
                };
                let index = IndexType::read(index_type)?;
                self.stack.push(Task::Indexes {
                    keys,
                    width: index.key_width,
                    left,
                });
                if index.additional_keys {
                    self.stack.push(Task::Keys { keys });
                }
                if index.global_keys {
                    self.stack.push(Task::Keys { keys });
                }
                Ok(true)
            }
            Task::Keys { keys } => {
                let Some(count) = take_u64(bytes, at) else {
                    return self.wait(task);
                };
                self.stack.push(match keys {
                    Some(width) => Task::Skip(column_bytes(count, width)?),
                    None => Task::Strings(count),
                });
                Ok(true)
            }
            Task::Indexes { keys, width, left } => {
                let Some(indexes) = take_u64(bytes, at) else {
                    return self.wait(task);
                };
                granule_indexes(indexes, left)?;
                if left > indexes {
                    self.stack.push(Task::Granule {
                        keys,
                        left: left - indexes,
                    });
                }
                self.stack.push(Task::Skip(column_bytes(indexes, width)?));
                Ok(true)
            }
            Task::Prefix { ty, depth } => self.prefix(ty, depth),
            Task::Prefixes { list, depth } => {
                let (first, rest) = self.first_element(list);
                if let Some(list) = rest {
                    self.stack.push(Task::Prefixes { list, depth });
                }
                self.stack.push(Task::Prefix {
                    ty: first,
                    depth: depth + 1,
                });
                Ok(true)
            }
            Task::Data { ty, rows, depth } => self.data(ty, rows, depth),
            Task::Elements { list, rows, depth } => {
                let (first, rest) = self.first_element(list);
                if let Some(list) = rest {
                    self.stack.push(Task::Elements { list, rows, depth });
                }
                self.stack.push(Task::Data {
                    ty: first,
                    rows,
                    depth: depth + 1,
                });
                Ok(true)
            }
        }
    }

    /// Puts `task` (what is left of a step) back on the stack for the next bytes: `false`,
    /// as [`BlockStream::step`] says when it needs bytes not here yet.
    fn wait(&mut self, task: Task) -> Result<bool> {
        self.stack.push(task);
        Ok(false)
    }

    /// The text of a type being walked.
    fn text(&self, ty: Ty) -> &str {
        match ty {
            Ty::Column { start, end } => &self.ty[start as usize..end as usize],
            Ty::Static(s) => s,
        }
    }

    /// `part`, a piece of `of`'s text, as a type being walked.
    fn within(&self, of: Ty, part: &str) -> Ty {
        let base = self.text(of);
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        match of {
            // Type names are under 4 GiB (checked when the column's was taken).
            Ty::Column { start: s, .. } => Ty::Column {
                start: s + start as u32,
                end: s + (start + part.len()) as u32,
            },
            Ty::Static(s) => Ty::Static(&s[start..start + part.len()]),
        }
    }

    /// The first element type of a tuple's `list`, and the rest of the list.
    fn first_element(&self, list: Ty) -> (Ty, Option<Ty>) {
        let (first, rest) = first_arg(self.text(list));
        let first = self.within(list, element(first));
        (first, rest.map(|r| self.within(list, r)))
    }

    fn prefix(&mut self, ty: Ty, depth: u32) -> Result<bool> {
        if depth > MAX_DEPTH {
            return Err(WalkError::Malformed("a type nested too deeply"));
        }
        let next = match layout(self.text(ty))? {
            Layout::LowCardinality { .. } => Task::KeyVersion,
            Layout::Nullable(inner) | Layout::Array(inner) | Layout::As(inner) => Task::Prefix {
                ty: self.within(ty, inner),
                depth: depth + 1,
            },
            Layout::Geo(other) => Task::Prefix {
                ty: Ty::Static(other),
                depth: depth + 1,
            },
            Layout::Tuple(list) | Layout::ArrayOfTuples(list) => Task::Prefixes {
                list: self.within(ty, list),
                depth,
            },
            Layout::Fixed(_) | Layout::String => return Ok(true),
        };
        self.stack.push(next);
        Ok(true)
    }

    fn data(&mut self, ty: Ty, rows: u64, depth: u32) -> Result<bool> {
        if depth > MAX_DEPTH {
            return Err(WalkError::Malformed("a type nested too deeply"));
        }
        let offsets = |then, tuple, depth| Task::Offsets {
            left: rows,
            last: 0,
            then,
            tuple,
            depth,
        };
        // `rows` values of the type inside this one (`Nullable`) or of the type it is laid
        // out as (`As`, `Geo`), a level deeper as in [`super::block`]; those arms differ only
        // in how that type is named (a part of this one's name, or a geo type's static name).
        let deeper = |ty| Task::Data {
            ty,
            rows,
            depth: depth + 1,
        };
        match layout(self.text(ty))? {
            Layout::Fixed(width) => self.stack.push(Task::Skip(column_bytes(rows, width)?)),
            Layout::String => self.stack.push(Task::Strings(rows)),
            Layout::Nullable(inner) => {
                let ty = self.within(ty, inner);
                self.stack.push(deeper(ty));
                // The null map, a byte a row, comes first: pushed last.
                self.stack.push(Task::Skip(rows));
            }
            Layout::Array(inner) => {
                let then = self.within(ty, inner);
                self.stack.push(offsets(then, false, depth + 1));
            }
            Layout::Tuple(list) => {
                let list = self.within(ty, list);
                self.stack.push(Task::Elements { list, rows, depth });
            }
            Layout::ArrayOfTuples(list) => {
                let list = self.within(ty, list);
                self.stack.push(offsets(list, true, depth));
            }
            Layout::LowCardinality { keys } => {
                if rows > 0 || self.framing.empty_low_cardinality_granule {
                    self.stack.push(Task::Granule { keys, left: rows });
                }
            }
            Layout::As(other) => {
                let ty = self.within(ty, other);
                self.stack.push(deeper(ty));
            }
            Layout::Geo(other) => self.stack.push(deeper(Ty::Static(other))),
        }
        Ok(true)
    }

    /// Array offsets: `left` more, the last so far `last`; then the elements, of type
    /// `then` (or of each type of a tuple's list).
    fn offsets(
        &mut self,
        mut left: u64,
        mut last: u64,
        (then, tuple, depth): (Ty, bool, u32),
        bytes: &[u8],
        at: &mut usize,
    ) -> Result<bool> {
        while left > 0 {
            let Some(offset) = take_u64(bytes, at) else {
                return self.wait(Task::Offsets {
                    left,
                    last,
                    then,
                    tuple,
                    depth,
                });
            };
            if offset < last {
                return Err(WalkError::Malformed("array offsets that go down"));
            }
            last = offset;
            left -= 1;
        }
        self.stack.push(if tuple {
            Task::Elements {
                list: then,
                rows: last,
                depth,
            }
        } else {
            Task::Data {
                ty: then,
                rows: last,
                depth,
            }
        });
        Ok(true)
    }

    /// `count` strings. Lengths under 128 (one byte) are taken in a tight loop; a string
    /// cut off by the end of the bytes is stepped over as it comes.
    fn strings(&mut self, count: u64, bytes: &[u8], at: &mut usize) -> Result<bool> {
        let mut pos = *at;
        let mut left = count;
        while left > 0 {
            let (len, width) = match bytes.get(pos) {
                None => break,
                Some(&len) if len < 0x80 => (u64::from(len), 1),
                Some(_) => match varuint(&bytes[pos..])? {
                    Some(read) => read,
                    None => break,
                },
            };
            left -= 1;
            let start = pos + width;
            let avail = (bytes.len() - start) as u64;
            if len > avail {
                *at = bytes.len();
                if left > 0 {
                    self.stack.push(Task::Strings(left));
                }
                self.stack.push(Task::Skip(len - avail));
                return Ok(false);
            }
            // At most the bytes at hand.
            pos = start + len as usize;
        }
        *at = pos;
        if left > 0 {
            return self.wait(Task::Strings(left));
        }
        Ok(true)
    }
}

/// The u64 at `at`, taken, if all of its bytes are here.
fn take_u64(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(*at..*at + 8)?.try_into().ok()?;
    *at += 8;
    Some(u64::from_le_bytes(b))
}

/// A VarUInt at the start of `bytes` and its width; `None` if it is cut off.
fn varuint(bytes: &[u8]) -> Result<Option<(u64, usize)>> {
    let mut r = Reader::new(bytes);
    match r.varuint() {
        Ok(v) => Ok(Some((v, r.position()))),
        Err(WalkError::Incomplete) if bytes.len() < MAX_VARUINT_BYTES as usize => Ok(None),
        Err(WalkError::Incomplete) => Err(WalkError::Malformed("a VarUInt longer than 9 bytes")),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::clickhouse::native::block::walk_block;
    use crate::clickhouse::native::test_random;
    use crate::clickhouse::rowbinary::write_varint;

    pub(in crate::clickhouse::native) const HTTP: Framing = Framing {
        block_info: false,
        custom_serialization: false,
        empty_low_cardinality_granule: false,
    };
    pub(in crate::clickhouse::native) const NATIVE: Framing = Framing {
        block_info: true,
        custom_serialization: false,
        empty_low_cardinality_granule: true,
    };

    /// Types the writer below makes blocks of: every layout, nested.
    const TYPES: [&str; 17] = [
        "UInt64",
        "String",
        "FixedString(3)",
        "Nullable(String)",
        "Array(Array(UInt8))",
        "Array(Nullable(String))",
        "Tuple(a String, b Array(UInt16))",
        "Map(String, Array(String))",
        "Nested(k UInt8, v String)",
        "LowCardinality(String)",
        "LowCardinality(Nullable(String))",
        "Array(LowCardinality(UInt32))",
        "Tuple(LowCardinality(String), Nullable(Decimal(20, 2)))",
        "Ring",
        "MultiPolygon",
        "SimpleAggregateFunction(anyLast, String)",
        "Enum8('a,b' = 1, 'c' = 2)",
    ];

    /// Writes the state prefix of a column of type `ty`, as a server does.
    fn write_prefix(ty: &str, out: &mut Vec<u8>) {
        match layout(ty).unwrap() {
            Layout::LowCardinality { .. } => out.extend_from_slice(&1u64.to_le_bytes()),
            Layout::Nullable(t) | Layout::Array(t) | Layout::As(t) | Layout::Geo(t) => {
                write_prefix(t, out)
            }
            Layout::Tuple(list) | Layout::ArrayOfTuples(list) => {
                each_element(list, |t| write_prefix(t, out))
            }
            Layout::Fixed(_) | Layout::String => {}
        }
    }

    fn each_element(list: &str, mut f: impl FnMut(&str)) {
        let mut rest = Some(list);
        while let Some(l) = rest {
            let (first, after) = first_arg(l);
            f(element(first));
            rest = after;
        }
    }

    fn write_offsets(rows: u64, out: &mut Vec<u8>, rnd: &mut impl FnMut() -> u64) -> u64 {
        let mut total = 0;
        for _ in 0..rows {
            total += rnd() % 3;
            out.extend_from_slice(&total.to_le_bytes());
        }
        total
    }

    fn write_strings(count: u64, out: &mut Vec<u8>, rnd: &mut impl FnMut() -> u64) {
        for _ in 0..count {
            // Mostly short, now and then one whose length takes two bytes.
            let len = if rnd() % 8 == 0 {
                128 + rnd() % 300
            } else {
                rnd() % 12
            };
            write_varint(out, len);
            out.extend((0..len).map(|i| i as u8));
        }
    }

    /// Writes `rows` random values of type `ty`, as a server does.
    fn write_data(
        ty: &str,
        rows: u64,
        framing: Framing,
        out: &mut Vec<u8>,
        rnd: &mut impl FnMut() -> u64,
    ) {
        match layout(ty).unwrap() {
            Layout::Fixed(width) => out.extend((0..rows * width).map(|_| rnd() as u8)),
            Layout::String => write_strings(rows, out, rnd),
            Layout::Nullable(t) => {
                out.extend((0..rows).map(|_| (rnd() % 2) as u8));
                write_data(t, rows, framing, out, rnd);
            }
            Layout::Array(t) => {
                let total = write_offsets(rows, out, rnd);
                write_data(t, total, framing, out, rnd);
            }
            Layout::Tuple(list) => each_element(list, |t| write_data(t, rows, framing, out, rnd)),
            Layout::ArrayOfTuples(list) => {
                let total = write_offsets(rows, out, rnd);
                each_element(list, |t| write_data(t, total, framing, out, rnd));
            }
            Layout::LowCardinality { keys } if rows == 0 => {
                if framing.empty_low_cardinality_granule {
                    // One granule of one key and no indexes, as ClickHouse before 19.1.
                    out.extend_from_slice(&0x600u64.to_le_bytes());
                    out.extend_from_slice(&1u64.to_le_bytes());
                    match keys {
                        Some(w) => out.extend((0..w).map(|_| 0u8)),
                        None => write_strings(1, out, rnd),
                    }
                    out.extend_from_slice(&0u64.to_le_bytes());
                }
            }
            Layout::LowCardinality { keys } => {
                let mut left = rows;
                while left > 0 {
                    // UInt8 indexes, additional keys; now and then a global dictionary too.
                    let global = rnd() % 4 == 0;
                    let flags = if global { 0x700 } else { 0x600 };
                    out.extend_from_slice(&(flags as u64).to_le_bytes());
                    for _ in 0..if global { 2 } else { 1 } {
                        let count = 1 + rnd() % 4;
                        out.extend_from_slice(&count.to_le_bytes());
                        match keys {
                            Some(w) => out.extend((0..count * w).map(|_| rnd() as u8)),
                            None => write_strings(count, out, rnd),
                        }
                    }
                    let indexes = 1 + rnd() % left;
                    out.extend_from_slice(&indexes.to_le_bytes());
                    out.extend((0..indexes).map(|_| 0u8));
                    left -= indexes;
                }
            }
            Layout::As(t) | Layout::Geo(t) => write_data(t, rows, framing, out, rnd),
        }
    }

    pub(in crate::clickhouse::native) fn write_string(out: &mut Vec<u8>, s: &str) {
        write_varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    /// A random block in `framing` of up to three columns of [`TYPES`].
    pub(in crate::clickhouse::native) fn random_block(
        framing: Framing,
        rnd: &mut impl FnMut() -> u64,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        if framing.block_info {
            out.extend_from_slice(&[1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]);
        }
        let columns = rnd() % 4;
        let rows = [0, 1, 2, 7, 100][(rnd() % 5) as usize];
        write_varint(&mut out, columns);
        write_varint(&mut out, rows);
        for c in 0..columns {
            let ty = TYPES[(rnd() % TYPES.len() as u64) as usize];
            write_string(&mut out, &format!("c{c}"));
            write_string(&mut out, ty);
            if rows > 0 {
                write_prefix(ty, &mut out);
                write_data(ty, rows, framing, &mut out, rnd);
            }
        }
        out
    }

    /// Walks `bytes` in pieces of `piece()` bytes, each call given what the last did not
    /// take and the next piece: where the block ended, `None` if not in these bytes.
    fn stream_walk(
        bytes: &[u8],
        framing: Framing,
        mut piece: impl FnMut() -> usize,
    ) -> Result<Option<(usize, Option<Shape>)>> {
        let mut walk = BlockStream::new(framing);
        let (mut taken, mut given) = (0, 0);
        loop {
            given = (given + piece().max(1)).min(bytes.len());
            let (n, done) = walk.feed(&bytes[taken..given])?;
            assert!(taken + n <= given);
            taken += n;
            if done {
                let shape = walk.shape().expect("a block that ended has its shape");
                return Ok(Some((taken, shape)));
            }
            assert_eq!(walk.shape(), None);
            if given == bytes.len() {
                return Ok(None);
            }
        }
    }

    /// What the walk of whole blocks says of `bytes`, in the same terms.
    fn whole_walk(bytes: &[u8], framing: Framing) -> Result<Option<(usize, Option<Shape>)>> {
        match walk_block(bytes, framing) {
            Ok(block) => Ok(Some((block.len, block.shape))),
            Err(WalkError::Incomplete) => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[test]
    fn random_blocks_end_where_the_whole_walk_says_whatever_the_cuts() {
        let mut rnd = test_random(0x5eed);
        for round in 0..400 {
            let framing = if round % 2 == 0 { HTTP } else { NATIVE };
            let mut block = random_block(framing, &mut rnd);
            let len = block.len();
            let want = whole_walk(&block, framing);
            assert_eq!(
                want.clone().map(|w| w.map(|(len, _)| len)),
                Ok(Some(len)),
                "round {round}"
            );
            // The next packet's bytes follow: the walk stops before them.
            block.extend_from_slice(&[5, 1, 2, 3]);
            for piece in [1, 2, 3, 9, 64, 100_000] {
                assert_eq!(
                    stream_walk(&block, framing, || piece),
                    want,
                    "round {round}, pieces of {piece}"
                );
            }
            let mut r = test_random(round + 1);
            assert_eq!(stream_walk(&block, framing, || (r() % 40) as usize), want);
            assert_eq!(stream_walk(&block[..len - 1], framing, || 7), Ok(None));
        }
    }

    /// Walks `bytes` as a relay given them in pieces of `piece` bytes, stepping over (as
    /// [`BlockStream::skip`]) each piece that holds only bytes the walk says it would not
    /// read: where the block ended (`None` if not in these bytes), and how many pieces were
    /// stepped over.
    fn skipping_walk(
        bytes: &[u8],
        framing: Framing,
        piece: usize,
    ) -> Result<(Option<usize>, usize)> {
        let mut walk = BlockStream::new(framing);
        let (mut taken, mut given, mut skipped) = (0, 0, 0);
        while given < bytes.len() {
            let before = given;
            given = (given + piece).min(bytes.len());
            // Nothing left over from the last piece, and this one all unread.
            if taken == before && (given - before) as u64 <= walk.skippable() {
                walk.skip((given - before) as u64);
                taken = given;
                skipped += 1;
                continue;
            }
            let (n, done) = walk.feed(&bytes[taken..given])?;
            taken += n;
            if done {
                return Ok((Some(taken), skipped));
            }
        }
        Ok((None, skipped))
    }

    #[test]
    fn stepping_over_what_the_walk_would_not_read_ends_where_the_whole_walk_does() {
        let mut rnd = test_random(0x5c1b);
        let mut skipped = 0;
        for round in 0..400 {
            let framing = if round % 2 == 0 { HTTP } else { NATIVE };
            // Columns of fixed width only (their null maps and elements) every third time.
            let mut block = if round % 3 == 0 {
                fixed_block(framing, &mut rnd)
            } else {
                random_block(framing, &mut rnd)
            };
            let len = block.len();
            block.extend_from_slice(&[5, 1, 2, 3]);
            for piece in [1, 3, 8, 64] {
                let (end, n) = skipping_walk(&block, framing, piece).expect("a walk");
                assert_eq!(end, Some(len), "round {round}, pieces of {piece}");
                skipped += n;
            }
        }
        assert!(skipped > 1000, "{skipped} pieces stepped over");
    }

    #[test]
    fn a_nullable_or_tuple_of_fixed_width_is_stepped_over_whole() {
        for (ty, unread) in [
            ("Nullable(UInt32)", 100 + 400),
            ("Tuple(UInt8, Float64)", 900),
            (
                "Tuple(a Nullable(Int16), b Tuple(UInt8, Nullable(Float32)))",
                300 + 100 + 500,
            ),
            ("Array(UInt8)", 0),
            ("Nullable(String)", 100),
        ] {
            let mut block = vec![1];
            write_varint(&mut block, 100);
            write_string(&mut block, "c");
            write_string(&mut block, ty);
            let mut walk = BlockStream::new(HTTP);
            let (n, done) = walk.feed(&block).unwrap();
            assert_eq!((n, done), (block.len(), false), "{ty}");
            assert_eq!(walk.skippable(), unread, "{ty}");
            if unread > 0 {
                // Stepped over in two parts, the block is done.
                walk.skip(unread / 3);
                walk.skip(unread - unread / 3);
                assert_eq!(walk.skippable(), 0, "{ty}");
                assert_eq!(walk.feed(&[]), Ok((0, ty != "Nullable(String)")), "{ty}");
            }
        }
    }

    /// A block of one to three columns of fixed-width types nested in `Nullable` and
    /// `Tuple`.
    fn fixed_block(framing: Framing, rnd: &mut impl FnMut() -> u64) -> Vec<u8> {
        const FIXED: [&str; 5] = [
            "Nullable(UInt32)",
            "Tuple(UInt8, Float64)",
            "Tuple(a Nullable(Int16), b Tuple(UInt8, Nullable(Float32)))",
            "Nullable(Decimal(20, 2))",
            "Int8",
        ];
        let mut out = Vec::new();
        if framing.block_info {
            out.extend_from_slice(&[1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]);
        }
        let columns = 1 + rnd() % 3;
        let rows = [1, 2, 7, 100][(rnd() % 4) as usize];
        write_varint(&mut out, columns);
        write_varint(&mut out, rows);
        for c in 0..columns {
            let ty = FIXED[(rnd() % FIXED.len() as u64) as usize];
            write_string(&mut out, &format!("c{c}"));
            write_string(&mut out, ty);
            write_prefix(ty, &mut out);
            write_data(ty, rows, framing, &mut out, rnd);
        }
        out
    }

    #[test]
    fn damaged_blocks_get_the_whole_walks_answer() {
        let mut rnd = test_random(0xbad);
        let mut refused = 0;
        for round in 0..3000 {
            let framing = if round % 2 == 0 { HTTP } else { NATIVE };
            let mut block = random_block(framing, &mut rnd);
            for _ in 0..1 + rnd() % 3 {
                let at = (rnd() % block.len() as u64) as usize;
                block[at] = rnd() as u8;
            }
            let want = whole_walk(&block, framing);
            refused += usize::from(want.is_err());
            assert_eq!(stream_walk(&block, framing, || 5), want, "round {round}");
            assert_eq!(
                stream_walk(&block, framing, || block.len()),
                want,
                "round {round}"
            );
        }
        // The damage reaches the checks, not only the lengths.
        assert!(refused > 300, "{refused} of 3000 refused");
    }

    #[test]
    fn a_long_string_passes_through_without_being_held() {
        // One String column, one row of 1 MiB.
        let mut block = vec![1, 1];
        write_string(&mut block, "s");
        write_string(&mut block, "String");
        write_varint(&mut block, 1 << 20);
        let start = block.len();
        block.resize(start + (1 << 20), b'x');
        let mut walk = BlockStream::new(HTTP);
        assert_eq!(walk.feed(&block[..start + 10]), Ok((start + 10, false)));
        assert_eq!(walk.skippable(), (1 << 20) - 10);
        walk.skip(1000);
        assert_eq!(
            walk.feed(&block[start + 1010..]),
            Ok(((1 << 20) - 1010, true))
        );
        assert_eq!(walk.rows(), Some(1));
    }

    #[test]
    fn an_item_cut_off_is_left_for_the_next_call() {
        // A column header cut in the middle is not taken.
        let mut block = vec![1, 2];
        write_string(&mut block, "name");
        write_string(&mut block, "Array(UInt32)");
        let header = block.len();
        block.extend_from_slice(&1u64.to_le_bytes());
        block.extend_from_slice(&3u64.to_le_bytes());
        block.extend_from_slice(&[0; 12]);
        let mut walk = BlockStream::new(HTTP);
        assert_eq!(walk.feed(&block[..header - 1]), Ok((2, false)));
        // An offset cut in the middle, likewise.
        assert_eq!(walk.feed(&block[2..header + 12]), Ok((header + 6, false)));
        assert_eq!(walk.feed(&block[header + 8..]), Ok((20, true)));
    }
}
