//! What the kernel says about the TCP sockets of prestop's network namespace: `inet_diag`
//! dumps over `NETLINK_SOCK_DIAG`, the socket-destroy events, and `/proc/net/tcp{,6}` where
//! netlink is refused.
//!
//! A dump asks for one local port (`id.idiag_sport`, which the kernel compares before it
//! builds a message, and which needs no bytecode and no privilege) and for `struct tcp_info`
//! (`INET_DIAG_INFO`), whose length grows with the kernel: every field is read only if the
//! attribute holds it. Destroy events (`SKNLGRP_INET{,6}_TCP_DESTROY`) come once per freed
//! socket and carry the socket cookie a dump also reports; after an abort their ports can be 0,
//! so they are matched by cookie. All wire layouts are the uapi's (`linux/inet_diag.h`,
//! `linux/sock_diag.h`, `linux/tcp.h`); nothing here needs a capability. This module reads;
//! it never judges what a socket means for a drain.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

/// `nlmsg_type` of a dump request and of each answer (`sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The older request type (`inet_diag.h`): one walk of the TCP tables answers for IPv4 and
/// IPv6 together, at half the cost of two `SOCK_DIAG_BY_FAMILY` dumps.
const TCPDIAG_GETSOCK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
/// `enum sknetlink_groups`: group numbers, for `NETLINK_ADD_MEMBERSHIP`.
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;
/// Answer attribute `INET_DIAG_INFO` (struct `tcp_info`), and its bit in `idiag_ext`.
const INET_DIAG_INFO: u16 = 2;
const EXT_INFO: u8 = 1 << (INET_DIAG_INFO - 1);

/// TCP states (`include/net/tcp_states.h`); a dump asks for a mask of `1 << state`.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    /// Request sockets (a handshake not finished) are reported in this state.
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;

    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_RECV => "SYN-RECV",
            FIN_WAIT1 => "FIN-WAIT-1",
            CLOSE_WAIT => "CLOSE-WAIT",
            LAST_ACK => "LAST-ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            _ => "other",
        }
    }
}

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const REQ_V1_LEN: usize = 60;
const REQ_V2_LEN: usize = 56;
const DIAG_MSG_LEN: usize = 72;
/// The kernel makes dump datagrams at most 32 KiB (`netlink_dump`); `MSG_TRUNC` reports a
/// longer one instead of cutting it silently.
const DUMP_BUF: usize = 32 * 1024;
/// A dump is built by the kernel in the `recv` itself; it cannot hang, but nothing here blocks
/// without a bound.
const DUMP_TIMEOUT: Duration = Duration::from_secs(2);

/// Offsets in `struct tcp_info`; each needs an attribute long enough to hold it.
mod tcpi {
    pub const LAST_DATA_SENT: usize = 44;
    pub const LAST_DATA_RECV: usize = 52;
    /// Linux 4.1.
    pub const BYTES_RECEIVED: usize = 128;
    /// Linux 4.6.
    pub const NOTSENT_BYTES: usize = 144;
    pub const DATA_SEGS_IN: usize = 152;
    pub const DATA_SEGS_OUT: usize = 156;
}

/// One TCP socket, as a dump or a destroy event reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub state: u8,
    pub local: (IpAddr, u16),
    pub peer: (IpAddr, u16),
    /// The same for a socket in every dump and in its destroy event.
    pub cookie: u64,
    /// Connections: bytes received, not yet read by the app. Listener: the accept queue.
    pub rqueue: u32,
    /// Connections: bytes sent, not yet acknowledged by the peer.
    pub wqueue: u32,
    /// 0 for a connection not accepted yet (or closed by the app).
    pub inode: u32,
    pub info: Option<TcpInfo>,
}

/// What prestop reads of `struct tcp_info`; `None` where the kernel's is too short to hold it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// How long ago data last went out, and last came in, in milliseconds (jiffies' grain).
    pub last_data_sent_ms: Option<u32>,
    pub last_data_recv_ms: Option<u32>,
    pub bytes_received: Option<u64>,
    /// Bytes written by the app, not yet sent.
    pub notsent_bytes: Option<u32>,
    pub data_segs_in: Option<u32>,
    pub data_segs_out: Option<u32>,
}

impl TcpInfo {
    fn parse(raw: &[u8]) -> TcpInfo {
        let u32_at = |off: usize| {
            raw.get(off..off + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        };
        let u64_at = |off: usize| {
            raw.get(off..off + 8)
                .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
        };
        TcpInfo {
            last_data_sent_ms: u32_at(tcpi::LAST_DATA_SENT),
            last_data_recv_ms: u32_at(tcpi::LAST_DATA_RECV),
            bytes_received: u64_at(tcpi::BYTES_RECEIVED),
            notsent_bytes: u32_at(tcpi::NOTSENT_BYTES),
            data_segs_in: u32_at(tcpi::DATA_SEGS_IN),
            data_segs_out: u32_at(tcpi::DATA_SEGS_OUT),
        }
    }
}

fn u32_ne(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn u16_ne(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn addr(family: u8, raw: &[u8]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&raw[..16]).unwrap()))
    }
}

/// Decodes one `struct inet_diag_msg` and the `INET_DIAG_INFO` after it.
fn parse(p: &[u8]) -> Option<Socket> {
    if p.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = p[0];
    let mut socket = Socket {
        state: p[1],
        local: (addr(family, &p[8..24]), u16::from_be_bytes([p[4], p[5]])),
        peer: (addr(family, &p[24..40]), u16::from_be_bytes([p[6], p[7]])),
        cookie: u64::from(u32_ne(p, 44)) | (u64::from(u32_ne(p, 48)) << 32),
        rqueue: u32_ne(p, 56),
        wqueue: u32_ne(p, 60),
        inode: u32_ne(p, 68),
        info: None,
    };
    let mut off = DIAG_MSG_LEN;
    while off + NLA_HDRLEN <= p.len() {
        let len = usize::from(u16_ne(p, off));
        if len < NLA_HDRLEN || off + len > p.len() {
            break;
        }
        if u16_ne(p, off + 2) & 0x3fff == INET_DIAG_INFO {
            socket.info = Some(TcpInfo::parse(&p[off + NLA_HDRLEN..off + len]));
        }
        off += (len + 3) & !3;
    }
    Some(socket)
}

/// Calls `each(type, seq, payload)` for every netlink message in one datagram.
fn messages(
    mut buf: &[u8],
    mut each: impl FnMut(u16, u32, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_ne(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad netlink message length",
            ));
        }
        each(u16_ne(buf, 4), u32_ne(buf, 8), &buf[NLMSG_HDRLEN..len])?;
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(())
}

fn netlink(flags: SockFlag) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        flags | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

/// The socket dumps are asked on.
pub struct Dumper {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// Whether the one-walk request works here (it is answered on every kernel prestop knows;
    /// should one refuse it, two dumps do the same).
    legacy: bool,
}

impl Dumper {
    pub fn open() -> io::Result<Dumper> {
        let fd = netlink(SockFlag::empty())?;
        let timeout = nix::sys::time::TimeVal::new(DUMP_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        Ok(Dumper {
            fd,
            seq: 0,
            buf: vec![0; DUMP_BUF],
            legacy: true,
        })
    }

    /// Every socket on local `port` in one of `states` (a mask of `1 << state`), both address
    /// families, with their `tcp_info`.
    pub fn dump(
        &mut self,
        port: u16,
        states: u32,
        each: &mut dyn FnMut(&Socket),
    ) -> io::Result<()> {
        if self.legacy {
            match self.request(TCPDIAG_GETSOCK, 0, port, states, each) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error().is_some() && !is_fatal(&e) => self.legacy = false,
                Err(e) => return Err(e),
            }
        }
        for family in [libc::AF_INET, libc::AF_INET6] {
            self.request(SOCK_DIAG_BY_FAMILY, family as u8, port, states, each)?;
        }
        Ok(())
    }

    fn request(
        &mut self,
        kind: u16,
        family: u8,
        port: u16,
        states: u32,
        each: &mut dyn FnMut(&Socket),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let body = if kind == TCPDIAG_GETSOCK {
            REQ_V1_LEN
        } else {
            REQ_V2_LEN
        };
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body);
        msg.extend_from_slice(&((NLMSG_HDRLEN + body) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // struct inet_diag_sockid: the local port filters; the cookie is "none".
        let mut id = [0u8; 48];
        id[0..2].copy_from_slice(&port.to_be_bytes());
        id[40..48].fill(0xff);
        if kind == TCPDIAG_GETSOCK {
            msg.extend_from_slice(&[family, 0, 0, EXT_INFO]);
            msg.extend_from_slice(&id);
            msg.extend_from_slice(&states.to_ne_bytes());
            msg.extend_from_slice(&0u32.to_ne_bytes());
        } else {
            msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, EXT_INFO, 0]);
            msg.extend_from_slice(&states.to_ne_bytes());
            msg.extend_from_slice(&id);
        }
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n > self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink answer cut short",
                ));
            }
            let mut done = false;
            messages(&self.buf[..n], |kind, mseq, payload| {
                if mseq != seq {
                    return Ok(()); // an answer to an earlier, abandoned request
                }
                match kind {
                    NLMSG_DONE | NLMSG_ERROR => {
                        done = true;
                        // A negative errno, if the request failed.
                        let err = payload
                            .get(..4)
                            .map_or(-libc::EIO, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                        if err < 0 {
                            return Err(io::Error::from_raw_os_error(-err));
                        }
                    }
                    _ => {
                        if let Some(socket) = parse(payload) {
                            each(&socket);
                        }
                    }
                }
                Ok(())
            })?;
            if done {
                return Ok(());
            }
        }
    }
}

/// Errors after which no other kind of request would fare better.
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// Membership of the TCP socket-destroy groups of this network namespace: one event each time
/// the kernel frees a TCP socket (a connection's end, once its data is delivered).
pub struct Destroyed {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Destroyed {
    pub fn open() -> io::Result<Destroyed> {
        let fd = netlink(SockFlag::SOCK_NONBLOCK)?;
        // Room for a few thousand events between two reads; the kernel caps it at rmem_max.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(1 << 20));
        for group in [SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY] {
            // SAFETY: a valid fd, the option's documented level and name, and a pointer to a
            // u32 on the stack with its size.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    NETLINK_ADD_MEMBERSHIP,
                    (&raw const group).cast(),
                    size_of::<u32>() as libc::socklen_t,
                )
            };
            Errno::result(rc)?;
        }
        Ok(Destroyed {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Reads every queued event without blocking. `Err(ENOBUFS)`: events were lost (the
    /// queue overflowed); what was queued before is still there for the next read.
    pub fn read(&mut self, each: &mut dyn FnMut(&Socket)) -> io::Result<()> {
        loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => messages(&self.buf[..n], |kind, _, payload| {
                    if kind == SOCK_DIAG_BY_FAMILY
                        && let Some(socket) = parse(payload)
                    {
                        each(&socket);
                    }
                    Ok(())
                })?,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Destroyed {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// How many TCP segments this network namespace has received and sent so far
/// (`/proc/net/snmp`'s `InSegs` + `OutSegs`, and the passive opens): when that has not moved,
/// no connection has changed at all, and a dump would only repeat the last one. Reading it
/// costs about 20 µs; a dump walks the whole node's connection table.
pub fn tcp_activity() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no Tcp counters",
        ));
    };
    let mut total = 0u64;
    for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
        if matches!(name, "InSegs" | "OutSegs" | "PassiveOpens") {
            total = total.wrapping_add(value.parse().unwrap_or(0));
        }
    }
    Ok(total)
}

/// The same sockets from `/proc/net/tcp` and `/proc/net/tcp6`, for where netlink is refused
/// (a seccomp profile). Those files have no cookie, no `tcp_info` and no peer's view.
pub fn proc_sockets(port: u16, states: u32, each: &mut dyn FnMut(&Socket)) -> io::Result<()> {
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            // A kernel without IPv6 has no tcp6.
            Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            if let Some(socket) = proc_line(line, v6)
                && socket.local.1 == port
                && states & (1 << socket.state) != 0
            {
                each(&socket);
            }
        }
    }
    Ok(())
}

/// One line: `sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...`, with
/// ports in host-order hex and addresses as the raw words printed in host order.
fn proc_line(line: &str, v6: bool) -> Option<Socket> {
    let mut fields = line.split_ascii_whitespace();
    let _slot = fields.next()?;
    let local = fields.next()?;
    let remote = fields.next()?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let (tx, rx) = fields.next()?.split_once(':')?;
    let inode = fields.nth(4)?.parse::<u64>().ok()?;
    let endpoint = |text: &str| -> Option<(IpAddr, u16)> {
        let (addr, port) = text.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let mut bytes = [0u8; 16];
        let words = if v6 { 4 } else { 1 };
        for i in 0..words {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        };
        Some((ip, port))
    };
    Some(Socket {
        state,
        local: endpoint(local)?,
        peer: endpoint(remote)?,
        cookie: 0,
        rqueue: u32::from_str_radix(rx, 16).ok()?,
        wqueue: u32::from_str_radix(tx, 16).ok()?,
        inode: u32::try_from(inode).unwrap_or(u32::MAX),
        info: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_tcp_info_reads_as_absent_fields() {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = state::ESTABLISHED;
        p[4..6].copy_from_slice(&8080u16.to_be_bytes());
        p[8..12].copy_from_slice(&[127, 0, 0, 1]);
        p[44..48].copy_from_slice(&0x1234u32.to_ne_bytes());
        // A 3.15-era tcp_info: 120 bytes, no bytes_received, no notsent_bytes.
        let len = 120;
        p.extend_from_slice(&((NLA_HDRLEN + len) as u16).to_ne_bytes());
        p.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        let mut info = vec![0u8; len];
        info[tcpi::LAST_DATA_RECV..tcpi::LAST_DATA_RECV + 4].copy_from_slice(&42u32.to_ne_bytes());
        p.extend_from_slice(&info);
        let socket = parse(&p).unwrap();
        assert_eq!(socket.local, (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080));
        assert_eq!(socket.cookie, 0x1234);
        let info = socket.info.unwrap();
        assert_eq!(info.last_data_recv_ms, Some(42));
        assert_eq!(info.bytes_received, None);
        assert_eq!(info.notsent_bytes, None);
        // A cut attribute header is ignored; the socket still reads.
        p.truncate(DIAG_MSG_LEN + 2);
        assert!(parse(&p).unwrap().info.is_none());
        assert!(parse(&p[..DIAG_MSG_LEN - 1]).is_none());
    }

    #[test]
    fn tcp_activity_moves_with_traffic() {
        let before = tcp_activity().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_ne!(tcp_activity().unwrap(), before);
    }

    #[test]
    fn proc_net_tcp_lines_read() {
        let line = "   0: 0100007F:1F90 0100007F:E89C 01 00000004:0000000A 00:00000000 \
                    00000000     0        0 0 1 0000000000000000 20 4 30 10 -1";
        let socket = proc_line(line, false).unwrap();
        assert_eq!(socket.local, (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080));
        assert_eq!(socket.peer.1, 0xE89C);
        assert_eq!(
            (socket.state, socket.rqueue, socket.wqueue, socket.inode),
            (1, 10, 4, 0)
        );
        let v6 = "   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 \
                  0A 00000000:00000003 00:00000000 00000000 0 0 717456 1";
        let socket = proc_line(v6, true).unwrap();
        assert_eq!(socket.local, (IpAddr::V6(Ipv6Addr::LOCALHOST), 8080));
        assert_eq!(socket.rqueue, 3);
        assert!(proc_line("garbage", false).is_none());
    }

    #[test]
    fn a_dump_sees_a_listener_and_its_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut dumper = Dumper::open().unwrap();
        let mut seen = Vec::new();
        let states = (1 << state::LISTEN) | (1 << state::ESTABLISHED);
        dumper.dump(port, states, &mut |s| seen.push(*s)).unwrap();
        let listening = seen.iter().filter(|s| s.state == state::LISTEN).count();
        let connected: Vec<_> = seen
            .iter()
            .filter(|s| s.state == state::ESTABLISHED)
            .collect();
        assert_eq!(listening, 1, "{seen:?}");
        // The server's side only (local port = port), not yet accepted: inode 0.
        assert_eq!(connected.len(), 1, "{seen:?}");
        assert_eq!(connected[0].inode, 0);
        assert!(
            connected[0]
                .info
                .is_some_and(|i| i.last_data_recv_ms.is_some())
        );
        let mut from_proc = 0;
        proc_sockets(port, states, &mut |_| from_proc += 1).unwrap();
        assert_eq!(from_proc, 2);
    }
}
