//! The one event loop: everything prestop waits for — inotify, pidfds, pipes, sockets, timers
//! and its own interrupts — is waited for here, in one `ppoll`.
//!
//! A waiting part of prestop (the drain's wait, the supervision of an `--exec` command, the
//! rehearsal's kubelet, the sample worker) is a `Machine`: it says which fds to watch and when
//! to wake, and reacts to what is ready and to the time. `run` owns the loop, so each of them
//! gets the same guarantees: it sleeps until something can matter and never spins; a timed
//! wake-up meant to be exact (a deadline) is not let late by the kernel's timer slack; and
//! Ctrl-C (or any signal `Interrupts` handles) ends the wait at once, whatever the machine is
//! waiting for. A round allocates nothing once its fd set has grown to size. This module must
//! never decide anything for a machine: it only sleeps and wakes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;

use crate::interrupt::Interrupts;

/// The kernel lets a poll timeout fire late by 0.1% of its length (0.5% for a niced process),
/// capped at 100 ms (`select_estimate_accuracy`), to batch timer interrupts: a 295 s wait for
/// the deadline could end 100 ms past it. So a wait for an exact instant longer than
/// `EXACT_WAIT` stops short by the most that slack can be, and the rest is waited with a short
/// timeout whose slack is negligible: one extra wake-up per such wait.
/// The slack as a fraction of the wait: one 200th (0.5%).
const POLL_SLACK: u32 = 200;
const POLL_SLACK_MAX: Duration = Duration::from_millis(100);
/// Waits up to this long are taken in one go: their slack is at most a millisecond.
const EXACT_WAIT: Duration = Duration::from_millis(200);

/// Something that waits: for fds to be ready and for instants to pass.
pub trait Machine {
    /// Names one watched fd, so that `ready` knows which it was.
    type Source: Copy;
    /// What the machine ends with.
    type Output;

    /// Acts on the time and on what the last events changed: ends with an output, or says
    /// when to wake next. Called before every wait, so also right after events.
    fn tick(&mut self, now: Instant) -> Step<Self::Output>;

    /// The fds to watch until the next tick.
    fn watch(&self, fds: &mut Watch<Self::Source>);

    /// A watched fd is ready: readable (or writable, if watched for that), hung up or in error.
    fn ready(&mut self, source: Self::Source);
}

/// What a machine's tick decided.
pub enum Step<T> {
    Done(T),
    Sleep(Wake),
}

/// When to wake if no fd is ready first.
#[derive(Clone, Copy, Debug)]
pub struct Wake {
    /// The soonest instant something is due.
    pub at: Instant,
    /// An instant (at or after `at`) that must not be passed by even a millisecond, such as
    /// a deadline; `at` itself may come a little late (a progress line, a poll).
    pub exact: Instant,
}

impl Wake {
    /// Wake exactly at `at`.
    pub fn at(at: Instant) -> Wake {
        Wake { at, exact: at }
    }
}

/// The fds one round watches, kept between rounds so that a round allocates nothing.
pub struct Watch<S> {
    fds: Vec<libc::pollfd>,
    /// The source of each fd; `None` for the interrupts, which the loop handles itself.
    sources: Vec<Option<S>>,
}

impl<S: Copy> Watch<S> {
    fn new() -> Watch<S> {
        Watch {
            fds: Vec::new(),
            sources: Vec::new(),
        }
    }

    /// Watches `fd` for this round. The fd must stay open until the round's wait is over,
    /// which it does when it belongs to the machine, borrowed for `watch`.
    pub fn add(&mut self, fd: BorrowedFd<'_>, source: S) {
        self.push(fd, libc::POLLIN, Some(source));
    }

    /// Watches `fd` for this round until it can be written (a socket connecting or sending),
    /// as `add` does until it can be read.
    pub fn add_writable(&mut self, fd: BorrowedFd<'_>, source: S) {
        self.push(fd, libc::POLLOUT, Some(source));
    }

    fn push(&mut self, fd: BorrowedFd<'_>, events: libc::c_short, source: Option<S>) {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        self.sources.push(source);
    }

    fn clear(&mut self) {
        self.fds.clear();
        self.sources.clear();
    }

    fn is_ready(&self, slot: usize) -> bool {
        const READY: libc::c_short = libc::POLLIN | libc::POLLOUT | libc::POLLHUP | libc::POLLERR;
        self.fds[slot].revents & READY != 0
    }
}

/// Runs `machine` until it is done, or until one of `interrupts` arrives: `Err(signal)`, and
/// the machine is left as it was, for its owner to clean up after.
pub fn run<M: Machine>(
    machine: &mut M,
    interrupts: Option<&Interrupts>,
) -> Result<M::Output, Signal> {
    let mut watch = Watch::new();
    loop {
        let wake = match machine.tick(Instant::now()) {
            Step::Done(output) => return Ok(output),
            Step::Sleep(wake) => wake,
        };
        watch.clear();
        if let Some(interrupts) = interrupts {
            watch.push(interrupts.fd(), libc::POLLIN, None);
        }
        machine.watch(&mut watch);
        if !sleep(&mut watch.fds, wake) {
            continue;
        }
        for slot in 0..watch.fds.len() {
            if !watch.is_ready(slot) {
                continue;
            }
            match (watch.sources[slot], interrupts) {
                (Some(source), _) => machine.ready(source),
                (None, Some(interrupts)) => {
                    if let Some(signal) = interrupts.take() {
                        return Err(signal);
                    }
                }
                (None, None) => {}
            }
        }
    }
}

/// Sleeps until `until`, unless interrupted first.
/// Whether one fd is ready for `events` (`POLLIN`, `POLLOUT`) within `wait` (zero: now).
/// An interrupted poll is tried again for what is left; any other error is returned, never
/// taken for an answer.
pub fn poll_one(
    fd: BorrowedFd<'_>,
    events: nix::poll::PollFlags,
    wait: Duration,
) -> nix::Result<bool> {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        // Rounded up, so that a wait shorter than a millisecond is not a non-blocking look.
        let millis = left.as_micros().div_ceil(1000);
        let timeout =
            nix::poll::PollTimeout::try_from(millis).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut poll = [nix::poll::PollFd::new(fd, events)];
        match nix::poll::poll(&mut poll, timeout) {
            Err(Errno::EINTR) if !left.is_zero() => {}
            other => return other.map(|n| n > 0),
        }
    }
}

pub fn sleep_until(until: Instant, interrupts: Option<&Interrupts>) -> Result<(), Signal> {
    struct Sleeper(Instant);
    impl Machine for Sleeper {
        type Source = ();
        type Output = ();
        fn tick(&mut self, now: Instant) -> Step<()> {
            if now >= self.0 {
                Step::Done(())
            } else {
                Step::Sleep(Wake::at(self.0))
            }
        }
        fn watch(&self, _: &mut Watch<()>) {}
        fn ready(&mut self, (): ()) {}
    }
    run(&mut Sleeper(until), interrupts)
}

/// Sleeps in `ppoll` until an fd is ready or `wake` comes; returns whether any fd is ready.
fn sleep(fds: &mut [libc::pollfd], wake: Wake) -> bool {
    let now = Instant::now();
    let mut wait = wake.at.saturating_duration_since(now);
    let to_exact = wake.exact.saturating_duration_since(now);
    // Where the kernel's slack could carry the wake-up past `exact`, wake that much earlier;
    // the next round waits out the rest with a short, exact timeout.
    if wait > EXACT_WAIT && wait + slack(wait) > to_exact {
        wait = wait.min(to_exact.saturating_sub(slack(to_exact)));
    }
    let timeout = libc::timespec {
        // Clamped to what a 32-bit `time_t` holds: 68 years is as good as forever here.
        tv_sec: wait
            .as_secs()
            .try_into()
            .unwrap_or_else(|_| i32::MAX.into()),
        tv_nsec: wait.subsec_nanos().into(),
    };
    // SAFETY: `fds` is a live, exclusively borrowed slice of `pollfd` of the length passed;
    // a closed fd in it would only be reported as POLLNVAL. The timeout is a live local,
    // and no signal mask is passed.
    let ready = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &raw const timeout,
            std::ptr::null(),
        )
    };
    if ready < 0 {
        let e = Errno::last();
        if e != Errno::EINTR {
            // ppoll(2) on valid fds only fails for lack of memory: back off instead of
            // spinning, and let the next round retry.
            crate::debug!("poll failed: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        return false;
    }
    ready > 0
}

/// The most the kernel may let a poll timeout of `wait` fire late.
fn slack(wait: Duration) -> Duration {
    (wait / POLL_SLACK).min(POLL_SLACK_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, OwnedFd};

    /// Counts what a pipe delivers, and ends once it has seen `want` readiness events.
    struct Reader {
        pipe: OwnedFd,
        seen: usize,
        want: usize,
        until: Instant,
    }

    impl Machine for Reader {
        type Source = char;
        type Output = usize;
        fn tick(&mut self, now: Instant) -> Step<usize> {
            if self.seen >= self.want || now >= self.until {
                Step::Done(self.seen)
            } else {
                Step::Sleep(Wake::at(self.until))
            }
        }
        fn watch(&self, fds: &mut Watch<char>) {
            fds.add(self.pipe.as_fd(), 'p');
        }
        fn ready(&mut self, source: char) {
            assert_eq!(source, 'p');
            let mut buf = [0u8; 64];
            let _ = nix::unistd::read(self.pipe.as_fd(), &mut buf);
            self.seen += 1;
        }
    }

    #[test]
    fn a_ready_fd_is_dispatched_to_its_source() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let mut write = std::fs::File::from(write);
        write.write_all(b"x").unwrap();
        let mut reader = Reader {
            pipe: read,
            seen: 0,
            want: 1,
            until: Instant::now() + Duration::from_secs(60),
        };
        assert_eq!(run(&mut reader, None), Ok(1));
    }

    #[test]
    fn a_machine_ends_at_its_instant_when_nothing_happens() {
        let (read, _write) = nix::unistd::pipe().unwrap();
        let until = Instant::now() + Duration::from_millis(20);
        let mut reader = Reader {
            pipe: read,
            seen: 0,
            want: 1,
            until,
        };
        assert_eq!(run(&mut reader, None), Ok(0));
        assert!(Instant::now() >= until, "woke before its instant");
        sleep_until(Instant::now(), None).unwrap();
    }
}
