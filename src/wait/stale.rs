//! Which of a glob's matching lock files are stale: left behind by a job that is provably
//! gone (see `joblock`). A stale lock file is named once in the log and not counted as in
//! flight; every other match is.
//!
//! Most lock files are judged once, when they appear, and stay held until they go. What can
//! change the verdict of a held one without a file-system event is watched instead: the exit
//! of a process it names (a pidfd), or, for a `hold` lock held by processes it does not name,
//! a fresh look every `RELOOK`. A stale verdict is looked at again on every rescan, and so
//! before every "drained": a new job that takes over the name must not be missed.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::joblock::{self, Judgment};
use crate::process::Pinned;

/// How often a `hold` lock held by processes it does not name is looked at again.
const RELOOK: Duration = Duration::from_secs(1);

/// A lock file whose verdict can change without a file-system event, or is stale.
enum Special {
    /// And why.
    Stale(String),
    /// Held by the processes pinned under this id in `Staleness::watched`.
    Watched(usize),
    /// Held by processes it does not name: looked at again every `RELOOK`.
    Relook,
}

pub struct Staleness {
    /// `--lock-pid`: a file holding just a PID names its holder.
    lock_pid: bool,
    /// Only the files that are not plainly held.
    special: HashMap<PathBuf, Special>,
    /// id -> the file, and the processes whose exit may make it stale.
    watched: HashMap<usize, (PathBuf, Vec<Pinned>)>,
    next_id: usize,
    stale: usize,
    next_relook: Option<Instant>,
    /// Lines to log: each lock file found stale, and why.
    notes: Vec<String>,
}

impl Staleness {
    pub fn new(lock_pid: bool) -> Staleness {
        Staleness {
            lock_pid,
            special: HashMap::new(),
            watched: HashMap::new(),
            next_id: 1,
            stale: 0,
            next_relook: None,
            notes: Vec::new(),
        }
    }

    pub fn lock_pid(&self) -> bool {
        self.lock_pid
    }

    /// How many matches are stale.
    pub fn stale(&self) -> usize {
        self.stale
    }

    pub fn is_stale(&self, path: &Path) -> bool {
        matches!(self.special.get(path), Some(Special::Stale(_)))
    }

    /// Each stale file and why, in path order.
    pub fn stale_files(&self) -> Vec<(&Path, &str)> {
        let mut files: Vec<(&Path, &str)> = self
            .special
            .iter()
            .filter_map(|(p, s)| match s {
                Special::Stale(why) => Some((p.as_path(), why.as_str())),
                _ => None,
            })
            .collect();
        files.sort_unstable();
        files
    }

    /// A match appeared (or was rewritten): judge it afresh.
    pub fn judge(&mut self, path: &Path) {
        let was_stale = self.is_stale(path);
        self.forget(path);
        match joblock::judge(path, self.lock_pid) {
            Judgment::Stale(why) => {
                if !was_stale {
                    self.notes
                        .push(format!("stale lock {}: {why}", path.display()));
                }
                self.special.insert(path.to_path_buf(), Special::Stale(why));
                self.stale += 1;
            }
            Judgment::Held { watch, .. } if !watch.is_empty() => {
                let id = self.next_id;
                self.next_id += 1;
                self.watched.insert(id, (path.to_path_buf(), watch));
                self.special
                    .insert(path.to_path_buf(), Special::Watched(id));
            }
            Judgment::Held { relook: true, .. } => {
                self.special.insert(path.to_path_buf(), Special::Relook);
                self.next_relook
                    .get_or_insert_with(|| Instant::now() + RELOOK);
            }
            Judgment::Held { .. } => {}
        }
    }

    /// A match that was there before a rescan is there still: judge it again only if its
    /// verdict may have changed unseen (stale, or held by processes it does not name).
    pub fn recheck(&mut self, path: &Path) {
        if matches!(
            self.special.get(path),
            Some(Special::Stale(_) | Special::Relook)
        ) {
            self.judge(path);
        }
    }

    /// A match is gone.
    pub fn forget(&mut self, path: &Path) {
        match self.special.remove(path) {
            Some(Special::Stale(_)) => self.stale -= 1,
            Some(Special::Watched(id)) => {
                self.watched.remove(&id);
            }
            Some(Special::Relook) | None => {}
        }
    }

    /// Forgets every file for which `present` is false (after a rescan).
    pub fn retain(&mut self, present: impl Fn(&Path) -> bool) {
        let gone: Vec<PathBuf> = self
            .special
            .keys()
            .filter(|p| !present(p))
            .cloned()
            .collect();
        for path in gone {
            self.forget(&path);
        }
    }

    /// Adds the pidfd of each watched process, keyed by its file's id.
    pub fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        for (&id, (_, pinned)) in &self.watched {
            for p in pinned {
                if let Some(fd) = p.pidfd() {
                    add(fd, id);
                }
            }
        }
    }

    /// A watched process of file `id` has exited: judge the file again.
    pub fn on_exit(&mut self, id: usize) {
        if let Some((path, _)) = self.watched.get(&id) {
            let path = path.clone();
            self.judge(&path);
        }
    }

    /// When files held by unnamed processes are to be looked at again.
    pub fn next_look(&self) -> Option<Instant> {
        self.next_relook
    }

    /// Looks again at what `next_look` asked for, if it is due.
    pub fn relook(&mut self, now: Instant) {
        if self.next_relook.is_none_or(|at| at > now) {
            return;
        }
        self.next_relook = None;
        let due: Vec<PathBuf> = self
            .special
            .iter()
            .filter(|(_, s)| matches!(s, Special::Relook))
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            self.judge(&path);
        }
    }

    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }
}
