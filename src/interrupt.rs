//! Signals sent to prestop itself (Ctrl-C in a terminal, a `kill` from a supervisor).
//!
//! They are blocked and read from a `signalfd`, so the wait loop sees them as just another
//! event source and can finish its summary before exiting with 128+N. A signal mask is
//! inherited across `fork` and `exec`, so every child prestop starts goes through
//! `unblocked`, or an app would never see the SIGTERM it is sent. This module must be set up
//! before any thread starts, or a thread could take a signal the loop never sees.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals that end a drain early, with exit code 128+N.
const HANDLED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

pub struct Interrupts {
    fd: SignalFd,
}

impl Interrupts {
    pub fn install() -> nix::Result<Interrupts> {
        Interrupts::of(&HANDLED)
    }

    /// Blocks `signals` and reads them from a signalfd instead (`hold` forwards what it
    /// reads to its job).
    pub fn of(signals: &[Signal]) -> nix::Result<Interrupts> {
        let mut set = SigSet::empty();
        for &signal in signals {
            set.add(signal);
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Interrupts { fd })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The first pending signal, if any arrived.
    pub fn take(&self) -> Option<Signal> {
        let info = self.fd.read_signal().ok()??;
        Signal::try_from(info.ssi_signo as i32).ok()
    }
}

/// Makes `command` start its program with no signal blocked, whatever prestop blocks.
pub fn unblocked(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed; it only builds an empty set on the stack and calls pthread_sigmask, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        })
    }
}
