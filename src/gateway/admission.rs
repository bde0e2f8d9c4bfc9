//! Admission: the one point every frontend passes, after a query is known to be allowed
//! and before it goes upstream, where the user's quota decides (see [`super::quota`]):
//! the rate, a concurrency slot (perhaps after a wait in the queue), and the limits the
//! frontend enforces while the query runs (execution time, result bytes). What it hands out
//! is held for as long as the query runs, so a slot is given back however the query ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::GatewayError;
use super::quota::Slot;
use super::users::User;

/// A query's admission, held until it has ended.
pub struct Admission {
    user: Arc<User>,
    slot: Option<Slot>,
    execution_limit: Option<Duration>,
    result_limit: Option<u64>,
    admitted_at: Instant,
}

impl Admission {
    pub fn user(&self) -> &Arc<User> {
        &self.user
    }

    /// The quota's `max_execution_time`: the frontend kills the query at it.
    pub fn execution_limit(&self) -> Option<Duration> {
        self.execution_limit
    }

    /// The quota's `max_result_bytes`: the frontend cuts the answer at it.
    pub fn result_limit(&self) -> Option<u64> {
        self.result_limit
    }

    /// When the query was let through (its execution time counts from here, not from
    /// its arrival: time in the queue is not execution).
    pub fn admitted_at(&self) -> Instant {
        self.admitted_at
    }

    /// Whether the query holds a quota's slot (for tests and the access log).
    pub fn limited(&self) -> bool {
        self.slot.is_some()
    }
}

/// Admits one query of `user`, waiting in its quota's queue if it has to.
pub async fn admit(user: &Arc<User>) -> Result<Admission, GatewayError> {
    let Some(limiter) = &user.quota else {
        return Ok(Admission {
            user: user.clone(),
            slot: None,
            execution_limit: None,
            result_limit: None,
            admitted_at: Instant::now(),
        });
    };
    let slot = limiter.admit().await?;
    Ok(Admission {
        user: user.clone(),
        execution_limit: slot.execution_limit,
        result_limit: slot.result_limit,
        slot: Some(slot),
        admitted_at: Instant::now(),
    })
}
