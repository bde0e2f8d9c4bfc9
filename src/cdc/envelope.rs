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

use serde_json::{json, Value};

use super::catalog::TableSchema;
use super::value::write_str;

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
    pub key_columns: Vec<String>,
    /// The key's and the value's schemas, as JSON, written once.
    key_schema: Vec<u8>,
    value_schema: Vec<u8>,
    /// `,"source":{"version":...,"connector":"postgresql","name":...,`
    source_head: Vec<u8>,
    /// `"db":...,`
    source_db: Vec<u8>,
    /// `"schema":...,"table":...,`
    source_table: Vec<u8>,
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
        let mut source_head = br#","source":{"version":"#.to_vec();
        write_str(
            &mut source_head,
            concat!("chgate-", env!("CARGO_PKG_VERSION")),
        );
        source_head.extend_from_slice(br#","connector":"postgresql","name":"#);
        write_str(&mut source_head, server);
        source_head.push(b',');
        let mut source_db = br#""db":"#.to_vec();
        write_str(&mut source_db, db);
        source_db.push(b',');
        let mut source_table = br#""schema":"#.to_vec();
        write_str(&mut source_table, &t.schema);
        source_table.extend_from_slice(br#","table":"#);
        write_str(&mut source_table, &t.name);
        source_table.push(b',');
        Self {
            source_head,
            source_db,
            source_table,
            key_columns: t.key.iter().map(|&i| t.columns[i].name.clone()).collect(),
            key_schema: json!({"type": "struct", "fields": key_fields, "optional": false,
                               "name": format!("{topic}.Key")})
            .to_string()
            .into_bytes(),
            value_schema: json!({"type": "struct", "optional": false,
                "name": format!("{topic}.Envelope"), "fields": [
                row("before"), row("after"), source,
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"}
            ]})
            .to_string()
            .into_bytes(),
        }
    }

    /// The key as published: its JSON object (`key_json`, from [`super::row::Layout`]),
    /// wrapped with its schema under `with_schema`.
    pub fn key_bytes(&self, key_json: &[u8], with_schema: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(key_json.len() + if with_schema { 256 } else { 0 });
        self.key_into(key_json, with_schema, &mut out);
        out
    }

    /// [`TableEnvelope::key_bytes`], appended to `out`.
    pub fn key_into(&self, key_json: &[u8], with_schema: bool, out: &mut Vec<u8>) {
        if !with_schema {
            out.extend_from_slice(key_json);
            return;
        }
        out.extend_from_slice(b"{\"schema\":");
        out.extend_from_slice(&self.key_schema);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(key_json);
        out.push(b'}');
    }

    /// The event's value, written straight from the rows' JSON bytes.
    pub fn value(
        &self,
        op: char,
        before: Option<&[u8]>,
        after: Option<&[u8]>,
        source: &Source,
        with_schema: bool,
    ) -> Vec<u8> {
        let size = before.map_or(4, <[u8]>::len) + after.map_or(4, <[u8]>::len) + 400;
        let mut out = Vec::with_capacity(size);
        self.value_into(op, before, after, source, with_schema, &mut out);
        out
    }

    /// [`TableEnvelope::value`], appended to `out`.
    pub fn value_into(
        &self,
        op: char,
        before: Option<&[u8]>,
        after: Option<&[u8]>,
        source: &Source,
        with_schema: bool,
        out: &mut Vec<u8>,
    ) {
        use std::io::Write;
        if with_schema {
            out.extend_from_slice(b"{\"schema\":");
            out.extend_from_slice(&self.value_schema);
            out.extend_from_slice(b",\"payload\":");
        }
        out.extend_from_slice(b"{\"before\":");
        out.extend_from_slice(before.unwrap_or(b"null"));
        out.extend_from_slice(b",\"after\":");
        out.extend_from_slice(after.unwrap_or(b"null"));
        out.extend_from_slice(&self.source_head);
        let _ = write!(
            out,
            "\"ts_ms\":{},\"snapshot\":\"{}\",",
            source.commit_ts_ms, source.snapshot
        );
        out.extend_from_slice(&self.source_db);
        match (source.commit_lsn, source.lsn) {
            (Some(c), Some(l)) => {
                let _ = write!(out, "\"sequence\":\"[\\\"{c}\\\",\\\"{l}\\\"]\",");
            }
            _ => out.extend_from_slice(b"\"sequence\":null,"),
        }
        out.extend_from_slice(&self.source_table);
        out.extend_from_slice(b"\"txId\":");
        put_opt(out, source.tx_id.map(u64::from));
        out.extend_from_slice(b",\"lsn\":");
        put_opt(out, source.lsn);
        let _ = write!(out, ",\"xmin\":null,\"row_version\":{}", source.row_version);
        out.extend_from_slice(b",\"before_row_version\":");
        put_opt(out, source.before_row_version);
        let _ = write!(
            out,
            "}},\"op\":\"{op}\",\"ts_ms\":{},\"transaction\":null}}",
            now_ms()
        );
        if with_schema {
            out.push(b'}');
        }
    }
}

/// A number, or `null`.
fn put_opt(out: &mut Vec<u8>, v: Option<u64>) {
    use std::io::Write;
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.extend_from_slice(b"null"),
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
            partitioned: false,
        }
    }

    #[test]
    fn the_envelope_has_debeziums_shape() {
        let e = TableEnvelope::new("pg", "demo", &table(), "pg.public.orders");
        let row = br#"{"id":7,"note":"x"}"#;
        assert_eq!(e.key_bytes(br#"{"id":7}"#, false), br#"{"id":7}"#);
        let source = Source {
            commit_ts_ms: 1,
            snapshot: "false",
            tx_id: Some(9),
            lsn: Some(200),
            commit_lsn: Some(100),
            row_version: 200,
            before_row_version: Some(150),
        };
        let v: Value =
            serde_json::from_slice(&e.value('u', Some(row), Some(row), &source, false)).unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["source"]["sequence"], "[\"100\",\"200\"]");
        assert_eq!(v["source"]["before_row_version"], 150);
        assert_eq!(v["source"]["txId"], 9);
        assert_eq!(v["source"]["table"], "orders");
        assert_eq!(v["source"]["connector"], "postgresql");
        assert_eq!(v["after"]["note"], "x");
        assert_eq!(v["transaction"], Value::Null);
        let snapshot = Source {
            tx_id: None,
            commit_lsn: None,
            before_row_version: None,
            snapshot: "true",
            ..source
        };
        let wrapped: Value =
            serde_json::from_slice(&e.value('r', None, Some(row), &snapshot, true)).unwrap();
        assert_eq!(wrapped["payload"]["op"], "r");
        assert_eq!(wrapped["payload"]["source"]["sequence"], Value::Null);
        assert_eq!(wrapped["payload"]["source"]["txId"], Value::Null);
        assert_eq!(wrapped["schema"]["name"], "pg.public.orders.Envelope");
        let key: Value = serde_json::from_slice(&e.key_bytes(br#"{"id":7}"#, true)).unwrap();
        assert_eq!(key["payload"]["id"], 7);
    }
}
