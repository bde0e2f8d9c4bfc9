//! Debezium change events (`format = "debezium"`), as `chgate cdc` publishes PostgreSQL's
//! changes: this room reads an envelope, checks it against the contract, and says which
//! rows it becomes for the table's engine; `template` encodes those rows' columns.
//!
//! The contract (README, "Applying CDC events"): the Kafka value is the envelope, alone or
//! wrapped as `{"schema": ..., "payload": <envelope>}`; an empty or `null` value is a
//! tombstone (no row). The envelope has `op` (`c` `r` `u` `d` `t`), `before` and `after`
//! (whole rows, or null), and `source.row_version` (the version of the state in `after`,
//! or of the delete) and `source.before_row_version` (the version `before` was written
//! with).
//!
//! Rows per event:
//!
//! | op | `versioned_collapsing` | `replacing` |
//! |---|---|---|
//! | `c`, `r` | `after`, sign +1, row_version | `after`, row_version, deleted 0 |
//! | `u` | `before`, sign -1, before_row_version; then `after`, +1, row_version | `after`, row_version, deleted 0 |
//! | `d` | `before`, sign -1, before_row_version | `before`, row_version, deleted 1 |
//!
//! A `u`'s two rows are one change: they are glued (`sink::Rows`) so ClickHouse takes both
//! or neither. A cancel row equals the state row written for the same version byte for
//! byte, because `before` is the whole previous row and is encoded by the same columns.

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// How the target table makes changes final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// `VersionedCollapsingMergeTree(sign, version)`: a change cancels the previous state
    /// (sign -1) and writes the new one (sign +1).
    VersionedCollapsing,
    /// `ReplacingMergeTree(version)` with a deleted flag: the highest version wins.
    Replacing,
}

/// What a truncate event does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncate {
    /// Dead-lettered with reason `truncate` (the target is not truncated: that would have
    /// to happen on every replica at the right point of the stream).
    #[default]
    DeadLetter,
    /// Skipped.
    Ignore,
}

/// A debezium template's settings, once compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apply {
    pub engine: Engine,
    pub truncate: Truncate,
}

/// Why an event cannot be applied: `kind` is the dead-letter reason (`parse`, `envelope`,
/// `truncate`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub kind: &'static str,
    pub message: String,
}

fn envelope(message: impl Into<String>) -> Refusal {
    Refusal {
        kind: "envelope",
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Read,
    Update,
    Delete,
    Truncate,
}

/// A change event, checked for shape (not yet for what its op needs).
#[derive(Debug)]
pub struct Event {
    pub op: Op,
    pub before: Option<Map<String, Value>>,
    pub after: Option<Map<String, Value>>,
    pub row_version: Option<u64>,
    pub before_row_version: Option<u64>,
    /// `schema.table` from `source`, for messages.
    pub table: String,
}

/// Which of the event's rows a table row is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    Before,
    After,
}

impl Image {
    pub fn name(self) -> &'static str {
        match self {
            Self::Before => "before",
            Self::After => "after",
        }
    }
}

/// One table row of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPlan {
    pub image: Image,
    /// +1 or -1 (`versioned_collapsing`).
    pub sign: i8,
    pub version: u64,
    /// `replacing`: the row is a delete.
    pub deleted: bool,
}

/// The rows of an event, in order: none, one, or a cancel row then a state row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    rows: [RowPlan; 2],
    len: usize,
}

impl Plan {
    const NONE: Plan = Plan {
        rows: [RowPlan {
            image: Image::After,
            sign: 0,
            version: 0,
            deleted: false,
        }; 2],
        len: 0,
    };

    fn of(rows: &[RowPlan]) -> Plan {
        let mut plan = Plan::NONE;
        for (slot, row) in plan.rows.iter_mut().zip(rows) {
            *slot = *row;
        }
        plan.len = rows.len().min(2);
        plan
    }

    pub fn rows(&self) -> &[RowPlan] {
        &self.rows[..self.len]
    }
}

/// The envelope's fields, wherever they sit (top level, or under `payload`). Values the
/// contract fixes are checked by hand, for messages that say what is wrong.
#[derive(Deserialize, Default)]
struct Fields {
    #[serde(default)]
    before: Value,
    #[serde(default)]
    after: Value,
    #[serde(default)]
    source: Option<Source>,
    #[serde(default)]
    op: Value,
}

#[derive(Deserialize, Default)]
struct Source {
    #[serde(default)]
    row_version: Value,
    #[serde(default)]
    before_row_version: Value,
    #[serde(default)]
    schema: Value,
    #[serde(default)]
    table: Value,
}

/// A whole message: the envelope itself, or `{"schema": ..., "payload": envelope}`. The
/// schema is skipped without being built.
#[derive(Deserialize)]
struct Wire {
    #[serde(default, deserialize_with = "present")]
    schema: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Option<Fields>>,
    #[serde(default)]
    before: Value,
    #[serde(default)]
    after: Value,
    #[serde(default)]
    source: Option<Source>,
    #[serde(default)]
    op: Value,
}

/// A key that is there, `null` included (`Some(None)` for an `Option`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An empty value, only whitespace, or JSON `null`: Debezium's tombstone after a delete.
fn is_tombstone(payload: &[u8]) -> bool {
    let text = payload.trim_ascii();
    text.is_empty() || text == b"null"
}

fn row(value: Value, name: &str) -> Result<Option<Map<String, Value>>, Refusal> {
    match value {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(m)),
        other => Err(envelope(format!(
            "{name} is not an object or null: {}",
            short(&other)
        ))),
    }
}

fn version(value: &Value, name: &str) -> Result<Option<u64>, Refusal> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64()),
        other => Err(envelope(format!(
            "source.{name} is not an unsigned 64-bit integer: {}",
            short(other)
        ))),
    }
}

fn short(v: &Value) -> String {
    let text = v.to_string();
    crate::clickhouse::rowbinary::truncate(&text, 64).to_string()
}

impl Event {
    /// The event in a message; `None` for a tombstone (also `{"schema": ..., "payload":
    /// null}`, the same nothing wrapped).
    pub fn parse(payload: &[u8]) -> Result<Option<Event>, Refusal> {
        if is_tombstone(payload) {
            return Ok(None);
        }
        let wire: Wire = serde_json::from_slice(payload).map_err(|e| {
            if e.is_data() {
                envelope(format!("not a Debezium envelope: {e}"))
            } else {
                Refusal {
                    kind: "parse",
                    message: format!("not JSON: {e}"),
                }
            }
        })?;
        let fields = match (wire.schema, wire.payload) {
            (Some(_), Some(None)) => return Ok(None),
            (Some(_), Some(Some(fields))) => fields,
            (None, Some(_)) => {
                return Err(envelope(
                    "a top-level payload without a schema: neither an envelope nor one wrapped with its schema",
                ))
            }
            (_, None) => Fields {
                before: wire.before,
                after: wire.after,
                source: wire.source,
                op: wire.op,
            },
        };
        Self::from_fields(fields).map(Some)
    }

    fn from_fields(f: Fields) -> Result<Event, Refusal> {
        let op = match &f.op {
            Value::String(s) => match s.as_str() {
                "c" => Op::Create,
                "r" => Op::Read,
                "u" => Op::Update,
                "d" => Op::Delete,
                "t" => Op::Truncate,
                other => return Err(envelope(format!("unknown op {:?}", short_str(other)))),
            },
            Value::Null => return Err(envelope("no op")),
            other => return Err(envelope(format!("op is not a string: {}", short(other)))),
        };
        let source = f.source.unwrap_or_default();
        let table = match (&source.schema, &source.table) {
            (Value::String(s), Value::String(t)) => format!("{s}.{t}"),
            (_, Value::String(t)) => t.clone(),
            _ => "(no source.table)".to_string(),
        };
        Ok(Event {
            op,
            before: row(f.before, "before")?,
            after: row(f.after, "after")?,
            row_version: version(&source.row_version, "row_version")?,
            before_row_version: version(&source.before_row_version, "before_row_version")?,
            table,
        })
    }

    /// The rows this event becomes in a table of `apply.engine`.
    pub fn plan(&self, apply: Apply) -> Result<Plan, Refusal> {
        let vc = apply.engine == Engine::VersionedCollapsing;
        let state = |version| RowPlan {
            image: Image::After,
            sign: 1,
            version,
            deleted: false,
        };
        match self.op {
            Op::Create | Op::Read => {
                self.need_after()?;
                Ok(Plan::of(&[state(self.need_row_version()?)]))
            }
            Op::Update => {
                self.need_after()?;
                let (previous, version) = self.need_previous()?;
                let cancel = RowPlan {
                    image: Image::Before,
                    sign: -1,
                    version: previous,
                    deleted: false,
                };
                if vc {
                    Ok(Plan::of(&[cancel, state(version)]))
                } else {
                    Ok(Plan::of(&[state(version)]))
                }
            }
            Op::Delete => {
                let (previous, version) = self.need_previous()?;
                let row = if vc {
                    RowPlan {
                        image: Image::Before,
                        sign: -1,
                        version: previous,
                        deleted: false,
                    }
                } else {
                    RowPlan {
                        image: Image::Before,
                        sign: 1,
                        version,
                        deleted: true,
                    }
                };
                Ok(Plan::of(&[row]))
            }
            Op::Truncate => match apply.truncate {
                Truncate::Ignore => Ok(Plan::NONE),
                Truncate::DeadLetter => Err(Refusal {
                    kind: "truncate",
                    message: format!(
                        "truncate of {}: the target table is not truncated (truncate = \"dead_letter\"); \
                         truncate it on every replica by hand, or set truncate = \"ignore\"",
                        self.table
                    ),
                }),
            },
        }
    }

    /// The row `image` names, for encoding.
    pub fn image(&self, image: Image) -> Option<&Map<String, Value>> {
        match image {
            Image::Before => self.before.as_ref(),
            Image::After => self.after.as_ref(),
        }
    }

    fn op_name(&self) -> &'static str {
        match self.op {
            Op::Create => "c",
            Op::Read => "r",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }

    fn need_after(&self) -> Result<(), Refusal> {
        match self.after {
            Some(_) => Ok(()),
            None => Err(envelope(format!("op {} without after", self.op_name()))),
        }
    }

    fn need_row_version(&self) -> Result<u64, Refusal> {
        self.row_version
            .ok_or_else(|| envelope(format!("op {} without source.row_version", self.op_name())))
    }

    /// A `u` or `d`: its whole previous row, that row's version, and its own version,
    /// which must be above the previous one (a change that does not move the version
    /// forward would collapse with, or lose to, the state it replaces).
    fn need_previous(&self) -> Result<(u64, u64), Refusal> {
        let op = self.op_name();
        if self.before.is_none() {
            return Err(envelope(format!(
                "op {op} without before (the previous row is needed to cancel or replace it)"
            )));
        }
        let previous = self
            .before_row_version
            .ok_or_else(|| envelope(format!("op {op} without source.before_row_version")))?;
        let version = self.need_row_version()?;
        if version <= previous {
            return Err(envelope(format!(
                "op {op}: source.row_version {version} is not above source.before_row_version {previous}"
            )));
        }
        Ok((previous, version))
    }
}

fn short_str(s: &str) -> &str {
    crate::clickhouse::rowbinary::truncate(s, 32)
}

/// The bytes that choose a change's shard with `sharding = "key"`: the Kafka key's
/// primary-key object, compact (the same bytes whether the key came alone or wrapped with
/// its schema, however it was spaced), so every version of a row, its cancel rows
/// included, lands on one shard. A key that is not JSON is taken as it is; no key gives
/// no bytes (every such row on one shard, together).
pub fn shard_key(key: Option<&[u8]>, out: &mut Vec<u8>) {
    out.clear();
    let Some(key) = key else {
        return;
    };
    let value = match serde_json::from_slice::<Value>(key) {
        Ok(Value::Object(mut m)) if m.contains_key("schema") && m.contains_key("payload") => {
            m.remove("payload").unwrap_or(Value::Null)
        }
        Ok(v) => v,
        Err(_) => {
            out.extend_from_slice(key);
            return;
        }
    };
    if serde_json::to_writer(&mut *out, &value).is_err() {
        out.clear();
        out.extend_from_slice(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VC: Apply = Apply {
        engine: Engine::VersionedCollapsing,
        truncate: Truncate::DeadLetter,
    };
    const REPLACING: Apply = Apply {
        engine: Engine::Replacing,
        truncate: Truncate::Ignore,
    };

    fn event(op: &str, before: &str, after: &str, rv: &str, brv: &str) -> String {
        format!(
            r#"{{"before": {before}, "after": {after}, "source": {{"version": "2.7", "connector": "postgresql", "name": "pg", "ts_ms": 1, "snapshot": "false", "db": "demo", "sequence": "[\"1\",\"2\"]", "schema": "public", "table": "orders", "txId": 9, "lsn": 2, "xmin": null, "row_version": {rv}, "before_row_version": {brv}}}, "op": "{op}", "ts_ms": 2, "transaction": null}}"#
        )
    }

    fn plan(msg: &str, apply: Apply) -> Result<Vec<(Image, i8, u64, bool)>, Refusal> {
        let e = Event::parse(msg.as_bytes())?.expect("not a tombstone");
        Ok(e.plan(apply)?
            .rows()
            .iter()
            .map(|r| (r.image, r.sign, r.version, r.deleted))
            .collect())
    }

    use Image::{After, Before};

    #[test]
    fn rows_per_op_for_versioned_collapsing() {
        let a = r#"{"id": 1}"#;
        let b = r#"{"id": 1, "x": 0}"#;
        assert_eq!(
            plan(&event("c", "null", a, "3", "null"), VC),
            Ok(vec![(After, 1, 3, false)])
        );
        assert_eq!(
            plan(&event("r", "null", a, "3", "null"), VC),
            Ok(vec![(After, 1, 3, false)])
        );
        assert_eq!(
            plan(&event("u", b, a, "5", "3"), VC),
            Ok(vec![(Before, -1, 3, false), (After, 1, 5, false)])
        );
        assert_eq!(
            plan(&event("d", b, "null", "7", "5"), VC),
            Ok(vec![(Before, -1, 5, false)])
        );
    }

    #[test]
    fn rows_per_op_for_replacing() {
        let a = r#"{"id": 1}"#;
        let b = r#"{"id": 1, "x": 0}"#;
        assert_eq!(
            plan(&event("c", "null", a, "3", "null"), REPLACING),
            Ok(vec![(After, 1, 3, false)])
        );
        assert_eq!(
            plan(&event("u", b, a, "5", "3"), REPLACING),
            Ok(vec![(After, 1, 5, false)])
        );
        assert_eq!(
            plan(&event("d", b, "null", "7", "5"), REPLACING),
            Ok(vec![(Before, 1, 7, true)])
        );
    }

    #[test]
    fn the_schema_wrapped_form_reads_like_the_payload() {
        let inner = event("u", r#"{"id": 1}"#, r#"{"id": 1}"#, "5", "3");
        let wrapped = format!(
            r#"{{"schema": {{"type": "struct", "fields": [{{"field": "before"}}], "optional": false}}, "payload": {inner}}}"#
        );
        assert_eq!(plan(&wrapped, VC), plan(&inner, VC));
        // The schema may come after the payload.
        let reversed = format!(r#"{{"payload": {inner}, "schema": null}}"#);
        assert_eq!(plan(&reversed, VC), plan(&inner, VC));
        let e = Event::parse(wrapped.as_bytes()).unwrap().unwrap();
        assert_eq!(e.table, "public.orders");
        assert_eq!(e.image(Before).unwrap()["id"], 1);
    }

    #[test]
    fn tombstones_are_nothing() {
        for t in [
            "",
            "  \n",
            "null",
            r#"{"schema": {"type": "struct"}, "payload": null}"#,
        ] {
            assert!(Event::parse(t.as_bytes()).unwrap().is_none(), "{t:?}");
        }
    }

    #[test]
    fn truncate_follows_the_setting() {
        let t = event("t", "null", "null", "null", "null");
        let e = plan(&t, VC).unwrap_err();
        assert_eq!(e.kind, "truncate");
        assert!(e.message.contains("truncate of public.orders"), "{e:?}");
        assert_eq!(plan(&t, REPLACING), Ok(vec![]));
    }

    #[test]
    fn malformed_envelopes_are_refused_with_a_reason() {
        let row = r#"{"id": 1}"#;
        let cases: Vec<(String, &str, &str)> = vec![
            ("{not json".into(), "parse", "not JSON"),
            (r#"{"op": "c"} trailing"#.into(), "parse", "not JSON"),
            ("[1, 2]".into(), "envelope", "not a Debezium envelope"),
            ("42".into(), "envelope", "not a Debezium envelope"),
            (
                r#"{"before": null, "after": {"id": 1}}"#.into(),
                "envelope",
                "no op",
            ),
            (
                event("x", "null", row, "1", "null"),
                "envelope",
                "unknown op \"x\"",
            ),
            (
                r#"{"op": 5, "after": {}}"#.into(),
                "envelope",
                "op is not a string",
            ),
            (
                event("c", "null", "null", "1", "null"),
                "envelope",
                "op c without after",
            ),
            (
                event("c", "null", "[1]", "1", "null"),
                "envelope",
                "after is not an object",
            ),
            (
                event("c", "null", row, "null", "null"),
                "envelope",
                "op c without source.row_version",
            ),
            (
                event("c", "null", row, "-1", "null"),
                "envelope",
                "row_version is not an unsigned",
            ),
            (
                event("c", "null", row, "\"3\"", "null"),
                "envelope",
                "row_version is not an unsigned",
            ),
            (
                event("u", "null", row, "5", "3"),
                "envelope",
                "op u without before",
            ),
            (
                event("u", row, row, "5", "null"),
                "envelope",
                "op u without source.before_row_version",
            ),
            (
                event("u", row, "null", "5", "3"),
                "envelope",
                "op u without after",
            ),
            (
                event("u", row, row, "3", "3"),
                "envelope",
                "row_version 3 is not above source.before_row_version 3",
            ),
            (
                event("d", "null", "null", "5", "3"),
                "envelope",
                "op d without before",
            ),
            (
                event("d", row, "null", "5", "null"),
                "envelope",
                "op d without source.before_row_version",
            ),
            (
                event("d", row, "null", "null", "3"),
                "envelope",
                "op d without source.row_version",
            ),
            (
                r#"{"payload": {"op": "c", "after": {}}}"#.into(),
                "envelope",
                "without a schema",
            ),
            (
                r#"{"op": "c", "op": "c", "after": {}}"#.into(),
                "envelope",
                "duplicate field",
            ),
        ];
        for (msg, kind, text) in cases {
            for apply in [VC, REPLACING] {
                let e = plan(&msg, apply).unwrap_err();
                assert_eq!(e.kind, kind, "{msg}: {e:?}");
                assert!(e.message.contains(text), "{msg}: {e:?}");
            }
        }
    }

    #[test]
    fn the_shard_key_is_the_primary_key_object_however_it_came() {
        let mut out = Vec::new();
        let mut key = |k: Option<&[u8]>| {
            shard_key(k, &mut out);
            String::from_utf8(out.clone()).unwrap()
        };
        assert_eq!(key(Some(br#"{"id":42}"#)), r#"{"id":42}"#);
        assert_eq!(key(Some(br#"{ "id" : 42 }"#)), r#"{"id":42}"#);
        assert_eq!(
            key(Some(
                br#"{"schema": {"type": "struct", "fields": []}, "payload": {"id": 42}}"#
            )),
            r#"{"id":42}"#
        );
        assert_eq!(
            key(Some(br#"{"a": "x", "b": 2}"#)),
            r#"{"a":"x","b":2}"#,
            "a composite key keeps its order"
        );
        assert_eq!(key(Some(b"not json")), "not json");
        assert_eq!(key(None), "");
    }
}
