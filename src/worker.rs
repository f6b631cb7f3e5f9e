//! The sample worker that `prestop demo` drains: a stand-in for a real app's job runner.
//!
//! It takes jobs of 1–4 s, a few at a time, and holds a lock file per job while it runs. On
//! SIGTSTP it stops taking jobs and finishes the ones in flight (as Sidekiq does); on SIGTERM
//! it exits at once and names every job it had to abandon. It exists to be drained, so it
//! must behave like a well-written app, never cooperate with prestop in any other way.

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::pipe::timeout_until;

pub struct Options {
    pub lock_dir: PathBuf,
    /// Jobs run at the same time.
    pub slots: usize,
    pub shortest: Duration,
    pub longest: Duration,
    /// Pause between taking two jobs.
    pub pace: Duration,
}

struct Job {
    id: u32,
    lock: PathBuf,
    started: Instant,
    length: Duration,
}

/// Runs until SIGTERM (or SIGINT); returns the exit code: 0 if nothing was abandoned.
pub fn run(options: &Options) -> std::io::Result<u8> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTSTP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let signals = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    fs::create_dir_all(&options.lock_dir)?;

    let mut random = Random::seeded();
    let mut jobs: Vec<Job> = Vec::new();
    let mut next_id = 1;
    let mut taking = true;
    let mut next_take = Instant::now();
    say(&format!(
        "ready: taking jobs of {}-{} s, {} at a time, a lock file each in {}",
        options.shortest.as_secs(),
        options.longest.as_secs(),
        options.slots,
        options.lock_dir.display()
    ));
    loop {
        let now = Instant::now();
        jobs.retain(|job| {
            if now < job.started + job.length {
                return true;
            }
            let _ = fs::remove_file(&job.lock);
            say(&format!(
                "job {} done after {:.1}s",
                job.id,
                job.length.as_secs_f64()
            ));
            false
        });
        if taking && jobs.len() < options.slots && now >= next_take {
            let length = random.between(options.shortest, options.longest);
            let lock = options.lock_dir.join(format!("job-{next_id}.lock"));
            fs::write(&lock, format!("{}\n", std::process::id()))?;
            say(&format!(
                "job {next_id} started ({:.1}s of work)",
                length.as_secs_f64()
            ));
            jobs.push(Job {
                id: next_id,
                lock,
                started: now,
                length,
            });
            next_id += 1;
            next_take = now + options.pace;
        }
        let mut wake = jobs
            .iter()
            .map(|j| j.started + j.length)
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
        if taking && jobs.len() < options.slots {
            wake = wake.min(next_take);
        }
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout_until(wake)) {
            Ok(n) if n > 0 => {}
            _ => continue,
        }
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTSTP) => {
                    taking = false;
                    say(&format!(
                        "SIGTSTP: taking no new jobs, finishing {} in flight",
                        jobs.len()
                    ));
                }
                Ok(signal) => return Ok(stop(signal, &jobs)),
                Err(_) => {}
            }
        }
    }
}

fn stop(signal: Signal, jobs: &[Job]) -> u8 {
    if jobs.is_empty() {
        say(&format!("{signal}: exiting, no job abandoned"));
        return 0;
    }
    for job in jobs {
        say(&format!(
            "{signal}: abandoned job {} ({:.1}s of {:.1}s done)",
            job.id,
            job.started.elapsed().as_secs_f64(),
            job.length.as_secs_f64()
        ));
        let _ = fs::remove_file(&job.lock);
    }
    say(&format!(
        "{signal}: exiting, {} job(s) abandoned",
        jobs.len()
    ));
    1
}

fn say(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "worker: {line}");
}

/// xorshift64*: plenty for job lengths, and no dependency for a demo.
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let seed = crate::budget::monotonic_nanos() ^ (u64::from(std::process::id()) << 32);
        Random(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.next() % (span + 1))
    }
}
