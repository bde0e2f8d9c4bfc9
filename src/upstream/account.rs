//! Real cluster accounts, ready to authenticate requests to the nodes.

use base64::Engine as _;
use http::HeaderValue;

use crate::config::AccountConfig;
use crate::secret::Secret;

/// A real cluster account, ready to authenticate requests.
pub struct Account {
    pub user: String,
    /// `Basic base64(user:password)`, marked sensitive so it is never logged by hyper.
    pub authorization: HeaderValue,
    /// The password itself, for the native protocol's Hello.
    pub password: Secret,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Account {
    pub fn new(config: &AccountConfig, secret: &Secret) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            config.user,
            secret.expose()
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}"))
            .expect("base64 is a valid header value");
        authorization.set_sensitive(true);
        Self {
            user: config.user.clone(),
            authorization,
            password: secret.clone(),
        }
    }
}
