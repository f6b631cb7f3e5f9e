//! The local kubelet: run an app, play a pod's termination against it, report a timeline.
//!
//! The sequence is the kubelet's: the preStop hook runs first (as its own process, this very
//! binary's `drain`, exactly as a Deployment would run it), then the app gets SIGTERM, then
//! SIGKILL when the grace period ends — two seconds later if the hook overran it. If the app
//! exits while the hook runs, the container stops and the hook is killed, as in a pod. The
//! app runs in its own process group, and whatever happens (Ctrl-C included) that group is
//! killed before prestop returns, so a rehearsal never leaves anything running.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::budget::secs;
use crate::cli::DrainArgs;
use crate::config::{Config, Pid1, show};
use crate::coordinate::KUBELET_EXTENSION;
use crate::error::Error;
use crate::interrupt::Interrupts;
use crate::pipe::{LinePipe, poll_until};
use crate::procfs::ProcessId;
use crate::wait::process::pidfd_open;

/// How long the hook's last output may trail its exit (its `--exec` children can hold the
/// pipe open for a moment).
const HOOK_OUTPUT_LINGER: Duration = Duration::from_millis(200);

pub struct Options<'a> {
    pub drain: &'a DrainArgs,
    /// When termination begins, after the app starts.
    pub after: Duration,
    /// What the kubelet sends after the hook (the image's STOPSIGNAL).
    pub stop_signal: Signal,
    /// Run the app as PID 1 of a new PID namespace (root only).
    pub pid_namespace: bool,
    pub app: &'a [OsString],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Graceful,
    DrainedLate,
    Killed,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Graceful => "graceful",
            Verdict::DrainedLate => "drained-late",
            Verdict::Killed => "killed",
        }
    }
}

/// Runs a rehearsal; returns the exit code (0 for a graceful verdict, 1 otherwise).
pub fn run(options: &Options<'_>) -> Result<u8, Error> {
    let config = Config::from_drain_args(options.drain, Pid1::RehearsalApp)?;
    let Some((program, args)) = options.app.split_first() else {
        return Err(Error::Config(
            "rehearse needs the app to run after --: prestop rehearse [OPTIONS] -- APP [ARGS...]"
                .into(),
        ));
    };
    if options.pid_namespace && !nix::unistd::geteuid().is_root() {
        return Err(Error::usage(
            "--pid-namespace",
            "true",
            "needs root (it creates a PID namespace)",
        ));
    }
    if config.dry_run {
        crate::print_plan(&config);
        return Ok(0);
    }
    let interrupts = Interrupts::install()
        .map_err(|e| Error::system("cannot set up signal handling", e.into()))?;
    let scratch = Scratch::new("rehearse")
        .map_err(|e| Error::system("cannot create a state directory", e))?;

    let mut app = App::spawn(program, args, options.pid_namespace)?;
    let mut run = Rehearsal {
        config: &config,
        options,
        interrupts: &interrupts,
        timeline: Timeline::new(app.started),
        state_dir: scratch.path().to_path_buf(),
    };
    let result = run.play(&mut app);
    app.kill_group();
    if let Some(signal) = result {
        kubelet(&format!(
            "interrupted by {signal}: the app's process group was killed"
        ));
        return Ok(crate::signal_exit_code(signal));
    }
    Ok(run.report())
}

struct Rehearsal<'a> {
    config: &'a Config,
    options: &'a Options<'a>,
    interrupts: &'a Interrupts,
    timeline: Timeline,
    state_dir: PathBuf,
}

/// What a poll watches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Interrupt,
    AppExit,
    HookExit,
    HookOutput,
}

/// What a poll woke up for.
enum Woke {
    Timeout,
    AppExited,
    HookExited,
    HookOutput,
    Interrupted(Signal),
}

impl Rehearsal<'_> {
    /// Plays the whole sequence. `Some(signal)` if interrupted.
    fn play(&mut self, app: &mut App) -> Option<Signal> {
        self.timeline.add(
            app.started,
            format!("app started (pid {}): {}", app.pid, app.display),
        );
        kubelet(&format!(
            "app started (pid {}); termination begins in {}",
            app.pid,
            show(self.options.after)
        ));
        if let Some(signal) = self.run_until_termination(app) {
            return Some(signal);
        }
        let grace = self.config.budget.grace;
        let start = Instant::now();
        self.timeline.origin = start;
        self.timeline.grace_end = Some(start + grace);
        self.timeline.add(
            start,
            format!(
                "termination begins: preStop hook started (grace period {}, hook budget {})",
                show(grace),
                show(self.config.budget.total())
            ),
        );
        kubelet(&format!(
            "terminating: running the preStop hook (grace period {})",
            show(grace)
        ));
        self.terminate(app, start + grace)
    }

    /// Lets the app run until `--after`, or until it exits on its own.
    fn run_until_termination(&mut self, app: &mut App) -> Option<Signal> {
        let begin = app.started + self.options.after;
        while Instant::now() < begin {
            match self.wait(app, None, begin) {
                Woke::Interrupted(signal) => return Some(signal),
                Woke::AppExited => {
                    let status = app.exit_status();
                    self.timeline
                        .add(Instant::now(), format!("app exited on its own: {status}"));
                    kubelet(&format!(
                        "the app exited on its own ({status}) before termination"
                    ));
                    return None;
                }
                Woke::Timeout | Woke::HookExited | Woke::HookOutput => {}
            }
        }
        None
    }

    /// The hook, then the stop signal, then SIGKILL at the end of the grace period.
    fn terminate(&mut self, app: &mut App, grace_end: Instant) -> Option<Signal> {
        let mut hook = match Hook::spawn(self, app) {
            Ok(hook) => hook,
            Err(e) => {
                self.timeline
                    .add(Instant::now(), format!("the hook could not start: {e}"));
                kubelet(&format!("the preStop hook could not start: {e}"));
                return self.finish(app, grace_end, false);
            }
        };
        let mut overran = false;
        loop {
            let wake = hook
                .exited_at
                .map_or(grace_end, |at| at + HOOK_OUTPUT_LINGER);
            match self.wait(app, Some(&hook), wake) {
                Woke::Interrupted(signal) => {
                    hook.kill();
                    return Some(signal);
                }
                Woke::HookOutput => hook.read(&mut self.timeline),
                Woke::HookExited => hook.note_exit(&mut self.timeline),
                Woke::AppExited if hook.exited_at.is_none() => {
                    let status = app.exit_status();
                    self.timeline.add(
                        Instant::now(),
                        format!("app exited during the hook ({status}): the hook is killed"),
                    );
                    self.timeline.app_exited_during_hook = true;
                    kubelet(&format!(
                        "the app exited ({status}) while the hook ran: the container stops"
                    ));
                    hook.kill();
                    hook.note_exit(&mut self.timeline);
                }
                Woke::AppExited => {}
                Woke::Timeout if hook.exited_at.is_none() => {
                    overran = true;
                    self.timeline.add(
                        Instant::now(),
                        "grace period over with the hook still running: 2 s more".into(),
                    );
                    kubelet("the grace period ended during the hook: 2 s more, then SIGKILL");
                    break;
                }
                Woke::Timeout => break,
            }
            if hook.exited_at.is_some() && !hook.pipe.is_open() {
                break;
            }
        }
        hook.pipe.flush(|line| hook_line(line, &mut self.timeline));
        let kill_at = if overran {
            grace_end + KUBELET_EXTENSION
        } else {
            grace_end
        };
        let result = self.finish(app, kill_at, overran);
        hook.kill();
        self.timeline.hook_code = hook.code;
        result
    }

    /// SIGTERM (the stop signal), then SIGKILL at `kill_at` if the app is still running.
    fn finish(&mut self, app: &mut App, kill_at: Instant, overran: bool) -> Option<Signal> {
        self.timeline.overran = overran;
        if app.exited_at.is_none() {
            let signal = self.options.stop_signal;
            kubelet(&format!("sending {signal} to the app (pid {})", app.pid));
            app.signal(signal);
            self.timeline
                .add(Instant::now(), format!("{signal} sent to the app"));
        }
        while app.exited_at.is_none() {
            match self.wait(app, None, kill_at) {
                Woke::Interrupted(signal) => return Some(signal),
                Woke::AppExited => {
                    let status = app.exit_status();
                    self.timeline.add(
                        app.exited_at.unwrap_or_else(Instant::now),
                        format!("app exited: {status}"),
                    );
                    kubelet(&format!("the app exited: {status}"));
                }
                Woke::Timeout if Instant::now() >= kill_at => {
                    kubelet("grace period over: SIGKILL to the app's process group");
                    self.timeline.add(
                        Instant::now(),
                        "grace period over: SIGKILL sent to the app's process group".into(),
                    );
                    app.kill_group();
                    self.timeline.killed = true;
                    let _ = app.child.wait();
                    app.exited_at = Some(Instant::now());
                }
                _ => {}
            }
        }
        self.timeline.app_exit = app.exited_at;
        None
    }

    /// Sleeps until the app exits, the hook exits or writes, an interrupt, or `wake`.
    fn wait(&self, app: &mut App, hook: Option<&Hook>, wake: Instant) -> Woke {
        let mut sources = Vec::with_capacity(4);
        sources.push((self.interrupts.fd(), Source::Interrupt));
        if app.exited_at.is_none() {
            sources.push((app.pidfd.as_fd(), Source::AppExit));
        }
        if let Some(hook) = hook {
            if hook.exited_at.is_none() {
                sources.push((hook.pidfd.as_fd(), Source::HookExit));
            }
            if let Some(fd) = hook.pipe.fd() {
                sources.push((fd, Source::HookOutput));
            }
        }
        let ready = poll_until(&sources, wake);
        drop(sources);
        if ready.contains(&Source::Interrupt) {
            if let Some(signal) = self.interrupts.take() {
                return Woke::Interrupted(signal);
            }
        }
        if ready.contains(&Source::HookOutput) {
            return Woke::HookOutput;
        }
        if ready.contains(&Source::AppExit) {
            app.exited_at.get_or_insert_with(Instant::now);
            return Woke::AppExited;
        }
        if ready.contains(&Source::HookExit) {
            return Woke::HookExited;
        }
        Woke::Timeout
    }

    /// Prints the timeline and the verdict; returns the exit code.
    fn report(&self) -> u8 {
        let t = &self.timeline;
        let verdict = if t.killed {
            Verdict::Killed
        } else if t.overran || !matches!(t.hook_code, Some(0 | 3)) {
            Verdict::DrainedLate
        } else {
            Verdict::Graceful
        };
        let mut text = String::from("\nTimeline (offsets from the start of termination):\n");
        for (at, what) in &t.entries {
            let offset = if *at >= t.origin {
                (*at - t.origin).as_secs_f64()
            } else {
                -(t.origin - *at).as_secs_f64()
            };
            let _ = writeln!(text, "  {offset:>+9.3}s  {what}");
        }
        if let Some(end) = t.grace_end {
            let _ = writeln!(
                text,
                "  {:>+9.3}s  (the grace period ends)",
                (end - t.origin).as_secs_f64()
            );
        }
        let detail = match (verdict, t.app_exit, t.grace_end) {
            (Verdict::Graceful, Some(exit), Some(end)) => format!(
                "the app drained and exited with {} of the grace period to spare",
                secs(end.saturating_duration_since(exit))
            ),
            (Verdict::DrainedLate, _, _) if t.app_exited_during_hook => {
                "the app exited while its preStop hook was still running, so the container \
                 stopped and the hook was killed before it confirmed the drain"
                    .into()
            }
            (Verdict::DrainedLate, _, _) => {
                "the hook's budget ran out before the work drained; the app still exited before \
                 SIGKILL"
                    .into()
            }
            (Verdict::Killed, _, _) => {
                "the app was still running when the grace period ended and got SIGKILL".into()
            }
            _ => String::new(),
        };
        let verdict_text = if std::io::stderr().is_terminal() {
            let color = if verdict == Verdict::Graceful {
                "32"
            } else {
                "31"
            };
            format!("\x1b[1;{color}m{}\x1b[0m", verdict.name())
        } else {
            verdict.name().to_owned()
        };
        let _ = writeln!(text, "\nVerdict: {verdict_text}: {detail}");
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
        u8::from(verdict != Verdict::Graceful)
    }
}

/// The app under rehearsal.
struct App {
    child: Child,
    /// The app itself (inside a PID namespace, the child of `unshare`).
    pid: ProcessId,
    /// The process group to kill at the end: the direct child's.
    group: ProcessId,
    pidfd: OwnedFd,
    started: Instant,
    exited_at: Option<Instant>,
    display: String,
}

impl App {
    fn spawn(program: &OsString, args: &[OsString], pid_namespace: bool) -> Result<App, Error> {
        let display = std::iter::once(program)
            .chain(args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = if pid_namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"]);
            c.arg(program);
            c
        } else {
            Command::new(program)
        };
        // Its own group: Ctrl-C in the terminal reaches prestop, which then ends the group.
        crate::interrupt::unblocked(&mut cmd);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        let child = cmd.spawn().map_err(|e| {
            if pid_namespace {
                Error::usage("--pid-namespace", "", format!("cannot run unshare(1): {e}"))
            } else {
                Error::usage("APP", program, format!("cannot start: {e}"))
            }
        })?;
        let started = Instant::now();
        let group = ProcessId::from_raw(child.id()).expect("a child has a positive pid");
        let pid = if pid_namespace {
            namespaced_child(group).unwrap_or(group)
        } else {
            group
        };
        let pidfd =
            pidfd_open(group).map_err(|e| Error::system("cannot watch the app (pidfd_open)", e))?;
        Ok(App {
            child,
            pid,
            group,
            pidfd,
            started,
            exited_at: None,
            display,
        })
    }

    /// The exit status, looked at without reaping, so the PID cannot be reused while a
    /// hook might still signal it.
    fn exit_status(&self) -> String {
        match waitid(
            Id::PIDFd(self.pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
            _ => "status unknown".into(),
        }
    }

    fn signal(&self, signal: Signal) {
        let _ = kill(self.pid.as_nix(), signal);
    }

    fn kill_group(&mut self) {
        let _ = killpg(self.group.as_nix(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds the app inside a new PID namespace: the first child of `unshare`, once it has
/// replaced itself with the app.
fn namespaced_child(unshare: ProcessId) -> Option<ProcessId> {
    let children = format!("/proc/{unshare}/task/{unshare}/children");
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text
            .split_whitespace()
            .next()
            .and_then(|p| ProcessId::parse(p).ok())
        {
            if crate::procfs::comm(pid).is_some_and(|c| c != "unshare") {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The preStop hook: `prestop drain` with the rehearsal's options, as its own process.
struct Hook {
    child: Child,
    pidfd: OwnedFd,
    pipe: LinePipe,
    started: Instant,
    exited_at: Option<Instant>,
    code: Option<i32>,
}

impl Hook {
    fn spawn(run: &Rehearsal<'_>, app: &App) -> std::io::Result<Hook> {
        let exe = std::env::current_exe()?;
        let args = hook_args(
            run.options.drain,
            app.pid,
            run.options.pid_namespace,
            &run.state_dir,
        );
        let mut cmd = if run.options.pid_namespace {
            let mut c = Command::new("nsenter");
            c.arg("-t")
                .arg(app.pid.to_string())
                .args(["-p", "-m", "--"]);
            c.arg(exe);
            c
        } else {
            Command::new(exe)
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PRESTOP_") && key != "PRESTOP_DEBUG" {
                cmd.env_remove(key);
            }
        }
        crate::interrupt::unblocked(&mut cmd);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let pidfd = pidfd_open(ProcessId::from_raw(child.id()).expect("positive pid"))?;
        let pipe = LinePipe::new(child.stdout.take());
        Ok(Hook {
            child,
            pidfd,
            pipe,
            started,
            exited_at: None,
            code: None,
        })
    }

    fn read(&mut self, timeline: &mut Timeline) {
        self.pipe.read_lines(|line| hook_line(line, timeline));
    }

    fn note_exit(&mut self, timeline: &mut Timeline) {
        if self.exited_at.is_some() {
            return;
        }
        let status = self.child.wait().ok();
        let now = Instant::now();
        self.exited_at = Some(now);
        self.code = status.and_then(|s| s.code());
        let how = match self.code {
            Some(code) => format!("exit {code}"),
            None => "killed".into(),
        };
        timeline.add(
            now,
            format!("hook returned ({how}) after {}", secs(now - self.started)),
        );
        kubelet(&format!("the preStop hook returned ({how})"));
    }

    fn kill(&mut self) {
        if self.exited_at.is_none() {
            let _ = self.child.kill();
        }
    }
}

/// The hook's command line: the rehearsal's drain options, with the target `1` meaning the
/// app (outside a PID namespace, where the app is not PID 1), JSON lines on stdout for the
/// timeline, and a state directory of the rehearsal's own.
fn hook_args(d: &DrainArgs, app: ProcessId, pid_namespace: bool, state: &Path) -> Vec<OsString> {
    let pid1 = |target: &str| -> OsString {
        if target == "1" && !pid_namespace {
            app.to_string().into()
        } else {
            target.into()
        }
    };
    let mut args: Vec<OsString> = vec!["drain".into()];
    let mut push = |flag: &str, value: OsString| {
        args.push(flag.into());
        args.push(value);
    };
    push("--grace-period", (&d.budget.grace_period).into());
    push("--reserve", (&d.budget.reserve).into());
    push("--min-wait", (&d.budget.min_wait).into());
    push("--quiet-for", (&d.budget.quiet_for).into());
    push("--stop-after", (&d.stop.stop_after).into());
    for path in &d.stop.touch {
        push("--touch", path.clone());
    }
    if let Some(signal) = &d.stop.signal {
        push("--signal", signal.into());
        push(
            "--signal-target",
            pid1(d.stop.signal_target.as_deref().unwrap_or("1")),
        );
    }
    for command in &d.stop.exec {
        push("--exec", command.into());
    }
    for glob in &d.wait.wait_lock {
        push("--wait-lock", glob.into());
    }
    for target in &d.wait.wait_pid {
        push("--wait-pid", pid1(target));
    }
    push("--poll-interval", (&d.wait.poll_interval).into());
    push("--progress-interval", (&d.output.progress_interval).into());
    push("--log-format", "json".into());
    push("--log-target", "stdout".into());
    push("--state-dir", state.as_os_str().to_owned());
    args
}

/// One JSON line from the hook: shown as the hook would log it, and kept in the timeline
/// if it is a step of the sequence (progress lines are shown only).
fn hook_line(line: &[u8], timeline: &mut Timeline) {
    let line = String::from_utf8_lossy(line);
    let (Some(event), Some(message)) = (json_str(&line, "event"), json_str(&line, "message"))
    else {
        let _ = writeln!(std::io::stderr(), "{line}");
        return;
    };
    let _ = writeln!(std::io::stderr(), "prestop: {message}");
    let step = matches!(
        event.as_str(),
        "touch"
            | "signal"
            | "exec"
            | "exec_done"
            | "stop_failed"
            | "condition_drained"
            | "no_process"
            | "drained"
            | "exhausted"
            | "join"
    );
    if step {
        timeline.add(Instant::now(), format!("hook: {message}"));
    }
}

/// The string value of `"key":"..."` in one of prestop's own JSON lines.
fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

fn kubelet(line: &str) {
    let _ = writeln!(std::io::stderr(), "kubelet: {line}");
}

/// The steps of a rehearsal, with the instants they happened.
struct Timeline {
    origin: Instant,
    entries: Vec<(Instant, String)>,
    grace_end: Option<Instant>,
    app_exit: Option<Instant>,
    hook_code: Option<i32>,
    overran: bool,
    killed: bool,
    app_exited_during_hook: bool,
}

impl Timeline {
    fn new(origin: Instant) -> Timeline {
        Timeline {
            origin,
            entries: Vec::new(),
            grace_end: None,
            app_exit: None,
            hook_code: None,
            overran: false,
            killed: false,
            app_exited_during_hook: false,
        }
    }

    fn add(&mut self, at: Instant, what: String) {
        self.entries.push((at, what));
    }
}

/// A private temporary directory, removed with everything in it when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(purpose: &str) -> std::io::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "prestop-{purpose}-{}-{attempt}",
                std::process::id()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Scratch(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_read_back() {
        let line = r#"{"time":"t","event":"signal","message":"sent \"X\" \\ \u0001 to pid 1"}"#;
        assert_eq!(json_str(line, "event").as_deref(), Some("signal"));
        assert_eq!(
            json_str(line, "message").as_deref(),
            Some("sent \"X\" \\ \u{1} to pid 1")
        );
        assert_eq!(json_str(line, "missing"), None);
        assert_eq!(json_str(r#"{"event":"unterminated"#, "event"), None);
    }
}
