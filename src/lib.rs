//! prestop: drain a container before Kubernetes kills it.
//!
//! `run` takes the parsed command line and returns the process exit code. The drain itself
//! (`drain`) is public so that other front ends can reuse it as it is. This module sequences
//! the parts: validate, coordinate, stop intake, wait, summarise. It must not parse strings
//! (that is `config`) or write output other than through `report`, except for the plan of a
//! dry run and the lines of `check`, which are the command's own output on stdout.

pub mod budget;
pub mod cli;
pub mod config;
pub mod coordinate;
pub mod error;
pub mod interrupt;
pub mod pipe;
pub mod procfs;
pub mod rehearse;
pub mod report;
pub mod stop;
pub mod wait;
pub mod worker;

use std::io::Write;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::budget::{Budget, secs};
use crate::cli::{CheckArgs, Cli, Command, DrainArgs, RehearseArgs, WorkerArgs};
use crate::config::{Config, LogTarget, Pid1, Target, show};
use crate::coordinate::{Role, Session};
use crate::error::Error;
use crate::interrupt::Interrupts;
use crate::procfs::ProcessId;
use crate::report::{Record, Reporter, Value};
use crate::wait::{Condition, Outcome};

/// Exit code: budget exhausted with work still in flight.
pub const EXIT_IN_FLIGHT: u8 = 1;
/// Exit code: drained, but a stop action failed.
pub const EXIT_STOP_FAILED: u8 = 3;

/// How many in-flight items the final summary names.
const NAMED_IN_SUMMARY: usize = 20;

/// Runs a parsed command line; returns the exit code. `started` is when the process began,
/// which is when the kubelet started the hook.
pub fn run(cli: Cli, started: Instant) -> u8 {
    let result = match cli.command {
        Command::Drain(args) => drain_command(&args, started),
        Command::Check(args) => check_command(&args),
        Command::Rehearse(args) => rehearse_command(&args),
        Command::Demo => demo_command(),
        Command::SampleWorker(args) => worker_command(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("prestop: {e}");
        e.exit_code()
    })
}

fn drain_command(args: &DrainArgs, started: Instant) -> Result<u8, Error> {
    let config = Config::from_drain_args(args, Pid1::Real)?;
    if config.dry_run {
        print_plan(&config);
        return Ok(0);
    }
    // Before any thread or child exists, so that every one of them inherits the mask.
    let interrupts = Interrupts::install()
        .map_err(|e| Error::system("cannot set up signal handling", e.into()))?;
    let report = Reporter::open(&config.output);
    Ok(drain(&config, &report, started, Some(&interrupts)).exit_code())
}

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
    pub fn exit_code(&self) -> u8 {
        match self.outcome {
            Outcome::Interrupted(signal) => signal_exit_code(signal),
            Outcome::Exhausted => EXIT_IN_FLIGHT,
            Outcome::Drained if !self.stop_failures.is_empty() => EXIT_STOP_FAILED,
            Outcome::Drained => 0,
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
    let mut session = Session::join(
        &config.state_dir,
        config.fingerprint(),
        &config.budget,
        started,
        report,
    );
    let budget = Budget::new(config.budget, session.start);
    announce(&budget, session.role, report);

    // Before the stop actions: a process to wait for is pinned by its pidfd now, so that one
    // exiting because of them is seen as gone, and its PID reused later is not waited on.
    let mut conditions = wait::conditions(&config.wait, Some(report));
    let mut stop_failures = Vec::new();
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
        } else if let Err(e) = session.finish_stop_actions() {
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
        announce_wait(&conditions, report);
        wait::Loop {
            budget: &budget,
            poll_interval: config.wait.poll_interval,
            progress_interval: config.output.progress_interval,
            report,
            interrupts,
        }
        .run(&mut conditions)
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
        .with("leader_pid", Value::Int(leader.into())),
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
        .map(|c| match c.in_flight() {
            0 => format!("{} (drained)", c.label()),
            n => format!("{} ({n} in flight)", c.label()),
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
    Record::info(event, message)
        .with("elapsed_s", Value::Secs(elapsed))
        .with("in_flight_count", Value::Int(total as u64))
        .with("in_flight", Value::List(named))
        .with("stop_failures", Value::List(drained.stop_failures.clone()))
        .with("exit_code", Value::Int(drained.exit_code().into()))
}

fn check_command(args: &CheckArgs) -> Result<u8, Error> {
    let plan = config::wait_plan(&args.wait)?;
    if plan.locks.is_empty() && plan.pids.is_empty() {
        return Err(Error::Config(
            "check needs something to look at: give --wait-lock or --wait-pid".into(),
        ));
    }
    let mut conditions: Vec<Box<dyn Condition>> = Vec::new();
    for glob in &plan.locks {
        conditions.push(Box::new(wait::locks::LockWait::snapshot(glob.clone())));
    }
    let mut out = std::io::stdout().lock();
    for target in &plan.pids {
        let waits = wait::process::ProcessWait::for_target(target, None);
        if waits.is_empty() {
            let _ = writeln!(out, "prestop: {target}: none running");
        }
        conditions.extend(waits.into_iter().map(|w| Box::new(w) as Box<dyn Condition>));
    }
    for c in &conditions {
        let _ = writeln!(out, "prestop: {}: {}", c.label(), c.state());
    }
    let (total, _) = wait::in_flight(&conditions, 0);
    if total == 0 {
        let _ = writeln!(out, "prestop: drained");
        Ok(0)
    } else {
        let _ = writeln!(out, "prestop: not drained: {total} in flight");
        Ok(EXIT_IN_FLIGHT)
    }
}

fn rehearse_command(args: &RehearseArgs) -> Result<u8, Error> {
    let options = rehearse::Options {
        drain: &args.drain,
        after: config::duration("--after", &args.after)?,
        stop_signal: config::signal("--stop-signal", &args.stop_signal)?,
        pid_namespace: args.pid_namespace,
        app: &args.app,
    };
    rehearse::run(&options)
}

/// The README's first command: a rehearsal of the built-in sample worker.
fn demo_command() -> Result<u8, Error> {
    let scratch = rehearse::Scratch::new("demo")
        .map_err(|e| Error::system("cannot create the demo's directory", e))?;
    let locks = scratch.path().join("lock");
    let glob = format!("{}/*.lock", locks.display());
    let exe = std::env::current_exe()
        .map_err(|e| Error::system("cannot find prestop's own binary", e))?;
    let hook = [
        "--signal",
        "TSTP",
        "--wait-lock",
        glob.as_str(),
        "--grace-period",
        "15s",
        "--reserve",
        "3s",
        "--progress-interval",
        "1s",
    ];
    eprintln!(
        "prestop demo: a rehearsal of a pod's termination, with a sample worker.\n\n\
         The worker takes jobs of 1-4 s, three at a time, and holds a lock file per job in\n\
         {locks}.\n\
         After 4 s the pod is told to terminate, and prestop plays the kubelet's part:\n\
         \x20 1. the preStop hook runs (SIGTSTP tells the worker to take no new jobs;\n\
         \x20    then the hook waits until no lock file is left):\n\
         \x20      prestop drain --signal TSTP --wait-lock '{glob}' \\\n\
         \x20                    --grace-period 15s --reserve 3s\n\
         \x20 2. when the hook returns, the worker gets SIGTERM;\n\
         \x20 3. if it were still running when the 15 s grace period ends, it would get SIGKILL.\n",
        locks = locks.display(),
    );
    let mut argv: Vec<std::ffi::OsString> = vec!["prestop".into(), "rehearse".into()];
    argv.extend(hook.iter().map(Into::into));
    argv.extend([
        "--after".into(),
        "4s".into(),
        "--".into(),
        exe.into_os_string(),
    ]);
    argv.extend([
        "sample-worker".into(),
        "--lock-dir".into(),
        locks.into_os_string(),
    ]);
    let cli = <Cli as clap::Parser>::try_parse_from(argv)
        .map_err(|e| Error::Config(format!("demo: {e}")))?;
    let Command::Rehearse(rehearsal) = cli.command else {
        unreachable!("the demo's own command line is a rehearsal");
    };
    let code = rehearse_command(&rehearsal);
    drop(scratch);
    code
}

fn worker_command(args: &WorkerArgs) -> Result<u8, Error> {
    let options = worker::Options {
        lock_dir: args.lock_dir.clone().into(),
        slots: args.slots.max(1),
        shortest: std::time::Duration::from_secs(1),
        longest: std::time::Duration::from_secs(4),
        pace: std::time::Duration::from_millis(300),
    };
    worker::run(&options).map_err(|e| Error::system("sample worker", e))
}

/// `--dry-run`: what the hook would do, from the validated configuration.
pub(crate) fn print_plan(config: &Config) {
    let b = config.budget;
    let mut lines = vec![
        "prestop: dry run: options are valid; nothing was done".to_owned(),
        format!(
            "budget:    {} (grace {} - reserve {}), from the first invocation's start",
            show(b.total()),
            show(b.grace),
            show(b.reserve)
        ),
        format!("min-wait:  {}", show(b.min_wait)),
        format!(
            "stop at:   {} after termination began",
            show(config.stop.after)
        ),
        format!("quiet-for: {}", show(b.quiet_for)),
    ];
    let mut steps = Vec::new();
    for path in &config.stop.touch {
        steps.push(format!("touch {}", path.display()));
    }
    if let Some(action) = &config.stop.signal {
        let default = if action.explicit_target {
            ""
        } else {
            " (the default target)"
        };
        let now = match &action.target {
            Target::Name(name) => format!(" (now: {})", pids(&procfs::find_by_name(name))),
            _ => String::new(),
        };
        steps.push(format!(
            "send {} to {}{default}{now}",
            action.signal, action.target
        ));
    }
    for command in &config.stop.exec {
        steps.push(format!(
            "run {} ({})",
            command.display,
            command.program.display()
        ));
    }
    push_list(
        &mut lines,
        "stop:",
        &steps,
        "nothing (no --touch, --signal or --exec)",
    );

    let mut waits = Vec::new();
    for glob in &config.wait.locks {
        let now = wait::locks::LockWait::snapshot(glob.clone()).in_flight();
        waits.push(format!(
            "no path matches {} (now: {now} in flight)",
            glob.absolute
        ));
    }
    for target in &config.wait.pids {
        let now = match target {
            Target::Name(name) => pids(&procfs::find_by_name(name)),
            Target::Pid(pid) | Target::PidFile(_, pid) => {
                if wait::process::ProcessWait::new(*pid).is_alive() {
                    "running".into()
                } else {
                    "not running".into()
                }
            }
        };
        waits.push(format!("{target} has exited (now: {now})"));
    }
    push_list(
        &mut lines,
        "wait:",
        &waits,
        "nothing (no --wait-lock or --wait-pid)",
    );
    lines.push(format!(
        "polling:   every {} where inotify or pidfd are unavailable; progress every {}",
        show(config.wait.poll_interval),
        show(config.output.progress_interval)
    ));
    let target = match &config.output.target {
        LogTarget::Auto => format!("auto ({})", report::describe_auto()),
        LogTarget::Pid1 => "/proc/1/fd/1".into(),
        LogTarget::Stdout => "stdout".into(),
        LogTarget::Stderr => "stderr".into(),
        LogTarget::File(path) => path.display().to_string(),
    };
    lines.push(format!(
        "log:       {} lines to {target}; the summary also to stdout",
        match config.output.format {
            config::LogFormat::Text => "text",
            config::LogFormat::Json => "json",
        }
    ));
    lines.push(format!("state dir: {}", config.state_dir.display()));
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}

fn push_list(lines: &mut Vec<String>, heading: &str, items: &[String], empty: &str) {
    if items.is_empty() {
        lines.push(format!("{heading:<10} {empty}"));
    }
    for (i, item) in items.iter().enumerate() {
        let heading = if i == 0 { heading } else { "" };
        lines.push(format!("{heading:<10} {}. {item}", i + 1));
    }
}

fn pids(pids: &[ProcessId]) -> String {
    if pids.is_empty() {
        return "no such process".into();
    }
    let list: Vec<String> = pids.iter().map(ToString::to_string).collect();
    format!("pid {}", list.join(", "))
}

/// Sends `PRESTOP_DEBUG=1` diagnostics (event-source fallbacks, rescans) to stderr.
pub fn init_diagnostics() {
    let wanted = std::env::var_os("PRESTOP_DEBUG").is_some_and(|v| !v.is_empty() && v != "0");
    if wanted {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .init();
    }
}

/// The exit code for a signal, as a shell reports it.
pub fn signal_exit_code(signal: Signal) -> u8 {
    128 + signal as u8
}
