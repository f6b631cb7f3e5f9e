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
    /// `hold`: COMMAND's own exit code, or 128+N if signal N killed it.
    Command(u8),
    /// 75 (`EX_TEMPFAIL`), `hold`: a drain has begun, so COMMAND was not started; try again
    /// later (in another pod).
    DrainBegun,
    /// 125, `hold`: the job's lock could not be set up, so COMMAND was not started.
    HoldFailed,
    /// 126, `hold`: COMMAND could not be started.
    CannotRun,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::InFlight => 1,
            Exit::Usage => 2,
            Exit::StopFailed => 3,
            Exit::Interrupted(signal) => 128 + signal as u8,
            Exit::Command(code) => code,
            Exit::DrainBegun => 75,
            Exit::HoldFailed => 125,
            Exit::CannotRun => 126,
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

/// The exit codes of `hold`: COMMAND's, except where it did not run.
pub const HOLD_HELP: &str = "\
Exit codes:
  N      COMMAND's own exit code, or 128+N if signal N ended it
  2      usage error; COMMAND did not run
  75     a drain of the state directory has begun: COMMAND did not run (try again later)
  125    the job's lock file could not be created: COMMAND did not run
  126    COMMAND could not be started";

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
        for exit in [
            Exit::Usage,
            Exit::DrainBegun,
            Exit::HoldFailed,
            Exit::CannotRun,
        ] {
            let line = format!("\n  {:<7}", exit.code());
            assert!(HOLD_HELP.contains(&line), "{exit:?} is not documented");
        }
        assert!(HELP.contains("128+N"));
    }
}
