//! Job lock files: the ones `prestop hold` creates, and how `--wait-lock` tells a lock file
//! whose job is gone (stale) from one whose job may still run.
//!
//! A `hold` lock is `DIR/NAME.PID.lock`, where PID is `hold`'s own, and reads:
//!
//! ```text
//! prestop-hold 1
//! pid=4242 start=81234
//! command=php artisan report:build
//! child=4243 start=81235
//! ```
//!
//! It is created under a hidden temporary name, locked with an exclusive `flock`, filled in,
//! and only then renamed to its lock name: no reader ever sees it unlocked or half written,
//! and a drain judges it from whole content the moment it appears. The lock's file
//! descriptor is inherited by COMMAND, so the lock is held for as
//! long as `hold`, COMMAND or anything COMMAND started and left it to keeps it open; the
//! kernel drops it when the last of them exits, however it exits (SIGKILL included). So a
//! `hold` lock that nobody has locked is stale, without any guess from PIDs.
//!
//! With `--lock-pid`, a lock file that holds just a PID (as many apps write one) is stale
//! once no process has that PID, or the process that has it started after the file was last
//! written: a PID reused since. Anything else (unreadable, another format, a PID file being
//! written) is held: what prestop cannot judge may still be in flight.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{FcntlArg, FdFlag, Flock, FlockArg, fcntl};
use nix::libc;

use crate::process::Pinned;
use crate::procfs::{self, ProcessId};

/// The first line of every `hold` lock, with the format's version.
pub const FIRST_LINE: &str = "prestop-hold 1";

/// The most of a lock file that is read: a `hold` lock or a PID is far shorter.
const MAX_READ: u64 = 4096;

/// How much later than its lock file's last write a PID's process may have started and
/// still count as the writer: clock ticks are 10 ms, and a wall clock can be stepped.
const REUSE_MARGIN: Duration = Duration::from_secs(1);

/// The kernel's clock ticks per second in `/proc` (`USER_HZ`), fixed on every architecture
/// prestop is built for.
const USER_HZ: u64 = 100;

/// A `hold` lock, created and locked; `remove` deletes it.
pub struct JobLock {
    path: PathBuf,
    file: Flock<File>,
}

impl JobLock {
    /// Creates and locks `DIR/NAME.PID.lock` for a job running `command`. A file left under
    /// that name by an earlier process with the same PID is replaced only if it is stale;
    /// otherwise the name gets a suffix (`NAME.PID-1.lock`).
    ///
    /// It is created under a hidden temporary name, locked, filled in, and only then
    /// renamed to its lock name: a drain never sees it unlocked, and judges it from whole
    /// content the moment it appears.
    pub fn create(dir: &Path, name: &str, command: &str) -> io::Result<JobLock> {
        let me = ProcessId::current();
        let start = procfs::stat(me)?.map_or(0, |s| s.start_time);
        let tmp = dir.join(format!(".{name}.{me}.tmp"));
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a killed process that had this PID.
                fs::remove_file(&tmp)?;
                open()?
            }
            other => other?,
        };
        let result = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::from(e))
            .and_then(|mut file| {
                // The one program `hold` starts, COMMAND, inherits the lock: it is held for as
                // long as the job runs, even should `hold` be killed. (The standard library
                // opens every file close-on-exec.)
                fcntl(&*file, FcntlArg::F_SETFD(FdFlag::empty()))?;
                let content = format!(
                    "{FIRST_LINE}\npid={me} start={start}\ncommand={}\n",
                    one_line(command)
                );
                file.write_all(content.as_bytes())?;
                let path = rename_unused(&tmp, dir, name, me)?;
                Ok(JobLock { path, file })
            });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records COMMAND's process, once it runs, for a drain to watch.
    pub fn add_child(&mut self, pid: ProcessId) -> io::Result<()> {
        let start = procfs::stat(pid)?.map_or(0, |s| s.start_time);
        // One write of one line: a reader sees all of it or none (it reads whole lines).
        self.file
            .write_all(format!("child={pid} start={start}\n").as_bytes())
    }

    /// Deletes the file. The lock itself goes with the last descriptor of it, which may
    /// outlive this process in what COMMAND left running.
    pub fn remove(self) -> io::Result<()> {
        fs::remove_file(&self.path)
    }
}

/// Renames `tmp` to the first free `NAME.PID[-N].lock` in `dir`, never over another file;
/// a stale file in the way is removed first.
fn rename_unused(tmp: &Path, dir: &Path, name: &str, me: ProcessId) -> io::Result<PathBuf> {
    for attempt in 0..16u32 {
        let file_name = match attempt {
            0 => format!("{name}.{me}.lock"),
            n => format!("{name}.{me}-{n}.lock"),
        };
        let path = dir.join(file_name);
        match rename_no_replace(tmp, &path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if matches!(judge(&path, false), Judgment::Stale(_)) {
                    let _ = fs::remove_file(&path);
                    if rename_no_replace(tmp, &path).is_ok() {
                        return Ok(path);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "every lock name for {name}.{me} in {} is taken",
        dir.display()
    )))
}

/// `rename`, failing with `AlreadyExists` rather than replacing `to`: `renameat2` with
/// `RENAME_NOREPLACE`, or, where the file system lacks it, a hard link and an unlink.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: renameat2 reads two NUL-terminated paths that live until it returns, and
    // writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

/// `text` on one line: a newline in a command would start a line of the lock's format. Cut
/// at `COMMAND_MAX` bytes, so that the whole lock stays far below what a drain reads of it.
fn one_line(text: &str) -> String {
    let mut line = String::new();
    for c in text.chars() {
        if line.len() + c.len_utf8() > COMMAND_MAX {
            line.push('…');
            break;
        }
        line.push(if c.is_control() { ' ' } else { c });
    }
    line
}

/// The most of a command line a lock file records.
const COMMAND_MAX: usize = 1024;

/// What a lock file says about its job.
#[derive(Debug)]
pub enum Judgment {
    /// Its job may still run (or prestop cannot tell). `watch`: the processes whose exit may
    /// change that; `relook`: whether only a later look can (a lock held by processes
    /// prestop does not know of).
    Held { watch: Vec<Pinned>, relook: bool },
    /// Provably abandoned, and why: `its holder pid 4242 is gone`.
    Stale(String),
}

impl Judgment {
    fn held() -> Judgment {
        Judgment::Held {
            watch: Vec::new(),
            relook: false,
        }
    }
}

/// Judges the lock file at `path`; `lock_pid`: a file holding just a PID names its holder.
pub fn judge(path: &Path, lock_pid: bool) -> Judgment {
    // Empty files (`touch`) and anything that is not a regular file are never read.
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Judgment::held();
    };
    if !meta.is_file() || meta.len() == 0 || meta.len() > MAX_READ {
        return Judgment::held();
    }
    let Ok(mut file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Judgment::held();
    };
    let mut bytes = Vec::new();
    if Read::by_ref(&mut file)
        .take(MAX_READ)
        .read_to_end(&mut bytes)
        .is_err()
    {
        return Judgment::held();
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Judgment::held();
    };
    if let Some(rest) = text
        .strip_prefix(FIRST_LINE)
        .and_then(|r| r.strip_prefix('\n'))
    {
        return judge_hold(file, rest);
    }
    if lock_pid {
        return judge_pid(text, &meta);
    }
    Judgment::held()
}

/// A `hold` lock: stale exactly when nobody holds its `flock`.
fn judge_hold(file: File, lines: &str) -> Judgment {
    // Only whole lines: a line being appended is not read half.
    let complete = &lines[..lines.rfind('\n').map_or(0, |i| i + 1)];
    let holders: Vec<(ProcessId, u64)> = complete
        .lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix("pid=")
                .or_else(|| line.strip_prefix("child="))?;
            let (pid, start) = rest.split_once(" start=")?;
            Some((ProcessId::parse(pid).ok()?, start.parse().ok()?))
        })
        .collect();
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Nobody holds it, but a process it names still runs (a job that closed the lock's
        // descriptor, then its `hold` killed): the job may be running.
        Ok(_) if holders.iter().any(|&(pid, start)| runs(pid, start)) => Judgment::Held {
            watch: pinned(&holders),
            relook: true,
        },
        // Taken, but the file was removed after it was opened: its job ended, as jobs do,
        // removing the file before letting go of the lock. Not stale: gone, which the
        // directory's events say; a later look confirms it.
        Ok(taken) if taken.metadata().is_ok_and(|m| m.nlink() == 0) => Judgment::Held {
            watch: Vec::new(),
            relook: true,
        },
        // Taken: nobody holds it. It is let go at once, with the file.
        Ok(_) => Judgment::Stale(match holders.first() {
            Some((pid, _)) if matches!(procfs::stat(*pid), Ok(Some(_))) => {
                format!("pid {pid} now names another process, and nothing holds its lock")
            }
            Some((pid, _)) => format!("its holder pid {pid} is gone, and nothing holds its lock"),
            None => "nothing holds its lock".into(),
        }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let watch = pinned(&holders);
            // Held, but by none of the processes it names: by what they started.
            let relook = watch.is_empty();
            Judgment::Held { watch, relook }
        }
        Err(_) => Judgment::held(),
    }
}

/// A lock file holding a PID (`--lock-pid`): stale once that process is gone, or its PID
/// names a process that started after the file was written.
fn judge_pid(text: &str, meta: &fs::Metadata) -> Judgment {
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Judgment::held();
    }
    let Ok(pid) = ProcessId::parse(digits) else {
        return Judgment::held();
    };
    match Pinned::pin(pid) {
        Ok(None) => Judgment::Stale(format!("its holder pid {pid} is gone")),
        Ok(Some(pinned)) => {
            let written = SystemTime::UNIX_EPOCH
                + Duration::new(meta.mtime().max(0) as u64, meta.mtime_nsec() as u32);
            match started_at(pinned.process.start_time) {
                Some(started) if started > written + REUSE_MARGIN => Judgment::Stale(format!(
                    "pid {pid} now names another process, started after the lock was written"
                )),
                _ => Judgment::Held {
                    watch: vec![pinned],
                    relook: false,
                },
            }
        }
        // It cannot be looked at (hidden, no fd left): it may be running.
        Err(_) => Judgment::held(),
    }
}

/// The processes a lock names that still run, pinned, for their exits to be watched.
fn pinned(holders: &[(ProcessId, u64)]) -> Vec<Pinned> {
    holders
        .iter()
        .filter_map(|&(pid, start)| {
            Pinned::pin(pid)
                .ok()
                .flatten()
                .filter(|p| p.process.start_time == start)
        })
        .collect()
}

/// Whether the process `pid` that started at `start` (clock ticks) still runs; if /proc
/// cannot say, it may.
fn runs(pid: ProcessId, started: u64) -> bool {
    match procfs::stat(pid) {
        Ok(Some(stat)) => stat.start_time == started && !stat.is_zombie(),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// When a process that started `ticks` after boot started, on the wall clock.
fn started_at(ticks: u64) -> Option<SystemTime> {
    use nix::time::{ClockId, clock_gettime};
    let since_boot = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let since_boot = Duration::new(since_boot.tv_sec() as u64, since_boot.tv_nsec() as u32);
    let boot = SystemTime::now().checked_sub(since_boot)?;
    boot.checked_add(Duration::from_millis(ticks * 1000 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stale(judgment: Judgment) -> String {
        match judgment {
            Judgment::Stale(why) => why,
            held @ Judgment::Held { .. } => panic!("{held:?}"),
        }
    }

    #[test]
    fn a_lock_is_held_while_locked_and_stale_once_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let lock = JobLock::create(dir.path(), "job", "sleep 1\nforged=line").unwrap();
        let path = lock.path().to_path_buf();
        assert!(
            path.to_string_lossy()
                .ends_with(&format!("job.{}.lock", std::process::id()))
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("prestop-hold 1\npid="), "{text}");
        assert!(text.contains("command=sleep 1 forged=line\n"), "{text}");
        assert!(matches!(judge(&path, false), Judgment::Held { .. }));
        // Let go without removing the file while the process it names runs, as a job that
        // closed the lock's descriptor does: that job may still be running.
        drop(lock.file);
        assert!(matches!(
            judge(&path, false),
            Judgment::Held { relook: true, .. }
        ));
        // Named processes gone (or their PIDs reused) as well: stale.
        let me = std::process::id();
        let text = fs::read_to_string(&path).unwrap();
        fs::write(
            &path,
            text.replace(&format!("pid={me} "), "pid=2147483647 "),
        )
        .unwrap();
        assert_eq!(
            stale(judge(&path, false)),
            "its holder pid 2147483647 is gone, and nothing holds its lock"
        );
        fs::write(&path, format!("{FIRST_LINE}\npid={me} start=1\n")).unwrap();
        assert_eq!(
            stale(judge(&path, false)),
            format!("pid {me} now names another process, and nothing holds its lock")
        );
        // A long command line is cut: the lock stays far below what a drain reads of one.
        let long = JobLock::create(dir.path(), "long", &"a".repeat(10_000)).unwrap();
        let size = fs::metadata(long.path()).unwrap().len();
        assert!(size < MAX_READ / 2, "{size} bytes");
        assert!(fs::read_to_string(long.path()).unwrap().contains("aaa…\n"));
        long.remove().unwrap();
        // The next job with the same name and PID replaces the stale file.
        let again = JobLock::create(dir.path(), "job", "true").unwrap();
        assert_eq!(again.path(), path);
        again.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn pid_locks_are_judged_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("mine.lock");
        fs::write(&mine, format!("{}\n", std::process::id())).unwrap();
        let dead = dir.path().join("dead.lock");
        fs::write(&dead, format!("{}\n", i32::MAX)).unwrap();
        let garbage = dir.path().join("garbage.lock");
        fs::write(&garbage, "locked by the nightly job\n").unwrap();
        assert!(matches!(judge(&mine, true), Judgment::Held { .. }));
        assert!(matches!(judge(&dead, false), Judgment::Held { .. }));
        assert!(stale(judge(&dead, true)).contains("is gone"));
        assert!(matches!(judge(&garbage, true), Judgment::Held { .. }));
        // Written before this process started: the PID has been reused since.
        let old = File::options().write(true).open(&mine).unwrap();
        old.set_modified(SystemTime::now() - Duration::from_secs(3 * 86_400 * 365))
            .unwrap();
        assert!(stale(judge(&mine, true)).contains("another process"));
    }
}
