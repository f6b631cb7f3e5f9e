//! Waiting until in-flight work has drained: the conditions and the one loop that watches
//! them all.
//!
//! Each condition (`locks`, `process`) owns an event source (an inotify instance, a pidfd)
//! and keeps its own count of what is in flight, updated from events. The loop `poll`s those
//! sources together with the interrupt signalfd and sleeps exactly until the next thing that
//! can matter: an event, the deadline, the next progress line, the end of `--min-wait` or
//! `--quiet-for`. Polling at `--poll-interval` happens only for conditions that have no event
//! source. The loop must never rescan on every event, and never spin.
//!
//! A stream of events (thousands of lock files removed a second) is coalesced: while much is
//! still in flight, events are handled at most once per `COALESCE`, in one batch, because the
//! wake-ups, not the events, are what costs CPU. A round of the loop allocates nothing: the
//! poll set is reused. Timed wake-ups are exact (see `POLL_SLACK`), and so is the exit at the
//! deadline: event sources whose teardown would delay it are given up just before (see
//! `RELEASE_BEFORE_DEADLINE`).

pub mod locks;
pub mod process;

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;

use crate::budget::{Budget, secs};
use crate::config::WaitPlan;
use crate::interrupt::Interrupts;
use crate::report::{Record, Reporter, Value};

/// How many in-flight items a progress line or summary names before it says "and N more".
pub const NAMED_IN_FLIGHT: usize = 10;

/// The kernel lets a poll timeout fire late by 0.1% of its length (0.5% for a niced process),
/// capped at 100 ms (`select_estimate_accuracy`), to batch timer interrupts: a 295 s wait for
/// the deadline could end 100 ms past it. So a wait for the deadline (or the end of
/// `--min-wait`/`--quiet-for`) longer than `EXACT_WAIT` stops short by the most that slack can
/// be, and the rest is waited with a short timeout whose slack is negligible: one extra
/// wake-up per such wait. Progress lines and polls do not need that precision.
const POLL_SLACK: f64 = 0.005;
const POLL_SLACK_MAX: Duration = Duration::from_millis(100);
/// Waits up to this long are taken in one go: their slack is at most a millisecond.
const EXACT_WAIT: Duration = Duration::from_millis(200);

/// After a wake-up that handled events with at least `COALESCE_FROM` items still in flight,
/// the event sources rest for `COALESCE`, so that the events of the next few milliseconds are
/// read in one go: at 2,000 removals a second that is a quarter of the wake-ups. With fewer in
/// flight, the next event may well be the last one, and each is handled the moment it comes;
/// only a burst that empties a large set within the rest waits for it, by at most `COALESCE`.
/// Signals are watched throughout.
const COALESCE: Duration = Duration::from_millis(2);
const COALESCE_FROM: usize = 64;

/// Closing an inotify instance makes the process wait until the kernel has torn its watches
/// down (an SRCU grace period: from a fraction of a millisecond to tens of milliseconds on a
/// busy machine), and a process closes its fds on exit. So this long before the deadline the
/// conditions release their event sources (`Condition::release`), giving the kernel that time
/// while prestop still waits, and are looked at every `RELEASED_POLL` from then on, and once
/// more at the deadline itself: a drain in those last milliseconds is still seen.
const RELEASE_BEFORE_DEADLINE: Duration = Duration::from_millis(25);
const RELEASED_POLL: Duration = Duration::from_millis(5);

/// One thing that must be true for the container to count as drained.
pub trait Condition {
    /// What is waited for, as the user would say it: `lock /app/lock/*.lock`, `pid 42`.
    fn label(&self) -> &str;
    /// The event source to poll, or `None` if this condition can only be polled.
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// The event source is readable: consume every queued event, then update the count.
    fn on_ready(&mut self);
    /// Whether this condition has no event source and must be re-checked by polling.
    fn polled(&self) -> bool;
    /// Re-check from scratch (the fallback when there is no event source).
    fn refresh(&mut self);
    /// How many items are still in flight.
    fn in_flight(&self) -> usize;
    /// Appends up to `limit` in-flight items, each as `lock PATH` or `pid N`.
    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize);
    /// Where this condition stands, for `prestop check`: `drained`, or what is in flight.
    fn state(&self) -> String {
        let total = self.in_flight();
        if total == 0 {
            return "drained".into();
        }
        let mut named = Vec::new();
        self.name_in_flight(&mut named, NAMED_IN_FLIGHT);
        format!("{total} in flight ({})", list(total, &named))
    }
    /// The deadline is near: give up an event source whose teardown would hold up the
    /// process's exit, and be `polled` from now on. Nothing to do for most sources.
    fn release(&mut self) {}
}

/// Builds the conditions of a wait plan, each taking its first look.
pub fn conditions(plan: &WaitPlan, report: Option<&Reporter>) -> Vec<Box<dyn Condition>> {
    let mut conditions: Vec<Box<dyn Condition>> = Vec::new();
    for glob in &plan.locks {
        conditions.push(Box::new(locks::LockWait::new(glob.clone(), report)));
    }
    for target in &plan.pids {
        for wait in process::ProcessWait::for_target(target, report) {
            conditions.push(Box::new(wait));
        }
    }
    conditions
}

/// Everything in flight across conditions, named up to `limit`.
pub fn in_flight(conditions: &[Box<dyn Condition>], limit: usize) -> (usize, Vec<String>) {
    let total = conditions.iter().map(|c| c.in_flight()).sum();
    let mut named = Vec::new();
    for c in conditions {
        if named.len() >= limit {
            break;
        }
        let room = limit - named.len();
        c.name_in_flight(&mut named, room);
    }
    (total, named)
}

/// `a, b, c` or `a, b, c and 12 more`.
pub fn list(total: usize, named: &[String]) -> String {
    let mut text = named.join(", ");
    if total > named.len() {
        let _ = write!(text, " and {} more", total - named.len());
    }
    text
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Drained,
    Exhausted,
    Interrupted(Signal),
}

pub struct Loop<'a> {
    pub budget: &'a Budget,
    pub poll_interval: Duration,
    pub progress_interval: Duration,
    pub report: &'a Reporter,
    pub interrupts: Option<&'a Interrupts>,
}

impl Loop<'_> {
    /// Waits until every condition has held continuously for `--quiet-for`, no earlier than
    /// `--min-wait`, and no later than the deadline.
    pub fn run(&self, conditions: &mut [Box<dyn Condition>]) -> Outcome {
        let budget = self.budget;
        let mut was_drained: Vec<bool> = conditions.iter().map(|c| c.in_flight() == 0).collect();
        let mut drained_since: Option<Instant> = None;
        let mut next_progress = Instant::now() + self.progress_interval;
        let mut next_poll = Instant::now() + self.poll_interval;
        let mut set = PollSet::default();
        let mut resting_until: Option<Instant> = None;
        let release_at = budget
            .deadline
            .checked_sub(RELEASE_BEFORE_DEADLINE)
            .unwrap_or(budget.deadline);
        let mut released = false;

        loop {
            let now = Instant::now();
            if !released && now >= release_at {
                for c in conditions.iter_mut() {
                    c.release();
                }
                released = true;
                next_poll = now;
            }
            let polled = conditions.iter().any(|c| c.polled());
            // Once released, the last look is at the deadline, whatever the poll schedule.
            let last_look = released && now >= budget.deadline;
            if polled && (now >= next_poll || last_look) {
                for c in conditions.iter_mut().filter(|c| c.polled()) {
                    c.refresh();
                }
                let interval = if released {
                    self.poll_interval.min(RELEASED_POLL)
                } else {
                    self.poll_interval
                };
                next_poll = now + interval;
            }
            let all_drained = self.note_drained(conditions, &mut was_drained, now);
            drained_since = match (all_drained, drained_since) {
                (true, Some(since)) => Some(since),
                (true, None) => Some(now),
                (false, _) => None,
            };
            let settled_at =
                drained_since.map(|since| (since + budget.config.quiet_for).max(budget.earliest));
            if settled_at.is_some_and(|at| now >= at) {
                return Outcome::Drained;
            }
            if now >= budget.deadline {
                return Outcome::Exhausted;
            }
            if now >= next_progress {
                self.progress(conditions, now);
                while next_progress <= now {
                    next_progress += self.progress_interval;
                }
            }

            // The deadline and the end of --min-wait / --quiet-for must be met exactly; a
            // progress line or a poll may come a few milliseconds late.
            let mut exact = settled_at.map_or(budget.deadline, |at| at.min(budget.deadline));
            if !released {
                exact = exact.min(release_at);
            }
            let mut wake = exact.min(next_progress);
            if polled {
                wake = wake.min(next_poll);
            }
            resting_until = resting_until.filter(|&until| until > now);
            if let Some(until) = resting_until {
                wake = wake.min(until);
            }

            set.fill(conditions, resting_until.is_none(), self.interrupts);
            match self.wait_for_events(&mut set, wake, exact) {
                Woke::Interrupted(signal) => return Outcome::Interrupted(signal),
                Woke::Ready => {
                    let mut handled = false;
                    for index in set.ready() {
                        conditions[index].on_ready();
                        handled = true;
                    }
                    if handled
                        && conditions.iter().map(|c| c.in_flight()).sum::<usize>() >= COALESCE_FROM
                    {
                        resting_until = Some(Instant::now() + COALESCE);
                    }
                }
            }
        }
    }

    /// Logs each condition that has drained since the last round; returns whether all are.
    fn note_drained(
        &self,
        conditions: &[Box<dyn Condition>],
        was_drained: &mut [bool],
        now: Instant,
    ) -> bool {
        let elapsed = self.budget.elapsed(now);
        for (c, was) in conditions.iter().zip(was_drained.iter_mut()) {
            let drained = c.in_flight() == 0;
            if drained && !*was {
                self.report.emit(
                    &Record::info(
                        "condition_drained",
                        format!("{} drained after {}", c.label(), secs(elapsed)),
                    )
                    .with("condition", Value::Str(c.label().into()))
                    .with("elapsed_s", Value::Secs(elapsed)),
                );
            }
            *was = drained;
        }
        was_drained.iter().all(|&d| d)
    }

    fn progress(&self, conditions: &[Box<dyn Condition>], now: Instant) {
        let (total, named) = in_flight(conditions, NAMED_IN_FLIGHT);
        let elapsed = self.budget.elapsed(now);
        let left = self.budget.left(now);
        let message = if total == 0 {
            format!(
                "waiting: drained, holding until min-wait/quiet-for pass — {}s elapsed, {}s left",
                elapsed.as_secs(),
                left.as_secs()
            )
        } else {
            format!(
                "waiting: {total} in flight ({}) — {}s elapsed, {}s left",
                list(total, &named),
                elapsed.as_secs(),
                left.as_secs()
            )
        };
        self.report.emit(
            &Record::info("waiting", message)
                .with("in_flight_count", Value::Int(total as u64))
                .with("in_flight", Value::List(named))
                .with("elapsed_s", Value::Secs(elapsed))
                .with("left_s", Value::Secs(left)),
        );
    }

    /// Sleeps in `ppoll` until an event source is readable or `wake` is reached, and never
    /// past `exact` (at or after `wake`); on `Woke::Ready`, `set.ready()` names the
    /// conditions whose source is readable.
    fn wait_for_events(&self, set: &mut PollSet, wake: Instant, exact: Instant) -> Woke {
        let now = Instant::now();
        let mut wait = wake.saturating_duration_since(now);
        let to_exact = exact.saturating_duration_since(now);
        // Where the kernel's slack could carry the wake-up past `exact`, wake that much
        // earlier; the next round waits out the rest with a short, exact timeout.
        if wait > EXACT_WAIT && wait + slack(wait) > to_exact {
            wait = wait.min(to_exact.saturating_sub(slack(to_exact)));
        }
        let timeout = libc::timespec {
            // Clamped to what a 32-bit `time_t` holds: 68 years is as good as forever here.
            tv_sec: wait
                .as_secs()
                .try_into()
                .unwrap_or_else(|_| i32::MAX.into()),
            tv_nsec: wait.subsec_nanos().into(),
        };
        // SAFETY: `fds` is a live, exclusively borrowed array of `pollfd` of the length
        // passed, every fd in it belongs to a condition or an `Interrupts`,
        // all of which outlive this call, and the timeout is a live local. No signal mask.
        let ready = unsafe {
            libc::ppoll(
                set.fds.as_mut_ptr(),
                set.fds.len() as libc::nfds_t,
                &raw const timeout,
                std::ptr::null(),
            )
        };
        if ready < 0 {
            let e = Errno::last();
            if e != Errno::EINTR {
                // ppoll(2) on valid fds only fails for lack of memory: back off instead of
                // spinning, and let the next round retry.
                tracing::debug!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            set.clear_events();
            return Woke::Ready;
        }
        if ready == 0 {
            return Woke::Ready;
        }
        if let Some(interrupts) = self.interrupts {
            if set.readable(set.interrupt) {
                if let Some(signal) = interrupts.take() {
                    return Woke::Interrupted(signal);
                }
            }
        }
        Woke::Ready
    }
}

/// The most the kernel may let a poll timeout of `wait` fire late.
fn slack(wait: Duration) -> Duration {
    wait.mul_f64(POLL_SLACK).min(POLL_SLACK_MAX)
}

/// The fds one round of the loop polls, kept between rounds so that a round allocates
/// nothing once the set has grown to size.
#[derive(Default)]
struct PollSet {
    /// The conditions' sources first, then the interrupt fd.
    fds: Vec<libc::pollfd>,
    /// For each of the conditions' fds, the index of its condition.
    owners: Vec<usize>,
    interrupt: Option<usize>,
}

impl PollSet {
    /// The conditions' sources (unless they are resting) and the interrupts.
    fn fill(
        &mut self,
        conditions: &[Box<dyn Condition>],
        with_conditions: bool,
        interrupts: Option<&Interrupts>,
    ) {
        self.fds.clear();
        self.owners.clear();
        let sources = conditions.iter().enumerate().filter(|_| with_conditions);
        for (index, c) in sources {
            if let Some(fd) = c.fd() {
                self.fds.push(pollin(fd));
                self.owners.push(index);
            }
        }
        self.interrupt = interrupts.map(|i| {
            self.fds.push(pollin(i.fd()));
            self.fds.len() - 1
        });
    }

    fn clear_events(&mut self) {
        for fd in &mut self.fds {
            fd.revents = 0;
        }
    }

    fn readable(&self, slot: Option<usize>) -> bool {
        slot.is_some_and(|i| {
            self.fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
        })
    }

    /// The conditions whose source is readable.
    fn ready(&self) -> impl Iterator<Item = usize> + '_ {
        self.owners
            .iter()
            .enumerate()
            .filter(|&(slot, _)| self.readable(Some(slot)))
            .map(|(_, &index)| index)
    }
}

fn pollin(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

enum Woke {
    Ready,
    Interrupted(Signal),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BudgetConfig, LockGlob, LogFormat, LogTarget, OutputConfig};

    #[test]
    fn a_burst_that_empties_a_large_set_is_seen_through_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lock");
        std::fs::create_dir(&dir).unwrap();
        let locks: Vec<_> = (0..COALESCE_FROM * 3)
            .map(|i| dir.join(format!("{i}.lock")))
            .collect();
        for lock in &locks {
            std::fs::write(lock, "").unwrap();
        }
        let absolute = format!("{}/*.lock", dir.display());
        let glob = LockGlob {
            pattern: glob::Pattern::new(&absolute).unwrap(),
            absolute,
        };
        let report = Reporter::open(&OutputConfig {
            target: LogTarget::File(tmp.path().join("log")),
            format: LogFormat::Text,
            progress_interval: Duration::from_secs(60),
        });
        let config = BudgetConfig {
            grace: Duration::from_secs(60),
            reserve: Duration::from_secs(1),
            min_wait: Duration::ZERO,
            quiet_for: Duration::ZERO,
        };
        let budget = Budget::new(config, Instant::now());
        let mut conditions: Vec<Box<dyn Condition>> =
            vec![Box::new(locks::LockWait::new(glob, Some(&report)))];
        assert_eq!(conditions[0].in_flight(), locks.len());
        // Some go one by one (the loop rests between wake-ups), then the rest all at once.
        let remover = std::thread::spawn(move || {
            for (i, lock) in locks.iter().enumerate() {
                if i < COALESCE_FROM {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::fs::remove_file(lock).unwrap();
            }
        });
        let outcome = Loop {
            budget: &budget,
            poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(60),
            report: &report,
            interrupts: None,
        }
        .run(&mut conditions);
        remover.join().unwrap();
        assert_eq!(outcome, Outcome::Drained);
        assert_eq!(conditions[0].in_flight(), 0);
    }
}
