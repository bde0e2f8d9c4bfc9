//! Sending one insert to one node: the statement and body are `clickhouse::insert`'s, the
//! connection and its stale retry [`Node::exchange`]'s.

use std::time::Duration;

use http::{header, Method, Request};

use super::{Account, Body, Node};
use crate::clickhouse::insert::{Insert, InsertError};

impl Node {
    /// Inserts `rows` (RowBinary, `count` of them) as one compressed block; `token` names
    /// the block for servers that take a deduplication token. Sent again on a fresh
    /// connection if a pooled one turns out stale: the server deduplicates the block.
    pub async fn insert(
        &self,
        account: &Account,
        insert: &Insert,
        (rows, count): (&[u8], usize),
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<(), InsertError> {
        let body = Insert::body(rows)?;
        let uri: http::Uri = insert
            .uri(count, token)
            .parse()
            .map_err(|e| InsertError::Node(format!("the insert's URI: {e}")))?;
        let make = || {
            let mut req = Request::new(Body::full(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            h.insert(header::HOST, self.authority.clone());
            h.insert(header::AUTHORIZATION, account.authorization.clone());
            h.insert(header::CONTENT_LENGTH, body.len().into());
            req
        };
        let answer = self
            .exchange(make, timeout)
            .await
            .map_err(|e| InsertError::Node(e.to_string()))?;
        Insert::outcome(answer.status.as_u16(), &answer.headers, &answer.body)
    }
}
