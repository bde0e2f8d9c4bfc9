//! A node's health as the picker sees it: hysteresis on probe results and a slow-start
//! ramp after recovery.
//!
//! - Up -> Down after `fall` consecutive failures; Down -> Up after `rise` consecutive
//!   successes. One result never flips a node.
//! - After coming back, a node's weight ramps linearly from `SLOW_START_FLOOR` to full over
//!   `slow_start`, so a recovered node is not flooded while its caches are cold.
//! - [`Health::record`] returns the transition, if any, so the caller logs exactly once.

use std::time::Duration;

use tokio::time::Instant;

/// The share of full weight a node gets the moment it comes back.
pub const SLOW_START_FLOOR: f64 = 0.1;

#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub fall: u32,
    pub rise: u32,
    pub slow_start: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameBack,
}

#[derive(Debug, Clone)]
pub struct Health {
    config: HealthConfig,
    state: State,
    failures: u32,
    successes: u32,
    /// When the node last came back; `None` for a node that has been up since the start.
    recovered_at: Option<Instant>,
}

impl Health {
    /// A node starts up at full weight: at startup nothing is known against it.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            state: State::Up,
            failures: 0,
            successes: 0,
            recovered_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Applies new thresholds (after a reload) without forgetting the current state.
    pub fn set_config(&mut self, config: HealthConfig) {
        self.config = config;
    }

    /// Time left in the slow-start ramp, if the node is ramping.
    pub fn ramp_remaining(&self) -> Option<Duration> {
        match (self.state, self.recovered_at) {
            (State::Up, Some(at)) => self.config.slow_start.checked_sub(at.elapsed()),
            _ => None,
        }
    }

    /// Records one probe result.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.state == State::Down && self.successes >= self.config.rise.max(1) {
                self.state = State::Up;
                self.recovered_at = Some(Instant::now());
                return Some(Transition::CameBack);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.state == State::Up && self.failures >= self.config.fall.max(1) {
                self.state = State::Down;
                self.recovered_at = None;
                return Some(Transition::WentDown);
            }
        }
        None
    }

    /// The share of its weight the node gets now: 0 while down, ramping to 1 after recovery.
    pub fn ramp(&self) -> f64 {
        match (self.state, self.recovered_at) {
            (State::Down, _) => 0.0,
            (State::Up, None) => 1.0,
            (State::Up, Some(at)) => {
                let total = self.config.slow_start.as_secs_f64();
                if total <= 0.0 {
                    return 1.0;
                }
                let progress = (at.elapsed().as_secs_f64() / total).min(1.0);
                SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * progress
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(HealthConfig {
            fall: 3,
            rise: 2,
            slow_start: Duration::from_secs(30),
        })
    }

    #[test]
    fn flips_only_after_consecutive_results() {
        let mut h = health();
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the failure count");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(Transition::WentDown));
        assert_eq!(h.state(), State::Down);
        assert_eq!(h.record(false), None, "the transition is reported once");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "a failure resets the success count");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(Transition::CameBack));
        assert_eq!(h.record(true), None);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_linearly_after_recovery() {
        let mut h = health();
        assert_eq!(h.ramp(), 1.0, "up since the start: full weight");
        for _ in 0..3 {
            h.record(false);
        }
        assert_eq!(h.ramp(), 0.0);
        h.record(true);
        h.record(true);
        assert!((h.ramp() - SLOW_START_FLOOR).abs() < 1e-9);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!((h.ramp() - (SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * 0.5)).abs() < 1e-9);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(h.ramp(), 1.0);
    }
}
