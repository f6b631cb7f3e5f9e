//! `prestop hold`: run a job under a lock file that a drain waits for, and start no job once
//! a drain has begun.
//!
//! The lock file is created (and locked) before the look for a drain, and a drain records
//! that it has begun before it looks at lock files: so either the drain sees this job's lock
//! and waits for it, or this look sees the drain and the job does not start. Nothing can
//! slip between the two.
//!
//! `hold` is a transparent wrapper: COMMAND gets its stdin, stdout and stderr, every signal a
//! supervisor sends `hold` (see `FORWARDED`), and its exit status comes back as `hold`'s
//! (128+N for signal N). COMMAND runs in a process group of its own, so that a signal sent to
//! `hold`'s group reaches it once, through `hold`; on a terminal it is made the foreground
//! group while it runs, so Ctrl-C reaches it directly, also once.

use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::config::{self, HoldConfig, HoldOptions};
use crate::coordinate;
use crate::error::Error;
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::exit::Exit;
use crate::interrupt::Interrupts;
use crate::joblock::JobLock;
use crate::process::{self, describe_io};
use crate::procfs::ProcessId;
use crate::report;

/// What a supervisor or a terminal sends a job, passed on to COMMAND. `hold` itself is
/// never stopped or ended by them: it ends when COMMAND does.
const FORWARDED: [Signal; 12] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

pub fn run(options: &HoldOptions) -> Result<Exit, Error> {
    let config = config::hold(options)?;
    // SIGCHLD too: COMMAND's exit, where no pidfd can be had, and its stops.
    let mut watched = FORWARDED.to_vec();
    watched.push(Signal::SIGCHLD);
    let signals = Interrupts::of(&watched)
        .map_err(|e| Error::system("cannot set up signal forwarding", e.into()))?;
    let display = config.display();
    let mut lock = match JobLock::create(&config.lock_dir, &config.name, &display) {
        Ok(lock) => lock,
        Err(e) => {
            say(&format!(
                "cannot create a lock file in {}: {}; {} not started",
                config.lock_dir.display(),
                describe_io(&e),
                config.name
            ));
            return Ok(Exit::HoldFailed);
        }
    };
    match coordinate::drain_begun(&config.state_dir) {
        Ok(None) => {}
        Ok(Some(begun)) => {
            let _ = lock.remove();
            say(&format!(
                "a drain began {} ago (pid {}, state dir {}): {} not started; try again later",
                crate::budget::secs(begun.ago),
                begun.leader,
                config.state_dir.display(),
                config.name
            ));
            return Ok(Exit::DrainBegun);
        }
        Err(e) => {
            let _ = lock.remove();
            say(&format!(
                "cannot tell whether a drain has begun: state dir {}: {}; {} not started",
                config.state_dir.display(),
                describe_io(&e),
                config.name
            ));
            return Ok(Exit::HoldFailed);
        }
    }
    let pid = match spawn(&config) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = lock.remove();
            say(&format!("cannot run {display}: {}", describe_io(&e)));
            return Ok(Exit::CannotRun);
        }
    };
    let _ = lock.add_child(pid);
    let terminal = Foreground::give(pid);
    let status = supervise(pid, &signals, terminal.as_ref());
    drop(terminal);
    let path = lock.path().to_path_buf();
    if let Err(e) = lock.remove() {
        say(&format!(
            "cannot remove {}: {}",
            path.display(),
            describe_io(&e)
        ));
    }
    Ok(match status {
        Some(code) => Exit::Command(code),
        None => Exit::HoldFailed,
    })
}

/// One line on stderr, as prestop's own.
fn say(line: &str) {
    eprintln!("prestop: hold: {}", report::escape(line));
}

/// Starts COMMAND in a process group of its own, with no signal blocked (`hold` blocks the
/// ones it forwards), with `hold`'s environment. It inherits the lock's fd (opened without
/// close-on-exec), so the lock is held as long as the job runs, even should `hold` be
/// killed. `posix_spawn`, which the C library does with `vfork`: the fastest start there is.
fn spawn(config: &HoldConfig) -> std::io::Result<ProcessId> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |bytes: &[u8]| CString::new(bytes).map_err(std::io::Error::other);
    let program = c(config.program.as_os_str().as_bytes())?;
    let argv = config
        .argv
        .iter()
        .map(|a| c(a.as_bytes()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let env = std::env::vars_os()
        .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )?;
    let actions = PosixSpawnFileActions::init()?;
    let pid = posix_spawn(program.as_c_str(), &actions, &attr, &argv, &env)?;
    ProcessId::from_raw(pid.as_raw() as u32).ok_or_else(|| std::io::Error::other("no PID"))
}

/// COMMAND's exit status as `hold`'s: its code, or 128+N for signal N (tini's convention).
fn code(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(code as u8),
        WaitStatus::Signaled(_, signal, _) => Some(128u8.wrapping_add(signal as u8)),
        _ => None,
    }
}

/// Forwards signals to COMMAND until it exits; its status (`None` if it cannot be had).
///
/// COMMAND's exit is seen on its pidfd, and also by SIGCHLD (read from the same signalfd as
/// the forwarded signals), which is all there is where no pidfd can be had (no descriptor
/// left, a kernel before 5.3): either way, signals keep being forwarded while it runs. On a
/// terminal, COMMAND stopped (Ctrl-Z reaches its group, the foreground one) stops `hold`
/// too, so that the shell gets the terminal back; continued, `hold` continues COMMAND.
fn supervise(pid: ProcessId, signals: &Interrupts, terminal: Option<&Foreground>) -> Option<u8> {
    struct Supervisor<'a> {
        pid: ProcessId,
        pidfd: Option<OwnedFd>,
        signals: &'a Interrupts,
        terminal: Option<&'a Foreground>,
        status: Option<WaitStatus>,
        exited: bool,
    }
    #[derive(Clone, Copy)]
    enum Source {
        Exit,
        Signal,
    }
    impl Supervisor<'_> {
        /// Reaps COMMAND if it has ended, and follows it if it stopped.
        fn look(&mut self) {
            let flags = WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED;
            match waitpid(self.pid.as_nix(), Some(flags)) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.status = Some(status);
                    self.exited = true;
                }
                Ok(WaitStatus::Stopped(..)) => {
                    if let Some(terminal) = self.terminal {
                        terminal.stop_with(self.pid);
                    }
                }
                // Nothing left to wait for: not ours, or reaped already.
                Err(nix::errno::Errno::ECHILD) => self.exited = true,
                Ok(_) | Err(_) => {}
            }
        }
    }
    impl Machine for Supervisor<'_> {
        type Source = Source;
        type Output = ();
        fn tick(&mut self, now: Instant) -> Step<()> {
            if self.exited {
                return Step::Done(());
            }
            // Nothing is due: only COMMAND's exit or a signal wakes this.
            Step::Sleep(Wake::at(now + std::time::Duration::from_secs(3600)))
        }
        fn watch(&self, fds: &mut Watch<Source>) {
            if let Some(fd) = &self.pidfd {
                fds.add(fd.as_fd(), Source::Exit);
            }
            fds.add(self.signals.fd(), Source::Signal);
        }
        fn ready(&mut self, source: Source) {
            match source {
                Source::Exit => self.look(),
                Source::Signal => {
                    while let Some(signal) = self.signals.take() {
                        if signal == Signal::SIGCHLD {
                            self.look();
                        } else if !self.exited {
                            // `hold`'s own child, not yet reaped: its PID cannot have been
                            // reused, so no pidfd is needed to be sure of it.
                            let _ = nix::sys::signal::kill(self.pid.as_nix(), signal);
                        }
                    }
                }
            }
        }
    }
    let mut supervisor = Supervisor {
        pid,
        pidfd: process::pidfd_open(pid).ok(),
        signals,
        terminal,
        status: None,
        exited: false,
    };
    // A SIGCHLD that came before the signalfd was first read is pending there: looked at on
    // the first round. One that came before the job was even watched: this look.
    supervisor.look();
    let _ = event::run(&mut supervisor, None);
    if let Some(status) = supervisor.status {
        return code(status);
    }
    loop {
        match waitpid(pid.as_nix(), None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return code(status);
            }
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// COMMAND's group as the terminal's foreground group while it runs, where `hold`'s was;
/// given back when dropped.
struct Foreground {
    ours: Pid,
}

impl Foreground {
    fn give(job: ProcessId) -> Option<Foreground> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let ours = nix::unistd::getpgrp();
        if nix::unistd::tcgetpgrp(stdin.as_fd()).ok()? != ours {
            return None;
        }
        // SIGTTOU, which this could raise, is blocked (it is forwarded).
        nix::unistd::tcsetpgrp(stdin.as_fd(), job.as_nix()).ok()?;
        Some(Foreground { ours })
    }
}

impl Foreground {
    /// COMMAND has stopped: the terminal back to `hold`'s group, `hold` stopped as its job
    /// was; once the shell continues it, the terminal to COMMAND again, and COMMAND continued.
    fn stop_with(&self, job: ProcessId) {
        let stdin = std::io::stdin();
        let _ = nix::unistd::tcsetpgrp(stdin.as_fd(), self.ours);
        let _ = nix::sys::signal::raise(Signal::SIGSTOP);
        // Continued in the foreground (`fg`) the terminal is ours to hand on; in the
        // background (`bg`) it is the shell's.
        if nix::unistd::tcgetpgrp(stdin.as_fd()).is_ok_and(|group| group == self.ours) {
            let _ = nix::unistd::tcsetpgrp(stdin.as_fd(), job.as_nix());
        }
        let _ = nix::sys::signal::killpg(job.as_nix(), Signal::SIGCONT);
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin().as_fd(), self.ours);
    }
}
