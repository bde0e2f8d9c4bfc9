//! The three ways a ClickHouse HTTP client presents credentials: HTTP Basic auth,
//! `X-ClickHouse-User`/`X-ClickHouse-Key` headers, and `user`/`password` URL parameters.

use http::HeaderMap;
use percent_encoding::percent_decode_str;

use crate::gateway::Credentials;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error("it is not allowed to use more than one authentication method (Authorization header, X-ClickHouse-User/Key headers, user/password parameters) in one request")]
    Ambiguous,
    #[error("the Authorization header is not valid HTTP Basic authentication")]
    MalformedBasic,
    #[error("credentials are not valid UTF-8")]
    NotUtf8,
}

/// Finds the credentials in a request. ClickHouse's rules: one method per request; with no
/// credentials at all the user is `default` with an empty password.
pub fn extract(headers: &HeaderMap, query: Option<&str>) -> Result<Credentials, CredentialsError> {
    let basic = headers.get(http::header::AUTHORIZATION);
    let header_user = headers.get("x-clickhouse-user");
    let header_key = headers.get("x-clickhouse-key");
    let (mut url_user, mut url_password) = (None, None);
    // Only names are decoded: the `query` parameter can be large and is not ours to copy.
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match decode_component(name).as_ref() {
            "user" => url_user = Some(decode_component(value).into_owned()),
            "password" => url_password = Some(decode_component(value).into_owned()),
            _ => {}
        }
    }
    let methods = [
        basic.is_some(),
        header_user.is_some() || header_key.is_some(),
        url_user.is_some() || url_password.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(CredentialsError::Ambiguous);
    }
    if let Some(value) = basic {
        return parse_basic(value.as_bytes());
    }
    if header_user.is_some() || header_key.is_some() {
        let to_string = |v: Option<&http::HeaderValue>| -> Result<String, CredentialsError> {
            v.map(|v| std::str::from_utf8(v.as_bytes()).map(str::to_owned))
                .transpose()
                .map_err(|_| CredentialsError::NotUtf8)
                .map(Option::unwrap_or_default)
        };
        return Ok(Credentials {
            user: non_empty_or_default(to_string(header_user)?),
            password: to_string(header_key)?,
        });
    }
    Ok(Credentials {
        user: non_empty_or_default(url_user.unwrap_or_default()),
        password: url_password.unwrap_or_default(),
    })
}

fn non_empty_or_default(user: String) -> String {
    if user.is_empty() {
        "default".to_string()
    } else {
        user
    }
}

fn parse_basic(value: &[u8]) -> Result<Credentials, CredentialsError> {
    use base64::Engine as _;
    let value = std::str::from_utf8(value).map_err(|_| CredentialsError::MalformedBasic)?;
    let (scheme, encoded) = value
        .trim()
        .split_once(' ')
        .ok_or(CredentialsError::MalformedBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(CredentialsError::MalformedBasic);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| CredentialsError::MalformedBasic)?;
    let decoded = String::from_utf8(decoded).map_err(|_| CredentialsError::NotUtf8)?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or(CredentialsError::MalformedBasic)?;
    Ok(Credentials {
        user: non_empty_or_default(user.to_string()),
        password: password.to_string(),
    })
}

/// Percent-decodes one query component, with `+` as space; borrows when there is nothing
/// to decode. Invalid UTF-8 is replaced, never an error: the raw component is what gets
/// forwarded.
pub fn decode_component(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let spaced = s.replace('+', " ");
    std::borrow::Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn basic_auth() {
        // "bi:p:ss" - a password may contain ':'.
        let h = headers(&[("authorization", "Basic Ymk6cDpzcw==")]);
        let c = extract(&h, Some("query=SELECT+1")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bi", "p:ss"));
        let h = headers(&[("authorization", "Basic !!!")]);
        assert_eq!(
            extract(&h, None).unwrap_err(),
            CredentialsError::MalformedBasic
        );
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(
            extract(&h, None).unwrap_err(),
            CredentialsError::MalformedBasic
        );
    }

    #[test]
    fn clickhouse_headers_and_url_parameters() {
        let h = headers(&[("x-clickhouse-user", "etl"), ("x-clickhouse-key", "k")]);
        let c = extract(&h, None).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("etl", "k"));
        let c = extract(&HeaderMap::new(), Some("user=etl&password=a%26b+c&query=x")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("etl", "a&b c"));
    }

    #[test]
    fn no_credentials_means_default_user() {
        let c = extract(&HeaderMap::new(), Some("query=SELECT+1")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("default", ""));
    }

    #[test]
    fn two_methods_are_refused() {
        let h = headers(&[("authorization", "Basic Ymk6cA==")]);
        assert_eq!(
            extract(&h, Some("user=x&password=y")).unwrap_err(),
            CredentialsError::Ambiguous
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
