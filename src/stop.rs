//! Stop-intake actions: tell the app to stop taking new work, in a fixed order (touch, then
//! signal, then exec).
//!
//! A failed action is logged and remembered, and the drain still runs: the work already in
//! flight deserves its chance even if the app did not hear us (the exit code becomes 3). Signals
//! only ever go to a `ProcessId`, which cannot be 0 or negative. `--exec` commands run without
//! a shell, with their output copied into the log line by line, and are killed at the deadline.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};

use crate::budget::secs;
use crate::config::{ExecCommand, SignalAction, StopPlan, Target};
use crate::interrupt::Interrupts;
use crate::pipe::{LinePipe, poll_until};
use crate::procfs::{self, ProcessId};
use crate::report::{Record, Reporter, Value};
use crate::wait::process::pidfd_open;

/// After an `--exec` command exits, how long to keep copying output that its own children
/// still write to the inherited pipes.
const OUTPUT_LINGER: Duration = Duration::from_millis(100);

pub struct Context<'a> {
    pub report: &'a Reporter,
    /// When the stop actions may run (`--stop-after`).
    pub not_before: Instant,
    pub deadline: Instant,
    pub interrupts: Option<&'a Interrupts>,
}

#[derive(Debug, Default)]
pub struct Results {
    /// One line per failed action.
    pub failures: Vec<String>,
    pub interrupted: Option<Signal>,
}

pub fn run(plan: &StopPlan, cx: &Context<'_>) -> Results {
    let mut results = Results::default();
    if let Some(signal) = hold(cx) {
        results.interrupted = Some(signal);
        return results;
    }
    for path in &plan.touch {
        if let Err(e) = touch(path) {
            fail(cx, &mut results, format!("touch {}: {e}", path.display()));
        } else {
            cx.report.emit(
                &Record::info("touch", format!("touched {}", path.display()))
                    .with("path", Value::Str(path.display().to_string())),
            );
        }
    }
    if let Some(action) = &plan.signal {
        signal(action, cx, &mut results);
    }
    for command in &plan.exec {
        exec(command, cx, &mut results);
        if results.interrupted.is_some() {
            break;
        }
    }
    results
}

/// Waits for `--stop-after` to pass; `Some(signal)` if interrupted meanwhile.
fn hold(cx: &Context<'_>) -> Option<Signal> {
    let wait = cx.not_before.saturating_duration_since(Instant::now());
    if wait.is_zero() {
        return None;
    }
    cx.report.emit(
        &Record::info(
            "stop_after",
            format!("holding the stop actions for {}", secs(wait)),
        )
        .with("wait_s", Value::Secs(wait)),
    );
    let sources: Vec<_> = cx.interrupts.iter().map(|i| (i.fd(), ())).collect();
    while Instant::now() < cx.not_before {
        if !poll_until(&sources, cx.not_before).is_empty() {
            if let Some(signal) = cx.interrupts.and_then(Interrupts::take) {
                return Some(signal);
            }
        }
    }
    None
}

fn fail(cx: &Context<'_>, results: &mut Results, what: String) {
    cx.report.emit(&Record::warn(
        "stop_failed",
        format!("stop action failed: {what}"),
    ));
    results.failures.push(what);
}

/// Creates the file if needed and sets its modification time, as `touch` does.
fn touch(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    file.set_modified(SystemTime::now())
}

/// The processes a target names right now.
pub fn resolve(target: &Target) -> Vec<ProcessId> {
    match target {
        Target::Pid(pid) | Target::PidFile(_, pid) => vec![*pid],
        Target::Name(name) => procfs::find_by_name(name),
    }
}

fn signal(action: &SignalAction, cx: &Context<'_>, results: &mut Results) {
    let pids = resolve(&action.target);
    if pids.is_empty() {
        fail(
            cx,
            results,
            format!(
                "send {}: no process matches {}",
                action.signal, action.target
            ),
        );
        return;
    }
    for pid in pids {
        match kill(pid.as_nix(), action.signal) {
            Ok(()) => cx.report.emit(
                &Record::info("signal", format!("sent {} to pid {pid}", action.signal))
                    .with("signal", Value::Str(action.signal.as_str().into()))
                    .with("pid", Value::Int(pid.get().into())),
            ),
            Err(e) => fail(
                cx,
                results,
                format!("send {} to pid {pid}: {}", action.signal, e.desc()),
            ),
        }
    }
}

fn exec(command: &ExecCommand, cx: &Context<'_>, results: &mut Results) {
    let started = Instant::now();
    let spawned = crate::interrupt::unblocked(&mut Command::new(&command.program))
        .args(&command.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            fail(cx, results, format!("exec {}: {e}", command.display));
            return;
        }
    };
    cx.report.emit(
        &Record::info(
            "exec",
            format!("running {} (pid {})", command.display, child.id()),
        )
        .with("command", Value::Str(command.display.clone())),
    );
    match supervise(&mut child, command, cx) {
        Ended::Exited(status) if status.success() => cx.report.emit(
            &Record::info(
                "exec_done",
                format!(
                    "{} exited 0 after {}",
                    command.display,
                    secs(started.elapsed())
                ),
            )
            .with("command", Value::Str(command.display.clone()))
            .with("elapsed_s", Value::Secs(started.elapsed())),
        ),
        Ended::Exited(status) => {
            fail(
                cx,
                results,
                format!("exec {}: {}", command.display, describe(status)),
            );
        }
        Ended::Deadline => fail(
            cx,
            results,
            format!(
                "exec {}: still running at the deadline, killed",
                command.display
            ),
        ),
        Ended::Interrupted(signal) => {
            results.interrupted = Some(signal);
            fail(
                cx,
                results,
                format!("exec {}: interrupted by {signal}", command.display),
            );
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(n)) => Signal::try_from(n).map_or_else(
            |_| format!("killed by signal {n}"),
            |s| format!("killed by {s}"),
        ),
        (None, None) => format!("{status}"),
    }
}

enum Ended {
    Exited(ExitStatus),
    Deadline,
    Interrupted(Signal),
}

/// Copies the child's output into the log until it exits, the deadline passes, or prestop
/// is interrupted (then the child is killed, so it never outlives the hook's budget).
fn supervise(child: &mut Child, command: &ExecCommand, cx: &Context<'_>) -> Ended {
    let pidfd = ProcessId::from_raw(child.id()).and_then(|pid| pidfd_open(pid).ok());
    let mut streams = [
        Stream::new(child.stdout.take(), "stdout"),
        Stream::new(child.stderr.take(), "stderr"),
    ];
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        if exited.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some((status, Instant::now()));
            }
        }
        let now = Instant::now();
        if let Some((status, at)) = exited {
            if streams.iter().all(|s| !s.pipe.is_open()) || now >= at + OUTPUT_LINGER {
                for stream in &mut streams {
                    stream.flush(command, cx);
                }
                return Ended::Exited(status);
            }
        } else if now >= cx.deadline {
            let _ = child.kill();
            let _ = child.wait();
            for stream in &mut streams {
                stream.flush(command, cx);
            }
            return Ended::Deadline;
        }

        let mut wake = exited.map_or(cx.deadline, |(_, at)| at + OUTPUT_LINGER);
        if exited.is_none() && pidfd.is_none() {
            // No pidfd: look at the child every 10 ms instead.
            wake = wake.min(now + Duration::from_millis(10));
        }
        let mut sources = Vec::with_capacity(4);
        for (i, stream) in streams.iter().enumerate() {
            if let Some(fd) = stream.pipe.fd() {
                sources.push((fd, Source::Stream(i)));
            }
        }
        if let (Some(fd), None) = (&pidfd, exited) {
            sources.push((fd.as_fd(), Source::Exit));
        }
        if let Some(i) = cx.interrupts {
            sources.push((i.fd(), Source::Interrupt));
        }
        let ready = poll_until(&sources, wake);
        drop(sources);
        for source in ready {
            match source {
                Source::Stream(i) => streams[i].read(command, cx),
                Source::Exit => {}
                Source::Interrupt => {
                    if let Some(signal) = cx.interrupts.and_then(Interrupts::take) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Ended::Interrupted(signal);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Source {
    Stream(usize),
    Exit,
    Interrupt,
}

/// One of the child's output pipes, copied into the log line by line.
struct Stream {
    pipe: LinePipe,
    name: &'static str,
}

impl Stream {
    fn new(fd: Option<impl Into<OwnedFd>>, name: &'static str) -> Stream {
        Stream {
            pipe: LinePipe::new(fd),
            name,
        }
    }

    fn read(&mut self, command: &ExecCommand, cx: &Context<'_>) {
        let name = self.name;
        self.pipe.read_lines(|line| emit(line, name, command, cx));
    }

    fn flush(&mut self, command: &ExecCommand, cx: &Context<'_>) {
        let name = self.name;
        self.pipe.flush(|line| emit(line, name, command, cx));
    }
}

fn emit(line: &[u8], stream: &'static str, command: &ExecCommand, cx: &Context<'_>) {
    let line = String::from_utf8_lossy(line);
    cx.report.emit(
        &Record::info("exec_output", format!("{}: {line}", command.display))
            .with("command", Value::Str(command.display.clone()))
            .with("stream", Value::Str(stream.into())),
    );
}
