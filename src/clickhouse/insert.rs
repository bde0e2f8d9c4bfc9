//! An `INSERT ... FORMAT RowBinary` as ClickHouse's HTTP interface takes it, and what its
//! answer means.
//!
//! The statement goes in the URL with `insert_deduplicate=1` (a block sent again is dropped
//! by a replicated table) and `decompress=1`: the rows travel as one compressed block
//! ([`super::compress`]), so a body cut short is refused whole instead of landing as a
//! smaller block that a resend could not be deduplicated against. Servers from 22.2 also
//! take an `insert_deduplication_token`, naming the block so that two different batches
//! with identical rows are never taken for one; [`SUPPORTS_DEDUP_TOKEN`] asks a server
//! whether it knows the setting (18.16 does not).

use bytes::Bytes;
use http::HeaderMap;

use super::codes;
use super::compress;

/// A query answering `1` on servers that take `insert_deduplication_token`, `0` elsewhere.
pub const SUPPORTS_DEDUP_TOKEN: &str =
    "SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'";

/// Why an insert did not land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertError {
    /// The server refused the data itself (a data error code): every replica would; the
    /// rows at fault are to be found and set aside.
    Data(String),
    /// The node, the network or the server's state: another replica may take it.
    Node(String),
}

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Data(e) | Self::Node(e) => f.write_str(e),
        }
    }
}

/// One table's insert statement, ready to be sent any number of times.
#[derive(Debug, Clone)]
pub struct Insert {
    /// `/?insert_deduplicate=1&decompress=1&query=INSERT ...`
    path_and_query: String,
    dedup_token: bool,
}

impl Insert {
    /// `columns` is the comma-separated column list, in the order the rows are encoded.
    /// Names are quoted with backticks; the caller makes sure they are plain identifiers.
    pub fn new(database: &str, table: &str, columns: &str) -> Self {
        let sql = format!("INSERT INTO `{database}`.`{table}` ({columns}) FORMAT RowBinary");
        Self {
            path_and_query: format!(
                "/?insert_deduplicate=1&decompress=1&query={}",
                form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
            ),
            dedup_token: false,
        }
    }

    /// Whether the servers take `insert_deduplication_token` (see [`SUPPORTS_DEDUP_TOKEN`]).
    pub fn with_dedup_token(mut self, supported: bool) -> Self {
        self.dedup_token = supported;
        self
    }

    pub fn dedup_token(&self) -> bool {
        self.dedup_token
    }

    /// The request's path and query for `rows` rows; `token` names the block where servers
    /// take it. `max_insert_block_size` is the insert's own row count, so the server makes
    /// exactly one block of it whatever its profile says: an insert cut into several
    /// blocks could land in part (a data error in a later block), and the halves retried
    /// after it would write the landed rows again.
    pub fn uri(&self, rows: usize, token: Option<&str>) -> String {
        let mut uri = format!(
            "{}&max_insert_block_size={}",
            self.path_and_query,
            rows.max(1)
        );
        if let (Some(t), true) = (token, self.dedup_token) {
            uri.push_str("&insert_deduplication_token=");
            uri.extend(form_urlencoded::byte_serialize(t.as_bytes()));
        }
        uri
    }

    /// The request body for `rows` (RowBinary): one compressed block.
    pub fn body(rows: &[u8]) -> Result<Bytes, InsertError> {
        compress::lz4_block(rows).map_err(InsertError::Node)
    }

    /// What an answer means: 200 is in; a data error code is [`InsertError::Data`];
    /// anything else is the node's.
    pub fn outcome(status: u16, headers: &HeaderMap, body: &[u8]) -> Result<(), InsertError> {
        if status == 200 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(body).trim().to_string();
        match codes::from_answer(headers, &text) {
            Some(code) if codes::is_data_error(code) => Err(InsertError::Data(text)),
            _ => Err(InsertError::Node(format!("HTTP {status}: {text}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_and_its_token() {
        let i = Insert::new("demo", "events_local", "ts, user_id");
        let uri = i.uri(20, Some("t:0:1-2:1"));
        assert!(uri.starts_with("/?insert_deduplicate=1&decompress=1&query=INSERT+INTO+%60demo%60.%60events_local%60+%28ts%2C+user_id%29+FORMAT+RowBinary"), "{uri}");
        assert!(!uri.contains("token"), "not without server support: {uri}");
        assert!(uri.ends_with("&max_insert_block_size=20"), "{uri}");
        let i = i.with_dedup_token(true);
        assert!(i
            .uri(20, Some("t:0:1-2:1"))
            .ends_with("&max_insert_block_size=20&insert_deduplication_token=t%3A0%3A1-2%3A1"));
        assert!(!i.uri(20, None).contains("token"));
    }

    #[test]
    fn answers_tell_data_from_node_errors() {
        let h = HeaderMap::new();
        assert_eq!(Insert::outcome(200, &h, b""), Ok(()));
        assert!(matches!(
            Insert::outcome(
                500,
                &h,
                b"Code: 27, e.displayText() = DB::Exception: Cannot parse input"
            ),
            Err(InsertError::Data(_))
        ));
        match Insert::outcome(500, &h, b"Code: 252. DB::Exception: Too many parts\n") {
            Err(InsertError::Node(e)) => {
                assert_eq!(e, "HTTP 500: Code: 252. DB::Exception: Too many parts")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Insert::outcome(502, &h, b"bad gateway"),
            Err(InsertError::Node(_))
        ));
    }
}
