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

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::budget::secs;
use crate::error::Error;
use crate::event::{self, Machine, Step, Wake, Watch};
use crate::exit::Exit;

pub struct Options {
    pub lock_dir: PathBuf,
    /// Jobs run at the same time.
    pub slots: usize,
    pub shortest: Duration,
    pub longest: Duration,
    /// Pause between taking two jobs.
    pub pace: Duration,
}

impl Options {
    /// The demo's worker: jobs of 1-4 s, one taken every 300 ms while a slot is free.
    pub fn demo(lock_dir: PathBuf, slots: usize) -> Options {
        Options {
            lock_dir,
            slots: slots.max(1),
            shortest: Duration::from_secs(1),
            longest: Duration::from_secs(4),
            pace: Duration::from_millis(300),
        }
    }
}

struct Job {
    id: u32,
    lock: PathBuf,
    started: Instant,
    length: Duration,
}

/// `prestop sample-worker`: runs until SIGTERM (or SIGINT).
pub fn command(options: &Options) -> Result<Exit, Error> {
    match run(options) {
        Ok(true) => Ok(Exit::Success),
        Ok(false) => Ok(Exit::InFlight),
        Err(e) => Err(Error::system("sample worker", e)),
    }
}

/// Runs until SIGTERM (or SIGINT); whether no job was abandoned.
pub fn run(options: &Options) -> std::io::Result<bool> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTSTP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let signals = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    fs::create_dir_all(&options.lock_dir)?;
    say(&format!(
        "ready: taking jobs of {}-{} s, {} at a time, a lock file each in {}",
        options.shortest.as_secs(),
        options.longest.as_secs(),
        options.slots,
        options.lock_dir.display()
    ));
    let mut worker = Worker {
        options,
        signals,
        random: Random::seeded(),
        jobs: Vec::new(),
        next_id: 1,
        taking: true,
        next_take: Instant::now(),
        stopped: None,
    };
    // The worker's own signals come through its signalfd: no interrupts of prestop's here.
    event::run(&mut worker, None).unwrap_or(Ok(false))
}

struct Worker<'a> {
    options: &'a Options,
    signals: SignalFd,
    random: Random,
    jobs: Vec<Job>,
    next_id: u32,
    taking: bool,
    next_take: Instant,
    /// The signal that ended the worker, once one has.
    stopped: Option<Signal>,
}

impl Machine for Worker<'_> {
    type Source = ();
    type Output = std::io::Result<bool>;

    fn tick(&mut self, now: Instant) -> Step<Self::Output> {
        if let Some(signal) = self.stopped {
            return Step::Done(Ok(stop(signal, &self.jobs)));
        }
        self.jobs.retain(|job| {
            if now < job.started + job.length {
                return true;
            }
            let _ = fs::remove_file(&job.lock);
            say(&format!("job {} done after {}", job.id, secs(job.length)));
            false
        });
        if self.taking
            && self.jobs.len() < self.options.slots
            && now >= self.next_take
            && let Err(e) = self.take(now)
        {
            return Step::Done(Err(e));
        }
        let mut wake = self
            .jobs
            .iter()
            .map(|j| j.started + j.length)
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
        if self.taking && self.jobs.len() < self.options.slots {
            wake = wake.min(self.next_take);
        }
        Step::Sleep(Wake::at(wake))
    }

    fn watch(&self, fds: &mut Watch<()>) {
        fds.add(self.signals.as_fd(), ());
    }

    fn ready(&mut self, (): ()) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTSTP) => {
                    self.taking = false;
                    say(&format!(
                        "SIGTSTP: taking no new jobs, finishing {} in flight",
                        self.jobs.len()
                    ));
                }
                Ok(signal) => self.stopped = Some(signal),
                Err(_) => {}
            }
        }
    }
}

impl Worker<'_> {
    fn take(&mut self, now: Instant) -> std::io::Result<()> {
        let length = self
            .random
            .between(self.options.shortest, self.options.longest);
        let id = self.next_id;
        let lock = self.options.lock_dir.join(format!("job-{id}.lock"));
        fs::write(&lock, format!("{}\n", std::process::id()))?;
        say(&format!("job {id} started ({} of work)", secs(length)));
        self.jobs.push(Job {
            id,
            lock,
            started: now,
            length,
        });
        self.next_id += 1;
        self.next_take = now + self.options.pace;
        Ok(())
    }
}

/// Ends the worker; whether no job was abandoned.
fn stop(signal: Signal, jobs: &[Job]) -> bool {
    if jobs.is_empty() {
        say(&format!("{signal}: exiting, no job abandoned"));
        return true;
    }
    for job in jobs {
        say(&format!(
            "{signal}: abandoned job {} ({} of {} done)",
            job.id,
            secs(job.started.elapsed()),
            secs(job.length)
        ));
        let _ = fs::remove_file(&job.lock);
    }
    say(&format!(
        "{signal}: exiting, {} job(s) abandoned",
        jobs.len()
    ));
    false
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
