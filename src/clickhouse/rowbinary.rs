//! Values from a message to ClickHouse's RowBinary, converted to the target column's type.
//!
//! RowBinary: little-endian numbers, strings as a LEB128 length then bytes, `Date` as days
//! (UInt16), `DateTime` as seconds (UInt32), `DateTime64(p)` as Int64 ticks, `Decimal(P, S)`
//! as the integer `value * 10^S` in 4, 8, 16 or 32 bytes, `UUID` as its two 64-bit halves
//! each little-endian, `Nullable` as a 0/1 byte then the value, `Array` as a LEB128 count
//! then the elements, `LowCardinality(T)` as T.
//!
//! ClickHouse 18.16 (the stack's) has no `DateTime64`, `Bool` or `Date32`; the encoders for
//! the first two are for newer servers (a table of 18.16 cannot have those columns).

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde_json::Value;

use super::types::ColumnType;

/// One field's value as found in a message.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Json(&'a Value),
    Text(&'a str),
    Missing,
}

/// How a date/time may be written in messages, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// Seconds since the epoch (a number or a numeric string; fractions kept for DateTime64).
    Unix,
    /// Milliseconds since the epoch.
    UnixMs,
    /// Microseconds since the epoch (Debezium's `timestamp` without a zone).
    UnixUs,
    /// Days since the epoch (Debezium's `date`).
    UnixDays,
    /// RFC 3339 / ISO 8601 with an offset: `2026-01-02T03:04:05Z`.
    Rfc3339,
    /// A chrono `strftime` pattern without a zone, read as UTC: `%Y-%m-%d %H:%M:%S`.
    Pattern(String),
}

impl TimeFormat {
    pub fn parse(s: &str) -> Self {
        match s {
            "unix" => Self::Unix,
            "unix_ms" => Self::UnixMs,
            "unix_us" => Self::UnixUs,
            "unix_days" => Self::UnixDays,
            "rfc3339" | "iso8601" => Self::Rfc3339,
            other => Self::Pattern(other.to_string()),
        }
    }

    pub fn defaults() -> Vec<TimeFormat> {
        vec![
            Self::Unix,
            Self::Pattern("%Y-%m-%d %H:%M:%S".into()),
            Self::Rfc3339,
        ]
    }
}

pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    write_varint(out, s.len() as u64);
    out.extend_from_slice(s);
}

fn describe(v: Field<'_>) -> String {
    let s = match v {
        Field::Json(j) => j.to_string(),
        Field::Text(t) => format!("{t:?}"),
        Field::Missing => "nothing".into(),
    };
    if s.len() > 64 {
        format!("{}...", truncate(&s, 64))
    } else {
        s
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for errors that quote a value).
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn bad(v: Field<'_>, ty: &ColumnType) -> String {
    format!("{} is not a valid {ty}", describe(v))
}

/// An integer from a JSON number (integral), a numeric string, or a boolean.
fn integer(v: Field<'_>) -> Option<i128> {
    match v {
        Field::Json(Value::Number(n)) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1.8e19)
                    .map(|f| f as i128)
            }),
        Field::Json(Value::Bool(b)) => Some(*b as i128),
        Field::Json(Value::String(s)) => s.trim().parse().ok(),
        Field::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

fn float(v: Field<'_>) -> Option<f64> {
    match v {
        Field::Json(Value::Number(n)) => n.as_f64(),
        Field::Json(Value::String(s)) => s.trim().parse().ok(),
        Field::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

/// Seconds and nanoseconds since the epoch, by the first format that reads the value.
pub fn timestamp(v: Field<'_>, formats: &[TimeFormat]) -> Option<(i64, u32)> {
    let text: Option<&str> = match v {
        Field::Json(Value::String(s)) => Some(s.as_str()),
        Field::Text(t) => Some(t.trim()),
        _ => None,
    };
    for f in formats {
        let got = match f {
            TimeFormat::Unix | TimeFormat::UnixMs | TimeFormat::UnixUs | TimeFormat::UnixDays => {
                match (v, text) {
                    (Field::Json(Value::Number(n)), _) => match n.as_i64() {
                        Some(i) => from_units(i, f),
                        None => n.as_f64().and_then(|x| from_fraction(x, f)),
                    },
                    (_, Some(t)) => match t.parse::<i64>() {
                        Ok(i) => from_units(i, f),
                        Err(_) => t.parse::<f64>().ok().and_then(|x| from_fraction(x, f)),
                    },
                    _ => None,
                }
            }
            TimeFormat::Rfc3339 => text
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|d| (d.timestamp(), d.timestamp_subsec_nanos())),
            TimeFormat::Pattern(p) => text.and_then(|t| {
                NaiveDateTime::parse_from_str(t, p)
                    .or_else(|_| {
                        NaiveDate::parse_from_str(t, p)
                            .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default())
                    })
                    .ok()
                    .map(|d| {
                        let u = d.and_utc();
                        (u.timestamp(), u.timestamp_subsec_nanos())
                    })
            }),
        };
        if got.is_some() {
            return got;
        }
    }
    None
}

/// Seconds per unit of a numeric time format.
fn unit_seconds(f: &TimeFormat) -> f64 {
    match f {
        TimeFormat::UnixMs => 1e-3,
        TimeFormat::UnixUs => 1e-6,
        TimeFormat::UnixDays => 86_400.0,
        _ => 1.0,
    }
}

/// A whole number of `f`'s units, exactly.
fn from_units(i: i64, f: &TimeFormat) -> Option<(i64, u32)> {
    let split = |per_second: i64| {
        let nanos = i.rem_euclid(per_second) * (1_000_000_000 / per_second);
        (i.div_euclid(per_second), nanos as u32)
    };
    match f {
        TimeFormat::UnixMs => Some(split(1_000)),
        TimeFormat::UnixUs => Some(split(1_000_000)),
        TimeFormat::UnixDays => i.checked_mul(86_400).map(|s| (s, 0)),
        _ => Some((i, 0)),
    }
}

fn from_fraction(x: f64, f: &TimeFormat) -> Option<(i64, u32)> {
    let secs = x * unit_seconds(f);
    (secs.is_finite() && secs.abs() < 9.2e18).then(|| seconds_and_nanos(secs))
}

fn seconds_and_nanos(x: f64) -> (i64, u32) {
    let secs = x.floor();
    (
        secs as i64,
        ((x - secs) * 1e9).round().min(999_999_999.0) as u32,
    )
}

/// The zero value of a type, for a missing field without a default (ClickHouse's own
/// default for a column that is not given).
pub fn encode_zero(out: &mut Vec<u8>, ty: &ColumnType) {
    match ty {
        ColumnType::UInt8 | ColumnType::Int8 | ColumnType::Bool => out.push(0),
        ColumnType::UInt16 | ColumnType::Int16 | ColumnType::Date => out.extend_from_slice(&[0; 2]),
        ColumnType::UInt32 | ColumnType::Int32 | ColumnType::Float32 | ColumnType::DateTime => {
            out.extend_from_slice(&[0; 4])
        }
        ColumnType::UInt64
        | ColumnType::Int64
        | ColumnType::Float64
        | ColumnType::DateTime64(_) => out.extend_from_slice(&[0; 8]),
        ColumnType::String | ColumnType::Array(_) => out.push(0),
        ColumnType::FixedString(n) => out.resize(out.len() + n, 0),
        ColumnType::Decimal { precision, .. } => {
            out.resize(out.len() + ColumnType::decimal_bytes(*precision), 0)
        }
        ColumnType::Uuid => out.extend_from_slice(&[0; 16]),
        ColumnType::Nullable(_) => out.push(1),
        ColumnType::LowCardinality(t) => encode_zero(out, t),
    }
}

/// Appends `v` as `ty`. On error the output may hold a partial value: callers truncate to
/// the row's start.
pub fn encode(
    out: &mut Vec<u8>,
    ty: &ColumnType,
    v: Field<'_>,
    formats: &[TimeFormat],
) -> Result<(), String> {
    macro_rules! int {
        ($t:ty) => {{
            let i = integer(v).ok_or_else(|| bad(v, ty))?;
            let x = <$t>::try_from(i)
                .map_err(|_| format!("{} is out of range for {ty}", describe(v)))?;
            out.extend_from_slice(&x.to_le_bytes());
        }};
    }
    match ty {
        ColumnType::UInt8 => int!(u8),
        ColumnType::UInt16 => int!(u16),
        ColumnType::UInt32 => int!(u32),
        ColumnType::UInt64 => int!(u64),
        ColumnType::Int8 => int!(i8),
        ColumnType::Int16 => int!(i16),
        ColumnType::Int32 => int!(i32),
        ColumnType::Int64 => int!(i64),
        ColumnType::Bool => {
            let b = match v {
                Field::Json(Value::Bool(b)) => *b,
                Field::Text("true") => true,
                Field::Text("false") => false,
                _ => match integer(v) {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(bad(v, ty)),
                },
            };
            out.push(b as u8);
        }
        ColumnType::Float32 => {
            let f = float(v).ok_or_else(|| bad(v, ty))?;
            out.extend_from_slice(&(f as f32).to_le_bytes());
        }
        ColumnType::Float64 => {
            let f = float(v).ok_or_else(|| bad(v, ty))?;
            out.extend_from_slice(&f.to_le_bytes());
        }
        ColumnType::String => match v {
            Field::Json(Value::String(s)) => write_str(out, s.as_bytes()),
            Field::Json(other) => write_str(out, other.to_string().as_bytes()),
            Field::Text(t) => write_str(out, t.as_bytes()),
            Field::Missing => return Err(bad(v, ty)),
        },
        ColumnType::FixedString(n) => {
            let bytes: &[u8] = match v {
                Field::Json(Value::String(s)) => s.as_bytes(),
                Field::Text(t) => t.as_bytes(),
                _ => return Err(bad(v, ty)),
            };
            if bytes.len() > *n {
                return Err(format!("{} is longer than {ty}", describe(v)));
            }
            out.extend_from_slice(bytes);
            out.resize(out.len() + n - bytes.len(), 0);
        }
        ColumnType::Date => {
            let (secs, _) = timestamp(v, formats)
                .or_else(|| timestamp(v, &[TimeFormat::Pattern("%Y-%m-%d".into())]))
                .ok_or_else(|| bad(v, ty))?;
            let days = u16::try_from(secs.div_euclid(86_400))
                .map_err(|_| format!("{} is out of range for Date", describe(v)))?;
            out.extend_from_slice(&days.to_le_bytes());
        }
        ColumnType::DateTime => {
            let (secs, _) = timestamp(v, formats).ok_or_else(|| bad(v, ty))?;
            let secs = u32::try_from(secs)
                .map_err(|_| format!("{} is out of range for DateTime", describe(v)))?;
            out.extend_from_slice(&secs.to_le_bytes());
        }
        ColumnType::DateTime64(p) => {
            let (secs, nanos) = timestamp(v, formats).ok_or_else(|| bad(v, ty))?;
            let scale = 10i64.pow(*p);
            let ticks = secs
                .checked_mul(scale)
                .and_then(|t| t.checked_add(nanos as i64 / (1_000_000_000 / scale)))
                .ok_or_else(|| format!("{} is out of range for {ty}", describe(v)))?;
            out.extend_from_slice(&ticks.to_le_bytes());
        }
        ColumnType::Decimal { precision, scale } => {
            let number: Cow<'_, str> = match v {
                Field::Json(Value::String(s)) => Cow::Borrowed(s),
                Field::Json(Value::Number(n)) => Cow::Owned(n.to_string()),
                Field::Text(t) => Cow::Borrowed(t),
                _ => return Err(bad(v, ty)),
            };
            let scaled = decimal(&number, *precision, *scale).map_err(|why| match why {
                DecimalError::NotANumber => bad(v, ty),
                DecimalError::Digits => format!("{} has more digits than {ty}", describe(v)),
                DecimalError::Scale => {
                    format!("{} has more decimal places than {ty}", describe(v))
                }
            })?;
            out.extend_from_slice(&scaled[..ColumnType::decimal_bytes(*precision)]);
        }
        ColumnType::Uuid => {
            let text = match v {
                Field::Json(Value::String(s)) => s.as_str(),
                Field::Text(t) => t,
                _ => return Err(bad(v, ty)),
            };
            let id = uuid(text).ok_or_else(|| bad(v, ty))?;
            // Two little-endian 64-bit halves, the high one (the text's first 16 digits) first.
            out.extend(((id >> 64) as u64).to_le_bytes());
            out.extend((id as u64).to_le_bytes());
        }
        ColumnType::Nullable(inner) => match v {
            Field::Missing | Field::Json(Value::Null) => out.push(1),
            Field::Text(t) if t == "\\N" || (t.is_empty() && **inner != ColumnType::String) => {
                out.push(1)
            }
            _ => {
                out.push(0);
                encode(out, inner, v, formats)?;
            }
        },
        ColumnType::Array(inner) => {
            let parsed;
            let items: &[Value] = match v {
                Field::Json(Value::Array(a)) => a,
                Field::Text(t) => {
                    parsed = serde_json::from_str::<Value>(t)
                        .ok()
                        .and_then(|x| match x {
                            Value::Array(a) => Some(a),
                            _ => None,
                        })
                        .ok_or_else(|| bad(v, ty))?;
                    &parsed
                }
                _ => return Err(bad(v, ty)),
            };
            write_varint(out, items.len() as u64);
            for item in items {
                encode(out, inner, Field::Json(item), formats)?;
            }
        }
        ColumnType::LowCardinality(inner) => encode(out, inner, v, formats)?,
    }
    Ok(())
}

/// Why a text is not a value of a `Decimal(P, S)`.
#[derive(Debug, PartialEq)]
enum DecimalError {
    NotANumber,
    /// More than P digits once scaled.
    Digits,
    /// Non-zero digits past the S-th decimal place (never rounded away silently).
    Scale,
}

/// `text` (`-123.45`, `1e3`) times 10^`scale`, exactly, as a 256-bit two's complement
/// integer in little-endian bytes; callers keep the first 4, 8, 16 or 32.
fn decimal(text: &str, precision: u32, scale: u32) -> Result<[u8; 32], DecimalError> {
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (
            &unsigned[..i],
            unsigned[i + 1..]
                .parse::<i32>()
                .map_err(|_| DecimalError::NotANumber)?,
        ),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = || whole.bytes().chain(fraction.bytes());
    if whole.len() + fraction.len() == 0 || !digits().all(|b| b.is_ascii_digit()) {
        return Err(DecimalError::NotANumber);
    }
    // The value is digits * 10^shift.
    let shift = i64::from(scale) + i64::from(exponent) - fraction.len() as i64;
    let all: Vec<u8> = digits().skip_while(|&b| b == b'0').collect();
    let kept = if shift < 0 {
        let cut = all.len().saturating_sub(shift.unsigned_abs() as usize);
        if all[cut..].iter().any(|&b| b != b'0') {
            return Err(DecimalError::Scale);
        }
        &all[..cut]
    } else {
        &all[..]
    };
    let zeros = shift.max(0) as u64;
    if kept.is_empty() {
        return Ok([0; 32]);
    }
    if kept.len() as u64 + zeros > u64::from(precision) {
        return Err(DecimalError::Digits);
    }
    // At most 76 digits: below 2^256.
    let mut limbs = [0u64; 4];
    let times_ten_plus = |limbs: &mut [u64; 4], digit: u64| {
        let mut carry = digit as u128;
        for limb in limbs.iter_mut() {
            let x = *limb as u128 * 10 + carry;
            *limb = x as u64;
            carry = x >> 64;
        }
    };
    for &d in kept {
        times_ten_plus(&mut limbs, u64::from(d - b'0'));
    }
    for _ in 0..zeros {
        times_ten_plus(&mut limbs, 0);
    }
    if negative {
        // Two's complement: invert, add one.
        let mut carry = 1u128;
        for limb in limbs.iter_mut() {
            let x = (!*limb) as u128 + carry;
            *limb = x as u64;
            carry = x >> 64;
        }
    }
    let mut out = [0u8; 32];
    for (chunk, limb) in out.chunks_exact_mut(8).zip(limbs) {
        chunk.copy_from_slice(&limb.to_le_bytes());
    }
    Ok(out)
}

/// A UUID's 128 bits from `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (or the 32 digits alone).
fn uuid(text: &str) -> Option<u128> {
    let text = text.trim();
    let hyphens_right = match text.len() {
        36 => text
            .bytes()
            .enumerate()
            .all(|(i, b)| (b == b'-') == matches!(i, 8 | 13 | 18 | 23)),
        32 => !text.contains('-'),
        _ => false,
    };
    if !hyphens_right {
        return None;
    }
    text.bytes()
        .filter(|&b| b != b'-')
        .try_fold(0u128, |acc, b| {
            let digit = (b as char).to_digit(16)?;
            Some(acc << 4 | u128::from(digit))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(ty: &str, v: Field<'_>) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        encode(
            &mut out,
            &ColumnType::parse(ty).unwrap(),
            v,
            &TimeFormat::defaults(),
        )?;
        Ok(out)
    }

    #[test]
    fn numbers_and_strings() {
        assert_eq!(enc("UInt16", Field::Json(&json!(258))), Ok(vec![2, 1]));
        assert_eq!(enc("Int8", Field::Text("-1")), Ok(vec![0xff]));
        assert_eq!(
            enc("UInt64", Field::Json(&json!("7"))),
            Ok(7u64.to_le_bytes().to_vec())
        );
        assert!(enc("UInt8", Field::Json(&json!(256)))
            .unwrap_err()
            .contains("out of range"));
        assert!(enc("UInt32", Field::Json(&json!("x")))
            .unwrap_err()
            .contains("not a valid UInt32"));
        assert!(enc("UInt32", Field::Json(&json!(1.5))).is_err());
        assert_eq!(
            enc("Float64", Field::Json(&json!(1.5))),
            Ok(1.5f64.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("String", Field::Json(&json!("hé"))),
            Ok(vec![3, b'h', 0xc3, 0xa9])
        );
        assert_eq!(
            enc("String", Field::Json(&json!({"a": 1}))),
            Ok([&[7u8][..], b"{\"a\":1}"].concat())
        );
        assert_eq!(
            enc("FixedString(3)", Field::Text("ab")),
            Ok(vec![b'a', b'b', 0])
        );
        let mut long = Vec::new();
        write_varint(&mut long, 300);
        assert_eq!(long, vec![0xac, 0x02]);
    }

    #[test]
    fn times_in_several_formats() {
        let secs = 1_767_225_600u32; // 2026-01-01 00:00:00 UTC
        let want = Ok(secs.to_le_bytes().to_vec());
        assert_eq!(enc("DateTime", Field::Json(&json!(secs))), want);
        assert_eq!(
            enc("DateTime", Field::Json(&json!("2026-01-01 00:00:00"))),
            want
        );
        assert_eq!(
            enc("DateTime('UTC')", Field::Text("2026-01-01T00:00:00Z")),
            want
        );
        assert_eq!(enc("DateTime", Field::Text("1767225600")), want);
        assert!(enc("DateTime", Field::Json(&json!("yesterday"))).is_err());
        assert_eq!(
            enc(
                "DateTime64(3)",
                Field::Json(&json!("2026-01-01T00:00:00.25Z"))
            ),
            Ok((secs as i64 * 1000 + 250).to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("Date", Field::Text("2026-01-01")),
            Ok(((secs / 86_400) as u16).to_le_bytes().to_vec())
        );
        let ms = [TimeFormat::UnixMs];
        let mut out = Vec::new();
        encode(
            &mut out,
            &ColumnType::DateTime64(3),
            Field::Json(&json!(1767225600250u64)),
            &ms,
        )
        .unwrap();
        assert_eq!(out, (secs as i64 * 1000 + 250).to_le_bytes().to_vec());
    }

    #[test]
    fn decimals_exactly_from_text_or_numbers() {
        let d = |ty: &str, v: Field<'_>| enc(ty, v);
        assert_eq!(
            d("Decimal(12, 2)", Field::Json(&json!("123.45"))),
            Ok(12345i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            d("Decimal(9, 3)", Field::Json(&json!("-1.5"))),
            Ok((-1500i32).to_le_bytes().to_vec())
        );
        assert_eq!(
            d("Decimal(12, 2)", Field::Json(&json!(7))),
            Ok(700i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            d("Decimal(12, 2)", Field::Json(&json!(0.25))),
            Ok(25i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            d("Decimal(12, 2)", Field::Text("1.5e2")),
            Ok(15000i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            d("Decimal(12, 2)", Field::Text("1.2300")),
            Ok(123i64.to_le_bytes().to_vec()),
            "trailing zeros past the scale are fine"
        );
        assert_eq!(
            d(
                "Decimal(38, 10)",
                Field::Text("-12345678901234567890.0123456789")
            ),
            Ok((-123_456_789_012_345_678_900_123_456_789i128)
                .to_le_bytes()
                .to_vec())
        );
        let big = format!("-{}", "9".repeat(76));
        let got = d("Decimal(76, 0)", Field::Text(&big)).unwrap();
        assert_eq!(got.len(), 32);
        // -(10^76 - 1) in two's complement: adding 10^76 - 1 back gives zero.
        assert_eq!(got[31], 0xe9, "{got:x?}");
        assert_eq!(d("Decimal(3, 0)", Field::Text("0")), Ok(vec![0; 4]));
        assert!(d("Decimal(12, 2)", Field::Text("1.239"))
            .unwrap_err()
            .contains("more decimal places"));
        assert!(d("Decimal(4, 2)", Field::Text("123.4"))
            .unwrap_err()
            .contains("more digits"));
        assert!(d("Decimal(4, 2)", Field::Text("1e9"))
            .unwrap_err()
            .contains("more digits"));
        for bad in ["NaN", "", ".", "1.2.3", "12a", "--1", "1e"] {
            assert!(
                d("Decimal(12, 2)", Field::Text(bad))
                    .unwrap_err()
                    .contains("not a valid Decimal(12, 2)"),
                "{bad:?}"
            );
        }
        assert!(d("Decimal(12, 2)", Field::Json(&json!(true))).is_err());
    }

    #[test]
    fn uuids_as_two_little_endian_halves() {
        // As ClickHouse stores 00112233-4455-6677-8899-aabbccddeeff (checked on 18.16).
        let want = vec![
            0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa,
            0x99, 0x88,
        ];
        assert_eq!(
            enc(
                "UUID",
                Field::Json(&json!("00112233-4455-6677-8899-aabbccddeeff"))
            ),
            Ok(want.clone())
        );
        assert_eq!(
            enc("UUID", Field::Text("00112233445566778899AABBCCDDEEFF")),
            Ok(want)
        );
        for bad in [
            "00112233-4455-6677-8899-aabbccddeef",
            "0011223344-55-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeefg",
            "0011223-34455-6677-8899-aabbccddeeff",
            "-0112233445566778899aabbccddeeff",
        ] {
            assert!(enc("UUID", Field::Text(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn debezium_time_units() {
        let at = |v: Field<'_>, f: &str| timestamp(v, &[TimeFormat::parse(f)]);
        // 2026-12-05T19:00:00.123456Z
        assert_eq!(
            at(Field::Json(&json!(1_796_497_200_123_456i64)), "unix_us"),
            Some((1_796_497_200, 123_456_000))
        );
        assert_eq!(
            at(Field::Json(&json!(-1)), "unix_us"),
            Some((-1, 999_999_000))
        );
        assert_eq!(
            at(Field::Json(&json!(20_792)), "unix_days"),
            Some((20_792 * 86_400, 0))
        );
        assert_eq!(
            at(Field::Text("20792"), "unix_days"),
            Some((1_796_428_800, 0))
        );
        assert_eq!(at(Field::Json(&json!(i64::MAX)), "unix_days"), None);
        assert_eq!(
            at(Field::Json(&json!(1767225600250u64)), "unix_ms"),
            Some((1_767_225_600, 250_000_000))
        );
        assert_eq!(at(Field::Json(&json!("Infinity")), "unix"), None);
        let mut out = Vec::new();
        encode(
            &mut out,
            &ColumnType::DateTime64(6),
            Field::Json(&json!("2026-12-05T19:00:00.123456Z")),
            &[TimeFormat::UnixUs, TimeFormat::Rfc3339],
        )
        .unwrap();
        assert_eq!(out, 1_796_497_200_123_456i64.to_le_bytes());
    }

    #[test]
    fn floats_from_debezium_special_strings() {
        for (text, check) in [
            ("NaN", f64::is_nan as fn(f64) -> bool),
            ("Infinity", |f: f64| f == f64::INFINITY),
            ("-Infinity", |f: f64| f == f64::NEG_INFINITY),
        ] {
            let out = enc("Float64", Field::Json(&json!(text))).unwrap();
            assert!(check(f64::from_le_bytes(out.try_into().unwrap())), "{text}");
        }
    }

    #[test]
    fn nullable_and_arrays() {
        assert_eq!(enc("Nullable(UInt8)", Field::Missing), Ok(vec![1]));
        assert_eq!(
            enc("Nullable(UInt8)", Field::Json(&json!(null))),
            Ok(vec![1])
        );
        assert_eq!(
            enc("Nullable(UInt8)", Field::Json(&json!(5))),
            Ok(vec![0, 5])
        );
        assert_eq!(enc("Nullable(UInt8)", Field::Text("\\N")), Ok(vec![1]));
        assert_eq!(
            enc("Array(UInt8)", Field::Json(&json!([1, 2]))),
            Ok(vec![2, 1, 2])
        );
        assert_eq!(enc("Array(UInt8)", Field::Text("[3]")), Ok(vec![1, 3]));
        assert_eq!(
            enc("Array(Nullable(String))", Field::Json(&json!(["a", null]))),
            Ok(vec![2, 0, 1, b'a', 1])
        );
        assert!(enc("Array(UInt8)", Field::Json(&json!([1, "x"]))).is_err());
        let mut zero = Vec::new();
        encode_zero(&mut zero, &ColumnType::parse("Array(String)").unwrap());
        encode_zero(&mut zero, &ColumnType::parse("FixedString(2)").unwrap());
        assert_eq!(zero, vec![0, 0, 0]);
        let mut zero = Vec::new();
        encode_zero(&mut zero, &ColumnType::parse("Decimal(20, 2)").unwrap());
        encode_zero(&mut zero, &ColumnType::Uuid);
        assert_eq!(zero, vec![0; 32]);
    }
}
