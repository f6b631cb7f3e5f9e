//! `--wait-lock GLOB`: drained when no path matches the glob.
//!
//! The directories a match can appear in are watched with inotify (and, while a directory
//! does not exist yet, its nearest existing ancestor). The set of matching names is kept up to
//! date from each event's file name, so removing 10,000 lock files one by one costs 10,000 set
//! removals, not 10,000 directory scans. A full rescan happens only when the directory tree
//! itself changes or the kernel's event queue overflows. Without inotify (or past the watch
//! limit) the condition falls back to rescanning at `--poll-interval`, as it does for the last
//! few milliseconds before the deadline (see `Condition::release`).
//!
//! A directory prestop may not read or watch makes the condition unknown, never drained. The
//! walk of the directories is bounded: `**` never follows a symlinked directory (a link to
//! `.` would go round forever), at most `MAX_DIRS` directories are looked at, and no walk or
//! scan runs past the deadline; what is not seen by then is unknown too.
//!
//! Events can arrive by the thousand per second, so handling one must not allocate or parse
//! paths: matches are kept per directory as bare file names (compared as bytes), a removal is
//! looked up by the name the kernel hands over, and a burst is read in one system call.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use glob::MatchOptions;
use nix::errno::Errno;
use nix::libc;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::stale::Staleness;
use super::{Condition, Start};
use crate::config::LockGlob;
use crate::process::describe_io;
use crate::report::{Record, Reporter};

/// The most directories one glob's walk looks at (and watches). Past that, the glob is
/// unknown: a lock directory has a handful; a glob that spans thousands is a mistake
/// (`/**/*.lock`), and the kernel's default limit on watches is 8,192 per user on older
/// kernels.
const MAX_DIRS: usize = 4096;

/// How many directory entries are read, and how many directories walked, between two looks
/// at the clock: a small glob is looked at whole even at the deadline.
const ENTRIES_PER_CLOCK: usize = 1024;
const DIRS_PER_CLOCK: usize = 64;

/// `*` and `?` never cross a '/', as in a shell.
const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

const HEADER: usize = std::mem::size_of::<libc::inotify_event>();

/// Room for a few thousand events per read, so a burst is drained in few system calls.
const EVENT_BUFFER: usize = 64 * 1024;

/// The largest single event: a header and a name of up to `NAME_MAX` bytes with its NUL,
/// which the kernel pads to a multiple of the header's size (256 already is one).
const LARGEST_EVENT: usize = HEADER + libc::NAME_MAX as usize + 1;

/// A directory a match can appear in, with the names in it that match now.
struct Dir {
    path: PathBuf,
    /// Sorted, so that the paths named in progress lines come out in a stable order.
    names: BTreeSet<OsString>,
}

pub struct LockWait {
    glob: LockGlob,
    label: String,
    inotify: Option<Inotify>,
    /// Raw watch descriptor -> the watch and the indexes in `dirs` it stands for (one, unless
    /// two paths lead to the same directory).
    watches: HashMap<i32, (WatchDescriptor, Vec<usize>)>,
    /// Sorted by path, as `walk` returns them.
    dirs: Vec<Dir>,
    /// Reused to build the path a new name is matched against, instead of allocating one.
    scratch: PathBuf,
    buffer: Vec<u8>,
    /// The instance given up by `release`, its watches removed. It stays open until prestop
    /// exits: closing it would wait for the kernel to finish tearing those watches down.
    retired: Option<Inotify>,
    /// No walk or scan runs past this.
    deadline: Instant,
    /// Why some directory cannot be seen, if one cannot: then the glob is unknown.
    unknown: Option<String>,
    /// Which matches are left behind by a job that is gone.
    staleness: Staleness,
}

impl LockWait {
    /// A wait that has not looked yet: `start` does. `lock_pid`: a lock file holding just
    /// a PID names its holder (`--lock-pid`).
    pub fn new(glob: LockGlob, lock_pid: bool) -> LockWait {
        LockWait {
            label: format!("lock {}", glob.absolute),
            glob,
            inotify: None,
            watches: HashMap::new(),
            dirs: Vec::new(),
            scratch: PathBuf::new(),
            buffer: Vec::new(),
            retired: None,
            deadline: Instant::now(),
            unknown: None,
            staleness: Staleness::new(lock_pid),
        }
    }

    /// Every path that matches now.
    #[cfg(test)]
    pub fn matches(&self) -> BTreeSet<PathBuf> {
        self.dirs
            .iter()
            .flat_map(|d| d.names.iter().map(|n| d.path.join(n)))
            .collect()
    }

    /// Watches `dirs` (and only them); says why one could not be watched, if one could not.
    fn add_watches(&mut self, dirs: &[PathBuf], report: Option<&Reporter>) -> Option<String> {
        let inotify = self.inotify.as_ref()?;
        let mut unwatched = None;
        let mut watches: HashMap<i32, (WatchDescriptor, Vec<usize>)> = HashMap::new();
        let mut out_of_watches = None;
        for (index, dir) in dirs.iter().enumerate() {
            match inotify.add_watch(dir.as_path(), watch_mask(self.staleness.lock_pid())) {
                Ok(wd) => watches
                    .entry(wd.as_raw())
                    .or_insert_with(|| (wd, Vec::new()))
                    .1
                    .push(index),
                // Gone since it was listed: its parent's watch reports that.
                Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                Err(e @ Errno::ENOSPC) => {
                    out_of_watches = Some(e);
                    break;
                }
                Err(e) => {
                    unwatched.get_or_insert_with(|| {
                        format!("cannot watch {}: {} ({e:?})", dir.display(), e.desc())
                    });
                }
            }
        }
        if let Some(e) = out_of_watches {
            warn(
                report,
                &format!(
                    "cannot watch {} ({e}: past fs.inotify.max_user_watches); polling instead",
                    self.glob.absolute
                ),
            );
            self.inotify = None;
            self.watches.clear();
            return None;
        }
        for (raw, (wd, _)) in &self.watches {
            if !watches.contains_key(raw) {
                // One the kernel already dropped fails with EINVAL, which is fine.
                let _ = inotify.rm_watch(*wd);
            }
        }
        self.watches = watches;
        unwatched
    }

    /// Rebuilds the watches and the set of matches from the file system. Watches are added
    /// before the directories are read, so nothing that happens in between is missed.
    fn rescan(&mut self, report: Option<&Reporter>) {
        let mut seen = walk(&self.glob.absolute, self.deadline);
        // A directory created between the walk's look at its parent and the parent's watch
        // would be missed for good: walk again once the watches are in place, until two
        // walks agree (a few rounds at most; the next event or look tries again).
        let mut unwatched = self.add_watches(&seen.dirs, report);
        for _ in 0..3 {
            if self.inotify.is_none() {
                break;
            }
            let again = walk(&self.glob.absolute, self.deadline);
            if again.dirs == seen.dirs {
                break;
            }
            seen = again;
            unwatched = self.add_watches(&seen.dirs, report);
        }
        let mut trouble = seen.trouble;
        let dirs = seen.dirs;
        let mut before: HashMap<PathBuf, BTreeSet<OsString>> = std::mem::take(&mut self.dirs)
            .into_iter()
            .map(|d| (d.path, d.names))
            .collect();
        self.dirs = dirs
            .into_iter()
            .map(|path| Dir {
                path,
                names: BTreeSet::new(),
            })
            .collect();
        let mut read = 0usize;
        'dirs: for dir in &mut self.dirs {
            let entries = match std::fs::read_dir(&dir.path) {
                Ok(entries) => entries,
                Err(e) if vanished(&e) => continue,
                Err(e) => {
                    trouble.get_or_insert_with(|| {
                        format!("cannot read {}: {}", dir.path.display(), describe_io(&e))
                    });
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        trouble.get_or_insert_with(|| {
                            format!("cannot read {}: {}", dir.path.display(), describe_io(&e))
                        });
                        break;
                    }
                };
                read += 1;
                if read.is_multiple_of(ENTRIES_PER_CLOCK) && Instant::now() >= self.deadline {
                    trouble.get_or_insert_with(|| {
                        format!(
                            "the look at {} was cut short at the deadline",
                            dir.path.display()
                        )
                    });
                    break 'dirs;
                }
                let name = entry.file_name();
                if name_matches(&mut self.scratch, &self.glob, &dir.path, &name) {
                    // Judged when first seen; looked at again only if that may have
                    // changed unseen.
                    let known = before.get(&dir.path).is_some_and(|b| b.contains(&name));
                    if known {
                        self.staleness.recheck(&self.scratch);
                    } else {
                        self.staleness.judge(&self.scratch);
                    }
                    dir.names.insert(name);
                }
            }
        }
        before.clear();
        let dirs = &self.dirs;
        self.staleness.retain(|path| {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return false;
            };
            dirs.binary_search_by(|d| d.path.as_path().cmp(parent))
                .is_ok_and(|i| dirs[i].names.contains(name))
        });
        self.unknown = trouble.or(unwatched);
        crate::debug!(
            "rescanned {}: {} directories, {} matches, unknown: {:?}",
            self.glob.absolute,
            self.dirs.len(),
            self.in_flight(),
            self.unknown
        );
    }

    /// Applies one event to the set of matches; returns whether a full rescan is needed.
    fn apply(&mut self, wd: i32, mask: AddWatchFlags, name: &OsStr) -> bool {
        if mask.intersects(
            AddWatchFlags::IN_Q_OVERFLOW
                | AddWatchFlags::IN_IGNORED
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_ISDIR,
        ) {
            return true;
        }
        let Some((_, dirs)) = self.watches.get(&wd) else {
            return false;
        };
        let added = mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
        let written = mask.contains(AddWatchFlags::IN_CLOSE_WRITE);
        for &index in dirs {
            let dir = &mut self.dirs[index];
            if written {
                // Written anew (a PID file): its verdict may have changed.
                if dir.names.contains(name) {
                    self.scratch.as_mut_os_string().clear();
                    self.scratch.push(&dir.path);
                    self.scratch.push(name);
                    self.staleness.judge(&self.scratch);
                }
            } else if !added {
                if dir.names.remove(name) {
                    self.scratch.as_mut_os_string().clear();
                    self.scratch.push(&dir.path);
                    self.scratch.push(name);
                    self.staleness.forget(&self.scratch);
                }
            } else if name_matches(&mut self.scratch, &self.glob, &dir.path, name) {
                self.staleness.judge(&self.scratch);
                dir.names.insert(name.to_owned());
            }
        }
        false
    }
}

impl Condition for LockWait {
    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self, cx: &Start<'_>) {
        self.deadline = cx.deadline;
        if cx.watch {
            match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
                Ok(i) => self.inotify = Some(i),
                Err(e) => warn(
                    cx.report,
                    &format!(
                        "inotify unavailable ({} ({e:?})); polling {}",
                        e.desc(),
                        self.glob.absolute
                    ),
                ),
            }
        }
        self.rescan(cx.report);
    }

    fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        if let Some(inotify) = &self.inotify {
            add(inotify.as_fd(), 0);
        }
        // Key 0 is inotify; the processes named by held locks have keys of their own.
        self.staleness.watch(add);
    }

    fn polled(&self) -> bool {
        self.inotify.is_none() || self.unknown.is_some()
    }

    fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }

    /// A last, fresh look before the drain is declared: what no event reports (a directory
    /// on the glob's path swapped for another, a mount over one) cannot pass unseen.
    fn confirm(&mut self) {
        self.rescan(None);
    }

    fn plan(&self) -> String {
        match &self.unknown {
            Some(why) => format!(
                "no path matches {} (now: unknown: {why})",
                self.glob.absolute
            ),
            None => format!(
                "no path matches {} (now: {} in flight)",
                self.glob.absolute,
                self.in_flight()
            ),
        }
    }

    fn on_ready(&mut self, key: usize) {
        if key != 0 {
            self.staleness.on_exit(key);
            return;
        }
        if self.buffer.len() < EVENT_BUFFER {
            self.buffer.resize(EVENT_BUFFER, 0);
        }
        let mut buffer = std::mem::take(&mut self.buffer);
        let mut rescan = false;
        while let Some(inotify) = &self.inotify {
            let len = match nix::unistd::read(inotify.as_fd(), &mut buffer) {
                Ok(len) => len,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(_) => {
                    rescan = true;
                    break;
                }
            };
            let mut offset = 0;
            while offset + HEADER <= len {
                // SAFETY: the kernel writes whole `inotify_event` records into the buffer and
                // the header at `offset` lies within the `len` bytes it wrote (checked
                // above); `read_unaligned` because a byte buffer has no alignment.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buffer.as_ptr().add(offset).cast()) };
                let name_start = offset + HEADER;
                let name_end = (name_start + event.len as usize).min(len);
                let name = &buffer[name_start..name_end];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                let mask = AddWatchFlags::from_bits_truncate(event.mask);
                rescan |= self.apply(event.wd, mask, OsStr::from_bytes(name));
                offset = name_end;
            }
            // The kernel hands over every queued event that fits. With room left for the
            // largest one, the queue was empty: a further read would only say EAGAIN.
            if buffer.len() - len >= LARGEST_EVENT {
                break;
            }
        }
        self.buffer = buffer;
        if rescan {
            self.rescan(None);
        }
    }

    fn refresh(&mut self) {
        if self.polled() {
            self.rescan(None);
        }
        self.staleness.relook(Instant::now());
    }

    fn next_look(&self) -> Option<Instant> {
        self.staleness.next_look()
    }

    fn take_notes(&mut self) -> Vec<String> {
        self.staleness.take_notes()
    }

    fn in_flight(&self) -> usize {
        self.dirs.iter().map(|d| d.names.len()).sum::<usize>() - self.staleness.stale()
    }

    fn details(&self) -> Vec<String> {
        self.staleness
            .stale_files()
            .into_iter()
            .map(|(path, why)| format!("stale (not counted): {}: {why}", path.display()))
            .collect()
    }

    fn release(&mut self) {
        if let Some(inotify) = self.inotify.take() {
            for (wd, _) in self.watches.values() {
                // Removing a watch only queues its teardown; nothing here waits for it.
                let _ = inotify.rm_watch(*wd);
            }
            self.watches.clear();
            self.retired = Some(inotify);
        }
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        // The first `limit` paths overall are among the first `limit` of each directory.
        let mut first: Vec<PathBuf> = self
            .dirs
            .iter()
            .flat_map(|d| {
                d.names
                    .iter()
                    .map(|n| d.path.join(n))
                    .filter(|p| !self.staleness.is_stale(p))
                    .take(limit)
            })
            .collect();
        first.sort();
        out.extend(
            first
                .iter()
                .take(limit)
                .map(|p| format!("lock {}", p.display())),
        );
    }
}

/// What a watched directory reports; with `--lock-pid`, a file written and closed too (a PID
/// file that got its PID).
fn watch_mask(lock_pid: bool) -> AddWatchFlags {
    let written = if lock_pid {
        AddWatchFlags::IN_CLOSE_WRITE
    } else {
        AddWatchFlags::empty()
    };
    written
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// Whether `name` in `dir` matches the glob; builds the path in `scratch`, so that matching
/// allocates only when a name is longer than any seen before.
/// Names that are not UTF-8 are matched as their lossy form: a wildcard matches the bytes
/// it cannot read, so a lock file with such a name is still seen.
fn name_matches(scratch: &mut PathBuf, glob: &LockGlob, dir: &Path, name: &OsStr) -> bool {
    scratch.as_mut_os_string().clear();
    scratch.push(dir);
    scratch.push(name);
    glob.pattern
        .matches_with(&scratch.as_os_str().to_string_lossy(), MATCH)
}

fn warn(report: Option<&Reporter>, message: &str) {
    if let Some(report) = report {
        report.emit(&Record::warn("fallback", message));
    }
}

fn is_wild(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

/// Whether an error means a directory is simply not there (any more), as opposed to prestop
/// being unable to look.
fn vanished(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// The directories a match of a glob can appear in, and why some could not be seen.
#[derive(Debug, Default)]
pub struct Walk {
    pub dirs: Vec<PathBuf>,
    pub trouble: Option<String>,
    /// Directories looked into so far, for the pace of looks at the clock.
    steps: usize,
}

impl Walk {
    fn refuse(&mut self, why: String) {
        self.trouble.get_or_insert(why);
    }

    /// Whether the walk must stop, having found `found` directories: too many, or the
    /// deadline has passed (looked at every `DIRS_PER_CLOCK` calls).
    fn over(&mut self, found: usize, deadline: Instant) -> bool {
        if found > MAX_DIRS {
            self.refuse(format!(
                "the glob spans more than {MAX_DIRS} directories, more than prestop looks at"
            ));
            return true;
        }
        self.steps += 1;
        if self.steps.is_multiple_of(DIRS_PER_CLOCK) && Instant::now() >= deadline {
            self.refuse("the walk of its directories was cut short at the deadline".into());
            return true;
        }
        false
    }

    /// Whether the deadline has passed, looked at now (every `ENTRIES_PER_CLOCK` entries
    /// of one directory): the walk is then cut short.
    fn late(&mut self, deadline: Instant) -> bool {
        let late = Instant::now() >= deadline;
        if late {
            self.refuse("the walk of its directories was cut short at the deadline".into());
        }
        late
    }
}

/// The directories a match of `absolute` can appear in: the glob's literal directory prefix
/// (or its nearest existing ancestor while it is missing), and every existing directory that
/// the glob's directory components match below it. `**` is any number of directories, never
/// through a symlink; `*` and the like match one component, following a symlink as a shell
/// would. Bounded by `MAX_DIRS` and `deadline`.
pub fn walk(absolute: &str, deadline: Instant) -> Walk {
    let mut walk = Walk::default();
    let components: Vec<&str> = absolute.split('/').filter(|c| !c.is_empty()).collect();
    let Some(last) = components.len().checked_sub(1) else {
        walk.dirs.push(PathBuf::from("/"));
        return walk;
    };
    let prefix_len = components
        .iter()
        .position(|c| is_wild(c))
        .unwrap_or(last)
        .min(last);
    let prefix: PathBuf = std::iter::once("/")
        .chain(components[..prefix_len].iter().copied())
        .collect();
    let mut nearest = prefix.clone();
    loop {
        match std::fs::metadata(&nearest) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => {
                walk.refuse(format!(
                    "cannot look at {}: {}",
                    nearest.display(),
                    describe_io(&e)
                ));
                return walk;
            }
        }
        if !nearest.pop() {
            break;
        }
    }
    walk.dirs.push(nearest.clone());
    if nearest != prefix {
        return walk;
    }
    let mut level = vec![prefix];
    for component in &components[prefix_len..last] {
        let pattern = glob::Pattern::new(component).ok();
        let mut next = Vec::new();
        for dir in &level {
            match (*component, &pattern) {
                ("**", _) => {
                    next.push(dir.clone());
                    descend(dir, &mut next, &mut walk, deadline);
                }
                (wild, Some(pattern)) if is_wild(wild) => {
                    matching_subdirs(dir, pattern, &mut next, &mut walk, deadline);
                }
                (literal, _) => {
                    push_if_dir(dir.join(literal), &mut next, &mut walk);
                }
            }
            if walk.over(walk.dirs.len() + next.len(), deadline) {
                break;
            }
        }
        next.sort();
        next.dedup();
        walk.dirs.extend(next.iter().cloned());
        if walk.over(walk.dirs.len(), deadline) {
            break;
        }
        level = next;
    }
    walk.dirs.sort();
    walk.dirs.dedup();
    walk.dirs.truncate(MAX_DIRS);
    walk
}

/// Every directory below `dir`, never through a symlink.
fn descend(dir: &Path, out: &mut Vec<PathBuf>, walk: &mut Walk, deadline: Instant) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Some(entries) = list(&dir, walk) else {
            continue;
        };
        for (i, entry) in entries.enumerate() {
            let Some(entry) = next_entry(entry, &dir, walk) else {
                break;
            };
            // The entry's own type: a symlink to a directory is a symlink, not followed.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(entry.path());
                stack.push(entry.path());
            }
            if (i + 1).is_multiple_of(ENTRIES_PER_CLOCK) && walk.late(deadline) {
                return;
            }
        }
        if walk.over(walk.dirs.len() + out.len(), deadline) {
            return;
        }
    }
}

/// The directories in `dir` whose names match one wildcard component, following symlinks
/// (one level: no loop can form). A name that matches but cannot be looked at makes the
/// walk unknown: it may be a directory full of locks.
fn matching_subdirs(
    dir: &Path,
    pattern: &glob::Pattern,
    out: &mut Vec<PathBuf>,
    walk: &mut Walk,
    deadline: Instant,
) {
    let Some(entries) = list(dir, walk) else {
        return;
    };
    for (i, entry) in entries.enumerate() {
        let Some(entry) = next_entry(entry, dir, walk) else {
            break;
        };
        if pattern.matches_with(&entry.file_name().to_string_lossy(), MATCH) {
            push_if_dir(entry.path(), out, walk);
        }
        if (i + 1).is_multiple_of(ENTRIES_PER_CLOCK) && walk.late(deadline) {
            return;
        }
    }
}

/// Adds `path` to `out` if it is a directory (following a symlink); one that cannot be
/// looked at makes the walk unknown: it may be a directory full of locks.
fn push_if_dir(path: PathBuf, out: &mut Vec<PathBuf>, walk: &mut Walk) {
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => out.push(path),
        Ok(_) => {}
        // A symlink loop is no directory, for the app either.
        Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::ELOOP) => {}
        Err(e) => walk.refuse(format!(
            "cannot look at {}: {}",
            path.display(),
            describe_io(&e)
        )),
    }
}

/// One entry of `dir`, or `None` when listing it failed part way (and the walk unknown:
/// what was not listed may hold locks).
fn next_entry(
    entry: std::io::Result<std::fs::DirEntry>,
    dir: &Path,
    walk: &mut Walk,
) -> Option<std::fs::DirEntry> {
    match entry {
        Ok(entry) => Some(entry),
        Err(e) => {
            cannot_read(dir, &e, walk);
            None
        }
    }
}

/// A directory's entries, or `None` (and the walk unknown, unless it vanished).
fn list(dir: &Path, walk: &mut Walk) -> Option<std::fs::ReadDir> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Some(entries),
        Err(e) if vanished(&e) => None,
        Err(e) => {
            cannot_read(dir, &e, walk);
            None
        }
    }
}

/// A directory that could not be listed: the walk is unknown, as it may hold locks.
fn cannot_read(dir: &Path, e: &std::io::Error, walk: &mut Walk) {
    walk.refuse(format!("cannot read {}: {}", dir.display(), describe_io(e)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn watching(glob: LockGlob) -> LockWait {
        let mut wait = LockWait::new(glob, false);
        wait.start(&Start {
            watch: true,
            report: None,
            deadline: Instant::now() + std::time::Duration::from_secs(60),
        });
        wait
    }

    fn dirs_of(absolute: &str) -> Vec<PathBuf> {
        let walk = walk(
            absolute,
            Instant::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(walk.trouble, None);
        walk.dirs
    }

    fn glob(abs: &str) -> LockGlob {
        LockGlob {
            absolute: abs.to_owned(),
            pattern: glob::Pattern::new(abs).unwrap(),
        }
    }

    #[test]
    fn the_walk_follows_the_glob() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        fs::create_dir_all(format!("{root}/a/lock")).unwrap();
        fs::create_dir_all(format!("{root}/b/lock")).unwrap();
        fs::create_dir_all(format!("{root}/c")).unwrap();

        let dirs = dirs_of(&format!("{root}/a/lock/*.lock"));
        assert_eq!(dirs, [PathBuf::from(format!("{root}/a/lock"))]);

        let dirs = dirs_of(&format!("{root}/*/lock/*.lock"));
        let expected: Vec<PathBuf> = ["", "/a", "/a/lock", "/b", "/b/lock", "/c"]
            .iter()
            .map(|s| PathBuf::from(format!("{root}{s}")))
            .collect();
        assert_eq!(dirs, expected);

        // A directory that does not exist yet: watch its nearest existing ancestor.
        let dirs = dirs_of(&format!("{root}/missing/deeper/*.lock"));
        assert_eq!(dirs, [PathBuf::from(root)]);
    }

    #[test]
    fn double_star_never_goes_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("L");
        fs::create_dir_all(root.join("a/b")).unwrap();
        // Links back up the tree: followed, they would go round forever.
        std::os::unix::fs::symlink(".", root.join("self")).unwrap();
        std::os::unix::fs::symlink("..", root.join("a/up")).unwrap();
        let dirs = dirs_of(&format!("{}/**/*.lock", root.display()));
        let expected: Vec<PathBuf> = ["", "/a", "/a/b"]
            .iter()
            .map(|s| PathBuf::from(format!("{}{s}", root.display())))
            .collect();
        assert_eq!(dirs, expected);
    }

    #[test]
    fn a_walk_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..=MAX_DIRS {
            fs::create_dir(tmp.path().join(format!("d{i}"))).unwrap();
        }
        let far = Instant::now() + std::time::Duration::from_secs(60);
        let walk = walk(&format!("{}/**/*.lock", tmp.path().display()), far);
        assert!(walk.dirs.len() <= MAX_DIRS);
        assert!(walk.trouble.unwrap().contains("more than 4096 directories"));
        let few = tempfile::tempdir().unwrap();
        for i in 0..3 * DIRS_PER_CLOCK {
            fs::create_dir(few.path().join(format!("d{i}"))).unwrap();
        }
        let walk = walk_past(&format!("{}/*/**/*.lock", few.path().display()));
        assert!(walk.trouble.unwrap().contains("deadline"));
        // A small glob is looked at whole, even at the deadline.
        let walk = walk_past(&format!("{}/d1/*.lock", few.path().display()));
        assert_eq!(walk.trouble, None);
        // A wildcard part over a large directory stops part way through it.
        let wide = tempfile::tempdir().unwrap();
        for i in 0..2 * ENTRIES_PER_CLOCK {
            fs::write(wide.path().join(format!("f{i}")), "").unwrap();
        }
        let walk = walk_past(&format!("{}/*/x.lock", wide.path().display()));
        assert!(walk.trouble.unwrap().contains("deadline"));
    }

    fn walk_past(absolute: &str) -> Walk {
        walk(absolute, Instant::now())
    }

    #[test]
    fn events_update_the_set_without_rescans() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lock");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a.lock"), "").unwrap();
        fs::write(dir.join("other.txt"), "").unwrap();
        let mut wait = watching(glob(&format!("{}/*.lock", dir.display())));
        assert!(wait.inotify.is_some());
        assert_eq!(wait.in_flight(), 1);

        fs::write(dir.join("b.lock"), "").unwrap();
        fs::write(dir.join("c.txt"), "").unwrap();
        wait.on_ready(0);
        assert_eq!(wait.in_flight(), 2);

        fs::remove_file(dir.join("a.lock")).unwrap();
        fs::rename(dir.join("b.lock"), dir.join("b.done")).unwrap();
        wait.on_ready(0);
        assert_eq!(wait.in_flight(), 0);
    }

    #[test]
    fn in_flight_paths_are_named_in_path_order_across_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        for path in [
            "b/lock/a.lock",
            "a/lock/z.lock",
            "a/lock/y.lock",
            "a/lock/x.txt",
        ] {
            let path = tmp.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, "").unwrap();
        }
        let wait = watching(glob(&format!("{root}/*/lock/*.lock")));
        assert_eq!(wait.in_flight(), 3);
        let expected =
            ["a/lock/y.lock", "a/lock/z.lock", "b/lock/a.lock"].map(|p| format!("lock {root}/{p}"));
        for limit in 0..=4 {
            let mut named = Vec::new();
            wait.name_in_flight(&mut named, limit);
            assert_eq!(named, expected[..limit.min(3)]);
        }
        let matches: Vec<PathBuf> = wait.matches().into_iter().collect();
        assert_eq!(matches[0], tmp.path().join("a/lock/y.lock"));
        assert_eq!(matches.len(), 3);
    }

    #[test]
    fn a_released_wait_is_polled_and_still_sees_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lock");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a.lock"), "").unwrap();
        let mut wait = watching(glob(&format!("{}/*.lock", dir.display())));
        assert!(!wait.polled());
        wait.release();
        assert!(wait.polled());
        assert!(wait.inotify.is_none());
        fs::write(dir.join("b.lock"), "").unwrap();
        wait.refresh();
        assert_eq!(wait.in_flight(), 2);
        fs::remove_file(dir.join("a.lock")).unwrap();
        fs::remove_file(dir.join("b.lock")).unwrap();
        wait.refresh();
        assert_eq!(wait.in_flight(), 0);
        assert!(wait.inotify.is_none(), "a refresh does not watch again");
    }

    #[test]
    fn a_directory_created_later_is_picked_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x/y");
        let mut wait = watching(glob(&format!("{}/*.lock", dir.display())));
        assert_eq!(wait.in_flight(), 0);
        fs::create_dir_all(&dir).unwrap();
        wait.on_ready(0);
        fs::write(dir.join("job.lock"), "").unwrap();
        wait.on_ready(0);
        assert_eq!(wait.in_flight(), 1);
        let mut named = Vec::new();
        wait.name_in_flight(&mut named, 5);
        assert_eq!(named, [format!("lock {}/job.lock", dir.display())]);
    }
}
