//! Blocks of the Native format walked without decoding: where a block ends, how many rows
//! it has.
//!
//! The walk allocates nothing: column types are read from their names
//! (`Array(Nullable(String))`) as it goes, recursively, with a depth limit. Every type of
//! ClickHouse 18.16 is covered, and the later ones whose layout is fixed: `Bool`, `Date32`,
//! `DateTime64`, `Decimal*`, `UUID`, `IPv4`/`IPv6`, `Int128`/`256`, `Map`, named `Tuple`,
//! `Nested` (as `Array(Tuple)`), `Nothing`, `LowCardinality`, geo types,
//! `SimpleAggregateFunction`. `Variant`, `Dynamic`, `JSON`/`Object`, `AggregateFunction` and
//! sparse columns are refused as unsupported: the revision chgate negotiates keeps servers
//! from sending them.
//!
//! Layout, per column: name, type name, [a custom-serialization byte, revision 54454 and
//! later], then, only if the block has rows, the column's state prefix (what
//! `LowCardinality` writes before its data, wherever it is nested) and its data.

use super::reader::{Present, Reader, Result, WalkError};

/// Nesting deeper than this in a type name is refused (it would only come from a peer
/// trying to exhaust the stack).
pub(super) const MAX_DEPTH: u32 = 32;

/// How blocks are framed on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framing {
    /// Blocks start with `BlockInfo` (the native protocol; not the `Native` format over
    /// HTTP).
    pub block_info: bool,
    /// Each column carries a custom-serialization byte (revision 54454 and later).
    pub custom_serialization: bool,
    /// The writer puts one granule (an index type, its keys, no indexes) for a
    /// `LowCardinality` with no rows, as under a block's worth of empty arrays. ClickHouse
    /// before 19.1 did (its issue #3907, fixed by PR #4011; 18.16's own client cannot
    /// read such a block when a column other than a `LowCardinality` follows); later
    /// servers and the drivers write nothing.
    pub empty_low_cardinality_granule: bool,
}

/// A walked block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub columns: u64,
    pub rows: u64,
    /// Its length in bytes.
    pub len: usize,
    /// Its layout, if every column is a fixed number of bytes per row.
    pub shape: Option<Shape>,
}

/// The layout of a block whose columns are all a fixed number of bytes per row
/// (numbers, dates, `FixedString`, `Nullable` and `Tuple`s of them): its length follows
/// from its row count. The blocks of one query's answer share their columns, so a reader
/// that has walked one knows the length of the next from its first bytes (see
/// `server::ServerPackets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub columns: u64,
    /// The columns' names and types (and custom-serialization bytes), in bytes.
    pub headers: u64,
    /// The bytes of one row, all columns.
    pub row_width: u64,
}

impl Shape {
    /// The length of a block of this shape and `rows` rows whose `BlockInfo`, column count
    /// and row count take `prefix` bytes (`None` if it would not fit in memory).
    pub fn len(&self, prefix: usize, rows: u64) -> Option<u64> {
        rows.checked_mul(self.row_width)?
            .checked_add(self.headers)?
            .checked_add(prefix as u64)
    }
}

/// The start of a block: what comes before its first column (`BlockInfo`, the column
/// count, the row count). Its columns, its rows, and its length in bytes.
pub fn block_prefix(buf: &[u8], framing: Framing) -> Result<(u64, u64, usize)> {
    let mut r = Reader::new(buf);
    if framing.block_info {
        block_info(&mut r)?;
    }
    let columns = r.varuint()?;
    let rows = r.varuint()?;
    Ok((columns, rows, r.position()))
}

/// Walks the block at the start of `buf`.
pub fn walk_block(buf: &[u8], framing: Framing) -> Result<Block> {
    walk(Reader::new(buf), framing)
}

/// Walks a block of `len` bytes of which only the runs `present` are at hand, in `buf`
/// (decompressed frames; see [`Reader::sparse`]): fixed-width data elsewhere is stepped
/// over unread, and a byte that must be read there ends the walk with
/// [`super::WalkError::Absent`].
pub fn walk_block_sparse(
    buf: &[u8],
    len: usize,
    present: &[Present],
    framing: Framing,
) -> Result<Block> {
    walk(Reader::sparse(buf, len, present), framing)
}

fn walk(mut r: Reader<'_>, framing: Framing) -> Result<Block> {
    if framing.block_info {
        block_info(&mut r)?;
    }
    let columns = r.varuint()?;
    let rows = r.varuint()?;
    let mut shape = Some(Shape {
        columns,
        headers: 0,
        row_width: 0,
    });
    for _ in 0..columns {
        let start = r.position();
        let ty = column_header(&mut r, framing)?;
        if let Some(s) = shape.as_mut() {
            match row_width(ty, 0) {
                Some(w) => {
                    s.headers += (r.position() - start) as u64;
                    s.row_width = s.row_width.saturating_add(w);
                }
                None => shape = None,
            }
        }
        // Zero rows of data are zero bytes: no state prefix either.
        if rows > 0 {
            prefix(ty, &mut r, 0)?;
            let mut w = Walk {
                r: &mut r,
                empty_low_cardinality_granule: framing.empty_low_cardinality_granule,
            };
            w.data(ty, rows, 0)?;
        }
    }
    Ok(Block {
        columns,
        rows,
        len: r.position(),
        shape,
    })
}

/// A column's name, type name and (revision 54454 and later) custom-serialization byte:
/// its type name, checked to be one this walk splits as the server does.
pub(super) fn column_header<'a>(r: &mut Reader<'a>, framing: Framing) -> Result<&'a str> {
    r.string()?;
    let ty = std::str::from_utf8(r.string()?)
        .map_err(|_| WalkError::Malformed("a column type name that is not UTF-8"))?;
    if !plain_quoted_names(ty) {
        return Err(WalkError::Unsupported(
            "a type name with a quoted element name that holds separators",
        ));
    }
    if framing.custom_serialization && r.u8()? != 0 {
        return Err(WalkError::Unsupported(
            "sparse or other custom serialization",
        ));
    }
    Ok(ty)
}

/// The bytes per row of a column of type `ty`, if that is fixed: its data is then exactly
/// rows times that, with no state prefix (`Nullable` adds its null map's byte; a `Tuple`'s
/// elements follow each other).
pub(super) fn row_width(ty: &str, depth: u32) -> Option<u64> {
    if depth > MAX_DEPTH {
        return None;
    }
    let (name, inner) = split(ty).ok()?;
    if let Some(width) = fixed_width(name, inner).ok()? {
        return Some(width);
    }
    match name {
        "Nullable" => row_width(inner?, depth + 1)?.checked_add(1),
        "Tuple" => args(inner?).try_fold(0u64, |sum, a| {
            sum.checked_add(row_width(element(a), depth + 1)?)
        }),
        _ => None,
    }
}

/// Whether every quoted identifier in a type name (a named tuple's element the server
/// quoted, `` `key` ``) holds only characters this walk's splitting never looks at. One
/// holding a space, a comma, a parenthesis, a quote or an escape is split by the server's
/// parser, not by [`args`] and [`element`]: a different split is a different layout, so
/// it is refused rather than guessed at. Single-quoted strings (an `Enum`'s names, a time
/// zone) are stepped over as [`args`] does.
fn plain_quoted_names(ty: &str) -> bool {
    let mut chars = ty.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\\') => {
                        chars.next();
                    }
                    Some('\'') => break,
                    Some(_) => {}
                    None => return true,
                }
            },
            '`' | '"' => {
                let mut empty = true;
                loop {
                    match chars.next() {
                        Some(end) if end == c => break,
                        Some(inner)
                            if inner.is_whitespace()
                                || matches!(inner, ',' | '(' | ')' | '\'' | '"' | '`' | '\\') =>
                        {
                            return false
                        }
                        Some(_) => empty = false,
                        None => return false,
                    }
                }
                if empty {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// `BlockInfo`: numbered fields, 0 ends it.
fn block_info(r: &mut Reader<'_>) -> Result<()> {
    loop {
        match r.varuint()? {
            0 => return Ok(()),
            1 => r.skip(1)?,
            2 => r.skip(4)?,
            _ => return Err(WalkError::Malformed("an unknown BlockInfo field")),
        }
    }
}

/// A type name split into its name and what is inside its outer parentheses.
fn split(ty: &str) -> Result<(&str, Option<&str>)> {
    let ty = ty.trim();
    match ty.find('(') {
        None => Ok((ty, None)),
        Some(open) => {
            if !ty.ends_with(')') {
                return Err(WalkError::Malformed(
                    "a type name with unbalanced parentheses",
                ));
            }
            Ok((ty[..open].trim(), Some(&ty[open + 1..ty.len() - 1])))
        }
    }
}

/// The top-level, comma-separated arguments of a type (quotes and nesting respected).
fn args(inner: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(inner);
    std::iter::from_fn(move || {
        let (first, after) = first_arg(rest?);
        rest = after;
        Some(first)
    })
}

/// The first of a type's comma-separated arguments, and the rest after its comma, if any.
pub(super) fn first_arg(list: &str) -> (&str, Option<&str>) {
    let mut depth = 0i32;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in list.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '\'' => quoted = true,
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => return (list[..i].trim(), Some(&list[i + 1..])),
            _ => {}
        }
    }
    (list.trim(), None)
}

/// A tuple element's type: `name Type` in a named tuple, else the whole argument.
pub(super) fn element(arg: &str) -> &str {
    let mut depth = 0i32;
    for (i, c) in arg.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ' ' if depth == 0 => return arg[i + 1..].trim(),
            _ => {}
        }
    }
    arg
}

/// The width of a fixed-width type, if `name(args)` is one.
fn fixed_width(name: &str, inner: Option<&str>) -> Result<Option<u64>> {
    Ok(Some(match name {
        "UInt8" | "Int8" | "Bool" | "Enum8" | "Nothing" => 1,
        "UInt16" | "Int16" | "Date" | "Enum16" => 2,
        "UInt32" | "Int32" | "Float32" | "DateTime" | "Date32" | "IPv4" | "Decimal32" => 4,
        "UInt64" | "Int64" | "Float64" | "DateTime64" | "Decimal64" => 8,
        "UInt128" | "Int128" | "UUID" | "IPv6" | "Decimal128" => 16,
        "UInt256" | "Int256" | "Decimal256" => 32,
        n if n.starts_with("Interval") => 8,
        "Decimal" => {
            let precision = inner
                .and_then(|a| args(a).next())
                .and_then(number)
                .ok_or(WalkError::Malformed("Decimal without a precision"))?;
            match precision {
                0..=9 => 4,
                10..=18 => 8,
                19..=38 => 16,
                _ => 32,
            }
        }
        "FixedString" => inner
            .and_then(number)
            .ok_or(WalkError::Malformed("FixedString without a length"))?,
        _ => return Ok(None),
    }))
}

/// A type argument that is a number written as the server writes one: decimal digits, no
/// sign, no leading zero (18.16 reads `010` as octal 8, so a lenient parse would walk a
/// column of another width than the node's).
fn number(arg: &str) -> Option<u64> {
    let arg = arg.trim();
    let canonical = !arg.is_empty()
        && arg.bytes().all(|b| b.is_ascii_digit())
        && (arg == "0" || !arg.starts_with('0'));
    canonical.then(|| arg.parse().ok()).flatten()
}

/// The one argument of `name(T)`.
fn only_arg(inner: Option<&str>) -> Result<&str> {
    inner.ok_or(WalkError::Malformed(
        "a type that needs an argument has none",
    ))
}

/// How a column type's data is laid out, as both walks of a block step over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout<'t> {
    /// So many bytes per value.
    Fixed(u64),
    /// Length-prefixed values.
    String,
    /// A byte per value (the null map), then the values.
    Nullable(&'t str),
    /// Offsets (a u64 per value, the last one the number of elements), then the elements.
    Array(&'t str),
    /// Each element type's values in turn (the comma-separated list inside `Tuple(...)`).
    Tuple(&'t str),
    /// Offsets, then a tuple of the listed types (`Map`, `Nested`).
    ArrayOfTuples(&'t str),
    /// Granules of dictionary keys and indexes; the keys are strings (`None`) or values so
    /// many bytes wide. A state prefix (the key version) comes before the data.
    LowCardinality { keys: Option<u64> },
    /// Laid out as a type named inside this one's name (a `SimpleAggregateFunction`'s).
    As(&'t str),
    /// Laid out as another type (the geo types).
    Geo(&'static str),
}

/// The layout of `ty`; a type chgate cannot walk is refused here.
pub(super) fn layout(ty: &str) -> Result<Layout<'_>> {
    let (name, inner) = split(ty)?;
    if let Some(width) = fixed_width(name, inner)? {
        return Ok(Layout::Fixed(width));
    }
    Ok(match name {
        "String" => Layout::String,
        "Nullable" => Layout::Nullable(only_arg(inner)?),
        "Array" => Layout::Array(only_arg(inner)?),
        "Tuple" => Layout::Tuple(only_arg(inner)?),
        // Map(K, V) and Nested(a A, b B) are arrays of tuples.
        "Map" | "Nested" => Layout::ArrayOfTuples(only_arg(inner)?),
        "LowCardinality" => Layout::LowCardinality {
            keys: dictionary_keys(only_arg(inner)?)?,
        },
        "SimpleAggregateFunction" => Layout::As(simple_aggregate_type(inner)?),
        "Point" => Layout::Geo("Tuple(Float64, Float64)"),
        "Ring" | "LineString" => Layout::Geo("Array(Point)"),
        "Polygon" | "MultiLineString" => Layout::Geo("Array(Ring)"),
        "MultiPolygon" => Layout::Geo("Array(Polygon)"),
        "AggregateFunction" => return Err(WalkError::Unsupported("AggregateFunction states")),
        "Variant" | "Dynamic" | "JSON" | "Object" => {
            return Err(WalkError::Unsupported("Variant, Dynamic and JSON columns"))
        }
        _ => return Err(WalkError::Unsupported("a type chgate does not know")),
    })
}

/// The keys of a `LowCardinality(inner)` dictionary: strings (`None`) or values so many
/// bytes wide. The dictionary holds `inner` without `Nullable`; ClickHouse takes only
/// strings, numbers, dates and the like into a `LowCardinality`.
fn dictionary_keys(inner: &str) -> Result<Option<u64>> {
    let dictionary = match split(inner)? {
        ("Nullable", Some(t)) => t,
        _ => inner,
    };
    match split(dictionary)? {
        ("String", None) => Ok(None),
        (name, args) => Ok(Some(fixed_width(name, args)?.ok_or(
            WalkError::Unsupported("a LowCardinality of a type ClickHouse does not allow in one"),
        )?)),
    }
}

/// Walks a column's state prefix: only `LowCardinality` has one (its key serialization
/// version), wherever it is nested.
fn prefix(ty: &str, r: &mut Reader<'_>, depth: u32) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(WalkError::Malformed("a type nested too deeply"));
    }
    match layout(ty)? {
        Layout::LowCardinality { .. } => key_version(r.u64_le()?),
        Layout::Nullable(inner) | Layout::Array(inner) | Layout::As(inner) => {
            prefix(inner, r, depth + 1)
        }
        Layout::Tuple(list) | Layout::ArrayOfTuples(list) => {
            for a in args(list) {
                prefix(element(a), r, depth + 1)?;
            }
            Ok(())
        }
        Layout::Geo(other) => prefix(other, r, depth + 1),
        Layout::Fixed(_) | Layout::String => Ok(()),
    }
}

/// A `LowCardinality` column's state prefix: the key serialization version.
pub(super) fn key_version(version: u64) -> Result<()> {
    if version != 1 {
        return Err(WalkError::Unsupported(
            "a LowCardinality key version other than 1",
        ));
    }
    Ok(())
}

fn simple_aggregate_type(inner: Option<&str>) -> Result<&str> {
    args(only_arg(inner)?).nth(1).ok_or(WalkError::Malformed(
        "SimpleAggregateFunction without a type",
    ))
}

/// A block's data being walked: the reader, and what the writer is known to do.
struct Walk<'r, 'b> {
    r: &'r mut Reader<'b>,
    empty_low_cardinality_granule: bool,
}

impl Walk<'_, '_> {
    /// Walks `rows` values of a column of type `ty`.
    fn data(&mut self, ty: &str, rows: u64, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(WalkError::Malformed("a type nested too deeply"));
        }
        match layout(ty)? {
            Layout::Fixed(width) => self.r.skip(column_bytes(rows, width)?),
            Layout::String => self.values(None, rows),
            Layout::Nullable(inner) => {
                self.r.skip(rows)?;
                self.data(inner, rows, depth + 1)
            }
            Layout::Array(inner) => {
                let total = offsets(rows, self.r)?;
                self.data(inner, total, depth + 1)
            }
            Layout::Tuple(list) => self.elements(list, rows, depth),
            Layout::ArrayOfTuples(list) => {
                let total = offsets(rows, self.r)?;
                self.elements(list, total, depth)
            }
            Layout::LowCardinality { keys } => self.low_cardinality(keys, rows),
            Layout::As(other) => self.data(other, rows, depth + 1),
            Layout::Geo(other) => self.data(other, rows, depth + 1),
        }
    }

    /// `rows` values of each type of a tuple's `list`, in turn.
    fn elements(&mut self, list: &str, rows: u64, depth: u32) -> Result<()> {
        for a in args(list) {
            self.data(element(a), rows, depth + 1)?;
        }
        Ok(())
    }

    /// `LowCardinality` data: granules of [index type][dictionary keys][indexes] until
    /// the rows are covered (for no rows, one granule without indexes if the writer puts
    /// one, see [`Framing`]).
    fn low_cardinality(&mut self, keys: Option<u64>, rows: u64) -> Result<()> {
        if rows == 0 {
            if self.empty_low_cardinality_granule {
                let (_, indexes) = self.granule(keys)?;
                granule_indexes(indexes, 0)?;
            }
            return Ok(());
        }
        let mut left = rows;
        while left > 0 {
            let (key_width, indexes) = self.granule(keys)?;
            granule_indexes(indexes, left)?;
            self.r.skip(column_bytes(indexes, key_width)?)?;
            left -= indexes;
        }
        Ok(())
    }

    /// A `LowCardinality` granule up to its indexes: their width and count. Its keys are
    /// strings (`None`), or values `keys` bytes wide.
    fn granule(&mut self, keys: Option<u64>) -> Result<(u64, u64)> {
        let index = IndexType::read(self.r.u64_le()?)?;
        if index.global_keys {
            let count = self.r.u64_le()?;
            self.values(keys, count)?;
        }
        if index.additional_keys {
            let count = self.r.u64_le()?;
            self.values(keys, count)?;
        }
        let indexes = self.r.u64_le()?;
        Ok((index.key_width, indexes))
    }

    /// `count` strings (`width` None), or values `width` bytes wide.
    fn values(&mut self, width: Option<u64>, count: u64) -> Result<()> {
        match width {
            Some(width) => self.r.skip(column_bytes(count, width)?),
            None => self.r.skip_strings(count),
        }
    }
}

/// The bytes of `count` values `width` bytes wide.
pub(super) fn column_bytes(count: u64, width: u64) -> Result<u64> {
    count
        .checked_mul(width)
        .ok_or(WalkError::Malformed("a column larger than memory"))
}

/// A `LowCardinality` granule's index type: the width of its indexes, and which
/// dictionary keys come before them (each as a u64 count, then the keys).
#[derive(Debug, Clone, Copy)]
pub(super) struct IndexType {
    pub key_width: u64,
    /// The shared dictionary's keys (needed and updated).
    pub global_keys: bool,
    pub additional_keys: bool,
}

impl IndexType {
    pub(super) fn read(index_type: u64) -> Result<Self> {
        const NEED_GLOBAL_DICTIONARY: u64 = 1 << 8;
        const HAS_ADDITIONAL_KEYS: u64 = 1 << 9;
        const NEED_UPDATE_DICTIONARY: u64 = 1 << 10;
        let key_width = match index_type & 0xff {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 8,
            _ => {
                return Err(WalkError::Malformed(
                    "a LowCardinality index of an unknown width",
                ))
            }
        };
        Ok(Self {
            key_width,
            global_keys: index_type & NEED_GLOBAL_DICTIONARY != 0
                && index_type & NEED_UPDATE_DICTIONARY != 0,
            additional_keys: index_type & HAS_ADDITIONAL_KEYS != 0,
        })
    }
}

/// Checks a granule's index count against the `left` rows it is to cover (none: the
/// granule a writer puts for no rows).
pub(super) fn granule_indexes(indexes: u64, left: u64) -> Result<()> {
    if left == 0 && indexes != 0 {
        return Err(WalkError::Malformed("LowCardinality indexes for no rows"));
    }
    if left > 0 && (indexes == 0 || indexes > left) {
        return Err(WalkError::Malformed(
            "LowCardinality indexes that do not cover the rows",
        ));
    }
    Ok(())
}

/// An array column's offsets: one cumulative u64 per row; the last is how many values the
/// nested column has.
fn offsets(rows: u64, r: &mut Reader<'_>) -> Result<u64> {
    let mut last = 0;
    for _ in 0..rows {
        let offset = r.u64_le()?;
        if offset < last {
            return Err(WalkError::Malformed("array offsets that go down"));
        }
        last = offset;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: Framing = Framing {
        block_info: false,
        custom_serialization: false,
        empty_low_cardinality_granule: false,
    };

    fn string(out: &mut Vec<u8>, s: &str) {
        crate::clickhouse::rowbinary::write_varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    fn column(out: &mut Vec<u8>, name: &str, ty: &str) {
        string(out, name);
        string(out, ty);
    }

    /// Every shorter prefix of a block is Incomplete, never an error or a panic.
    fn every_prefix_is_incomplete(block: &[u8], framing: Framing) {
        for end in 0..block.len() {
            assert_eq!(
                walk_block(&block[..end], framing),
                Err(WalkError::Incomplete),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn fixed_strings_nullable_and_nested_arrays() {
        // As 18.16 sends `SELECT toUInt8(1) AS a, 'xy' AS s FORMAT Native`.
        let block = b"\x02\x01\x01a\x05UInt8\x01\x01s\x06String\x02xy";
        let walked = walk_block(block, HTTP).unwrap();
        assert_eq!(
            (walked.columns, walked.rows, walked.len),
            (2, 1, block.len())
        );
        every_prefix_is_incomplete(block, HTTP);
        // `[[1,2],[3]] AS a`: outer offsets, inner offsets, values.
        let mut b = vec![1, 1];
        column(&mut b, "a", "Array(Array(UInt8))");
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(walk_block(&b, HTTP).unwrap().len, b.len());
        every_prefix_is_incomplete(&b, HTTP);
        // Nullable(String) NULL: null map, then the (empty) value.
        let block = b"\x01\x01\x01n\x10Nullable(String)\x01\x00";
        assert_eq!(walk_block(block, HTTP).unwrap().len, block.len());
    }

    #[test]
    fn low_cardinality_as_the_server_writes_it() {
        // `SELECT toLowCardinality('ab') AS l FORMAT Native` from 18.16.
        let mut b = vec![1, 1];
        column(&mut b, "l", "LowCardinality(String)");
        b.extend_from_slice(&1u64.to_le_bytes()); // key version
        b.extend_from_slice(&0x600u64.to_le_bytes()); // additional keys, update, UInt8 keys
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(b"\x00\x02ab");
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(1);
        assert_eq!(walk_block(&b, HTTP).unwrap().len, b.len());
        every_prefix_is_incomplete(&b, HTTP);
        // Inside an array, the prefix comes before the offsets.
        let mut a = vec![1, 1];
        column(&mut a, "l", "Array(LowCardinality(Nullable(String)))");
        a.extend_from_slice(&1u64.to_le_bytes());
        a.extend_from_slice(&2u64.to_le_bytes()); // offsets: 2 values
        a.extend_from_slice(&0x600u64.to_le_bytes());
        a.extend_from_slice(&2u64.to_le_bytes());
        a.extend_from_slice(b"\x00\x01z");
        a.extend_from_slice(&2u64.to_le_bytes());
        a.extend_from_slice(&[0, 1]);
        assert_eq!(walk_block(&a, HTTP).unwrap().len, a.len());
    }

    /// `SELECT CAST([] AS Array(LowCardinality(UInt8))) AS a FORMAT Native`: 18.16 writes a
    /// granule for the no rows of the LowCardinality (a key, no indexes); 19.1 and later
    /// write nothing.
    #[test]
    fn a_low_cardinality_without_rows_as_each_server_writes_it() {
        let mut modern = vec![1, 1]; // 1 column, 1 row
        column(&mut modern, "a", "Array(LowCardinality(UInt8))");
        modern.extend_from_slice(&1u64.to_le_bytes()); // key version
        modern.extend_from_slice(&0u64.to_le_bytes()); // one empty array
        let mut old = modern.clone();
        old.extend_from_slice(&0x600u64.to_le_bytes()); // UInt8 indexes, keys follow
        old.extend_from_slice(&1u64.to_le_bytes());
        old.push(0);
        old.extend_from_slice(&0u64.to_le_bytes()); // no indexes
        let old_framing = Framing {
            empty_low_cardinality_granule: true,
            ..HTTP
        };
        assert_eq!(walk_block(&old, old_framing).unwrap().len, old.len());
        every_prefix_is_incomplete(&old, old_framing);
        assert_eq!(walk_block(&modern, HTTP).unwrap().len, modern.len());
        // Read the other way, each is a different block: never the length of the other.
        assert_eq!(walk_block(&old, HTTP).unwrap().len, modern.len());
        assert_eq!(walk_block(&modern, old_framing), Err(WalkError::Incomplete));
        // A granule for no rows that has indexes is not one.
        let mut wrong = old.clone();
        let at = wrong.len() - 8;
        wrong[at] = 1;
        wrong.push(0);
        assert!(matches!(
            walk_block(&wrong, old_framing),
            Err(WalkError::Malformed(_))
        ));
    }

    #[test]
    fn tuples_maps_decimals_and_the_protocol_framing() {
        let framing = Framing {
            block_info: true,
            custom_serialization: true,
            empty_low_cardinality_granule: false,
        };
        let mut b = vec![1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]; // BlockInfo
        b.extend_from_slice(&[3, 2]); // 3 columns, 2 rows
        column(
            &mut b,
            "t",
            "Tuple(a UInt16, `b` DateTime64(3, 'Europe/Paris'))",
        );
        b.push(0);
        b.extend_from_slice(&[0; 2 * 2 + 2 * 8]);
        column(&mut b, "m", "Map(String, Decimal(20, 4))");
        b.push(0);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(b"\x01k");
        b.extend_from_slice(&[0; 16]);
        column(&mut b, "e", "Enum8('a, b' = 1, 'c\\'' = 2)");
        b.push(0);
        b.extend_from_slice(&[1, 2]);
        let walked = walk_block(&b, framing).unwrap();
        assert_eq!((walked.columns, walked.rows, walked.len), (3, 2, b.len()));
        every_prefix_is_incomplete(&b, framing);
        // A sparse column is refused, not misread.
        let mut s = vec![0, 1, 1];
        column(&mut s, "x", "UInt8");
        s.push(1);
        assert!(matches!(
            walk_block(&s, framing),
            Err(WalkError::Unsupported(_))
        ));
    }

    #[test]
    fn zero_rows_carry_no_data_and_garbage_is_refused() {
        let mut b = vec![1, 0];
        column(&mut b, "l", "LowCardinality(String)");
        assert_eq!(walk_block(&b, HTTP).unwrap().len, b.len());
        for bad in [
            "Array(UInt8",
            "AggregateFunction(uniq, UInt64)",
            "Whatever",
            "FixedString(x)",
        ] {
            let mut g = vec![1, 1];
            column(&mut g, "g", bad);
            g.extend_from_slice(&[0; 64]);
            assert!(
                !matches!(walk_block(&g, HTTP), Ok(_) | Err(WalkError::Incomplete)),
                "{bad}"
            );
        }
        let deep = "Array(".repeat(40) + "UInt8" + &")".repeat(40);
        let mut g = vec![1, 1];
        column(&mut g, "d", &deep);
        g.extend_from_slice(&[0; 512]);
        assert_eq!(
            walk_block(&g, HTTP),
            Err(WalkError::Malformed("a type nested too deeply"))
        );
        // Offsets that go down, and a VarUInt that never ends.
        let mut o = vec![1, 2];
        column(&mut o, "a", "Array(UInt8)");
        o.extend_from_slice(&5u64.to_le_bytes());
        o.extend_from_slice(&1u64.to_le_bytes());
        assert!(matches!(walk_block(&o, HTTP), Err(WalkError::Malformed(_))));
        assert!(matches!(
            walk_block(&[0xff; 11], HTTP),
            Err(WalkError::Malformed(_))
        ));
    }

    #[test]
    fn strings_of_every_length_class() {
        // Lengths of one VarUInt byte and of two and three, mixed: the quick loop and the
        // long way hand over to each other.
        let values: Vec<Vec<u8>> = [0usize, 1, 127, 128, 200, 5, 16_384, 3]
            .iter()
            .map(|&n| vec![b'x'; n])
            .collect();
        let mut b = vec![1, values.len() as u8];
        column(&mut b, "s", "String");
        for v in &values {
            string(&mut b, std::str::from_utf8(v).unwrap());
        }
        let walked = walk_block(&b, HTTP).unwrap();
        assert_eq!((walked.rows, walked.len), (values.len() as u64, b.len()));
        every_prefix_is_incomplete(&b, HTTP);
        // A row count far beyond the bytes: incomplete, found at the first missing byte.
        let mut huge = vec![1];
        crate::clickhouse::rowbinary::write_varint(&mut huge, 1 << 62);
        column(&mut huge, "s", "String");
        huge.extend_from_slice(b"\x01a\x01b");
        assert_eq!(walk_block(&huge, HTTP), Err(WalkError::Incomplete));
    }

    #[test]
    fn type_names_the_node_could_read_otherwise_are_refused() {
        for ty in ["FixedString(010)", "Decimal(010, 2)", "FixedString(+4)"] {
            let mut b = vec![1, 1];
            column(&mut b, "c", ty);
            b.extend_from_slice(&[0; 16]);
            assert!(
                matches!(walk_block(&b, HTTP), Err(WalkError::Malformed(_))),
                "{ty}"
            );
        }
        let mut b = vec![1, 1];
        column(&mut b, "t", "Tuple(`a UInt8,b` UInt64)");
        b.extend_from_slice(&[0; 9]);
        assert!(matches!(
            walk_block(&b, HTTP),
            Err(WalkError::Unsupported(_))
        ));
        let mut b = vec![1, 1];
        column(&mut b, "t", "Tuple(\"a\\\" x\" UInt8)");
        b.extend_from_slice(&[0; 1]);
        assert!(matches!(
            walk_block(&b, HTTP),
            Err(WalkError::Unsupported(_))
        ));
        // A plain quoted name, as servers write a keyword, is fine.
        let mut b = vec![1, 1];
        column(&mut b, "t", "Tuple(`key` UInt8, v Enum8('a`b' = 1))");
        b.extend_from_slice(&[0; 2]);
        assert_eq!(walk_block(&b, HTTP).unwrap().len, b.len());
        let mut b = vec![1, 1];
        column(&mut b, "f", "FixedString(10)");
        b.extend_from_slice(&[0; 10]);
        assert_eq!(walk_block(&b, HTTP).unwrap().len, b.len());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut next = crate::clickhouse::native::test_random(0x9e37_79b9_7f4a_7c15);
        let types = [
            "UInt8",
            "String",
            "Array(Nullable(String))",
            "LowCardinality(String)",
            "Map(String, Array(UInt64))",
        ];
        for i in 0..20_000 {
            let mut b = vec![1, (next() % 4) as u8];
            column(&mut b, "c", types[i % types.len()]);
            let n = (next() % 64) as usize;
            b.extend((0..n).map(|_| next() as u8));
            let _ = walk_block(&b, HTTP);
        }
    }
}
