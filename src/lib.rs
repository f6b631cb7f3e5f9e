//! prestop: drain a container before Kubernetes kills it.
//!
//! `run` takes the parsed command line and hands each subcommand its plain options; the
//! modules below do the work. From the top down, a module only uses those beneath it:
//!
//! - `cli` (clap's view of the command line) and `commands` (one per subcommand);
//! - `drain` (the preStop hook's sequence) and `rehearse` (the local kubelet);
//! - `stop`, `wait`, `report`, `coordinate`: stopping intake, waiting, logging, meeting
//!   other deliveries of the hook;
//! - `config`, `budget`, `process`, `procfs`, `sockdiag`, `http`, `event`, `interrupt`, `pipe`,
//!   `error`, `exit`: validated options, deadlines, processes, sockets, the HTTP client, the
//!   event loop and the small pieces.

pub mod budget;
pub mod cli;
pub mod commands;
pub mod config;
pub mod coordinate;
pub mod drain;
pub mod error;
pub mod event;
pub mod exit;
pub mod http;
pub mod interrupt;
pub mod joblock;
pub mod pipe;
pub mod process;
pub mod procfs;
pub mod rehearse;
pub mod report;
pub mod sockdiag;
pub mod stop;
pub mod wait;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::cli::{Cli, Command};
use crate::exit::Exit;

/// Runs a parsed command line. `started` is when the process began, which is when the
/// kubelet started the hook.
pub fn run(cli: Cli, started: Instant) -> Exit {
    let result = match cli.command {
        Command::Drain(command) => commands::drain(
            &command.drain.into(),
            command.rehearsal_app_pid.as_deref(),
            started,
        ),
        Command::Check(args) => commands::check::run(&args.wait.into()),
        Command::Rehearse(args) => {
            let rehearsal = commands::Rehearsal {
                after: &args.after,
                stop_signal: &args.stop_signal,
                pid_namespace: args.pid_namespace,
                app: &args.app,
            };
            commands::rehearse(&args.drain.into(), &args.hook, &rehearsal)
        }
        Command::Hold(args) => commands::hold::run(&config::HoldOptions {
            lock_dir: args.lock_dir,
            name: args.name,
            state_dir: args.state_dir,
            command: args.command,
        }),
        Command::Demo => commands::demo::run(),
        Command::SampleWorker(args) => commands::worker::command(&commands::worker::Options::demo(
            args.lock_dir.into(),
            args.slots,
        )),
    };
    result.unwrap_or_else(|e| {
        eprintln!("prestop: {}", report::escape(&e.to_string()));
        e.exit()
    })
}

/// Whether `PRESTOP_DEBUG=1` asked for diagnostics.
static DIAGNOSTICS: AtomicBool = AtomicBool::new(false);

/// Turns on `PRESTOP_DEBUG=1` diagnostics (event-source fallbacks, rescans) on stderr.
pub fn init_diagnostics() {
    let wanted = std::env::var_os("PRESTOP_DEBUG").is_some_and(|v| !v.is_empty() && v != "0");
    DIAGNOSTICS.store(wanted, Ordering::Relaxed);
}

/// Writes one diagnostic line, if `PRESTOP_DEBUG=1` asked for them. (A logging framework
/// would cost the binary 70 KB for these few lines: `tracing-subscriber`'s formatter 47 KB,
/// the `tracing` facade and the float formatting it keeps alive the rest.)
pub fn diagnostic(line: std::fmt::Arguments<'_>) {
    if DIAGNOSTICS.load(Ordering::Relaxed) {
        eprintln!("prestop: debug: {}", report::escape(&line.to_string()));
    }
}

/// `debug!("...", args)`: a `PRESTOP_DEBUG=1` diagnostic line.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        $crate::diagnostic(format_args!($($arg)*))
    };
}
