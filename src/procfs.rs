//! What prestop reads about processes from `/proc`: names, states, start times, and the
//! strict parsing of process IDs.
//!
//! `ProcessId` is the only way the rest of the code names a process to signal or wait on,
//! and it can only hold a positive PID: 0 and negative numbers (which `kill(2)` reads as
//! "a process group" and "every process") cannot be constructed. This module reads; it must
//! never signal or change anything.

use std::fmt;
use std::fs;
use std::io;
use std::num::NonZeroU32;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use nix::libc;
use nix::unistd::Pid;

/// A positive process ID, checked at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId(NonZeroU32);

impl ProcessId {
    /// PID 1: the container's main process (or the host's init).
    pub const INIT: ProcessId = ProcessId(NonZeroU32::MIN);

    /// Parses a PID strictly: ASCII digits only, no sign, no spaces, 1 ..= `i32::MAX`.
    /// The error says what is wrong in words a user can act on.
    pub fn parse(text: &str) -> Result<ProcessId, String> {
        if text.is_empty() {
            return Err("empty, expected a process ID".into());
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(if text.starts_with('-') {
                "negative, expected a positive process ID".into()
            } else {
                "not a number, expected a positive process ID".into()
            });
        }
        let value: u64 = text
            .parse()
            .map_err(|_| String::from("too large to be a process ID"))?;
        if value == 0 {
            return Err("0 is not a process ID (it would mean the whole process group)".into());
        }
        if value > i32::MAX as u64 {
            return Err("too large to be a process ID".into());
        }
        Ok(ProcessId(
            NonZeroU32::new(value as u32).expect("checked non-zero"),
        ))
    }

    pub fn from_raw(raw: u32) -> Option<ProcessId> {
        if raw > i32::MAX as u32 {
            return None;
        }
        NonZeroU32::new(raw).map(ProcessId)
    }

    pub fn current() -> ProcessId {
        ProcessId::from_raw(std::process::id()).expect("own pid is positive")
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The nix form, for `kill` and friends. Always positive by construction.
    pub fn as_nix(self) -> Pid {
        Pid::from_raw(self.0.get() as i32)
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The part of `/proc/PID/stat` prestop uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    /// The parent's PID; 0 for a process whose parent is outside its PID namespace.
    pub ppid: u32,
    /// Its threads, the exited main thread of a process whose other threads still run
    /// included.
    pub threads: u32,
    /// Start time in clock ticks since boot: with the PID, it names one process for good.
    pub start_time: u64,
}

impl Stat {
    /// Whether the process has exited, all of it: a zombie whose work is done, only its
    /// parent has not looked yet. A main thread that exited while other threads work on
    /// shows as a zombie too, but not with one thread left.
    pub fn is_zombie(self) -> bool {
        matches!(self.state, 'Z' | 'X') && self.threads <= 1
    }
}

/// Reads `/proc/PID/stat`: `Ok(None)` if there is no such process, an error if prestop
/// cannot tell (no file descriptor left, say), which must never pass for "gone".
pub fn stat(pid: ProcessId) -> io::Result<Option<Stat>> {
    match read(&format!("/proc/{pid}/stat"))? {
        Some(text) => Ok(parse_stat(&String::from_utf8_lossy(&text))),
        None => Ok(None),
    }
}

/// Reads a file of a process's: `Ok(None)` when the process (or the file) is gone.
fn read(path: &str) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether an error reading `/proc/PID/...` means the process is gone (or hidden from us,
/// as `hidepid` does), as opposed to prestop being unable to look.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    // Fields 20 (num_threads) and 22 (starttime) overall; fields 3 and 4 were just read.
    let threads = fields.nth(20 - 5)?.parse().ok()?;
    let start_time = fields.nth(22 - 21)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        threads,
        start_time,
    })
}

/// The kernel's short name of the process (`comm`): at most 15 bytes, the rest cut off.
pub fn comm(pid: ProcessId) -> io::Result<Option<Vec<u8>>> {
    Ok(read(&format!("/proc/{pid}/comm"))?.map(|mut text| {
        if text.last() == Some(&b'\n') {
            text.pop();
        }
        text
    }))
}

/// The last path component of `argv[0]`; `Ok(None)` for kernel threads, which have no
/// command line.
pub fn argv0_basename(pid: ProcessId) -> io::Result<Option<Vec<u8>>> {
    let Some(raw) = read(&format!("/proc/{pid}/cmdline"))? else {
        return Ok(None);
    };
    let argv0 = raw.split(|&b| b == 0).next().unwrap_or_default();
    Ok((!argv0.is_empty()).then(|| basename(argv0).to_vec()))
}

/// The last path component of the process's executable, where prestop may read it (its own
/// user's processes, or any as root); `Ok(None)` where it may not.
pub fn exe_basename(pid: ProcessId) -> io::Result<Option<Vec<u8>>> {
    match fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(path) => Ok(Some(basename(path.as_os_str().as_bytes()).to_vec())),
        Err(e) if gone(&e) || e.raw_os_error() == Some(libc::EACCES) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The executable a process runs, as (device, inode): the same for every process of one
/// binary. `Ok(None)` where prestop may not look, or for kernel threads.
pub fn exe_identity(pid: ProcessId) -> io::Result<Option<(u64, u64)>> {
    match fs::metadata(format!("/proc/{pid}/exe")) {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(e) if gone(&e) || e.raw_os_error() == Some(libc::EACCES) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The cgroups a process belongs to, as `/proc/PID/cgroup` says (relative to prestop's own
/// cgroup namespace).
pub fn cgroup(pid: ProcessId) -> io::Result<Option<Vec<u8>>> {
    read(&format!("/proc/{pid}/cgroup"))
}

fn basename(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

/// Every process in `/proc` now, in no particular order; an error if `/proc` cannot be read
/// or does not show every process of prestop's PID namespace (which must never pass for "no
/// process"): a `/proc` of another namespace, or one that hides other users' processes.
pub fn pids() -> io::Result<Vec<ProcessId>> {
    if let Some(why) = partial_view()? {
        return Err(io::Error::other(why));
    }
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| ProcessId::parse(n).ok())
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// An error if `/proc` is not that of prestop's own PID namespace. A PID namespace without
/// its own /proc mount sees its parent's: PIDs there name other processes than the same
/// numbers do for `kill` and `pidfd_open`.
pub fn own_namespace() -> io::Result<()> {
    let shown = fs::read_link("/proc/self")?;
    if shown.as_os_str().as_bytes() != std::process::id().to_string().as_bytes() {
        return Err(io::Error::other(
            "/proc belongs to another PID namespace than prestop's (mount a proc there)",
        ));
    }
    Ok(())
}

/// Why `/proc` would not show all of prestop's PID namespace, if it would not.
fn partial_view() -> io::Result<Option<String>> {
    own_namespace()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let Some(hidepid) = hidepid(&mountinfo) else {
        return Ok(None);
    };
    // hidepid=1 (noaccess) lists every process, and reading one fails; 2 and 4 hide them,
    // except from a member of the mount's gid= group or a holder of CAP_SYS_PTRACE.
    if !matches!(hidepid.0.as_str(), "2" | "invisible" | "4" | "ptraceable") {
        return Ok(None);
    }
    let in_group = hidepid.1.is_some_and(|gid| {
        nix::unistd::getegid().as_raw() == gid
            || nix::unistd::getgroups().is_ok_and(|g| g.iter().any(|g| g.as_raw() == gid))
    });
    if in_group || has_cap_sys_ptrace()? {
        return Ok(None);
    }
    Ok(Some(format!(
        "/proc is mounted with hidepid={}: it hides other users' processes from prestop",
        hidepid.0
    )))
}

/// The `hidepid=` and `gid=` options of the mount at `/proc`, if it has `hidepid=`. The
/// last mount there is the one seen.
fn hidepid(mountinfo: &str) -> Option<(String, Option<u32>)> {
    let line = mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/proc"))?;
    let options = line.split(" - ").nth(1)?.split(' ').nth(2)?;
    let option = |key: &str| {
        options
            .split(',')
            .find_map(|o| o.strip_prefix(key))
            .map(str::to_owned)
    };
    let hidepid = option("hidepid=")?;
    Some((hidepid, option("gid=").and_then(|g| g.parse().ok())))
}

/// The capability's bit number (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// Whether prestop holds `CAP_SYS_PTRACE`, which sees through `hidepid`.
fn has_cap_sys_ptrace() -> io::Result<bool> {
    let status = fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    Ok(effective & (1 << CAP_SYS_PTRACE) != 0)
}

/// What PID 1 is, as far as prestop's safety rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    /// The host's init (systemd, init): prestop is not in a container.
    Host(String),
    /// The pod's pause container (`shareProcessNamespace: true`): not the app.
    Pause,
    /// Anything else: in a container, the app itself.
    App(String),
    /// /proc/1 cannot be read.
    Unknown,
}

impl Init {
    pub fn detect() -> Init {
        let text = |name: io::Result<Option<Vec<u8>>>| {
            name.ok()
                .flatten()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
        };
        let comm = text(comm(ProcessId::INIT));
        let argv0 = text(argv0_basename(ProcessId::INIT));
        classify_init(comm.as_deref(), argv0.as_deref())
    }

    /// Why signalling PID 1 by default would be wrong, if it would.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Init::Host(name) => Some(format!(
                "PID 1 is {name}, the host's init, not an app in a container"
            )),
            Init::Pause => Some(
                "PID 1 is /pause (shareProcessNamespace), not the app; \
                 target the app with name:NAME"
                    .into(),
            ),
            Init::App(_) | Init::Unknown => None,
        }
    }
}

fn classify_init(comm: Option<&str>, argv0: Option<&str>) -> Init {
    let names = [comm, argv0];
    if names.contains(&Some("pause")) {
        return Init::Pause;
    }
    for host in ["systemd", "init"] {
        if names.contains(&Some(host)) {
            return Init::Host(host.into());
        }
    }
    match comm.or(argv0) {
        Some(name) => Init::App(name.into()),
        None => Init::Unknown,
    }
}

/// This boot's identity, so state left by an earlier boot is never taken for this one's.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidepid_is_read_from_the_last_mount_at_proc() {
        let host = "22 1 0:20 / /proc rw,nosuid - proc proc rw\n";
        let hidden = "40 22 0:52 / /proc rw,relatime - proc proc rw,gid=27,hidepid=invisible\n";
        let elsewhere = "41 1 0:53 / /run/proc rw - proc proc rw,hidepid=2\n";
        assert_eq!(hidepid(host), None);
        assert_eq!(
            hidepid(&format!("{host}{hidden}")),
            Some(("invisible".into(), Some(27)))
        );
        assert_eq!(hidepid(&format!("{hidden}{host}")), None);
        assert_eq!(hidepid(&format!("{host}{elsewhere}")), None);
    }

    #[test]
    fn pids_parse_strictly() {
        assert_eq!(ProcessId::parse("42").unwrap().get(), 42);
        for bad in [
            "",
            "0",
            "-1",
            "+5",
            " 5",
            "5 ",
            "abc",
            "4294967296",
            "2147483648",
            "1e3",
        ] {
            assert!(ProcessId::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            ProcessId::parse("2147483647").unwrap().get(),
            i32::MAX as u32
        );
        assert!(ProcessId::from_raw(0).is_none());
    }

    #[test]
    fn stat_survives_odd_command_names() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 98765 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 1);
        assert_eq!(stat.start_time, 98765);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_found_in_proc() {
        let me = ProcessId::current();
        let stat = stat(me).unwrap().unwrap();
        assert!(!stat.is_zombie());
        assert!(argv0_basename(me).unwrap().is_some());
        assert!(exe_identity(me).unwrap().is_some());
        assert!(pids().unwrap().contains(&me));
    }

    #[test]
    fn init_is_classified() {
        assert_eq!(
            classify_init(Some("systemd"), Some("systemd")),
            Init::Host("systemd".into())
        );
        assert_eq!(
            classify_init(Some("init"), Some("init")),
            Init::Host("init".into())
        );
        assert_eq!(classify_init(Some("pause"), Some("pause")), Init::Pause);
        assert_eq!(
            classify_init(Some("java"), Some("java")),
            Init::App("java".into())
        );
        assert_eq!(classify_init(None, None), Init::Unknown);
        assert!(Init::App("java".into()).refusal().is_none());
        assert!(Init::Pause.refusal().is_some());
    }
}
