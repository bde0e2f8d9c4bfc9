//! Errors the proxy answers itself, rendered the way ClickHouse renders its own, so clients
//! and their error parsers (which look for `Code: N`) treat them alike.
//!
//! Every message here is safe to show a client: it never names an upstream address, a
//! cluster account or a secret.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::RespBody;
use crate::auth::CredentialsError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Unknown user or wrong password; deliberately does not say which.
    #[error(
        "{user}: Authentication failed: password is incorrect, or there is no user with such name"
    )]
    AuthFailed { user: String },
    #[error("Invalid authentication: {0}")]
    BadCredentials(#[from] CredentialsError),
    #[error("{user}: Connections from {ip} are not allowed for this user")]
    NetworkNotAllowed { user: String, ip: std::net::IpAddr },
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
    #[error("Cannot read the request body: {0}")]
    RequestBody(String),
    #[error("There is no handle {0}. Use / for queries and /ping for a liveness check")]
    UnknownHandler(String),
}

/// A fixed set of names for metric labels and logs.
impl ClientError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AuthFailed { .. } => "auth_failed",
            Self::BadCredentials(_) => "bad_credentials",
            Self::NetworkNotAllowed { .. } => "network_not_allowed",
            Self::ReadOnly { .. } => "readonly",
            Self::NoNodeAvailable { .. } => "no_node_available",
            Self::RetryBudgetExhausted { .. } => "retry_budget_exhausted",
            Self::UpstreamFailed { .. } => "upstream_failed",
            Self::RequestBody(_) => "request_body",
            Self::UnknownHandler(_) => "unknown_handler",
        }
    }

    /// The ClickHouse error code and name this corresponds to.
    fn code(&self) -> (u16, &'static str) {
        match self {
            Self::AuthFailed { .. } | Self::BadCredentials(_) => (516, "AUTHENTICATION_FAILED"),
            Self::NetworkNotAllowed { .. } => (195, "IP_ADDRESS_NOT_ALLOWED"),
            Self::ReadOnly { .. } => (164, "READONLY"),
            Self::NoNodeAvailable { .. } | Self::RetryBudgetExhausted { .. } => {
                (279, "ALL_CONNECTION_TRIES_FAILED")
            }
            Self::UpstreamFailed { .. } => (210, "NETWORK_ERROR"),
            Self::RequestBody(_) => (33, "CANNOT_READ_ALL_DATA"),
            Self::UnknownHandler(_) => (0, "UNKNOWN_HANDLER"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::AuthFailed { .. } | Self::BadCredentials(_) => StatusCode::UNAUTHORIZED,
            Self::NetworkNotAllowed { .. } | Self::ReadOnly { .. } => StatusCode::FORBIDDEN,
            Self::NoNodeAvailable { .. } | Self::RetryBudgetExhausted { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            Self::UnknownHandler(_) => StatusCode::NOT_FOUND,
        }
    }

    pub fn to_response(&self) -> Response<RespBody> {
        let (code, name) = self.code();
        let text = format!(
            "Code: {code}. DB::Exception: {self}. ({name}) (version chgate {})\n",
            env!("CARGO_PKG_VERSION")
        );
        let mut resp = Response::new(RespBody::full(Bytes::from(text)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
        h.insert("x-clickhouse-exception-code", HeaderValue::from(code));
        if matches!(self, Self::AuthFailed { .. } | Self::BadCredentials(_)) {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ClickHouse server HTTP API\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_like_clickhouse() {
        let e = ClientError::AuthFailed { user: "bi".into() };
        let resp = e.to_response();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["x-clickhouse-exception-code"], "516");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.starts_with("Code: 516. DB::Exception: bi: Authentication failed"),
            "{text}"
        );
        assert!(text.contains("(AUTHENTICATION_FAILED)"));
    }
}
