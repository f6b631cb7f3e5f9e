//! The command line as clap sees it: flags, their environment variables and help text, and
//! their conversion into `config`'s plain options.
//!
//! Everything here is a raw string or flag. Turning those into checked values happens in
//! `config`, in one place, so that every bad value gets the same kind of one-line error.
//! clap's types stop here: what leaves this module is plain options. It must never validate,
//! resolve or act on anything.

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{BudgetOptions, DrainOptions, OutputOptions, StopOptions, WaitOptions};
use crate::exit;

const DRAIN_EXAMPLES: &str = "\
Examples:
  # A worker that stops taking jobs on SIGTSTP and holds a lock file per job:
  prestop drain --grace-period 300 --signal TSTP --wait-lock '/app/lock/*.lock'

  # nginx: ask it to quit gracefully, then wait for its master process to exit:
  prestop drain --exec 'nginx -s quit' --wait-pid pidfile:/run/nginx.pid

  # Only let endpoint removal propagate (replaces `sleep 10`, needs no shell):
  prestop drain --min-wait 10s

  # An Envoy sidecar: fail its health check over the admin API, then wait for the
  # connections to its listener to finish:
  prestop drain --http 'POST http://127.0.0.1:15000/healthcheck/fail' --wait-conns 8080

  # See what a hook would do, without doing it:
  prestop drain --signal TSTP --wait-lock '/app/lock/*.lock' --dry-run

Options that can be given more than once read one value per line from their
environment variable (PRESTOP_WAIT_LOCK, PRESTOP_WAIT_PID, PRESTOP_WAIT_CONNS,
PRESTOP_WAIT_HTTP, PRESTOP_TOUCH, PRESTOP_HTTP, PRESTOP_EXEC).";

/// Drain a container before it is killed: the Kubernetes preStop hook.
#[derive(Debug, Parser)]
#[command(name = "prestop", version, after_help = exit::HELP, max_term_width = 100)]
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
    #[command(after_help = format!("{DRAIN_EXAMPLES}\n\n{}", exit::HELP))]
    Drain(Box<DrainCommand>),
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
    #[command(after_help = format!("{REHEARSE_EXAMPLES}\n{}", exit::REHEARSE_HELP))]
    Rehearse(Box<RehearseArgs>),
    /// Run a job under a lock file that a drain waits for; refuse it once a drain has begun
    ///
    /// Creates a lock file in --lock-dir (its name ends in .lock) and holds an advisory lock
    /// on it, runs COMMAND (without a shell), forwards the signals it gets to COMMAND, removes
    /// the lock file when COMMAND ends, and exits with COMMAND's status. A lock file whose
    /// job is gone (killed with SIGKILL, say) is stale: --wait-lock does not wait for it.
    /// While a drain of the same --state-dir is under way, COMMAND is not started (exit 75).
    #[command(after_help = format!("{HOLD_EXAMPLES}\n\n{}", exit::HOLD_HELP))]
    Hold(HoldArgs),
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
";

#[derive(Debug, Args)]
pub struct DrainCommand {
    #[command(flatten)]
    pub drain: DrainArgs,

    /// In a rehearsal's hook: the app's PID, which the target 1 stands for.
    #[arg(long, hide = true, value_name = "PID")]
    pub rehearsal_app_pid: Option<OsString>,
}

#[derive(Debug, Args)]
pub struct RehearseArgs {
    #[command(flatten)]
    pub drain: DrainArgs,

    /// How long APP runs before termination begins.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_name = "DURATION",
        default_value = "2s",
        help_heading = "Rehearsal"
    )]
    pub after: OsString,

    /// What the kubelet sends APP after the hook returns (the image's STOPSIGNAL).
    #[arg(
        long,
        allow_hyphen_values = true,
        value_name = "SIGNAL",
        default_value = "TERM",
        help_heading = "Rehearsal"
    )]
    pub stop_signal: OsString,

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

    /// The drain options as given (flags or environment), as `drain` arguments for the hook.
    #[arg(skip)]
    pub hook: Vec<OsString>,
}

const HOLD_EXAMPLES: &str = "\
Examples:
  # A cron job whose lock the preStop hook waits for:
  prestop hold --lock-dir /app/lock -- php artisan report:build

  # The hook of the same container:
  prestop drain --grace-period 300 --wait-lock '/app/lock/*.lock'

hold and the hook meet in the state directory: give both the same --state-dir, or set
PRESTOP_STATE_DIR in the container's environment, which exec hooks share.";

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// The directory of the lock file; the hook's --wait-lock glob must match it there.
    #[arg(long, env = "PRESTOP_LOCK_DIR", value_name = "DIR")]
    pub lock_dir: Option<OsString>,

    /// The lock file's name: NAME.PID.lock [default: COMMAND's file name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<OsString>,

    /// Where a drain records that it has begun (the hook's --state-dir).
    #[arg(
        long,
        env = "PRESTOP_STATE_DIR",
        value_name = "DIR",
        default_value = "/tmp/prestop"
    )]
    pub state_dir: OsString,

    /// The job, and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
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
        value_parser = switch,
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
    pub grace_period: OsString,

    /// Time kept for the app's own shutdown after SIGTERM; the hook's deadline is
    /// first invocation's start + grace - reserve.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_RESERVE",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub reserve: OsString,

    /// Never return earlier than this (lets endpoint removal propagate).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_MIN_WAIT",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub min_wait: OsString,

    /// "Drained" must hold continuously this long before prestop returns.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_QUIET_FOR",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub quiet_for: OsString,
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
    pub stop_after: OsString,

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
    pub signal: Option<OsString>,

    /// Who gets --signal.
    #[arg(
        long,
        help = "PID, pidfile:PATH (read when used), name:NAME (every process of that name: \
                its comm if NAME is under 15 bytes, else its argv[0] or executable; never a \
                prestop process), or children:TARGET (the children of one of those, such as a \
                pre-fork server's workers) [default: 1; where PID 1 is /pause, the container's \
                own main process]",
        allow_hyphen_values = true,
        env = "PRESTOP_SIGNAL_TARGET",
        value_name = "TARGET"
    )]
    pub signal_target: Option<OsString>,

    /// Send an HTTP/1.1 request; 2xx is success.
    #[arg(
        long,
        help = "Send a plain HTTP/1.1 request, METHOD defaulting to GET: \
                'POST http://127.0.0.1:15000/healthcheck/fail', or over a unix socket \
                'POST http://unix:/admin/admin.sock:/healthcheck/fail'. 2xx is success; \
                bounded by the remaining budget. No TLS, and no host names but localhost \
                (repeatable).",
        env = "PRESTOP_HTTP",
        value_name = "[METHOD] URL",
        value_delimiter = '\n'
    )]
    pub http: Vec<OsString>,

    /// Run a command (split into words as a shell would, run without a shell), bounded by
    /// the remaining budget; its output goes to the log (repeatable).
    #[arg(
        long,
        env = "PRESTOP_EXEC",
        value_name = "COMMAND",
        value_delimiter = '\n'
    )]
    pub exec: Vec<OsString>,
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
    pub wait_lock: Vec<OsString>,

    /// Wait until the target has exited; a zombie counts as exited. PID, pidfile:PATH,
    /// name:NAME or children:TARGET (repeatable).
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_WAIT_PID",
        value_name = "TARGET",
        value_delimiter = '\n'
    )]
    pub wait_pid: Vec<OsString>,

    /// Wait until no client connection to a local port is in flight.
    #[arg(
        long,
        help = "Wait until no client connection to this local port is in flight: PORT, :PORT, \
                127.0.0.1:PORT or [::1]:PORT (repeatable). An idle keep-alive connection is \
                not in flight; a new connection restarts --quiet-for, which so measures that \
                endpoint removal has propagated.",
        env = "PRESTOP_WAIT_CONNS",
        value_name = "PORT",
        value_delimiter = '\n',
        allow_negative_numbers = true
    )]
    pub wait_conns: Vec<OsString>,

    /// Wait until a URL answers 2xx.
    #[arg(
        long,
        help = "Wait until this URL answers 2xx to a GET, sent again a second after each \
                answer or error; an endpoint that holds the request until the app has drained \
                (a long poll) is waited for up to the deadline (repeatable).",
        env = "PRESTOP_WAIT_HTTP",
        value_name = "URL",
        value_delimiter = '\n'
    )]
    pub wait_http: Vec<OsString>,

    /// Count idle connections as in flight too.
    #[arg(
        long,
        env = "PRESTOP_COUNT_IDLE_CONNS",
        value_parser = switch,
        help = "Count idle connections as in flight too (long-lived streams, WebSockets, gRPC)"
    )]
    pub count_idle_conns: bool,

    /// A --wait-lock file that holds just a PID names its holder.
    #[arg(
        long,
        env = "PRESTOP_LOCK_PID",
        value_parser = switch,
        help = "A --wait-lock file that holds just a PID is stale, and not waited for, once \
                that process is gone (or its PID was reused). prestop hold locks are judged \
                without it."
    )]
    pub lock_pid: bool,

    /// Fallback re-check period where no event source (inotify, pidfd) is available.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_POLL_INTERVAL",
        value_name = "DURATION",
        default_value = "1s"
    )]
    pub poll_interval: OsString,
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
    pub log_format: OsString,

    /// How often a progress line is written while waiting.
    #[arg(
        long,
        allow_hyphen_values = true,
        env = "PRESTOP_PROGRESS_INTERVAL",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub progress_interval: OsString,
}

/// Parses prestop's command line (and the `PRESTOP_*` environment).
pub fn parse() -> Result<Cli, clap::Error> {
    parse_from(std::env::args_os())
}

pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // Built once: the command tree is most of what parsing costs a short-lived `hold`.
    let mut cli_command = Cli::command();
    let matches = cli_command.try_get_matches_from_mut(args)?;
    if let Some((name, sub)) = matches.subcommand() {
        let command = cli_command
            .find_subcommand(name)
            .expect("clap matched this subcommand");
        one_value_per_argument(command, sub)?;
    }
    let mut cli = Cli::from_arg_matches(&matches)?;
    match (&mut cli.command, matches.subcommand()) {
        (Command::Drain(drain), Some((_, sub))) => drain.drain.drop_blank_env_lines(sub),
        (Command::Check(check), Some((_, sub))) => check.wait.drop_blank_env_lines(sub),
        (Command::Rehearse(rehearse), Some((_, sub))) => {
            rehearse.drain.drop_blank_env_lines(sub);
            rehearse.hook = hook_argv(sub);
        }
        _ => {}
    }
    Ok(cli)
}

/// A switch's value from its variable: what people write in a manifest for yes and no.
/// (clap's `BoolishValueParser` does the same, and cost 19 KiB of the binary.)
fn switch(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected 1, true, yes or on (or 0, false, no, off)".into()),
    }
}

/// Whether a value of option `id` is an empty line of its environment variable: the final
/// newline of a YAML `|` block, or a blank line between values. Those are not values; an
/// empty value on the command line still is one, and is refused.
fn blank_env_line(matches: &ArgMatches, id: &str, value: &std::ffi::OsStr) -> bool {
    value.is_empty() && matches.value_source(id) == Some(ValueSource::EnvVariable)
}

fn drop_blank(values: &mut Vec<OsString>, matches: &ArgMatches, id: &str) {
    values.retain(|v| !blank_env_line(matches, id, v));
}

impl DrainArgs {
    fn drop_blank_env_lines(&mut self, matches: &ArgMatches) {
        drop_blank(&mut self.stop.touch, matches, "touch");
        drop_blank(&mut self.stop.http, matches, "http");
        drop_blank(&mut self.stop.exec, matches, "exec");
        self.wait.drop_blank_env_lines(matches);
    }
}

impl WaitArgs {
    fn drop_blank_env_lines(&mut self, matches: &ArgMatches) {
        drop_blank(&mut self.wait_lock, matches, "wait_lock");
        drop_blank(&mut self.wait_pid, matches, "wait_pid");
        drop_blank(&mut self.wait_conns, matches, "wait_conns");
        drop_blank(&mut self.wait_http, matches, "wait_http");
    }
}

/// Options that take one value per line from their environment variable: on the command
/// line, one argument is one value, so a newline inside it is refused rather than split
/// (`--touch $'a\nb'` must not touch two files).
fn one_value_per_argument(
    command: &clap::Command,
    matches: &ArgMatches,
) -> Result<(), clap::Error> {
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_value_delimiter().is_none()
            || matches.value_source(id) != Some(ValueSource::CommandLine)
        {
            continue;
        }
        let Ok(Some(occurrences)) = matches.try_get_raw_occurrences(id) else {
            continue;
        };
        for values in occurrences {
            let values: Vec<&std::ffi::OsStr> = values.collect();
            if values.len() > 1 {
                let joined = values
                    .iter()
                    .map(|v| v.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("\n");
                let long = arg.get_long().unwrap_or(id);
                let env = arg
                    .get_env()
                    .map_or_else(String::new, |env| format!(" {}", env.to_string_lossy()));
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!(
                        "--{long} {joined:?}: holds a newline; one argument is one value \
                         (only the variable{env} takes one value per line)\n"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Parses a drain's options from `args` alone, without the environment: for a hook command
/// line that prestop itself composes (the demo's).
pub fn parse_drain(args: &[OsString]) -> Result<DrainOptions, clap::Error> {
    let command = DrainArgs::augment_args(clap::Command::new("drain").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    let matches = command.try_get_matches_from(args)?;
    Ok(DrainArgs::from_arg_matches(&matches)?.into())
}

/// Drain options a rehearsal sets for its hook itself, whatever the user gave.
const SET_BY_THE_REHEARSAL: [&str; 3] = ["log_target", "log_format", "state_dir"];

/// The drain options of a rehearsal, as given on its command line or in the environment,
/// rendered as `drain` arguments: every option `DrainArgs` has, so that one added there
/// reaches the rehearsal's hook with no change anywhere else.
fn hook_argv(matches: &ArgMatches) -> Vec<OsString> {
    let mut argv = Vec::new();
    let drain = DrainArgs::augment_args(clap::Command::new("drain"));
    for arg in drain.get_arguments() {
        let id = arg.get_id().as_str();
        let given = matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !given || SET_BY_THE_REHEARSAL.contains(&id) {
            continue;
        }
        let long = arg.get_long().expect("every drain option has a long name");
        if arg.get_action().takes_values() {
            for value in matches.get_raw(id).into_iter().flatten() {
                if blank_env_line(matches, id, value) {
                    continue;
                }
                let mut option = OsString::from(format!("--{long}="));
                option.push(value);
                argv.push(option);
            }
        } else if matches.get_flag(id) {
            argv.push(format!("--{long}").into());
        }
    }
    argv
}

impl From<DrainArgs> for DrainOptions {
    fn from(args: DrainArgs) -> DrainOptions {
        DrainOptions {
            budget: BudgetOptions {
                grace_period: args.budget.grace_period,
                reserve: args.budget.reserve,
                min_wait: args.budget.min_wait,
                quiet_for: args.budget.quiet_for,
            },
            stop: StopOptions {
                stop_after: args.stop.stop_after,
                touch: args.stop.touch,
                signal: args.stop.signal,
                signal_target: args.stop.signal_target,
                http: args.stop.http,
                exec: args.stop.exec,
            },
            wait: args.wait.into(),
            output: OutputOptions {
                log_target: args.output.log_target,
                log_format: args.output.log_format,
                progress_interval: args.output.progress_interval,
            },
            dry_run: args.dry_run,
            state_dir: args.state_dir,
        }
    }
}

impl From<WaitArgs> for WaitOptions {
    fn from(args: WaitArgs) -> WaitOptions {
        WaitOptions {
            wait_lock: args.wait_lock,
            wait_pid: args.wait_pid,
            wait_conns: args.wait_conns,
            wait_http: args.wait_http,
            count_idle_conns: args.count_idle_conns,
            lock_pid: args.lock_pid,
            poll_interval: args.poll_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// An option that takes one value per line from its variable drops the blank lines of
    /// that variable: `drop_blank_env_lines` names every such option.
    #[test]
    fn every_one_per_line_option_drops_blank_lines() {
        let drain = DrainArgs::augment_args(clap::Command::new("drain"));
        let mut ids: Vec<&str> = drain
            .get_arguments()
            .filter(|arg| arg.get_value_delimiter().is_some())
            .map(|arg| arg.get_id().as_str())
            .collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            [
                "exec",
                "http",
                "touch",
                "wait_conns",
                "wait_http",
                "wait_lock",
                "wait_pid"
            ],
            "a new one-per-line option belongs in drop_blank_env_lines"
        );
    }

    #[test]
    fn repeatable_options_accumulate() {
        let cli = parse_from([
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
        let Command::Drain(command) = cli.command else {
            panic!("expected drain");
        };
        let args = command.drain;
        assert_eq!(args.wait.wait_lock, ["/a/*.lock", "/b/*.lock"]);
        assert_eq!(args.stop.exec, ["nginx -s quit"]);
        assert_eq!(args.budget.grace_period, "30s");
        assert_eq!(args.stop.signal_target, None);
    }

    /// A sample value for a drain option, taken from its value name; valid or not does not
    /// matter here, only that it is distinct from the default.
    fn sample(arg: &clap::Arg) -> &'static str {
        match arg
            .get_value_names()
            .and_then(|names| names.first())
            .map(clap::builder::Str::as_str)
        {
            Some("DURATION") => "7s",
            Some("SIGNAL") => "USR2",
            Some("TARGET") => "pidfile:/run/x.pid",
            Some("FORMAT") => "json",
            Some("COMMAND") => "nginx -s 'quit now'",
            _ => "/srv/some path/*.lock",
        }
    }

    /// Every drain option a rehearsal is given reaches its hook, as the same value: walked
    /// through clap's own list of the options, so a new one is covered without a change here.
    #[test]
    fn every_drain_option_reaches_a_rehearsals_hook() {
        let drain = DrainArgs::augment_args(clap::Command::new("drain"));
        let mut walked = 0;
        for arg in drain.get_arguments() {
            let id = arg.get_id().as_str();
            if SET_BY_THE_REHEARSAL.contains(&id) {
                continue;
            }
            let long = format!("--{}", arg.get_long().unwrap());
            let mut given: Vec<OsString> = vec!["prestop".into(), "rehearse".into()];
            if arg.get_action().takes_values() {
                given.extend([long.clone().into(), sample(arg).into()]);
                if arg.get_value_delimiter().is_some() {
                    given.extend([long.clone().into(), "second value".into()]);
                }
            } else {
                given.push(long.clone().into());
            }
            given.extend(["--after".into(), "1s".into(), "--".into(), "app".into()]);
            let Command::Rehearse(rehearse) = parse_from(given).unwrap().command else {
                panic!("expected rehearse");
            };
            assert!(!rehearse.hook.is_empty(), "{long} did not reach the hook");
            let mut hook: Vec<OsString> = vec!["prestop".into(), "drain".into()];
            hook.extend(rehearse.hook.iter().cloned());
            let Command::Drain(drain) = parse_from(hook).unwrap().command else {
                panic!("expected drain");
            };
            assert_eq!(
                format!("{:?}", drain.drain),
                format!("{:?}", rehearse.drain),
                "{long} changed on its way to the hook"
            );
            walked += 1;
        }
        let every = drain.get_arguments().count() - SET_BY_THE_REHEARSAL.len();
        assert_eq!(walked, every);
        assert!(walked >= 14, "only {walked} drain options walked");
    }

    #[test]
    fn the_rehearsal_sets_its_hooks_log_and_state_dir_itself() {
        let cli = parse_from([
            "prestop",
            "rehearse",
            "--log-format",
            "text",
            "--state-dir",
            "/x",
            "--min-wait",
            "1s",
            "--",
            "app",
        ])
        .unwrap();
        let Command::Rehearse(rehearse) = cli.command else {
            panic!("expected rehearse");
        };
        assert_eq!(rehearse.hook, [OsString::from("--min-wait=1s")]);
    }

    #[test]
    fn a_composed_hook_parses_alone() {
        let options = parse_drain(&["--wait-lock".into(), "/a/*.lock".into()]).unwrap();
        assert_eq!(options.wait.wait_lock, ["/a/*.lock"]);
        assert_eq!(options.budget.grace_period, "30s");
    }
}
