//! The deadlines of a termination: when the hook must return, when it may, and when the
//! kubelet kills the container.
//!
//! Kubernetes starts the grace countdown before the hook runs, and a repeated delivery of the
//! hook shares that countdown, so every instant here is anchored at the *first* invocation's
//! start (handed over by `coordinate`), not at this process's start. Instants are shared
//! between processes as `CLOCK_MONOTONIC` readings, which all processes on a machine agree on
//! and which wall-clock changes cannot move. All deadline arithmetic lives here; this module
//! computes, and must never sleep.

use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};

use crate::config::BudgetConfig;

/// The kubelet's one-off extension when a hook is still running as the grace period ends:
/// two more seconds, then SIGKILL to everything in the container.
pub const KUBELET_EXTENSION: Duration = Duration::from_secs(2);

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

    /// start + grace: when the kubelet's grace period ends.
    pub fn grace_end(&self) -> Instant {
        self.start + self.config.grace
    }

    /// When the kubelet sends SIGKILL: at the end of the grace period, or
    /// `KUBELET_EXTENSION` later if the hook was still running then.
    pub fn kill_at(&self, hook_overran: bool) -> Instant {
        if hook_overran {
            self.grace_end() + KUBELET_EXTENSION
        } else {
            self.grace_end()
        }
    }

    /// When this termination is over for sure, whatever the hook did: the latest SIGKILL.
    pub fn termination_end(&self) -> Instant {
        self.kill_at(true)
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

/// The same moment read as an `Instant` and as `CLOCK_MONOTONIC` nanoseconds: the bridge
/// between this process's instants and the readings other processes hand over.
#[derive(Clone, Copy, Debug)]
struct Reading {
    instant: Instant,
    nanos: u64,
}

impl Reading {
    fn now() -> Reading {
        Reading {
            instant: Instant::now(),
            nanos: monotonic_nanos(),
        }
    }

    /// The `Instant` at which `CLOCK_MONOTONIC` read `nanos`; readings from after this one
    /// (a corrupt state file) are clamped to it.
    fn instant_at(self, nanos: u64) -> Instant {
        let ago = Duration::from_nanos(self.nanos.saturating_sub(nanos));
        self.instant.checked_sub(ago).unwrap_or(self.instant)
    }

    /// The `CLOCK_MONOTONIC` reading of `instant`, past or future.
    fn nanos_at(self, instant: Instant) -> u64 {
        if instant <= self.instant {
            self.nanos
                .saturating_sub((self.instant - instant).as_nanos() as u64)
        } else {
            self.nanos
                .saturating_add((instant - self.instant).as_nanos() as u64)
        }
    }
}

/// The `Instant` at which `CLOCK_MONOTONIC` read `nanos`, as seen from this process.
/// Readings from the future (a corrupt state file) are clamped to now.
pub fn instant_at(nanos: u64) -> Instant {
    Reading::now().instant_at(nanos)
}

/// The `CLOCK_MONOTONIC` reading of an `Instant` in this process, past or future.
pub fn nanos_at(instant: Instant) -> u64 {
    Reading::now().nanos_at(instant)
}

/// Formats seconds for progress lines: `12.3s`.
pub fn secs(d: Duration) -> String {
    format!("{}s", decimal(d, 1))
}

/// Seconds with `places` decimals, rounded: `decimal(1.25 s, 1)` is `1.3`. Integer
/// arithmetic: formatting floats would cost the binary about 18 KB.
pub fn decimal(d: Duration, places: u32) -> String {
    let scale = 10u128.pow(places);
    let n = (d.as_nanos() * scale + 500_000_000) / 1_000_000_000;
    if places == 0 {
        return n.to_string();
    }
    format!(
        "{}.{:0width$}",
        n / scale,
        n % scale,
        width = places as usize
    )
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
        assert_eq!(budget.kill_at(false) - start, Duration::from_secs(300));
        assert_eq!(budget.termination_end() - start, Duration::from_secs(302));
    }

    #[test]
    fn decimals_round_like_a_float_would_print() {
        let ms = Duration::from_millis;
        assert_eq!(secs(ms(12_345)), "12.3s");
        assert_eq!(secs(ms(1_250)), "1.3s");
        assert_eq!(secs(ms(0)), "0.0s");
        assert_eq!(decimal(ms(2_001), 3), "2.001");
        assert_eq!(decimal(Duration::from_nanos(999_999_999), 3), "1.000");
        assert_eq!(decimal(ms(1_500), 0), "2");
    }

    #[test]
    fn monotonic_readings_round_trip_exactly() {
        let reading = Reading::now();
        // Back as far as the boot, the oldest reading there can be.
        for offset in [0, 1, reading.nanos / 2, reading.nanos] {
            let offset = Duration::from_nanos(offset);
            let past = reading.instant.checked_sub(offset).unwrap();
            assert_eq!(reading.instant_at(reading.nanos_at(past)), past);
            let future = reading.instant + offset;
            assert_eq!(
                reading.nanos_at(future),
                reading.nanos + offset.as_nanos() as u64
            );
        }
        // A reading from the future is clamped, never panics.
        assert_eq!(reading.instant_at(u64::MAX), reading.instant);
    }

    #[test]
    fn instants_and_monotonic_readings_are_one_clock() {
        let before = monotonic_nanos();
        let nanos = nanos_at(Instant::now());
        let after = monotonic_nanos();
        assert!(
            before <= nanos && nanos <= after,
            "{before} {nanos} {after}"
        );
    }
}
