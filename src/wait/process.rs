//! `--wait-pid TARGET`: drained when every process the target names has exited.
//!
//! A pidfd becomes readable the moment its process exits, whether or not prestop is its
//! parent, and it keeps naming that one process even if the PID is reused. A zombie counts as
//! exited: its work is done, only its parent has not looked yet. The processes are the ones
//! the target names when the wait starts, before the stop actions (a `name:` target may name
//! several; a pidfile that is not there names none: its process is gone). Where pidfds are
//! missing (kernels before 5.3), `/proc` is polled, the start time guarding against PID reuse.
//! A process prestop cannot look at (no file descriptor left) is unknown, never exited, until
//! it can. This module waits; it must never signal.

use std::os::fd::BorrowedFd;
use std::time::Instant;

use nix::libc;

use super::{Condition, Start};
use crate::process::{self, Named, Pid1, Pinned, Process, Target};
use crate::procfs::ProcessId;
use crate::report::Record;

pub struct ProcessWait {
    target: Target,
    pid1: Pid1,
    label: String,
    /// Whether the target has been resolved (it may have failed: see `unknown`).
    resolved: bool,
    /// Whether the target named any process when the wait started.
    found_any: bool,
    processes: Vec<Watched>,
    watching: bool,
    /// Why the target or one of its processes cannot be seen, if that is so.
    unknown: Option<String>,
    /// No look through `/proc` runs past it.
    deadline: Instant,
}

enum Watched {
    /// Pinned by a pidfd: exited once it is readable.
    Pinned { pinned: Pinned, alive: bool },
    /// Only looked at (`check`, a dry run), or without pidfds: /proc is polled.
    Looked { process: Process, alive: bool },
    /// Named by the target, but prestop could not look at it yet.
    Unseen { pid: ProcessId, why: String },
}

impl ProcessWait {
    pub fn new(target: &Target, pid1: Pid1) -> ProcessWait {
        ProcessWait {
            target: target.clone(),
            pid1,
            label: target.to_string(),
            resolved: false,
            found_any: false,
            processes: Vec::new(),
            watching: false,
            unknown: None,
            deadline: Instant::now(),
        }
    }

    fn running(&self) -> impl Iterator<Item = &Watched> {
        self.processes.iter().filter(|w| w.alive())
    }

    /// Looks up what the target names and pins (or looks at) each process.
    fn resolve(&mut self, report: Option<&crate::report::Reporter>) {
        match self.target.resolve(self.pid1, self.deadline) {
            Ok(Named::Pids(pids)) => {
                self.resolved = true;
                self.processes = pids
                    .into_iter()
                    .map(|pid| Watched::new(pid, self.watching))
                    .filter(|w| w.alive() || matches!(w, Watched::Unseen { .. }))
                    .collect();
                self.found_any = !self.processes.is_empty();
                let note = match &self.target {
                    Target::Name(name) if !self.found_any => {
                        Some(format!("no process named {name}: nothing to wait for"))
                    }
                    Target::Children(_) if !self.found_any => {
                        Some(format!("{}: none: nothing to wait for", self.label))
                    }
                    _ => None,
                };
                note_once(report, note);
            }
            Ok(Named::NoPidfile) => {
                self.resolved = true;
                note_once(
                    report,
                    Some(format!(
                        "{}: the pidfile is gone, so is its process",
                        self.label
                    )),
                );
            }
            Err(why) => self.unknown = Some(why),
        }
        self.update_unknown();
    }

    fn update_unknown(&mut self) {
        if !self.resolved {
            return;
        }
        self.unknown = self.processes.iter().find_map(|w| match w {
            Watched::Unseen { pid, why } => Some(format!("cannot look at pid {pid}: {why}")),
            _ => None,
        });
    }
}

fn note_once(report: Option<&crate::report::Reporter>, note: Option<String>) {
    if let (Some(report), Some(note)) = (report, note) {
        report.emit(&Record::info("no_process", note).step());
    }
}

impl Watched {
    fn new(pid: ProcessId, watching: bool) -> Watched {
        let unseen = |e: &std::io::Error| Watched::Unseen {
            pid,
            why: process::describe_io(e),
        };
        // Pinned even for one look: the pidfd tells a process that /proc hides from one
        // that has exited.
        match Pinned::pin(pid) {
            Ok(Some(pinned)) if watching && pinned.pidfd().is_some() => {
                return Watched::Pinned {
                    pinned,
                    alive: true,
                };
            }
            Ok(Some(pinned)) => {
                return Watched::Looked {
                    process: pinned.process,
                    alive: true,
                };
            }
            Ok(None) => {
                return Watched::Looked {
                    process: Process { pid, start_time: 0 },
                    alive: false,
                };
            }
            // Out of file descriptors or memory: look at it without a pidfd.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                ) =>
            {
                crate::debug!("pidfd_open({pid}) failed: {e}; polling instead");
            }
            Err(e) => return unseen(&e),
        }
        match Process::find(pid) {
            Ok(Some(process)) => Watched::Looked {
                process,
                alive: true,
            },
            Ok(None) => Watched::Looked {
                process: Process { pid, start_time: 0 },
                alive: false,
            },
            Err(e) => unseen(&e),
        }
    }

    fn pid(&self) -> ProcessId {
        match self {
            Watched::Pinned { pinned, .. } => pinned.pid(),
            Watched::Looked { process, .. } => process.pid,
            Watched::Unseen { pid, .. } => *pid,
        }
    }

    /// Whether it is known to run still.
    fn alive(&self) -> bool {
        match self {
            Watched::Pinned { alive, .. } | Watched::Looked { alive, .. } => *alive,
            Watched::Unseen { .. } => false,
        }
    }

    fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Watched::Pinned {
                pinned,
                alive: true,
            } => pinned.pidfd(),
            _ => None,
        }
    }

    fn exited(&mut self) {
        if let Watched::Pinned { alive, .. } | Watched::Looked { alive, .. } = self {
            *alive = false;
        }
    }

    fn refresh(&mut self, watching: bool) {
        let running = match self {
            Watched::Pinned {
                pinned,
                alive: true,
            } => pinned.is_running(),
            Watched::Looked {
                process,
                alive: true,
            } => process.is_running(),
            Watched::Unseen { pid, .. } => {
                *self = Watched::new(*pid, watching);
                return;
            }
            _ => return,
        };
        match running {
            Ok(true) => {}
            Ok(false) => self.exited(),
            Err(e) => {
                *self = Watched::Unseen {
                    pid: self.pid(),
                    why: process::describe_io(&e),
                };
            }
        }
    }
}

impl Condition for ProcessWait {
    fn label(&self) -> &str {
        &self.label
    }

    fn start_early(&self) -> bool {
        true
    }

    fn start(&mut self, cx: &Start<'_>) {
        self.watching = cx.watch;
        self.deadline = cx.deadline;
        self.resolve(cx.report);
    }

    fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        // An exited process's pidfd stays readable: stop watching it, or the loop would spin.
        for (key, w) in self.processes.iter().enumerate() {
            if let Some(fd) = w.pidfd() {
                add(fd, key);
            }
        }
    }

    fn polled(&self) -> bool {
        self.unknown.is_some() || self.running().any(|w| w.pidfd().is_none())
    }

    fn on_ready(&mut self, key: usize) {
        if let Some(w) = self.processes.get_mut(key) {
            w.exited();
        }
    }

    fn refresh(&mut self) {
        if !self.resolved {
            self.resolve(None);
            return;
        }
        for w in &mut self.processes {
            w.refresh(self.watching);
        }
        self.update_unknown();
    }

    fn in_flight(&self) -> usize {
        self.running().count()
    }

    fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        out.extend(
            self.running()
                .take(limit)
                .map(|w| format!("pid {}", w.pid())),
        );
    }

    fn state(&self) -> String {
        if let Some(why) = &self.unknown {
            return format!("unknown ({why})");
        }
        let by_name = matches!(self.target, Target::Name(_) | Target::Children(_));
        match (by_name, self.found_any, self.in_flight()) {
            (true, false, _) => "none running".into(),
            (false, false, _) if matches!(self.target, Target::PidFile(_)) => {
                "exited (no pidfile)".into()
            }
            (_, _, 0) => "exited".into(),
            (false, _, _) => "running".into(),
            (true, _, n) => {
                let mut named = Vec::new();
                self.name_in_flight(&mut named, super::NAMED_IN_FLIGHT);
                format!("{n} running ({})", super::list(n, &named))
            }
        }
    }

    fn plan(&self) -> String {
        let now = if let Some(why) = &self.unknown {
            format!("unknown: {why}")
        } else {
            match (&self.target, self.in_flight()) {
                (Target::Name(_) | Target::Children(_), 0) => "no such process".into(),
                (Target::PidFile(_), _) if !self.found_any => {
                    "no pidfile yet; it is read when the hook runs".into()
                }
                (_, 0) => "not running".into(),
                (Target::Name(_) | Target::Children(_), _) => {
                    let pids: Vec<String> = self.running().map(|w| w.pid().to_string()).collect();
                    format!("pid {}", pids.join(", "))
                }
                (_, _) => format!("running as pid {}", self.processes[0].pid()),
            }
        };
        let verb = match self.target {
            Target::Name(_) | Target::Children(_) => "have all exited",
            _ => "has exited",
        };
        format!("{} {verb} (now: {now})", self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    fn started(target: &Target, watch: bool) -> ProcessWait {
        let mut wait = ProcessWait::new(target, Pid1::Real);
        wait.start(&Start {
            watch,
            report: None,
            deadline: Instant::now() + std::time::Duration::from_secs(10),
        });
        wait
    }

    #[test]
    fn a_process_that_exits_is_drained_and_a_missing_one_already_is() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = ProcessId::from_raw(child.id()).unwrap();
        let target = Target::Pid(pid);
        let mut wait = started(&target, true);
        assert_eq!(wait.in_flight(), 1);
        let mut fds = Vec::new();
        wait.watch(&mut |fd, key| fds.push((fd.as_raw_fd(), key)));
        assert_eq!(fds.len(), 1);
        child.kill().unwrap();
        // Not reaped yet: a zombie, which counts as exited.
        let fd = wait.processes[0].pidfd().unwrap();
        let mut poll = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(5000u16)).unwrap();
        wait.on_ready(fds[0].1);
        assert_eq!(wait.in_flight(), 0);
        let mut watched = 0;
        wait.watch(&mut |_, _| watched += 1);
        assert_eq!(watched, 0, "an exited process is no longer watched");
        assert_eq!(
            started(&target, false).in_flight(),
            0,
            "zombie counts as exited"
        );
        child.wait().unwrap();
        assert_eq!(started(&target, true).in_flight(), 0);
        assert!(wait.unknown().is_none());
    }
}
