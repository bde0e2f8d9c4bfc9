//! Errors the HTTP frontend answers itself, rendered the way ClickHouse renders its own
//! (`Code: N. DB::Exception: ... (NAME)`, `X-ClickHouse-Exception-Code`), so clients and
//! their error parsers treat both alike. Most are the gateway's; two are HTTP's own.
//!
//! Every message here is safe to show a client: it never names an upstream address, a
//! cluster account or a secret.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::RespBody;
use crate::clickhouse::codes::{self, Code};
use crate::gateway::{ErrorKind, GatewayError};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("Cannot read the request body: {0}")]
    RequestBody(String),
    /// A request chgate will not pass on as it is (it says why).
    #[error("{0}")]
    BadRequest(String),
}

impl HttpError {
    /// A fixed set of names for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Gateway(e) => e.kind().as_str(),
            Self::RequestBody(_) => "request_body",
            Self::BadRequest(_) => "bad_request",
        }
    }

    fn code(&self) -> Code {
        match self {
            Self::Gateway(e) => e.code(),
            Self::RequestBody(_) => codes::CANNOT_READ_ALL_DATA,
            Self::BadRequest(_) => codes::BAD_ARGUMENTS,
        }
    }

    pub fn status(&self) -> StatusCode {
        let Self::Gateway(e) = self else {
            return StatusCode::BAD_REQUEST;
        };
        match e.kind() {
            ErrorKind::AuthFailed | ErrorKind::BadCredentials => StatusCode::UNAUTHORIZED,
            ErrorKind::NetworkNotAllowed | ErrorKind::ReadOnly => StatusCode::FORBIDDEN,
            ErrorKind::NoNodeAvailable | ErrorKind::RetryBudgetExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout | ErrorKind::ExecutionTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::TooManyQueries | ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::ResultTooLarge => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn to_response(&self) -> Response<RespBody> {
        let code = self.code();
        let text = format!(
            "Code: {}. DB::Exception: {self}. ({}) (version chgate {})\n",
            code.number,
            code.name,
            env!("CARGO_PKG_VERSION")
        );
        let mut resp = Response::new(RespBody::full(Bytes::from(text)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=UTF-8"),
        );
        h.insert(
            "x-clickhouse-exception-code",
            HeaderValue::from(code.number),
        );
        if let Some(after) = match self {
            Self::Gateway(e) => e.retry_after(),
            Self::RequestBody(_) | Self::BadRequest(_) => None,
        } {
            // Whole seconds, rounded up: never 0 for a wait that has not passed.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self, Self::Gateway(e) if e.is_authentication()) {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ClickHouse server HTTP API\""),
            );
        }
        super::case::own(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_like_clickhouse() {
        let e = HttpError::from(GatewayError::AuthFailed { user: "bi".into() });
        let resp = e.to_response();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["x-clickhouse-exception-code"], "516");
        assert!(resp.headers().contains_key("www-authenticate"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(
            text.starts_with("Code: 516. DB::Exception: bi: Authentication failed"),
            "{text}"
        );
        assert!(text.contains("(AUTHENTICATION_FAILED)"));
    }

    #[test]
    fn statuses_follow_the_gateway_error() {
        let gw = |e: GatewayError| HttpError::from(e).status();
        assert_eq!(gw(GatewayError::ReadOnly { user: "u".into() }), 403);
        assert_eq!(
            gw(GatewayError::RetryBudgetExhausted {
                cluster: "c".into()
            }),
            503
        );
        assert_eq!(
            gw(GatewayError::UpstreamFailed {
                reason: "r",
                why: "w"
            }),
            502
        );
        assert_eq!(HttpError::RequestBody("x".into()).kind(), "request_body");
    }
}
