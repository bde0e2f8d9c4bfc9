//! Format templates: how a message's fields map onto a table's columns, compiled against
//! the table's real column types, and the per-message encoder to RowBinary.
//!
//! - `json`: each column reads a field path (`a.b`, `items[0].id`); unknown fields are
//!   ignored.
//! - `delimited`: fields split by a separator of one or more characters, with optional
//!   quoting (a doubled quote inside a quoted field is a quote); columns read a field by
//!   position or by a name from `fields`. The `csv` crate only splits on one byte, hence
//!   the small splitter here.
//!
//! A column without a mapping reads the field of its own name. A field that is missing
//! takes the column's `default` if the template gives one, else NULL for `Nullable`
//! columns, else the type's zero value (what ClickHouse fills in for a column not sent).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::clickhouse::rowbinary::{encode, encode_zero, timestamp, truncate, Field, TimeFormat};
use crate::clickhouse::types::ColumnType;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum FormatKind {
    Json,
    Delimited,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    pub format: FormatKind,
    /// Delimited: the separator (one or more characters).
    #[serde(default)]
    pub separator: Option<String>,
    /// Delimited: the quote character; an empty string turns quoting off.
    #[serde(default = "default_quote")]
    pub quote: String,
    /// Delimited: field names by position, so columns can map by name.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Column mappings; a table column not listed reads the field of its own name.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnMapping>,
}

fn default_quote() -> String {
    "\"".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// JSON: a field path; delimited: a name from `fields`.
    pub path: Option<String>,
    /// Delimited: a 0-based position.
    pub index: Option<usize>,
    /// Date/time formats tried in order: `unix`, `unix_ms`, `rfc3339`, or a strftime pattern.
    pub formats: Option<Vec<String>>,
    /// Used when the field is missing (a TOML value: number, string, array, ...).
    pub default: Option<toml::Value>,
    /// Leave the column out of the insert (ClickHouse computes its default).
    #[serde(default)]
    pub skip: bool,
}

/// Why a message could not become a row. `kind` is the dead-letter reason label.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub kind: &'static str,
    pub message: String,
}

impl RowError {
    fn new(kind: &'static str, message: String) -> Self {
        Self { kind, message }
    }
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone)]
enum Locator {
    Path(Vec<PathStep>),
    Position(usize),
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    ty: ColumnType,
    locator: Locator,
    formats: Vec<TimeFormat>,
    /// The default, already encoded.
    default: Option<Vec<u8>>,
}

/// A template compiled against a table.
#[derive(Debug, Clone)]
pub struct Template {
    format: FormatKind,
    separator: String,
    quote: Option<char>,
    columns: Vec<Column>,
    /// JSON: the distinct top-level keys the columns read; every other key of a message is
    /// skipped without being built.
    top_keys: Vec<String>,
    /// JSON: per column, its top-level key's index in `top_keys`.
    top_of: Vec<usize>,
}

/// The event-time check of a task: rows whose time column falls outside
/// `[min, max]` (unix seconds) are refused with reason `time_window`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub column: usize,
    pub min: i64,
    pub max: i64,
}

fn parse_path(path: &str) -> Result<Vec<PathStep>, String> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(PathStep::Key(key.to_string()));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let close = stripped
                .find(']')
                .ok_or_else(|| format!("unclosed [ in path {path:?}"))?;
            let n = stripped[..close].parse().map_err(|_| {
                format!(
                    "array index {:?} in path {path:?} is not a number",
                    &stripped[..close]
                )
            })?;
            out.push(PathStep::Index(n));
            rest = &stripped[close + 1..];
        }
        if !rest.is_empty() || (key.is_empty() && out.is_empty()) {
            return Err(format!("path {path:?} is not a.b[0].c"));
        }
    }
    Ok(out)
}

fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

impl Template {
    /// Compiles `config` against the table's insertable columns (name, type), in table
    /// order. Every problem is returned, keyed by column.
    pub fn compile(
        config: &TemplateConfig,
        table: &[(String, ColumnType)],
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let separator = config.separator.clone().unwrap_or_default();
        if config.format == FormatKind::Delimited && separator.is_empty() {
            problems.push("separator: a delimited template needs a separator".to_string());
        }
        let quote = match config.quote.chars().count() {
            0 => None,
            1 => config.quote.chars().next(),
            _ => {
                problems.push(format!("quote: {:?} is not one character", config.quote));
                None
            }
        };
        for name in config.columns.keys() {
            if !table.iter().any(|(c, _)| c == name) {
                problems.push(format!(
                    "columns.{name}: the table has no such column (it has: {})",
                    table
                        .iter()
                        .map(|(c, _)| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let mut columns = Vec::new();
        for (position, (name, ty)) in table.iter().enumerate() {
            let mapping = config.columns.get(name).cloned().unwrap_or_default();
            if mapping.skip {
                continue;
            }
            let key = format!("columns.{name}");
            let locator = match (&config.format, &mapping.path, mapping.index) {
                (FormatKind::Json, _, Some(_)) => {
                    problems.push(format!("{key}.index: JSON templates map by path"));
                    continue;
                }
                (FormatKind::Json, path, None) => match parse_path(path.as_deref().unwrap_or(name))
                {
                    Ok(p) => Locator::Path(p),
                    Err(e) => {
                        problems.push(format!("{key}.path: {e}"));
                        continue;
                    }
                },
                (FormatKind::Delimited, _, Some(i)) => Locator::Position(i),
                // No names given: fields in the table's column order.
                (FormatKind::Delimited, None, None) if config.fields.is_empty() => {
                    Locator::Position(position)
                }
                (FormatKind::Delimited, path, None) => {
                    let field = path.as_deref().unwrap_or(name);
                    match config.fields.iter().position(|f| f == field) {
                        Some(i) => Locator::Position(i),
                        None if mapping.path.is_none() && !config.columns.contains_key(name) => {
                            // Unmapped and not among the named fields: left to ClickHouse.
                            continue;
                        }
                        None => {
                            problems.push(format!("{key}: no field {field:?} in fields"));
                            continue;
                        }
                    }
                }
            };
            let formats = match &mapping.formats {
                Some(f) => f.iter().map(|s| TimeFormat::parse(s)).collect(),
                None => TimeFormat::defaults(),
            };
            let default = match &mapping.default {
                None => None,
                Some(d) => {
                    let json = toml_to_json(d);
                    let mut out = Vec::new();
                    match encode(&mut out, ty, Field::Json(&json), &formats) {
                        Ok(()) => Some(out),
                        Err(e) => {
                            problems.push(format!("{key}.default: {e}"));
                            None
                        }
                    }
                }
            };
            columns.push(Column {
                name: name.clone(),
                ty: ty.clone(),
                locator,
                formats,
                default,
            });
        }
        if columns.is_empty() && problems.is_empty() {
            problems.push("no column of the table is mapped".into());
        }
        let mut top_keys: Vec<String> = Vec::new();
        let mut top_of = Vec::new();
        for c in &columns {
            if let Locator::Path(path) = &c.locator {
                let key = match path.first() {
                    Some(PathStep::Key(k)) => k.clone(),
                    _ => {
                        problems.push(format!(
                            "columns.{}: the path must start with a field name",
                            c.name
                        ));
                        continue;
                    }
                };
                let i = top_keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                    top_keys.push(key);
                    top_keys.len() - 1
                });
                top_of.push(i);
            }
        }
        if problems.is_empty() {
            Ok(Self {
                format: config.format.clone(),
                separator,
                quote,
                columns,
                top_keys,
                top_of,
            })
        } else {
            Err(problems)
        }
    }

    /// The column list for `INSERT INTO t (...) FORMAT RowBinary`.
    pub fn insert_columns(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("`{}`", c.name.replace('`', "\\`")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The index of a column among the encoded ones.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Appends one message as a RowBinary row; on error `out` is left as it was.
    /// `key` receives the raw text of the column named by `key_column`, for sharding.
    pub fn encode_row(
        &self,
        payload: &[u8],
        out: &mut Vec<u8>,
        window: Option<Window>,
        key_column: Option<usize>,
        key: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        let start = out.len();
        let result = match self.format {
            FormatKind::Json => self.encode_json(payload, out, window, key_column, key),
            FormatKind::Delimited => self.encode_delimited(payload, out, window, key_column, key),
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn column(
        &self,
        i: usize,
        v: Field<'_>,
        out: &mut Vec<u8>,
        window: Option<Window>,
        key_column: Option<usize>,
        key: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        let c = &self.columns[i];
        if let Some(w) = window.filter(|w| w.column == i) {
            let (secs, _) = timestamp(v, &c.formats).ok_or_else(|| {
                RowError::new("type", format!("column {}: no event time in {v:?}", c.name))
            })?;
            if secs < w.min || secs > w.max {
                return Err(RowError::new(
                    "time_window",
                    format!(
                        "column {}: event time {secs} is outside the accepted window [{}, {}]",
                        c.name, w.min, w.max
                    ),
                ));
            }
        }
        if key_column == Some(i) {
            key.clear();
            match v {
                Field::Json(Value::String(s)) => key.extend_from_slice(s.as_bytes()),
                Field::Json(other) => key.extend_from_slice(other.to_string().as_bytes()),
                Field::Text(t) => key.extend_from_slice(t.as_bytes()),
                Field::Missing => {}
            }
        }
        match (v, &c.default) {
            (Field::Missing, Some(d)) => {
                out.extend_from_slice(d);
                Ok(())
            }
            (Field::Missing, None) if !matches!(c.ty, ColumnType::Nullable(_)) => {
                encode_zero(out, &c.ty);
                Ok(())
            }
            _ => encode(out, &c.ty, v, &c.formats)
                .map_err(|e| RowError::new("type", format!("column {}: {e}", c.name))),
        }
    }

    fn encode_json(
        &self,
        payload: &[u8],
        out: &mut Vec<u8>,
        window: Option<Window>,
        key_column: Option<usize>,
        key: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        // The values of the wanted top-level keys; on the stack for up to 8 of them.
        let mut inline: [Option<Value>; 8] = Default::default();
        let mut spilled = Vec::new();
        let found: &mut [Option<Value>] = if self.top_keys.len() <= inline.len() {
            &mut inline[..self.top_keys.len()]
        } else {
            spilled.resize(self.top_keys.len(), None);
            &mut spilled
        };
        let mut de = serde_json::Deserializer::from_slice(payload);
        serde::de::DeserializeSeed::deserialize(
            Wanted {
                keys: &self.top_keys,
                found: &mut *found,
            },
            &mut de,
        )
        .and_then(|()| de.end())
        .map_err(|e| RowError::new("parse", format!("not a JSON object: {e}")))?;
        for (i, c) in self.columns.iter().enumerate() {
            let Locator::Path(path) = &c.locator else {
                unreachable!("JSON columns are compiled with paths")
            };
            let mut at = found[self.top_of[i]].as_ref();
            for seg in &path[1..] {
                at = match (at, seg) {
                    (Some(Value::Object(m)), PathStep::Key(k)) => m.get(k),
                    (Some(Value::Array(a)), PathStep::Index(n)) => a.get(*n),
                    _ => None,
                };
            }
            let v = match at {
                None => Field::Missing,
                Some(v) => Field::Json(v),
            };
            self.column(i, v, out, window, key_column, key)?;
        }
        Ok(())
    }

    fn encode_delimited(
        &self,
        payload: &[u8],
        out: &mut Vec<u8>,
        window: Option<Window>,
        key_column: Option<usize>,
        key: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        let text = std::str::from_utf8(payload)
            .map_err(|e| RowError::new("parse", format!("not UTF-8 text: {e}")))?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        let fields = split_fields(text, &self.separator, self.quote)
            .map_err(|e| RowError::new("parse", e))?;
        for (i, c) in self.columns.iter().enumerate() {
            let Locator::Position(p) = c.locator else {
                unreachable!("delimited columns are compiled with positions")
            };
            let v = match fields.get(p) {
                None => Field::Missing,
                Some(f) if f.is_empty() && c.ty != ColumnType::String => Field::Missing,
                Some(f) => Field::Text(f),
            };
            self.column(i, v, out, window, key_column, key)?;
        }
        Ok(())
    }
}

/// Reads a JSON object, building values only for the wanted top-level keys.
struct Wanted<'a> {
    keys: &'a [String],
    found: &'a mut [Option<Value>],
}

impl<'de> serde::de::DeserializeSeed<'de> for Wanted<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Wanted<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(slot) = map.next_key_seed(KeyIndex(self.keys))? {
            match slot {
                Some(i) => self.found[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A key's index among the wanted keys, compared as bytes: without allocating, and
/// without checking that keys nobody wants are valid UTF-8 (wanted ones are, being equal
/// to a `String`).
struct KeyIndex<'a>(&'a [String]);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|k| k.as_bytes() == v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        self.visit_bytes(v.as_bytes())
    }
}

/// Splits a line on `sep` (one or more characters), honouring `quote`.
pub fn split_fields<'a>(
    line: &'a str,
    sep: &str,
    quote: Option<char>,
) -> Result<Vec<Cow<'a, str>>, String> {
    let mut fields = Vec::new();
    let mut rest = line;
    loop {
        match quote {
            Some(q) if rest.starts_with(q) => {
                let body = &rest[q.len_utf8()..];
                let mut value = String::new();
                let mut i = 0;
                loop {
                    let Some(j) = body[i..].find(q) else {
                        return Err(format!("unterminated quoted field in {:?}", shorten(line)));
                    };
                    value.push_str(&body[i..i + j]);
                    let after = i + j + q.len_utf8();
                    if body[after..].starts_with(q) {
                        value.push(q);
                        i = after + q.len_utf8();
                    } else {
                        rest = &body[after..];
                        break;
                    }
                }
                fields.push(Cow::Owned(value));
                if rest.is_empty() {
                    return Ok(fields);
                }
                rest = rest.strip_prefix(sep).ok_or_else(|| {
                    format!(
                        "text after a closing quote, before the separator, in {:?}",
                        shorten(line)
                    )
                })?;
            }
            _ => match rest.find(sep) {
                Some(i) => {
                    fields.push(Cow::Borrowed(&rest[..i]));
                    rest = &rest[i + sep.len()..];
                }
                None => {
                    fields.push(Cow::Borrowed(rest));
                    return Ok(fields);
                }
            },
        }
    }
}

fn shorten(s: &str) -> &str {
    truncate(s, 80)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<(String, ColumnType)> {
        [
            "ts DateTime",
            "user_id UInt64",
            "event String",
            "value Float64",
        ]
        .iter()
        .map(|s| {
            let (n, t) = s.split_once(' ').unwrap();
            (n.to_string(), ColumnType::parse(t).unwrap())
        })
        .collect()
    }

    fn template(text: &str) -> Template {
        let c: TemplateConfig = toml::from_str(text).unwrap();
        Template::compile(&c, &table()).unwrap()
    }

    fn row(t: &Template, msg: &str) -> Result<Vec<u8>, RowError> {
        let mut out = vec![9];
        let mut key = Vec::new();
        t.encode_row(msg.as_bytes(), &mut out, None, None, &mut key)?;
        Ok(out[1..].to_vec())
    }

    fn expected(ts: u32, user: u64, event: &str, value: f64) -> Vec<u8> {
        let mut v = ts.to_le_bytes().to_vec();
        v.extend_from_slice(&user.to_le_bytes());
        v.push(event.len() as u8);
        v.extend_from_slice(event.as_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v
    }

    #[test]
    fn json_by_name_ignoring_unknown_fields() {
        let t = template("format = \"json\"");
        assert_eq!(t.insert_columns(), "`ts`, `user_id`, `event`, `value`");
        assert_eq!(
            row(
                &t,
                r#"{"ts": 1767225600, "user_id": 7, "event": "click", "value": 1.5, "extra": [1]}"#
            ),
            Ok(expected(1_767_225_600, 7, "click", 1.5))
        );
        assert_eq!(
            row(
                &t,
                r#"{"ts": "2026-01-01 00:00:00", "user_id": "7", "event": "click", "value": 1.5}"#
            ),
            Ok(expected(1_767_225_600, 7, "click", 1.5))
        );
        let e = row(&t, r#"{"ts": 1, "user_id": "seven"}"#).unwrap_err();
        assert_eq!(e.kind, "type");
        assert!(e.message.contains("column user_id"), "{e:?}");
        assert_eq!(row(&t, "{not json").unwrap_err().kind, "parse");
        assert_eq!(row(&t, "[1]").unwrap_err().kind, "parse");
        assert_eq!(row(&t, r#"{"ts": 1} trailing"#).unwrap_err().kind, "parse");
        assert_eq!(
            row(
                &t,
                r#"{"us\u0065r_id": 5, "skip": {"deep": [1, {"x": "y"}]}}"#
            ),
            Ok(expected(0, 5, "", 0.0)),
            "escaped keys match; skipped values may nest"
        );
        // The whole message is read, not just up to the last wanted key.
        let e = row(
            &t,
            r#"{"ts": 1, "user_id": 2, "event": "e", "value": 1, "rest": {"a": tru}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, "parse", "{e:?}");
    }

    #[test]
    fn json_with_more_wanted_keys_than_fit_on_the_stack() {
        let table: Vec<(String, ColumnType)> = (0..12)
            .map(|i| (format!("c{i}"), ColumnType::parse("UInt8").unwrap()))
            .collect();
        let c: TemplateConfig = toml::from_str("format = \"json\"").unwrap();
        let t = Template::compile(&c, &table).unwrap();
        let msg = format!(
            "{{{}}}",
            (0..12)
                .rev()
                .map(|i| format!("\"c{i}\": {i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut out = Vec::new();
        t.encode_row(msg.as_bytes(), &mut out, None, None, &mut Vec::new())
            .unwrap();
        assert_eq!(out, (0..12).collect::<Vec<u8>>());
    }

    #[test]
    fn json_paths_and_defaults() {
        let t = template(
            r#"
            format = "json"
            [columns.ts]
            path = "meta.time"
            formats = ["unix_ms"]
            [columns.user_id]
            path = "users[1].id"
            [columns.event]
            default = "none"
            "#,
        );
        assert_eq!(
            row(
                &t,
                r#"{"meta": {"time": 1767225600000}, "users": [{"id": 1}, {"id": 2}], "value": 3}"#
            ),
            Ok(expected(1_767_225_600, 2, "none", 3.0))
        );
        // Missing without a default: the zero value.
        assert_eq!(
            row(&t, r#"{"meta": {"time": 0}}"#),
            Ok(expected(0, 0, "none", 0.0))
        );
    }

    #[test]
    fn delimited_with_a_multi_character_separator_and_quotes() {
        let t = template(
            r#"
            format = "delimited"
            separator = "||"
            fields = ["when", "who", "what", "how_much"]
            [columns.ts]
            path = "when"
            [columns.user_id]
            path = "who"
            [columns.event]
            index = 2
            [columns.value]
            path = "how_much"
            "#,
        );
        assert_eq!(
            row(&t, "2026-01-01 00:00:00||7||\"a||\"\"b\"||1.5\n"),
            Ok(expected(1_767_225_600, 7, "a||\"b", 1.5))
        );
        assert_eq!(
            row(&t, "1767225600||7||x").unwrap(),
            expected(1_767_225_600, 7, "x", 0.0)
        );
        assert_eq!(row(&t, "1||2||\"open").unwrap_err().kind, "parse");
        assert_eq!(row(&t, "1||x||e||1").unwrap_err().kind, "type");
    }

    #[test]
    fn the_time_window_refuses_rows_outside_it() {
        let t = template("format = \"json\"");
        let w = Window {
            column: 0,
            min: 1_000,
            max: 2_000,
        };
        let mut out = Vec::new();
        let mut key = Vec::new();
        assert!(t
            .encode_row(br#"{"ts": 1500}"#, &mut out, Some(w), None, &mut key)
            .is_ok());
        let e = t
            .encode_row(
                br#"{"ts": 2500, "user_id": 1}"#,
                &mut out,
                Some(w),
                None,
                &mut key,
            )
            .unwrap_err();
        assert_eq!(e.kind, "time_window");
        assert_eq!(
            out.len(),
            expected(0, 0, "", 0.0).len(),
            "a refused row leaves nothing"
        );
    }

    #[test]
    fn the_key_column_is_captured_for_sharding() {
        let t = template("format = \"json\"");
        let mut out = Vec::new();
        let mut key = Vec::new();
        t.encode_row(
            br#"{"user_id": 42}"#,
            &mut out,
            None,
            t.column_index("user_id"),
            &mut key,
        )
        .unwrap();
        assert_eq!(key, b"42");
    }

    #[test]
    fn compile_reports_every_problem() {
        let c: TemplateConfig = toml::from_str(
            r#"
            format = "delimited"
            [columns.nope]
            index = 1
            [columns.user_id]
            default = "x"
            "#,
        )
        .unwrap();
        let problems = Template::compile(&c, &table()).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("separator")));
        assert!(problems.iter().any(|p| p.starts_with("columns.nope")));
        assert!(problems.iter().any(|p| p.starts_with("columns.user_id")));
    }

    #[test]
    fn split_handles_edges() {
        assert_eq!(
            split_fields("a,,b", ",", Some('"')).unwrap(),
            ["a", "", "b"]
        );
        assert_eq!(split_fields("", ",", Some('"')).unwrap(), [""]);
        assert_eq!(split_fields("\"x\"", ",", Some('"')).unwrap(), ["x"]);
        let by_position = template("format = \"delimited\"\nseparator = \"\\t\"");
        assert_eq!(
            row(&by_position, "1767225600\t7\tclick\t1.5").unwrap(),
            expected(1_767_225_600, 7, "click", 1.5)
        );
        assert!(split_fields("\"x\"y,z", ",", Some('"')).is_err());
        assert_eq!(split_fields("\"x", ",", None).unwrap(), ["\"x"]);
    }
}
