//! `--wait-conns PORT`: drained when no client connection to that local port is in flight.
//!
//! The connections come from `inet_diag` dumps of the port (`sockdiag`), in prestop's network
//! namespace, which an exec hook shares with the app. What ends a connection raises an event
//! (the kernel's socket-destroy groups), so the last in-flight connection closing is seen at
//! once; what *starts* one raises none, so the port is also dumped again on a period: at least
//! every `REDUMP_FLOOR`, and no more often than `DUTY` of the time a dump takes, which keeps the
//! cost under 200 ms of CPU a minute with 10,000 connections open; a periodic dump is skipped
//! while the namespace's TCP counters (segments in and out, passive opens) have not moved,
//! as no connection can have started or changed then. Before the drain is declared, one more
//! dump confirms it.
//!
//! In flight: a handshake under way, a connection the app has not accepted, a request not read
//! or not answered (data received after the last data sent), a response not yet sent or not
//! yet acknowledged, or one still being sent (data sent within `SENDING`), and a connection on
//! which nothing was exchanged yet. An idle keep-alive connection is not, unless
//! `--count-idle-conns`. CLOSE-WAIT (the client has closed its side, the app not yet) follows
//! the same rules: a request it sent before closing is still answered; an idle one is the app's
//! to close. Once the app has closed a connection (FIN-WAIT-1, CLOSING, LAST-ACK), it is the
//! kernel's, and in flight only while the response it still holds has not been delivered: an
//! app that writes a large response and closes leaves its end in the send queue, which the
//! pod's teardown would cut. FIN-WAIT-2 and TIME-WAIT hold nothing and are never asked for.
//! A new connection, or data on an idle one, is activity: it restarts `--quiet-for`. Where
//! netlink is refused, `/proc/net/tcp` is read instead; it has no `tcp_info`, so every open
//! connection then counts as in flight.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::{Condition, Start};
use crate::config::ConnsSpec;
use crate::process::describe_io;
use crate::report::{Record, Reporter};
use crate::sockdiag::{self, Destroyed, Dumper, Socket, state};

/// The longest a new connection can go unseen: the period of the dumps when nothing else
/// prompts one. A dump of a port costs about 0.2 ms of CPU with 100 connections (the whole
/// node's connection table is walked), so one a second costs about 13 ms a minute.
const REDUMP_FLOOR: Duration = Duration::from_secs(1);
/// Dumps take at most this share of the time: 1/300 is 200 ms of CPU a minute, whatever
/// the number of connections (a dump of 10,000 costs about 11 ms).
const DUTY: u32 = 300;
/// A connection that sent data this recently is still sending a response (a stream, or a
/// download at a limited rate whose reader keeps up, shows no other sign).
const SENDING: Duration = Duration::from_secs(1);
/// Connections that stop counting as still sending are looked at in batches this far
/// apart, not one wake-up each: 10,000 answered within a second would otherwise mean 1,000.
const SENDING_BATCH: Duration = Duration::from_millis(250);
/// Where netlink is refused, `/proc/net/tcp` is read at least this far apart: one read walks
/// the whole table, tens of times slower than a dump.
const PROC_FLOOR: Duration = Duration::from_secs(5);
/// How many connections `check` lists, and a summary names.
const LISTED: usize = 20;

const STATES: u32 = (1 << state::LISTEN)
    | (1 << state::SYN_RECV)
    | (1 << state::ESTABLISHED)
    | (1 << state::CLOSE_WAIT)
    | (1 << state::FIN_WAIT1)
    | (1 << state::CLOSING)
    | (1 << state::LAST_ACK);

/// Where the connections are read from.
enum Source {
    Netlink {
        dumper: Dumper,
        destroyed: Destroyed,
    },
    Proc,
    NotStarted,
}

/// One connection, as the last look saw it.
#[derive(Clone, Debug)]
struct Conn {
    peer: (IpAddr, u16),
    state: u8,
    cookie: u64,
    /// Why it is in flight; `None` if it is idle.
    busy: Option<&'static str>,
    /// When it stops counting as still sending, if that is all that keeps it in flight.
    sending_until: Option<Instant>,
}

pub struct ConnWait {
    spec: ConnsSpec,
    count_idle: bool,
    label: String,
    source: Source,
    conns: Vec<Conn>,
    /// Cookies of every connection the last dump saw, to tell new ones and the ends of
    /// unseen ones.
    seen: HashSet<u64>,
    last_dump: Option<Instant>,
    next_dump: Instant,
    /// The namespace's TCP counters when the last dump began.
    activity_count: Option<u64>,
    activity: Option<Instant>,
    unknown: Option<String>,
}

impl ConnWait {
    pub fn new(spec: &ConnsSpec, count_idle: bool) -> ConnWait {
        ConnWait {
            label: format!("conns {spec}"),
            spec: spec.clone(),
            count_idle,
            source: Source::NotStarted,
            conns: Vec::new(),
            seen: HashSet::new(),
            last_dump: None,
            next_dump: Instant::now(),
            activity_count: None,
            activity: None,
            unknown: None,
        }
    }

    /// Looks again, unless no TCP segment has moved in the namespace since the last look:
    /// then nothing changed but time, and a connection that counted only as still sending
    /// is idle once `SENDING` has passed since its last data went out.
    fn look(&mut self) {
        let count = sockdiag::tcp_activity().ok();
        if count.is_none() || count != self.activity_count || self.unknown.is_some() {
            self.dump();
            return;
        }
        let now = Instant::now();
        for conn in &mut self.conns {
            if conn.sending_until.is_some_and(|until| until <= now) {
                conn.busy = None;
                conn.sending_until = None;
            }
        }
        let floor = match self.source {
            Source::Proc => PROC_FLOOR,
            _ => REDUMP_FLOOR,
        };
        self.next_dump = now + floor;
        if let Some(until) = self.conns.iter().filter_map(|c| c.sending_until).min() {
            self.next_dump = self.next_dump.min(until.max(now + SENDING_BATCH));
        }
    }

    /// Looks at the port again, from scratch. Each socket is judged as the dump hands it
    /// over, so that 10,000 connections are never held twice.
    fn dump(&mut self) {
        // Counted before the dump: whatever moves during it is seen by the next look.
        self.activity_count = sockdiag::tcp_activity().ok();
        let started = Instant::now();
        let mut seen = HashSet::with_capacity(self.seen.len());
        let mut conns = Vec::with_capacity(self.conns.len());
        let mut activity: Option<Instant> = None;
        let previous = self.last_dump;
        let (spec, count_idle, before) = (&self.spec, self.count_idle, &self.seen);
        let mut each = |socket: &Socket| {
            if socket.state == state::LISTEN || !ours(spec, socket) {
                return;
            }
            let now = Instant::now();
            seen.insert(socket.cookie);
            if let Some(previous) = previous {
                // New work since the last look: a connection not seen then, or data received
                // since (when, exactly, tcp_info says).
                let mut at = (!before.contains(&socket.cookie)).then_some(now);
                if let Some(ago) = socket.info.and_then(|i| i.last_data_recv_ms) {
                    let received = now
                        .checked_sub(Duration::from_millis(ago.into()))
                        .unwrap_or(now);
                    if received > previous {
                        at = at.max(Some(received));
                    }
                }
                activity = activity.max(at);
            }
            let (busy, sending_until) = judge(socket, count_idle, now);
            if busy.is_none() && closed_by_app(socket.state) {
                // Neither in flight nor an idle connection of the app's: not listed.
                return;
            }
            conns.push(Conn {
                peer: socket.peer,
                state: socket.state,
                cookie: socket.cookie,
                busy,
                sending_until,
            });
        };
        let result = match &mut self.source {
            Source::Netlink { dumper, .. } => dumper.dump(self.spec.port, STATES, &mut each),
            Source::Proc => sockdiag::proc_sockets(self.spec.port, STATES, &mut each),
            Source::NotStarted => return,
        };
        let now = Instant::now();
        let cost = now - started;
        let floor = match self.source {
            Source::Proc => PROC_FLOOR,
            _ => REDUMP_FLOOR,
        };
        self.next_dump = now + floor.max(cost * DUTY);
        if let Err(e) = result {
            self.unknown = Some(format!("cannot list the connections: {}", describe_io(&e)));
            return;
        }
        self.unknown = None;
        self.last_dump = Some(now);
        if let Some(at) = activity {
            self.note_activity(at);
        }
        conns.sort_by(|a, b| (b.busy.is_some(), a.peer).cmp(&(a.busy.is_some(), b.peer)));
        self.conns = conns;
        self.seen = seen;
        // A connection counted only as still sending stops counting then: look again.
        if let Some(until) = self.conns.iter().filter_map(|c| c.sending_until).min() {
            self.next_dump = self.next_dump.min(until.max(now + SENDING_BATCH));
        }
    }

    fn note_activity(&mut self, at: Instant) {
        self.activity = Some(self.activity.map_or(at, |last| last.max(at)));
    }

    fn idle(&self) -> usize {
        self.conns.iter().filter(|c| c.busy.is_none()).count()
    }
}

/// Whether a socket is on the address and port waited for.
fn ours(spec: &ConnsSpec, socket: &Socket) -> bool {
    socket.local.1 == spec.port
        && spec
            .addr
            .is_none_or(|want| same_address(socket.local.0, want))
}

/// Whether a connection is in flight (and why), and until when it counts only because it
/// is still sending.
fn judge(
    socket: &Socket,
    count_idle: bool,
    now: Instant,
) -> (Option<&'static str>, Option<Instant>) {
    if socket.state == state::SYN_RECV {
        return (Some("handshake"), None);
    }
    if closed_by_app(socket.state) {
        // Closed by the app: what it wrote last may still be on its way. The send queue
        // counts the FIN as one byte.
        let undelivered = socket.wqueue > 1;
        return (
            undelivered.then_some("response not delivered (closed by the app)"),
            None,
        );
    }
    if socket.inode == 0 && socket.state == state::ESTABLISHED {
        return (Some("not accepted yet"), None);
    }
    if count_idle {
        return (Some("open"), None);
    }
    // In CLOSE-WAIT the client's FIN counts as one byte until the app reads the end.
    let unread = match socket.state {
        state::CLOSE_WAIT => socket.rqueue.saturating_sub(1),
        _ => socket.rqueue,
    };
    if unread > 0 {
        return (Some("request not read"), None);
    }
    if socket.wqueue > 0 {
        return (Some("response not acknowledged"), None);
    }
    let Some(info) = socket.info else {
        // No tcp_info (/proc/net/tcp): idle cannot be told from busy.
        return (Some("open (activity unknown)"), None);
    };
    if info.notsent_bytes.is_some_and(|n| n > 0) {
        return (Some("response not sent"), None);
    }
    match (info.data_segs_in, info.data_segs_out) {
        (Some(0), Some(0)) => return (Some("nothing exchanged yet"), None),
        (Some(i), Some(0)) if i > 0 => return (Some("request not answered"), None),
        _ => {}
    }
    if info.bytes_received == Some(0) && info.data_segs_in.is_none() {
        return (Some("nothing exchanged yet"), None);
    }
    match (info.last_data_recv_ms, info.last_data_sent_ms) {
        (Some(recv), Some(sent)) if recv < sent => (Some("request not answered"), None),
        (_, Some(sent)) if Duration::from_millis(sent.into()) < SENDING => {
            let until = now + SENDING.saturating_sub(Duration::from_millis(sent.into()));
            (Some("response being sent"), Some(until))
        }
        (None, _) | (_, None) => (Some("open (activity unknown)"), None),
        _ => (None, None),
    }
}

/// Whether the app has closed its end of a connection in this state.
fn closed_by_app(state: u8) -> bool {
    matches!(state, state::FIN_WAIT1 | state::CLOSING | state::LAST_ACK)
}

/// Whether a socket's local address is the one asked for: IPv4 clients of a dual-stack
/// listener show as `::ffff:a.b.c.d`.
fn same_address(local: IpAddr, want: IpAddr) -> bool {
    unmapped(local) == unmapped(want)
}

/// An IPv4 address in its own form, not as `::ffff:a.b.c.d`.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

fn show_peer((ip, port): (IpAddr, u16)) -> String {
    match unmapped(ip) {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

impl Condition for ConnWait {
    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self, cx: &Start<'_>) {
        let netlink = Dumper::open().and_then(|dumper| {
            let destroyed = Destroyed::open()?;
            Ok(Source::Netlink { dumper, destroyed })
        });
        self.source = match netlink {
            Ok(source) => source,
            Err(e) => {
                if let Some(report) = cx.report.filter(|_| cx.watch) {
                    say_fallback(report, &self.label, &e);
                }
                Source::Proc
            }
        };
        self.dump();
    }

    fn watch(&self, add: &mut dyn FnMut(BorrowedFd<'_>, usize)) {
        if let Source::Netlink { destroyed, .. } = &self.source {
            add(destroyed.as_fd(), 0);
        }
    }

    fn on_ready(&mut self, _: usize) {
        let Self {
            source, seen, spec, ..
        } = self;
        let Source::Netlink { destroyed, .. } = source else {
            return;
        };
        // The namespace's every TCP socket ends here: only those of the port are kept, and
        // crossed off in one pass, however many closed at once.
        let mut ended = HashSet::new();
        let mut came_and_went = false;
        let read = destroyed.read(&mut |s| {
            if seen.remove(&s.cookie) {
                ended.insert(s.cookie);
            } else if ours(spec, s) {
                // A connection that came and went between two looks.
                came_and_went = true;
            }
        });
        let now = Instant::now();
        if !ended.is_empty() {
            self.conns.retain(|c| !ended.contains(&c.cookie));
        }
        if came_and_went {
            self.note_activity(now);
        }
        if read.is_err() {
            // Events were lost: only a fresh look tells what ended.
            self.next_dump = now;
        }
    }

    fn polled(&self) -> bool {
        false
    }

    fn refresh(&mut self) {
        self.look();
    }

    fn next_look(&self) -> Option<Instant> {
        (!matches!(self.source, Source::NotStarted)).then_some(self.next_dump)
    }

    fn last_activity(&self) -> Option<Instant> {
        self.activity
    }

    fn confirm(&mut self) {
        self.dump();
    }

    fn in_flight(&self) -> usize {
        self.conns.iter().filter(|c| c.busy.is_some()).count()
    }

    fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }

    fn name_in_flight(&self, out: &mut Vec<String>, limit: usize) {
        out.extend(
            self.conns
                .iter()
                .filter_map(|c| Some(format!("conn {} ({})", show_peer(c.peer), c.busy?)))
                .take(limit),
        );
    }

    fn progress(&self, out: &mut Vec<String>, limit: usize) -> usize {
        if limit == 0 || self.in_flight() == 0 {
            return 0;
        }
        out.push(format!(
            "{}: {} in flight, {} idle",
            self.label,
            self.in_flight(),
            self.idle()
        ));
        self.in_flight()
    }

    fn state(&self) -> String {
        match &self.unknown {
            Some(why) => format!("unknown ({why})"),
            None => format!("{} in flight, {} idle", self.in_flight(), self.idle()),
        }
    }

    fn details(&self) -> Vec<String> {
        if self.unknown.is_some() {
            return Vec::new();
        }
        let mut lines: Vec<String> = self
            .conns
            .iter()
            .take(LISTED)
            .map(|c| {
                format!(
                    "{} {} {}",
                    show_peer(c.peer),
                    state::name(c.state),
                    c.busy
                        .map_or_else(|| "idle".into(), |why| format!("in flight ({why})"))
                )
            })
            .collect();
        if self.conns.len() > LISTED {
            lines.push(format!("and {} more", self.conns.len() - LISTED));
        }
        lines
    }

    fn plan(&self) -> String {
        let now = match &self.unknown {
            Some(why) => format!("unknown: {why}"),
            None => format!("{} in flight, {} idle", self.in_flight(), self.idle()),
        };
        let idle = if self.count_idle {
            ", idle ones included"
        } else {
            ""
        };
        format!(
            "no connection to {} in flight{idle} (now: {now})",
            self.spec
        )
    }
}

fn say_fallback(report: &Reporter, label: &str, e: &std::io::Error) {
    report.emit(&Record::warn(
        "fallback",
        format!(
            "{label}: netlink refused ({}); reading /proc/net/tcp every {}s or more instead, \
             where every open connection counts as in flight",
            describe_io(e),
            PROC_FLOOR.as_secs()
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockdiag::TcpInfo;
    use std::net::Ipv4Addr;

    fn socket(state: u8, info: TcpInfo) -> Socket {
        Socket {
            state,
            local: (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            peer: (IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
            cookie: 1,
            rqueue: 0,
            wqueue: 0,
            inode: 7,
            info: Some(info),
        }
    }

    fn info(recv: u32, sent: u32, segs_in: u32, segs_out: u32) -> TcpInfo {
        TcpInfo {
            last_data_sent_ms: Some(sent),
            last_data_recv_ms: Some(recv),
            bytes_received: Some(u64::from(segs_in) * 100),
            notsent_bytes: Some(0),
            data_segs_in: Some(segs_in),
            data_segs_out: Some(segs_out),
        }
    }

    #[test]
    fn in_flight_is_judged_from_the_queues_and_tcp_info() {
        let now = Instant::now();
        let judged = |s: &Socket| judge(s, false, now).0;
        let idle = socket(state::ESTABLISHED, info(5000, 4000, 1, 1));
        assert_eq!(judged(&idle), None, "an idle keep-alive connection");
        let asked = socket(state::ESTABLISHED, info(200, 4000, 2, 1));
        assert_eq!(judged(&asked), Some("request not answered"));
        let fresh = socket(state::ESTABLISHED, info(300, 300, 0, 0));
        assert_eq!(judged(&fresh), Some("nothing exchanged yet"));
        let first = socket(state::ESTABLISHED, info(300, 300, 1, 0));
        assert_eq!(judged(&first), Some("request not answered"));
        let streaming = socket(state::ESTABLISHED, info(5000, 100, 1, 40));
        let (why, until) = judge(&streaming, false, now);
        assert_eq!(why, Some("response being sent"));
        assert!(until.is_some_and(|u| u > now));
        let unread = Socket { rqueue: 10, ..idle };
        assert_eq!(judged(&unread), Some("request not read"));
        let unacked = Socket { wqueue: 10, ..idle };
        assert_eq!(judged(&unacked), Some("response not acknowledged"));
        let queued = Socket { inode: 0, ..idle };
        assert_eq!(judged(&queued), Some("not accepted yet"));
        let half_closed = Socket {
            rqueue: 1,
            ..socket(state::CLOSE_WAIT, info(5000, 4000, 1, 1))
        };
        assert_eq!(
            judged(&half_closed),
            None,
            "an idle CLOSE-WAIT is the app's to close (its one unread byte is the FIN)"
        );
        let asked_then_closed = Socket {
            rqueue: 40,
            ..half_closed
        };
        assert_eq!(judged(&asked_then_closed), Some("request not read"));
        for closing in [state::FIN_WAIT1, state::CLOSING, state::LAST_ACK] {
            let delivering = Socket {
                wqueue: 4000,
                ..socket(closing, info(5000, 10, 1, 9))
            };
            assert_eq!(
                judged(&delivering),
                Some("response not delivered (closed by the app)")
            );
            assert_eq!(judge(&delivering, true, now).0, judged(&delivering));
            let done = Socket {
                wqueue: 1,
                ..delivering
            };
            assert_eq!(judged(&done), None, "only the FIN left to acknowledge");
            assert_eq!(judge(&done, true, now).0, None, "not the app's any more");
        }
        assert_eq!(
            judge(&idle, true, now).0,
            Some("open"),
            "--count-idle-conns"
        );
        let no_info = Socket { info: None, ..idle };
        assert_eq!(judged(&no_info), Some("open (activity unknown)"));
    }

    #[test]
    fn mapped_addresses_are_the_same_address() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(same_address(mapped, v4) && same_address(v4, mapped));
        assert!(!same_address("::1".parse().unwrap(), v4));
        assert_eq!(
            show_peer((mapped, 80)),
            "127.0.0.1:80",
            "a mapped peer is shown as IPv4"
        );
        assert_eq!(show_peer(("::1".parse().unwrap(), 80)), "[::1]:80");
    }
}
