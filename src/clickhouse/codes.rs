//! ClickHouse error codes: the ones chgate answers with itself (named as the server names
//! them, so clients' error handling treats both alike), and reading a server's code from its
//! answer.
//!
//! Servers say the code two ways: since 19.x the HTTP interface sends it in the
//! `X-ClickHouse-Exception-Code` header; every version writes `Code: N` at the start of the
//! exception text (18.16 only there). [`from_answer`] takes the header when it is there and
//! the text otherwise.

use http::HeaderMap;

/// A ClickHouse error code and its name, as in the server's `ErrorCodes.cpp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub number: u16,
    pub name: &'static str,
}

impl Code {
    const fn new(number: u16, name: &'static str) -> Self {
        Self { number, name }
    }
}

pub const NOT_IMPLEMENTED: Code = Code::new(48, "NOT_IMPLEMENTED");
pub const BAD_ARGUMENTS: Code = Code::new(36, "BAD_ARGUMENTS");
pub const UNKNOWN_PACKET_FROM_CLIENT: Code = Code::new(99, "UNKNOWN_PACKET_FROM_CLIENT");
pub const UNEXPECTED_PACKET_FROM_CLIENT: Code = Code::new(101, "UNEXPECTED_PACKET_FROM_CLIENT");
pub const UNKNOWN_SETTING: Code = Code::new(115, "UNKNOWN_SETTING");
pub const CANNOT_READ_ALL_DATA: Code = Code::new(33, "CANNOT_READ_ALL_DATA");
pub const TIMEOUT_EXCEEDED: Code = Code::new(159, "TIMEOUT_EXCEEDED");
pub const READONLY: Code = Code::new(164, "READONLY");
pub const IP_ADDRESS_NOT_ALLOWED: Code = Code::new(195, "IP_ADDRESS_NOT_ALLOWED");
pub const QUERY_IS_TOO_LARGE: Code = Code::new(229, "QUERY_IS_TOO_LARGE");
/// 18.16 calls it QUOTA_EXPIRED; current versions QUOTA_EXCEEDED, the name clients match.
pub const QUOTA_EXCEEDED: Code = Code::new(201, "QUOTA_EXCEEDED");
pub const TOO_MANY_SIMULTANEOUS_QUERIES: Code = Code::new(202, "TOO_MANY_SIMULTANEOUS_QUERIES");
pub const TOO_MANY_ROWS_OR_BYTES: Code = Code::new(396, "TOO_MANY_ROWS_OR_BYTES");
pub const NETWORK_ERROR: Code = Code::new(210, "NETWORK_ERROR");
pub const ALL_CONNECTION_TRIES_FAILED: Code = Code::new(279, "ALL_CONNECTION_TRIES_FAILED");
pub const AUTHENTICATION_FAILED: Code = Code::new(516, "AUTHENTICATION_FAILED");

/// Codes that mean "this data is wrong", not "this node is unwell": parse and conversion
/// errors, 190 (the arrays of a Nested column differ in length), 349 (NULL into a
/// non-Nullable column), 395 (`throwIf` in a materialized view), 469 (a constraint). An
/// insert refused with one of them fails on every replica alike: the rows at fault are
/// isolated, not retried elsewhere.
const DATA_ERRORS: &[u32] = &[
    6, 26, 27, 32, 33, 38, 41, 53, 69, 70, 72, 117, 131, 190, 349, 395, 469,
];

/// True if `code` says the data was refused for what it is (see [`DATA_ERRORS`]).
pub fn is_data_error(code: u32) -> bool {
    DATA_ERRORS.contains(&code)
}

/// Codes a node answers a read with when it could not reach another node the query
/// needed (a shard's replicas, for a Distributed table): 32 ATTEMPT_TO_READ_AFTER_EOF (the
/// connection to a remote node ended mid-answer: "while receiving packet from"), 209
/// SOCKET_TIMEOUT, 210 NETWORK_ERROR, 279 ALL_CONNECTION_TRIES_FAILED. Another node,
/// coordinating the same read, may reach them (its own replica of the shard, a pool
/// without a stale connection, a newer cluster definition). A read is safe to send again
/// whatever the code: at worst the next node gives the same error.
pub fn is_fan_out_error(code: u32) -> bool {
    matches!(code, 32 | 209 | 210 | 279)
}

/// The code in an exception text: the number after the first `Code: `.
pub fn in_text(text: &str) -> Option<u32> {
    let at = text.find("Code: ")? + 6;
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

/// The code of a failed answer: the `X-ClickHouse-Exception-Code` header (19.x and later),
/// else the exception text (18.16).
pub fn from_answer(headers: &HeaderMap, text: &str) -> Option<u32> {
    headers
        .get("x-clickhouse-exception-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| in_text(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_codes_from_text_and_prefers_the_header() {
        assert_eq!(
            in_text("Code: 33, e.displayText() = DB::Exception: Cannot read all data"),
            Some(33)
        );
        assert_eq!(
            in_text("Code: 252. DB::Exception: Too many parts"),
            Some(252)
        );
        assert_eq!(in_text("bad gateway"), None);
        assert_eq!(in_text("Code: x"), None);
        let mut h = HeaderMap::new();
        assert_eq!(from_answer(&h, "Code: 27. DB::Exception"), Some(27));
        h.insert(
            "x-clickhouse-exception-code",
            HeaderValue::from_static("62"),
        );
        assert_eq!(from_answer(&h, "Code: 27. DB::Exception"), Some(62));
    }

    #[test]
    fn data_errors_are_about_the_rows() {
        assert!(is_data_error(27) && is_data_error(349));
        assert!(!is_data_error(252), "too many parts is the node's state");
        assert!(!is_data_error(210));
    }
}
