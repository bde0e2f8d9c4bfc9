//! Values from a message to ClickHouse's RowBinary, converted to the target column's type.
//!
//! RowBinary: little-endian numbers, strings as a LEB128 length then bytes, `Date` as days
//! (UInt16), `DateTime` as seconds (UInt32), `DateTime64(p)` as Int64 ticks, `Nullable` as a
//! 0/1 byte then the value, `Array` as a LEB128 count then the elements, `LowCardinality(T)`
//! as T.

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
            TimeFormat::Unix | TimeFormat::UnixMs => {
                let scale = if *f == TimeFormat::Unix { 1.0 } else { 1e-3 };
                let secs = match (v, text) {
                    (Field::Json(Value::Number(n)), _) => {
                        if let (Some(i), TimeFormat::Unix) = (n.as_i64(), f) {
                            Some((i, 0))
                        } else {
                            n.as_f64().map(|x| seconds_and_nanos(x * scale))
                        }
                    }
                    (_, Some(t)) if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() => {
                        t.parse::<i64>().ok().map(|i| {
                            if *f == TimeFormat::Unix {
                                (i, 0)
                            } else {
                                (i.div_euclid(1000), (i.rem_euclid(1000) * 1_000_000) as u32)
                            }
                        })
                    }
                    (_, Some(t)) => t
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .map(|x| seconds_and_nanos(x * scale)),
                    _ => None,
                };
                secs
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
    }
}
