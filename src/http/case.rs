//! chgate's own answers (`/ping`, `Ok.`, its errors) with ClickHouse's header lines: the
//! same names in the same case and order (`Date`, `Connection`, `Keep-Alive`, then the
//! answer's own, `Content-Length` last), so a script that greps a header finds it whoever
//! answered.
//!
//! hyper writes header names in lower case unless a response carries its record of the
//! names' original case, and only its own parser makes that record (the type is private).
//! So the record is learnt once, at start, by parsing a response that has every name
//! chgate writes, over an in-memory connection, and cloned onto each own answer.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Extensions, Request, Response};
use http_body::Body as _;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::RespBody;

/// Every header name chgate writes on its own answers, in ClickHouse's case.
const NAMES: &[&str] = &[
    "Date",
    "Connection",
    "Keep-Alive",
    "Content-Type",
    "X-ClickHouse-Exception-Code",
    "WWW-Authenticate",
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Max-Age",
    "Content-Length",
];

/// The record of [`NAMES`]' case, as hyper's parser makes it; empty (lower-case names) if
/// learning it failed, which only costs the case.
pub async fn learn() -> Extensions {
    match tokio::time::timeout(std::time::Duration::from_secs(5), parse()).await {
        Ok(Ok(extensions)) => extensions,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Could not learn header case; chgate's own answers use lower-case names");
            Extensions::new()
        }
        Err(_) => Extensions::new(),
    }
}

async fn parse() -> Result<Extensions, hyper::Error> {
    let (client, mut server) = tokio::io::duplex(4096);
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for name in NAMES.iter().filter(|n| **n != "Content-Length") {
        head.push_str(name);
        head.push_str(": x\r\n");
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        // The request is never looked at: one read takes it.
        let _ = server.read(&mut buf).await;
        let _ = server.write_all(head.as_bytes()).await;
    });
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(client))
        .await?;
    tokio::spawn(conn);
    let resp = sender.send_request(Request::new(Empty::new())).await?;
    Ok(resp.into_parts().0.extensions)
}

/// Marks an answer as chgate's own (not the server's): [`finish`] is applied to it.
#[derive(Clone, Copy)]
pub struct Own;

/// Marks `resp` as chgate's own.
pub fn own(mut resp: Response<RespBody>) -> Response<RespBody> {
    resp.extensions_mut().insert(Own);
    resp
}

/// Puts an own answer's headers in ClickHouse's order with the learnt case: `Date`, then
/// `Connection` and `Keep-Alive` when given, the answer's own headers, `Content-Length`.
pub fn finish(
    resp: &mut Response<RespBody>,
    case: &Extensions,
    (connection, keep_alive): (HeaderValue, Option<HeaderValue>),
) {
    let mut headers = HeaderMap::with_capacity(resp.headers().len() + 4);
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        headers.insert(header::DATE, date);
    }
    headers.insert(header::CONNECTION, connection);
    if let Some(keep_alive) = keep_alive {
        headers.insert(HeaderName::from_static("keep-alive"), keep_alive);
    }
    let mut current: Option<HeaderName> = None;
    for (name, value) in resp.headers_mut().drain() {
        if let Some(name) = name {
            current = Some(name);
        }
        if let Some(name) = &current {
            headers.append(name.clone(), value);
        }
    }
    if let Some(len) = resp.body().size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    *resp.headers_mut() = headers;
    *resp.extensions_mut() = case.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn own_answers_get_clickhouse_order_and_a_case_record() {
        let case = learn().await;
        assert!(!case.is_empty(), "hyper recorded the names' case");
        let mut resp = Response::new(RespBody::full("Ok.\n"));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=UTF-8"),
        );
        finish(
            &mut resp,
            &case,
            (
                HeaderValue::from_static("Keep-Alive"),
                Some(HeaderValue::from_static("timeout=10")),
            ),
        );
        let names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "date",
                "connection",
                "keep-alive",
                "content-type",
                "content-length"
            ]
        );
        assert_eq!(resp.headers()["content-length"], "4");
    }
}
