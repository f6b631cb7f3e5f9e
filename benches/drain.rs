//! `cargo bench --bench drain`: prestop's release binary, run as a whole process, side by side
//! with the hooks it replaces — a shell loop that looks every 10 s (`ls -A lock/*.lock`, then
//! `sleep 10`), a loop that polls every second, and a fixed `sleep` — printed as one markdown
//! table of median / worst figures, followed by prestop's goals and whether each was met.
//!
//! This file owns what is measured and how runs are scheduled; `support` owns processes and
//! arithmetic. prestop's millisecond figures come first, one run at a time on a quiet
//! machine. The shell loops are slow by design, so they are measured with few runs whose
//! timing is spread evenly over their polling period (so median and worst describe the whole
//! period, not a lucky phase), all at once, together with every long wait and prestop's
//! 10,000-file case: they are asleep nearly all the time. The loops' own 10,000-file case
//! uses real CPU, so it runs last, when nothing else is timed. The benchmark reports
//! goals; it never fails because of a number, only because a hook misbehaved (wrong exit
//! code, no output, prestop saying "drained" too early), and it never leaves a figure out
//! without saying why in its cell.
//!
//! `cargo bench --bench drain -- --quick` (or `PRESTOP_BENCH_QUICK=1`) runs fewer, shorter
//! rounds for CI: under a minute once the binary is built. `-- --verbose` prints every run's
//! figures as they come.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use support::{Binary, Bytes, Exit, Hook, Rng, Summary, Time, Victim};

/// The 10,000-file case: how many lock files, and over how long they are removed.
const SCALE_FILES: usize = 10_000;
const SCALE_SPAN: Duration = Duration::from_secs(5);

/// Budget of the runs that only check the deadline.
const DEADLINE_SPAN: Duration = Duration::from_secs(2);

/// The line every hook prints once it is watching (prestop: "waiting for lock ...").
const READY: &str = "waiting for";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Prestop,
    Loop10,
    Loop1,
    Sleep,
}

const EVERYONE: [Who; 4] = [Who::Prestop, Who::Loop10, Who::Loop1, Who::Sleep];

impl Who {
    fn period(self) -> Duration {
        match self {
            Who::Loop10 => Duration::from_secs(10),
            _ => Duration::from_secs(1),
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Who::Prestop => "prestop",
            Who::Loop10 => "shell loop, 10 s",
            Who::Loop1 => "polling loop, 1 s",
            Who::Sleep => "fixed `sleep`",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    LockDetect,
    LockLogged,
    PidDetect,
    Cpu20,
    Cpu60,
    Rss,
    Startup,
    ScaleCpu,
    ScaleLatency,
    ScaleRss,
    Deadline,
    /// The CPU time of a 2 s wait (the deadline runs): start-up, exit and 2 s of waiting.
    /// No table row; it separates what waiting costs from what starting and ending do.
    ShortWaitCpu,
    /// How late a 1 ms sleep of the benchmark's own wakes up: the machine's share of every
    /// latency above. No table row; printed under the table.
    TimerLateness,
}

const ROWS: [Figure; 11] = [
    Figure::LockDetect,
    Figure::LockLogged,
    Figure::PidDetect,
    Figure::Cpu20,
    Figure::Cpu60,
    Figure::Rss,
    Figure::Startup,
    Figure::ScaleCpu,
    Figure::ScaleLatency,
    Figure::ScaleRss,
    Figure::Deadline,
];

impl Figure {
    fn name(self) -> &'static str {
        match self {
            Figure::LockDetect => "drain detection: last lock removed → hook exited",
            Figure::LockLogged => "last lock removed → “drained” logged",
            Figure::PidDetect => "process-exit detection: process killed → hook exited",
            Figure::Cpu20 => "CPU time while waiting 20 s",
            Figure::Cpu60 => "CPU time while waiting 60 s",
            Figure::Rss => "peak RSS while waiting",
            Figure::Startup => "start-up to first log line",
            Figure::ScaleCpu => "10,000 locks removed over 5 s: total CPU",
            Figure::ScaleLatency => "10,000 locks: last removed → hook exited",
            Figure::ScaleRss => "10,000 locks: peak RSS",
            Figure::Deadline => "deadline kept: exit − deadline",
            Figure::ShortWaitCpu => "CPU time while waiting 2 s",
            Figure::TimerLateness => "lateness of a 1 ms sleep",
        }
    }

    fn in_bytes(self) -> bool {
        matches!(self, Figure::Rss | Figure::ScaleRss)
    }

    /// What a cell says where the figure means nothing for that hook.
    fn not_applicable(self, who: Who) -> Option<&'static str> {
        match (self, who) {
            (Figure::LockDetect | Figure::LockLogged | Figure::PidDetect, Who::Sleep) => {
                Some("— none: exits at its fixed time, drained or not")
            }
            (Figure::Startup, Who::Sleep) => Some("— prints nothing"),
            (Figure::ScaleCpu | Figure::ScaleLatency | Figure::ScaleRss, Who::Sleep) => {
                Some("— does not look")
            }
            (Figure::Deadline, Who::Loop10 | Who::Loop1 | Who::Sleep) => {
                Some("— none: runs until killed")
            }
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Value {
    Time(Duration),
    Kib(u64),
}

/// How many runs of each kind: enough for a stable median and a meaningful worst on a noisy
/// machine, few where a run costs seconds of sleeping. Odd counts, so a median is a run.
struct Plan {
    quick: bool,
    detect_prestop: usize,
    detect_loop10: usize,
    detect_loop1: usize,
    startup_prestop: usize,
    startup_loop: usize,
    wait_prestop: usize,
    wait_peer: usize,
    deadline: usize,
    scale_prestop: usize,
    scale_peer: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                detect_prestop: 21,
                detect_loop10: 3,
                detect_loop1: 3,
                startup_prestop: 21,
                startup_loop: 5,
                wait_prestop: 3,
                wait_peer: 1,
                deadline: 3,
                scale_prestop: 1,
                scale_peer: 1,
            }
        } else {
            Plan {
                quick,
                detect_prestop: 201,
                detect_loop10: 5,
                detect_loop1: 9,
                startup_prestop: 101,
                startup_loop: 21,
                wait_prestop: 3,
                wait_peer: 3,
                deadline: 11,
                scale_prestop: 5,
                scale_peer: 3,
            }
        }
    }

    /// The waiting spans measured; the 60 s one only in a full run.
    fn spans(&self) -> Vec<(Figure, Duration)> {
        let mut spans = vec![(Figure::Cpu20, Duration::from_secs(20))];
        if !self.quick {
            spans.push((Figure::Cpu60, Duration::from_secs(60)));
        }
        spans
    }
}

/// What one run found.
enum Found {
    Values(Vec<(Figure, Value)>),
    /// The hook exited as if drained with `left` locks still there, so it has no `figure`
    /// (a latency); `values` holds what it did measure.
    Early {
        figure: Figure,
        left: usize,
        values: Vec<(Figure, Value)>,
    },
}

type Key = (Figure, Who);

/// Everything measured so far, filled in from many threads.
#[derive(Default)]
struct Board {
    samples: Mutex<BTreeMap<Key, Vec<Value>>>,
    /// Runs in which a hook said "drained" while locks were left: how many were left.
    early: Mutex<BTreeMap<Key, Vec<usize>>>,
    errors: Mutex<Vec<(Figure, Who, String)>>,
    /// Print every run's figures as they come (`--verbose`), to look into outliers.
    verbose: bool,
}

/// A lock whose holder panicked still holds good figures: a panic is reported anyway.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Board {
    /// Records the outcome of one run of `figure`.
    fn record(&self, figure: Figure, who: Who, run: Result<Found, String>) {
        let values = match run {
            Ok(Found::Values(values)) => values,
            Ok(Found::Early {
                figure,
                left,
                values,
            }) => {
                lock(&self.early)
                    .entry((figure, who))
                    .or_default()
                    .push(left);
                values
            }
            Err(error) => {
                eprintln!("error: {} ({}): {error}", figure.name(), who.heading());
                lock(&self.errors).push((figure, who, error));
                return;
            }
        };
        if self.verbose {
            eprintln!("{} ({}): {values:?}", figure.name(), who.heading());
        }
        let mut samples = lock(&self.samples);
        for (f, v) in values {
            samples.entry((f, who)).or_default().push(v);
        }
    }

    fn times(&self, figure: Figure, who: Who) -> Vec<Duration> {
        let samples = lock(&self.samples);
        let values = samples.get(&(figure, who)).into_iter().flatten();
        values
            .filter_map(|v| match v {
                Value::Time(t) => Some(*t),
                Value::Kib(_) => None,
            })
            .collect()
    }

    fn kibs(&self, figure: Figure, who: Who) -> Vec<u64> {
        let samples = lock(&self.samples);
        let values = samples.get(&(figure, who)).into_iter().flatten();
        values
            .filter_map(|v| match v {
                Value::Kib(k) => Some(*k),
                Value::Time(_) => None,
            })
            .collect()
    }

    fn early(&self, figure: Figure, who: Who) -> Vec<usize> {
        lock(&self.early)
            .get(&(figure, who))
            .cloned()
            .unwrap_or_default()
    }

    fn failed(&self, figure: Figure, who: Who) -> bool {
        lock(&self.errors)
            .iter()
            .any(|(f, w, _)| *f == figure && *w == who)
    }
}

/// What every run needs: the binary, where to put its files, and the plan.
struct Bench {
    bin: Binary,
    root: tempfile::TempDir,
    plan: Plan,
}

impl Bench {
    /// A fresh directory for one run, with an empty `lock/` inside.
    fn scratch(&self) -> Result<tempfile::TempDir, String> {
        let dir = tempfile::Builder::new()
            .prefix("run")
            .tempdir_in(self.root.path())
            .map_err(|e| format!("cannot create a directory: {e}"))?;
        fs::create_dir(dir.path().join("lock")).map_err(|e| format!("cannot create lock/: {e}"))?;
        Ok(dir)
    }

    /// `prestop drain` with a budget of `budget`, logging to stderr, its own state dir (so
    /// runs never join each other's termination) and the given wait options.
    fn prestop(&self, dir: &Path, budget: Duration, wait: &[String]) -> Command {
        let mut cmd = Command::new(&self.bin.path);
        cmd.current_dir(dir)
            .arg("drain")
            .arg("--grace-period")
            .arg(format!(
                "{}ms",
                (budget + Duration::from_secs(1)).as_millis()
            ))
            .args(["--reserve", "1s", "--log-target", "stderr", "--state-dir"])
            .arg(dir.join("state"))
            .args(wait);
        cmd
    }

    /// A hook waiting for the lock files in `dir/lock`.
    fn lock_hook(&self, who: Who, dir: &Path, budget: Duration) -> Command {
        match who {
            Who::Prestop => {
                let glob = format!("{}/lock/*.lock", dir.display());
                self.prestop(dir, budget, &["--wait-lock".into(), glob])
            }
            Who::Loop10 | Who::Loop1 => shell_loop(
                dir,
                "lock files",
                "ls -A lock/*.lock >/dev/null 2>&1",
                who.period(),
            ),
            Who::Sleep => sleep(budget),
        }
    }

    /// A hook waiting for process `pid` to exit.
    fn pid_hook(&self, who: Who, dir: &Path, pid: i32, budget: Duration) -> Command {
        match who {
            Who::Prestop => self.prestop(dir, budget, &["--wait-pid".into(), pid.to_string()]),
            Who::Loop10 | Who::Loop1 => shell_loop(
                dir,
                &format!("pid {pid}"),
                &format!("kill -0 {pid} 2>/dev/null"),
                who.period(),
            ),
            Who::Sleep => sleep(budget),
        }
    }
}

/// The shell hook people paste into a Deployment: look, sleep, look again.
fn shell_loop(dir: &Path, what: &str, busy: &str, period: Duration) -> Command {
    let mut cmd = Command::new("bash");
    cmd.current_dir(dir).arg("-c").arg(format!(
        "echo 'waiting for {what}' >&2\nwhile {busy}; do sleep {}; done\necho drained >&2",
        period.as_secs()
    ));
    cmd
}

fn sleep(span: Duration) -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg(format!("{}", span.as_secs_f64()));
    cmd
}

fn touch(path: &Path) -> Result<(), String> {
    fs::write(path, "").map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn remove(path: &Path) -> Result<(), String> {
    fs::remove_file(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

/// Removes `locks` while the hook runs, the i-th at `due(i)` after the start, and waits for
/// the hook to exit with `code`. Returns its exit, when the last removal began, and how many
/// locks were still there when it exited (none, unless it said "drained" too early).
///
/// Latencies are timed from just *before* the last removal: on another core the hook can
/// notice the removal before the remover has even returned from `unlink`, so a time taken
/// after it could come too late and flatter the hook.
fn remove_while_running(
    hook: &mut Hook,
    locks: &[PathBuf],
    due: impl Fn(usize) -> Duration + Sync,
    code: i32,
) -> Result<(Exit, Instant, usize), String> {
    let start = Instant::now();
    let count = AtomicUsize::new(0);
    let gone = AtomicBool::new(false);
    thread::scope(|s| {
        // The moment the last removal began, unless the hook was gone before it.
        let remover = s.spawn(|| -> Result<Option<Instant>, String> {
            let mut last = None;
            for (i, lock) in locks.iter().enumerate() {
                if gone.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                let at = start + due(i);
                let now = Instant::now();
                if at > now {
                    thread::sleep(at - now);
                }
                last = Some(Instant::now());
                remove(lock)?;
                count.fetch_add(1, Ordering::SeqCst);
            }
            Ok(last)
        });
        let exit = hook.expect_exit(code);
        let removed_by_exit = count.load(Ordering::SeqCst);
        gone.store(true, Ordering::SeqCst);
        let last = remover
            .join()
            .map_err(|_| "the remover panicked".to_owned())??;
        let exit = exit?;
        match last {
            Some(last) if exit.at >= last => Ok((exit, last, 0)),
            _ => {
                let left = (locks.len() - removed_by_exit).max(1);
                Ok((exit, last.unwrap_or(exit.at), left))
            }
        }
    })
}

/// A hook that said "drained" with locks left: for prestop a failure, for the others a
/// finding to report.
fn early(
    who: Who,
    figure: Figure,
    left: usize,
    values: Vec<(Figure, Value)>,
    hook: &mut Hook,
) -> Result<Found, String> {
    if who == Who::Prestop {
        return Err(format!(
            "exited with {left} lock(s) left; output: {:?}",
            hook.output()
        ));
    }
    Ok(Found::Early {
        figure,
        left,
        values,
    })
}

/// Three jobs hold locks and all finish after `delay`. Returns the time from the last
/// removal to the hook's "drained" line and to its exit.
fn lock_detection(bench: &Bench, who: Who, delay: Duration) -> Result<Found, String> {
    let dir = bench.scratch()?;
    let locks: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("lock/{n}.lock")))
        .collect();
    for lock in &locks {
        touch(lock)?;
    }
    let mut hook = Hook::spawn(bench.lock_hook(who, dir.path(), Duration::from_secs(60)))?;
    hook.wait_for_line(READY)?;
    let (exit, removed, left) = remove_while_running(&mut hook, &locks, |_| delay, 0)?;
    if left > 0 {
        return early(who, Figure::LockDetect, left, Vec::new(), &mut hook);
    }
    let logged = hook
        .line_at("drained", removed)
        .ok_or_else(|| format!("no \"drained\" line; output: {:?}", hook.output()))?;
    Ok(Found::Values(vec![
        (
            Figure::LockDetect,
            Value::Time(exit.at.saturating_duration_since(removed)),
        ),
        (
            Figure::LockLogged,
            Value::Time(logged.saturating_duration_since(removed)),
        ),
    ]))
}

/// The waited-on process is killed after `delay`. Timed from just before the kill, so the
/// figure includes the kernel tearing the process down: it never flatters the hook.
fn pid_detection(bench: &Bench, who: Who, delay: Duration) -> Result<Found, String> {
    let dir = bench.scratch()?;
    let mut victim = Victim::spawn()?;
    let pid = victim.pid().as_raw();
    let mut hook = Hook::spawn(bench.pid_hook(who, dir.path(), pid, Duration::from_secs(60)))?;
    hook.wait_for_line(READY)?;
    thread::sleep(delay);
    let killed = Instant::now();
    victim.kill()?;
    let exit = hook.expect_exit(0)?;
    Ok(Found::Values(vec![(
        Figure::PidDetect,
        Value::Time(exit.at.saturating_duration_since(killed)),
    )]))
}

/// A lock that never goes away, for `span`: prestop's budget runs out (exit 1, and the
/// deadline's accuracy is measured), `sleep` ends by itself, a shell loop is killed as the
/// kubelet would kill it.
fn waiting(bench: &Bench, who: Who, figure: Figure, span: Duration) -> Result<Found, String> {
    let dir = bench.scratch()?;
    touch(&dir.path().join("lock/forever.lock"))?;
    let mut hook = Hook::spawn(bench.lock_hook(who, dir.path(), span))?;
    if figure != Figure::Deadline {
        hook.sample_rss();
    }
    let deadline = hook.spawned + span;
    let exit = match who {
        Who::Prestop => hook.expect_exit(1)?,
        Who::Sleep => hook.expect_exit(0)?,
        Who::Loop10 | Who::Loop1 => {
            hook.wait_for_line(READY)?;
            thread::sleep(deadline.saturating_duration_since(Instant::now()));
            hook.kill_group();
            hook.wait()?
        }
    };
    // Measured from the fork, a little before prestop starts its clock: never flattering.
    let late = Value::Time(exit.at.saturating_duration_since(deadline));
    if who == Who::Prestop && exit.at < deadline {
        return Err(format!(
            "returned {} before its deadline",
            Time(deadline - exit.at)
        ));
    }
    if figure == Figure::Deadline {
        return Ok(Found::Values(vec![
            (Figure::Deadline, late),
            (Figure::ShortWaitCpu, Value::Time(exit.cpu)),
        ]));
    }
    let mut values = vec![(figure, Value::Time(exit.cpu))];
    if let Some(kib) = exit.peak_rss_kib {
        values.push((Figure::Rss, Value::Kib(kib)));
    }
    if who == Who::Prestop {
        values.push((Figure::Deadline, late));
    }
    Ok(Found::Values(values))
}

/// From the fork to the first line on stderr, with nothing to wait for.
fn startup(bench: &Bench, who: Who) -> Result<Found, String> {
    let dir = bench.scratch()?;
    let cmd = match who {
        Who::Prestop => bench.prestop(dir.path(), Duration::from_secs(1), &[]),
        _ => bench.lock_hook(who, dir.path(), Duration::from_secs(1)),
    };
    let mut hook = Hook::spawn(cmd)?;
    let first = hook.wait_for_line("")?;
    hook.expect_exit(0)?;
    Ok(Found::Values(vec![(
        Figure::Startup,
        Value::Time(first - hook.spawned),
    )]))
}

/// 10,000 lock files, removed one by one at an even pace over 5 s.
fn scale(bench: &Bench, who: Who) -> Result<Found, String> {
    let dir = bench.scratch()?;
    let locks: Vec<PathBuf> = (0..SCALE_FILES)
        .map(|i| dir.path().join(format!("lock/job-{i:05}.lock")))
        .collect();
    for lock in &locks {
        touch(lock)?;
    }
    let mut hook = Hook::spawn(bench.lock_hook(who, dir.path(), Duration::from_secs(60)))?;
    hook.sample_rss();
    hook.wait_for_line(READY)?;
    let pace = |i: usize| SCALE_SPAN.mul_f64(i as f64 / SCALE_FILES as f64);
    let (exit, removed, left) = remove_while_running(&mut hook, &locks, pace, 0)?;
    let mut values = vec![(Figure::ScaleCpu, Value::Time(exit.cpu))];
    if let Some(kib) = exit.peak_rss_kib {
        values.push((Figure::ScaleRss, Value::Kib(kib)));
    }
    if left > 0 {
        return early(who, Figure::ScaleLatency, left, values, &mut hook);
    }
    values.push((
        Figure::ScaleLatency,
        Value::Time(exit.at.saturating_duration_since(removed)),
    ));
    Ok(Found::Values(values))
}

/// Delays spread evenly over a shell loop's period, so that its few runs cover every phase.
fn spread(runs: usize, period: Duration) -> impl Iterator<Item = Duration> {
    (0..runs).map(move |i| period.mul_f64((i as f64 + 0.5) / runs as f64))
}

/// The slow runs: shell loops and every long wait. All of them sleep nearly all the time, so
/// they run concurrently, each on its own thread.
fn background(bench: &Bench, board: &Board) {
    let plan = &bench.plan;
    thread::scope(|s| {
        for who in [Who::Loop10, Who::Loop1] {
            let runs = if who == Who::Loop10 {
                plan.detect_loop10
            } else {
                plan.detect_loop1
            };
            for delay in spread(runs, who.period()) {
                s.spawn(move || {
                    board.record(Figure::LockDetect, who, lock_detection(bench, who, delay));
                });
                s.spawn(move || {
                    board.record(Figure::PidDetect, who, pid_detection(bench, who, delay));
                });
            }
        }
        // Staggered, so that no two hooks start or end at the same instant (in a cluster each
        // has a container of its own), which would time them against each other.
        let mut stagger = (0u32..).map(|i| Duration::from_millis(97) * i);
        for (figure, span) in plan.spans() {
            for who in EVERYONE {
                let runs = if who == Who::Prestop {
                    plan.wait_prestop
                } else {
                    plan.wait_peer
                };
                for delay in stagger.by_ref().take(runs) {
                    s.spawn(move || {
                        thread::sleep(delay);
                        board.record(figure, who, waiting(bench, who, figure, span));
                    });
                }
            }
        }
        for i in 0..plan.deadline {
            s.spawn(move || {
                // Staggered, so that the deadlines do not all fall on the same instant.
                thread::sleep(Duration::from_millis(150) * i as u32);
                let run = waiting(bench, Who::Prestop, Figure::Deadline, DEADLINE_SPAN);
                board.record(Figure::Deadline, Who::Prestop, run);
            });
        }
    });
}

/// prestop's millisecond figures, one run at a time on an otherwise quiet machine (even the
/// shell loops' occasional `ls` shows in a worst case of a few milliseconds).
fn quiet(bench: &Bench, board: &Board) {
    let plan = &bench.plan;
    for _ in 0..plan.startup_prestop {
        board.record(Figure::Startup, Who::Prestop, startup(bench, Who::Prestop));
    }
    for who in [Who::Loop10, Who::Loop1] {
        for _ in 0..plan.startup_loop {
            board.record(Figure::Startup, who, startup(bench, who));
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    let (low, high) = (Duration::from_millis(5), Duration::from_millis(60));
    for _ in 0..plan.detect_prestop {
        probe_timer(board);
        let run = lock_detection(bench, Who::Prestop, rng.between(low, high));
        board.record(Figure::LockDetect, Who::Prestop, run);
    }
    for _ in 0..plan.detect_prestop {
        probe_timer(board);
        let run = pid_detection(bench, Who::Prestop, rng.between(low, high));
        board.record(Figure::PidDetect, Who::Prestop, run);
    }
}

/// How late a 1 ms sleep wakes up, between the detection runs: what the machine itself adds
/// to any latency measured at that time.
fn probe_timer(board: &Board) {
    let asleep = Instant::now();
    thread::sleep(Duration::from_millis(1));
    let late = asleep.elapsed().saturating_sub(Duration::from_millis(1));
    let found = Found::Values(vec![(Figure::TimerLateness, Value::Time(late))]);
    board.record(Figure::TimerLateness, Who::Prestop, Ok(found));
}

/// prestop's 10,000-file case, one run at a time, while the sleepers wait in the background:
/// its figures are CPU time and a 50 ms bound, which a few milliseconds of noise cannot move.
fn prestop_at_scale(bench: &Bench, board: &Board) {
    for _ in 0..bench.plan.scale_prestop {
        board.record(Figure::ScaleCpu, Who::Prestop, scale(bench, Who::Prestop));
    }
}

/// The shell loops' 10,000-file case: CPU-heavy, so only once nothing else is timed.
fn peers_at_scale(bench: &Bench, board: &Board) {
    thread::scope(|s| {
        for who in [Who::Loop10, Who::Loop1] {
            for _ in 0..bench.plan.scale_peer {
                s.spawn(move || board.record(Figure::ScaleCpu, who, scale(bench, who)));
            }
        }
    });
}

fn summary_text(board: &Board, figure: Figure, who: Who) -> Option<String> {
    if figure.in_bytes() {
        let s = Summary::of(&board.kibs(figure, who))?;
        Some(format!(
            "{} / {} ({})",
            Bytes(s.median * 1024),
            Bytes(s.worst * 1024),
            s.runs
        ))
    } else {
        let s = Summary::of(&board.times(figure, who))?;
        Some(format!(
            "{} / {} ({})",
            Time(s.median),
            Time(s.worst),
            s.runs
        ))
    }
}

fn cell(bench: &Bench, board: &Board, figure: Figure, who: Who) -> String {
    if let Some(text) = figure.not_applicable(who) {
        return text.to_owned();
    }
    let errors = if board.failed(figure, who) {
        " + failed runs"
    } else {
        ""
    };
    let early = board.early(figure, who);
    let summary = summary_text(board, figure, who);
    if !early.is_empty() {
        let runs = early.len() + board.times(figure, who).len();
        let most = early.iter().max().copied().unwrap_or(0);
        let rest = summary.map_or(String::new(), |s| format!("; the others {s}"));
        return format!(
            "**said “drained” with up to {most} locks left** in {} of {runs} runs{rest}{errors}",
            early.len()
        );
    }
    // The CPU time and memory of a hook that quit early cover only the time it ran.
    let quit_early = matches!(figure, Figure::ScaleCpu | Figure::ScaleRss)
        && !board.early(Figure::ScaleLatency, who).is_empty();
    let until = if quit_early {
        ", until it quit early"
    } else {
        ""
    };
    match summary {
        Some(s) => format!("{s}{until}{errors}"),
        None if !errors.is_empty() => "failed (see below)".into(),
        None if bench.plan.quick && figure == Figure::Cpu60 => "— full run only".into(),
        None => "not measured (see below)".into(),
    }
}

/// What each hook needs in the image, for the size row.
fn size_cells(bench: &Bench) -> [String; 4] {
    let prestop = match fs::metadata(&bench.bin.path) {
        Ok(meta) if bench.bin.musl => {
            let linkage = match support::is_static(&bench.bin.path) {
                Ok(true) => "static",
                Ok(false) => "NOT static",
                Err(_) => "linkage unknown",
            };
            format!("{} ({linkage} musl, stripped)", Bytes(meta.len()))
        }
        Ok(meta) => format!(
            "unavailable: no {} build ({}); native build {}",
            support::MUSL,
            bench.bin.musl_error.as_deref().unwrap_or("unknown"),
            Bytes(meta.len())
        ),
        Err(e) => format!("error: {e}"),
    };
    let needs = |programs: &[&str]| {
        let mut total = 0;
        for program in programs {
            match support::which(program) {
                Some((_, size)) => total += size,
                None => return format!("{program} not found"),
            }
        }
        format!("{}: {} + libc", programs.join(" + "), Bytes(total))
    };
    let shell = needs(&["bash", "ls", "sleep"]);
    [prestop, shell.clone(), shell, needs(&["sleep"])]
}

fn render(bench: &Bench, board: &Board) -> String {
    let mut out = String::new();
    let mut row = |cells: &[String]| {
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    };
    let mut header = vec!["median / worst (runs)".to_owned()];
    header.extend(EVERYONE.iter().map(|w| w.heading().to_owned()));
    row(&header);
    row(&vec!["---".to_owned(); header.len()]);
    for figure in ROWS {
        let mut cells = vec![figure.name().to_owned()];
        cells.extend(EVERYONE.iter().map(|&who| cell(bench, board, figure, who)));
        row(&cells);
    }
    let mut cells = vec!["binary size (what the hook needs in the image)".to_owned()];
    cells.extend(size_cells(bench));
    row(&cells);
    out
}

/// One goal of the product, checked against prestop's runs.
struct Goal {
    text: &'static str,
    /// The figure compared, as printed.
    seen: String,
    met: Option<bool>,
}

/// The 99th percentile (nearest rank) of a set of durations.
fn p99(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * 99).div_ceil(100);
    sorted.get(rank.checked_sub(1)?).copied()
}

/// A time goal: the 99th percentile of prestop's samples of each figure is at most (or,
/// `strict`, under) `limit`. With fewer than 100 runs that is the worst run.
#[derive(Clone, Copy)]
struct TimeGoal {
    text: &'static str,
    figures: &'static [Figure],
    limit: Duration,
    /// "under" the limit rather than "at most".
    strict: bool,
}

const fn time_goal(text: &'static str, figures: &'static [Figure], limit_ms: u64) -> TimeGoal {
    TimeGoal {
        text,
        figures,
        limit: Duration::from_millis(limit_ms),
        strict: false,
    }
}

const fn under(goal: TimeGoal) -> TimeGoal {
    TimeGoal {
        strict: true,
        ..goal
    }
}

const TIME_GOALS: [TimeGoal; 8] = [
    time_goal(
        "drain detection: hook exits ≤ 20 ms after the last lock (p99)",
        &[Figure::LockDetect],
        20,
    ),
    time_goal(
        "(for comparison: prestop logs “drained” ≤ 20 ms after the last lock)",
        &[Figure::LockLogged],
        20,
    ),
    time_goal(
        "process-exit detection: hook exits ≤ 20 ms after the process (p99)",
        &[Figure::PidDetect],
        20,
    ),
    under(time_goal(
        "CPU < 10 ms per minute of waiting",
        &[Figure::Cpu60],
        10,
    )),
    time_goal("10,000 locks: total CPU ≤ 0.5 s", &[Figure::ScaleCpu], 500),
    time_goal(
        "10,000 locks: exit ≤ 50 ms after the last",
        &[Figure::ScaleLatency],
        50,
    ),
    under(time_goal(
        "start-up to first log line < 5 ms",
        &[Figure::Startup],
        5,
    )),
    time_goal("deadline kept within 50 ms", &[Figure::Deadline], 50),
];

fn check(board: &Board, goal: &TimeGoal) -> Goal {
    let samples = goal.figures.iter().map(|&f| board.times(f, Who::Prestop));
    check_samples(goal, samples)
}

fn check_samples(goal: &TimeGoal, samples: impl Iterator<Item = Vec<Duration>>) -> Goal {
    let seen: Option<Vec<(Summary<Duration>, Duration)>> = samples
        .map(|samples| Some((Summary::of(&samples)?, p99(&samples)?)))
        .collect();
    Goal {
        text: goal.text,
        seen: seen.as_ref().map_or_else(
            || "not measured".into(),
            |seen| {
                let seen: Vec<String> = seen
                    .iter()
                    .map(|(s, p99)| {
                        format!(
                            "median {}, p99 {}, worst {} (runs: {})",
                            Time(s.median),
                            Time(*p99),
                            Time(s.worst),
                            s.runs
                        )
                    })
                    .collect();
                seen.join("; ")
            },
        ),
        met: seen.map(|seen| {
            seen.iter().all(|(_, p99)| {
                if goal.strict {
                    *p99 < goal.limit
                } else {
                    *p99 <= goal.limit
                }
            })
        }),
    }
}

/// A quick run has no 60 s wait; its 20 s ones stand in. What a minute costs is the 2 s
/// runs' median (start-up, exit and 2 s of waiting) plus, for the other 58 s, the rate at
/// which the 20 s runs spent CPU beyond that: extrapolating the 20 s figure itself would
/// count start-up and exit three times.
fn quick_cpu_goal(board: &Board) -> Goal {
    let goal = under(time_goal(
        "CPU < 10 ms per minute of waiting (from the 2 s and 20 s runs)",
        &[Figure::Cpu20],
        10,
    ));
    let short = Summary::of(&board.times(Figure::ShortWaitCpu, Who::Prestop)).map(|s| s.median);
    let per_minute: Vec<Duration> = short.map_or_else(Vec::new, |short| {
        board
            .times(Figure::Cpu20, Who::Prestop)
            .iter()
            .map(|t| short + t.saturating_sub(short).mul_f64(58.0 / 18.0))
            .collect()
    });
    check_samples(&goal, std::iter::once(per_minute))
}

fn goals(bench: &Bench, board: &Board) -> Vec<Goal> {
    let mut goals: Vec<Goal> = TIME_GOALS
        .iter()
        .map(|goal| match goal.figures {
            [Figure::Cpu60] if bench.plan.quick => quick_cpu_goal(board),
            _ => check(board, goal),
        })
        .collect();
    let rss = [Figure::Rss, Figure::ScaleRss]
        .iter()
        .map(|&f| Summary::of(&board.kibs(f, Who::Prestop)).map(|s| s.worst))
        .try_fold(0, |acc, k| k.map(|k| acc.max(k)));
    goals.push(Goal {
        text: "RSS ≤ 4 MiB, waiting and at scale",
        seen: rss.map_or("not measured".into(), |k| {
            format!("worst {}", Bytes(k * 1024))
        }),
        met: rss.map(|k| k <= 4 * 1024),
    });
    let size = fs::metadata(&bench.bin.path)
        .ok()
        .filter(|_| bench.bin.musl);
    goals.push(Goal {
        text: "stripped static musl binary ≤ 1 MiB",
        seen: size.as_ref().map_or_else(
            || format!("unavailable: no {} build", support::MUSL),
            |m| format!("{} ({} bytes)", Bytes(m.len()), m.len()),
        ),
        met: size.map(|m| m.len() <= 1024 * 1024),
    });
    goals
}

fn machine() -> String {
    let cores = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this file too, without
    // it, and a test run has no time for minutes of measuring.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("the drain benchmark runs under `cargo bench --bench drain`");
        return ExitCode::SUCCESS;
    }
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("PRESTOP_BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0");
    let bin = match support::build() {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("error: cannot build prestop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = match tempfile::Builder::new().prefix("prestop-bench").tempdir() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("error: cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bench = Bench {
        bin,
        root,
        plan: Plan::new(quick),
    };
    eprintln!(
        "measuring {}{} ...",
        bench.bin.path.display(),
        if quick { " (quick mode)" } else { "" }
    );
    let began = Instant::now();
    let board = Board {
        verbose: std::env::args().any(|a| a == "--verbose"),
        ..Board::default()
    };
    quiet(&bench, &board);
    thread::scope(|s| {
        let slow = s.spawn(|| background(&bench, &board));
        prestop_at_scale(&bench, &board);
        let _ = slow.join();
    });
    peers_at_scale(&bench, &board);

    println!(
        "\n`cargo bench --bench drain{}` on {}; took {:.0} s\n",
        if quick { " -- --quick" } else { "" },
        machine(),
        began.elapsed().as_secs_f64()
    );
    println!("{}", render(&bench, &board));
    let lateness = board.times(Figure::TimerLateness, Who::Prestop);
    if let (Some(s), Some(p99)) = (Summary::of(&lateness), p99(&lateness)) {
        println!(
            "The machine's own share: a 1 ms sleep of the benchmark, between the detection \
             runs, woke {} late (median), {} (p99), {} (worst) in {} tries.\n",
            Time(s.median),
            Time(p99),
            Time(s.worst),
            s.runs
        );
    }
    if !bench.bin.musl {
        println!(
            "Timing figures are from the native build: there is no {} build ({}), so the \
             size figure is unavailable. `rustup target add {}` makes one.\n",
            support::MUSL,
            bench.bin.musl_error.as_deref().unwrap_or("unknown"),
            support::MUSL
        );
    }
    println!("prestop's goals, judged by the 99th percentile (the worst run, below 100 runs):\n");
    for goal in goals(&bench, &board) {
        let verdict = match goal.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "n/a   ",
        };
        println!("- {verdict} {}: {}", goal.text, goal.seen);
    }
    let errors = lock(&board.errors);
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("\n{} run(s) failed:", errors.len());
        for (figure, who, error) in errors.iter() {
            println!("- {} ({}): {error}", figure.name(), who.heading());
        }
        ExitCode::FAILURE
    }
}
