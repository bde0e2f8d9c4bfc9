//! One native Query: what the gateway decides about it, the packet the node gets instead of
//! the client's, and its accounting (metrics, access log) when it ends, however it ends.

use std::sync::Arc;
use std::time::Instant;

use crate::clickhouse::codes::{self, Code};
use crate::clickhouse::native::client::{Interface, Query, Setting};
use crate::clickhouse::native::{server, Reader};
use crate::gateway::sql::{self, SessionEffect, StatementKind};
use crate::gateway::{policy, Admission, GatewayError, Statement, User};
use crate::metrics::{GaugeGuard, METRICS};
use crate::picker::Backend;

use super::retry::Retry;

/// What chgate answers a client with instead of the node: rendered as an Exception packet.
#[derive(Debug)]
pub enum Refusal {
    Gateway(GatewayError),
    /// A node's own refusal, passed on as it said it.
    Server {
        code: i32,
        message: String,
    },
    /// The protocol: what chgate cannot relay.
    Protocol {
        code: Code,
        message: String,
    },
}

impl From<GatewayError> for Refusal {
    fn from(e: GatewayError) -> Self {
        Refusal::Gateway(e)
    }
}

impl Refusal {
    pub fn code(&self) -> i32 {
        match self {
            Refusal::Gateway(e) => i32::from(e.code().number),
            Refusal::Server { code, .. } => *code,
            Refusal::Protocol { code, .. } => i32::from(code.number),
        }
    }

    /// The Exception packet.
    pub fn packet(&self) -> Vec<u8> {
        let text = match self {
            Refusal::Gateway(e) => format!("DB::Exception: {}", e.client_message()),
            Refusal::Server { message, .. } => message.clone(),
            Refusal::Protocol { message, .. } => format!("DB::Exception: {message}"),
        };
        let mut out = Vec::with_capacity(64 + text.len());
        server::write_exception(&mut out, self.code(), &text);
        out
    }

    /// A fixed label for `chgate_native_errors_total` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Gateway(e) => e.kind().as_str(),
            Refusal::Server { .. } => "server",
            Refusal::Protocol { code, .. } => match *code {
                codes::UNKNOWN_SETTING => "unknown_setting",
                codes::QUERY_IS_TOO_LARGE => "query_too_large",
                codes::UNEXPECTED_PACKET_FROM_CLIENT | codes::UNKNOWN_PACKET_FROM_CLIENT => {
                    "unexpected_packet"
                }
                codes::NETWORK_ERROR => "upstream_lost",
                codes::NOT_IMPLEMENTED => "unsupported",
                _ => "malformed",
            },
        }
    }
}

/// What the gateway made of a Query.
pub struct Decision {
    pub statement: Statement,
    pub effect: SessionEffect,
    pub admission: Admission,
}

/// Checks `query` for `user`: its statement against the user's policy (a read-only user
/// also runs `SET` and `USE`, which the server guards with `readonly`), then admission
/// (which may wait in the user's quota queue).
pub async fn decide(user: &Arc<User>, query: &Query<'_>) -> Result<Decision, GatewayError> {
    let effect = sql::session_effect(query.text);
    let statement = match sql::classify(query.text, true) {
        StatementKind::Read => Statement::Read,
        _ if matches!(effect, SessionEffect::Set | SessionEffect::Use(_)) => Statement::Unknown,
        _ => Statement::Write,
    };
    policy::allows(user, statement)?;
    let admission = crate::gateway::admission::admit(user).await?;
    Ok(Decision {
        statement,
        effect,
        admission,
    })
}

/// The Query the node gets: the client's, with a read-only user's own `readonly` dropped
/// and the user's level added last (after the client's settings, so the server applies
/// them before it is read-only), a quota's `max_execution_time` (the client's own only
/// where it is lower; `execution_time` is the typed value), `load_balancing=in_order`
/// first with `in_order` (unless the client set it; see `route::steer_in_order`), the
/// mapped user as the quota key, the revision spoken with the node in the client info,
/// and a query id if the client sent none.
pub fn rewrite<'a>(
    query: &Query<'a>,
    user: &'a User,
    revision: u64,
    query_id: &'a str,
    readonly: &'a [u8],
    execution_time: Option<&'a [u8]>,
    in_order: bool,
) -> Query<'a> {
    let mut settings: Vec<Setting<'a>> = Vec::with_capacity(query.settings.len() + 3);
    if in_order && !query.settings.iter().any(|s| s.name == "load_balancing") {
        settings.push(Setting {
            name: "load_balancing",
            value: IN_ORDER,
        });
    }
    settings.extend(
        query
            .settings
            .iter()
            // A read-only user's own `readonly` goes (chgate sets it), and so does its
            // `replace_running_query`: every mapped user shares the cluster account, so it
            // would cancel another user's query that has the same id.
            .filter(|s| !(user.readonly && matches!(s.name, "readonly" | "replace_running_query")))
            .filter(|s| {
                // The client's own limit stays if it is stricter than the quota's.
                let Some(quota) = execution_time else {
                    return true;
                };
                s.name != "max_execution_time" || {
                    let own = Reader::new(s.value).varuint().unwrap_or(0);
                    let limit = Reader::new(quota).varuint().unwrap_or(0);
                    own > 0 && own <= limit
                }
            })
            .cloned(),
    );
    if let Some(value) = execution_time {
        if !settings.iter().any(|s| s.name == "max_execution_time") {
            settings.push(Setting {
                name: "max_execution_time",
                value,
            });
        }
    }
    if user.readonly {
        settings.push(Setting {
            name: "readonly",
            value: readonly,
        });
    }
    let mut info = query.info.clone();
    if let Some(info) = &mut info {
        info.quota_key = user.name.as_bytes();
        if let Interface::Tcp { revision: r, .. } = &mut info.interface {
            *r = revision;
        }
    }
    Query {
        query_id: query_id.as_bytes(),
        info,
        settings,
        stage: query.stage,
        compression: query.compression,
        text: query.text,
    }
}

/// `load_balancing`'s value `in_order`, typed (a String setting below revision 54429).
const IN_ORDER: &[u8] = b"\x08in_order";

/// How a query ended, as `chgate_native_queries_total` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The server answered with an exception.
    Exception,
    /// chgate refused it.
    Refused,
    /// The node was lost, or chgate could not read its answer.
    Error,
    ClientClosed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Exception => "exception",
            Status::Refused => "refused",
            Status::Error => "error",
            Status::ClientClosed => "client_closed",
        }
    }
}

/// A query under way on a node, accounted for once when it ends (or, if the connection
/// goes first, when it drops, as `client_closed`).
pub struct Running {
    pub decision: Decision,
    pub query_id: String,
    /// The session statement's text, kept to replay it (`SET`) once it succeeded.
    pub text: Option<Vec<u8>>,
    pub backend: Arc<Backend>,
    pub started: Instant,
    pub rows: u64,
    pub bytes_out: u64,
    pub access_log: bool,
    /// The node's in-flight count, held while the query runs.
    pub _in_flight: GaugeGuard,
    pub done: bool,
    /// The quota's execution limit falls due: the query is cut.
    pub deadline: Option<tokio::time::Instant>,
    /// The quota cut the query: the error the client gets at the next packet boundary.
    pub cut: Option<(GatewayError, &'static str)>,
    /// Bytes of the result (Data, Totals and Extremes packets) sent, for `max_result_bytes`.
    pub result_bytes: u64,
    /// A read: whether and how it may still move to another node.
    pub retry: Option<Retry>,
    /// A read whose node says nothing for this long moves (the cluster's hedge bound;
    /// `None`: it does not).
    pub stall_after: Option<std::time::Duration>,
    /// When the node's silence is next looked at.
    pub stall_at: Option<tokio::time::Instant>,
}

impl Running {
    /// The node sent something: its silence starts again.
    pub fn heard(&mut self) {
        if let Some(after) = self.stall_after {
            self.stall_at = Some(tokio::time::Instant::now() + after);
        }
    }

    /// Accounts for the query as `status` (with the exception's code, if any).
    pub fn finish(&mut self, status: Status, code: Option<i32>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let user = self.decision.admission.user();
        let elapsed = self.started.elapsed();
        METRICS
            .native_queries
            .with_label_values(&[&user.name, status.as_str(), self.backend.label()])
            .inc();
        METRICS
            .native_query_duration
            .with_label_values(&[&user.name])
            .observe(elapsed.as_secs_f64());
        if self.access_log {
            tracing::info!(
                target: "chgate::access",
                protocol = "native",
                user = %user.name,
                node = %self.backend.label(),
                status = status.as_str(),
                code = code.unwrap_or(0),
                read = self.decision.statement.is_read(),
                query_id = %self.query_id,
                duration_ms = format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0),
                rows = self.rows,
                bytes_out = self.bytes_out,
                "Query ended"
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.finish(Status::ClientClosed, None);
    }
}

/// Accounts for a query chgate refused before it reached a node.
pub fn refused(user: &User, refusal: &Refusal, query_id: &[u8], access_log: bool) {
    METRICS
        .native_queries
        .with_label_values(&[&user.name, Status::Refused.as_str(), "-"])
        .inc();
    METRICS
        .native_errors
        .with_label_values(&[refusal.kind()])
        .inc();
    if access_log {
        tracing::info!(
            target: "chgate::access",
            protocol = "native",
            user = %user.name,
            node = "-",
            status = Status::Refused.as_str(),
            code = refusal.code(),
            query_id = %String::from_utf8_lossy(query_id),
            reason = refusal.kind(),
            "Query refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::native::client::{varuint_value, ClientInfo};
    use crate::gateway::users::tests::test_user;

    fn query<'a>(text: &'a [u8], settings: Vec<Setting<'a>>) -> Query<'a> {
        Query {
            query_id: b"",
            info: Some(ClientInfo::initial_tcp(b"c", (1, 2), 54468, b"client's")),
            settings,
            stage: 2,
            compression: false,
            text,
        }
    }

    #[tokio::test]
    async fn read_only_users_run_reads_set_and_use_only() {
        let bi = Arc::new(test_user("bi", true));
        for q in ["SELECT 1", "SET max_threads = 1", "USE demo", "SHOW TABLES"] {
            assert!(
                decide(&bi, &query(q.as_bytes(), vec![])).await.is_ok(),
                "{q}"
            );
        }
        for q in [
            "INSERT INTO t VALUES",
            "CREATE TEMPORARY TABLE t (x UInt8)",
            "DROP TABLE t",
            "",
        ] {
            assert!(
                matches!(
                    decide(&bi, &query(q.as_bytes(), vec![])).await,
                    Err(GatewayError::ReadOnly { .. })
                ),
                "{q}"
            );
        }
        let etl = Arc::new(test_user("etl", false));
        assert!(decide(&etl, &query(b"INSERT INTO t VALUES", vec![]))
            .await
            .is_ok());
    }

    #[test]
    fn rewrite_replaces_readonly_and_the_quota_key() {
        let bi = test_user("bi", true);
        let zero = varuint_value(0);
        let one = varuint_value(1);
        let q = query(
            b"SELECT 1",
            vec![
                Setting {
                    name: "readonly",
                    value: &zero,
                },
                Setting {
                    name: "max_execution_time",
                    value: &one,
                },
            ],
        );
        let r = rewrite(&q, &bi, 54412, "id-1", &one, None, false);
        let names: Vec<_> = r.settings.iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            names,
            vec![("max_execution_time", &one[..]), ("readonly", &one[..])]
        );
        let info = r.info.unwrap();
        assert_eq!(info.quota_key, b"bi");
        assert!(matches!(
            info.interface,
            Interface::Tcp {
                revision: 54412,
                ..
            }
        ));
        assert_eq!(r.query_id, b"id-1");
        // A user that is not read-only keeps whatever it sent.
        let etl = test_user("etl", false);
        let r = rewrite(&q, &etl, 54412, "id-2", &one, None, false);
        assert_eq!(r.settings.len(), 2);
        assert_eq!(r.settings[0].value, &zero[..]);
    }

    #[test]
    fn in_order_goes_first_unless_the_client_chose_its_load_balancing() {
        let bi = test_user("bi", true);
        let one = varuint_value(1);
        let threads = varuint_value(2);
        let q = query(
            b"SELECT 1",
            vec![
                Setting {
                    name: "max_threads",
                    value: &threads,
                },
                // Dropped for a read-only user: it would cancel another user's query.
                Setting {
                    name: "replace_running_query",
                    value: &one,
                },
            ],
        );
        let r = rewrite(&q, &bi, 54412, "id", &one, None, true);
        let names: Vec<_> = r.settings.iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["load_balancing", "max_threads", "readonly"]);
        assert_eq!(r.settings[0].value, b"\x08in_order");
        let own = b"\x06random";
        let q = query(
            b"SELECT 1",
            vec![Setting {
                name: "load_balancing",
                value: own,
            }],
        );
        let r = rewrite(&q, &bi, 54412, "id", &one, None, true);
        let found: Vec<_> = r.settings.iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            found,
            vec![("load_balancing", &own[..]), ("readonly", &one[..])]
        );
        // The rewritten packet reads back: the value is typed as the server expects.
        let mut out = Vec::new();
        rewrite(&q, &bi, 54412, "id", &one, None, true).write(&mut out, 54412);
        assert!(Query::read(&out, 54412).is_ok());
    }

    #[test]
    fn a_quota_execution_limit_goes_upstream_unless_the_client_is_stricter() {
        let etl = test_user("etl", false);
        let one = varuint_value(1);
        let ten = varuint_value(10);
        let zero = varuint_value(0);
        let own = |value| {
            query(
                b"SELECT 1",
                vec![Setting {
                    name: "max_execution_time",
                    value,
                }],
            )
        };
        let limit = |q: &Query<'_>| {
            let r = rewrite(q, &etl, 54412, "id", &one, Some(&ten), false);
            let found: Vec<_> = r
                .settings
                .iter()
                .filter(|s| s.name == "max_execution_time")
                .map(|s| s.value.to_vec())
                .collect();
            assert_eq!(found.len(), 1, "exactly one");
            found[0].clone()
        };
        assert_eq!(limit(&query(b"SELECT 1", vec![])), ten);
        assert_eq!(limit(&own(&one)), one, "stricter: kept");
        assert_eq!(limit(&own(&zero)), ten, "0 (no limit) is not stricter");
        assert_eq!(limit(&own(&varuint_value(99))), ten);
    }
}
