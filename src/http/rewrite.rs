//! What a request becomes on its way upstream: the URL parameters and headers rewritten for
//! the mapped cluster account. Every parameter the client sent is forwarded byte for byte
//! except the client's credentials, a read-only user's own `readonly`, and `session_id`,
//! which is made private to the mapped user.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use super::credentials::decode_component;
use crate::gateway::quota::upstream_execution_seconds;
use crate::gateway::User;

/// Whether a request header describes one hop, never forwarded (RFC 9110 7.6.1), plus
/// `expect` (the proxy answers `100-continue` itself) and `host` (the node's is sent).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "host"
    )
}

/// Whether a request header carries the client's credentials, never forwarded.
pub fn credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "x-clickhouse-user"
            | "x-clickhouse-key"
            | "x-clickhouse-ssl-certificate-auth"
    )
}

/// The URL query as forwarded, and what the frontend needs from it.
#[derive(Debug, Default)]
pub struct Rewritten {
    pub path_and_query: String,
    /// The decoded `query` parameter.
    pub query: Option<String>,
    pub query_id: String,
    /// The client's own session id (before namespacing), for stickiness.
    pub session: Option<String>,
    pub decompress: bool,
    /// The response is asked for in ClickHouse's compressed block format (`compress=1`).
    pub compress: bool,
    /// The client set `load_balancing` itself.
    pub load_balancing: bool,
    /// Why the request cannot go on: a parameter chgate decides on (`query`, `query_id`,
    /// `session_id`) given twice. ClickHouse takes the first, a reading of the last would
    /// check another statement than the one that runs.
    pub ambiguous: Option<&'static str>,
}

/// Drops the client's credentials (and, for read-only users, any `readonly` it sent),
/// namespaces `session_id` by user, makes sure there is a `query_id`, passes a quota's
/// `max_execution_time` on (the client's own only where it is lower), and adds
/// `readonly=1` for read-only users' requests other than GETs (the server makes GETs
/// read-only itself; a HEAD it does not), last, so nothing after it has to change a
/// setting; drops a read-only user's `replace_running_query` (every mapped user shares the
/// cluster account, so it would cancel another user's query of the same id). Every other
/// parameter is forwarded byte for byte.
pub fn query(
    query: Option<&str>,
    user: &User,
    method: &Method,
    execution_limit: Option<std::time::Duration>,
) -> Rewritten {
    // Room for what is added: a query id (45 bytes), max_execution_time (~30), readonly.
    let mut out = Rewritten {
        path_and_query: String::with_capacity(query.map_or(0, str::len) + 96),
        ..Default::default()
    };
    out.path_and_query.push_str("/?");
    // Parameters are written straight into the path: no string of their own, no `format!`
    // (this runs for every request).
    let push_raw = |out: &mut Rewritten, raw: &str| {
        if out.path_and_query.len() > 2 {
            out.path_and_query.push('&');
        }
        out.path_and_query.push_str(raw);
    };
    let mut max_execution_time = execution_limit.map(upstream_execution_seconds);
    let mut seen = [false; 3];
    for raw in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = raw.split_once('=').unwrap_or((raw, ""));
        let name = decode_component(raw_name);
        if let Some(i) = ["query", "query_id", "session_id"]
            .iter()
            .position(|n| *n == name.as_ref())
        {
            if std::mem::replace(&mut seen[i], true) {
                out.ambiguous = Some(["query", "query_id", "session_id"][i]);
            }
        }
        match name.as_ref() {
            "replace_running_query" if user.readonly => continue,
            "user" | "password" => continue,
            "max_execution_time" if max_execution_time.is_some() => {
                let own = decode_component(raw_value).trim().parse::<u64>().ok();
                if let (Some(own), Some(limit)) = (own.filter(|&s| s > 0), max_execution_time) {
                    max_execution_time = Some(own.min(limit));
                }
                continue;
            }
            "readonly" if user.readonly => continue,
            "query" => out.query = Some(decode_component(raw_value).into_owned()),
            "query_id" => {
                out.query_id = decode_component(raw_value).into_owned();
                if out.query_id.is_empty() {
                    continue;
                }
            }
            "decompress" => out.decompress = raw_value != "0" && !raw_value.is_empty(),
            "compress" => out.compress = raw_value != "0" && !raw_value.is_empty(),
            "load_balancing" => out.load_balancing = true,
            "session_id" => {
                let session = decode_component(raw_value).into_owned();
                let namespaced = format!("{}/{}", user.name, session);
                let encoded: String =
                    form_urlencoded::byte_serialize(namespaced.as_bytes()).collect();
                push_raw(&mut out, &format!("session_id={encoded}"));
                out.session = Some(session);
                continue;
            }
            _ => {}
        }
        push_raw(&mut out, raw);
    }
    if out.query_id.is_empty() {
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id);
        push_raw(&mut out, "query_id=");
        out.path_and_query.push_str(id);
        out.query_id = id.to_owned();
    }
    if let Some(seconds) = max_execution_time {
        push_raw(&mut out, "max_execution_time=");
        push_decimal(&mut out.path_and_query, seconds);
    }
    // GET already implies readonly on the server, and ClickHouse refuses to change it
    // there; HEAD does not (18.16 makes only a GET read-only).
    if user.readonly && method != Method::GET {
        push_raw(
            &mut out,
            if user.upstream_readonly == 2 {
                "readonly=2"
            } else {
                "readonly=1"
            },
        );
    }
    out
}

/// Writes `n` in decimal.
fn push_decimal(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// A request's headers as they may go upstream, copied in one pass: without hop-by-hop
/// headers (those `Connection` names too), `Host`, and what `drop` names.
pub fn forwardable(client: &HeaderMap, drop: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    // Connection may name further hop-by-hop headers (rarely: no allocation without them).
    let listed: Vec<HeaderName> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut h = HeaderMap::with_capacity(client.keys_len() + 2);
    for (name, value) in client {
        if hop_by_hop(name) || drop(name) || listed.contains(name) {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    h
}

/// Headers of one hop in a response, dropped before it goes to the client. `Connection`,
/// `Keep-Alive` and a plain `Transfer-Encoding: chunked` stay where the server put them
/// (the client sees the server's header order): [`connection_headers`] gives the first two
/// the client connection's values, and hyper frames the body by the third.
const RESPONSE_HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Drops a response's hop-by-hop headers (see [`RESPONSE_HOP_BY_HOP`]), and whatever its
/// `Connection` names besides `keep-alive` and `close`.
pub fn strip_response(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in RESPONSE_HOP_BY_HOP {
        headers.remove(name);
    }
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if !chunked {
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// True if the client's connection stays open after this request (HTTP/1.1 unless it says
/// `close`; HTTP/1.0 only if it asks for `keep-alive`).
pub fn wants_keep_alive(version: http::Version, headers: &HeaderMap) -> bool {
    let says = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        http::Version::HTTP_10 => says("keep-alive"),
        http::Version::HTTP_11 => !says("close"),
        _ => false,
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// `Keep-Alive: timeout=N`, N being chgate's own idle timeout for client connections.
fn keep_alive_value(timeout: std::time::Duration) -> HeaderValue {
    let mut value = String::with_capacity(32);
    value.push_str("timeout=");
    push_decimal(&mut value, timeout.as_secs());
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("timeout=10"))
}

/// A proxied response's `Connection` and `Keep-Alive` describe chgate's connection to the
/// client, not the server's to chgate: where the server sent them (in its position and
/// case) they say whether the client's connection stays open, and the timeout after which
/// chgate closes it when idle, so a client never reuses a connection chgate is closing.
pub fn connection_headers(headers: &mut HeaderMap, keep_alive: bool, timeout: std::time::Duration) {
    if headers.contains_key(header::CONNECTION) {
        let value = if keep_alive { "Keep-Alive" } else { "Close" };
        headers.insert(header::CONNECTION, HeaderValue::from_static(value));
    }
    if keep_alive {
        if headers.contains_key(KEEP_ALIVE) {
            headers.insert(KEEP_ALIVE, keep_alive_value(timeout));
        }
    } else {
        headers.remove(KEEP_ALIVE);
    }
}

/// `Connection` and `Keep-Alive` for an answer of chgate's own, as ClickHouse sends them:
/// `Connection` always, `Keep-Alive` only on a successful answer (it leaves it off the
/// errors it raises before a query runs) and only while the connection stays open.
pub fn own_connection_headers(
    status: http::StatusCode,
    keep_alive: bool,
    timeout: std::time::Duration,
) -> (HeaderValue, Option<HeaderValue>) {
    if !keep_alive {
        return (HeaderValue::from_static("Close"), None);
    }
    let advertised = status.is_success().then(|| keep_alive_value(timeout));
    (HeaderValue::from_static("Keep-Alive"), advertised)
}

/// The client's headers as forwarded: hop-by-hop headers and the client's credentials
/// removed, the cluster account's added, the client's address appended to
/// `X-Forwarded-For`.
pub fn headers(client: &HeaderMap, user: &User, ip: IpAddr) -> HeaderMap {
    let mut h = forwardable(client, |n| credential(n) || n == X_FORWARDED_FOR);
    h.insert(header::AUTHORIZATION, user.account.authorization.clone());
    let mut forwarded = String::with_capacity(48);
    if let Some(prev) = client.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        forwarded.push_str(prev);
        forwarded.push_str(", ");
    }
    push_ip(&mut forwarded, ip);
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Appends `ip` as `Display` writes it; an IPv4 address (the usual one) without the
/// formatting machinery.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(_) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{ip}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::users::tests::test_user;

    #[test]
    fn rewrite_strips_credentials_and_namespaces_sessions() {
        let user = test_user("bi", true);
        let r = query(
            Some(
                "user=bi&password=se%26cret&query=SELECT+1&readonly=0&session_id=s+1&max_threads=2",
            ),
            &user,
            &Method::POST,
            None,
        );
        let pq = &r.path_and_query;
        assert!(!pq.contains("password") && !pq.contains("user=bi"), "{pq}");
        assert!(!pq.contains("readonly=0"), "{pq}");
        assert!(
            pq.contains("query=SELECT+1&"),
            "raw parameters are kept: {pq}"
        );
        assert!(pq.contains("session_id=bi%2Fs+1"), "{pq}");
        assert!(pq.contains("max_threads=2"));
        assert!(pq.ends_with("&readonly=1"), "{pq}");
        assert_eq!(r.query.as_deref(), Some("SELECT 1"));
        assert_eq!(r.session.as_deref(), Some("s 1"));
        assert_eq!(r.query_id.len(), 36, "a query id is generated");
        assert!(pq.contains(&format!("query_id={}", r.query_id)));
    }

    #[test]
    fn rewrite_keeps_client_query_id_and_leaves_get_readonly_to_the_server() {
        let user = test_user("bi", true);
        let r = query(
            Some("query_id=mine&query=SELECT+1"),
            &user,
            &Method::GET,
            None,
        );
        assert_eq!(r.query_id, "mine");
        assert_eq!(r.path_and_query, "/?query_id=mine&query=SELECT+1");
        let rw = test_user("etl", false);
        let r = query(Some("readonly=2&decompress=1"), &rw, &Method::POST, None);
        assert!(r
            .path_and_query
            .starts_with("/?readonly=2&decompress=1&query_id="));
        assert!(r.decompress);
    }

    #[test]
    fn decimals_are_written_as_format_would() {
        for n in [0, 1, 9, 10, 3600, 86_399, u64::MAX] {
            let mut s = String::from("x=");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x={n}"));
        }
    }

    #[test]
    fn a_quota_execution_limit_goes_upstream_unless_the_client_is_stricter() {
        let bi = test_user("bi", true);
        let ten = Some(std::time::Duration::from_secs(10));
        let pq = |q: &str| query(Some(q), &bi, &Method::POST, ten).path_and_query;
        let with = |q: &str| {
            let p = pq(q);
            assert_eq!(p.matches("max_execution_time=").count(), 1, "{p}");
            assert!(p.ends_with("&readonly=1"), "readonly stays last: {p}");
            p
        };
        // The node's limit is a second past the gateway's own (see quota.rs).
        assert!(with("query=SELECT+1").contains("max_execution_time=11&"));
        assert!(with("max_execution_time=3").contains("max_execution_time=3&"));
        assert!(with("max_execution_time=0").contains("max_execution_time=11&"));
        assert!(with("max_execution_time=600").contains("max_execution_time=11&"));
        assert!(
            !query(Some("max_execution_time=600"), &bi, &Method::POST, None)
                .path_and_query
                .contains("max_execution_time=11")
        );
    }

    #[test]
    fn what_a_read_only_user_cannot_slip_past() {
        let bi = test_user("bi", true);
        // HEAD is not made read-only by the server: chgate's readonly goes on it.
        let r = query(Some("query=SELECT+1"), &bi, &Method::HEAD, None);
        assert!(
            r.path_and_query.ends_with("&readonly=1"),
            "{}",
            r.path_and_query
        );
        // Another user's query id cannot be replaced.
        let r = query(
            Some("query=SELECT+1&query_id=theirs&replace_running_query=1"),
            &bi,
            &Method::POST,
            None,
        );
        assert!(!r.path_and_query.contains("replace_running_query"));
        let etl = test_user("etl", false);
        let r = query(Some("replace_running_query=1"), &etl, &Method::POST, None);
        assert!(r.path_and_query.contains("replace_running_query=1"));
        // The server runs the first `query`; chgate would have checked the last.
        for twice in [
            "query=INSERT+INTO+t+SELECT+1&query=SELECT+1",
            "query_id=a&query_id=b",
            "session_id=a&query=SELECT+1&session_id=b",
        ] {
            let r = query(Some(twice), &etl, &Method::POST, None);
            assert!(r.ambiguous.is_some(), "{twice}");
        }
        assert!(
            query(Some("query=SELECT+1&query_id=a"), &bi, &Method::GET, None)
                .ambiguous
                .is_none()
        );
    }

    #[test]
    fn headers_swap_credentials() {
        let user = test_user("bi", false);
        let mut client = HeaderMap::new();
        client.insert("authorization", HeaderValue::from_static("Basic Ymk6cA=="));
        client.insert("x-clickhouse-key", HeaderValue::from_static("p"));
        client.insert("x-clickhouse-format", HeaderValue::from_static("JSON"));
        client.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        client.insert("x-secret", HeaderValue::from_static("1"));
        client.insert("host", HeaderValue::from_static("proxy:8123"));
        let h = headers(&client, &user, "10.0.0.9".parse().unwrap());
        assert_eq!(h["authorization"], user.account.authorization);
        assert!(h.get("x-clickhouse-key").is_none());
        assert!(
            h.get("x-secret").is_none(),
            "headers named by Connection are dropped"
        );
        assert!(h.get("host").is_none());
        assert_eq!(h["x-clickhouse-format"], "JSON");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");

        // Kept headers keep their order and every value; an earlier hop's address comes
        // first; IPv6 as `Display` writes it.
        let mut client = HeaderMap::new();
        client.append("x-a", HeaderValue::from_static("1"));
        client.append("te", HeaderValue::from_static("trailers"));
        client.append("x-b", HeaderValue::from_static("2"));
        client.append("x-a", HeaderValue::from_static("3"));
        client.append("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        client.append("x-forwarded-for", HeaderValue::from_static("192.0.2.2"));
        let h = headers(&client, &user, "2001:db8::1".parse().unwrap());
        let kept: Vec<(&str, &str)> = h
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-") && *n != "x-forwarded-for")
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(kept, [("x-a", "1"), ("x-a", "3"), ("x-b", "2")]);
        assert!(h.get("te").is_none());
        let forwarded: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(forwarded, ["192.0.2.1, 2001:db8::1"]);
        let v4 = headers(&HeaderMap::new(), &user, "255.0.10.1".parse().unwrap());
        assert_eq!(v4["x-forwarded-for"], "255.0.10.1");
    }
}
