//! Stop-intake actions: tell the app to stop taking new work, in a fixed order (touch, then
//! signal, then exec).
//!
//! A failed action is logged and remembered, and the drain still runs: the work already in
//! flight deserves its chance even if the app did not hear us (the exit code becomes 3). Signals
//! only ever go to a `ProcessId`, which cannot be 0 or negative. `--exec` commands run without
//! a shell, with their output copied into the log line by line, and are killed at the deadline.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::libc;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

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

/// The processes a target names right now, each with the start time it must still have.
fn resolve(action: &SignalAction) -> Vec<(ProcessId, Option<u64>)> {
    match &action.target {
        Target::Pid(pid) | Target::PidFile(_, pid) => vec![(*pid, action.start_time)],
        Target::Name(name) => procfs::find_by_name(name)
            .into_iter()
            .map(|pid| (pid, procfs::stat(pid).map(|s| s.start_time)))
            .collect(),
    }
}

fn signal(action: &SignalAction, cx: &Context<'_>, results: &mut Results) {
    let pids = resolve(action);
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
    for (pid, start_time) in pids {
        match send(pid, start_time, action.signal) {
            Ok(()) => cx.report.emit(
                &Record::info("signal", format!("sent {} to pid {pid}", action.signal))
                    .with("signal", Value::Str(action.signal.as_str().into()))
                    .with("pid", Value::Int(pid.get().into())),
            ),
            Err(why) => fail(
                cx,
                results,
                format!("send {} to pid {pid}: {why}", action.signal),
            ),
        }
    }
}

/// Signals `pid` only if it is still the process that started at `start_time`. Through a
/// pidfd, the check and the signal name the same process even if the PID is reused in
/// between; without pidfds (kernels before 5.3) the check is as close as `kill` allows.
fn send(pid: ProcessId, start_time: Option<u64>, signal: Signal) -> Result<(), String> {
    let Some(start_time) = start_time else {
        return Err("no such process when prestop started".into());
    };
    let same = || procfs::stat(pid).is_some_and(|s| s.start_time == start_time);
    let gone = || String::from("exited; its PID now names another process");
    match pidfd_open(pid) {
        Ok(fd) => {
            if !same() {
                return Err(gone());
            }
            // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a null
            // siginfo pointer (the kernel fills in a default) and no flags.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal as libc::c_int,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error().to_string());
            }
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err("no such process".into()),
        Err(_) if !same() => Err(gone()),
        Err(_) => kill(pid.as_nix(), signal).map_err(|e| e.desc().to_owned()),
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
    // When the command exited. It is only reaped at the end, so that its PID, which is also
    // its process group's ID, cannot be reused before the group is killed.
    let mut exited: Option<Instant> = None;
    loop {
        if exited.is_none() && has_exited(child) {
            exited = Some(Instant::now());
        }
        let now = Instant::now();
        // What the command left running in its group is ended with it: the hook must not
        // leave work behind, and the group's output pipes must not hold the hook up.
        if let Some(at) = exited {
            let linger_end = (at + OUTPUT_LINGER).min(cx.deadline);
            if streams.iter().all(|s| !s.pipe.is_open()) || now >= linger_end {
                let status = kill_group(child);
                for stream in &mut streams {
                    stream.flush(command, cx);
                }
                return status.map_or(Ended::Deadline, Ended::Exited);
            }
        } else if now >= cx.deadline {
            kill_group(child);
            for stream in &mut streams {
                stream.flush(command, cx);
            }
            return Ended::Deadline;
        }

        let mut wake = exited.map_or(cx.deadline, |at| (at + OUTPUT_LINGER).min(cx.deadline));
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
                        kill_group(child);
                        return Ended::Interrupted(signal);
                    }
                }
            }
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
        let _ = killpg(group.as_nix(), Signal::SIGKILL);
    }
    child.wait().ok()
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
