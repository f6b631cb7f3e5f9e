//! Where prestop's lines go and what they look like.
//!
//! A hook's own output is thrown away by the kubelet unless the hook fails, so progress goes
//! to PID 1's stdout (`/proc/1/fd/1`), which `kubectl logs` shows; the final summary also goes
//! to the hook's own stdout, so a `FailedPreStopHook` event says why. Each line is written
//! with a single `write`, so lines from concurrent invocations never interleave. Writing is
//! best effort: a log that cannot be written must never stop or fail a drain.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use nix::poll::PollFlags;

use crate::config::{LogFormat, LogTarget, OutputConfig};
use crate::event::poll_one;
use crate::procfs::{Init, ProcessId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// A structured field of a record; the JSON format carries them all, the text format only
/// the message.
#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    Int(u64),
    Secs(Duration),
    List(Vec<String>),
    Bool(bool),
}

/// One line of output.
#[derive(Clone, Debug)]
pub struct Record {
    /// A stable name for machines: `start`, `signal`, `waiting`, `drained`, ...
    pub event: &'static str,
    pub level: Level,
    pub message: String,
    pub fields: Vec<(&'static str, Value)>,
}

impl Record {
    pub fn info(event: &'static str, message: impl Into<String>) -> Record {
        Record {
            event,
            level: Level::Info,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub fn warn(event: &'static str, message: impl Into<String>) -> Record {
        Record {
            level: Level::Warn,
            ..Record::info(event, message)
        }
    }

    #[must_use]
    pub fn with(mut self, key: &'static str, value: Value) -> Record {
        self.fields.push((key, value));
        self
    }

    /// Marks a step of the drain's sequence (an action taken, a condition drained, the
    /// outcome), as opposed to a progress or output line: a rehearsal's timeline keeps these.
    #[must_use]
    pub fn step(self) -> Record {
        self.with("step", Value::Bool(true))
    }

    /// One line of text. Control characters are escaped, so that no name (a lock file's,
    /// an `--exec` command's output) can break the line or forge one of prestop's own.
    pub fn text(&self) -> String {
        let message = escape(&self.message);
        match self.level {
            Level::Info => format!("prestop: {message}\n"),
            Level::Warn => format!("prestop: warning: {message}\n"),
        }
    }

    pub fn json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("{\"time\":");
        push_json_str(
            &mut out,
            &humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        );
        out.push_str(",\"level\":");
        out.push_str(match self.level {
            Level::Info => "\"info\"",
            Level::Warn => "\"warn\"",
        });
        out.push_str(",\"event\":");
        push_json_str(&mut out, self.event);
        out.push_str(",\"message\":");
        push_json_str(&mut out, &self.message);
        for (key, value) in &self.fields {
            out.push(',');
            push_json_str(&mut out, key);
            out.push(':');
            match value {
                Value::Str(s) => push_json_str(&mut out, s),
                Value::Int(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Secs(d) => {
                    out.push_str(&crate::budget::decimal(*d, 3));
                }
                Value::Bool(b) => {
                    let _ = write!(out, "{b}");
                }
                Value::List(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        push_json_str(&mut out, item);
                    }
                    out.push(']');
                }
            }
        }
        out.push_str("}\n");
        out
    }
}

/// `text` with its control characters escaped as Rust writes them (`\n`, `\u{1b}`), so that it
/// stays one line of text and cannot move a terminal's cursor; and with the characters that
/// a viewer may take for a line break (U+2028, U+2029) or that reorder what is shown (the
/// bidirectional controls) escaped too (`\u{202e}`).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else if hidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A character that does not show as itself in one line of a log: a control character, a
/// line or paragraph separator, or a bidirectional control.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// What a rehearsal needs of one JSON line written by `Record::json`.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadBack {
    pub event: String,
    pub message: String,
    pub step: bool,
}

/// Reads back one line written by `Record::json` (the hook's output in a rehearsal); `None`
/// for anything else. It understands exactly what `json` writes: a flat object of strings,
/// numbers, booleans and lists of strings.
pub fn read_json(line: &str) -> Option<ReadBack> {
    let mut chars = line.trim().chars().peekable();
    let mut back = ReadBack {
        event: String::new(),
        message: String::new(),
        step: false,
    };
    expect(&mut chars, '{')?;
    loop {
        let key = read_str(&mut chars)?;
        expect(&mut chars, ':')?;
        match chars.peek()? {
            '"' => {
                let value = read_str(&mut chars)?;
                match key.as_str() {
                    "event" => back.event = value,
                    "message" => back.message = value,
                    _ => {}
                }
            }
            '[' => {
                chars.next();
                while chars.peek() != Some(&']') {
                    read_str(&mut chars)?;
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                chars.next();
            }
            _ => {
                let mut scalar = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    scalar.push(c);
                    chars.next();
                }
                if key == "step" {
                    back.step = scalar == "true";
                }
            }
        }
        match chars.next()? {
            ',' => {}
            '}' => break,
            _ => return None,
        }
    }
    (chars.next().is_none() && !back.event.is_empty()).then_some(back)
}

fn expect(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, want: char) -> Option<()> {
    (chars.next()? == want).then_some(())
}

fn read_str(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
    expect(chars, '"')?;
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || hidden(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Where lines are written: a file descriptor that a reader who stops reading cannot block
/// for long. A pipe is written through a non-blocking descriptor of its own; a line that
/// cannot be written within `WRITE_WAIT` is dropped, and so is every line after it (without
/// waiting) until the reader reads again. prestop never hangs on its own log.
struct Out {
    file: Dest,
    /// Whether `Sink::Stdout` is this (the summary then goes there once).
    is_stdout: bool,
    /// The last write gave up: do not wait again until one succeeds.
    stalled: bool,
    /// A line was cut off part way: the next one starts on a line of its own.
    torn: bool,
}

/// The longest a line waits for a full pipe's reader, once per stall.
const WRITE_WAIT: Duration = Duration::from_millis(50);

/// What `Out` writes to.
enum Dest {
    /// Where a write cannot block for long: a regular file, or a descriptor opened anew
    /// non-blocking (a pipe, a terminal, a log file).
    Direct(File),
    /// What could not be opened anew (a socket), or prestop's own stdout or stderr where no
    /// descriptor was left to spare: a socket is sent to without waiting; anything else is
    /// written only when poll says it can take more, and no more than `POLLED_CHUNK` then.
    Polled(Polled),
}

enum Polled {
    Dup(File),
    Stdout,
    Stderr,
}

/// What a descriptor that poll calls writable takes without blocking: a pipe takes 4096
/// bytes then, a terminal only as much as is left below its 256-byte wake-up mark.
const POLLED_CHUNK: usize = 256;

impl Dest {
    fn with_fd<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
        match self {
            Dest::Direct(file) | Dest::Polled(Polled::Dup(file)) => f(file.as_fd()),
            Dest::Polled(Polled::Stdout) => f(io::stdout().as_fd()),
            Dest::Polled(Polled::Stderr) => f(io::stderr().as_fd()),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Dest::Direct(file) => file.write(bytes),
            Dest::Polled(_) => self.with_fd(|fd| {
                let part = &bytes[..bytes.len().min(POLLED_CHUNK)];
                let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
                match nix::sys::socket::send(fd.as_raw_fd(), part, flags) {
                    Err(nix::errno::Errno::ENOTSOCK) => {}
                    sent => return Ok(sent?),
                }
                if !poll_one(fd, PollFlags::POLLOUT, Duration::ZERO)? {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(nix::unistd::write(fd, part)?)
            }),
        }
    }
}

impl Out {
    fn new(file: Dest, is_stdout: bool) -> Out {
        Out {
            file,
            is_stdout,
            stalled: false,
            torn: false,
        }
    }

    /// prestop's own stdout or stderr (`fd` 1 or 2): a regular file as it is; anything else
    /// (a pipe, a terminal) through a non-blocking descriptor of its own, opened anew so that
    /// the shared one is left as it is; what cannot be opened anew is polled.
    fn std(fd: i32) -> Out {
        let (stdout, stderr) = (io::stdout(), io::stderr());
        let shared = if fd == 1 {
            stdout.as_fd()
        } else {
            stderr.as_fd()
        };
        let regular = nix::sys::stat::fstat(shared)
            .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG);
        let reopened = (!regular)
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
                    .open(format!("/proc/self/fd/{fd}"))
                    .ok()
            })
            .flatten();
        let dest = match reopened {
            Some(file) => Dest::Direct(file),
            None => match shared.try_clone_to_owned() {
                Ok(dup) if regular => Dest::Direct(File::from(dup)),
                Ok(dup) => Dest::Polled(Polled::Dup(File::from(dup))),
                // No descriptor left to spare: the summary still goes out, through the
                // shared one.
                Err(_) if fd == 1 => Dest::Polled(Polled::Stdout),
                Err(_) => Dest::Polled(Polled::Stderr),
            },
        };
        Out::new(dest, fd == 1)
    }

    fn write_line(&mut self, line: &[u8]) {
        let newline: &[u8] = if self.torn { b"\n" } else { b"" };
        let give_up = Instant::now()
            + if self.stalled {
                Duration::ZERO
            } else {
                WRITE_WAIT
            };
        let mut written = 0;
        for part in [newline, line] {
            let mut rest = part;
            while !rest.is_empty() {
                match self.file.write(rest) {
                    Ok(0) => return,
                    Ok(n) => {
                        rest = &rest[n..];
                        written += n;
                        self.stalled = false;
                        self.torn = part == line && !rest.is_empty();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if !wait_writable(&self.file, give_up) {
                            self.stalled = true;
                            self.torn |= written > 0 && part == line;
                            return;
                        }
                    }
                    // Best effort: PID 1's stdout may be a closed pipe by now.
                    Err(_) => return,
                }
            }
        }
        self.torn = false;
    }
}

/// Waits until `file` can take more bytes, or `until` passes; whether it can.
fn wait_writable(file: &Dest, until: Instant) -> bool {
    let left = until.saturating_duration_since(Instant::now());
    !left.is_zero() && file.with_fd(|fd| poll_one(fd, PollFlags::POLLOUT, left).unwrap_or(false))
}

pub struct Reporter {
    format: LogFormat,
    sink: Mutex<Option<Out>>,
    /// prestop's stdout, for the summary, where the log goes elsewhere.
    stdout: Mutex<Option<Out>>,
}

impl Reporter {
    /// Opens the configured target. A target that cannot be opened falls back to stderr and
    /// says so in a warning line, rather than failing the drain.
    pub fn open(config: &OutputConfig) -> Reporter {
        let (sink, warning) = open_sink(&config.target);
        let stdout = match &sink {
            Some(out) if out.is_stdout => None,
            _ => Some(Out::std(1)),
        };
        let reporter = Reporter {
            format: config.format,
            sink: Mutex::new(sink),
            stdout: Mutex::new(stdout),
        };
        if let Some(warning) = warning {
            reporter.emit(&Record::warn("log_target", warning));
        }
        reporter
    }

    pub fn emit(&self, record: &Record) {
        let line = self.render(record);
        write_to(&self.sink, line.as_bytes());
    }

    /// The final line: to the log like any other, and to the hook's own stdout too, which is
    /// what a `FailedPreStopHook` event shows.
    pub fn summary(&self, record: &Record) {
        self.emit(record);
        write_to(&self.stdout, self.render(record).as_bytes());
    }

    fn render(&self, record: &Record) -> String {
        match self.format {
            LogFormat::Text => record.text(),
            LogFormat::Json => record.json(),
        }
    }
}

fn write_to(out: &Mutex<Option<Out>>, line: &[u8]) {
    let mut out = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(out) = &mut *out {
        out.write_line(line);
    }
}

/// The log's destination (`None`: nowhere, stderr being closed), and a warning to log first
/// if the configured one could not be opened.
fn open_sink(target: &LogTarget) -> (Option<Out>, Option<String>) {
    // Opened non-blocking (`append`).
    let file = |f: File| Some(Out::new(Dest::Direct(f), false));
    let fallback = |what: &str, e: io::Error| {
        (
            Some(Out::std(2)),
            Some(format!("cannot open {what}: {e}; logging to stderr")),
        )
    };
    match target {
        LogTarget::Stdout => (Some(Out::std(1)), None),
        LogTarget::Stderr => (Some(Out::std(2)), None),
        LogTarget::File(path) => match append(path) {
            Ok(f) => (file(f), None),
            Err(e) => fallback(&format!("log file {}", path.display()), e),
        },
        LogTarget::Pid1 => match open_pid1() {
            Ok(f) => (file(f), None),
            Err(e) => fallback(PID1_STDOUT, e),
        },
        LogTarget::Auto => match auto_target() {
            Some(f) => (file(f), None),
            None => (Some(Out::std(2)), None),
        },
    }
}

const PID1_STDOUT: &str = "/proc/1/fd/1";

/// How long `auto` may look through `/proc` for the container's main process (under
/// `/pause`) before it settles for stderr.
const AUTO_LOOK: Duration = Duration::from_millis(200);

/// `auto`: the container's stdout, which is what `kubectl logs` shows: PID 1's, or where PID
/// 1 is the pod's `/pause` (`shareProcessNamespace: true`), the container's main process's.
/// stderr in a terminal or on a host.
fn auto_target() -> Option<File> {
    auto_choice()
        .ok()
        .and_then(|path| append(Path::new(&path)).ok())
}

/// The stdout `auto` would write to, or why it would use stderr instead.
fn auto_choice() -> Result<String, String> {
    if io::stderr().is_terminal() {
        return Err("stderr is a terminal".into());
    }
    if ProcessId::current() == ProcessId::INIT {
        return Err("prestop is PID 1".into());
    }
    match Init::detect() {
        Init::Host(name) => Err(format!("PID 1 is {name}, the host's init")),
        Init::Unknown => Err("/proc/1 cannot be read".into()),
        Init::App(_) => Ok(PID1_STDOUT.into()),
        Init::Pause => match crate::process::container_main(Instant::now() + AUTO_LOOK) {
            Ok(Some(main)) => Ok(format!("/proc/{main}/fd/1")),
            Ok(None) => Err("PID 1 is /pause, and no process shares prestop's cgroup".into()),
            Err(e) => Err(format!(
                "PID 1 is /pause, and the container's main process cannot be found: {}",
                crate::process::describe_io(&e)
            )),
        },
    }
}

/// What `auto` resolves to here, for a dry run's plan; opens nothing.
pub fn describe_auto() -> String {
    match auto_choice() {
        Ok(path) => {
            let writable =
                nix::unistd::access(path.as_str(), nix::unistd::AccessFlags::W_OK).is_ok();
            match (writable, path == PID1_STDOUT) {
                (true, true) => format!("{PID1_STDOUT}, PID 1's stdout"),
                (true, false) => format!("{path}, the container's main process's stdout"),
                (false, _) => format!("stderr: {path} is not writable"),
            }
        }
        Err(why) => format!("stderr: {why}"),
    }
}

fn open_pid1() -> io::Result<File> {
    append(Path::new(PID1_STDOUT))
}

/// Opens for appending: if PID 1's stdout is a file, a fresh open without `O_APPEND` would
/// start at offset 0 and overwrite the app's own log.
///
/// Non-blocking: if PID 1's stdout is a pipe that its reader has stopped draining, a line is
/// dropped rather than the hook hanging past its deadline.
fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_name_can_forge_a_line() {
        let forged = Record::info(
            "x",
            "lock /l/x\nprestop: drained after 0.1s\r\u{1b}[2K.lock",
        )
        .text();
        assert_eq!(forged.matches('\n').count(), 1, "{forged}");
        assert!(
            forged.ends_with("x\\nprestop: drained after 0.1s\\r\\u{1b}[2K.lock\n"),
            "{forged}"
        );
        assert_eq!(escape("plain ünïcode"), "plain ünïcode");
        // Shown right to left, this would read "lock a.lock": the override is escaped.
        assert_eq!(escape("lock \u{202e}kcol.a"), "lock \\u{202e}kcol.a");
        assert_eq!(escape("a\u{2028}b"), "a\\u{2028}b");
        let json = Record::info("x", "a\u{2029}b\u{2066}c").json();
        assert!(json.contains("a\\u2029b\\u2066c"), "{json}");
    }

    #[test]
    fn text_lines_carry_the_prefix() {
        assert_eq!(
            Record::info("drained", "drained after 1.2s").text(),
            "prestop: drained after 1.2s\n"
        );
        assert_eq!(
            Record::warn("x", "state dir unusable").text(),
            "prestop: warning: state dir unusable\n"
        );
    }

    #[test]
    fn json_escapes_and_carries_fields() {
        let line = Record::info("waiting", "a \"b\"\n\u{1}")
            .with("count", Value::Int(3))
            .with("left_s", Value::Secs(Duration::from_millis(1500)))
            .with("in_flight", Value::List(vec!["lock /a\\b".into()]))
            .json();
        assert!(line.ends_with("}\n"));
        assert!(line.contains(r#""event":"waiting""#));
        assert!(line.contains(r#""message":"a \"b\"\n\u0001""#));
        assert!(line.contains(r#""count":3"#));
        assert!(line.contains(r#""left_s":1.500"#));
        assert!(line.contains(r#""in_flight":["lock /a\\b"]"#));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn json_lines_read_back() {
        let record = Record::warn("signal", "sent \"X\" \\ \u{1}\t to pid 1")
            .with("count", Value::Int(3))
            .with("left_s", Value::Secs(Duration::from_millis(1500)))
            .with("in_flight", Value::List(vec!["a,]b".into(), String::new()]))
            .step();
        assert_eq!(
            read_json(&record.json()),
            Some(ReadBack {
                event: "signal".into(),
                message: "sent \"X\" \\ \u{1}\t to pid 1".into(),
                step: true,
            })
        );
        let plain = read_json(&Record::info("waiting", "w").json()).unwrap();
        assert!(!plain.step);
        for bad in [
            "",
            "{",
            "not json",
            r#"{"event":"x""#,
            r#"{"event":"x"} tail"#,
        ] {
            assert_eq!(read_json(bad), None, "{bad:?}");
        }
    }
}
