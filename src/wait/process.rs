//! `--wait-pid TARGET`: drained when the process has exited.
//!
//! A pidfd (`pidfd_open(2)`) becomes readable the moment its process exits, whether or not
//! prestop is its parent, and it keeps naming that one process even if the PID is reused. A
//! zombie counts as exited: its work is done, only its parent has not looked yet. Where
//! pidfds are missing (kernels before 5.3), `/proc/PID/stat` is polled, with the start time
//! guarding against PID reuse. This module waits; it must never signal.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

use super::Condition;
use crate::config::Target;
use crate::procfs::{self, ProcessId};
use crate::report::{Record, Reporter};

pub struct ProcessWait {
    label: String,
    pid: ProcessId,
    start_time: u64,
    pidfd: Option<OwnedFd>,
    alive: bool,
}

impl ProcessWait {
    /// One wait per process the target names now (a `name:` target may name several).
    pub fn for_target(target: &Target, report: Option<&Reporter>) -> Vec<ProcessWait> {
        match target {
            Target::Pid(pid) | Target::PidFile(_, pid) => vec![ProcessWait::new(*pid)],
            Target::Name(name) => {
                let found = procfs::find_by_name(name);
                if found.is_empty() {
                    if let Some(report) = report {
                        report.emit(&Record::info(
                            "no_process",
                            format!("no process named {name}: nothing to wait for"),
                        ));
                    }
                }
                found.into_iter().map(ProcessWait::new).collect()
            }
        }
    }

    pub fn new(pid: ProcessId) -> ProcessWait {
        let mut wait = ProcessWait {
            label: format!("pid {pid}"),
            pid,
            start_time: 0,
            pidfd: None,
            alive: false,
        };
        let Some(stat) = procfs::stat(pid) else {
            return wait;
        };
        if stat.is_zombie() {
            return wait;
        }
        wait.start_time = stat.start_time;
        wait.alive = true;
        match pidfd_open(pid) {
            Ok(fd) => {
                // The PID could have been reused between the stat and the open: make sure
                // the pidfd names the process that was looked at.
                if procfs::stat(pid).is_some_and(|s| s.start_time == stat.start_time) {
                    wait.pidfd = Some(fd);
                } else {
                    wait.alive = false;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => wait.alive = false,
            Err(e) => tracing::debug!("pidfd_open({pid}) failed: {e}; polling instead"),
        }
        wait
    }

    pub fn is_alive(&self) -> bool {
        self.alive
    }
}

impl Condition for ProcessWait {
    fn label(&self) -> &str {
        &self.label
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        // An exited process's pidfd stays readable: stop polling it, or the loop would spin.
        self.pidfd.as_ref().filter(|_| self.alive).map(AsFd::as_fd)
    }

    fn polled(&self) -> bool {
        self.alive && self.pidfd.is_none()
    }

    fn on_ready(&mut self) {
        self.alive = false;
    }

    fn refresh(&mut self) {
        self.alive = procfs::stat(self.pid)
            .is_some_and(|s| !s.is_zombie() && s.start_time == self.start_time);
    }

    fn in_flight(&self) -> usize {
        usize::from(self.alive)
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        if self.alive && limit > 0 {
            out.push(self.label.clone());
        }
    }

    fn state(&self) -> String {
        if self.alive { "running" } else { "exited" }.into()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_process_that_exits_is_drained_and_a_missing_one_already_is() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = ProcessId::from_raw(child.id()).unwrap();
        let mut wait = ProcessWait::new(pid);
        assert_eq!(wait.in_flight(), 1);
        assert!(wait.fd().is_some());
        child.kill().unwrap();
        // Not reaped yet: a zombie, which counts as exited.
        let mut fds = [nix::poll::PollFd::new(
            wait.fd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        wait.on_ready();
        assert_eq!(wait.in_flight(), 0);
        assert!(wait.fd().is_none());
        assert_eq!(
            ProcessWait::new(pid).in_flight(),
            0,
            "zombie counts as exited"
        );
        child.wait().unwrap();
        assert_eq!(ProcessWait::new(pid).in_flight(), 0);
    }
}
