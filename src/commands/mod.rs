//! What each subcommand does with its plain options: validate them, set up what the command
//! needs (signal handling, the log), and run the part that does the work.
//!
//! `drain` and `rehearse` are a few lines each here; `check`, `demo`, the dry run's `plan`
//! and the sample `worker` are commands of their own, one file each. Nothing here parses a
//! command line (that is `cli`) or knows how a drain works inside (that is `drain`).

pub mod check;
pub mod demo;
pub mod hold;
pub mod plan;
pub mod worker;

use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

use crate::config::{self, Config, DrainOptions};
use crate::error::Error;
use crate::exit::Exit;
use crate::interrupt::Interrupts;
use crate::process::Pid1;
use crate::procfs::ProcessId;
use crate::rehearse;
use crate::report::Reporter;

/// `prestop drain`: the preStop hook. `started` is when the process began, which is when the
/// kubelet started the hook; `rehearsal_app` is set by a rehearsal for its hook.
pub fn drain(
    options: &DrainOptions,
    rehearsal_app: Option<&OsStr>,
    started: Instant,
) -> Result<Exit, Error> {
    let pid1 = match rehearsal_app {
        None => Pid1::Real,
        Some(pid) => {
            let pid = config::text("--rehearsal-app-pid", pid)?;
            Pid1::App(
                ProcessId::parse(pid)
                    .map_err(|why| Error::usage("--rehearsal-app-pid", pid, why))?,
            )
        }
    };
    let config = Config::from_options(options, pid1)?;
    if config.dry_run {
        plan::print(&config);
        return Ok(Exit::Success);
    }
    // Before any thread or child exists, so that every one of them inherits the mask.
    let interrupts = Interrupts::install()
        .map_err(|e| Error::system("cannot set up signal handling", e.into()))?;
    let report = Reporter::open(&config.output);
    Ok(crate::drain::drain(&config, &report, started, Some(&interrupts)).exit())
}

/// A rehearsal's own options, besides the drain's.
pub struct Rehearsal<'a> {
    pub after: &'a OsStr,
    pub stop_signal: &'a OsStr,
    pub pid_namespace: bool,
    pub app: &'a [OsString],
}

/// `prestop rehearse`: `drain` holds the drain options, `hook` the same as the hook's
/// command line.
pub fn rehearse(
    drain: &DrainOptions,
    hook: &[OsString],
    rehearsal: &Rehearsal<'_>,
) -> Result<Exit, Error> {
    // The app plays PID 1; it has no PID yet, and validation needs none.
    let config = Config::from_options(drain, Pid1::App(ProcessId::INIT))?;
    let after: Duration = config::duration("--after", config::text("--after", rehearsal.after)?)?;
    let stop_signal = config::signal(
        "--stop-signal",
        config::text("--stop-signal", rehearsal.stop_signal)?,
    )?;
    if config.dry_run {
        plan::print(&config);
        return Ok(Exit::Success);
    }
    rehearse::run(&rehearse::Options {
        config: &config,
        hook,
        after,
        stop_signal,
        pid_namespace: rehearsal.pid_namespace,
        app: rehearsal.app,
    })
}
