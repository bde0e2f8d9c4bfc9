//! Debezium's event envelope, as its PostgreSQL connector writes it with the JSON converter:
//! the key is the primary key as a JSON object, the value
//! `{before, after, source, op, ts_ms, transaction}`; both payload-only, or wrapped in
//! `{"schema": ..., "payload": ...}` with `with_schema`.
//!
//! chgate adds two fields to `source` (Debezium's `source` block is connector-specific, and
//! consumers ignore fields they do not know): `row_version`, the version of the row state in
//! `after` (for a delete, of the delete itself), and `before_row_version`, the version the
//! `before` row was published with. A version is the LSN of the change's WAL record (a
//! snapshot row's is the LSN the snapshot is consistent with): the same on every replay,
//! increasing along each row's history, and one UInt64, so it is ClickHouse's
//! VersionedCollapsingMergeTree or ReplacingMergeTree version as it is.

use serde_json::{json, Map, Value};

use super::catalog::TableSchema;

/// What `source` says about an event.
#[derive(Debug, Clone)]
pub struct Source {
    pub commit_ts_ms: i64,
    /// `"true"`, `"last"` (the last row of a snapshot) or `"false"`.
    pub snapshot: &'static str,
    pub tx_id: Option<u32>,
    pub lsn: Option<u64>,
    /// The last commit before the event's transaction, and the event's own LSN:
    /// Debezium's `sequence`.
    pub commit_lsn: Option<u64>,
    pub row_version: u64,
    pub before_row_version: Option<u64>,
}

/// Everything fixed per table: names, and the schemas `with_schema` sends.
pub struct TableEnvelope {
    pub server: String,
    pub db: String,
    pub schema: String,
    pub table: String,
    pub key_columns: Vec<String>,
    key_schema: Value,
    value_schema: Value,
}

impl TableEnvelope {
    pub fn new(server: &str, db: &str, t: &TableSchema, topic: &str) -> Self {
        let field = |c: &super::catalog::Column, optional: bool| {
            let kind = &c.kind;
            let mut f = json!({"type": kind.schema_type(), "optional": optional, "field": c.name});
            if let super::value::Kind::Array(e) = kind {
                f["items"] = json!({"type": e.schema_type(), "optional": true});
            }
            if let Some(name) = kind.schema_name() {
                f["name"] = json!(name);
            }
            f
        };
        let key_fields: Vec<Value> = t.key.iter().map(|&i| field(&t.columns[i], false)).collect();
        let value_fields: Vec<Value> = t
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| field(c, !t.key.contains(&i)))
            .collect();
        let row = |name: &str| {
            json!({"type": "struct", "fields": value_fields, "optional": true,
                   "name": format!("{topic}.Value"), "field": name})
        };
        let source = json!({"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source", "fields": [
            {"type": "string", "optional": false, "field": "version"},
            {"type": "string", "optional": false, "field": "connector"},
            {"type": "string", "optional": false, "field": "name"},
            {"type": "int64", "optional": false, "field": "ts_ms"},
            {"type": "string", "optional": true, "field": "snapshot"},
            {"type": "string", "optional": false, "field": "db"},
            {"type": "string", "optional": true, "field": "sequence"},
            {"type": "string", "optional": false, "field": "schema"},
            {"type": "string", "optional": false, "field": "table"},
            {"type": "int64", "optional": true, "field": "txId"},
            {"type": "int64", "optional": true, "field": "lsn"},
            {"type": "int64", "optional": true, "field": "xmin"},
            {"type": "int64", "optional": false, "field": "row_version"},
            {"type": "int64", "optional": true, "field": "before_row_version"}
        ]});
        Self {
            server: server.into(),
            db: db.into(),
            schema: t.schema.clone(),
            table: t.name.clone(),
            key_columns: t.key.iter().map(|&i| t.columns[i].name.clone()).collect(),
            key_schema: json!({"type": "struct", "fields": key_fields, "optional": false,
                               "name": format!("{topic}.Key")}),
            value_schema: json!({"type": "struct", "optional": false,
                "name": format!("{topic}.Envelope"), "fields": [
                row("before"), row("after"), source,
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"}
            ]}),
        }
    }

    /// The key of a row: its primary key columns, in key order. `None` if the row lacks
    /// one of them.
    pub fn key(&self, row: &Map<String, Value>) -> Option<Map<String, Value>> {
        self.key_columns
            .iter()
            .map(|c| row.get(c).map(|v| (c.clone(), v.clone())))
            .collect()
    }

    /// The key as published (and as the store keys rows).
    pub fn key_bytes(&self, key: &Map<String, Value>, with_schema: bool) -> Vec<u8> {
        let payload = Value::Object(key.clone());
        let v = if with_schema {
            json!({"schema": self.key_schema, "payload": payload})
        } else {
            payload
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The event's value.
    pub fn value(
        &self,
        op: char,
        before: Option<Value>,
        after: Option<Value>,
        source: &Source,
        with_schema: bool,
    ) -> Vec<u8> {
        let sequence = match (source.commit_lsn, source.lsn) {
            (Some(c), Some(l)) => Value::String(format!("[\"{c}\",\"{l}\"]")),
            _ => Value::Null,
        };
        let payload = json!({
            "before": before.unwrap_or(Value::Null),
            "after": after.unwrap_or(Value::Null),
            "source": {
                "version": concat!("chgate-", env!("CARGO_PKG_VERSION")),
                "connector": "postgresql",
                "name": self.server,
                "ts_ms": source.commit_ts_ms,
                "snapshot": source.snapshot,
                "db": self.db,
                "sequence": sequence,
                "schema": self.schema,
                "table": self.table,
                "txId": source.tx_id,
                "lsn": source.lsn,
                "xmin": Value::Null,
                "row_version": source.row_version,
                "before_row_version": source.before_row_version,
            },
            "op": op.to_string(),
            "ts_ms": now_ms(),
            "transaction": Value::Null,
        });
        let v = if with_schema {
            json!({"schema": self.value_schema, "payload": payload})
        } else {
            payload
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) in Unix milliseconds.
pub fn pg_ts_to_unix_ms(ts: i64) -> i64 {
    ts / 1000 + 946_684_800_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::catalog::Column;
    use crate::cdc::value::Kind;

    fn table() -> TableSchema {
        TableSchema {
            schema: "public".into(),
            name: "orders".into(),
            oid: 1,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_name: "bigint".into(),
                    kind: Kind::Int,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    type_name: "text".into(),
                    kind: Kind::Text,
                },
            ],
            key: vec![0],
            replica_identity: 'd',
        }
    }

    #[test]
    fn the_envelope_has_debeziums_shape() {
        let e = TableEnvelope::new("pg", "demo", &table(), "pg.public.orders");
        let row: Map<String, Value> = serde_json::from_str(r#"{"id":7,"note":"x"}"#).unwrap();
        let key = e.key(&row).unwrap();
        assert_eq!(e.key_bytes(&key, false), br#"{"id":7}"#);
        let source = Source {
            commit_ts_ms: 1,
            snapshot: "false",
            tx_id: Some(9),
            lsn: Some(200),
            commit_lsn: Some(100),
            row_version: 200,
            before_row_version: Some(150),
        };
        let v: Value = serde_json::from_slice(&e.value(
            'u',
            Some(Value::Object(row.clone())),
            Some(Value::Object(row)),
            &source,
            false,
        ))
        .unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["source"]["sequence"], "[\"100\",\"200\"]");
        assert_eq!(v["source"]["before_row_version"], 150);
        assert_eq!(v["after"]["note"], "x");
        let wrapped: Value =
            serde_json::from_slice(&e.value('d', None, None, &source, true)).unwrap();
        assert_eq!(wrapped["payload"]["op"], "d");
        assert_eq!(wrapped["schema"]["name"], "pg.public.orders.Envelope");
    }
}
