//! The local kubelet: run an app, play a pod's termination against it, report a timeline.
//!
//! The sequence is the kubelet's: the preStop hook runs first (as its own process, this very
//! binary's `drain`, with the drain options exactly as the user gave them, as a Deployment
//! would run it), then the app gets its stop signal, then SIGKILL when the grace period ends,
//! two seconds later if the hook overran it. If the app exits while the hook runs, the
//! container stops and the hook is killed with it, as in a pod. The app runs in its own
//! process group, and whatever happens (Ctrl-C included) that group is killed before prestop
//! returns, so a rehearsal never leaves anything running. This module plays the kubelet; it
//! must never drain anything itself.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::budget::{Budget, decimal, secs};
use crate::config::{Config, show};
use crate::error::Error;
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::exit::Exit;
use crate::interrupt::Interrupts;
use crate::pipe::LinePipe;
use crate::process;
use crate::procfs::ProcessId;
use crate::report;

/// How long the hook's last output may trail its exit (its `--exec` children can hold the
/// pipe open for a moment).
const HOOK_OUTPUT_LINGER: Duration = Duration::from_millis(200);

/// How long an ended rehearsal gives the hook to end its `--exec` commands after SIGTERM.
const HOOK_TERM_WAIT: Duration = Duration::from_millis(500);

pub struct Options<'a> {
    /// The drain options, validated.
    pub config: &'a Config,
    /// The same drain options as given, for the hook's command line.
    pub hook: &'a [OsString],
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

/// Runs a rehearsal; the exit code says whether the verdict is graceful.
pub fn run(options: &Options<'_>) -> Result<Exit, Error> {
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
    let interrupts = Interrupts::install()
        .map_err(|e| Error::system("cannot set up signal handling", e.into()))?;
    let scratch = Scratch::new("rehearse")
        .map_err(|e| Error::system("cannot create a state directory", e))?;

    let app = App::spawn(program, args, options.pid_namespace)?;
    kubelet(&format!(
        "app started (pid {}); termination begins in {}",
        app.pid,
        show(options.after)
    ));
    let mut rehearsal = Rehearsal {
        timeline: Timeline::new(app.started, options.config),
        phase: Phase::Running {
            begin: app.started + options.after,
        },
        options,
        state_dir: scratch.path().to_path_buf(),
        hook: None,
        app,
    };
    rehearsal.timeline.add(
        rehearsal.app.started,
        format!(
            "app started (pid {}): {}",
            rehearsal.app.pid, rehearsal.app.display
        ),
    );
    let played = event::run(&mut rehearsal, Some(&interrupts));
    rehearsal.app.kill_group();
    if let Some(hook) = &mut rehearsal.hook {
        hook.kill();
    }
    match played {
        Ok(()) => Ok(rehearsal.timeline.report()),
        Err(signal) => {
            kubelet(&format!(
                "interrupted by {signal}: the app's process group was killed"
            ));
            Ok(Exit::Interrupted(signal))
        }
    }
}

/// Where the termination stands.
enum Phase {
    /// The app runs; termination begins at `begin`.
    Running {
        begin: Instant,
    },
    /// The preStop hook runs (or has just returned, its output still coming).
    Hook,
    /// The stop signal went out; SIGKILL comes at `kill_at`.
    Stopping {
        kill_at: Instant,
    },
    Over,
}

struct Rehearsal<'a> {
    options: &'a Options<'a>,
    state_dir: PathBuf,
    app: App,
    hook: Option<Hook>,
    phase: Phase,
    timeline: Timeline,
}

#[derive(Clone, Copy)]
enum Source {
    AppExit,
    HookExit,
    HookOutput,
}

impl Machine for Rehearsal<'_> {
    type Source = Source;
    type Output = ();

    fn tick(&mut self, now: Instant) -> Step<()> {
        match self.phase {
            Phase::Running { begin } => {
                if self.app.has_exited() {
                    let status = self.app.exit_status();
                    self.timeline
                        .add(now, format!("app exited on its own: {status}"));
                    kubelet(&format!(
                        "the app exited on its own ({status}) before termination"
                    ));
                    self.phase = Phase::Over;
                } else if now >= begin {
                    self.begin_termination(now);
                }
            }
            Phase::Hook => self.during_hook(now),
            Phase::Stopping { kill_at } => {
                if self.app.has_exited() {
                    let status = self.app.exit_status();
                    self.timeline.add(now, format!("app exited: {status}"));
                    kubelet(&format!("the app exited: {status}"));
                    self.timeline.app_exit = Some(now);
                    self.phase = Phase::Over;
                } else if now >= kill_at {
                    kubelet("grace period over: SIGKILL to the app's process group");
                    self.timeline.add(
                        now,
                        "grace period over: SIGKILL sent to the app's process group",
                    );
                    self.app.kill_group();
                    self.timeline.killed = true;
                    self.timeline.app_exit = Some(Instant::now());
                    self.phase = Phase::Over;
                }
            }
            Phase::Over => {}
        }
        match self.phase {
            Phase::Over => Step::Done(()),
            Phase::Running { begin } => Step::Sleep(Wake::at(begin)),
            Phase::Hook => {
                let grace_end = self.timeline.budget().grace_end();
                let at = self
                    .hook
                    .as_ref()
                    .and_then(|h| h.exited_at)
                    .map_or(grace_end, |at| at + HOOK_OUTPUT_LINGER);
                Step::Sleep(Wake::at(at))
            }
            Phase::Stopping { kill_at } => Step::Sleep(Wake::at(kill_at)),
        }
    }

    fn watch(&self, fds: &mut Watch<Source>) {
        if !self.app.reaped {
            fds.add(self.app.exit.as_fd(), Source::AppExit);
        }
        if let (Phase::Hook, Some(hook)) = (&self.phase, &self.hook) {
            if hook.exited_at.is_none() {
                fds.add(hook.pidfd.as_fd(), Source::HookExit);
            }
            if let Some(fd) = hook.pipe.fd() {
                fds.add(fd, Source::HookOutput);
            }
        }
    }

    fn ready(&mut self, source: Source) {
        match source {
            // Exits are looked at in `tick`, the app's before the hook's.
            Source::AppExit | Source::HookExit => {}
            Source::HookOutput => {
                if let Some(hook) = &mut self.hook {
                    hook.read(&mut self.timeline);
                }
            }
        }
    }
}

impl Rehearsal<'_> {
    /// The kubelet begins the termination: the grace period starts, the hook runs.
    fn begin_termination(&mut self, now: Instant) {
        let config = self.options.config;
        self.timeline.begin(now);
        self.timeline.add(
            now,
            format!(
                "termination begins: preStop hook started (grace period {}, hook budget {})",
                show(config.budget.grace),
                show(config.budget.total())
            ),
        );
        kubelet(&format!(
            "terminating: running the preStop hook (grace period {})",
            show(config.budget.grace)
        ));
        match Hook::spawn(self) {
            Ok(hook) => {
                self.hook = Some(hook);
                self.phase = Phase::Hook;
            }
            Err(e) => {
                self.timeline
                    .add(Instant::now(), format!("the hook could not start: {e}"));
                kubelet(&format!("the preStop hook could not start: {e}"));
                self.stop(false);
            }
        }
    }

    fn during_hook(&mut self, now: Instant) {
        let Some(hook) = &mut self.hook else { return };
        let grace_end = self.timeline.budget().grace_end();
        // The app is looked at first: when it is gone, the container has stopped, and a hook
        // that returned meanwhile (often *because* the app exited) was, in a pod, killed
        // with the container before it could.
        // A hook killed outright (SIGKILL) is, in a PID namespace, what the kernel does when
        // the namespace's PID 1 exits; that exit shows on the app's pidfd a moment later.
        let killed_outright = hook.exited_at.is_none() && hook.killed_outright();
        let app_gone = if killed_outright {
            readable(&self.app.exit, Duration::from_millis(200))
        } else {
            self.app.has_exited()
        };
        if hook.exited_at.is_none() && app_gone {
            let status = self.app.exit_status();
            self.timeline.add(
                now,
                format!(
                    "app exited during the hook ({status}): the container stops, the hook is \
                     killed with it, and the kubelet records FailedPreStopHook"
                ),
            );
            self.timeline.app_exit = Some(now);
            self.timeline.app_exited_during_hook = true;
            kubelet(&format!(
                "the app exited ({status}) while the hook ran: the container stops and the hook \
                 is killed (FailedPreStopHook)"
            ));
            // What the hook did with the app gone (often: saw it exit, and exited 0) is what no
            // pod would see: there, the kernel kills it with the container's PID 1.
            hook.kill();
            let here = match hook.reap() {
                Some(code) => format!("exit {code}"),
                None => "killed".into(),
            };
            hook.pipe.flush(|line| hook_line(line, &mut self.timeline));
            self.timeline.add(
                Instant::now(),
                format!("hook killed with the container, as in a pod (here it ended: {here})"),
            );
            self.phase = Phase::Over;
            return;
        }
        if hook.exited_at.is_none() && hook.has_exited() {
            hook.note_exit(&mut self.timeline);
        }
        if let Some(at) = hook.exited_at {
            if !hook.pipe.is_open() || now >= at + HOOK_OUTPUT_LINGER {
                hook.pipe.flush(|line| hook_line(line, &mut self.timeline));
                self.stop(false);
            }
        } else if now >= grace_end {
            self.timeline.add(
                now,
                "grace period over with the hook still running: 2 s more",
            );
            kubelet("the grace period ended during the hook: 2 s more, then SIGKILL");
            self.stop(true);
        }
    }

    /// The stop signal to the app; SIGKILL at the end of the grace period, or 2 s later if
    /// the hook overran it.
    fn stop(&mut self, overran: bool) {
        self.timeline.overran = overran;
        let signal = self.options.stop_signal;
        kubelet(&format!(
            "sending {signal} to the app (pid {})",
            self.app.pid
        ));
        self.app.signal(signal);
        self.timeline
            .add(Instant::now(), format!("{signal} sent to the app"));
        self.phase = Phase::Stopping {
            kill_at: self.timeline.budget().kill_at(overran),
        };
    }
}

/// The app under rehearsal.
struct App {
    child: Child,
    /// The app itself (inside a PID namespace, the child of `unshare`).
    pid: ProcessId,
    /// The process group to kill at the end: the direct child's.
    group: ProcessId,
    /// The direct child's pidfd, for its exit status (`unshare` passes on the app's).
    pidfd: OwnedFd,
    /// The app's own pidfd, readable once it has exited: in a PID namespace that is when
    /// the container stops, a moment before `unshare` notices.
    exit: OwnedFd,
    started: Instant,
    reaped: bool,
    display: String,
}

impl App {
    fn spawn(program: &OsString, args: &[OsString], pid_namespace: bool) -> Result<App, Error> {
        let display = std::iter::once(program)
            .chain(args)
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        // unshare(1) would start, then fail to find the app: say so now, as without it.
        if pid_namespace && crate::config::find_program(&program.to_string_lossy()).is_none() {
            return Err(Error::usage("APP", program, "cannot start: not found"));
        }
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
        let watch = |pid| {
            process::pidfd_open(pid)
                .map_err(|e| Error::system("cannot watch the app (pidfd_open)", e))
        };
        let pidfd = watch(group)?;
        let pid = if pid_namespace {
            namespaced_child(group, &pidfd).unwrap_or(group)
        } else {
            group
        };
        let exit = if pid == group {
            pidfd
                .try_clone()
                .map_err(|e| Error::system("cannot watch the app", e))?
        } else {
            watch(pid)?
        };
        Ok(App {
            child,
            pid,
            group,
            pidfd,
            exit,
            started,
            reaped: false,
            display,
        })
    }

    /// Whether the app has exited, looked at without reaping it, so that its PID cannot be
    /// reused while a hook might still signal it.
    fn has_exited(&self) -> bool {
        self.reaped || readable(&self.exit, Duration::ZERO)
    }

    /// How it exited. In a PID namespace the status comes from `unshare`, which exits a
    /// moment after the app: wait that moment.
    fn exit_status(&self) -> String {
        readable(&self.pidfd, Duration::from_millis(200));
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
        process::kill_group(self.group);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

/// Whether a pidfd is readable (its process has exited) within `wait`.
fn readable(pidfd: &OwnedFd, wait: Duration) -> bool {
    crate::event::poll_one(pidfd.as_fd(), nix::poll::PollFlags::POLLIN, wait).is_ok_and(|r| r)
}

/// Whether the process behind `pidfd` has exited, without reaping it.
fn has_exited(pidfd: &OwnedFd) -> bool {
    !matches!(
        waitid(
            Id::PIDFd(pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
        ),
        Ok(WaitStatus::StillAlive) | Err(_)
    )
}

/// Finds the app inside a new PID namespace: the first child of `unshare`, once it has
/// replaced itself with the app. `None` if `unshare` exits first (the app was gone at once).
fn namespaced_child(unshare: ProcessId, unshare_fd: &OwnedFd) -> Option<ProcessId> {
    let children = format!("/proc/{unshare}/task/{unshare}/children");
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !readable(unshare_fd, Duration::ZERO) {
        let text = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text
            .split_whitespace()
            .next()
            .and_then(|p| ProcessId::parse(p).ok())
            && crate::procfs::comm(pid).is_ok_and(|c| c.is_some_and(|c| c != b"unshare"))
        {
            return Some(pid);
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
    reaped: bool,
}

impl Hook {
    fn spawn(run: &Rehearsal<'_>) -> std::io::Result<Hook> {
        let exe = std::env::current_exe()?;
        let namespaced = run.options.pid_namespace;
        let mut cmd = if namespaced {
            let mut c = Command::new("nsenter");
            c.arg("-t")
                .arg(run.app.pid.to_string())
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
        // The app as the hook sees it: PID 1 of its namespace, or its own PID outside one.
        let app = if namespaced {
            ProcessId::INIT
        } else {
            run.app.pid
        };
        let mut state_dir = OsString::from("--state-dir=");
        state_dir.push(&run.state_dir);
        crate::interrupt::unblocked(&mut cmd);
        cmd.arg("drain")
            .args(run.options.hook)
            .args(["--log-format=json", "--log-target=stdout"])
            .arg(state_dir)
            .arg(format!("--rehearsal-app-pid={app}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let pidfd = process::pidfd_open(ProcessId::from_raw(child.id()).expect("positive pid"))?;
        let pipe = LinePipe::new(child.stdout.take());
        Ok(Hook {
            child,
            pidfd,
            pipe,
            started,
            exited_at: None,
            reaped: false,
        })
    }

    fn read(&mut self, timeline: &mut Timeline) {
        self.pipe.read_lines(|line| hook_line(line, timeline));
    }

    fn has_exited(&self) -> bool {
        has_exited(&self.pidfd)
    }

    /// Whether it has exited, killed by SIGKILL (not reaped yet).
    fn killed_outright(&self) -> bool {
        matches!(
            waitid(
                Id::PIDFd(self.pidfd.as_fd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
            ),
            Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _))
        )
    }

    fn note_exit(&mut self, timeline: &mut Timeline) {
        let code = self.reap();
        let now = Instant::now();
        self.exited_at = Some(now);
        timeline.hook_code = code;
        let how = match code {
            Some(code) => format!("exit {code}"),
            None => "killed".into(),
        };
        timeline.add(
            now,
            format!("hook returned ({how}) after {}", secs(now - self.started)),
        );
        kubelet(&format!("the preStop hook returned ({how})"));
    }

    /// Reaps the hook; its exit code, if it exited by itself.
    fn reap(&mut self) -> Option<i32> {
        let status = self.child.wait().ok();
        self.reaped = true;
        status.and_then(|s| s.code())
    }

    /// Ends the hook as anything ends a drain: SIGTERM, on which it kills what its
    /// `--exec` commands started and exits; SIGKILL if it has not within
    /// `HOOK_TERM_WAIT`. Not reaped yet, its PID cannot name another process.
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        if let Some(pid) = ProcessId::from_raw(self.child.id()) {
            let _ = kill(pid.as_nix(), Signal::SIGTERM);
        }
        if !readable(&self.pidfd, HOOK_TERM_WAIT) {
            let _ = self.child.kill();
        }
    }
}

/// One JSON line from the hook: shown as the hook would log it, and kept in the timeline if
/// it is a step of the sequence (progress lines are shown only).
fn hook_line(line: &[u8], timeline: &mut Timeline) {
    let line = String::from_utf8_lossy(line);
    let Some(record) = report::read_json(&line) else {
        let _ = writeln!(std::io::stderr(), "{}", report::escape(&line));
        return;
    };
    let message = report::escape(&record.message);
    let _ = writeln!(std::io::stderr(), "prestop: {message}");
    if record.step {
        timeline.add(Instant::now(), format!("hook: {message}"));
    }
}

fn kubelet(line: &str) {
    let _ = writeln!(std::io::stderr(), "kubelet: {}", report::escape(line));
}

/// The steps of a rehearsal, with the instants they happened.
struct Timeline {
    /// Offsets are from here: the app's start until termination begins, then that.
    origin: Instant,
    budget: Budget,
    /// When termination began, once it has.
    began: Option<Instant>,
    entries: Vec<(Instant, String)>,
    app_exit: Option<Instant>,
    hook_code: Option<i32>,
    overran: bool,
    killed: bool,
    app_exited_during_hook: bool,
}

impl Timeline {
    fn new(origin: Instant, config: &Config) -> Timeline {
        Timeline {
            origin,
            budget: Budget::new(config.budget, origin),
            began: None,
            entries: Vec::new(),
            app_exit: None,
            hook_code: None,
            overran: false,
            killed: false,
            app_exited_during_hook: false,
        }
    }

    /// Termination begins: the grace period counts from `now`.
    fn begin(&mut self, now: Instant) {
        self.origin = now;
        self.budget = Budget::new(self.budget.config, now);
        self.began = Some(now);
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }

    fn add(&mut self, at: Instant, what: impl AsRef<str>) {
        self.entries
            .push((at, report::escape(what.as_ref()).into_owned()));
    }

    fn verdict(&self) -> Verdict {
        if self.killed {
            Verdict::Killed
        } else if self.app_exited_during_hook {
            // It exited by itself before SIGKILL: graceful, whatever became of the hook,
            // which the timeline and the detail say.
            Verdict::Graceful
        } else if self.overran || !matches!(self.hook_code, Some(code) if hook_drained(code)) {
            Verdict::DrainedLate
        } else {
            Verdict::Graceful
        }
    }

    /// Prints the timeline and the verdict; the exit code says whether it is graceful.
    fn report(&self) -> Exit {
        let verdict = self.verdict();
        let mut text = String::from("\nTimeline (offsets from the start of termination):\n");
        if self.began.is_none() {
            for (at, what) in &self.entries {
                let offset = offset(*at, self.origin);
                let _ = writeln!(text, "  {offset:>9}s  {what}");
            }
            let _ = writeln!(
                text,
                "\nVerdict: none: the app exited by itself before termination began"
            );
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
            return Exit::Success;
        }
        for (at, what) in &self.entries {
            let offset = offset(*at, self.origin);
            let _ = writeln!(text, "  {offset:>9}s  {what}");
        }
        let end = offset(self.budget.grace_end(), self.origin);
        let _ = writeln!(text, "  {end:>9}s  (the grace period ends)");
        let grace_end = self.budget.grace_end();
        let detail = match (verdict, self.app_exit) {
            (Verdict::Graceful, Some(exit)) if self.app_exited_during_hook => format!(
                "the app exited by itself with {} of the grace period to spare; it exited while \
                 its preStop hook still ran, so in a pod the hook is killed with the container \
                 and the kubelet records a FailedPreStopHook event",
                secs(grace_end.saturating_duration_since(exit))
            ),
            (Verdict::Graceful, Some(exit)) if self.began.is_some() => format!(
                "the app drained and exited with {} of the grace period to spare",
                secs(grace_end.saturating_duration_since(exit))
            ),
            (Verdict::DrainedLate, _) => match self.hook_code {
                Some(code) if !self.overran && code == i32::from(Exit::Usage.code()) => {
                    "the hook refused its options (exit 2) and did nothing; the app still exited \
                     before SIGKILL"
                        .into()
                }
                Some(code) if !self.overran && code != i32::from(Exit::InFlight.code()) => {
                    format!(
                        "the hook ended with exit {code} before the work drained; the app still \
                         exited before SIGKILL"
                    )
                }
                _ => "the hook's budget ran out before the work drained; the app still exited \
                      before SIGKILL"
                    .into(),
            },
            (Verdict::Killed, _) => {
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
        if verdict == Verdict::Graceful {
            Exit::Success
        } else {
            Exit::InFlight
        }
    }
}

/// `at` from `origin`, signed, in seconds to the millisecond: `+2.210`, `-4.004`.
fn offset(at: Instant, origin: Instant) -> String {
    if at >= origin {
        format!("+{}", decimal(at - origin, 3))
    } else {
        format!("-{}", decimal(origin - at, 3))
    }
}

/// Whether a hook's exit code says it drained (with or without a failed stop action).
fn hook_drained(code: i32) -> bool {
    u8::try_from(code)
        .is_ok_and(|code| code == Exit::Success.code() || code == Exit::StopFailed.code())
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
