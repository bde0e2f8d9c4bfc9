//! Format templates: how a message's fields map onto a table's columns, compiled against
//! the table's real column types, and the per-message encoder to RowBinary.
//!
//! - `json`: each column reads a field path (`a.b`, `items[0].id`); unknown fields are
//!   ignored.
//! - `delimited`: fields split by a separator of one or more characters, with optional
//!   quoting (a doubled quote inside a quoted field is a quote); columns read a field by
//!   position or by a name from `fields`. The `csv` crate only splits on one byte, hence
//!   the small splitter here.
//! - `debezium`: a change event becomes 0 to 2 rows (`debezium` says which); each column
//!   reads a field path of the row (`before` or `after`), the engine's sign, version and
//!   deleted columns are written from the event. Numbers in time columns are Debezium's:
//!   microseconds since the epoch for DateTime/DateTime64, days for Date.
//!
//! A column without a mapping reads the field of its own name. A field that is missing
//! takes the column's `default` if the template gives one, else NULL for `Nullable`
//! columns, else the type's zero value (what ClickHouse fills in for a column not sent).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::debezium::{self, Apply, Engine, Event, RowPlan, Truncate};
use crate::clickhouse::rowbinary::{encode, encode_zero, timestamp, truncate, Field, TimeFormat};
use crate::clickhouse::types::ColumnType;
use crate::sink::Rows;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum FormatKind {
    Json,
    Delimited,
    Debezium,
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
    /// Debezium: how the table makes changes final (`versioned_collapsing`, `replacing`).
    #[serde(default)]
    pub engine: Option<Engine>,
    /// Debezium, `versioned_collapsing`: the Int8 column of +1 / -1 (default `sign`).
    #[serde(default)]
    pub sign_column: Option<String>,
    /// Debezium: the UInt64 column of row versions (default `version`).
    #[serde(default)]
    pub version_column: Option<String>,
    /// Debezium, `replacing`: the UInt8 column set to 1 on deletes (default `is_deleted`).
    #[serde(default)]
    pub deleted_column: Option<String>,
    /// Debezium: what a truncate event does (`dead_letter`, the default, or `ignore`).
    #[serde(default)]
    pub truncate: Option<Truncate>,
    /// Debezium: what a row field with a value and no column does (`dead_letter`, the
    /// default; `add`: the column is added to the table; `ignore`).
    #[serde(default)]
    pub new_columns: Option<NewColumns>,
}

/// What a debezium task does with a field of a row image that has a value and no column
/// in the table (a column added in PostgreSQL, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewColumns {
    /// The event is dead-lettered with reason `column`, naming the fields.
    #[default]
    DeadLetter,
    /// The column is added (`Nullable`, its type from the value) to the table on every
    /// replica before the first row that has it is written; see `DESIGN.md`, "New columns".
    Add,
    /// The field is left out.
    Ignore,
}

/// A message's fields that ask for new columns (`new_columns = "add"`): the batcher
/// extends its template with them.
pub const NEW_COLUMNS: &str = "new_columns";

impl TemplateConfig {
    /// Problems of the template's own options, as (option, why) (the columns are checked
    /// against the table by [`Template::compile`], which reports these too).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let debezium_only = [
            ("engine", self.engine.is_some()),
            ("sign_column", self.sign_column.is_some()),
            ("version_column", self.version_column.is_some()),
            ("deleted_column", self.deleted_column.is_some()),
            ("truncate", self.truncate.is_some()),
            ("new_columns", self.new_columns.is_some()),
        ];
        if self.format != FormatKind::Debezium {
            for (key, set) in debezium_only {
                if set {
                    problems.push((key, "only debezium templates take it".to_string()));
                }
            }
            return problems;
        }
        match self.engine {
            None => problems.push((
                "engine",
                "a debezium template needs engine = \"versioned_collapsing\" or \"replacing\""
                    .into(),
            )),
            Some(Engine::VersionedCollapsing) if self.deleted_column.is_some() => problems.push((
                "deleted_column",
                "versioned_collapsing has no deleted column (a delete is a cancel row)".into(),
            )),
            Some(Engine::Replacing) if self.sign_column.is_some() => problems.push((
                "sign_column",
                "replacing has no sign column (a delete sets deleted_column)".into(),
            )),
            Some(_) => {}
        }
        for (key, set) in [
            ("separator", self.separator.is_some()),
            ("fields", !self.fields.is_empty()),
        ] {
            if set {
                problems.push((key, "only delimited templates take it".to_string()));
            }
        }
        problems
    }

    /// The debezium columns the engine writes from the event: (option, name, role).
    fn roles(&self) -> Vec<(&'static str, String, Role)> {
        let name = |set: &Option<String>, default: &str| {
            set.clone().unwrap_or_else(|| default.to_string())
        };
        let version = (
            "version_column",
            name(&self.version_column, "version"),
            Role::Version,
        );
        match self.engine.filter(|_| self.format == FormatKind::Debezium) {
            Some(Engine::VersionedCollapsing) => vec![
                ("sign_column", name(&self.sign_column, "sign"), Role::Sign),
                version,
            ],
            Some(Engine::Replacing) => vec![
                version,
                (
                    "deleted_column",
                    name(&self.deleted_column, "is_deleted"),
                    Role::Deleted,
                ),
            ],
            None => Vec::new(),
        }
    }
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

/// A debezium column the event writes, not a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Sign,
    Version,
    Deleted,
}

impl Role {
    /// The type ClickHouse's engine wants for it.
    fn column_type(self) -> ColumnType {
        match self {
            Role::Sign => ColumnType::Int8,
            Role::Version => ColumnType::UInt64,
            Role::Deleted => ColumnType::UInt8,
        }
    }
}

#[derive(Debug, Clone)]
enum Locator {
    Path(Vec<PathStep>),
    Position(usize),
    Role(Role),
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
    /// Debezium: the engine and what a truncate does.
    debezium: Option<Apply>,
    /// Debezium: the `schema.table` whose events the task applies (its `source_table`);
    /// an event of another table has no target here.
    source_table: Option<String>,
    /// Debezium: what a field with no column does.
    new_columns: NewColumns,
    /// Debezium: the row fields the template reads or leaves out on purpose (a skipped
    /// column's): any other field with a value is new.
    known: std::collections::HashSet<String>,
    /// The columns [`Self::extended`] added, in order (empty for a compiled template).
    pub added: Vec<(String, ColumnType)>,
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

/// The engine's columns must be in the table, with the types the engine needs.
fn check_roles(
    config: &TemplateConfig,
    roles: &[(&'static str, String, Role)],
    table: &[(String, ColumnType)],
    problems: &mut Vec<String>,
) {
    let engine = match config.engine {
        Some(Engine::VersionedCollapsing) => "versioned_collapsing",
        _ => "replacing",
    };
    for (option, name, role) in roles {
        let want = role.column_type();
        match table.iter().find(|(c, _)| c == name) {
            None => problems.push(format!(
                "{option}: the table has no column {name:?} ({engine} writes a {want} column there; \
                 name another with {option})"
            )),
            Some((_, ty)) if *ty != want => problems.push(format!(
                "{option}: column {name} is {ty}; {engine} needs {want} there"
            )),
            Some((_, _)) => {}
        }
        if config.columns.get(name).is_some_and(|m| m.skip) {
            problems.push(format!(
                "columns.{name}.skip: the {option} is written on every row; it cannot be skipped"
            ));
        }
    }
}

/// The column a new field gets from a Debezium schema (`{"type": "struct", "fields": [...
/// {"field": "after", "fields": [{"field": NAME, "type": ..., "name": ...}]}]}`): the
/// logical times as DateTime and Date (their numbers are read as Debezium writes them),
/// integers and floats by width, boolean as UInt8, anything else as String.
fn schema_column(schema: &Value, field: &str) -> Option<ColumnType> {
    let named = |list: &Value, want: &str| -> Option<Value> {
        list.get("fields")?
            .as_array()?
            .iter()
            .find(|f| f.get("field").and_then(Value::as_str) == Some(want))
            .cloned()
    };
    let f = named(schema, "after")
        .and_then(|row| named(&row, field))
        .or_else(|| named(schema, "before").and_then(|row| named(&row, field)))?;
    let inner = match (
        f.get("type").and_then(Value::as_str)?,
        f.get("name").and_then(Value::as_str),
    ) {
        (_, Some("io.debezium.time.MicroTimestamp" | "io.debezium.time.Timestamp"))
        | (_, Some("io.debezium.time.ZonedTimestamp")) => ColumnType::DateTime,
        (_, Some("io.debezium.time.Date")) => ColumnType::Date,
        ("boolean", _) => ColumnType::UInt8,
        ("int8", _) => ColumnType::Int8,
        ("int16", _) => ColumnType::Int16,
        ("int32", _) => ColumnType::Int32,
        ("int64", _) => ColumnType::Int64,
        ("float" | "float32", _) => ColumnType::Float32,
        ("double" | "float64", _) => ColumnType::Float64,
        _ => ColumnType::String,
    };
    Some(ColumnType::Nullable(Box::new(inner)))
}

/// The column a new field gets, from its value (never NULL: that cannot choose a type).
/// `Nullable` so that rows written before the column existed and rows that lack the field
/// read the same (NULL), which keeps a replayed segment's part the same (`DESIGN.md`).
fn column_for(v: &Value) -> ColumnType {
    let inner = match v {
        Value::Bool(_) => ColumnType::UInt8,
        Value::Number(n) if n.is_i64() || n.is_u64() => ColumnType::Int64,
        Value::Number(_) => ColumnType::Float64,
        _ => ColumnType::String,
    };
    ColumnType::Nullable(Box::new(inner))
}

/// How Debezium writes times in JSON: `timestamp` as microseconds since the epoch,
/// `timestamptz` as an ISO-8601 string, `date` as days since the epoch. The number's
/// meaning follows the column's type (looked for through Nullable, Array, LowCardinality).
fn debezium_formats(ty: &ColumnType) -> Vec<TimeFormat> {
    match ty {
        ColumnType::Nullable(t) | ColumnType::Array(t) | ColumnType::LowCardinality(t) => {
            debezium_formats(t)
        }
        ColumnType::Date => vec![
            TimeFormat::UnixDays,
            TimeFormat::Pattern("%Y-%m-%d".into()),
            TimeFormat::Rfc3339,
        ],
        _ => vec![
            TimeFormat::UnixUs,
            TimeFormat::Rfc3339,
            TimeFormat::Pattern("%Y-%m-%d %H:%M:%S%.f".into()),
        ],
    }
}

impl Template {
    /// Compiles `config` against the table's insertable columns (name, type), in table
    /// order. Every problem is returned, keyed by column.
    pub fn compile(
        config: &TemplateConfig,
        table: &[(String, ColumnType)],
    ) -> Result<Self, Vec<String>> {
        let mut problems: Vec<String> = config
            .problems()
            .into_iter()
            .map(|(key, why)| format!("{key}: {why}"))
            .collect();
        let roles = config.roles();
        check_roles(config, &roles, table, &mut problems);
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
            if let Some((option, _, role)) = roles.iter().find(|(_, n, _)| n == name) {
                if config.columns.contains_key(name) {
                    problems.push(format!(
                        "{key}: written from the event ({option}); leave it unmapped"
                    ));
                }
                columns.push(Column {
                    name: name.clone(),
                    ty: ty.clone(),
                    locator: Locator::Role(*role),
                    formats: Vec::new(),
                    default: None,
                });
                continue;
            }
            let locator = match (&config.format, &mapping.path, mapping.index) {
                (FormatKind::Json | FormatKind::Debezium, _, Some(_)) => {
                    problems.push(format!(
                        "{key}.index: only delimited templates map by position"
                    ));
                    continue;
                }
                (FormatKind::Json | FormatKind::Debezium, path, None) => {
                    match parse_path(path.as_deref().unwrap_or(name)) {
                        Ok(p) => Locator::Path(p),
                        Err(e) => {
                            problems.push(format!("{key}.path: {e}"));
                            continue;
                        }
                    }
                }
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
                None if config.format == FormatKind::Debezium => debezium_formats(ty),
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
        let mut known: std::collections::HashSet<String> = top_keys.iter().cloned().collect();
        known.extend(
            config
                .columns
                .iter()
                .filter(|(_, m)| m.skip)
                .map(|(name, _)| name.clone()),
        );
        if problems.is_empty() {
            Ok(Self {
                format: config.format.clone(),
                separator,
                quote,
                columns,
                top_keys,
                top_of,
                debezium: match (&config.format, config.engine) {
                    (FormatKind::Debezium, Some(engine)) => Some(Apply {
                        engine,
                        truncate: config.truncate.unwrap_or_default(),
                    }),
                    _ => None,
                },
                source_table: None,
                new_columns: if config.format == FormatKind::Debezium {
                    config.new_columns.unwrap_or_default()
                } else {
                    NewColumns::Ignore
                },
                known,
                added: Vec::new(),
            })
        } else {
            Err(problems)
        }
    }

    /// Whether a field with no column adds one (`new_columns = "add"`).
    pub fn adds_columns(&self) -> bool {
        self.new_columns == NewColumns::Add
    }

    /// This template with `adds` as more columns (after the table's, as `ALTER TABLE ...
    /// ADD COLUMN` puts them), each reading the row field of its name.
    pub fn extended(&self, adds: &[(String, ColumnType)]) -> Template {
        let mut t = self.clone();
        for (name, ty) in adds {
            if t.known.contains(name) {
                continue;
            }
            t.known.insert(name.clone());
            t.top_keys.push(name.clone());
            t.top_of.push(t.top_keys.len() - 1);
            t.columns.push(Column {
                name: name.clone(),
                ty: ty.clone(),
                locator: Locator::Path(vec![PathStep::Key(name.clone())]),
                formats: debezium_formats(ty),
                default: None,
            });
            t.added.push((name.clone(), ty.clone()));
        }
        t
    }

    /// Debezium: the fields of the event in `payload` that have a value and no column, each
    /// with the type a new column for it gets, always `Nullable`: from the message's schema
    /// when it is wrapped with one (`schema_column`), else from the value (Int64, Float64,
    /// UInt8 for a bool, String for text and JSON objects and arrays). Empty for a message
    /// that is not an event.
    pub fn new_fields(&self, payload: &[u8]) -> Vec<(String, ColumnType)> {
        let Ok(Some(event)) = Event::parse(payload) else {
            return Vec::new();
        };
        let schema: Option<Value> = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|mut v| v.get_mut("schema").map(Value::take));
        self.unknown(&event)
            .into_iter()
            .map(|(name, v)| {
                let ty = schema
                    .as_ref()
                    .and_then(|s| schema_column(s, name))
                    .unwrap_or_else(|| column_for(v));
                (name.to_string(), ty)
            })
            .collect()
    }

    /// The fields of the event's row images that have a value and no column, in order.
    /// A field named like a column chgate fills from the event (the engine's sign,
    /// version, deleted flag) is not one: that column exists, and cannot be added.
    fn unknown<'e>(&self, event: &'e Event) -> Vec<(&'e str, &'e Value)> {
        let mut out: Vec<(&str, &Value)> = Vec::new();
        for (k, v) in Self::fields(event) {
            if !v.is_null()
                && !self.known.contains(k)
                && self.engine_column(k).is_none()
                && !out.iter().any(|(n, _)| *n == k)
            {
                out.push((k, v));
            }
        }
        out
    }

    /// Every field of the event's row images, before's then after's.
    fn fields(event: &Event) -> impl Iterator<Item = (&str, &Value)> {
        [event.before.as_ref(), event.after.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|image| image.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The column of this name that chgate writes from the event, if there is one.
    fn engine_column(&self, name: &str) -> Option<&Column> {
        self.columns
            .iter()
            .find(|c| c.name == name && matches!(c.locator, Locator::Role(_)))
    }

    /// A field with a value whose name is one of the engine's columns: its value has
    /// nowhere to go.
    fn clashing<'e>(&self, event: &'e Event) -> Option<&'e str> {
        Self::fields(event)
            .find(|(k, v)| {
                !v.is_null() && !self.known.contains(*k) && self.engine_column(k).is_some()
            })
            .map(|(k, _)| k)
    }

    /// Debezium: applies only events of `table` (`schema.table`); others are refused with
    /// reason `table`.
    pub fn only_from(mut self, table: Option<String>) -> Self {
        self.source_table = table;
        self
    }

    /// The column list for `INSERT INTO t (...) FORMAT RowBinary`.
    pub fn insert_columns(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("`{}`", c.name.replace('`', "\\`")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A debezium template's engine and truncate setting.
    pub fn debezium(&self) -> Option<Apply> {
        self.debezium
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
            FormatKind::Debezium => Err(RowError::new(
                "parse",
                "a debezium template makes 0 to 2 rows of a message: encode_rows".into(),
            )),
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// Appends the rows one message becomes to `out`, and says how many: one for `json`
    /// and `delimited`; for `debezium` none (a tombstone, an ignored truncate), one, or a
    /// cancel row glued to a state row. On error `out` is left as it was. `key` receives
    /// what chooses the shard: the `key_column`'s text, or for `debezium` the message
    /// key's primary key (`debezium::shard_key`).
    pub fn encode_rows(
        &self,
        message_key: Option<&[u8]>,
        payload: &[u8],
        out: &mut Rows,
        window: Option<Window>,
        key_column: Option<usize>,
        key: &mut Vec<u8>,
    ) -> Result<usize, RowError> {
        let Some(apply) = self.debezium else {
            self.encode_row(payload, &mut out.data, window, key_column, key)?;
            out.end_row();
            return Ok(1);
        };
        debezium::shard_key(message_key, key);
        let refused = |r: debezium::Refusal| RowError::new(r.kind, r.message);
        let Some(event) = Event::parse(payload).map_err(refused)? else {
            return Ok(0);
        };
        if let Some(want) = self.source_table.as_deref().filter(|w| *w != event.table) {
            return Err(RowError::new(
                "table",
                format!(
                    "an event of {}, and this task applies {want} (source_table): no target for it",
                    event.table
                ),
            ));
        }
        let plan = event.plan(apply).map_err(refused)?;
        if self.new_columns != NewColumns::Ignore && !plan.rows().is_empty() {
            if let Some(field) = self.clashing(&event) {
                return Err(RowError::new(
                    "column",
                    format!(
                        "{} has a field {field}, and the table's column {field} is the one chgate fills from the event \
                         (the engine's sign, version or deleted flag): the field's value has nowhere to go. \
                         Give the engine's columns names no source column has (such as _{field}), or set new_columns = \"ignore\"",
                        event.table
                    ),
                ));
            }
            let unknown = self.unknown(&event);
            if !unknown.is_empty() {
                let names: Vec<&str> = unknown.iter().map(|(n, _)| *n).collect();
                return Err(match self.new_columns {
                    NewColumns::Add => RowError::new(NEW_COLUMNS, names.join(", ")),
                    _ => RowError::new(
                        "column",
                        format!(
                            "{} has field(s) {} with no column in the table (new_columns = \"dead_letter\"): \
                             add the columns on every replica and restart the sidecar, or set new_columns = \"add\" or \"ignore\"",
                            event.table,
                            names.join(", ")
                        ),
                    ),
                });
            }
        }
        let rows = plan.rows();
        let start = out.rows();
        for (i, row) in rows.iter().enumerate() {
            if let Err(e) = self.encode_change_row(&event, row, &mut out.data) {
                out.truncate(start);
                return Err(e);
            }
            // A change's rows go in together (a cancel row without its state row, or the
            // reverse, would leave the key wrong).
            if i + 1 < rows.len() {
                out.end_row_glued();
            } else {
                out.end_row();
            }
        }
        Ok(rows.len())
    }

    /// One row of a change: the engine's columns from the plan, the others from the row
    /// image's fields.
    fn encode_change_row(
        &self,
        event: &Event,
        row: &RowPlan,
        out: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        let image = event.image(row.image);
        for (i, c) in self.columns.iter().enumerate() {
            let path = match &c.locator {
                Locator::Role(Role::Sign) => {
                    out.extend_from_slice(&row.sign.to_le_bytes());
                    continue;
                }
                Locator::Role(Role::Version) => {
                    out.extend_from_slice(&row.version.to_le_bytes());
                    continue;
                }
                Locator::Role(Role::Deleted) => {
                    out.push(u8::from(row.deleted));
                    continue;
                }
                Locator::Path(path) => path,
                Locator::Position(_) => unreachable!("debezium columns are compiled with paths"),
            };
            let mut at: Option<&Value> = None;
            for (n, step) in path.iter().enumerate() {
                at = match (n, at, step) {
                    (0, _, PathStep::Key(k)) => image.and_then(|m| m.get(k)),
                    (_, Some(Value::Object(m)), PathStep::Key(k)) => m.get(k),
                    (_, Some(Value::Array(a)), PathStep::Index(i)) => a.get(*i),
                    _ => None,
                };
            }
            let v = at.map_or(Field::Missing, Field::Json);
            self.value(i, v, out).map_err(|e| RowError {
                kind: e.kind,
                message: format!("{}: {}", row.image.name(), e.message),
            })?;
        }
        Ok(())
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
        self.value(i, v, out)
    }

    /// Column `i`'s value `v` (its default, NULL or zero when missing).
    fn value(&self, i: usize, v: Field<'_>, out: &mut Vec<u8>) -> Result<(), RowError> {
        let c = &self.columns[i];
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

    fn columns(spec: &[&str]) -> Vec<(String, ColumnType)> {
        spec.iter()
            .map(|s| {
                let (n, t) = s.split_once(' ').unwrap();
                (n.to_string(), ColumnType::parse(t).unwrap())
            })
            .collect()
    }

    /// The quickstart's demo.orders_local.
    fn orders() -> Vec<(String, ColumnType)> {
        columns(&[
            "id Int64",
            "customer_id Nullable(Int64)",
            "status Nullable(String)",
            "amount Nullable(Decimal(12, 2))",
            "note Nullable(String)",
            "updated_at Nullable(DateTime)",
            "sign Int8",
            "version UInt64",
        ])
    }

    /// The quickstart's demo.customers_local.
    fn customers() -> Vec<(String, ColumnType)> {
        columns(&[
            "id Int64",
            "name Nullable(String)",
            "email Nullable(String)",
            "updated_at Nullable(DateTime)",
            "version UInt64",
            "is_deleted UInt8",
        ])
    }

    fn debezium(text: &str, table: &[(String, ColumnType)]) -> Template {
        let c: TemplateConfig = toml::from_str(text).unwrap();
        Template::compile(&c, table).unwrap_or_else(|p| panic!("{p:?}"))
    }

    const ORDER_1: &str = r#"{"id": 1, "customer_id": 7, "status": "new", "amount": "12.50", "note": null, "updated_at": "2026-12-05T19:00:00.123456Z"}"#;
    const ORDER_1_PAID: &str = r#"{"id": 1, "customer_id": 7, "status": "paid", "amount": "12.50", "note": "ok", "updated_at": 1796497260000000}"#;

    fn envelope(op: &str, before: &str, after: &str, rv: &str, brv: &str) -> String {
        format!(
            r#"{{"before": {before}, "after": {after}, "source": {{"version": "2.7", "connector": "postgresql", "name": "pg", "ts_ms": 1, "snapshot": "false", "db": "demo", "sequence": "[\"1\",\"2\"]", "schema": "public", "table": "orders", "txId": 9, "lsn": 2, "xmin": null, "row_version": {rv}, "before_row_version": {brv}}}, "op": "{op}", "ts_ms": 2, "transaction": null}}"#
        )
    }

    /// An orders row as RowBinary: (id, customer, status, cents, note, updated_at).
    fn order_row(o: (i64, i64, &str, i64, Option<&str>, u32), sign: i8, version: u64) -> Vec<u8> {
        let mut v = o.0.to_le_bytes().to_vec();
        v.push(0);
        v.extend(o.1.to_le_bytes());
        v.extend([0, o.2.len() as u8]);
        v.extend(o.2.as_bytes());
        v.push(0);
        v.extend(o.3.to_le_bytes());
        match o.4 {
            None => v.push(1),
            Some(n) => {
                v.extend([0, n.len() as u8]);
                v.extend(n.as_bytes());
            }
        }
        v.push(0);
        v.extend(o.5.to_le_bytes());
        v.extend(sign.to_le_bytes());
        v.extend(version.to_le_bytes());
        v
    }

    const NEW: (i64, i64, &str, i64, Option<&str>, u32) = (1, 7, "new", 1250, None, 1_796_497_200);
    const PAID: (i64, i64, &str, i64, Option<&str>, u32) =
        (1, 7, "paid", 1250, Some("ok"), 1_796_497_260);

    /// Rows as RowBinary, each with whether it is glued to the next.
    type Glued = Vec<(Vec<u8>, bool)>;

    /// The rows a message becomes, and the shard key.
    fn changes(t: &Template, key: Option<&str>, msg: &str) -> Result<(Glued, String), RowError> {
        let mut out = Rows::default();
        let mut shard_key = Vec::new();
        let n = t.encode_rows(
            key.map(str::as_bytes),
            msg.as_bytes(),
            &mut out,
            None,
            None,
            &mut shard_key,
        )?;
        assert_eq!(n, out.rows());
        let rows = (0..n)
            .map(|i| (out.slice(i, i + 1).to_vec(), out.glued.contains(&i)))
            .collect();
        Ok((rows, String::from_utf8(shard_key).unwrap()))
    }

    #[test]
    fn debezium_versioned_collapsing_rows_per_op() {
        let t = debezium(
            "format = \"debezium\"\nengine = \"versioned_collapsing\"",
            &orders(),
        );
        assert_eq!(
            t.insert_columns(),
            "`id`, `customer_id`, `status`, `amount`, `note`, `updated_at`, `sign`, `version`"
        );
        let key = Some(r#"{"id":1}"#);
        let (c, shard) = changes(&t, key, &envelope("c", "null", ORDER_1, "10", "null")).unwrap();
        assert_eq!(c, [(order_row(NEW, 1, 10), false)]);
        assert_eq!(shard, r#"{"id":1}"#);
        let (r, _) = changes(&t, key, &envelope("r", "null", ORDER_1, "10", "null")).unwrap();
        assert_eq!(r, c, "a snapshot read is an insert");
        // The cancel row is the state row written for version 10, with sign -1.
        let (u, _) = changes(&t, key, &envelope("u", ORDER_1, ORDER_1_PAID, "11", "10")).unwrap();
        assert_eq!(
            u,
            [
                (order_row(NEW, -1, 10), true),
                (order_row(PAID, 1, 11), false)
            ]
        );
        let (d, _) = changes(&t, key, &envelope("d", ORDER_1_PAID, "null", "12", "11")).unwrap();
        assert_eq!(d, [(order_row(PAID, -1, 11), false)]);
        // Wrapped with its schema (key too): the same rows, the same shard key.
        let wrapped = format!(
            r#"{{"schema": {{"type": "struct", "optional": false, "name": "pg.public.orders.Envelope"}}, "payload": {}}}"#,
            envelope("u", ORDER_1, ORDER_1_PAID, "11", "10")
        );
        let wrapped_key = r#"{"schema": {"type": "struct", "fields": [{"field": "id", "type": "int64"}]}, "payload": {"id": 1}}"#;
        assert_eq!(
            changes(&t, Some(wrapped_key), &wrapped).unwrap(),
            (u, r#"{"id":1}"#.to_string())
        );
    }

    /// A source row with a field named like the engine's column (`version`, as a JPA
    /// `@Version` column is): never asked for as a new column (ALTER ... ADD of an existing
    /// column, then an INSERT naming it twice, stalled every partition), but refused with a
    /// reason saying what clashes, in `add` and `dead_letter` modes alike.
    #[test]
    fn debezium_a_field_named_like_an_engine_column() {
        let with_version = r#"{"id": 1, "customer_id": 7, "status": "paid", "amount": "12.50", "note": "ok", "updated_at": 1796497260000000, "version": 4}"#;
        let u = envelope("u", ORDER_1, with_version, "11", "10");
        let key = Some(r#"{"id":1}"#);
        let vc = "format = \"debezium\"\nengine = \"versioned_collapsing\"\n";
        for mode in ["dead_letter", "add"] {
            let t = debezium(&format!("{vc}new_columns = \"{mode}\""), &orders());
            assert!(t.new_fields(u.as_bytes()).is_empty(), "{mode}");
            let e = changes(&t, key, &u).unwrap_err();
            assert_eq!(e.kind, "column", "{mode}");
            assert!(
                e.message
                    .contains("the table's column version is the one chgate fills"),
                "{mode}: {}",
                e.message
            );
        }
        let ignoring = debezium(&format!("{vc}new_columns = \"ignore\""), &orders());
        assert!(changes(&ignoring, key, &u).is_ok());
    }

    /// An orders row with a field the table has no column for: dead-lettered by default
    /// (naming the field), left out with `ignore`, and with `add` asked for as a new
    /// Nullable column; the extended template then writes it after the table's columns,
    /// and NULL where an image lacks it (a row from before the column).
    #[test]
    fn debezium_new_columns_by_mode() {
        let with_priority = r#"{"id": 1, "customer_id": 7, "status": "paid", "amount": "12.50", "note": "ok", "updated_at": 1796497260000000, "priority": 3, "gone": null}"#;
        let u = envelope("u", ORDER_1, with_priority, "11", "10");
        let key = Some(r#"{"id":1}"#);
        let vc = "format = \"debezium\"\nengine = \"versioned_collapsing\"\n";

        let strict = debezium(vc, &orders());
        let e = changes(&strict, key, &u).unwrap_err();
        assert_eq!(e.kind, "column");
        assert!(
            e.message
                .contains("public.orders has field(s) priority with no column"),
            "{}",
            e.message
        );

        let ignoring = debezium(&format!("{vc}new_columns = \"ignore\""), &orders());
        assert_eq!(
            changes(&ignoring, key, &u).unwrap().0,
            [
                (order_row(NEW, -1, 10), true),
                (order_row(PAID, 1, 11), false)
            ]
        );

        let adding = debezium(&format!("{vc}new_columns = \"add\""), &orders());
        assert!(adding.adds_columns());
        assert_eq!(changes(&adding, key, &u).unwrap_err().kind, NEW_COLUMNS);
        // A field whose only value is NULL asks for nothing (its type is unknown, and
        // NULL is what the table gives a row without it anyway).
        let adds = adding.new_fields(u.as_bytes());
        let nullable_int = ColumnType::parse("Nullable(Int64)").unwrap();
        assert_eq!(adds, [("priority".to_string(), nullable_int)]);
        let wider = adding.extended(&adds);
        assert_eq!(
            wider.insert_columns(),
            "`id`, `customer_id`, `status`, `amount`, `note`, `updated_at`, `sign`, `version`, `priority`"
        );
        let mut cancel = order_row(NEW, -1, 10);
        cancel.push(1);
        let mut state = order_row(PAID, 1, 11);
        state.extend([0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            changes(&wider, key, &u).unwrap().0,
            [(cancel, true), (state, false)]
        );
        // Wrapped with its schema, the schema says: a timestamp is a DateTime, not the
        // Int64 its microseconds would make.
        let wrapped = format!(
            r#"{{"schema": {{"type": "struct", "fields": [{{"field": "after", "type": "struct", "fields": [
                {{"field": "priority", "type": "int32", "optional": true}},
                {{"field": "seen", "type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp"}}]}}]}},
                "payload": {}}}"#,
            envelope(
                "c",
                "null",
                r#"{"id": 1, "priority": 3, "seen": 1796497260000000}"#,
                "1",
                "null"
            )
        );
        let typed: Vec<String> = adding
            .new_fields(wrapped.as_bytes())
            .into_iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect();
        assert_eq!(
            typed,
            ["priority Nullable(Int32)", "seen Nullable(DateTime)"]
        );
        // Other types follow the value.
        let more = r#"{"id": 1, "flag": true, "ratio": 0.5, "tags": ["a"], "label": "x"}"#;
        let types: Vec<String> = adding
            .new_fields(envelope("c", "null", more, "1", "null").as_bytes())
            .into_iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect();
        assert_eq!(
            types,
            [
                "flag Nullable(UInt8)",
                "ratio Nullable(Float64)",
                "tags Nullable(String)",
                "label Nullable(String)"
            ]
        );
    }

    #[test]
    fn debezium_replacing_rows_per_op() {
        let t = debezium(
            "format = \"debezium\"\nengine = \"replacing\"",
            &customers(),
        );
        let ann = r#"{"id": 3, "name": "Ann", "email": null, "updated_at": null}"#;
        let ann2 = r#"{"id": 3, "name": "Ann B", "email": "a@b", "updated_at": 0}"#;
        let row = |name: &str, email: Option<&str>, at: Option<u32>, version: u64, deleted: u8| {
            let mut v = 3i64.to_le_bytes().to_vec();
            v.extend([0, name.len() as u8]);
            v.extend(name.as_bytes());
            match email {
                None => v.push(1),
                Some(e) => {
                    v.extend([0, e.len() as u8]);
                    v.extend(e.as_bytes());
                }
            }
            match at {
                None => v.push(1),
                Some(s) => {
                    v.push(0);
                    v.extend(s.to_le_bytes());
                }
            }
            v.extend(version.to_le_bytes());
            v.push(deleted);
            v
        };
        let key = Some(r#"{"id":3}"#);
        let one = |msg: String| changes(&t, key, &msg).unwrap().0;
        assert_eq!(
            one(envelope("c", "null", ann, "5", "null")),
            [(row("Ann", None, None, 5, 0), false)]
        );
        assert_eq!(
            one(envelope("u", ann, ann2, "6", "5")),
            [(row("Ann B", Some("a@b"), Some(0), 6, 0), false)]
        );
        assert_eq!(
            one(envelope("d", ann2, "null", "7", "6")),
            [(row("Ann B", Some("a@b"), Some(0), 7, 1), false)],
            "a delete: the last row, the delete's version, deleted"
        );
    }

    #[test]
    fn debezium_tombstones_and_truncates() {
        let vc = debezium(
            "format = \"debezium\"\nengine = \"versioned_collapsing\"",
            &orders(),
        );
        for tombstone in ["", "null"] {
            assert_eq!(
                changes(&vc, Some(r#"{"id":1}"#), tombstone).unwrap(),
                (vec![], r#"{"id":1}"#.to_string())
            );
        }
        let truncate = envelope("t", "null", "null", "null", "null");
        let e = changes(&vc, None, &truncate).unwrap_err();
        assert_eq!(e.kind, "truncate");
        let ignoring = debezium(
            "format = \"debezium\"\nengine = \"versioned_collapsing\"\ntruncate = \"ignore\"",
            &orders(),
        );
        assert_eq!(changes(&ignoring, None, &truncate).unwrap().0, vec![]);
    }

    #[test]
    fn debezium_values_that_do_not_fit_refuse_the_whole_change() {
        let t = debezium(
            "format = \"debezium\"\nengine = \"versioned_collapsing\"",
            &orders(),
        );
        let bad_after = ORDER_1_PAID.replace("\"12.50\"", "\"12.505\"");
        let mut out = Rows::default();
        let mut key = Vec::new();
        // Something already in the part stays as it was.
        t.encode_rows(
            None,
            envelope("c", "null", ORDER_1, "1", "null").as_bytes(),
            &mut out,
            None,
            None,
            &mut key,
        )
        .unwrap();
        let before = out.clone();
        let e = t
            .encode_rows(
                None,
                envelope("u", ORDER_1, &bad_after, "2", "1").as_bytes(),
                &mut out,
                None,
                None,
                &mut key,
            )
            .unwrap_err();
        assert_eq!(e.kind, "type");
        assert_eq!(
            e.message,
            "after: column amount: \"12.505\" has more decimal places than Decimal(12, 2)"
        );
        assert_eq!(
            (out.data, out.row_ends, out.glued),
            (before.data, before.row_ends, before.glued),
            "the cancel row, already encoded, is taken back"
        );
        let bad_before = ORDER_1.replace("\"customer_id\": 7", "\"customer_id\": \"x\"");
        let e = changes(&t, None, &envelope("d", &bad_before, "null", "2", "1")).unwrap_err();
        assert_eq!(e.kind, "type");
        assert!(
            e.message.starts_with("before: column customer_id:"),
            "{e:?}"
        );
        let no_id = r#"{"status": "new"}"#;
        assert_eq!(
            changes(&t, None, &envelope("c", "null", no_id, "1", "null"))
                .unwrap()
                .0[0]
                .0[..8],
            [0; 8],
            "a missing non-Nullable field is its type's zero, as for json"
        );
        for (msg, kind) in [
            ("{oops".to_string(), "parse"),
            (envelope("u", "null", ORDER_1, "2", "1"), "envelope"),
            (envelope("d", ORDER_1, "null", "2", "null"), "envelope"),
            (envelope("z", ORDER_1, "null", "2", "1"), "envelope"),
            (r#"{"after": {"id": 1}}"#.to_string(), "envelope"),
        ] {
            assert_eq!(changes(&t, None, &msg).unwrap_err().kind, kind, "{msg}");
        }
    }

    #[test]
    fn debezium_columns_can_be_renamed_and_defaulted_and_times_follow_debezium() {
        let table = columns(&[
            "id Int64",
            "state String",
            "day Date",
            "at DateTime",
            "origin String",
            "computed UInt8",
            "sign Int8",
            "v UInt64",
        ]);
        let t = debezium(
            r#"
            format = "debezium"
            engine = "versioned_collapsing"
            version_column = "v"
            [columns.state]
            path = "status"
            [columns.origin]
            default = "pg"
            [columns.computed]
            skip = true
            "#,
            &table,
        );
        assert_eq!(
            t.insert_columns(),
            "`id`, `state`, `day`, `at`, `origin`, `sign`, `v`"
        );
        let after = r#"{"id": 2, "status": "x", "day": 20792, "at": 1796497200123456}"#;
        let (rows, _) = changes(&t, None, &envelope("c", "null", after, "4", "null")).unwrap();
        let mut want = 2i64.to_le_bytes().to_vec();
        want.extend([1, b'x']);
        want.extend(20_792u16.to_le_bytes());
        want.extend(1_796_497_200u32.to_le_bytes());
        want.extend([2, b'p', b'g', 1]);
        want.extend(4u64.to_le_bytes());
        assert_eq!(rows, [(want, false)]);
        for at in [
            "2026-12-05T19:00:00Z",
            "2026-12-05T19:00:00.999999Z",
            "2026-12-05 19:00:00",
            "2026-12-05 19:00:00.25",
        ] {
            let iso = format!(r#"{{"id": 2, "status": "x", "day": "2026-12-05", "at": "{at}"}}"#);
            assert_eq!(
                changes(&t, None, &envelope("c", "null", &iso, "4", "null"))
                    .unwrap()
                    .0,
                rows,
                "{at}"
            );
        }
    }

    #[test]
    fn debezium_events_of_another_table_are_refused_when_the_task_names_its_table() {
        let table = columns(&["id Int64", "sign Int8", "version UInt64"]);
        let text = r#"
            format = "debezium"
            engine = "versioned_collapsing"
        "#;
        let after = r#"{"id": 3}"#;
        let orders = envelope("c", "null", after, "4", "null");
        let invoices = orders.replace(r#""table": "orders""#, r#""table": "invoices""#);
        // Unset: not checked.
        let any = debezium(text, &table);
        assert!(changes(&any, None, &invoices).is_ok());
        let only = debezium(text, &table).only_from(Some("public.orders".into()));
        assert_eq!(changes(&only, None, &orders).unwrap().0.len(), 1);
        let e = changes(&only, None, &invoices).unwrap_err();
        assert_eq!(e.kind, "table");
        assert!(
            e.message.contains("public.invoices") && e.message.contains("public.orders"),
            "{}",
            e.message
        );
        // A tombstone has no table to check and no row.
        assert_eq!(changes(&only, None, "").unwrap().0.len(), 0);
    }

    #[test]
    fn debezium_compile_errors_name_the_option() {
        let problems = |text: &str, table: &[(String, ColumnType)]| {
            let c: TemplateConfig = toml::from_str(text).unwrap();
            Template::compile(&c, table).unwrap_err()
        };
        let vc = "format = \"debezium\"\nengine = \"versioned_collapsing\"\n";
        let no_sign = columns(&["id Int64", "version UInt64"]);
        let p = problems(vc, &no_sign);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("sign_column: the table has no column \"sign\""),
            "{p:?}"
        );
        let wrong = columns(&["id Int64", "sign Int16", "version UInt32"]);
        let p = problems(vc, &wrong);
        assert_eq!(
            p,
            [
                "sign_column: column sign is Int16; versioned_collapsing needs Int8 there",
                "version_column: column version is UInt32; versioned_collapsing needs UInt64 there"
            ]
        );
        let p = problems(
            &format!("{vc}sign_column = \"s\"\ndeleted_column = \"d\"\n[columns.version]\npath = \"v\"\n[columns.id]\nindex = 0"),
            &orders(),
        );
        assert!(
            p.iter()
                .any(|p| p.starts_with("deleted_column: versioned_collapsing has no")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.starts_with("sign_column: the table has no column \"s\"")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.starts_with("columns.version: written from the event (version_column)")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|p| p.starts_with("columns.id.index:")),
            "{p:?}"
        );
        let p = problems(
            "format = \"debezium\"\nengine = \"replacing\"\n[columns.is_deleted]\nskip = true",
            &customers(),
        );
        assert_eq!(p, ["columns.is_deleted.skip: the deleted_column is written on every row; it cannot be skipped"]);
        let p = problems("format = \"debezium\"\nengine = \"replacing\"", &orders());
        assert!(
            p[0].starts_with("deleted_column: the table has no column \"is_deleted\""),
            "{p:?}"
        );
        let p = problems("format = \"debezium\"", &orders());
        assert!(
            p[0].starts_with("engine: a debezium template needs engine"),
            "{p:?}"
        );
        let p = problems(
            "format = \"json\"\nengine = \"replacing\"\ntruncate = \"ignore\"",
            &table(),
        );
        assert_eq!(
            p,
            [
                "engine: only debezium templates take it",
                "truncate: only debezium templates take it"
            ]
        );
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
