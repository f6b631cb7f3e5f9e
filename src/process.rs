//! The processes prestop signals, waits on or runs: who a target names, how one process is
//! pinned down for good, and how it is signalled, watched and ended.
//!
//! A PID alone is not a process: once its process exits, the kernel hands the number to the
//! next one. So a process is pinned (`Pinned`) the moment it is named: a pidfd is opened for
//! it, which keeps naming that one process whatever happens to the PID, and every signal goes
//! through that pidfd. Its start time (`Process`) is kept too, but only as a fallback where
//! pidfds are missing: it counts clock ticks (10 ms), so a PID reused within one tick would
//! pass for the same process. `ProcessId` cannot be 0 or negative, which `kill(2)` would read
//! as a process group or every process. This module resolves, signals and watches; deciding
//! *when* to do so belongs to its callers.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use nix::libc;
use nix::sys::signal::{Signal, kill, killpg};

use crate::procfs::{self, ProcessId};

/// Who to signal or wait on, as the user named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Pid(ProcessId),
    /// A pidfile, read and checked when the configuration is validated.
    PidFile(PathBuf, ProcessId),
    /// Every process whose comm or `argv[0]` basename is this name, at the time of use.
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid {pid}"),
            Target::PidFile(path, pid) => write!(f, "pid {pid} (from {})", path.display()),
            Target::Name(name) => write!(f, "processes named {name}"),
        }
    }
}

/// What PID 1 stands for: this machine's or container's own, or, in a rehearsal, the app,
/// which plays the container's PID 1 without being it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pid1 {
    /// The real PID 1, checked against host inits before it is signalled by default.
    Real,
    /// A rehearsal: PID 1 means this process.
    App(ProcessId),
}

impl Pid1 {
    /// The process `pid` means: the app where PID 1 stands for it.
    pub fn resolve(self, pid: ProcessId) -> ProcessId {
        match self {
            Pid1::App(app) if pid == ProcessId::INIT => app,
            _ => pid,
        }
    }
}

/// A PID and the start time of the process that had it: what `/proc` can tell of one
/// process, down to a clock tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Process {
    pub pid: ProcessId,
    /// In clock ticks since boot, from `/proc/PID/stat`.
    pub start_time: u64,
}

impl Process {
    /// The process that has `pid` now; `None` if there is none, or only a zombie, whose work
    /// is done.
    pub fn find(pid: ProcessId) -> Option<Process> {
        let stat = procfs::stat(pid)?;
        (!stat.is_zombie()).then_some(Process {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Whether a process with this PID and start time still runs (not a zombie).
    pub fn is_running(self) -> bool {
        Process::find(self.pid) == Some(self)
    }
}

/// One process, pinned by a pidfd from the moment it was named, so that it is never
/// mistaken for a process that takes its PID later.
#[derive(Debug)]
pub struct Pinned {
    pub process: Process,
    /// `None` only where the kernel has no pidfds (before 5.3): then the start time is all
    /// there is to tell the process from one that took its PID.
    pidfd: Option<OwnedFd>,
}

impl Pinned {
    /// Pins the process that has `pid` now. `Ok(None)` if there is none (or only a zombie);
    /// an error if it cannot be pinned (no file descriptor left, say).
    pub fn pin(pid: ProcessId) -> io::Result<Option<Pinned>> {
        // The pidfd first, then the look at /proc: whatever /proc says is about the pinned
        // process, unless that has already exited, which the pidfd then reports.
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(e),
        };
        Ok(Process::find(pid).map(|process| Pinned { process, pidfd }))
    }

    pub fn pid(&self) -> ProcessId {
        self.process.pid
    }

    /// The pidfd, readable once the process has exited; `None` without pidfds.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    /// Whether the pinned process still runs (a zombie has exited).
    pub fn is_running(&self) -> bool {
        match &self.pidfd {
            Some(fd) => !pidfd_exited(fd),
            None => self.process.is_running(),
        }
    }

    /// Sends `signal` to the pinned process, never to one that took its PID.
    pub fn signal(&self, signal: Signal) -> Result<(), String> {
        match &self.pidfd {
            Some(fd) => pidfd_send_signal(fd, signal).map_err(|e| {
                if e.raw_os_error() == Some(libc::ESRCH) {
                    gone(self.process.pid)
                } else {
                    e.to_string()
                }
            }),
            // Without pidfds the check is as close to the signal as `kill` allows.
            None if !self.process.is_running() => Err(gone(self.process.pid)),
            None => kill(self.process.pid.as_nix(), signal).map_err(|e| e.desc().to_owned()),
        }
    }
}

/// Why a pinned process can no longer be signalled.
fn gone(pid: ProcessId) -> String {
    if procfs::stat(pid).is_some() {
        "exited; its PID now names another process".into()
    } else {
        "no such process".into()
    }
}

/// The process only, so that a configuration's digest does not depend on fd numbers.
impl Hash for Pinned {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.process.hash(state);
    }
}

/// Whether the process behind a pidfd has exited: the pidfd is then readable.
fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut poll = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Every live process whose comm or `argv[0]` basename is `name`, excluding prestop itself
/// and kernel threads, in PID order.
pub fn find_by_name(name: &str) -> Vec<ProcessId> {
    let me = ProcessId::current();
    let mut found: Vec<ProcessId> = procfs::pids()
        .into_iter()
        .filter(|&pid| pid != me && is_named(pid, name))
        .collect();
    found.sort_unstable();
    found
}

fn is_named(pid: ProcessId, name: &str) -> bool {
    let Some(argv0) = procfs::argv0_basename(pid) else {
        return false;
    };
    if argv0 == name {
        return true;
    }
    // comm is cut to 15 bytes by the kernel, so a long NAME matches its own first 15 bytes.
    let Some(comm) = procfs::comm(pid) else {
        return false;
    };
    comm == name || (name.len() > 15 && name.as_bytes().get(..15) == Some(comm.as_bytes()))
}

/// Opens a pidfd for `pid` (close-on-exec, as the kernel always sets it for pidfds).
pub fn pidfd_open(pid: ProcessId) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and a flags word and returns a new fd or -1; it reads
    // and writes no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.get() as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_send_signal(fd: &OwnedFd, signal: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number, a null siginfo
    // pointer (the kernel fills in a default) and no flags.
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
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILL to a whole process group: what a child prestop started leaves behind ends with it.
/// The group's leader must not be reaped yet, so that its PID, the group's ID, cannot have
/// been reused.
pub fn kill_group(group: ProcessId) {
    let _ = killpg(group.as_nix(), Signal::SIGKILL);
}

/// How a process ended, in words: `exit status 3`, `killed by SIGTERM`.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(n)) => Signal::try_from(n).map_or_else(
            |_| format!("killed by signal {n}"),
            |s| format!("killed by {s}"),
        ),
        (None, None) => format!("{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_pinned_process_is_followed_to_its_exit() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = ProcessId::from_raw(child.id()).unwrap();
        let pinned = Pinned::pin(pid).unwrap().unwrap();
        assert!(pinned.is_running() && pinned.process.is_running());
        assert!(pinned.pidfd().is_some());
        let impostor = Process {
            start_time: pinned.process.start_time + 1,
            ..pinned.process
        };
        assert!(!impostor.is_running());
        child.kill().unwrap();
        // A zombie, not reaped yet: exited for the pidfd, gone for /proc.
        let mut poll = [nix::poll::PollFd::new(
            pinned.pidfd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert!(!pinned.is_running() && !pinned.process.is_running());
        assert!(
            Pinned::pin(pid).unwrap().is_none(),
            "a zombie is not pinned"
        );
        child.wait().unwrap();
        assert_eq!(
            pinned.signal(Signal::SIGTERM).unwrap_err(),
            "no such process"
        );
    }

    #[test]
    fn pid_1_means_the_app_in_a_rehearsal() {
        let app = ProcessId::from_raw(4242).unwrap();
        let other = ProcessId::from_raw(7).unwrap();
        assert_eq!(Pid1::App(app).resolve(ProcessId::INIT), app);
        assert_eq!(Pid1::App(app).resolve(other), other);
        assert_eq!(Pid1::Real.resolve(ProcessId::INIT), ProcessId::INIT);
    }
}
