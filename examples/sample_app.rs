//! A sample worker to drain: the app of the end-to-end suite (`tests/e2e_runc.rs`), and a
//! quick way to try prestop by hand.
//!
//! It starts a job every `--every` (default 300ms); each job lasts `--job` (default 2s; the
//! first one `--first-job`) and holds a lock file `LOCK_DIR/job-N.lock` while it runs. On
//! SIGTSTP it goes quiet: it takes no new jobs and lets the running ones finish. On SIGTERM
//! (or SIGINT) it prints each job it abandons and exits at once, as an app with no graceful
//! shutdown of its own would. Every event is one line on stdout, so a test can read the
//! order of events from the container's log. `--lifetime` bounds how long it runs at all.
//!
//! It is single-threaded, and signals are read from a `signalfd` in the same loop that
//! starts and ends jobs, so a line like `job 3 done` is always written before the line for a
//! signal that arrived after it. It runs as PID 1 in a container, where a signal without a
//! handler is ignored, which is one more reason to take signals from a `signalfd`.
//!
//! ```text
//! cargo build --example sample_app
//! target/debug/examples/sample_app --lock-dir /tmp/lock --job 3s &
//! cargo run -- drain --signal TSTP --signal-target $! --wait-lock '/tmp/lock/*.lock'
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

const USAGE: &str = "usage: sample_app [--every DURATION] [--job DURATION] \
                     [--first-job DURATION] [--lock-dir DIR] [--lifetime DURATION]";

struct Options {
    every: Duration,
    job: Duration,
    first_job: Option<Duration>,
    lock_dir: PathBuf,
    /// Exit after this long whatever happens, so that a test run that was itself killed
    /// does not leave its containers working forever.
    lifetime: Option<Duration>,
}

/// A job in flight: when it ends and the lock file it holds.
struct Job {
    ends: Instant,
    lock: PathBuf,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(why) => {
            eprintln!("sample_app: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        every: Duration::from_millis(300),
        job: Duration::from_secs(2),
        first_job: None,
        lock_dir: PathBuf::from("/tmp/lock"),
        lifetime: None,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let duration = |text: String| {
            humantime::parse_duration(&text).map_err(|e| format!("{flag} {text}: {e}"))
        };
        match flag.as_str() {
            "--every" => options.every = duration(value()?)?,
            "--job" => options.job = duration(value()?)?,
            "--first-job" => options.first_job = Some(duration(value()?)?),
            "--lock-dir" => options.lock_dir = PathBuf::from(value()?),
            "--lifetime" => options.lifetime = Some(duration(value()?)?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.every.is_zero() {
        return Err("--every must be positive".into());
    }
    Ok(options)
}

fn run(options: &Options) -> std::io::Result<()> {
    // Blocked before anything else, so that no signal can take its default action (or be
    // lost, as PID 1) between here and the first poll.
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGTSTP] {
        set.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let signals = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    std::fs::create_dir_all(&options.lock_dir)?;
    say(&format!(
        "ready (pid {}): a {} job every {}, locks in {}",
        std::process::id(),
        humantime::format_duration(options.job),
        humantime::format_duration(options.every),
        options.lock_dir.display()
    ));

    let mut jobs: BTreeMap<u64, Job> = BTreeMap::new();
    let mut started = 0_u64;
    let mut next_start = Some(Instant::now());
    let end_of_life = options.lifetime.map(|d| Instant::now() + d);
    loop {
        let now = Instant::now();
        finish_jobs(&mut jobs, now);
        if end_of_life.is_some_and(|end| now >= end) {
            say(&format!("lifetime over: exiting, {} abandoned", jobs.len()));
            return Ok(());
        }
        if let Some(at) = next_start.filter(|&at| at <= now) {
            started += 1;
            let length = match (started, options.first_job) {
                (1, Some(first)) => first,
                _ => options.job,
            };
            let lock = options.lock_dir.join(format!("job-{started}.lock"));
            std::fs::write(&lock, format!("{}\n", std::process::id()))?;
            say(&format!("job {started} started ({})", lock.display()));
            jobs.insert(
                started,
                Job {
                    ends: now + length,
                    lock,
                },
            );
            // From the schedule, not from now, so a late wake-up does not stretch it.
            next_start = Some(at + options.every);
        }

        let wake = jobs
            .values()
            .map(|j| j.ends)
            .chain(next_start)
            .chain(end_of_life)
            .min();
        let timeout = match wake {
            Some(at) => poll_timeout(at.saturating_duration_since(Instant::now())),
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        while let Some(info) = signals.read_signal()? {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTSTP) => {
                    if next_start.take().is_some() {
                        say(&format!(
                            "SIGTSTP: taking no new jobs, {} in flight",
                            jobs.len()
                        ));
                    } else {
                        say("SIGTSTP again: already quiet");
                    }
                }
                Ok(signal) => {
                    // A job that ends in this very instant is done, not abandoned.
                    finish_jobs(&mut jobs, Instant::now());
                    say(&format!("{signal} with {} in flight", jobs.len()));
                    for (n, job) in &jobs {
                        say(&format!("abandoned job {n} ({})", job.lock.display()));
                    }
                    say(&format!("exiting: {} abandoned", jobs.len()));
                    return Ok(());
                }
                Err(_) => {}
            }
        }
    }
}

/// Ends every job whose time has come: says so, then releases its lock.
fn finish_jobs(jobs: &mut BTreeMap<u64, Job>, now: Instant) {
    let done: Vec<u64> = jobs
        .iter()
        .filter(|(_, job)| job.ends <= now)
        .map(|(&n, _)| n)
        .collect();
    for n in done {
        let job = jobs.remove(&n).expect("listed above");
        say(&format!("job {n} done"));
        release(&job.lock);
    }
}

fn release(lock: &Path) {
    if let Err(e) = std::fs::remove_file(lock) {
        say(&format!("cannot remove {}: {e}", lock.display()));
    }
}

/// Rounds up, so the loop never wakes a millisecond early and spins until the job ends.
fn poll_timeout(left: Duration) -> PollTimeout {
    let millis = left.as_micros().div_ceil(1000);
    PollTimeout::try_from(millis.min(u128::from(u16::MAX))).unwrap_or(PollTimeout::MAX)
}

/// One line on stdout in a single write, so it never interleaves with the lines prestop
/// writes to the same pipe; a closed stdout must not stop the app.
fn say(message: &str) {
    let line = format!("sample_app: {message}\n");
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}
