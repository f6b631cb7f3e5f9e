//! `cargo bench --bench hold`: what `prestop hold` costs a job, beside running the same job
//! bare, and how soon a drain ends after the last of many held jobs.
//!
//! The job is this benchmark's own binary, run again in a mode that prints the monotonic
//! clock when it starts and just before it exits. So "start" is from the spawn of `hold` (or
//! of the bare job) to the job's first instruction, and "end" from the job's last to the
//! reaped exit of `hold` (or of the bare job); what `hold` adds is the difference. Then
//! 1,000 held jobs of random lengths run 40 at a time with a drain started midway: the time
//! from the last job's exit to the drain's. `-- --quick` runs fewer rounds, for CI. The
//! benchmark fails only if something misbehaves, never because of a number.

#[allow(dead_code)]
mod support;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use support::{Binary, Rng, Summary, Time};

/// Set in the job's environment: print the clock at start and at exit.
const STAMP: &str = "PRESTOP_BENCH_STAMP";

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn stamp() -> ExitCode {
    let started = now_ns();
    let line = format!("{started} {}\n", now_ns());
    let _ = std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes());
    ExitCode::SUCCESS
}

/// One run of the job, bare or under `hold`: (start, end) as described above.
fn run_once(bin: &Binary, dir: &Path, held: bool) -> Result<(Duration, Duration), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = if held {
        let mut c = Command::new(&bin.path);
        c.args(["hold", "--lock-dir"])
            .arg(dir.join("lock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--")
            .arg(&me);
        c
    } else {
        Command::new(&me)
    };
    cmd.env(STAMP, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let spawned = now_ns();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let reaped = now_ns();
    if !status.success() {
        return Err(format!("the job exited with {status}"));
    }
    let mut stamps = out.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(first)), Some(Ok(last))) = (stamps.next(), stamps.next()) else {
        return Err(format!("the job printed {out:?}"));
    };
    Ok((
        Duration::from_nanos(first.saturating_sub(spawned)),
        Duration::from_nanos(reaped.saturating_sub(last)),
    ))
}

struct Overhead {
    start: Vec<Duration>,
    end: Vec<Duration>,
}

fn overhead(bin: &Binary, dir: &Path, held: bool, runs: usize) -> Result<Overhead, String> {
    let mut o = Overhead {
        start: Vec::new(),
        end: Vec::new(),
    };
    for _ in 0..runs {
        let (start, end) = run_once(bin, dir, held)?;
        o.start.push(start);
        o.end.push(end);
    }
    if held && fs::read_dir(dir.join("lock")).map_or(0, Iterator::count) != 0 {
        return Err("a lock file was left behind".into());
    }
    Ok(o)
}

fn p99(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// 1,000 jobs, 40 at a time, a drain started after 500: how long after the last job's exit
/// the drain exited, and how many jobs were refused once it had begun.
fn many_jobs(bin: &Binary, dir: &Path, seed: u64) -> Result<(Duration, usize), String> {
    let locks = dir.join("many-lock");
    let state = dir.join("many-state");
    fs::create_dir_all(&locks).map_err(|e| e.to_string())?;
    let hold = |ms: u64| {
        let mut c = Command::new(&bin.path);
        c.args(["hold", "--lock-dir"])
            .arg(&locks)
            .arg("--state-dir")
            .arg(&state)
            .args(["--", "sleep", &format!("0.{ms:03}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let mut rng = Rng::new(seed);
    let mut run = Run::default();
    for i in 0..1000 {
        while run.jobs.len() >= 40 {
            run.poll()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        if i == 500 {
            let mut d = Command::new(&bin.path);
            d.args(["drain", "--wait-lock"])
                .arg(format!("{}/*.lock", locks.display()))
                .args(["--grace-period", "120", "--log-target", "/dev/null"])
                .arg("--state-dir")
                .arg(&state)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            run.drain = Some(d.spawn().map_err(|e| e.to_string())?);
            // Let it record that it began before the next job asks.
            std::thread::sleep(Duration::from_millis(50));
        }
        let ms = rng
            .between(Duration::ZERO, Duration::from_millis(300))
            .as_millis() as u64;
        run.jobs.push(hold(ms).spawn().map_err(|e| e.to_string())?);
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    while !run.jobs.is_empty() || run.drain_exit.is_none() {
        if Instant::now() > give_up {
            return Err("the drain never ended".into());
        }
        run.poll()?;
        std::thread::sleep(Duration::from_micros(200));
    }
    let drain_exit = run.drain_exit.expect("checked");
    let last = run.last_job_exit.ok_or("no job ran")?;
    if drain_exit < last {
        return Err("the drain ended before the last job".into());
    }
    if fs::read_dir(&locks).map_or(0, Iterator::count) != 0 {
        return Err("a lock file was left behind".into());
    }
    Ok((drain_exit - last, run.refused))
}

/// The jobs and the drain of `many_jobs`, reaped as they end.
#[derive(Default)]
struct Run {
    jobs: Vec<Child>,
    drain: Option<Child>,
    drain_exit: Option<Instant>,
    last_job_exit: Option<Instant>,
    refused: usize,
}

impl Run {
    fn poll(&mut self) -> Result<(), String> {
        let mut failed = None;
        let (mut last, mut refused) = (self.last_job_exit, 0);
        self.jobs.retain_mut(|c| match c.try_wait() {
            Ok(Some(status)) => {
                match status.code() {
                    Some(0) => last = Some(Instant::now()),
                    Some(75) => refused += 1,
                    _ => failed = Some(format!("a job ended with {status}")),
                }
                false
            }
            _ => true,
        });
        self.last_job_exit = last;
        self.refused += refused;
        if let Some(d) = self.drain.as_mut()
            && self.drain_exit.is_none()
            && let Ok(Some(status)) = d.try_wait()
        {
            if !status.success() {
                return Err(format!("the drain ended with {status}"));
            }
            self.drain_exit = Some(Instant::now());
        }
        failed.map_or(Ok(()), Err)
    }
}

fn main() -> ExitCode {
    if std::env::var_os(STAMP).is_some() {
        return stamp();
    }
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("PRESTOP_BENCH_QUICK").is_some_and(|v| v != "0");
    let bin = match support::build() {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("hold bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    fs::create_dir_all(dir.path().join("lock")).expect("the lock directory");
    let (runs, rounds) = if quick { (101, 1) } else { (1001, 5) };
    let measured = overhead(&bin, dir.path(), false, runs)
        .and_then(|bare| overhead(&bin, dir.path(), true, runs).map(|held| (bare, held)));
    let (bare, held) = match measured {
        Ok(both) => both,
        Err(e) => {
            eprintln!("hold bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut lags = Vec::new();
    for round in 0..rounds {
        match many_jobs(&bin, &dir.path().join(format!("round{round}")), round + 1) {
            Ok((lag, refused)) => {
                eprintln!(
                    "round {round}: drain exited {} after the last job; {refused} jobs refused",
                    Time(lag)
                );
                lags.push(lag);
            }
            Err(e) => {
                eprintln!("hold bench: 1,000 jobs: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let row = |samples: &[Duration]| {
        let s = Summary::of(samples).expect("samples");
        format!("{} / {} ({})", Time(s.median), Time(p99(samples)), s.runs)
    };
    let median = |v: &[Duration]| Summary::of(v).expect("samples").median;
    println!(
        "\n| median / p99 (runs) | `prestop hold -- JOB` | JOB alone | added by hold (median) |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| spawn → job running | {} | {} | {} |",
        row(&held.start),
        row(&bare.start),
        Time(median(&held.start).saturating_sub(median(&bare.start)))
    );
    println!(
        "| job exiting → reaped | {} | {} | {} |",
        row(&held.end),
        row(&bare.end),
        Time(median(&held.end).saturating_sub(median(&bare.end)))
    );
    let lag = Summary::of(&lags).expect("rounds");
    println!(
        "| 1,000 held jobs, drain started midway: last job exited → drain exited | {} / {} ({}) | | |",
        Time(lag.median),
        Time(p99(&lags)),
        lag.runs
    );
    let added = median(&held.start).saturating_sub(median(&bare.start))
        + median(&held.end).saturating_sub(median(&bare.end));
    println!(
        "\ngoal: hold adds ≤ 1 ms (median) to a job's start and end: {} ({})",
        if added <= Duration::from_millis(1) {
            "met"
        } else {
            "missed"
        },
        Time(added)
    );
    ExitCode::SUCCESS
}
