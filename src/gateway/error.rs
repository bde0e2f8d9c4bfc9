//! What the gateway refuses or fails with, without any protocol in it: each error carries
//! the ClickHouse code and name a client should see, a message safe to show it (never an
//! upstream address, a cluster account or a secret), a fixed-cardinality [`ErrorKind`] for
//! metrics and logs, and whether sending the same query again may succeed. Frontends render
//! it their way: the HTTP interface as ClickHouse's HTTP error, the native protocol (to
//! come) as an Exception packet with the same code.

use std::net::IpAddr;

use crate::clickhouse::codes::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Unknown user or wrong password; deliberately does not say which.
    #[error(
        "{user}: Authentication failed: password is incorrect, or there is no user with such name"
    )]
    AuthFailed { user: String },
    /// The credentials could not be read (the frontend says why).
    #[error("Invalid authentication: {0}")]
    BadCredentials(String),
    #[error("{user}: Connections from {ip} are not allowed for this user")]
    NetworkNotAllowed { user: String, ip: IpAddr },
    #[error("{user}: Cannot execute query in readonly mode: this user may only run SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN statements")]
    ReadOnly { user: String },
    #[error("No node of cluster {cluster} could take the query ({tried} tried): {why}")]
    NoNodeAvailable {
        cluster: String,
        tried: usize,
        why: String,
    },
    #[error("The ClickHouse node failed before it answered, and the query was not retried on another node: cluster {cluster} has spent its retry budget (too many failures right now)")]
    RetryBudgetExhausted { cluster: String },
    #[error("The connection to the ClickHouse node failed before it answered ({reason}); the query was not retried because it {why}")]
    UpstreamFailed {
        reason: &'static str,
        why: &'static str,
    },
    #[error("Timeout exceeded: no node of cluster {cluster} began to answer within {} ms (upstream.first_byte_timeout); the query was cancelled", after.as_millis())]
    Timeout {
        cluster: String,
        after: std::time::Duration,
    },
    /// The user's `max_concurrent_queries` (and its queue) is full.
    #[error("Too many simultaneous queries for user {user}. Current: {running}, maximum: {limit}{}", waited.map(|w| format!(" (waited {} s in chgate's queue)", w.as_secs_f64())).unwrap_or_default())]
    TooManyQueries {
        user: String,
        running: u32,
        limit: u32,
        waited: Option<std::time::Duration>,
    },
    /// The user's `requests_per_minute` is spent.
    #[error("Quota for user {user} has been exceeded: more than {per_minute} queries per minute (chgate quota). Try again in {} s", retry_after.as_secs_f64().ceil())]
    RateLimited {
        user: String,
        per_minute: u32,
        retry_after: std::time::Duration,
    },
    /// The user's `max_execution_time` passed; the query was killed.
    #[error("Timeout exceeded: elapsed {} seconds, maximum: {} (the quota of user {user}); the query was cancelled", elapsed.as_secs_f64(), limit.as_secs_f64())]
    ExecutionTimeout {
        user: String,
        elapsed: std::time::Duration,
        limit: std::time::Duration,
    },
    /// The user's `max_result_bytes` was reached; the result was cut and the query killed.
    #[error("Limit for result exceeded, max bytes: {limit}, current bytes: {bytes} (the quota of user {user}); the query was cancelled")]
    ResultTooLarge {
        user: String,
        limit: u64,
        bytes: u64,
    },
}

/// A fixed set of names for metric labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    AuthFailed,
    BadCredentials,
    NetworkNotAllowed,
    ReadOnly,
    NoNodeAvailable,
    RetryBudgetExhausted,
    UpstreamFailed,
    Timeout,
    TooManyQueries,
    RateLimited,
    ExecutionTimeout,
    ResultTooLarge,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthFailed => "auth_failed",
            Self::BadCredentials => "bad_credentials",
            Self::NetworkNotAllowed => "network_not_allowed",
            Self::ReadOnly => "readonly",
            Self::NoNodeAvailable => "no_node_available",
            Self::RetryBudgetExhausted => "retry_budget_exhausted",
            Self::UpstreamFailed => "upstream_failed",
            Self::Timeout => "timeout",
            Self::TooManyQueries => "too_many_queries",
            Self::RateLimited => "rate_limited",
            Self::ExecutionTimeout => "execution_timeout",
            Self::ResultTooLarge => "result_too_large",
        }
    }
}

impl GatewayError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::AuthFailed { .. } => ErrorKind::AuthFailed,
            Self::BadCredentials(_) => ErrorKind::BadCredentials,
            Self::NetworkNotAllowed { .. } => ErrorKind::NetworkNotAllowed,
            Self::ReadOnly { .. } => ErrorKind::ReadOnly,
            Self::NoNodeAvailable { .. } => ErrorKind::NoNodeAvailable,
            Self::RetryBudgetExhausted { .. } => ErrorKind::RetryBudgetExhausted,
            Self::UpstreamFailed { .. } => ErrorKind::UpstreamFailed,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::TooManyQueries { .. } => ErrorKind::TooManyQueries,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::ExecutionTimeout { .. } => ErrorKind::ExecutionTimeout,
            Self::ResultTooLarge { .. } => ErrorKind::ResultTooLarge,
        }
    }

    /// The ClickHouse code a client sees.
    pub fn code(&self) -> Code {
        match self {
            Self::AuthFailed { .. } | Self::BadCredentials(_) => codes::AUTHENTICATION_FAILED,
            Self::NetworkNotAllowed { .. } => codes::IP_ADDRESS_NOT_ALLOWED,
            Self::ReadOnly { .. } => codes::READONLY,
            Self::NoNodeAvailable { .. } | Self::RetryBudgetExhausted { .. } => {
                codes::ALL_CONNECTION_TRIES_FAILED
            }
            Self::UpstreamFailed { .. } => codes::NETWORK_ERROR,
            Self::Timeout { .. } | Self::ExecutionTimeout { .. } => codes::TIMEOUT_EXCEEDED,
            Self::TooManyQueries { .. } => codes::TOO_MANY_SIMULTANEOUS_QUERIES,
            Self::RateLimited { .. } => codes::QUOTA_EXCEEDED,
            Self::ResultTooLarge { .. } => codes::TOO_MANY_ROWS_OR_BYTES,
        }
    }

    /// The message for the client (the `Display` text: written to be safe to show).
    pub fn client_message(&self) -> String {
        self.to_string()
    }

    /// True if the same query, sent again later, may succeed: the cluster had no node for
    /// it now. False where it would fail again (credentials, policy) or where it may have
    /// run already (a connection lost after the query was sent).
    pub fn could_retry(&self) -> bool {
        matches!(
            self,
            Self::NoNodeAvailable { .. }
                | Self::RetryBudgetExhausted { .. }
                | Self::TooManyQueries { .. }
                | Self::RateLimited { .. }
        )
    }

    /// How long a client refused by a quota should wait before trying again (HTTP's
    /// `Retry-After`).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::TooManyQueries { .. } => Some(std::time::Duration::from_secs(1)),
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// True for the errors of logging in (the frontend asks the client to authenticate).
    pub fn is_authentication(&self) -> bool {
        matches!(self, Self::AuthFailed { .. } | Self::BadCredentials(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_code_kind_and_retry_policy() {
        let e = GatewayError::AuthFailed { user: "bi".into() };
        assert_eq!(e.code().number, 516);
        assert_eq!(e.kind().as_str(), "auth_failed");
        assert!(!e.could_retry() && e.is_authentication());
        let e = GatewayError::NoNodeAvailable {
            cluster: "c".into(),
            tried: 2,
            why: "x".into(),
        };
        assert_eq!(
            (e.code().number, e.code().name),
            (279, "ALL_CONNECTION_TRIES_FAILED")
        );
        assert!(e.could_retry());
        let e = GatewayError::UpstreamFailed {
            reason: "connection lost",
            why: "is not a read, and might have been executed",
        };
        assert_eq!(e.code().number, 210);
        assert!(!e.could_retry(), "it may have run");
        assert!(!GatewayError::ReadOnly { user: "bi".into() }
            .client_message()
            .contains("127.0.0"));
    }
}
