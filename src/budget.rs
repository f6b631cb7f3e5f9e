//! The deadline: when the hook must return, and when it may.
//!
//! Kubernetes starts the grace countdown before the hook runs, and a repeated delivery of the
//! hook shares that countdown, so every instant here is anchored at the *first* invocation's
//! start (handed over by `coordinate`), not at this process's start. Instants are shared
//! between processes as `CLOCK_MONOTONIC` readings, which all processes on a machine agree on
//! and which wall-clock changes cannot move. This module computes; it must never sleep.

use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};

use crate::config::BudgetConfig;

#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub config: BudgetConfig,
    /// The first invocation's start: the beginning of this termination.
    pub start: Instant,
    /// start + grace - reserve: the hook returns by then, drained or not.
    pub deadline: Instant,
    /// start + min-wait: the hook does not return before then.
    pub earliest: Instant,
}

impl Budget {
    pub fn new(config: BudgetConfig, start: Instant) -> Budget {
        Budget {
            config,
            start,
            deadline: start + config.total(),
            earliest: start + config.min_wait,
        }
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.start)
    }

    pub fn left(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }
}

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock `Instant` reads on Linux.
pub fn monotonic_nanos() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// The `Instant` at which `CLOCK_MONOTONIC` read `nanos`, as seen from this process.
/// Readings from the future (a corrupt state file) are clamped to now.
pub fn instant_at(nanos: u64) -> Instant {
    let (now, now_nanos) = (Instant::now(), monotonic_nanos());
    let ago = Duration::from_nanos(now_nanos.saturating_sub(nanos));
    now.checked_sub(ago).unwrap_or(now)
}

/// The `CLOCK_MONOTONIC` reading of an `Instant` in this process, past or future.
pub fn nanos_at(instant: Instant) -> u64 {
    let (now, now_nanos) = (Instant::now(), monotonic_nanos());
    if instant <= now {
        now_nanos.saturating_sub((now - instant).as_nanos() as u64)
    } else {
        now_nanos.saturating_add((instant - now).as_nanos() as u64)
    }
}

/// Formats seconds for progress lines: `12.3s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_grace_minus_reserve_from_first_start() {
        let start = Instant::now();
        let config = BudgetConfig {
            grace: Duration::from_secs(300),
            reserve: Duration::from_secs(5),
            min_wait: Duration::from_secs(10),
            quiet_for: Duration::ZERO,
        };
        let budget = Budget::new(config, start);
        assert_eq!(budget.deadline - start, Duration::from_secs(295));
        assert_eq!(budget.earliest - start, Duration::from_secs(10));
        assert_eq!(
            budget.left(start + Duration::from_secs(300)),
            Duration::ZERO
        );
    }

    #[test]
    fn monotonic_round_trip() {
        let then = Instant::now().checked_sub(Duration::from_secs(3)).unwrap();
        let back = instant_at(nanos_at(then));
        let drift = if back > then {
            back - then
        } else {
            then - back
        };
        assert!(drift < Duration::from_millis(50), "{drift:?}");
        // A reading from the future is clamped, never panics.
        let _ = instant_at(u64::MAX);
    }
}
