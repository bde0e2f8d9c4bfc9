//! PostgreSQL's text form of a value (what pgoutput and `COPY ... TO STDOUT` send, with the
//! session settings of `pg::wire::SESSION_OPTIONS`) to the JSON value of Debezium's default
//! mapping (`decimal.handling.mode=string`, `time.precision.mode=adaptive_time_microseconds`):
//!
//! | PostgreSQL | JSON |
//! |---|---|
//! | smallint, integer, bigint, oid | number |
//! | real, double precision | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | numeric | string, exactly as PostgreSQL prints it |
//! | boolean | true / false |
//! | timestamp with time zone | string, ISO-8601 in UTC: `"2026-12-05T19:00:00.123456Z"` |
//! | timestamp | number: microseconds since 1970-01-01 |
//! | date | number: days since 1970-01-01 |
//! | time | number: microseconds since midnight |
//! | bytea | string: base64 |
//! | arrays | arrays of the element's mapping (nested for several dimensions) |
//! | text, varchar, char, uuid, json, jsonb, enums, everything else | string |
//!
//! A value that does not parse as its type says (`infinity` timestamps, BC dates) is kept as
//! its text: nothing is dropped or turned into NULL.

use base64::Engine;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::Value;

/// How a column's values are mapped, from its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Numeric,
    Timestamp,
    TimestampTz,
    Date,
    Time,
    Bytea,
    Array(Box<Kind>),
    /// Text, uuid, json(b), enums and anything else: the text itself.
    Text,
}

impl Kind {
    /// The kind of a built-in type; `None` for a type the catalog must be asked about
    /// (enums, domains, arrays of those).
    pub fn builtin(oid: u32) -> Option<Kind> {
        let k = match oid {
            16 => Kind::Bool,
            20 | 21 | 23 | 26 => Kind::Int,
            700 | 701 => Kind::Float,
            1700 => Kind::Numeric,
            1114 => Kind::Timestamp,
            1184 => Kind::TimestampTz,
            1082 => Kind::Date,
            1083 => Kind::Time,
            17 => Kind::Bytea,
            25 | 1043 | 1042 | 19 | 2950 | 114 | 3802 | 18 => Kind::Text,
            1000 => Kind::Array(Box::new(Kind::Bool)),
            1005 | 1007 | 1016 | 1028 => Kind::Array(Box::new(Kind::Int)),
            1021 | 1022 => Kind::Array(Box::new(Kind::Float)),
            1231 => Kind::Array(Box::new(Kind::Numeric)),
            1115 => Kind::Array(Box::new(Kind::Timestamp)),
            1185 => Kind::Array(Box::new(Kind::TimestampTz)),
            1182 => Kind::Array(Box::new(Kind::Date)),
            1183 => Kind::Array(Box::new(Kind::Time)),
            1001 => Kind::Array(Box::new(Kind::Bytea)),
            1009 | 1015 | 1014 | 2951 | 199 | 3807 => Kind::Array(Box::new(Kind::Text)),
            _ => return None,
        };
        Some(k)
    }

    /// Debezium's schema type name for the `with_schema` envelope.
    pub fn schema_type(&self) -> &'static str {
        match self {
            Kind::Bool => "boolean",
            Kind::Int | Kind::Timestamp | Kind::Time => "int64",
            Kind::Date => "int32",
            Kind::Float => "double",
            Kind::Array(_) => "array",
            _ => "string",
        }
    }

    /// Debezium's logical type name, where it has one.
    pub fn schema_name(&self) -> Option<&'static str> {
        match self {
            Kind::Timestamp => Some("io.debezium.time.MicroTimestamp"),
            Kind::TimestampTz => Some("io.debezium.time.ZonedTimestamp"),
            Kind::Date => Some("io.debezium.time.Date"),
            Kind::Time => Some("io.debezium.time.MicroTime"),
            _ => None,
        }
    }
}

/// The JSON value of `text` (a value's text form) for a column of `kind`.
pub fn to_json(kind: &Kind, text: &str) -> Value {
    match kind {
        Kind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.into()),
        },
        Kind::Int => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.into())),
        Kind::Float => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Value::from(f),
            _ => Value::String(text.into()),
        },
        Kind::Timestamp => timestamp_micros(text)
            .map(Value::from)
            .unwrap_or_else(|| Value::String(text.into())),
        Kind::TimestampTz => Value::String(timestamptz_iso(text).unwrap_or_else(|| text.into())),
        Kind::Date => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .filter(|_| !text.ends_with(" BC"))
            .map(|d| Value::from(d.signed_duration_since(epoch_date()).num_days()))
            .unwrap_or_else(|| Value::String(text.into())),
        Kind::Time => NaiveTime::parse_from_str(text, "%H:%M:%S%.f")
            .map(|t| {
                Value::from(
                    i64::from(t.num_seconds_from_midnight()) * 1_000_000
                        + i64::from(t.nanosecond() / 1000),
                )
            })
            .unwrap_or_else(|_| Value::String(text.into())),
        Kind::Bytea => match text.strip_prefix("\\x").and_then(hex) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => Value::String(text.into()),
        },
        Kind::Array(element) => {
            parse_array(text, element).unwrap_or_else(|| Value::String(text.into()))
        }
        Kind::Numeric | Kind::Text => Value::String(text.into()),
    }
}

fn epoch_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

fn timestamp_micros(text: &str) -> Option<i64> {
    let t = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    if text.ends_with(" BC") {
        return None;
    }
    Some(t.and_utc().timestamp_micros())
}

/// "2026-12-05 19:00:00.5+00" (a UTC session) -> "2026-12-05T19:00:00.5Z".
fn timestamptz_iso(text: &str) -> Option<String> {
    let body = text
        .strip_suffix("+00")
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = body.split_once(' ')?;
    if date.len() != 10 || !time.is_ascii() {
        return None;
    }
    Some(format!("{date}T{time}Z"))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An array's text form (`{1,2,NULL}`, `{{a,"b c"},{d,e}}`) to a JSON array; `None` if it
/// is not well formed (or has explicit bounds, `[0:1]={...}`).
pub fn parse_array(text: &str, element: &Kind) -> Option<Value> {
    let mut chars = text.char_indices().peekable();
    let v = parse_level(text, &mut chars, element)?;
    if chars.next().is_some() {
        return None;
    }
    Some(v)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn parse_level(text: &str, chars: &mut Chars<'_>, element: &Kind) -> Option<Value> {
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut out = Vec::new();
    if chars.peek()?.1 == '}' {
        chars.next();
        return Some(Value::Array(out));
    }
    loop {
        match chars.peek()?.1 {
            '{' => out.push(parse_level(text, chars, element)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => s.push(chars.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                out.push(to_json(element, &s));
            }
            _ => {
                let start = chars.peek()?.0;
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let raw = text.get(start..end)?.trim();
                out.push(if raw == "NULL" {
                    Value::Null
                } else {
                    to_json(element, raw)
                });
            }
        }
        match chars.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(out)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_follow_debeziums_mapping() {
        assert_eq!(to_json(&Kind::Int, "-42"), json!(-42));
        assert_eq!(to_json(&Kind::Bool, "t"), json!(true));
        assert_eq!(to_json(&Kind::Float, "1.5"), json!(1.5));
        assert_eq!(to_json(&Kind::Float, "NaN"), json!("NaN"));
        assert_eq!(to_json(&Kind::Numeric, "12.30"), json!("12.30"));
        assert_eq!(
            to_json(&Kind::TimestampTz, "2026-12-05 19:00:00.123456+00"),
            json!("2026-12-05T19:00:00.123456Z")
        );
        assert_eq!(
            to_json(&Kind::Timestamp, "1970-01-01 00:00:01.5"),
            json!(1_500_000)
        );
        assert_eq!(to_json(&Kind::Date, "1970-01-11"), json!(10));
        assert_eq!(to_json(&Kind::Time, "00:00:02.25"), json!(2_250_000));
        assert_eq!(to_json(&Kind::Bytea, "\\x00ff"), json!("AP8="));
        assert_eq!(to_json(&Kind::Timestamp, "infinity"), json!("infinity"));
        assert_eq!(
            to_json(&Kind::Date, "0044-03-15 BC"),
            json!("0044-03-15 BC")
        );
    }

    #[test]
    fn arrays_nest_and_quote() {
        assert_eq!(
            to_json(&Kind::Array(Box::new(Kind::Int)), "{1,NULL,3}"),
            json!([1, null, 3])
        );
        assert_eq!(
            to_json(
                &Kind::Array(Box::new(Kind::Text)),
                r#"{{a,"b, \"c\""},{"NULL",e}}"#
            ),
            json!([["a", "b, \"c\""], ["NULL", "e"]])
        );
        assert_eq!(to_json(&Kind::Array(Box::new(Kind::Int)), "{}"), json!([]));
        // Malformed: kept as text.
        assert_eq!(
            to_json(&Kind::Array(Box::new(Kind::Int)), "{1,2"),
            json!("{1,2")
        );
        assert_eq!(
            to_json(&Kind::Array(Box::new(Kind::Int)), "[0:1]={1,2}"),
            json!("[0:1]={1,2}")
        );
    }
}

/// Appends `s` as a JSON string (quoted, escaped).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends the JSON of `text` for a column of `kind`: what [`to_json`] gives, written
/// straight into `out` (no value tree) for the common kinds.
pub fn write_json(out: &mut Vec<u8>, kind: &Kind, text: &str) {
    match kind {
        Kind::Int if is_integer(text) => out.extend_from_slice(text.as_bytes()),
        Kind::Text | Kind::Numeric => write_str(out, text),
        Kind::Bool if text == "t" => out.extend_from_slice(b"true"),
        Kind::Bool if text == "f" => out.extend_from_slice(b"false"),
        Kind::TimestampTz => match timestamptz_iso(text) {
            Some(iso) => write_str(out, &iso),
            None => write_str(out, text),
        },
        _ => {
            let v = to_json(kind, text);
            // Writing a Value to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &v);
        }
    }
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.len() < 20 && digits.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod write_tests {
    use super::*;

    #[test]
    fn written_json_equals_the_value_tree() {
        let cases: &[(Kind, &str)] = &[
            (Kind::Int, "-42"),
            (Kind::Int, "not a number"),
            (Kind::Text, "tab\there \"quoted\" back\\slash \u{1} é"),
            (Kind::Numeric, "12.30"),
            (Kind::Bool, "t"),
            (Kind::Bool, "f"),
            (Kind::TimestampTz, "2026-12-05 19:00:00.123456+00"),
            (Kind::Timestamp, "1970-01-01 00:00:01.5"),
            (Kind::Float, "NaN"),
            (Kind::Array(Box::new(Kind::Int)), "{1,NULL}"),
        ];
        for (kind, text) in cases {
            let mut out = Vec::new();
            write_json(&mut out, kind, text);
            let parsed: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(parsed, to_json(kind, text), "{kind:?} {text:?}");
        }
    }
}
