//! The processes prestop signals, waits on or runs: who a target names, how one process is
//! pinned down for good, and how it is signalled, watched and ended.
//!
//! A PID alone is not a process: once its process exits, the kernel hands the number to the
//! next one. So a process is pinned (`Pinned`) the moment it is named: a pidfd is opened for
//! it, which keeps naming that one process whatever happens to the PID, and every signal goes
//! through that pidfd. Its start time (`Process`) is kept too, but only as a fallback where
//! pidfds are missing: it counts clock ticks (10 ms), so a PID reused within one tick would
//! pass for the same process. `ProcessId` cannot be 0 or negative, which `kill(2)` would read
//! as a process group or every process; no prestop process is ever named by `name:`; and a
//! `/proc` that cannot be read is an error, never an empty list. This module resolves,
//! signals and watches; deciding *when* to do so belongs to its callers.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Instant;

use nix::libc;
use nix::sys::signal::{Signal, kill, killpg};

use crate::procfs::{self, ProcessId};

/// Longest pidfile prestop reads: a PID has at most 10 digits; more is not a pidfile.
const PIDFILE_MAX_BYTES: u64 = 64;

/// The kernel cuts `comm` to this many bytes; a longer name is matched against full names.
const COMM_MAX: usize = 15;

/// Who to signal or wait on, as the user named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Pid(ProcessId),
    /// A pidfile, read each time the target is used: the process it names then.
    PidFile(PathBuf),
    /// Every process whose name is this, at the time of use (see `find_by_name`).
    Name(String),
    /// The children of the processes another target names, at the time of use (a
    /// pre-fork server's workers).
    Children(Box<Target>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid(pid) => write!(f, "pid {pid}"),
            Target::PidFile(path) => write!(f, "the pid in {}", path.display()),
            Target::Name(name) => write!(f, "processes named {name}"),
            Target::Children(parent) => write!(f, "the children of {parent}"),
        }
    }
}

/// What PID 1 stands for: this machine's or container's own, or, in a rehearsal, the app,
/// which plays the container's PID 1 without being it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pid1 {
    /// The real PID 1, checked against host inits before it is signalled by default.
    Real,
    /// A rehearsal: PID 1 means this process, however it is spelt (`1`, `01`, a pidfile).
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

/// What a target names at the moment it is used.
#[derive(Debug)]
pub enum Named {
    /// These processes (for a name, maybe none).
    Pids(Vec<ProcessId>),
    /// Its pidfile is not there: whatever it named has exited (or never started).
    NoPidfile,
}

impl Target {
    /// The processes this target names now; an error says why prestop cannot tell. A look
    /// through `/proc` (names, children) stops at `by`, and then cannot tell.
    pub fn resolve(&self, pid1: Pid1, by: Instant) -> Result<Named, String> {
        match self {
            Target::Pid(pid) => Ok(Named::Pids(vec![pid1.resolve(*pid)])),
            Target::PidFile(path) => match read_pidfile(path)? {
                Some(pid) => Ok(Named::Pids(vec![pid1.resolve(pid)])),
                None => Ok(Named::NoPidfile),
            },
            Target::Name(name) => find_by_name(name, by)
                .map(Named::Pids)
                .map_err(|e| format!("cannot look through /proc: {}", describe_io(&e))),
            Target::Children(parent) => match parent.resolve(pid1, by)? {
                Named::Pids(parents) => children_of(&parents, by)
                    .map(Named::Pids)
                    .map_err(|e| format!("cannot look through /proc: {}", describe_io(&e))),
                Named::NoPidfile => Ok(Named::NoPidfile),
            },
        }
    }
}

/// Reads a pidfile strictly: a positive integer, optionally followed by a newline. `Ok(None)`
/// if there is no such file. An error describes what is wrong with the file, and at most the
/// shape of what it holds, never its bytes: a pidfile path may lead anywhere.
pub fn read_pidfile(path: &Path) -> Result<Option<ProcessId>, String> {
    // Non-blocking, so a FIFO in its place reads as empty instead of hanging prestop.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read pidfile: {}", describe_io(&e))),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read pidfile: {}", describe_io(&e)))?;
    if !meta.is_file() {
        return Err("pidfile is not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(PIDFILE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read pidfile: {}", describe_io(&e)))?;
    if bytes.len() as u64 > PIDFILE_MAX_BYTES {
        return Err("pidfile is too long to hold a process ID".into());
    }
    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let shape = match text {
        [] => "it is empty",
        [b'-', rest @ ..] if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) => {
            "it holds a negative number"
        }
        t if t.iter().all(u8::is_ascii_digit) => {
            return std::str::from_utf8(t)
                .ok()
                .and_then(|t| ProcessId::parse(t).ok())
                .map(Some)
                .ok_or_else(|| {
                    "pidfile holds a number that is not a process ID (0, or too large)".into()
                });
        }
        t if t.contains(&b'\n') => "it holds more than one line",
        t if t.iter().any(u8::is_ascii_whitespace) => "it holds spaces around or inside the number",
        _ => "it holds something other than digits",
    };
    Err(format!("pidfile does not hold a process ID: {shape}"))
}

/// An I/O error in words, with the errno name that says exactly what the kernel refused:
/// `Permission denied (EACCES)`.
pub fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let errno = nix::errno::Errno::from_raw(n);
            format!("{} ({errno:?})", errno.desc())
        }
        None => e.to_string(),
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
    /// is done; an error if `/proc` cannot be read.
    pub fn find(pid: ProcessId) -> io::Result<Option<Process>> {
        Ok(procfs::stat(pid)?
            .filter(|stat| !stat.is_zombie())
            .map(|stat| Process {
                pid,
                start_time: stat.start_time,
            }))
    }

    /// Whether a process with this PID and start time still runs (not a zombie).
    pub fn is_running(self) -> io::Result<bool> {
        Ok(Process::find(self.pid)? == Some(self))
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
            // No such process here; unless /proc, which named it, is another namespace's.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                procfs::own_namespace()?;
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(e),
        };
        match (Process::find(pid)?, pidfd) {
            (Some(process), pidfd) => Ok(Some(Pinned { process, pidfd })),
            // Running, says the pidfd, yet /proc does not show it: hidden from prestop
            // (`hidepid`), which must not pass for exited.
            (None, Some(fd)) if !exited(fd.as_fd())? => Err(io::Error::other(
                "it runs, but /proc hides it from prestop (hidepid)",
            )),
            (None, _) => Ok(None),
        }
    }

    pub fn pid(&self) -> ProcessId {
        self.process.pid
    }

    /// The pidfd, readable once the process has exited; `None` without pidfds.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    /// Whether the pinned process still runs (a zombie has exited).
    pub fn is_running(&self) -> io::Result<bool> {
        match &self.pidfd {
            Some(fd) => Ok(!exited(fd.as_fd())?),
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
                    describe_io(&e)
                }
            }),
            // Without pidfds the check is as close to the signal as `kill` allows.
            None => match self.process.is_running() {
                Ok(true) => kill(self.process.pid.as_nix(), signal).map_err(|e| e.desc().into()),
                Ok(false) => Err(gone(self.process.pid)),
                Err(e) => Err(format!(
                    "cannot tell it from a newer process: {}",
                    describe_io(&e)
                )),
            },
        }
    }
}

/// Whether the process of a pidfd has exited (all of it): the pidfd is then readable.
fn exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(crate::event::poll_one(
        pidfd,
        nix::poll::PollFlags::POLLIN,
        std::time::Duration::ZERO,
    )?)
}

/// Why a pinned process can no longer be signalled.
fn gone(pid: ProcessId) -> String {
    if matches!(procfs::stat(pid), Ok(Some(_))) {
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

/// Every live process named `name`, in PID order: its `comm` (while that is shorter than the
/// 15 bytes the kernel cuts it to, so never a cut-off name) or the last component of its
/// `argv[0]` or of its executable. Never a prestop process (see `Prestop`). An error if
/// `/proc` cannot be read, or not all of it by `by`, which must never pass for "none".
pub fn find_by_name(name: &str, by: Instant) -> io::Result<Vec<ProcessId>> {
    let prestop = Prestop::me()?;
    let mut found = Vec::new();
    for pid in scan(by)? {
        let pid = pid?;
        if is_named(pid, name.as_bytes())? && !prestop.is(pid)? {
            found.push(pid);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Every live process whose parent is one of `parents`, in PID order, never a prestop
/// process; an error if `/proc` cannot be read, or not all of it by `by`.
fn children_of(parents: &[ProcessId], by: Instant) -> io::Result<Vec<ProcessId>> {
    let prestop = Prestop::me()?;
    let mut found = Vec::new();
    for pid in scan(by)? {
        let pid = pid?;
        let Some(stat) = procfs::stat(pid)? else {
            continue;
        };
        if stat.is_zombie() || !parents.iter().any(|p| p.get() == stat.ppid) {
            continue;
        }
        if !prestop.is(pid)? {
            found.push(pid);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Processes looked at between two looks at the clock: a few milliseconds' worth.
const PIDS_PER_CLOCK: usize = 32;

/// Every process in `/proc`, until `by`: past it, an error (`TimedOut`), as what was not
/// looked at may be the one sought.
fn scan(by: Instant) -> io::Result<impl Iterator<Item = io::Result<ProcessId>>> {
    let pids = procfs::pids()?;
    Ok(pids.into_iter().enumerate().map(move |(i, pid)| {
        if i.is_multiple_of(PIDS_PER_CLOCK) && Instant::now() >= by {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the look through /proc was cut short at the deadline",
            ));
        }
        Ok(pid)
    }))
}

/// What tells a prestop process from others: the binary it runs, and that binary's file
/// name, so that a copy, an upgrade or another image's prestop is one too.
struct Prestop {
    me: ProcessId,
    identity: Option<(u64, u64)>,
    name: Option<Vec<u8>>,
}

impl Prestop {
    fn me() -> io::Result<Prestop> {
        let me = ProcessId::current();
        Ok(Prestop {
            me,
            identity: procfs::exe_identity(me)?,
            name: procfs::exe_basename(me)?,
        })
    }

    /// Whether `pid` is a prestop process: this one, one running the same binary or a
    /// binary of the same name, or, where its executable cannot be read, one whose `comm`
    /// or `argv[0]` is that name.
    fn is(&self, pid: ProcessId) -> io::Result<bool> {
        if pid == self.me {
            return Ok(true);
        }
        if self.identity.is_some() && procfs::exe_identity(pid)? == self.identity {
            return Ok(true);
        }
        let Some(name) = &self.name else {
            return Ok(false);
        };
        Ok(match procfs::exe_basename(pid)? {
            Some(exe) => &exe == name,
            None => {
                procfs::comm(pid)?.as_ref() == Some(name)
                    || procfs::argv0_basename(pid)?.as_ref() == Some(name)
            }
        })
    }
}

fn is_named(pid: ProcessId, name: &[u8]) -> io::Result<bool> {
    if name.len() < COMM_MAX && procfs::comm(pid)?.as_deref() == Some(name) {
        return Ok(true);
    }
    if procfs::argv0_basename(pid)?.as_deref() == Some(name) {
        return Ok(true);
    }
    Ok(procfs::exe_basename(pid)?.as_deref() == Some(name))
}

/// The container's own main process, where PID 1 is not it (`shareProcessNamespace: true`
/// makes PID 1 the pod's `/pause`): the oldest process in prestop's own cgroup, which an
/// exec hook joins, other than prestop processes. `Ok(None)` if there is none; an error if
/// `/proc` cannot be read, or not all of it by `by`.
pub fn container_main(by: Instant) -> io::Result<Option<ProcessId>> {
    let prestop = Prestop::me()?;
    let Some(mine) = procfs::cgroup(prestop.me)? else {
        return Ok(None);
    };
    let mut oldest: Option<Process> = None;
    for pid in scan(by)? {
        let pid = pid?;
        if procfs::cgroup(pid)?.as_ref() != Some(&mine) || prestop.is(pid)? {
            continue;
        }
        let Some(process) = Process::find(pid)? else {
            continue;
        };
        let older = |o: &Process| (process.start_time, process.pid) < (o.start_time, o.pid);
        if oldest.as_ref().is_none_or(older) {
            oldest = Some(process);
        }
    }
    Ok(oldest.map(|p| p.pid))
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
        assert!(pinned.is_running().unwrap() && pinned.process.is_running().unwrap());
        assert!(pinned.pidfd().is_some());
        let impostor = Process {
            start_time: pinned.process.start_time + 1,
            ..pinned.process
        };
        assert!(!impostor.is_running().unwrap());
        child.kill().unwrap();
        // A zombie, not reaped yet: exited for the pidfd, gone for /proc.
        let mut poll = [nix::poll::PollFd::new(
            pinned.pidfd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert!(!pinned.is_running().unwrap() && !pinned.process.is_running().unwrap());
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
    fn a_look_through_proc_stops_at_its_deadline() {
        for result in [
            find_by_name("sleep", Instant::now()),
            children_of(&[ProcessId::INIT], Instant::now()),
        ] {
            let e = result.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        }
        let e = container_main(Instant::now()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    #[test]
    fn pid_1_means_the_app_in_a_rehearsal() {
        let app = ProcessId::from_raw(4242).unwrap();
        let other = ProcessId::from_raw(7).unwrap();
        assert_eq!(Pid1::App(app).resolve(ProcessId::INIT), app);
        assert_eq!(Pid1::App(app).resolve(other), other);
        assert_eq!(Pid1::Real.resolve(ProcessId::INIT), ProcessId::INIT);
    }

    #[test]
    fn pidfiles_are_read_strictly_and_their_bytes_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        assert_eq!(
            read_pidfile(&write("ok", b"42\n")).unwrap(),
            ProcessId::from_raw(42)
        );
        assert_eq!(read_pidfile(&dir.path().join("missing")).unwrap(), None);
        for (content, shape) in [
            (&b""[..], "empty"),
            (b"-1\n", "negative"),
            (b"0\n", "not a process ID"),
            (b"secret-token-123\n", "other than digits"),
            (b"42\n43\n", "more than one line"),
            (b" 42\n", "spaces"),
        ] {
            let e = read_pidfile(&write("bad", content)).unwrap_err();
            assert!(e.contains(shape), "{content:?}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let e = read_pidfile(dir.path()).unwrap_err();
        assert!(e.contains("regular file") || e.contains("EISDIR"), "{e}");
    }
}
