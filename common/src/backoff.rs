//! Exponential backoff, as a pure schedule plus a thin random wrapper, and the policies the
//! hub, the agent and the bench retry with.
//
// `backon` was considered: its jitter adds up to a whole extra delay (so it overshoots the
// cap) and its schedules are stateful iterators, while callers here keep an attempt count per
// stack and need "equal jitter" bounded by the cap.

use std::time::Duration;

/// The agent's retries of hub requests (desired state, deployment objects, events, heartbeats);
/// the bench's simulated agents use it too.
pub const AGENT_HUB: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The agent's retries of a stack whose apply, prune or delete failed.
pub const AGENT_RETRY: Backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));

/// The hub's reconnections of a lost PostgreSQL notification listener, un-jittered
/// ([`Backoff::ceiling`]): the hub is one process, there is no fleet to spread.
pub const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

/// The hub's retries of an alert notification its channel did not accept (until the
/// retry window, 24 hours by default, runs out).
pub const NOTIFICATION: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

/// An exponential backoff policy: `initial * 2^attempt`, capped at `max`, with "equal jitter"
/// (half the delay fixed, half random) so a fleet of agents does not retry in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The un-jittered delay before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt`, for a random `unit` in `[0, 1)`: between half
    /// of [`Backoff::ceiling`] and the ceiling itself.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        half + (ceiling - half).mul_f64(unit)
    }

    /// [`Backoff::delay`] with a fresh random number.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

    #[test]
    fn delays_double_until_the_cap() {
        let ceilings: Vec<u64> = (0..9).map(|a| POLICY.ceiling(a).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(POLICY.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_the_full_ceiling() {
        for attempt in 0..10 {
            let ceiling = POLICY.ceiling(attempt);
            assert_eq!(POLICY.delay(attempt, 0.0), ceiling / 2);
            assert_eq!(POLICY.delay(attempt, 1.0), ceiling);
            let mid = POLICY.delay(attempt, 0.5);
            assert!(mid > ceiling / 2 && mid < ceiling, "{mid:?} vs {ceiling:?}");
            let random = POLICY.jittered(attempt);
            assert!(random >= ceiling / 2 && random <= ceiling);
        }
    }

    #[test]
    fn nonsense_random_input_falls_back_to_the_minimum() {
        assert_eq!(POLICY.delay(2, f64::NAN), Duration::from_secs(2));
        assert_eq!(POLICY.delay(2, -3.0), Duration::from_secs(2));
        assert_eq!(POLICY.delay(2, 7.0), Duration::from_secs(4));
    }

    #[test]
    fn the_shared_policies_keep_their_timings() {
        assert_eq!(AGENT_HUB, POLICY);
        let retry: Vec<u64> = (0..10).map(|a| AGENT_RETRY.ceiling(a).as_secs()).collect();
        assert_eq!(retry, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        let reconnect: Vec<u128> = (0..8).map(|a| RECONNECT.ceiling(a).as_millis()).collect();
        assert_eq!(reconnect, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        let notification: Vec<u64> = (0..11).map(|a| NOTIFICATION.ceiling(a).as_secs()).collect();
        assert_eq!(notification, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
