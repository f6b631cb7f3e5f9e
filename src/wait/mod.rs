//! Waiting until in-flight work has drained: the conditions, and the machine that watches
//! them all on the event loop.
//!
//! Each condition (one file each: `locks`, `process`, `conns`, `http`) owns its event sources
//! (an inotify instance, pidfds, sockets) and keeps its own count of what is in flight, updated
//! from events. The `Waiting` machine hands those sources to `event::run` and wakes exactly
//! when the next thing that can matter is due: the deadline, the next progress line, the end
//! of `--min-wait` or `--quiet-for`. Polling at `--poll-interval` happens only for conditions
//! that have no event source. It must never rescan on every event, and never spin. A new kind
//! of condition is one new file behind `Condition`, plus its line in `conditions`.
//!
//! A stream of events (thousands of lock files removed a second) is coalesced: while much is
//! still in flight, events are handled at most once per `COALESCE`, in one batch, because the
//! wake-ups, not the events, are what costs CPU. The exit at the deadline is exact: event
//! sources whose teardown would delay it are given up just before (`RELEASE_BEFORE_DEADLINE`).

pub mod conns;
pub mod http;
pub mod locks;
pub mod process;
mod stale;

use std::fmt::Write as _;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::budget::{Budget, secs};
use crate::config::WaitPlan;
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::interrupt::Interrupts;
use crate::report::{Record, Reporter, Value};

/// How many in-flight items a progress line or summary names before it says "and N more".
pub const NAMED_IN_FLIGHT: usize = 10;

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

/// One thing that must be true for the container to count as drained: one per option value
/// (`--wait-lock GLOB`, `--wait-pid TARGET`).
///
/// A condition that cannot be seen (a directory it may not read, no file descriptor left) is
/// never drained: it says why in `unknown`, counts as in flight, and is polled until it can
/// be seen again.
pub trait Condition {
    /// What is waited for, as the user would say it: `lock /app/lock/*.lock`, `pid 42`.
    fn label(&self) -> &str;
    /// Whether to start before the stop actions. A process is pinned before it is told to
    /// stop, so that its exit because of them is seen; anything else starts after them, so
    /// that they never wait for a condition to be set up.
    fn start_early(&self) -> bool {
        false
    }
    /// Takes the first look and, when watching, sets up the event sources.
    fn start(&mut self, cx: &Start<'_>);
    /// Adds each event source to watch, with a key of the condition's choosing that
    /// `on_ready` gets back. Nothing, if this condition can only be polled now.
    fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize));
    /// Adds each event source to watch until it can be written (a socket still connecting
    /// or sending), as `watch` does for those to read.
    fn watch_writable(&self, _add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {}
    /// The source added with `key` is ready: consume its events, then update the count.
    fn on_ready(&mut self, key: usize);
    /// Whether this condition lacks an event source (or cannot be seen) and must be
    /// re-checked by polling.
    fn polled(&self) -> bool;
    /// Re-check from scratch (the fallback when there is no event source).
    fn refresh(&mut self);
    /// How many items are known to be in flight.
    fn in_flight(&self) -> usize;
    /// Why this condition cannot be seen now, if it cannot: then it is not drained.
    fn unknown(&self) -> Option<&str>;
    /// Appends up to `limit` in-flight items, each as `lock PATH` or `pid N`.
    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize);
    /// Where this condition stands, for `prestop check`: `drained`, `unknown (why)`, or
    /// what is in flight.
    fn state(&self) -> String {
        let total = self.in_flight();
        let mut named = Vec::new();
        self.name_in_flight(&mut named, NAMED_IN_FLIGHT);
        match (self.unknown(), total) {
            (Some(why), 0) => format!("unknown ({why})"),
            (Some(why), n) => format!("unknown ({why}); {n} in flight ({})", list(n, &named)),
            (None, 0) => "drained".into(),
            (None, n) => format!("{n} in flight ({})", list(n, &named)),
        }
    }
    /// What the condition has found that the log should say once (a stale lock file), taken
    /// so that it is said once.
    fn take_notes(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Lines that `check` lists under the state, one per item, where the state alone would
    /// not say enough (each connection and why it is in flight); none for most.
    fn details(&self) -> Vec<String> {
        Vec::new()
    }
    /// What "drained" means for this condition, for a dry run's plan, with where it stands
    /// now: `no path matches /app/lock/*.lock (now: 2 in flight)`.
    fn plan(&self) -> String;
    /// Whether looking sends the app something it may act on (an HTTP request): a dry run,
    /// which does nothing, does not start such a condition, and its plan says so.
    fn sends(&self) -> bool {
        false
    }
    /// The deadline is near: give up an event source whose teardown would hold up the
    /// process's exit, and be `polled` from now on. Nothing to do for most sources.
    fn release(&mut self) {}
    /// When this condition wants `refresh` next, on a schedule of its own (a look that no
    /// event prompts); `None` for most.
    fn next_look(&self) -> Option<Instant> {
        None
    }
    /// When new work last arrived (a new connection): "drained" holds only from then, so
    /// `--quiet-for` starts again.
    fn last_activity(&self) -> Option<Instant> {
        None
    }
    /// Everything looks drained and the wait is about to end: look once more, fresh, if what
    /// the condition knows can lag behind (a new connection raises no event).
    fn confirm(&mut self) {}
    /// How the condition shows in a progress line: its in-flight items, unless it sums them
    /// up. Returns how many in-flight items what it appended stands for.
    fn progress(&self, out: &mut Vec<String>, limit: usize) -> usize {
        let before = out.len();
        self.name_in_flight(out, limit);
        out.len() - before
    }
}

/// How a condition starts.
pub struct Start<'a> {
    /// Set up event sources (a drain), or only look once (`check`, a dry run).
    pub watch: bool,
    /// Where a condition says it falls back to polling.
    pub report: Option<&'a Reporter>,
    /// No walk or scan runs past this: what is not seen by then is unknown.
    pub deadline: Instant,
}

/// How long `check` or a dry run may look before what it has not seen is unknown.
const LOOK_FOR: Duration = Duration::from_secs(10);

/// Items in flight, counting a condition that cannot be seen as one.
fn pending(c: &dyn Condition) -> usize {
    c.in_flight() + usize::from(c.unknown().is_some())
}

/// The conditions of a wait plan, not started yet.
pub fn conditions(plan: &WaitPlan) -> Vec<Box<dyn Condition>> {
    let mut conditions: Vec<Box<dyn Condition>> = Vec::new();
    for glob in &plan.locks {
        conditions.push(Box::new(locks::LockWait::new(glob.clone(), plan.lock_pid)));
    }
    for target in &plan.pids {
        conditions.push(Box::new(process::ProcessWait::new(target, plan.pid1)));
    }
    for spec in &plan.conns {
        conditions.push(Box::new(conns::ConnWait::new(spec, plan.count_idle_conns)));
    }
    for request in &plan.http {
        conditions.push(Box::new(http::HttpWait::new(request)));
    }
    conditions
}

/// Starts the conditions that start early (`early`) or late.
pub fn start(conditions: &mut [Box<dyn Condition>], early: bool, cx: &Start<'_>) {
    for c in conditions.iter_mut().filter(|c| c.start_early() == early) {
        c.start(cx);
    }
}

/// The conditions of a wait plan, each having taken one look, watching nothing; for a dry
/// run, only those whose look sends nothing.
pub fn look(plan: &WaitPlan, dry_run: bool) -> Vec<Box<dyn Condition>> {
    let mut conditions = conditions(plan);
    let cx = Start {
        watch: false,
        report: None,
        deadline: Instant::now() + LOOK_FOR,
    };
    for early in [true, false] {
        for c in &mut conditions {
            if c.start_early() == early && !(dry_run && c.sends()) {
                c.start(&cx);
            }
        }
    }
    conditions
}

/// Everything in flight across conditions, named up to `limit`; a condition that cannot be
/// seen counts as one, named with why.
pub fn in_flight(conditions: &[Box<dyn Condition>], limit: usize) -> (usize, Vec<String>) {
    let total = conditions.iter().map(|c| pending(c.as_ref())).sum();
    let mut named = Vec::new();
    for c in conditions {
        if named.len() >= limit {
            break;
        }
        if let Some(why) = c.unknown() {
            named.push(format!("{}: unknown ({why})", c.label()));
        }
        let room = limit.saturating_sub(named.len());
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

/// How a wait is paced and where it reports.
pub struct Pace<'a> {
    pub budget: &'a Budget,
    pub poll_interval: Duration,
    pub progress_interval: Duration,
    pub report: &'a Reporter,
}

/// Waits until every condition has held continuously for `--quiet-for`, no earlier than
/// `--min-wait`, and no later than the deadline.
pub fn wait(
    conditions: &mut [Box<dyn Condition>],
    pace: &Pace<'_>,
    interrupts: Option<&Interrupts>,
) -> Outcome {
    let now = Instant::now();
    let budget = pace.budget;
    let mut waiting = Waiting {
        was_drained: conditions
            .iter()
            .map(|c| pending(c.as_ref()) == 0)
            .collect(),
        told_unknown: conditions.iter().map(|_| None).collect(),
        conditions,
        pace,
        drained_since: None,
        next_progress: now + pace.progress_interval,
        next_poll: now + pace.poll_interval,
        resting_until: None,
        handled: false,
        release_at: budget
            .deadline
            .checked_sub(RELEASE_BEFORE_DEADLINE)
            .unwrap_or(budget.deadline),
        released: false,
    };
    event::run(&mut waiting, interrupts).unwrap_or_else(Outcome::Interrupted)
}

struct Waiting<'a, 'c> {
    conditions: &'c mut [Box<dyn Condition>],
    pace: &'a Pace<'a>,
    was_drained: Vec<bool>,
    /// Why each condition could not be seen, as last logged.
    told_unknown: Vec<Option<String>>,
    /// Since when every condition has held, if they all do.
    drained_since: Option<Instant>,
    next_progress: Instant,
    next_poll: Instant,
    /// While resting (see `COALESCE`), the conditions' sources are not watched.
    resting_until: Option<Instant>,
    /// Whether events were handled since the last tick.
    handled: bool,
    release_at: Instant,
    released: bool,
}

impl Machine for Waiting<'_, '_> {
    /// (the condition's index, the condition's key)
    type Source = (usize, usize);
    type Output = Outcome;

    fn tick(&mut self, now: Instant) -> Step<Outcome> {
        let budget = self.pace.budget;
        if std::mem::take(&mut self.handled)
            && self.conditions.iter().map(|c| c.in_flight()).sum::<usize>() >= COALESCE_FROM
        {
            self.resting_until = Some(now + COALESCE);
        }
        if !self.released && now >= self.release_at {
            for c in self.conditions.iter_mut() {
                c.release();
            }
            self.released = true;
            self.next_poll = now;
        }
        let polled = self.conditions.iter().any(|c| c.polled());
        // Once released, the last look is at the deadline, whatever the poll schedule.
        let last_look = self.released && now >= budget.deadline;
        if polled && (now >= self.next_poll || last_look) {
            for c in self.conditions.iter_mut().filter(|c| c.polled()) {
                c.refresh();
            }
            let interval = if self.released {
                self.pace.poll_interval.min(RELEASED_POLL)
            } else {
                self.pace.poll_interval
            };
            self.next_poll = now + interval;
        }
        for c in self.conditions.iter_mut() {
            if c.next_look().is_some_and(|at| at <= now) {
                c.refresh();
            }
        }
        let mut settled_at = self.settle(now);
        if settled_at.is_some_and(|at| now >= at) {
            // What a condition knows can lag behind (a new connection raises no event): all
            // look once more before the drain is declared.
            for c in self.conditions.iter_mut() {
                c.confirm();
            }
            settled_at = self.settle(now);
            if settled_at.is_some_and(|at| now >= at) {
                return Step::Done(Outcome::Drained);
            }
        }
        if now >= budget.deadline {
            return Step::Done(Outcome::Exhausted);
        }
        if now >= self.next_progress {
            self.progress(now);
            while self.next_progress <= now {
                self.next_progress += self.pace.progress_interval;
            }
        }

        // The deadline and the end of --min-wait / --quiet-for must be met exactly; a
        // progress line or a poll may come a few milliseconds late.
        let mut exact = settled_at.map_or(budget.deadline, |at| at.min(budget.deadline));
        if !self.released {
            exact = exact.min(self.release_at);
        }
        let mut at = exact.min(self.next_progress);
        if polled {
            at = at.min(self.next_poll);
        }
        if let Some(look) = self.conditions.iter().filter_map(|c| c.next_look()).min() {
            at = at.min(look.max(now));
        }
        self.resting_until = self.resting_until.filter(|&until| until > now);
        if let Some(until) = self.resting_until {
            at = at.min(until);
        }
        Step::Sleep(Wake { at, exact })
    }

    fn watch(&self, fds: &mut Watch<(usize, usize)>) {
        if self.resting_until.is_some() {
            return;
        }
        for (index, c) in self.conditions.iter().enumerate() {
            c.watch(&mut |fd, key| fds.add(fd, (index, key)));
            c.watch_writable(&mut |fd, key| fds.add_writable(fd, (index, key)));
        }
    }

    fn ready(&mut self, (index, key): (usize, usize)) {
        self.conditions[index].on_ready(key);
        self.handled = true;
    }
}

impl Waiting<'_, '_> {
    /// Since when everything has been drained (new work, such as a new connection, starts
    /// it again), and so when the wait may end: `None` while something is in flight.
    fn settle(&mut self, now: Instant) -> Option<Instant> {
        let all_drained = self.note_drained(now);
        let activity = self
            .conditions
            .iter()
            .filter_map(|c| c.last_activity())
            .max();
        self.drained_since = match (all_drained, self.drained_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        }
        .map(|since| activity.map_or(since, |a| since.max(a.min(now))));
        let budget = self.pace.budget;
        self.drained_since
            .map(|since| (since + budget.config.quiet_for).max(budget.earliest))
    }

    /// Logs each condition that has drained since the last round, and each that cannot be
    /// seen (once per reason); returns whether all are drained.
    fn note_drained(&mut self, now: Instant) -> bool {
        let elapsed = self.pace.budget.elapsed(now);
        for c in self.conditions.iter_mut() {
            for note in c.take_notes() {
                self.pace.report.emit(
                    &Record::info("stale", note).with("condition", Value::Str(c.label().into())),
                );
            }
        }
        for (c, told) in self.conditions.iter().zip(self.told_unknown.iter_mut()) {
            let unknown = c.unknown();
            if unknown == told.as_deref() {
                continue;
            }
            let record = match unknown {
                Some(why) => Record::warn(
                    "unknown",
                    format!(
                        "cannot see {}: {why}; it counts as in flight until it can be seen",
                        c.label()
                    ),
                )
                .with("condition", Value::Str(c.label().into()))
                .with("reason", Value::Str(why.into()))
                .step(),
                None => Record::info("seen", format!("{} can be seen again", c.label()))
                    .with("condition", Value::Str(c.label().into())),
            };
            self.pace.report.emit(&record);
            *told = unknown.map(str::to_owned);
        }
        for (c, was) in self.conditions.iter().zip(self.was_drained.iter_mut()) {
            let drained = pending(c.as_ref()) == 0;
            if drained && !*was {
                self.pace.report.emit(
                    &Record::info(
                        "condition_drained",
                        format!("{} drained after {}", c.label(), secs(elapsed)),
                    )
                    .with("condition", Value::Str(c.label().into()))
                    .with("elapsed_s", Value::Secs(elapsed))
                    .step(),
                );
            }
            *was = drained;
        }
        self.was_drained.iter().all(|&d| d)
    }

    fn progress(&self, now: Instant) {
        let total = self
            .conditions
            .iter()
            .map(|c| pending(c.as_ref()))
            .sum::<usize>();
        let mut named = Vec::new();
        let mut covered = 0;
        for c in self.conditions.iter() {
            if let Some(why) = c.unknown() {
                named.push(format!("{}: unknown ({why})", c.label()));
                covered += 1;
            }
            let room = NAMED_IN_FLIGHT.saturating_sub(named.len());
            covered += c.progress(&mut named, room);
        }
        let elapsed = self.pace.budget.elapsed(now);
        let left = self.pace.budget.left(now);
        let message = if total == 0 {
            format!(
                "waiting: drained, holding until min-wait/quiet-for pass — {}s elapsed, {}s left",
                elapsed.as_secs(),
                left.as_secs()
            )
        } else {
            let mut shown = named.join(", ");
            if total > covered {
                let _ = write!(shown, " and {} more", total - covered);
            }
            format!(
                "waiting: {total} in flight ({shown}) — {}s elapsed, {}s left",
                elapsed.as_secs(),
                left.as_secs()
            )
        };
        self.pace.report.emit(
            &Record::info("waiting", message)
                .with("in_flight_count", Value::Int(total as u64))
                .with("in_flight", Value::List(named))
                .with("elapsed_s", Value::Secs(elapsed))
                .with("left_s", Value::Secs(left)),
        );
    }
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
            vec![Box::new(locks::LockWait::new(glob, false))];
        let cx = Start {
            watch: true,
            report: Some(&report),
            deadline: budget.deadline,
        };
        start(&mut conditions, false, &cx);
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
        let pace = Pace {
            budget: &budget,
            poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(60),
            report: &report,
        };
        let outcome = wait(&mut conditions, &pace, None);
        remover.join().unwrap();
        assert_eq!(outcome, Outcome::Drained);
        assert_eq!(conditions[0].in_flight(), 0);
    }
}
