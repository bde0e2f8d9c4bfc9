//! What the capture asks PostgreSQL's catalog, on an ordinary (tokio-postgres) connection:
//! which tables match the configured names, their columns, types and primary keys, and the
//! publication and slot it manages.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::config::{matches, ValidatedCdc};
use super::pg::wire::SESSION_OPTIONS;
use super::value::Kind;

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// `format_type(oid, NULL)`: what a literal of the column is cast to.
    pub type_name: String,
    pub kind: Kind,
}

/// A captured table as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    pub schema: String,
    pub name: String,
    pub oid: u32,
    pub columns: Vec<Column>,
    /// The primary key's columns, as indexes into `columns`, in key order.
    pub key: Vec<usize>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    /// A partitioned table: its partitions' changes are published under its name (the
    /// publication's `publish_via_partition_root`).
    pub partitioned: bool,
}

impl TableSchema {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    pub fn full_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Opens an ordinary connection with chgate's session settings.
pub async fn connect(cfg: &ValidatedCdc) -> Result<Client, tokio_postgres::Error> {
    let p = &cfg.config.postgres;
    let mut c = tokio_postgres::Config::new();
    c.host(&p.host)
        .port(p.port)
        .user(&p.user)
        .dbname(&p.dbname)
        .application_name("chgate-cdc")
        .options(SESSION_OPTIONS)
        .connect_timeout(p.connect_timeout)
        .ssl_mode(cfg.tls.postgres_mode());
    if let Some(pw) = &cfg.password {
        c.password(pw.expose());
    }
    let (client, connection) = c.connect(cfg.tls.clone()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "catalog connection ended");
        }
    });
    Ok(client)
}

/// The tables the config names, each with its columns and primary key. A name that
/// matches nothing, or a table without a primary key, is an error naming it.
///
/// A partitioned table is captured as one table: its partitions' changes come under its
/// name (PostgreSQL 13 and later). Partitions themselves are never captured on their own
/// (a pattern skips them; naming one is an error that names its partitioned table), so
/// no row is published twice.
pub async fn tables(client: &Client, patterns: &[String]) -> anyhow::Result<Vec<TableSchema>> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, c.oid, c.relreplident::text, c.relkind::text,
                    c.relispartition
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg_toast%'
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let mut out = Vec::new();
    let mut types = TypeCache::default();
    for pattern in patterns {
        let mut found = false;
        let mut partition = None;
        for row in &rows {
            let (schema, name): (String, String) = (row.get(0), row.get(1));
            if !matches(pattern, &schema, &name) {
                continue;
            }
            if row.get::<_, bool>(5) {
                partition.get_or_insert(format!("{schema}.{name}"));
                continue;
            }
            found = true;
            if row.get::<_, String>(4) == "p" && version < 130000 {
                anyhow::bail!(
                    "table {schema}.{name} is partitioned: capturing it needs PostgreSQL 13 or later (publish_via_partition_root)"
                );
            }
            if out
                .iter()
                .any(|t: &TableSchema| t.schema == schema && t.name == name)
            {
                continue;
            }
            let oid: u32 = row.get(2);
            let ident: String = row.get(3);
            let mut t = table(client, &mut types, schema, name, oid, &ident).await?;
            t.partitioned = row.get::<_, String>(4) == "p";
            out.push(t);
        }
        if let (false, Some(partition)) = (found, &partition) {
            anyhow::bail!(
                "capture.tables: {pattern:?} names only partitions ({partition}); name their partitioned table, whose changes include theirs"
            );
        }
        if !found {
            anyhow::bail!("capture.tables: {pattern:?} matches no table in the database");
        }
    }
    Ok(out)
}

async fn table(
    client: &Client,
    types: &mut TypeCache,
    schema: String,
    name: String,
    oid: u32,
    ident: &str,
) -> anyhow::Result<TableSchema> {
    let cols = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.attnum, format_type(a.atttypid, NULL)
             FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let mut columns = Vec::new();
    let mut attnums = Vec::new();
    for c in &cols {
        let type_oid: u32 = c.get(1);
        columns.push(Column {
            name: c.get(0),
            type_oid,
            type_name: c.get(3),
            kind: types.kind(client, type_oid).await?,
        });
        attnums.push(c.get::<_, i16>(2));
    }
    let pk = index_columns(client, oid, Index::Primary).await?;
    let key: Vec<usize> = pk
        .iter()
        .filter_map(|k| attnums.iter().position(|a| a == k))
        .collect();
    if key.is_empty() {
        anyhow::bail!(
            "table {schema}.{name} has no primary key: chgate cdc keys events and ClickHouse rows by it"
        );
    }
    let replica_identity = ident.chars().next().unwrap_or('d');
    if replica_identity == 'i' {
        // A delete's old row then carries only the identity index's columns: the key must
        // be among them, or the row cannot be found.
        let identity = index_columns(client, oid, Index::ReplicaIdentity).await?;
        let covered = pk.iter().all(|k| identity.contains(k));
        if !covered {
            anyhow::bail!(
                "table {schema}.{name} has REPLICA IDENTITY USING INDEX on an index without every primary key column: its deletes would not say which row went; use DEFAULT (or FULL)"
            );
        }
    }
    Ok(TableSchema {
        schema,
        name,
        oid,
        columns,
        key,
        replica_identity,
        partitioned: false,
    })
}

/// Which of a table's indexes [`index_columns`] reads.
enum Index {
    Primary,
    ReplicaIdentity,
}

/// The column numbers (`attnum`) of a table's primary key or replica identity index, in
/// index order; empty if it has none.
async fn index_columns(client: &Client, oid: u32, index: Index) -> anyhow::Result<Vec<i16>> {
    let sql = match index {
        Index::Primary => {
            "SELECT unnest(i.indkey::int2[]) FROM pg_index i
             WHERE i.indrelid = $1 AND i.indisprimary"
        }
        Index::ReplicaIdentity => {
            "SELECT unnest(i.indkey::int2[]) FROM pg_index i
             WHERE i.indrelid = $1 AND i.indisreplident"
        }
    };
    let rows = client.query(sql, &[&oid]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Kinds of non-built-in types (enums, domains, arrays of those), asked once each.
#[derive(Default)]
pub struct TypeCache {
    known: HashMap<u32, Kind>,
}

impl TypeCache {
    pub async fn kind(&mut self, client: &Client, oid: u32) -> anyhow::Result<Kind> {
        if let Some(k) = Kind::builtin(oid) {
            return Ok(k);
        }
        if let Some(k) = self.known.get(&oid) {
            return Ok(k.clone());
        }
        let mut current = oid;
        let mut wrap = 0;
        // Domains resolve to their base type, arrays to their element; a few steps at most.
        let kind = loop {
            if let Some(k) = Kind::builtin(current) {
                break k;
            }
            let row = client
                .query_opt(
                    "SELECT typtype::text, typelem, typbasetype, typcategory::text
                     FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await?;
            let Some(row) = row else { break Kind::Text };
            let (typtype, elem, base, category): (String, u32, u32, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if typtype == "d" && base != 0 {
                current = base;
            } else if category == "A" && elem != 0 && wrap < 6 {
                wrap += 1;
                current = elem;
            } else {
                break Kind::Text;
            }
        };
        let kind = (0..wrap).fold(kind, |k, _| Kind::Array(Box::new(k)));
        self.known.insert(oid, kind.clone());
        Ok(kind)
    }
}

/// Creates the publication if missing and adds the tables it lacks.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableSchema],
) -> anyhow::Result<()> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    let list = |ts: &[&TableSchema]| {
        ts.iter()
            .map(|t| t.qualified())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let via_root = tables.iter().any(|t| t.partitioned);
    if !exists {
        let all: Vec<&TableSchema> = tables.iter().collect();
        let with = if via_root {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        };
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}{with}",
                quote_ident(publication),
                list(&all)
            ))
            .await?;
        tracing::info!(publication, tables = %list(&all), "Created the publication");
        return Ok(());
    }
    if via_root {
        let set = client
            .query_one(
                "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await?
            .get::<_, bool>(0);
        if !set {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(publication)
                ))
                .await?;
            tracing::info!(
                publication,
                "Set publish_via_partition_root: a partitioned table's changes come under its name"
            );
        }
    }
    let have = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let missing: Vec<&TableSchema> = tables
        .iter()
        .filter(|t| {
            !have
                .iter()
                .any(|r| r.get::<_, String>(0) == t.schema && r.get::<_, String>(1) == t.name)
        })
        .collect();
    if !missing.is_empty() {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(publication),
                list(&missing)
            ))
            .await?;
        tracing::info!(publication, tables = %list(&missing), "Added tables to the publication");
    }
    Ok(())
}

/// The slot's confirmed position, if it exists.
pub async fn slot_confirmed(client: &Client, slot: &str) -> anyhow::Result<Option<u64>> {
    let row = client
        .query_opt(
            "SELECT plugin::text, confirmed_flush_lsn::text FROM pg_replication_slots
             WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let plugin: String = row.get(0);
    if plugin != "pgoutput" {
        anyhow::bail!("replication slot {slot:?} uses plugin {plugin:?}; chgate needs pgoutput");
    }
    let lsn: Option<String> = row.get(1);
    Ok(Some(lsn.as_deref().and_then(parse_lsn).unwrap_or(0)))
}

/// The slot's restart position: the oldest change the server may send again.
pub async fn slot_restart(client: &Client, slot: &str) -> anyhow::Result<Option<u64>> {
    let row = client
        .query_opt(
            "SELECT restart_lsn::text FROM pg_replication_slots
             WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| parse_lsn(&r.get::<_, Option<String>>(0)?)))
}

/// The transactions that hold up a logical slot being created: PostgreSQL reaches the
/// slot's consistent point only once every transaction with an xid that was running when it
/// was asked has ended, in any database of the server. One line each: pid, database, user,
/// age, state.
pub async fn transactions_holding_slot(client: &Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT pid, coalesce(datname, ''), coalesce(usename, ''),
                    coalesce(extract(epoch FROM now() - xact_start)::float8, 0),
                    coalesce(state, '')
             FROM pg_stat_activity
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
             ORDER BY xact_start LIMIT 5",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (pid, db, user, age, state): (i32, String, String, f64, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            format!("pid {pid} ({user}@{db}, {age:.0} s, {state})")
        })
        .collect())
}

/// "16/B374D848" -> 0x16B374D848.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
