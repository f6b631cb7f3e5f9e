//! Shared test scaffolding: a fresh directory per test, the real binary, real child processes
//! that are always cleaned up.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: `PRESTOP_TEST_BIN` if set (for instance a cross-built binary run
/// under `PRESTOP_TEST_RUNNER=qemu-aarch64-static`), else the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("PRESTOP_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_prestop")),
        PathBuf::from,
    )
}

/// A `Command` for the binary under test, with no `PRESTOP_*` variables inherited.
pub fn prestop_command() -> Command {
    command_for(&bin())
}

/// A `Command` for `program` as the binary under test (a copy or link of it), run through
/// `PRESTOP_TEST_RUNNER` if set, with no `PRESTOP_*` variables inherited.
pub fn command_for(program: &Path) -> Command {
    let mut cmd = match std::env::var_os("PRESTOP_TEST_RUNNER") {
        Some(runner) => {
            let mut c = Command::new(runner);
            c.arg(program);
            c
        }
        None => Command::new(program),
    };
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PRESTOP_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A fresh temporary directory per test, with its own state directory.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("prestop-test")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// `prestop ARGS`, with a per-test state dir and the log on stderr (unless the test says
    /// otherwise), run from inside the test directory.
    pub fn prestop<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.prestop_as(&bin(), args)
    }

    /// `prestop ARGS` as `TestEnv::prestop`, run from `program` (a copy or link of it).
    pub fn prestop_as<I, S>(&self, program: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = command_for(program);
        cmd.current_dir(self.dir.path());
        cmd.env("PRESTOP_STATE_DIR", self.state_dir());
        cmd.env("PRESTOP_LOG_TARGET", "stderr");
        cmd.args(args);
        cmd
    }

    pub fn touch(&self, rel: &str) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "").unwrap();
        path
    }
}

/// Kills (and reaps) a child and everything it started when dropped, so a failing test
/// leaves nothing running: the child leads a process group of its own, and the whole group
/// gets SIGKILL.
pub struct Guard(Option<Child>);

impl Guard {
    pub fn spawn(cmd: &mut Command) -> Guard {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        Guard(Some(cmd.spawn().expect("spawn")))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("a guard holds its child until dropped")
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("a guard holds its child").id()
    }

    /// Sends `signal` to the child (as Ctrl-C or a supervisor would).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits for the child to exit by itself and collects its output.
    pub fn wait_output(mut self) -> Output {
        let child = self.0.take().expect("a guard holds its child");
        child.wait_with_output().unwrap()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real process that prints `ready`, then one line per signal it receives (`TSTP`, `USR1`,
/// `TERM` ...), and keeps running until killed (or until TERM, if `exit_on_term`).
pub struct SignalEcho {
    pub guard: Guard,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl SignalEcho {
    pub fn start(exit_on_term: bool) -> SignalEcho {
        Self::start_named("bash", exit_on_term)
    }

    /// Starts the echo with argv[0] set to `name`, so `name:` targets can find it.
    pub fn start_named(name: &str, exit_on_term: bool) -> SignalEcho {
        let on_term = if exit_on_term {
            "echo TERM; exit 0"
        } else {
            "echo TERM"
        };
        let script = format!(
            "trap 'echo TSTP' TSTP; trap 'echo USR1' USR1; trap 'echo USR2' USR2; \
             trap '{on_term}' TERM; echo ready; \
             while :; do sleep 30 & wait $!; done"
        );
        let mut cmd = Command::new("bash");
        std::os::unix::process::CommandExt::arg0(&mut cmd, name);
        cmd.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut guard = Guard::spawn(&mut cmd);
        let stdout = guard.child().stdout.take().unwrap();
        let lines = lines_of(stdout);
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("echo never got ready");
        assert_eq!(first, "ready");
        SignalEcho { guard, lines }
    }

    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Every line received within `window`.
    pub fn collect(&self, window: Duration) -> Vec<String> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => got.push(line),
                Err(_) => break,
            }
        }
        got
    }
}

pub fn lines_of(stream: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A prestop process whose log (stderr) is read line by line as it comes, so that a test can
/// wait for a line (`ready`, "draining, budget") instead of sleeping.
pub struct Running {
    pub guard: Guard,
    log: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    /// The log lines seen so far.
    pub seen: Vec<String>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut guard = Guard::spawn(cmd);
        let log = lines_of(guard.child().stderr.take().unwrap());
        let mut out = guard.child().stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        Running {
            guard,
            log,
            stdout,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 10 s) for a log line containing `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = end.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("no {needle:?} in the log ({e}):\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the process to exit: its exit code, stdout and whole log.
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let status = self.guard.child().wait().unwrap();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stdout = self.stdout.join().unwrap();
        let mut log = self.seen.join("\n");
        log.push('\n');
        (status.code(), stdout, log)
    }
}

/// Asserts that each of `needles` is in `hay`, in that order: the steps of a log.
pub fn assert_in_order(hay: &str, needles: &[&str]) {
    let positions: Vec<usize> = needles
        .iter()
        .map(|n| {
            hay.find(n)
                .unwrap_or_else(|| panic!("{n:?} missing from:\n{hay}"))
        })
        .collect();
    assert!(positions.is_sorted(), "out of order {needles:?}:\n{hay}");
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs to completion and reports how long it took.
pub fn timed(mut cmd: Command) -> (Output, Duration) {
    let start = Instant::now();
    let out = cmd.output().expect("run prestop");
    (out, start.elapsed())
}

/// Whether this test process may create namespaces (root on Linux); CI must be able to.
pub fn can_unshare() -> bool {
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but namespaces are unavailable (needs root and unshare): cannot run"
    );
    ok
}

pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Runs `cmd` with at most `limit` file descriptors (`ulimit -n`), soft and hard.
pub fn with_fd_limit(cmd: &mut Command, limit: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; setrlimit is async-signal-safe, and
    // the limit struct lives on the stack.
    unsafe {
        cmd.pre_exec(move || {
            let limit = nix::libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
