//! The drain: coordinate with other deliveries of the hook, stop intake, wait, summarise.
//!
//! This is the preStop hook's whole sequence, and the lines that frame it: the first line
//! (the budget), the list of what is waited for, and the one summary line that also goes to
//! the hook's own stdout, so that a `FailedPreStopHook` event says why. It sequences the parts
//! and reports; it must not parse options (that is `config`) or do what the parts do.

use std::time::Instant;

use crate::budget::{Budget, secs};
use crate::config::{Config, show};
use crate::coordinate::{Role, Session};
use crate::exit::Exit;
use crate::interrupt::Interrupts;
use crate::report::{Record, Reporter, Value};
use crate::stop;
use crate::wait::{self, Condition, Outcome};

/// How many in-flight items the final summary names.
const NAMED_IN_SUMMARY: usize = 20;

/// How a drain ended.
#[derive(Debug)]
pub struct Drained {
    pub outcome: Outcome,
    pub stop_failures: Vec<String>,
    pub budget: Budget,
    /// When the drain returned.
    pub ended: Instant,
}

impl Drained {
    pub fn exit(&self) -> Exit {
        match self.outcome {
            Outcome::Interrupted(signal) => Exit::Interrupted(signal),
            Outcome::Exhausted => Exit::InFlight,
            Outcome::Drained if !self.stop_failures.is_empty() => Exit::StopFailed,
            Outcome::Drained => Exit::Success,
        }
    }
}

/// The preStop hook: coordinate with other deliveries, stop intake, wait, summarise.
/// `started` is when this invocation began; `interrupts`, if given, end the wait early.
pub fn drain(
    config: &Config,
    report: &Reporter,
    started: Instant,
    interrupts: Option<&Interrupts>,
) -> Drained {
    let joined = Session::join(
        &config.state_dir,
        config.fingerprint(),
        &config.budget,
        started,
        report,
        interrupts,
    );
    let mut session = match joined {
        Ok(session) => session,
        // Interrupted while another delivery ran the stop actions: nothing done here.
        Err(signal) => {
            let drained = Drained {
                outcome: Outcome::Interrupted(signal),
                stop_failures: Vec::new(),
                budget: Budget::new(config.budget, started),
                ended: Instant::now(),
            };
            report.summary(&summary(&drained, &[]));
            return drained;
        }
    };
    let budget = Budget::new(config.budget, session.start);
    announce(&budget, session.role, report);

    // Before the stop actions, only what must be (a process to wait for is pinned now, so
    // that one exiting because of them is seen to); the rest after, so that the stop actions
    // never wait for a condition to be set up.
    let mut conditions = wait::conditions(&config.wait);
    let start = wait::Start {
        watch: true,
        report: Some(report),
        deadline: budget.deadline,
    };
    wait::start(&mut conditions, true, &start);
    // A follower's stop actions are the leader's, and so are their failures.
    let mut stop_failures = std::mem::take(&mut session.earlier_failures);
    if !stop_failures.is_empty() {
        report.emit(&Record::warn(
            "stop_failed",
            format!(
                "{} stop action(s) failed in the delivery that ran them: {}",
                stop_failures.len(),
                stop_failures.join("; ")
            ),
        ));
    }
    let mut interrupted = None;
    if session.role.runs_stop_actions() {
        let cx = stop::Context {
            report,
            not_before: budget.start + config.stop.after,
            deadline: budget.deadline,
            interrupts,
        };
        let results = stop::run(&config.stop, &cx);
        stop_failures = results.failures;
        interrupted = results.interrupted;
        // An interrupted leader leaves the record "pending": the next delivery runs them.
        if interrupted.is_some() {
            session.abandon_stop_actions();
        } else if let Err(e) = session.finish_stop_actions(&stop_failures) {
            report.emit(&Record::warn(
                "uncoordinated",
                format!("cannot record the stop actions as done: {e}"),
            ));
        }
    }
    drop(session);

    let outcome = if let Some(signal) = interrupted {
        Outcome::Interrupted(signal)
    } else {
        wait::start(&mut conditions, false, &start);
        announce_wait(&conditions, report);
        let pace = wait::Pace {
            budget: &budget,
            poll_interval: config.wait.poll_interval,
            progress_interval: config.output.progress_interval,
            report,
        };
        let outcome = wait::wait(&mut conditions, &pace, interrupts);
        // Watches removed now are torn down without holding up the exit; closing an inotify
        // instance that still has them waits for the kernel (a dozen milliseconds after a
        // stream of events).
        for c in &mut conditions {
            c.release();
        }
        outcome
    };
    let drained = Drained {
        outcome,
        stop_failures,
        budget,
        ended: Instant::now(),
    };
    report.summary(&summary(&drained, &conditions));
    drained
}

fn announce(budget: &Budget, role: Role, report: &Reporter) {
    let c = budget.config;
    let now = Instant::now();
    let record = match role {
        Role::Follower {
            leader,
            actions_done,
        } => Record::info(
            "join",
            format!(
                "joining the drain begun {} ago by pid {leader} ({}), budget {}, {} left",
                secs(budget.elapsed(now)),
                if actions_done {
                    "stop actions already done"
                } else {
                    "its stop actions still running"
                },
                show(c.total()),
                secs(budget.left(now))
            ),
        )
        .with("leader_pid", Value::Int(leader.into()))
        .step(),
        Role::TakeOver { previous } => Record::info(
            "take_over",
            format!(
                "draining, budget {}, {} left (pid {previous} died before finishing the stop \
                 actions; running them again)",
                show(c.total()),
                secs(budget.left(now))
            ),
        ),
        Role::Leader | Role::Uncoordinated => Record::info(
            "start",
            format!(
                "draining, budget {} (grace {}, reserve {})",
                show(c.total()),
                show(c.grace),
                show(c.reserve)
            ),
        ),
    };
    report.emit(
        &record
            .with("budget_s", Value::Secs(c.total()))
            .with("grace_s", Value::Secs(c.grace))
            .with("reserve_s", Value::Secs(c.reserve))
            .with("left_s", Value::Secs(budget.left(now))),
    );
}

fn announce_wait(conditions: &[Box<dyn Condition>], report: &Reporter) {
    if conditions.is_empty() {
        return;
    }
    let parts: Vec<String> = conditions
        .iter()
        .map(|c| match (c.unknown(), c.in_flight()) {
            (Some(_), _) => format!("{} (unknown)", c.label()),
            (None, 0) => format!("{} (drained)", c.label()),
            (None, n) => format!("{} ({n} in flight)", c.label()),
        })
        .collect();
    report.emit(
        &Record::info("wait", format!("waiting for {}", parts.join(", "))).with(
            "conditions",
            Value::List(conditions.iter().map(|c| c.label().to_owned()).collect()),
        ),
    );
}

fn summary(drained: &Drained, conditions: &[Box<dyn Condition>]) -> Record {
    let elapsed = drained.budget.elapsed(drained.ended);
    let (total, named) = wait::in_flight(conditions, NAMED_IN_SUMMARY);
    let remaining = if total == 0 {
        "nothing in flight".to_owned()
    } else {
        format!("{total} still in flight ({})", wait::list(total, &named))
    };
    let (event, message) = match drained.outcome {
        Outcome::Drained if drained.stop_failures.is_empty() => {
            ("drained", format!("drained after {}", secs(elapsed)))
        }
        Outcome::Drained => (
            "drained",
            format!(
                "drained after {}, but {} stop action(s) failed: {}",
                secs(elapsed),
                drained.stop_failures.len(),
                drained.stop_failures.join("; ")
            ),
        ),
        Outcome::Exhausted if total == 0 => (
            "exhausted",
            format!(
                "budget exhausted after {}: drained, but not for --quiet-for yet",
                secs(elapsed)
            ),
        ),
        Outcome::Exhausted => (
            "exhausted",
            format!("budget exhausted after {}: {remaining}", secs(elapsed)),
        ),
        Outcome::Interrupted(signal) => (
            "interrupted",
            format!(
                "interrupted by {signal} after {}: {remaining}",
                secs(elapsed)
            ),
        ),
    };
    let record = Record::info(event, message)
        .with("elapsed_s", Value::Secs(elapsed))
        .with("in_flight_count", Value::Int(total as u64))
        .with("in_flight", Value::List(named))
        .with("stop_failures", Value::List(drained.stop_failures.clone()))
        .with("exit_code", Value::Int(drained.exit().code().into()));
    if matches!(drained.outcome, Outcome::Interrupted(_)) {
        record
    } else {
        record.step()
    }
}
