//! The drain benchmark's plumbing: building the binary as it ships, running a hook as a whole
//! process, and summarising samples.
//!
//! A hook runs in its own process group, so that a shell loop and the `sleep` it is waiting
//! on can be ended together, and it is reaped with `wait4`, whose rusage carries the CPU time
//! of the hook *and* of every child it waited for (`ls`, `sleep`): that is what the hook
//! costs the container. Peak RSS is the hook process's own `VmHWM`, sampled while it runs.
//! Nothing here decides whether a figure is good.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

/// The target the binary ships for.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The binary whose figures are measured.
pub struct Binary {
    pub path: PathBuf,
    /// The static musl build; `false` when its target is not installed and the native build
    /// stands in for the timing figures.
    pub musl: bool,
    /// Why the musl build could not be made, if it could not.
    pub musl_error: Option<String>,
}

/// Builds prestop's release binary with cargo, as it ships: the static musl build if the
/// target is installed, else the native build (and the reason why).
pub fn build() -> Result<Binary, String> {
    eprintln!("building the release binary for {MUSL} ...");
    match cargo_build(Some(MUSL)) {
        Ok(path) => Ok(Binary {
            path,
            musl: true,
            musl_error: None,
        }),
        Err(why) => {
            eprintln!("cannot build for {MUSL} ({why}); timing the native release binary");
            let path = cargo_build(None)?;
            Ok(Binary {
                path,
                musl: false,
                musl_error: Some(why),
            })
        }
    }
}

fn cargo_build(target: Option<&str>) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        // --locked: the cargo that runs the benchmark has already settled Cargo.lock.
        .args(["build", "--release", "--locked", "--bin", "prestop"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null());
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The first error says why (a missing target: "can't find crate for `core`"); the
        // last only that the build failed.
        let first = stderr
            .lines()
            .find(|l| l.trim_start().starts_with("error"))
            .unwrap_or("cargo build failed");
        return Err(first.trim().to_owned());
    }
    // The artifact message for the binary names its path; paths here need no JSON unescaping.
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .ok_or_else(|| "cargo named no executable".to_owned())
}

/// Whether an ELF executable needs no dynamic loader (no `PT_INTERP` program header).
pub fn is_static(path: &Path) -> io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path)?;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a 64-bit ELF file");
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        return Err(bad());
    }
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize).ok_or_else(bad)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A program on `PATH`, resolved, with its size.
pub fn which(program: &str) -> Option<(PathBuf, u64)> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        let candidate = dir.join(program);
        let meta = fs::metadata(&candidate).ok()?;
        meta.is_file().then_some((candidate, meta.len()))
    })
}

/// How a hook ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// The exit code, or `None` if a signal ended it.
    pub code: Option<i32>,
    /// When the exit was seen (before reaping, which waits for the RSS sampler).
    pub at: Instant,
    /// User + system time of the hook and of every child it reaped, from `wait4`.
    pub cpu: Duration,
    /// The hook process's peak RSS (`VmHWM`), if it was sampled.
    pub peak_rss_kib: Option<u64>,
}

/// How often a sampled hook's `VmHWM` is read.
const RSS_SAMPLING: Duration = Duration::from_millis(50);

/// A hook running as a whole process in its own process group, stderr read line by line.
pub struct Hook {
    pid: Pid,
    /// When `spawn` was called: before the fork, so figures measured from it include the
    /// cost of starting the process.
    pub spawned: Instant,
    /// Each line of stderr with the moment it was read, from a reader thread (so a full pipe
    /// never blocks the hook, and a line's time does not depend on when it is looked at).
    lines: Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    sampler: Option<(Arc<AtomicBool>, JoinHandle<Option<u64>>)>,
    reaped: bool,
}

impl Hook {
    /// Starts `cmd` with stdin and stdout on /dev/null, stderr piped, no `PRESTOP_*`
    /// variables inherited, in a new process group.
    pub fn spawn(mut cmd: Command) -> Result<Hook, String> {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PRESTOP_") {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().display()))?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped with waitid and wait4 below, never through `Child`, which is
        // only a carrier for the pipe.
        let stderr = child.stderr.take().map(BufReader::new);
        let (send, lines) = mpsc::channel();
        if let Some(mut stderr) = stderr {
            thread::spawn(move || {
                let mut line = String::new();
                while matches!(stderr.read_line(&mut line), Ok(n) if n > 0) {
                    if send
                        .send((Instant::now(), std::mem::take(&mut line)))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        Ok(Hook {
            pid,
            spawned,
            lines,
            seen: Vec::new(),
            sampler: None,
            reaped: false,
        })
    }

    /// Reads the hook's peak RSS from `/proc/PID/status` until it exits. `wait4`'s
    /// `ru_maxrss` cannot serve: it also counts the pages of the benchmark itself, which the
    /// child shares until it calls exec.
    pub fn sample_rss(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = self.pid;
        let flag = Arc::clone(&stop);
        // `spawn` returns as soon as the child starts its exec, while it still has the
        // benchmark's memory: a sample counts only once the child bears its new name, which
        // exec gives it after switching to the new memory.
        let ours = fs::read_to_string("/proc/self/comm").unwrap_or_default();
        let sampler = thread::spawn(move || {
            let status = format!("/proc/{pid}/status");
            let mut peak = None;
            while !flag.load(Ordering::Relaxed) {
                // A zombie has no VmHWM line: the peak seen so far is final.
                let Some(text) = fs::read_to_string(&status).ok() else {
                    break;
                };
                let Some(hwm) = vm_hwm(&text) else {
                    break;
                };
                if name(&text) == Some(ours.trim_end()) {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                peak = peak.max(Some(hwm));
                thread::sleep(RSS_SAMPLING);
            }
            peak
        });
        self.sampler = Some((stop, sampler));
    }

    /// Waits for a line containing `marker` (any line if it is empty) and returns when it
    /// was read.
    pub fn wait_for_line(&mut self, marker: &str) -> Result<Instant, String> {
        loop {
            match self.lines.recv() {
                Ok((at, line)) => {
                    let found = line.contains(marker);
                    self.seen.push((at, line));
                    if found {
                        return Ok(at);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "exited before printing {marker:?}; output: {:?}",
                        self.output()
                    ));
                }
            }
        }
    }

    /// When the first line containing `marker` was read at or after `since`. Call it once
    /// the hook has exited: it reads on until the pipe closes (or a straggler holding it open
    /// has had a second), since the reader thread may not have caught up with the exit.
    pub fn line_at(&mut self, marker: &str, since: Instant) -> Option<Instant> {
        let found = |seen: &[(Instant, String)]| {
            seen.iter()
                .find(|(at, line)| *at >= since && line.contains(marker))
                .map(|(at, _)| *at)
        };
        while found(&self.seen).is_none() {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        found(&self.seen)
    }

    /// Everything the hook wrote so far, for an error message.
    pub fn output(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.iter().map(|(_, line)| line.as_str()).collect()
    }

    /// Blocks until the hook exits, then reaps it.
    pub fn wait(&mut self) -> Result<Exit, String> {
        // Seen without reaping first, so that the sampler can stop before the PID is free
        // to be reused.
        loop {
            match waitid(
                Id::Pid(self.pid),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("waitid: {e}")),
            }
        }
        let at = Instant::now();
        let peak_rss_kib = self.sampler.take().and_then(|(stop, sampler)| {
            stop.store(true, Ordering::Relaxed);
            sampler.join().ok().flatten()
        });
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of the plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = loop {
            // SAFETY: wait4 writes only the status and rusage we pass, both live locals.
            let r = unsafe { libc::wait4(self.pid.as_raw(), &raw mut status, 0, &raw mut usage) };
            if r >= 0 || Errno::last() != Errno::EINTR {
                break r;
            }
        };
        if reaped != self.pid.as_raw() {
            return Err(format!("wait4: {}", Errno::last()));
        }
        self.reaped = true;
        Ok(Exit {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            at,
            cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
            peak_rss_kib,
        })
    }

    /// The CPU time the hook process itself has used so far (not its children), to the
    /// nanosecond (`/proc/PID/schedstat`).
    #[allow(
        dead_code,
        reason = "each bench compiles this module; only `conns` reads CPU mid-run"
    )]
    pub fn cpu_so_far(&self) -> Option<Duration> {
        let text = fs::read_to_string(format!("/proc/{}/schedstat", self.pid)).ok()?;
        let nanos = text.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(nanos))
    }

    /// Ends the hook's whole process group (a shell loop and its `sleep`) with SIGKILL.
    pub fn kill_group(&self) {
        if !self.reaped {
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
    }

    /// Waits for an exit with the expected code; anything else is an error naming the output.
    pub fn expect_exit(&mut self, expected: i32) -> Result<Exit, String> {
        let exit = self.wait()?;
        if exit.code == Some(expected) {
            Ok(exit)
        } else {
            Err(format!(
                "exited with {:?}, expected {expected}; output: {:?}",
                exit.code,
                self.output()
            ))
        }
    }
}

impl Drop for Hook {
    /// A failed measurement leaves nothing running.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.wait();
        }
    }
}

fn name(status: &str) -> Option<&str> {
    let line = status.lines().find(|l| l.starts_with("Name:"))?;
    Some(line["Name:".len()..].trim())
}

fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// A process for a hook to wait on, killed and reaped by the benchmark at a chosen moment.
pub struct Victim {
    pid: Pid,
    reaped: bool,
}

impl Victim {
    pub fn spawn() -> Result<Victim, String> {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start sleep: {e}"))?;
        Ok(Victim {
            pid: Pid::from_raw(child.id() as i32),
            reaped: false,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Kills the process and returns the moment its exit was seen, which is also when it is
    /// reaped (so that `kill -0` in a shell loop sees it gone, as it would once its parent
    /// reaps it in a container).
    pub fn kill(&mut self) -> Result<Instant, String> {
        kill(self.pid, Signal::SIGKILL).map_err(|e| format!("cannot kill the victim: {e}"))?;
        loop {
            match nix::sys::wait::waitpid(self.pid, None) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("cannot reap the victim: {e}")),
            }
        }
        self.reaped = true;
        Ok(Instant::now())
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
        }
    }
}

/// A small deterministic generator, so that delays vary from run to run without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        low + high.saturating_sub(low).mul_f64(self.unit())
    }
}

/// Median and worst of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary<T> {
    pub median: T,
    pub worst: T,
    pub runs: usize,
}

impl<T: Copy + Ord> Summary<T> {
    pub fn of(samples: &[T]) -> Option<Summary<T>> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        // The upper median: with an even count, the larger of the middle two.
        Some(Summary {
            median: *sorted.get(sorted.len() / 2)?,
            worst: *sorted.last()?,
            runs: sorted.len(),
        })
    }
}

/// A duration as a table shows it: three significant figures at most.
pub struct Time(pub Duration);

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1000.0;
        if ms < 1.0 {
            write!(f, "{ms:.2} ms")
        } else if ms < 100.0 {
            write!(f, "{ms:.1} ms")
        } else if ms < 1000.0 {
            write!(f, "{ms:.0} ms")
        } else {
            write!(f, "{:.1} s", ms / 1000.0)
        }
    }
}

/// A size in bytes as a table shows it.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = self.0 as f64 / 1024.0;
        if kib < 1024.0 {
            write!(f, "{kib:.0} KiB")
        } else {
            write!(f, "{:.2} MiB", kib / 1024.0)
        }
    }
}
