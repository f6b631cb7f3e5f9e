//! Every exit code prestop can return, what each means, and the help text that documents them.
//!
//! The kubelet reads a hook's exit code (non-zero records a `FailedPreStopHook` event), and
//! scripts read `check`'s, so the codes are a contract: they are defined here and nowhere else.
//! Other modules say *why* prestop ends (an `Exit`); only `main` turns that into a number.

use nix::sys::signal::Signal;

/// Why prestop ends, as the exit code says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: drained within the budget; `check`: drained; `rehearse`: graceful.
    Success,
    /// 1: budget exhausted with work still in flight; `check`: not drained or cannot tell;
    /// `rehearse`: drained late or killed. Also when the system refused what a drain needs.
    InFlight,
    /// 2: usage or configuration error; nothing was done.
    Usage,
    /// 3: drained, but a stop action failed (the wait still ran).
    StopFailed,
    /// 128+N: interrupted by signal N (130 for Ctrl-C), as a shell reports it.
    Interrupted(Signal),
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::InFlight => 1,
            Exit::Usage => 2,
            Exit::StopFailed => 3,
            Exit::Interrupted(signal) => 128 + signal as u8,
        }
    }
}

/// The exit codes of `drain` and `check`, as `--help` and the README list them.
pub const HELP: &str = "\
Exit codes:
  0      drained within the budget (or the waited-on process is gone)
  1      budget exhausted with work still in flight; the summary names what remains
  2      usage or configuration error; nothing was done
  3      drained, but a stop action failed (the wait still ran)
  128+N  interrupted by signal N while waiting (130 for Ctrl-C)";

/// The exit codes of `rehearse`, in its own terms.
pub const REHEARSE_HELP: &str =
    "Exit codes: 0 graceful, 1 drained-late or killed, 2 usage error, 128+N interrupted.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_their_help_text() {
        for exit in [Exit::Success, Exit::InFlight, Exit::Usage, Exit::StopFailed] {
            let line = format!("\n  {:<7}", exit.code());
            assert!(HELP.contains(&line), "{exit:?} is not documented");
        }
        assert_eq!(Exit::Interrupted(Signal::SIGINT).code(), 130);
        assert!(HELP.contains("128+N"));
    }
}
