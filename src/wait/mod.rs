//! Waiting until in-flight work has drained: the conditions and the one loop that watches
//! them all.
//!
//! Each condition (`locks`, `process`) owns an event source (an inotify instance, a pidfd)
//! and keeps its own count of what is in flight, updated from events. The loop `poll`s those
//! sources together with the interrupt signalfd and sleeps exactly until the next thing that
//! can matter: an event, the deadline, the next progress line, the end of `--min-wait` or
//! `--quiet-for`. Polling at `--poll-interval` happens only for conditions that have no event
//! source. The loop must never rescan on every event, and never spin.

pub mod locks;
pub mod process;

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;

use crate::budget::{Budget, secs};
use crate::config::WaitPlan;
use crate::interrupt::Interrupts;
use crate::report::{Record, Reporter, Value};

/// How many in-flight items a progress line or summary names before it says "and N more".
pub const NAMED_IN_FLIGHT: usize = 10;

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
    /// The caller's cancel fd became readable (a rehearsal's app exited).
    Cancelled,
}

pub struct Loop<'a> {
    pub budget: &'a Budget,
    pub poll_interval: Duration,
    pub progress_interval: Duration,
    pub report: &'a Reporter,
    pub interrupts: Option<&'a Interrupts>,
    pub cancel: Option<BorrowedFd<'a>>,
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
        let mut raw_fds: Vec<(usize, RawFd)> = Vec::with_capacity(conditions.len());

        loop {
            let now = Instant::now();
            for (i, c) in conditions.iter().enumerate() {
                let drained = c.in_flight() == 0;
                if drained && !was_drained[i] {
                    self.report.emit(
                        &Record::info(
                            "condition_drained",
                            format!("{} drained after {}", c.label(), secs(budget.elapsed(now))),
                        )
                        .with("condition", Value::Str(c.label().into()))
                        .with("elapsed_s", Value::Secs(budget.elapsed(now))),
                    );
                }
                was_drained[i] = drained;
            }
            let all_drained = was_drained.iter().all(|&d| d);
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
            let polled = conditions.iter().any(|c| c.polled());
            if polled && now >= next_poll {
                for c in conditions.iter_mut().filter(|c| c.polled()) {
                    c.refresh();
                }
                next_poll = now + self.poll_interval;
                continue;
            }

            let mut wake = budget.deadline.min(next_progress);
            if let Some(at) = settled_at {
                wake = wake.min(at);
            }
            if polled {
                wake = wake.min(next_poll);
            }

            raw_fds.clear();
            raw_fds.extend(
                conditions
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.fd().map(|fd| (i, fd.as_raw_fd()))),
            );
            match self.wait_for_events(&raw_fds, wake) {
                Woke::Interrupted(signal) => return Outcome::Interrupted(signal),
                Woke::Cancelled => return Outcome::Cancelled,
                Woke::Ready(ready) => {
                    for index in ready {
                        conditions[index].on_ready();
                    }
                }
            }
        }
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

    /// Sleeps in `poll` until an event source is readable or `wake` is reached.
    fn wait_for_events(&self, fds: &[(usize, RawFd)], wake: Instant) -> Woke {
        // SAFETY: every raw fd was just taken from a condition, an `Interrupts` or the cancel
        // fd, all of which outlive this call; the borrowed fds do not escape it.
        let borrow = |fd: RawFd| unsafe { BorrowedFd::borrow_raw(fd) };
        let mut poll_fds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|&(_, fd)| PollFd::new(borrow(fd), PollFlags::POLLIN))
            .collect();
        let extra = poll_fds.len();
        if let Some(i) = self.interrupts {
            poll_fds.push(PollFd::new(i.fd(), PollFlags::POLLIN));
        }
        if let Some(c) = self.cancel {
            poll_fds.push(PollFd::new(c, PollFlags::POLLIN));
        }
        // Round up, so the loop never wakes a hair early and spins until the instant passes.
        let wait = wake.saturating_duration_since(Instant::now());
        let millis = wait.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        match poll(&mut poll_fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Woke::Ready(Vec::new()),
            Ok(_) => {}
            Err(e) => {
                // poll(2) on valid fds only fails for lack of memory: back off instead of
                // spinning, and let the next round retry.
                tracing::debug!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                return Woke::Ready(Vec::new());
            }
        }
        let readable = |p: &PollFd<'_>| {
            p.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            })
        };
        let mut next = extra;
        if let Some(interrupts) = self.interrupts {
            if readable(&poll_fds[next]) {
                if let Some(signal) = interrupts.take() {
                    return Woke::Interrupted(signal);
                }
            }
            next += 1;
        }
        if self.cancel.is_some() && readable(&poll_fds[next]) {
            return Woke::Cancelled;
        }
        Woke::Ready(
            poll_fds[..extra]
                .iter()
                .zip(fds)
                .filter(|(p, _)| readable(p))
                .map(|(_, &(index, _))| index)
                .collect(),
        )
    }
}

enum Woke {
    Ready(Vec<usize>),
    Interrupted(Signal),
    Cancelled,
}
