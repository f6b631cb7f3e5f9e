//! `--wait-pid TARGET`: drained when every process the target names has exited.
//!
//! A pidfd becomes readable the moment its process exits, whether or not prestop is its
//! parent, and it keeps naming that one process even if the PID is reused. A zombie counts as
//! exited: its work is done, only its parent has not looked yet. The processes are the ones
//! the target names when the wait is set up (a `name:` target may name several). Where pidfds
//! are missing (kernels before 5.3), `/proc` is polled, the start time guarding against PID
//! reuse. This module waits; it must never signal.

use std::os::fd::BorrowedFd;

use super::{Condition, Mode};
use crate::process::{self, Pinned, Process, Target};
use crate::procfs::ProcessId;
use crate::report::Record;

pub struct ProcessWait {
    label: String,
    /// Whether the target is a name, which can name several processes or none.
    by_name: bool,
    /// Found when the wait was set up, even if none was running.
    found_any: bool,
    processes: Vec<Watched>,
}

enum Watched {
    /// Pinned by a pidfd: exited once it is readable.
    Pinned { pinned: Pinned, alive: bool },
    /// Only looked at (`check`, a dry run), or without pidfds: /proc is polled.
    Looked { process: Process, alive: bool },
}

impl ProcessWait {
    /// Looks up what the target names now and, when watching, pins each process with a pidfd.
    pub fn new(target: &Target, mode: Mode<'_>) -> ProcessWait {
        let pids = match target {
            Target::Pid(pid) | Target::PidFile(_, pid) => vec![*pid],
            Target::Name(name) => process::find_by_name(name),
        };
        let watching = matches!(mode, Mode::Watch(_));
        let processes: Vec<Watched> = pids
            .into_iter()
            .filter_map(|pid| Watched::new(pid, watching))
            .collect();
        if let (Target::Name(name), Mode::Watch(Some(report))) = (target, mode) {
            if processes.is_empty() {
                report.emit(
                    &Record::info(
                        "no_process",
                        format!("no process named {name}: nothing to wait for"),
                    )
                    .step(),
                );
            }
        }
        ProcessWait {
            label: target.to_string(),
            by_name: matches!(target, Target::Name(_)),
            found_any: !processes.is_empty(),
            processes,
        }
    }

    fn running(&self) -> impl Iterator<Item = &Watched> {
        self.processes.iter().filter(|w| w.alive())
    }
}

impl Watched {
    fn new(pid: ProcessId, watching: bool) -> Option<Watched> {
        if watching {
            match Pinned::pin(pid) {
                Ok(Some(pinned)) if pinned.pidfd().is_some() => {
                    return Some(Watched::Pinned {
                        pinned,
                        alive: true,
                    });
                }
                Ok(Some(pinned)) => {
                    return Some(Watched::Looked {
                        process: pinned.process,
                        alive: true,
                    });
                }
                Ok(None) => return None,
                Err(e) => tracing::debug!("pidfd_open({pid}) failed: {e}; polling instead"),
            }
        }
        Process::find(pid).map(|process| Watched::Looked {
            process,
            alive: true,
        })
    }

    fn pid(&self) -> ProcessId {
        match self {
            Watched::Pinned { pinned, .. } => pinned.pid(),
            Watched::Looked { process, .. } => process.pid,
        }
    }

    fn alive(&self) -> bool {
        match self {
            Watched::Pinned { alive, .. } | Watched::Looked { alive, .. } => *alive,
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
        match self {
            Watched::Pinned { alive, .. } | Watched::Looked { alive, .. } => *alive = false,
        }
    }

    fn refresh(&mut self) {
        match self {
            Watched::Pinned { pinned, alive } => *alive = *alive && pinned.is_running(),
            Watched::Looked { process, alive } => *alive = *alive && process.is_running(),
        }
    }
}

impl Condition for ProcessWait {
    fn label(&self) -> &str {
        &self.label
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
        self.running().any(|w| w.pidfd().is_none())
    }

    fn on_ready(&mut self, key: usize) {
        if let Some(w) = self.processes.get_mut(key) {
            w.exited();
        }
    }

    fn refresh(&mut self) {
        for w in &mut self.processes {
            w.refresh();
        }
    }

    fn in_flight(&self) -> usize {
        self.running().count()
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        out.extend(
            self.running()
                .take(limit)
                .map(|w| format!("pid {}", w.pid())),
        );
    }

    fn state(&self) -> String {
        match (self.by_name, self.found_any, self.in_flight()) {
            (true, false, _) => "none running".into(),
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
        let now = match (self.found_any, self.by_name) {
            (false, true) => "no such process".into(),
            (false, false) => "not running".into(),
            (true, false) => "running".into(),
            (true, true) => {
                let pids: Vec<String> =
                    self.processes.iter().map(|w| w.pid().to_string()).collect();
                format!("pid {}", pids.join(", "))
            }
        };
        format!("{} has exited (now: {now})", self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::process::{Command, Stdio};

    #[test]
    fn a_process_that_exits_is_drained_and_a_missing_one_already_is() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = ProcessId::from_raw(child.id()).unwrap();
        let target = Target::Pid(pid);
        let mut wait = ProcessWait::new(&target, Mode::Watch(None));
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
            ProcessWait::new(&target, Mode::Look).in_flight(),
            0,
            "zombie counts as exited"
        );
        child.wait().unwrap();
        assert_eq!(ProcessWait::new(&target, Mode::Watch(None)).in_flight(), 0);
    }
}
