//! Stop-intake actions: tell the app to stop taking new work, in a fixed order (touch, then
//! signal, then http, then exec).
//!
//! A failed action is logged and remembered, and the drain still runs: the work already in
//! flight deserves its chance even if the app did not hear us (`Exit::StopFailed`). Signals
//! only ever go to a `ProcessId`, which cannot be 0 or negative. An `--http` request is
//! answered 2xx or it failed, and it is given up at the deadline. `--exec` commands run
//! without a shell, with their output copied into the log line by line, and are killed at the
//! deadline.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::budget::secs;
use crate::config::{ExecCommand, SignalAction, StopPlan};
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::http::{self, Outcome, Request};
use crate::interrupt::Interrupts;
use crate::pipe::LinePipe;
use crate::process::{self, Named, Pinned, Target};
use crate::procfs::ProcessId;
use crate::report::{Record, Reporter, Value};

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
                    .with("path", Value::Str(path.display().to_string()))
                    .step(),
            );
        }
    }
    if let Some(action) = &plan.signal {
        signal(action, cx, &mut results);
    }
    for request in &plan.http {
        if !too_late(cx, &mut results, || format!("{request}: not sent")) {
            http(request, cx, &mut results);
        }
        if results.interrupted.is_some() {
            return results;
        }
    }
    for command in &plan.exec {
        if !too_late(cx, &mut results, || {
            format!("exec {}: not run", command.display)
        }) {
            exec(command, cx, &mut results);
        }
        if results.interrupted.is_some() {
            break;
        }
    }
    results
}

/// Whether the deadline has come before an action that takes time (an earlier one took
/// it all): then the action is not begun, and fails, rather than reach the app after the
/// deadline.
fn too_late(cx: &Context<'_>, results: &mut Results, what: impl FnOnce() -> String) -> bool {
    let late = Instant::now() >= cx.deadline;
    if late {
        let what = format!("{}: the deadline had come", what());
        fail(cx, results, what);
    }
    late
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
    event::sleep_until(cx.not_before, cx.interrupts).err()
}

fn fail(cx: &Context<'_>, results: &mut Results, what: String) {
    cx.report
        .emit(&Record::warn("stop_failed", format!("stop action failed: {what}")).step());
    results.failures.push(what);
}

/// Creates the file if needed and sets its modification time, as `touch` does.
/// Non-blocking, so a FIFO in its place fails instead of hanging the hook.
fn touch(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    file.set_modified(SystemTime::now())
}

/// Who gets the signal, pinned: for a PID, the very process it named when the options were
/// checked; for a pidfile, the process it names now (the one pinned then, if it still names
/// that PID); for a name, every process of that name now.
enum Receivers<'a> {
    Pinned(&'a Pinned),
    Found(Vec<Pinned>),
}

fn receivers(action: &SignalAction, by: Instant) -> Result<Receivers<'_>, String> {
    let signal = action.signal;
    let pids = match action.target.resolve(action.pid1, by) {
        Ok(Named::Pids(pids)) => pids,
        Ok(Named::NoPidfile) => {
            return Err(format!(
                "send {signal} to {}: the pidfile is gone, so is its process",
                action.target
            ));
        }
        Err(why) => return Err(format!("send {signal} to {}: {why}", action.target)),
    };
    match (&action.target, &action.pinned, pids.as_slice()) {
        (Target::Pid(_), Some(pinned), _) => return Ok(Receivers::Pinned(pinned)),
        (Target::Pid(_), None, [pid]) => {
            return Err(format!(
                "send {signal} to pid {pid}: no such process when prestop started"
            ));
        }
        (Target::PidFile(_), Some(pinned), [pid]) if pinned.pid() == *pid => {
            return Ok(Receivers::Pinned(pinned));
        }
        _ => {}
    }
    let mut found = Vec::new();
    for pid in pids {
        match Pinned::pin(pid) {
            Ok(Some(pinned)) => found.push(pinned),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "send {signal} to pid {pid}: {}",
                    process::describe_io(&e)
                ));
            }
        }
    }
    if found.is_empty() {
        return Err(format!(
            "send {signal}: no process matches {}",
            action.target
        ));
    }
    Ok(Receivers::Found(found))
}

fn signal(action: &SignalAction, cx: &Context<'_>, results: &mut Results) {
    let receivers = match receivers(action, cx.deadline) {
        Ok(receivers) => receivers,
        Err(why) => return fail(cx, results, why),
    };
    let list: Vec<&Pinned> = match &receivers {
        Receivers::Pinned(pinned) => vec![pinned],
        Receivers::Found(found) => found.iter().collect(),
    };
    for process in list {
        let pid = process.pid();
        match process.signal(action.signal) {
            Ok(()) => cx.report.emit(
                &Record::info("signal", format!("sent {} to pid {pid}", action.signal))
                    .with("signal", Value::Str(action.signal.as_str().into()))
                    .with("pid", Value::Int(pid.get().into()))
                    .step(),
            ),
            Err(why) => fail(
                cx,
                results,
                format!("send {} to pid {pid}: {why}", action.signal),
            ),
        }
    }
}

fn http(request: &Request, cx: &Context<'_>, results: &mut Results) {
    let started = Instant::now();
    let outcome = match http::ask(request, cx.deadline, cx.interrupts) {
        Ok(outcome) => outcome,
        Err(signal) => {
            results.interrupted = Some(signal);
            return fail(cx, results, format!("{request}: interrupted by {signal}"));
        }
    };
    let took = started.elapsed();
    match outcome {
        Outcome::Answered(answer) if answer.success() => cx.report.emit(
            &Record::info("http", format!("{request}: {answer} after {}", secs(took)))
                .with("method", Value::Str(request.method.into()))
                .with("url", Value::Str(request.url.clone()))
                .with("status", Value::Int(answer.status.into()))
                .with("elapsed_s", Value::Secs(took))
                .step(),
        ),
        Outcome::Answered(answer) => fail(cx, results, format!("{request}: {answer}")),
        Outcome::Failed(failure) => fail(cx, results, format!("{request}: {failure}")),
        Outcome::Deadline(phase) => fail(
            cx,
            results,
            format!(
                "{request}: no answer by the deadline ({phase}, after {})",
                secs(took)
            ),
        ),
    }
}

fn exec(command: &ExecCommand, cx: &Context<'_>, results: &mut Results) {
    let started = Instant::now();
    // Its own process group, so that what it starts is killed with it at the deadline.
    let spawned = crate::interrupt::unblocked(&mut Command::new(&command.program))
        .process_group(0)
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
        .with("command", Value::Str(command.display.clone()))
        .step(),
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
            .with("elapsed_s", Value::Secs(started.elapsed()))
            .step(),
        ),
        Ended::Exited(status) => {
            fail(
                cx,
                results,
                format!(
                    "exec {}: {}",
                    command.display,
                    process::describe_exit(status)
                ),
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

enum Ended {
    Exited(ExitStatus),
    Deadline,
    Interrupted(Signal),
}

/// Copies the child's output into the log until it exits, the deadline passes, or prestop
/// is interrupted (then the child is killed, so it never outlives the hook's budget).
fn supervise(child: &mut Child, command: &ExecCommand, cx: &Context<'_>) -> Ended {
    let pidfd = ProcessId::from_raw(child.id()).and_then(|pid| process::pidfd_open(pid).ok());
    let mut supervisor = Supervisor {
        streams: [
            Stream::new(child.stdout.take(), "stdout"),
            Stream::new(child.stderr.take(), "stderr"),
        ],
        child,
        pidfd,
        exited: None,
        command,
        cx,
    };
    let ended = event::run(&mut supervisor, cx.interrupts);
    let status = kill_group(supervisor.child);
    for stream in &mut supervisor.streams {
        stream.flush(command, cx);
    }
    match ended {
        Err(signal) => Ended::Interrupted(signal),
        Ok(true) => status.map_or(Ended::Deadline, Ended::Exited),
        Ok(false) => Ended::Deadline,
    }
}

/// An `--exec` command while it runs: its output pipes, and its exit.
struct Supervisor<'a> {
    child: &'a mut Child,
    pidfd: Option<OwnedFd>,
    streams: [Stream; 2],
    /// When the command exited. It is only reaped at the end, so that its PID, which is also
    /// its process group's ID, cannot be reused before the group is killed.
    exited: Option<Instant>,
    command: &'a ExecCommand,
    cx: &'a Context<'a>,
}

#[derive(Clone, Copy)]
enum Source {
    Stream(usize),
    Exit,
}

impl Machine for Supervisor<'_> {
    type Source = Source;
    /// Whether the command exited by itself (`false`: the deadline came first).
    type Output = bool;

    fn tick(&mut self, now: Instant) -> Step<bool> {
        if self.exited.is_none() && has_exited(self.child) {
            self.exited = Some(now);
        }
        // What the command left running in its group is ended with it: the hook must not
        // leave work behind, and the group's output pipes must not hold the hook up.
        match self.exited {
            Some(at) => {
                let linger_end = (at + OUTPUT_LINGER).min(self.cx.deadline);
                if self.streams.iter().all(|s| !s.pipe.is_open()) || now >= linger_end {
                    return Step::Done(true);
                }
                Step::Sleep(Wake::at(linger_end))
            }
            None if now >= self.cx.deadline => Step::Done(false),
            // No pidfd: look at the child every 10 ms instead.
            None if self.pidfd.is_none() => Step::Sleep(Wake {
                at: (now + Duration::from_millis(10)).min(self.cx.deadline),
                exact: self.cx.deadline,
            }),
            None => Step::Sleep(Wake::at(self.cx.deadline)),
        }
    }

    fn watch(&self, fds: &mut Watch<Source>) {
        for (i, stream) in self.streams.iter().enumerate() {
            if let Some(fd) = stream.pipe.fd() {
                fds.add(fd, Source::Stream(i));
            }
        }
        if let (Some(fd), None) = (&self.pidfd, self.exited) {
            fds.add(fd.as_fd(), Source::Exit);
        }
    }

    fn ready(&mut self, source: Source) {
        match source {
            Source::Stream(i) => self.streams[i].read(self.command, self.cx),
            // The next tick looks at the child.
            Source::Exit => {}
        }
    }
}

/// Whether the command has exited, looked at without reaping it.
fn has_exited(child: &Child) -> bool {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(
        waitid(Id::Pid(pid), flags),
        Ok(WaitStatus::StillAlive) | Err(_)
    )
}

/// SIGKILL to the command's process group (it leads it, and as it is not reaped yet the
/// group's ID is still its own), then reaps the command and returns how it ended.
fn kill_group(child: &mut Child) -> Option<ExitStatus> {
    if let Some(group) = ProcessId::from_raw(child.id()) {
        process::kill_group(group);
    }
    // The command itself too, should it have left its group: the wait below must end.
    // Not reaped yet, its PID cannot name another process.
    let _ = child.kill();
    child.wait().ok()
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
