//! SQL over HTTP for chgate's own use: start-up checks, the picker's probes, feature
//! detection. Small text answers, read whole.
//!
//! [`Node::query`] goes over the node's pool like any request (with the stale-connection
//! retry). [`Dedicated`] is one connection of a caller's own, opened on first use and kept
//! between calls: the picker's probes use one per node, so a probe never takes a pooled
//! connection from requests, and a probe that hangs never leaves one behind in the pool.

use std::time::{Duration, Instant};

use http::{header, Method, Request};

use super::{Account, Body, Node, Upstream, UpstreamError};
use crate::clickhouse::codes;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The server answered with an error.
    #[error("the server answered {status}: {text}")]
    Server {
        status: u16,
        /// The ClickHouse error code, when the answer gives one.
        code: Option<u32>,
        text: String,
    },
}

impl QueryError {
    fn server(status: u16, headers: &http::HeaderMap, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        Self::Server {
            status,
            code: codes::from_answer(headers, text),
            text: text.chars().take(300).collect(),
        }
    }
}

/// `/?query=<sql>`
fn query_uri(sql: &str) -> String {
    format!(
        "/?query={}",
        form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
    )
}

fn get(node: &Node, account: Option<&Account>, uri: &str) -> Request<Body> {
    let mut req = Request::new(Body::Empty);
    *req.method_mut() = Method::GET;
    // The URI is built here from an encoded query: it parses.
    *req.uri_mut() = uri.parse().unwrap_or_default();
    let h = req.headers_mut();
    h.insert(header::HOST, node.authority.clone());
    if let Some(account) = account {
        h.insert(header::AUTHORIZATION, account.authorization.clone());
    }
    req
}

impl Node {
    /// Runs one query (GET, so the server treats it as read-only) and returns its text.
    pub async fn query(
        &self,
        account: &Account,
        sql: &str,
        timeout: Duration,
    ) -> Result<String, QueryError> {
        let uri = query_uri(sql);
        let answer = self
            .exchange(|| get(self, Some(account), &uri), timeout)
            .await?;
        if answer.status != http::StatusCode::OK {
            return Err(QueryError::server(
                answer.status.as_u16(),
                &answer.headers,
                &answer.body,
            ));
        }
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }
}

/// `'text'` as a ClickHouse string literal.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl Node {
    /// Cancels the query `query_id` of `account` on this node (`KILL QUERY ... ASYNC`: the
    /// server stops it at its next check, this call does not wait for that). Sent as a
    /// POST, which the server never treats as read-only.
    pub async fn kill_query(
        &self,
        account: &Account,
        query_id: &str,
        timeout: Duration,
    ) -> Result<(), QueryError> {
        let sql = format!(
            "KILL QUERY WHERE query_id = {} AND user = {} ASYNC FORMAT Null",
            quoted(query_id),
            quoted(&account.user)
        );
        self.execute(account, &sql, timeout).await.map(drop)
    }

    /// Whether the query `query_id` of `account` is still running on this node.
    pub async fn query_running(
        &self,
        account: &Account,
        query_id: &str,
        timeout: Duration,
    ) -> Result<bool, QueryError> {
        let sql = format!(
            "SELECT count() FROM system.processes WHERE query_id = {} AND user = {}",
            quoted(query_id),
            quoted(&account.user)
        );
        let text = self.query(account, &sql, timeout).await?;
        Ok(text.trim() != "0")
    }

    /// Runs one statement as a POST (never read-only: DDL such as `ALTER TABLE`) and
    /// returns its text.
    pub async fn execute(
        &self,
        account: &Account,
        sql: &str,
        timeout: Duration,
    ) -> Result<String, QueryError> {
        let make = || {
            let mut req = Request::new(Body::Full(http_body_util::Full::new(bytes::Bytes::from(
                sql.to_string(),
            ))));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = http::Uri::from_static("/");
            let h = req.headers_mut();
            h.insert(header::HOST, self.authority.clone());
            h.insert(header::AUTHORIZATION, account.authorization.clone());
            req
        };
        let answer = self.exchange(make, timeout).await?;
        if answer.status != http::StatusCode::OK {
            return Err(QueryError::server(
                answer.status.as_u16(),
                &answer.headers,
                &answer.body,
            ));
        }
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }
}

/// A connection of the caller's own to one node, kept between calls while it stays usable.
#[derive(Default)]
pub struct Dedicated {
    conn: Option<Upstream>,
}

impl Dedicated {
    /// `GET uri` within `timeout`; the answer's text and round trip.
    pub async fn get(
        &mut self,
        node: &Node,
        account: Option<&Account>,
        uri: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), QueryError> {
        let started = Instant::now();
        let work = async {
            let mut upstream = match self.conn.take() {
                Some(u) => u,
                None => node.open().await?,
            };
            let resp = upstream
                .send(get(node, account, uri))
                .await
                .map_err(|f| f.error)?;
            let (parts, body) = resp.into_parts();
            let body = upstream
                .read_body(body)
                .await
                .map_err(UpstreamError::Body)?;
            if upstream.reusable() {
                self.conn = Some(upstream);
            }
            if parts.status != http::StatusCode::OK {
                return Err(QueryError::server(
                    parts.status.as_u16(),
                    &parts.headers,
                    &body,
                ));
            }
            Ok(String::from_utf8_lossy(&body).into_owned())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(text)) => Ok((text, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(UpstreamError::Timeout(timeout).into()),
        }
    }

    /// Runs `sql` (GET) on this connection.
    pub async fn query(
        &mut self,
        node: &Node,
        account: &Account,
        sql: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), QueryError> {
        self.get(node, Some(account), &query_uri(sql), timeout)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_literals_are_escaped() {
        assert_eq!(quoted("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quoted("plain-id"), "'plain-id'");
    }
}
