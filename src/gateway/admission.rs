//! Admission: the one point every frontend passes, after a query is known to be allowed
//! and before it goes upstream, where per-user quotas (concurrency, queueing, rate,
//! execution time) are to be decided. What it hands out is held for as long as the query
//! runs, so a quota's slot is given back however the query ends.
//!
//! No quota is configurable yet: every query is admitted.

use std::sync::Arc;

use super::error::GatewayError;
use super::users::User;

/// A query's admission, held until it has ended.
pub struct Admission {
    user: Arc<User>,
}

impl Admission {
    pub fn user(&self) -> &Arc<User> {
        &self.user
    }
}

/// Admits one query of `user`.
pub fn admit(user: &Arc<User>) -> Result<Admission, GatewayError> {
    Ok(Admission { user: user.clone() })
}
