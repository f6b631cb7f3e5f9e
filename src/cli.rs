//! The command line as clap sees it: flags, their environment variables and help text.
//!
//! Everything here is a raw string or flag. Turning those into checked values happens in
//! `config`, in one place, so that every bad value gets the same kind of one-line error;
//! this module must never validate, resolve or act on anything.

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes:
  0      drained within the budget (or the waited-on process is gone)
  1      budget exhausted with work still in flight; the summary names what remains
  2      usage or configuration error; nothing was done
  3      drained, but a stop action failed (the wait still ran)
  128+N  interrupted by signal N while waiting (130 for Ctrl-C)";

const DRAIN_EXAMPLES: &str = "\
Examples:
  # A worker that stops taking jobs on SIGTSTP and holds a lock file per job:
  prestop drain --grace-period 300 --signal TSTP --wait-lock '/app/lock/*.lock'

  # nginx: ask it to quit gracefully, then wait for its master process to exit:
  prestop drain --exec 'nginx -s quit' --wait-pid pidfile:/run/nginx.pid

  # Only let endpoint removal propagate (replaces `sleep 10`, needs no shell):
  prestop drain --min-wait 10s

  # See what a hook would do, without doing it:
  prestop drain --signal TSTP --wait-lock '/app/lock/*.lock' --dry-run

Options that can be given more than once read one value per line from their
environment variable (PRESTOP_WAIT_LOCK, PRESTOP_WAIT_PID, PRESTOP_TOUCH, PRESTOP_EXEC).";

/// Drain a container before it is killed: the Kubernetes preStop hook.
#[derive(Debug, Parser)]
#[command(name = "prestop", version, after_help = EXIT_CODES, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The preStop hook: stop intake, wait until in-flight work drains
    ///
    /// Tells the app to stop taking new work, then waits until in-flight work drains or the
    /// budget (grace period - reserve, from the first invocation's start) runs out.
    #[command(after_help = format!("{DRAIN_EXAMPLES}\n\n{EXIT_CODES}"))]
    Drain(Box<DrainArgs>),
    /// One look at the wait conditions: exit 0 if drained, 1 if not
    ///
    /// Prints each wait condition and what is still in flight.
    #[command(
        after_help = "Examples:\n  prestop check --wait-lock '/app/lock/*.lock' --wait-pid name:nginx"
    )]
    Check(CheckArgs),
    /// Local drain testing: run APP and terminate it as the kubelet would
    ///
    /// Runs APP, plays the kubelet's termination sequence against it (the preStop hook, then
    /// SIGTERM, then SIGKILL at the grace deadline) and reports a timeline and a verdict.
    #[command(after_help = REHEARSE_EXAMPLES)]
    Rehearse(Box<RehearseArgs>),
    /// A self-contained rehearsal with a built-in sample worker
    Demo,
    /// The sample worker that `demo` drains.
    #[command(hide = true)]
    SampleWorker(WorkerArgs),
}

const REHEARSE_EXAMPLES: &str = "\
Inside a rehearsal the target 1 means APP, which plays the container's PID 1.

Examples:
  prestop rehearse --signal TSTP --wait-lock '/tmp/jobs/*.lock' --grace-period 60 -- ./worker
  prestop rehearse --exec 'nginx -s quit' --wait-pid 1 -- nginx -g 'daemon off;'

Exit codes: 0 graceful, 1 drained-late or killed, 2 usage error, 128+N interrupted.";

#[derive(Debug, Args)]
pub struct RehearseArgs {
    #[command(flatten)]
    pub drain: DrainArgs,

    /// How long APP runs before termination begins.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "2s",
        help_heading = "Rehearsal"
    )]
    pub after: String,

    /// What the kubelet sends APP after the hook returns (the image's STOPSIGNAL).
    #[arg(
        long,
        value_name = "SIGNAL",
        default_value = "TERM",
        help_heading = "Rehearsal"
    )]
    pub stop_signal: String,

    /// Run APP as PID 1 of a new PID namespace, as in a container (needs root).
    #[arg(long, help_heading = "Rehearsal")]
    pub pid_namespace: bool,

    /// The app to rehearse, and its arguments.
    #[arg(
        last = true,
        required = true,
        value_name = "APP",
        help_heading = "Rehearsal"
    )]
    pub app: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long, value_name = "DIR")]
    pub lock_dir: OsString,
    #[arg(long, default_value_t = 3)]
    pub slots: usize,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub stop: StopArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// Validate every option, print the plan and exit 0 without doing anything.
    #[arg(
        long,
        env = "PRESTOP_DRY_RUN",
        help_heading = "Checking a configuration"
    )]
    pub dry_run: bool,

    /// Where concurrent or repeated invocations of the same hook meet, so that a second
    /// delivery does not repeat the stop actions and keeps the first one's deadline.
    #[arg(
        long,
        env = "PRESTOP_STATE_DIR",
        value_name = "DIR",
        default_value = "/tmp/prestop",
        help_heading = "Coordination"
    )]
    pub state_dir: OsString,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Budget")]
pub struct BudgetArgs {
    /// The pod's terminationGracePeriodSeconds (a bare number means seconds).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_GRACE_PERIOD",
        value_name = "DURATION",
        default_value = "30s"
    )]
    pub grace_period: String,

    /// Time kept for the app's own shutdown after SIGTERM; the hook's deadline is
    /// first invocation's start + grace - reserve.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_RESERVE",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub reserve: String,

    /// Never return earlier than this (lets endpoint removal propagate).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_MIN_WAIT",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub min_wait: String,

    /// "Drained" must hold continuously this long before prestop returns.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_QUIET_FOR",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub quiet_for: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Stop new work (run once per termination, in this order)")]
pub struct StopArgs {
    /// Run the stop actions this long after termination began, not at once: a web server
    /// keeps serving while its endpoint removal propagates (counted against the budget).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_STOP_AFTER",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub stop_after: String,

    /// Create a sentinel file the app watches (repeatable).
    #[arg(
        long,
        env = "PRESTOP_TOUCH",
        value_name = "PATH",
        value_delimiter = '\n'
    )]
    pub touch: Vec<OsString>,

    /// Send this signal (TSTP, SIGUSR1 and 10 are all accepted) to --signal-target.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_SIGNAL",
        value_name = "SIGNAL"
    )]
    pub signal: Option<String>,

    /// PID, pidfile:PATH, or name:NAME (every process whose comm or argv[0] basename is
    /// NAME, never prestop itself) [default: 1]
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_SIGNAL_TARGET",
        value_name = "TARGET"
    )]
    pub signal_target: Option<String>,

    /// Run a command (split into words as a shell would, run without a shell), bounded by
    /// the remaining budget; its output goes to the log (repeatable).
    #[arg(
        long,
        env = "PRESTOP_EXEC",
        value_name = "COMMAND",
        value_delimiter = '\n'
    )]
    pub exec: Vec<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Wait until drained (all that are given must hold)")]
pub struct WaitArgs {
    /// Wait until no path matches GLOB (repeatable).
    #[arg(
        long,
        env = "PRESTOP_WAIT_LOCK",
        value_name = "GLOB",
        value_delimiter = '\n'
    )]
    pub wait_lock: Vec<String>,

    /// Wait until the target has exited; a zombie counts as exited. PID, pidfile:PATH or
    /// name:NAME (repeatable).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_WAIT_PID",
        value_name = "TARGET",
        value_delimiter = '\n'
    )]
    pub wait_pid: Vec<String>,

    /// Fallback re-check period where no event source (inotify, pidfd) is available.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_POLL_INTERVAL",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub poll_interval: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// auto, pid1, stdout, stderr or a file PATH. auto writes to /proc/1/fd/1 (so lines show
    /// in `kubectl logs`) unless PID 1 is a host init or /pause, or stderr is a terminal.
    #[arg(
        long,
        env = "PRESTOP_LOG_TARGET",
        value_name = "TARGET",
        default_value = "auto"
    )]
    pub log_target: OsString,

    /// text or json (one object per line).
    #[arg(
        long,
        env = "PRESTOP_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: String,

    /// How often a progress line is written while waiting.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_PROGRESS_INTERVAL",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub progress_interval: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn repeatable_options_accumulate() {
        let cli = Cli::try_parse_from([
            "prestop",
            "drain",
            "--wait-lock",
            "/a/*.lock",
            "--wait-lock",
            "/b/*.lock",
            "--exec",
            "nginx -s quit",
        ])
        .unwrap();
        let Command::Drain(args) = cli.command else {
            panic!("expected drain");
        };
        assert_eq!(args.wait.wait_lock, ["/a/*.lock", "/b/*.lock"]);
        assert_eq!(args.stop.exec, ["nginx -s quit"]);
        assert_eq!(args.budget.grace_period, "30s");
        assert_eq!(args.stop.signal_target, None);
    }
}
