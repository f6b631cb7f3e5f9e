//! Options as the user gave them (plain strings, from the command line or the environment)
//! in, a validated `Config` out.
//!
//! This is the one place where user input is parsed: durations, signals, targets, pidfiles,
//! globs, commands, paths and URLs (those in `http`). Each bad value becomes an `Error::Usage`
//! naming the option and the value. It knows nothing of how options are spelt on a command
//! line (that is `cli`'s business), and it must never act: validation reads pidfiles and looks
//! programs up in `PATH`, but touches, signals, runs and sends nothing, so a usage error always
//! means nothing was done.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::Error;
use crate::http::Request;
use crate::process::{self, Named, Pid1, Pinned, Target};
use crate::procfs::{Init, ProcessId};

/// A drain's options as given, before validation: one field per option.
#[derive(Clone, Debug, Default)]
pub struct DrainOptions {
    pub budget: BudgetOptions,
    pub stop: StopOptions,
    pub wait: WaitOptions,
    pub output: OutputOptions,
    pub dry_run: bool,
    pub state_dir: OsString,
}

#[derive(Clone, Debug, Default)]
pub struct BudgetOptions {
    pub grace_period: OsString,
    pub reserve: OsString,
    pub min_wait: OsString,
    pub quiet_for: OsString,
}

#[derive(Clone, Debug, Default)]
pub struct StopOptions {
    pub stop_after: OsString,
    pub touch: Vec<OsString>,
    pub signal: Option<OsString>,
    pub signal_target: Option<OsString>,
    pub http: Vec<OsString>,
    pub exec: Vec<OsString>,
}

#[derive(Clone, Debug, Default)]
pub struct WaitOptions {
    pub wait_lock: Vec<OsString>,
    pub wait_pid: Vec<OsString>,
    pub wait_conns: Vec<OsString>,
    pub wait_http: Vec<OsString>,
    pub count_idle_conns: bool,
    pub lock_pid: bool,
    pub poll_interval: OsString,
}

#[derive(Clone, Debug, Default)]
pub struct OutputOptions {
    pub log_target: OsString,
    pub log_format: OsString,
    pub progress_interval: OsString,
}

#[derive(Debug)]
pub struct Config {
    pub budget: BudgetConfig,
    pub stop: StopPlan,
    pub wait: WaitPlan,
    pub output: OutputConfig,
    pub dry_run: bool,
    pub state_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BudgetConfig {
    pub grace: Duration,
    pub reserve: Duration,
    pub min_wait: Duration,
    pub quiet_for: Duration,
}

impl BudgetConfig {
    /// How long the hook may run: grace - reserve (validated to be positive).
    pub fn total(&self) -> Duration {
        self.grace.saturating_sub(self.reserve)
    }
}

#[derive(Debug, Default, Hash)]
pub struct StopPlan {
    /// How long after termination began the stop actions run (`--stop-after`).
    pub after: Duration,
    pub touch: Vec<PathBuf>,
    pub signal: Option<SignalAction>,
    pub http: Vec<Request>,
    pub exec: Vec<ExecCommand>,
}

#[derive(Debug, Hash)]
pub struct SignalAction {
    pub signal: Signal,
    pub target: Target,
    /// Whether the user named the target (an implicit PID 1 is checked against host inits).
    pub explicit_target: bool,
    /// What PID 1 stands for when the target is resolved.
    pub pid1: Pid1,
    /// For a PID or pidfile target, the process it named when the options were checked
    /// (`None` if none was running), pinned: a process that took its PID by the time the
    /// signal goes out is never signalled.
    pub pinned: Option<Pinned>,
}

#[derive(Clone, Debug, Hash)]
pub struct ExecCommand {
    /// The command as the user wrote it, for the log.
    pub display: String,
    /// The resolved program (absolute or as found in `PATH`).
    pub program: PathBuf,
    pub args: Vec<String>,
}

#[derive(Clone, Debug, Hash)]
pub struct WaitPlan {
    pub locks: Vec<LockGlob>,
    pub pids: Vec<Target>,
    /// What PID 1 stands for in `pids`, when a target is resolved.
    pub pid1: Pid1,
    pub conns: Vec<ConnsSpec>,
    /// URLs that answer 2xx once the app has drained (`--wait-http`).
    pub http: Vec<Request>,
    /// Count idle connections as in flight too (`--count-idle-conns`).
    pub count_idle_conns: bool,
    /// A lock file holding just a PID names its holder (`--lock-pid`).
    pub lock_pid: bool,
    pub poll_interval: Duration,
}

impl WaitPlan {
    /// Whether there is nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
            && self.pids.is_empty()
            && self.conns.is_empty()
            && self.http.is_empty()
    }
}

/// A local port whose connections are waited for (`--wait-conns`), on one address or all.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnsSpec {
    pub addr: Option<IpAddr>,
    pub port: u16,
}

impl fmt::Display for ConnsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, ":{}", self.port),
            Some(IpAddr::V4(v4)) => write!(f, "{v4}:{}", self.port),
            Some(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
        }
    }
}

/// A `--wait-lock` glob, made absolute and compiled.
#[derive(Clone, Debug)]
pub struct LockGlob {
    /// The glob as an absolute path string (relative globs are taken from the working
    /// directory at start, so a later `cd` cannot change what is watched).
    pub absolute: String,
    pub pattern: glob::Pattern,
}

impl Hash for LockGlob {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.absolute.hash(state);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Auto,
    Pid1,
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct OutputConfig {
    pub target: LogTarget,
    pub format: LogFormat,
    pub progress_interval: Duration,
}

impl Config {
    /// Validates a drain's options. `pid1` says what PID 1 is: in a rehearsal it is the app,
    /// so the host-init check on the default signal target does not apply.
    pub fn from_options(args: &DrainOptions, pid1: Pid1) -> Result<Config, Error> {
        let budget = budget(&args.budget)?;
        let wait = wait_plan(&args.wait, pid1)?;
        let stop = stop_plan(&args.stop, pid1, Instant::now() + budget.total())?;
        if stop.after > budget.total() {
            return Err(Error::Config(format!(
                "--stop-after {} is longer than the hook's budget of {}: the stop actions \
                 would never run",
                show(stop.after),
                show(budget.total())
            )));
        }
        let output = output(&args.output)?;
        let state_dir = PathBuf::from(path("--state-dir", &args.state_dir)?);
        Ok(Config {
            budget,
            stop,
            wait,
            output,
            dry_run: args.dry_run,
            state_dir,
        })
    }

    /// A stable digest of what this hook does: invocations with the same digest are the
    /// same hook delivered again, and share one termination in the state directory.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = Fnv1a::default();
        self.budget.hash(&mut hasher);
        self.stop.hash(&mut hasher);
        self.wait.hash(&mut hasher);
        hasher.finish()
    }
}

pub fn budget(args: &BudgetOptions) -> Result<BudgetConfig, Error> {
    let budget = BudgetConfig {
        grace: duration(
            "--grace-period",
            text("--grace-period", &args.grace_period)?,
        )?,
        reserve: duration("--reserve", text("--reserve", &args.reserve)?)?,
        min_wait: duration("--min-wait", text("--min-wait", &args.min_wait)?)?,
        quiet_for: duration("--quiet-for", text("--quiet-for", &args.quiet_for)?)?,
    };
    if budget.reserve >= budget.grace {
        return Err(Error::Config(format!(
            "--reserve {} is not less than --grace-period {}: the hook would have no time at all",
            show(budget.reserve),
            show(budget.grace)
        )));
    }
    let total = budget.total();
    if budget.min_wait > total {
        return Err(Error::Config(format!(
            "--min-wait {} is longer than the hook's budget of {} (grace {} - reserve {})",
            show(budget.min_wait),
            show(total),
            show(budget.grace),
            show(budget.reserve)
        )));
    }
    if budget.quiet_for > total {
        return Err(Error::Config(format!(
            "--quiet-for {} is longer than the hook's budget of {}: it could never hold",
            show(budget.quiet_for),
            show(total)
        )));
    }
    Ok(budget)
}

pub fn wait_plan(args: &WaitOptions, pid1: Pid1) -> Result<WaitPlan, Error> {
    let locks = args
        .wait_lock
        .iter()
        .map(|g| lock_glob(g))
        .collect::<Result<_, _>>()?;
    let targets = args
        .wait_pid
        .iter()
        .map(|t| target("--wait-pid", t))
        .collect::<Result<_, _>>()?;
    let mut conns: Vec<ConnsSpec> = Vec::new();
    for value in &args.wait_conns {
        // The same port twice is one condition, not two sets of sockets to watch it with.
        let spec = conns_spec(value)?;
        if !conns.contains(&spec) {
            conns.push(spec);
        }
    }
    let http = args
        .wait_http
        .iter()
        .map(|u| http::wait(u))
        .collect::<Result<_, _>>()?;
    Ok(WaitPlan {
        locks,
        pids: targets,
        pid1,
        conns,
        http,
        count_idle_conns: args.count_idle_conns,
        lock_pid: args.lock_pid,
        poll_interval: positive_duration(
            "--poll-interval",
            text("--poll-interval", &args.poll_interval)?,
        )?,
    })
}

/// `by`: no look through `/proc` (the default signal target) runs past it.
fn stop_plan(args: &StopOptions, pid1: Pid1, by: Instant) -> Result<StopPlan, Error> {
    let touch = args
        .touch
        .iter()
        .map(|p| touch_path(p))
        .collect::<Result<_, _>>()?;
    let http = args
        .http
        .iter()
        .map(|r| http::action(r))
        .collect::<Result<_, _>>()?;
    let exec = args
        .exec
        .iter()
        .map(|c| exec_command(c))
        .collect::<Result<_, _>>()?;
    let signal = match (&args.signal, &args.signal_target) {
        (None, None) => None,
        (None, Some(t)) => {
            return Err(Error::usage(
                "--signal-target",
                t,
                "given without --signal, so nothing would be sent",
            ));
        }
        (Some(s), explicit) => {
            let signal = signal("--signal", text("--signal", s)?)?;
            let target = match explicit {
                Some(t) => target("--signal-target", t)?,
                None => default_target(pid1, by)?,
            };
            // The process a PID or pidfile names now, pinned: the one signalled later
            // (a pidfile still naming it then), never one that took its PID meanwhile.
            let pinned = match &target {
                Target::Pid(_) | Target::PidFile(_) => match target.resolve(pid1, by) {
                    Ok(Named::Pids(named)) => {
                        let pid = named[0];
                        Pinned::pin(pid).map_err(|e| {
                            Error::system(format!("cannot pin pid {pid} to signal it later"), e)
                        })?
                    }
                    _ => None,
                },
                // Named at the time of use, as is what they name.
                Target::Name(_) | Target::Children(_) => None,
            };
            Some(SignalAction {
                signal,
                target,
                explicit_target: explicit.is_some(),
                pid1,
                pinned,
            })
        }
    };
    Ok(StopPlan {
        after: duration("--stop-after", text("--stop-after", &args.stop_after)?)?,
        touch,
        signal,
        http,
        exec,
    })
}

/// The signal target when none is given: PID 1, the container's main process, unless PID 1
/// is a host's init (not in a container at all) or the pod's `/pause`; then the oldest
/// process in prestop's own cgroup, which is the container's main process.
fn default_target(pid1: Pid1, by: Instant) -> Result<Target, Error> {
    if pid1 != Pid1::Real {
        return Ok(Target::Pid(ProcessId::INIT));
    }
    let refuse = |why: String| {
        Error::usage(
            "--signal-target",
            "1",
            format!("default target refused: {why}; pass --signal-target explicitly"),
        )
    };
    match Init::detect() {
        Init::Pause => match crate::process::container_main(by) {
            Ok(Some(main)) => Ok(Target::Pid(main)),
            Ok(None) => Err(refuse(
                "PID 1 is /pause (shareProcessNamespace) and no other process shares prestop's \
                 cgroup"
                    .into(),
            )),
            Err(e) => Err(refuse(format!(
                "PID 1 is /pause (shareProcessNamespace) and the container's main process \
                 cannot be found: {}",
                crate::process::describe_io(&e)
            ))),
        },
        init => match init.refusal() {
            Some(why) => Err(refuse(why)),
            None => Ok(Target::Pid(ProcessId::INIT)),
        },
    }
}

fn output(args: &OutputOptions) -> Result<OutputConfig, Error> {
    let target = match args.log_target.to_str() {
        Some("auto") => LogTarget::Auto,
        Some("pid1") => LogTarget::Pid1,
        Some("stdout") => LogTarget::Stdout,
        Some("stderr") => LogTarget::Stderr,
        _ => LogTarget::File(log_file(&args.log_target)?),
    };
    let format = match text("--log-format", &args.log_format)? {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(Error::usage("--log-format", other, "expected text or json"));
        }
    };
    Ok(OutputConfig {
        target,
        format,
        progress_interval: positive_duration(
            "--progress-interval",
            text("--progress-interval", &args.progress_interval)?,
        )?,
    })
}

/// A log file: a path whose directory exists, and that is a regular file (or a character
/// device such as `/dev/null`) if it exists. A directory, FIFO or socket would lose every
/// line or block the hook.
fn log_file(value: &OsStr) -> Result<PathBuf, Error> {
    let path = existing_parent("--log-target", value)?;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() || meta.file_type().is_char_device() => Ok(path),
        Ok(meta) => Err(Error::usage(
            "--log-target",
            value,
            format!(
                "is {}, not a file (for the hook's own streams, say stdout or stderr)",
                file_kind(&meta)
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path),
        Err(e) => Err(Error::usage(
            "--log-target",
            value,
            process::describe_io(&e),
        )),
    }
}

/// What kind of file this is, in words, for an error.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// An option's value as text: one line naming the option if it is not UTF-8.
pub fn text<'a>(option: &str, value: &'a OsStr) -> Result<&'a str, Error> {
    value
        .to_str()
        .ok_or_else(|| Error::usage(option, value, "not valid UTF-8"))
}

/// A path, glob or command must hold no control character: one command-line argument is
/// one value, and a name with a newline in it could pass for a line of prestop's own log.
pub(crate) fn no_controls(option: &str, value: &OsStr) -> Result<(), Error> {
    // C0 and DEL in any bytes; in text also C1 (U+0080 to U+009F: NEL breaks lines too).
    let control = match value.to_str() {
        Some(text) => text.chars().any(char::is_control),
        None => value.as_bytes().iter().any(|&b| b < 0x20 || b == 0x7f),
    };
    if control {
        return Err(Error::usage(
            option,
            value,
            "holds a control character (a newline separates values only in a PRESTOP_* \
             variable, never in one argument)",
        ));
    }
    Ok(())
}

/// A path: not empty, and free of control characters.
pub(crate) fn path<'a>(option: &str, value: &'a OsStr) -> Result<&'a OsStr, Error> {
    if value.is_empty() {
        return Err(Error::usage(option, value, "empty path"));
    }
    no_controls(option, value)?;
    Ok(value)
}

/// A duration: humantime forms (`300ms`, `45s`, `5m`, `1h 30m`) or a bare whole number of
/// seconds, as `terminationGracePeriodSeconds` is written.
pub fn duration(option: &str, text: &str) -> Result<Duration, Error> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(Error::usage(
            option,
            text,
            "empty, expected a duration such as 30s",
        ));
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .ok()
            .filter(|&s| s <= MAX_SECONDS)
            .map(Duration::from_secs)
            .ok_or_else(|| Error::usage(option, text, "too large"));
    }
    let parsed = humantime::parse_duration(trimmed).map_err(|e| {
        Error::usage(
            option,
            text,
            format!("{e}; expected a duration such as 300ms, 45s, 5m, or a number of seconds"),
        )
    })?;
    if parsed.as_secs() > MAX_SECONDS {
        return Err(Error::usage(option, text, "too large"));
    }
    Ok(parsed)
}

/// Longest duration accepted: a year. Anything longer is a typo, and keeping durations this
/// small means `Instant + Duration` can never overflow.
const MAX_SECONDS: u64 = 366 * 24 * 3600;

/// Shortest `--poll-interval` and `--progress-interval`: anything shorter would spin a CPU
/// that counts against the app's cgroup.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

fn positive_duration(option: &str, text: &str) -> Result<Duration, Error> {
    let d = duration(option, text)?;
    if d < MIN_INTERVAL {
        return Err(Error::usage(
            option,
            text,
            "must be at least 10ms (shorter would spin a CPU in the app's cgroup)",
        ));
    }
    Ok(d)
}

/// A signal by name (`TSTP`, `SIGTSTP`, case-insensitive) or number (`20`).
pub fn signal(option: &str, text: &str) -> Result<Signal, Error> {
    let bad = |why: &str| Error::usage(option, text, why);
    if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        let n: i32 = text.parse().map_err(|_| bad("no such signal number"))?;
        return Signal::try_from(n).map_err(|_| bad("no such signal number"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| bad("unknown signal; expected a name such as TERM, TSTP, USR1 or a number"))
}

/// A local port: `8080`, `:8080`, `127.0.0.1:8080` or `[::1]:8080`. No name is resolved:
/// the hook runs in the pod's network namespace, where the port is the app's own.
pub fn conns_spec(value: &OsStr) -> Result<ConnsSpec, Error> {
    no_controls("--wait-conns", value)?;
    let text = text("--wait-conns", value)?;
    let bad = |why: &str| Error::usage("--wait-conns", text, why);
    let (addr, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, port) = rest
            .split_once("]:")
            .ok_or_else(|| bad("expected [IPv6]:PORT"))?;
        let v6: std::net::Ipv6Addr = v6.parse().map_err(|_| bad("not an IPv6 address"))?;
        (Some(IpAddr::V6(v6)), port)
    } else if let Some((addr, port)) = text.rsplit_once(':') {
        let addr = match addr {
            "" => None,
            a => Some(IpAddr::V4(a.parse().map_err(|_| {
                bad("not an IPv4 address (prestop resolves no names; [IPv6]:PORT for IPv6)")
            })?)),
        };
        (addr, port)
    } else {
        (None, text)
    };
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let port = match port.parse::<u16>() {
        Ok(0) => return Err(bad("port 0 is no port")),
        Ok(port) if digits => port,
        _ => {
            return Err(bad(
                "expected a port from 1 to 65535: PORT, :PORT or ADDRESS:PORT",
            ));
        }
    };
    // The wildcard is where a server listens, never a connection's local address: it means
    // every address, as a bare port does.
    let addr = addr.filter(|a| !a.is_unspecified());
    Ok(ConnsSpec { addr, port })
}

/// A process target: `PID`, `pidfile:PATH`, `name:NAME`, or `children:` one of those. A
/// pidfile is read when the target is used; one that exists now must already hold a process
/// ID.
pub fn target(option: &str, value: &OsStr) -> Result<Target, Error> {
    no_controls(option, value)?;
    let text = text(option, value)?;
    if let Some(parent) = text.strip_prefix("children:") {
        if parent.starts_with("children:") {
            return Err(Error::usage(
                option,
                text,
                "children: of children: is not a target",
            ));
        }
        let parent = target(option, parent.as_ref()).map_err(|e| match e {
            Error::Usage { reason, .. } => Error::usage(option, text, reason),
            other => other,
        })?;
        return Ok(Target::Children(Box::new(parent)));
    }
    if let Some(path) = text.strip_prefix("pidfile:") {
        if path.is_empty() {
            return Err(Error::usage(option, text, "expected a path after pidfile:"));
        }
        let path = PathBuf::from(path);
        process::read_pidfile(&path).map_err(|why| Error::usage(option, text, why))?;
        return Ok(Target::PidFile(path));
    }
    if let Some(name) = text.strip_prefix("name:") {
        if name.is_empty() || name.contains('/') {
            return Err(Error::usage(
                option,
                text,
                "expected a process name without '/' after name:",
            ));
        }
        return Ok(Target::Name(name.to_owned()));
    }
    ProcessId::parse(text).map(Target::Pid).map_err(|why| {
        Error::usage(
            option,
            text,
            format!("{why} (or pidfile:PATH, name:NAME, children:TARGET)"),
        )
    })
}

fn lock_glob(value: &OsStr) -> Result<LockGlob, Error> {
    no_controls("--wait-lock", value)?;
    let text = text("--wait-lock", value)?;
    if text.is_empty() {
        return Err(Error::usage("--wait-lock", text, "empty glob"));
    }
    // Shell syntax that this glob dialect reads literally: the glob would match nothing,
    // and "nothing" would read as drained.
    if text
        .replace("[{]", "")
        .replace("[}]", "")
        .contains(['{', '}'])
    {
        return Err(Error::usage(
            "--wait-lock",
            text,
            "braces are not glob syntax here: give --wait-lock once per alternative (or \
             write [{] and [}] for literal braces)",
        ));
    }
    if text.contains("[^") {
        return Err(Error::usage(
            "--wait-lock",
            text,
            "[^...] is not negation here: write [!...]",
        ));
    }
    let joined = if text.starts_with('/') {
        text.to_owned()
    } else {
        let cwd = std::env::current_dir()
            .map_err(|e| Error::usage("--wait-lock", text, format!("relative glob, but {e}")))?;
        let cwd = cwd.to_str().ok_or_else(|| {
            Error::usage(
                "--wait-lock",
                text,
                "relative glob in a non-UTF-8 directory",
            )
        })?;
        // The directory is literal: a '[' or '*' in its name must not act as a wildcard.
        format!(
            "{}/{text}",
            glob::Pattern::escape(cwd.trim_end_matches('/'))
        )
    };
    // `//` and a trailing '/' would never match the paths built from directory entries.
    let mut absolute = String::with_capacity(joined.len());
    for component in joined.split('/').filter(|c| !c.is_empty()) {
        absolute.push('/');
        absolute.push_str(component);
    }
    if absolute.is_empty() {
        return Err(Error::usage(
            "--wait-lock",
            text,
            "names the root directory, not a file",
        ));
    }
    let pattern = glob::Pattern::new(&absolute)
        .map_err(|e| Error::usage("--wait-lock", text, format!("invalid glob: {}", e.msg)))?;
    Ok(LockGlob { absolute, pattern })
}

/// A sentinel to create: its directory must exist, and if the file exists already it must be
/// a regular file (a FIFO would block or fail the touch, a directory cannot be one).
fn touch_path(value: &OsStr) -> Result<PathBuf, Error> {
    let path = existing_parent("--touch", value)?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        // A symlink is followed, as touch(1) does: it must lead to a file, or to where one
        // can be created.
        Ok(meta) if meta.file_type().is_symlink() => match std::fs::metadata(&path) {
            Ok(target) if target.is_file() => Ok(path),
            Ok(target) => Err(Error::usage(
                "--touch",
                value,
                format!("leads to {}, not a file", file_kind(&target)),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dangling = std::fs::read_link(&path)
                    .map_err(|e| Error::usage("--touch", value, process::describe_io(&e)))?;
                let target = path.parent().unwrap_or(Path::new(".")).join(dangling);
                existing_parent("--touch", target.as_os_str())
                    .map_err(|_| {
                        Error::usage(
                            "--touch",
                            value,
                            format!(
                                "is a symlink to {}, whose directory does not exist",
                                target.display()
                            ),
                        )
                    })
                    .map(|_| path)
            }
            Err(e) => Err(Error::usage("--touch", value, process::describe_io(&e))),
        },
        Ok(meta) => Err(Error::usage(
            "--touch",
            value,
            format!("is {}", file_kind(&meta)),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path),
        Err(e) => Err(Error::usage("--touch", value, process::describe_io(&e))),
    }
}

/// A path of a file whose parent directory exists, so that creating it can work.
fn existing_parent(option: &str, value: &OsStr) -> Result<PathBuf, Error> {
    if value.as_bytes().ends_with(b"/") {
        return Err(Error::usage(
            option,
            value,
            "ends with /, so it names a directory, not a file",
        ));
    }
    let path = PathBuf::from(path(option, value)?);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&parent) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(Error::usage(
            option,
            value,
            format!("{} is not a directory", parent.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::usage(
            option,
            value,
            format!("directory {} does not exist", parent.display()),
        )),
        Err(e) => Err(Error::usage(
            option,
            value,
            format!(
                "directory {}: {}",
                parent.display(),
                process::describe_io(&e)
            ),
        )),
    }
}

fn exec_command(value: &OsStr) -> Result<ExecCommand, Error> {
    no_controls("--exec", value)?;
    let text = text("--exec", value)?;
    let words = split_words(text).map_err(|why| Error::usage("--exec", text, why))?;
    let Some((program, args)) = words.split_first() else {
        return Err(Error::usage("--exec", text, "empty command"));
    };
    let resolved = find_program(program)
        .ok_or_else(|| Error::usage("--exec", text, format!("program {program} not found")))?;
    Ok(ExecCommand {
        display: text.to_owned(),
        program: resolved,
        args: args.to_vec(),
    })
}

/// Finds a program as `execvp` would: a name with a '/' is a path, any other is looked up
/// in `PATH`. Only executable regular files count.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let is_executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return is_executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

/// Splits a command into words as a POSIX shell would for quoting: single quotes, double
/// quotes with backslash escapes, and backslash outside quotes. No expansion of any kind.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => word.push(c),
                    None => return Err("trailing backslash".into()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Shows a duration in seconds, as `terminationGracePeriodSeconds` counts them: `295s`,
/// `1.5s`, or `250ms` below a second.
pub fn show(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_millis(1) {
        return humantime::format_duration(d).to_string();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if d.subsec_nanos() == 0 {
        return format!("{}s", d.as_secs());
    }
    let text = crate::budget::decimal(d, 3);
    format!("{}s", text.trim_end_matches('0'))
}

/// FNV-1a: a tiny hash that gives the same digest in every build, unlike `DefaultHasher`,
/// which is allowed to change between Rust releases.
#[derive(Debug)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

mod hold;
mod http;
#[cfg(test)]
mod properties;

pub use hold::{HoldConfig, HoldOptions, hold};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_humantime_and_bare_seconds() {
        assert_eq!(
            duration("--x", "300ms").unwrap(),
            Duration::from_millis(300)
        );
        assert_eq!(duration("--x", "45s").unwrap(), Duration::from_secs(45));
        assert_eq!(duration("--x", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(duration("--x", "30").unwrap(), Duration::from_secs(30));
        assert_eq!(duration("--x", "0").unwrap(), Duration::ZERO);
        for bad in ["", "abc", "-5s", "5 parsecs", "99999999999999999999", "1.5"] {
            let e = duration("--grace-period", bad).unwrap_err().to_string();
            assert!(e.starts_with("--grace-period "), "{e}");
        }
        assert!(positive_duration("--poll-interval", "0s").is_err());
        assert!(positive_duration("--poll-interval", "1ns").is_err());
        assert!(positive_duration("--poll-interval", "10ms").is_ok());
    }

    #[test]
    fn durations_show_in_seconds() {
        assert_eq!(show(Duration::from_secs(295)), "295s");
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(Duration::from_millis(250)), "250ms");
        assert_eq!(show(Duration::from_millis(1500)), "1.5s");
        assert_eq!(show(Duration::from_millis(2001)), "2.001s");
        assert_eq!(show(Duration::from_nanos(1)), "1ns");
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(signal("--signal", "TSTP").unwrap(), Signal::SIGTSTP);
        assert_eq!(signal("--signal", "SIGUSR1").unwrap(), Signal::SIGUSR1);
        assert_eq!(signal("--signal", "term").unwrap(), Signal::SIGTERM);
        assert_eq!(signal("--signal", "10").unwrap(), Signal::SIGUSR1);
        for bad in ["", "0", "99", "SIGFOO", "-9", "KILL9"] {
            assert!(signal("--signal", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            target("--x", "42".as_ref()).unwrap(),
            Target::Pid(ProcessId::parse("42").unwrap())
        );
        assert_eq!(
            target("--x", "name:nginx".as_ref()).unwrap(),
            Target::Name("nginx".into())
        );
        // A pidfile that is not there yet is read when it is used.
        assert_eq!(
            target("--x", "pidfile:/nonexistent/x.pid".as_ref()).unwrap(),
            Target::PidFile("/nonexistent/x.pid".into())
        );
        for bad in [
            "0",
            "-1",
            "name:",
            "name:a/b",
            "",
            "pid:4",
            "pidfile:",
            "name:a\nb",
            "1\n2",
        ] {
            assert!(target("--x", bad.as_ref()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words("nginx -s quit").unwrap(),
            ["nginx", "-s", "quit"]
        );
        assert_eq!(
            split_words(r#"sh -c 'echo "hi there"' a\ b "x\"y" '' "#).unwrap(),
            ["sh", "-c", r#"echo "hi there""#, "a b", r#"x"y"#, ""]
        );
        assert!(split_words("echo 'oops").is_err());
        assert!(split_words("echo \"oops").is_err());
        assert!(split_words("echo oops\\").is_err());
        assert!(split_words("   ").unwrap().is_empty());
    }

    #[test]
    fn fingerprint_is_stable_across_builds() {
        // The published FNV-1a 64-bit test vector for "a".
        let mut a = Fnv1a::default();
        a.write(b"a");
        assert_eq!(a.finish(), 0xaf63_dc4c_8601_ec8c);
    }
}
