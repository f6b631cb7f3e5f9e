//! At-least-once delivery: invocations of the same hook during one termination meet here.
//!
//! The kubelet may run a preStop hook again (after a restart of its own) while the first run
//! is still going. The first invocation becomes the leader: it records the termination's start
//! in `--state-dir` and runs the stop actions while holding an exclusive `flock`. Any later
//! invocation of the same hook (same fingerprint) during the same termination takes the lock
//! after the leader has finished its stop actions, reads the record, skips the stop actions,
//! keeps the first start (so the first deadline) and waits for the same drain. If a leader
//! died half-way through its stop actions, the lock is free but the record still says
//! "pending", and the next invocation runs them.
//!
//! A record belongs to the same termination only if it was written during this boot, for
//! the same PID 1 (same start time), and that termination's grace period (plus the kubelet's
//! 2 s) has not run out. Files here are opened with `O_NOFOLLOW`, and the directory must be
//! ours and not a symlink: `/tmp` is shared, and a planted link must not redirect our writes.
//! When the directory cannot be used, prestop warns and runs uncoordinated.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::libc;

use nix::sys::signal::Signal;

use crate::budget::{Budget, instant_at, nanos_at};
use crate::config::BudgetConfig;
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::interrupt::Interrupts;
use crate::process::describe_io;
use crate::procfs::{self, ProcessId};
use crate::report::{Record, Reporter};

/// How often a waiting invocation retries the lock; the leader holds it only for its stop
/// actions, so this is rarely more than a few rounds. (flock has no fd to wait on, and a
/// blocking flock could not be interrupted or bounded.)
const LOCK_RETRY: Duration = Duration::from_millis(5);

const VERSION: &str = "1";

/// What this invocation does in the termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// First invocation: runs the stop actions.
    Leader,
    /// A previous invocation died before finishing the stop actions: run them again.
    TakeOver { previous: u32 },
    /// Another invocation ran the stop actions (or, if not `actions_done`, is still running
    /// them at the deadline): only wait.
    Follower { leader: u32, actions_done: bool },
    /// The state directory could not be used: behave as a first invocation.
    Uncoordinated,
}

impl Role {
    pub fn runs_stop_actions(self) -> bool {
        !matches!(self, Role::Follower { .. })
    }
}

pub struct Session {
    /// The first invocation's start: every deadline derives from it.
    pub start: Instant,
    pub role: Role,
    lock: Option<Flock<File>>,
    record: Option<(PathBuf, Termination)>,
    /// The stop actions that failed in the invocation that ran them, for a follower: its
    /// outcome is theirs too (a second delivery must not turn exit 3 into 0).
    pub earlier_failures: Vec<String>,
}

impl Session {
    /// Joins the termination recorded in `dir`, or begins one at `now`. `Err(signal)` if
    /// one of `interrupts` came while it waited for another invocation's lock.
    pub fn join(
        dir: &Path,
        fingerprint: u64,
        budget: &BudgetConfig,
        now: Instant,
        report: &Reporter,
        interrupts: Option<&Interrupts>,
    ) -> Result<Session, Signal> {
        match Session::try_join(dir, fingerprint, budget, now, report, interrupts) {
            Ok(session) => Ok(session),
            Err(Joined::Interrupted(signal)) => Err(signal),
            Err(Joined::Unusable(e)) => {
                report.emit(&Record::warn(
                    "uncoordinated",
                    format!(
                        "state dir {} unusable ({}); running uncoordinated",
                        dir.display(),
                        describe_io(&e)
                    ),
                ));
                Ok(Session::uncoordinated(now))
            }
        }
    }

    pub fn uncoordinated(now: Instant) -> Session {
        Session {
            earlier_failures: Vec::new(),
            start: now,
            role: Role::Uncoordinated,
            lock: None,
            record: None,
        }
    }

    fn try_join(
        dir: &Path,
        fingerprint: u64,
        budget: &BudgetConfig,
        now: Instant,
        report: &Reporter,
        interrupts: Option<&Interrupts>,
    ) -> Result<Session, Joined> {
        ensure_private_dir(dir)?;
        let name = format!("drain-{fingerprint:016x}");
        let lock_path = dir.join(format!("{name}.lock"));
        let state_path = dir.join(format!("{name}.state"));
        let lock_file = open_no_follow(
            &lock_path,
            OpenOptions::new().read(true).write(true).create(true),
        )?;

        let current = Termination::current_context();
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Some(lock),
            Err((file, _)) => {
                // Wait no longer than the termination's own deadline, when there is a record
                // of it, and this invocation's otherwise.
                let running = read_record(&state_path)
                    .ok()
                    .flatten()
                    .filter(|r| r.same_termination(&current));
                let give_up_at = Budget::new(
                    *budget,
                    running.as_ref().map_or(now, |r| instant_at(r.start)),
                )
                .deadline;
                let holder = running.map_or(0, |r| r.leader);
                report.emit(&Record::info(
                    "coordinate",
                    format!(
                        "another invocation (pid {holder}) is running the stop actions; \
                         waiting for it"
                    ),
                ));
                lock_until(file, give_up_at, interrupts).map_err(Joined::Interrupted)?
            }
        };

        let previous = read_record(&state_path)?.filter(|r| r.same_termination(&current));
        let (start, role) = match (&previous, &lock) {
            (Some(r), _) if r.actions_done => (
                instant_at(r.start),
                Role::Follower {
                    leader: r.leader,
                    actions_done: true,
                },
            ),
            (Some(r), Some(_)) => (instant_at(r.start), Role::TakeOver { previous: r.leader }),
            // Timed out waiting for a leader that is still busy: follow it.
            (Some(r), None) => (
                instant_at(r.start),
                Role::Follower {
                    leader: r.leader,
                    actions_done: false,
                },
            ),
            (None, _) => (now, Role::Leader),
        };
        let record = Termination {
            start: nanos_at(start),
            end: nanos_at(Budget::new(*budget, start).termination_end()),
            leader: ProcessId::current().get(),
            actions_done: false,
            failures: Vec::new(),
            ..current
        };
        let earlier_failures = match (&previous, role) {
            (Some(r), Role::Follower { .. }) => r.failures.clone(),
            _ => Vec::new(),
        };
        let mut session = Session {
            earlier_failures,
            start,
            role,
            lock,
            record: None,
        };
        if role.runs_stop_actions() {
            if session.lock.is_none() {
                return Err(io::Error::other("timed out waiting for the lock").into());
            }
            write_record(&state_path, &record)?;
            session.record = Some((state_path, record));
        } else {
            session.lock = None;
        }
        Ok(session)
    }

    /// Lets later invocations in without marking the stop actions done, so the next one
    /// runs them.
    pub fn abandon_stop_actions(&mut self) {
        self.record = None;
        self.lock = None;
    }

    /// Marks the stop actions done, with those that failed, so later invocations skip them
    /// (and report the failures as their own), and lets them in.
    pub fn finish_stop_actions(&mut self, failures: &[String]) -> io::Result<()> {
        let result = match &mut self.record {
            Some((path, record)) => {
                record.actions_done = true;
                record.failures = failures.to_vec();
                write_record(path, record)
            }
            None => Ok(()),
        };
        self.lock = None;
        result
    }
}

/// A drain recorded in a state directory whose termination is not over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    /// The first invocation's PID.
    pub leader: u32,
    /// How long ago it began.
    pub ago: Duration,
}

/// The drain under way in `dir`, if one is: a record of this boot whose termination (grace
/// period and the kubelet's 2 s) is not over. Whatever PID 1 it names: a job in a PID
/// namespace of its own sees another PID 1, and a record of an earlier container's drain
/// ends with its grace period anyway. No directory: no drain has begun. A directory a drain
/// could not use (a symlink, dangling or not, another user's) is an error: a drain would run
/// uncoordinated, and never say here that it began.
pub fn drain_begun(dir: &Path) -> io::Result<Option<Begun>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match fs::symlink_metadata(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
                Ok(_) => Err(io::Error::other("a symlink to nothing")),
            };
        }
        Err(e) => return Err(e),
    };
    ensure_private_dir(dir)?;
    // What makes a record this termination's is read only if there is a record.
    let mut current = None;
    let now = crate::budget::monotonic_nanos();
    let mut begun: Option<Begun> = None;
    for entry in entries {
        let path = entry?.path();
        let is_record = path.extension().is_some_and(|e| e == "state")
            && path
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"drain-"));
        if !is_record {
            continue;
        }
        let Some(record) = read_record(&path)? else {
            continue;
        };
        let boot = current.get_or_insert_with(crate::procfs::boot_id);
        if record.boot == *boot && now < record.end {
            let ago = Duration::from_nanos(now.saturating_sub(record.start));
            if begun.is_none_or(|b| ago > b.ago) {
                begun = Some(Begun {
                    leader: record.leader,
                    ago,
                });
            }
        }
    }
    Ok(begun)
}

/// Why a session could not be joined.
enum Joined {
    /// The state directory or its files cannot be used: run uncoordinated.
    Unusable(io::Error),
    /// Interrupted while waiting for another invocation's lock.
    Interrupted(Signal),
}

impl From<io::Error> for Joined {
    fn from(e: io::Error) -> Joined {
        Joined::Unusable(e)
    }
}

/// Retries the lock until it is ours (`Some`) or `give_up_at` passes (`None`); an interrupt
/// ends the wait at once.
fn lock_until(
    file: File,
    give_up_at: Instant,
    interrupts: Option<&Interrupts>,
) -> Result<Option<Flock<File>>, Signal> {
    struct Retry {
        file: Option<File>,
        give_up_at: Instant,
        lock: Option<Flock<File>>,
    }
    impl Machine for Retry {
        type Source = ();
        type Output = ();
        fn tick(&mut self, now: Instant) -> Step<()> {
            if let Some(file) = self.file.take() {
                match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(lock) => {
                        self.lock = Some(lock);
                        return Step::Done(());
                    }
                    Err((file, _)) => self.file = Some(file),
                }
            }
            if now >= self.give_up_at {
                return Step::Done(());
            }
            Step::Sleep(Wake::at((now + LOCK_RETRY).min(self.give_up_at)))
        }
        fn watch(&self, _: &mut Watch<()>) {}
        fn ready(&mut self, (): ()) {}
    }
    let mut retry = Retry {
        file: Some(file),
        give_up_at,
        lock: None,
    };
    event::run(&mut retry, interrupts)?;
    Ok(retry.lock)
}

/// The record of one termination, as kept in the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Termination {
    boot: String,
    init_start: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the first invocation's start.
    start: u64,
    /// When this termination is over for sure (grace + the kubelet's 2 s).
    end: u64,
    leader: u32,
    actions_done: bool,
    /// The stop actions that failed, one line each.
    failures: Vec<String>,
}

impl Termination {
    fn current_context() -> Termination {
        Termination {
            boot: procfs::boot_id(),
            init_start: procfs::stat(ProcessId::INIT)
                .ok()
                .flatten()
                .map_or(0, |s| s.start_time),
            start: 0,
            end: 0,
            leader: 0,
            actions_done: false,
            failures: Vec::new(),
        }
    }

    fn same_termination(&self, current: &Termination) -> bool {
        self.boot == current.boot
            && self.init_start == current.init_start
            && crate::budget::monotonic_nanos() < self.end
    }

    fn render(&self) -> String {
        let mut text = format!(
            "version={VERSION}\nboot={}\ninit_start={}\nstart={}\nend={}\nleader={}\nactions={}\n",
            self.boot,
            self.init_start,
            self.start,
            self.end,
            self.leader,
            if self.actions_done { "done" } else { "pending" }
        );
        for failure in &self.failures {
            text.push_str("failed=");
            text.extend(
                failure
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c }),
            );
            text.push('\n');
        }
        text
    }

    fn parse(text: &str) -> Option<Termination> {
        let mut record = Termination {
            boot: String::new(),
            init_start: 0,
            start: 0,
            end: 0,
            leader: 0,
            actions_done: false,
            failures: Vec::new(),
        };
        let mut version_ok = false;
        for line in text.lines() {
            let (key, value) = line.split_once('=')?;
            match key {
                "version" => version_ok = value == VERSION,
                "boot" => value.clone_into(&mut record.boot),
                "init_start" => record.init_start = value.parse().ok()?,
                "start" => record.start = value.parse().ok()?,
                "end" => record.end = value.parse().ok()?,
                "leader" => record.leader = value.parse().ok()?,
                "actions" => record.actions_done = value == "done",
                "failed" => record.failures.push(value.to_owned()),
                _ => {}
            }
        }
        version_ok.then_some(record)
    }
}

/// Opens a file of the state directory: never through a symlink, never blocking (a FIFO
/// planted under its name would otherwise hang the open), and only if it is a regular file.
fn open_no_follow(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// `None` if there is no record, or it cannot be understood (garbage, or not a regular file):
/// whoever holds the lock then writes a new one over it.
fn read_record(path: &Path) -> io::Result<Option<Termination>> {
    let mut file = match open_no_follow(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // A symlink (ELOOP) or anything else in the record's place is no record; it is
        // replaced, never followed or read.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.kind() == io::ErrorKind::Other => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    Read::by_ref(&mut file).take(4096).read_to_end(&mut bytes)?;
    Ok(std::str::from_utf8(&bytes)
        .ok()
        .and_then(Termination::parse))
}

/// Writes a whole record atomically: to a temporary file, then renamed over the old one, so
/// a reader without the lock never sees half a record.
fn write_record(path: &Path, record: &Termination) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = open_no_follow(&tmp, OpenOptions::new().write(true).create_new(true))?;
    file.write_all(record.render().as_bytes())?;
    drop(file);
    fs::rename(&tmp, path)
}

/// Creates the directory (mode 0700) if needed, and refuses one that is a symlink or
/// belongs to another user.
fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(
            "not a directory (a symlink is not accepted)",
        ));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by us",
            meta.uid()
        )));
    }
    // Another user who can write here could plant a record that skips our stop actions.
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let record = Termination {
            boot: "b0".into(),
            init_start: 7,
            start: 100,
            end: 200,
            leader: 42,
            actions_done: true,
            failures: vec![
                "exec false: exit status 1".into(),
                "GET http://x/: 503".into(),
            ],
        };
        assert_eq!(Termination::parse(&record.render()), Some(record));
        assert_eq!(Termination::parse("version=0\nstart=1\n"), None);
        assert_eq!(Termination::parse("garbage"), None);
    }

    #[test]
    fn symlinked_state_files_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::write(&target, "version=1\nstart=1\nactions=done\n").unwrap();
        let link = tmp.path().join("x.state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_record(&link).unwrap(), None, "read through a symlink");
        assert!(open_no_follow(&link, OpenOptions::new().read(true)).is_err());
    }

    #[test]
    fn a_fifo_or_garbage_is_no_record_and_never_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("x.state");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_record(&fifo).unwrap(), None);
        assert!(open_no_follow(&fifo, OpenOptions::new().read(true).write(true)).is_err());
        let garbage = tmp.path().join("y.state");
        fs::write(&garbage, [0xff, 0xfe, 0, 1, 2]).unwrap();
        assert_eq!(read_record(&garbage).unwrap(), None);
    }
}
