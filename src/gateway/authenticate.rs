//! Logging a client in: its credentials against the configured users, with failing
//! addresses slowed down, then the user's allowed networks.

use std::net::IpAddr;
use std::sync::Arc;

use super::error::GatewayError;
use super::users::User;
use super::Gateway;
use crate::metrics::METRICS;

/// What a client presented, however its protocol carries it. The password is kept only for
/// verification.
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The user these credentials log in as, from `ip`. An unknown user and a wrong
    /// password fail alike (only the metric tells them apart) and cost the same time; an
    /// address that keeps failing waits longer before each attempt. The network check comes
    /// after the password, so it tells nothing to someone who does not know it.
    pub async fn authenticate(
        &self,
        creds: &Credentials,
        ip: IpAddr,
    ) -> Result<Arc<User>, GatewayError> {
        if let Some(delay) = self.throttle.reserve(ip) {
            tokio::time::sleep(delay).await;
        }
        let failed = |reason: &str| {
            self.throttle.failure(ip, &creds.user);
            METRICS.auth_failures.with_label_values(&[reason]).inc();
            Err(GatewayError::AuthFailed {
                user: creds.user.clone(),
            })
        };
        let user = self.generation().users.get(creds.user.as_str()).cloned();
        let Some(user) = user else {
            self.verifier
                .reject_unknown(&creds.user, &creds.password)
                .await;
            return failed("unknown_user");
        };
        if !self
            .verifier
            .verify(&user.name, &user.password, &creds.password)
            .await
        {
            return failed("bad_password");
        }
        self.throttle.success(ip, &creds.user);
        if !user.networks.is_empty() && !user.networks.iter().any(|n| n.contains(&ip)) {
            METRICS
                .auth_failures
                .with_label_values(&["network_not_allowed"])
                .inc();
            return Err(GatewayError::NetworkNotAllowed {
                user: creds.user.clone(),
                ip,
            });
        }
        Ok(user)
    }

    /// Credentials a frontend could not read (`reason` says why): counted like any failed
    /// login.
    pub fn bad_credentials(&self, reason: String) -> GatewayError {
        METRICS
            .auth_failures
            .with_label_values(&["bad_credentials"])
            .inc();
        GatewayError::BadCredentials(reason)
    }
}
