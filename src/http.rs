//! A plain HTTP/1.1 client for the pod's own endpoints (an admin API on loopback, a unix
//! socket): one request per connection, on a non-blocking socket that the event loop watches.
//!
//! It must never block and never hold more than it needs: connecting, sending and reading
//! each wait on `ppoll`, bounded by the caller's deadline (there is no shorter timeout, so that
//! an endpoint that holds the request until it has drained is waited for); no name is ever
//! resolved, since a DNS lookup cannot be bounded; and the answer is read only up to the end
//! of its head, at most `HEAD_MAX` bytes. The status decides: 2xx is success, a redirect is
//! not followed, and a head that does not parse, or ends before it is whole, is a failure,
//! never a guess. Response heads are parsed by `httparse`; the request is written by hand.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrIn6, UnixAddr, sockopt,
};

use crate::event::{self, Machine, Step, Wake, Watch};
use crate::interrupt::Interrupts;
use crate::process::describe_io;

/// The most an answer's head (status line and headers, interim 1xx heads included) may take:
/// an admin endpoint's is a few hundred bytes, and a server that sends more is not read
/// further, so that memory stays bounded whatever it sends.
pub const HEAD_MAX: usize = 16 * 1024;
/// The most headers one head may have.
const HEADERS_MAX: usize = 64;
/// How much of a failed answer's body goes into its log line (Envoy says why it refused), in
/// characters; and how much of the body is read for it, in bytes.
const EXCERPT: usize = 120;
const BODY_MAX: usize = 512;
/// How long a failed answer's body is waited for once its head has come: on loopback it
/// follows at once, and the failure is known without it.
const LINGER: Duration = Duration::from_millis(100);

/// The methods `--http` accepts: the standard ones that make sense without a body.
/// (`CONNECT` would open a tunnel, `TRACE` only echoes.)
pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The addresses to try in turn: one for an IP literal; for `localhost`, 127.0.0.1, then
    /// `::1` (the pod's `/etc/hosts` names both, and a server may listen on either).
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addrs) => {
                for (i, addr) in addrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", else ")?;
                    }
                    write!(f, "{addr}")?;
                }
                Ok(())
            }
            Endpoint::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// A request, checked: `config` makes these, and only from a URL it could read whole.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// One of `METHODS`.
    pub method: &'static str,
    pub endpoint: Endpoint,
    /// The `Host` header: the URL's host and port as written (`localhost` for a socket).
    pub host: String,
    /// The request target: the URL's path and query as written, `/` if it has none.
    pub target: String,
    /// The URL as written, for the log.
    pub url: String,
}

impl Request {
    /// The request as sent. `Connection: close`, so that the server ends the exchange after
    /// its answer; `Content-Length: 0` where a body is expected (some servers answer 411
    /// without it).
    pub fn bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: prestop/{}\r\nConnection: close\r\n",
            self.method,
            self.target,
            self.host,
            env!("CARGO_PKG_VERSION")
        );
        if matches!(self.method, "POST" | "PUT" | "PATCH") {
            text.push_str("Content-Length: 0\r\n");
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    /// The request line and where it goes, for a dry run.
    pub fn describe(&self) -> String {
        format!(
            "\"{} {} HTTP/1.1\" to {}",
            self.method, self.target, self.endpoint
        )
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.url)
    }
}

/// A final answer: its status, and a word on why if it is not a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
    /// Where a redirect points, or the start of a failure's body.
    pub detail: String,
}

impl Answer {
    pub fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if !self.reason.is_empty() {
            write!(f, " {}", self.reason)?;
        }
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Where an exchange stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Sending,
    Receiving,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connecting => "still connecting",
            Phase::Sending => "still sending the request",
            Phase::Receiving => "request sent, no answer",
        })
    }
}

/// Why an exchange ended without an answer.
#[derive(Debug)]
pub enum Failure {
    Socket(io::Error),
    Connect(io::Error),
    /// A unix socket's queue of connections not yet accepted is full.
    Queue,
    Send(io::Error),
    Receive(io::Error),
    /// The server closed the connection; `partial` if it had begun to answer.
    Closed {
        partial: bool,
    },
    /// The answer is not HTTP/1.x as `httparse` reads it.
    Malformed(httparse::Error),
    TooLarge,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Socket(e) => write!(f, "cannot open a socket: {}", describe_io(e)),
            Failure::Connect(e) => write!(f, "cannot connect: {}", describe_io(e)),
            Failure::Queue => f.write_str(
                "cannot connect: the server is not accepting connections (its socket's queue \
                 is full: EAGAIN)",
            ),
            Failure::Send(e) => write!(f, "cannot send the request: {}", describe_io(e)),
            Failure::Receive(e) => write!(f, "cannot read the answer: {}", describe_io(e)),
            Failure::Closed { partial: false } => {
                f.write_str("the server closed the connection without an answer")
            }
            Failure::Closed { partial: true } => {
                f.write_str("the server closed the connection in the middle of its answer")
            }
            Failure::Malformed(httparse::Error::TooManyHeaders) => {
                write!(f, "the answer has more than {HEADERS_MAX} headers")
            }
            Failure::Malformed(e) => write!(f, "not an HTTP/1.x answer: {e}"),
            Failure::TooLarge => write!(
                f,
                "the answer's head is over {} KiB, not read further",
                HEAD_MAX / 1024
            ),
        }
    }
}

/// One request and its answer, in progress on a non-blocking socket.
pub struct Exchange {
    socket: OwnedFd,
    phase: Phase,
    /// Addresses left to try if this one refuses, last first.
    fallback: Vec<SocketAddr>,
    /// Why the first address refused, once another is tried.
    first_refusal: Option<io::Error>,
    request: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    /// Bytes of interim (1xx) heads already read and dropped.
    skipped: usize,
    /// Whether a line has ended since the last parse: a head is only whole after one.
    new_line: bool,
    /// A HEAD request: its answer has no body, whatever its headers say.
    head: bool,
    failed: Option<Failed>,
}

impl Exchange {
    /// Opens the connection and starts sending; an error that shows at once (nothing
    /// listens, no file descriptor left) ends it here.
    pub fn start(request: &Request) -> Result<Exchange, Failure> {
        let (socket, phase, fallback) = match &request.endpoint {
            Endpoint::Tcp(addrs) => {
                let mut fallback: Vec<SocketAddr> = addrs.iter().rev().copied().collect();
                let first = fallback.pop().ok_or_else(|| {
                    Failure::Connect(io::Error::from(io::ErrorKind::AddrNotAvailable))
                })?;
                let (socket, phase) = connect_tcp(first, &mut fallback)?;
                (socket, phase, fallback)
            }
            Endpoint::Unix(path) => {
                let (socket, phase) = connect_unix(path)?;
                (socket, phase, Vec::new())
            }
        };
        Ok(Exchange {
            socket,
            phase,
            fallback,
            first_refusal: None,
            request: request.bytes(),
            sent: 0,
            received: Vec::new(),
            skipped: 0,
            new_line: false,
            head: request.method == "HEAD",
            failed: None,
        })
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Whether the socket is to be watched for writing (connecting, sending) rather than
    /// for reading.
    pub fn wants_write(&self) -> bool {
        self.phase != Phase::Receiving
    }

    /// The socket is ready: goes as far as it can without blocking. `Some` once the exchange
    /// has ended, with the answer or why there is none.
    pub fn advance(&mut self) -> Option<Result<Answer, Failure>> {
        if self.phase == Phase::Connecting {
            match socket::getsockopt(&self.socket, sockopt::SocketError) {
                Ok(0) => self.phase = Phase::Sending,
                Ok(errno) => return self.refused(io::Error::from_raw_os_error(errno)),
                Err(e) => return Some(Err(Failure::Connect(e.into()))),
            }
        }
        if self.phase == Phase::Sending {
            while self.sent < self.request.len() {
                let rest = &self.request[self.sent..];
                // MSG_NOSIGNAL: a server gone meanwhile is an EPIPE error, not a SIGPIPE.
                match socket::send(self.socket.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
                    Ok(n) => self.sent += n,
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => return None,
                    Err(e) => return Some(Err(Failure::Send(e.into()))),
                }
            }
            self.phase = Phase::Receiving;
        }
        self.receive()
    }

    /// Connecting failed: the next address, if any is left, else the failure.
    fn refused(&mut self, e: io::Error) -> Option<Result<Answer, Failure>> {
        // The first address's error says why, where every one fails (see `connect_tcp`).
        let first = self.first_refusal.take().unwrap_or(e);
        let Some(next) = self.fallback.pop() else {
            return Some(Err(Failure::Connect(first)));
        };
        let Ok((socket, phase)) = connect_tcp(next, &mut self.fallback) else {
            return Some(Err(Failure::Connect(first)));
        };
        self.first_refusal = Some(first);
        self.socket = socket;
        self.phase = phase;
        if phase == Phase::Connecting {
            None
        } else {
            self.advance()
        }
    }

    /// A failure's answer whose head has come while its body is still awaited: the
    /// exchange has failed already, whatever the body says.
    pub fn failed_head(&self) -> Option<&Answer> {
        self.failed.as_ref().map(|f| &f.answer)
    }

    /// When a failure's body stops being waited for (`give_up_body`), if one is.
    pub fn until(&self) -> Option<Instant> {
        self.failed.as_ref().map(|f| f.until)
    }

    /// The failure's answer, with as much of its body as came by `until`.
    pub fn give_up_body(&mut self) -> Option<Answer> {
        let failed = self.failed.take()?;
        let body = &self.received[failed.body_at..];
        Some(Answer {
            detail: printable(excerpt(body, failed.framing), EXCERPT),
            ..failed.answer
        })
    }

    /// Reads what has come, and parses it once a line has ended.
    fn receive(&mut self) -> Option<Result<Answer, Failure>> {
        let mut chunk = [0u8; 2048];
        let ended = loop {
            let room = HEAD_MAX - self.skipped - self.received.len();
            if room == 0 {
                break None;
            }
            let want = room.min(chunk.len());
            match socket::recv(
                self.socket.as_raw_fd(),
                &mut chunk[..want],
                MsgFlags::empty(),
            ) {
                Ok(0) => break Some(Ok(())),
                Ok(n) => {
                    self.new_line |= chunk[..n].contains(&b'\n');
                    self.received.extend_from_slice(&chunk[..n]);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break None,
                Err(e) => break Some(Err(e)),
            }
        };
        let full = self.skipped + self.received.len() >= HEAD_MAX;
        if self.failed.is_none()
            && std::mem::take(&mut self.new_line)
            && let Some(done) = self.parse()
        {
            return Some(done);
        }
        if let Some(failed) = &self.failed {
            let body = &self.received[failed.body_at..];
            return (ended.is_some() || full || body_done(body, failed.framing))
                .then(|| self.give_up_body().map(Ok))
                .flatten();
        }
        match ended {
            Some(Ok(())) => Some(Err(Failure::Closed {
                partial: self.skipped + self.received.len() > 0,
            })),
            Some(Err(e)) => Some(Err(Failure::Receive(e.into()))),
            None if full => Some(Err(Failure::TooLarge)),
            None => None,
        }
    }

    /// The final answer, once its head is whole; interim 1xx heads are dropped on the way
    /// (a server may send `100 Continue` or `103 Early Hints` first, RFC 9110 15.2). A
    /// failure's answer waits for its body (`failed`), unless it came with the head.
    fn parse(&mut self) -> Option<Result<Answer, Failure>> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut response = httparse::Response::new(&mut headers);
            let interim = match response.parse(&self.received) {
                Ok(httparse::Status::Partial) => return None,
                Err(e) => return Some(Err(Failure::Malformed(e))),
                Ok(httparse::Status::Complete(len)) => {
                    let status = response.code.unwrap_or_default();
                    // 101 is final: it answers an upgrade, which is never asked for.
                    if (100..200).contains(&status) && status != 101 {
                        len
                    } else {
                        let (answer, framing) = head(&response, self.head);
                        let Some(framing) = framing else {
                            return Some(Ok(answer));
                        };
                        let failed = Failed {
                            answer,
                            body_at: len,
                            framing,
                            until: Instant::now() + LINGER,
                        };
                        let done = body_done(&self.received[len..], framing);
                        self.failed = Some(failed);
                        return done.then(|| self.give_up_body().map(Ok)).flatten();
                    }
                }
            };
            self.received.drain(..interim);
            self.skipped += interim;
        }
    }
}

/// A failure's answer, read up to its head: its body, which says why, is waited for a little.
struct Failed {
    answer: Answer,
    /// Where the body begins in `received`.
    body_at: usize,
    framing: Framing,
    until: Instant,
}

/// How a body's end is known (RFC 9112 6.3), as far as an excerpt needs it.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the connection closes.
    Close,
}

/// The final answer from its head, and how its body is framed if the body is worth reading:
/// a failure's says why. A redirect says where it points instead.
fn head(response: &httparse::Response<'_, '_>, head: bool) -> (Answer, Option<Framing>) {
    let status = response.code.unwrap_or_default();
    let header = |name: &str| {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .next_back()
    };
    let mut answer = Answer {
        status,
        reason: printable(response.reason.unwrap_or_default().as_bytes(), EXCERPT),
        detail: String::new(),
    };
    if (300..400).contains(&status) {
        if let Some(to) = header("location") {
            answer.detail = format!("redirects to {}, not followed", printable(to, EXCERPT));
        }
        return (answer, None);
    }
    if (200..300).contains(&status) || head || status == 204 || status == 304 {
        return (answer, None);
    }
    let framing = match header("transfer-encoding") {
        Some(te) => {
            let last = te.split(|&b| b == b',').next_back().unwrap_or_default();
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked
            } else {
                Framing::Close
            }
        }
        None => header("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(Framing::Close, Framing::Length),
    };
    (answer, Some(framing))
}

/// Whether as much of a body as an excerpt needs has come.
fn body_done(body: &[u8], framing: Framing) -> bool {
    match framing {
        Framing::Length(n) => body.len() >= n.min(BODY_MAX),
        Framing::Close => body.len() >= BODY_MAX,
        Framing::Chunked => match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete((start, size))) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                body.len() >= start.saturating_add(size.min(BODY_MAX))
            }
            Ok(httparse::Status::Partial) => body.len() >= BODY_MAX,
            Err(httparse::InvalidChunkSize) => true,
        },
    }
}

/// The start of a body: the first chunk of a chunked one, no more than its length of another.
fn excerpt(body: &[u8], framing: Framing) -> &[u8] {
    match framing {
        Framing::Length(n) => &body[..n.min(body.len())],
        Framing::Close => body,
        Framing::Chunked => match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete((start, size))) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                &body[start..start.saturating_add(size).min(body.len())]
            }
            _ => &[],
        },
    }
}

/// Text from the server for a log line: control characters and runs of white space become
/// one space, and it is cut at `max` characters.
fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, word) in text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.chars().count() > max {
        out = out.chars().take(max).collect();
        out.push('…');
    }
    out
}

/// A non-blocking TCP connection to `addr`; where it is refused at once, the next address of
/// `fallback`.
fn connect_tcp(
    mut addr: SocketAddr,
    fallback: &mut Vec<SocketAddr>,
) -> Result<(OwnedFd, Phase), Failure> {
    // Where every address fails, the first one's error says why (`localhost` is 127.0.0.1
    // first; ::1 may fail only because IPv6 is off).
    let mut first: Option<Errno> = None;
    loop {
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let socket = open(family)?;
        let connected = match addr {
            SocketAddr::V4(v4) => socket::connect(socket.as_raw_fd(), &SockaddrIn::from(v4)),
            SocketAddr::V6(v6) => socket::connect(socket.as_raw_fd(), &SockaddrIn6::from(v6)),
        };
        match connected {
            Ok(()) => return Ok((socket, Phase::Sending)),
            Err(Errno::EINPROGRESS | Errno::EINTR) => return Ok((socket, Phase::Connecting)),
            Err(e) => match fallback.pop() {
                Some(next) => {
                    first.get_or_insert(e);
                    addr = next;
                }
                None => return Err(Failure::Connect(first.unwrap_or(e).into())),
            },
        }
    }
}

/// A non-blocking connection to a unix socket. A listener whose queue is full refuses it
/// (EAGAIN) rather than keep it waiting: that is a failure too.
fn connect_unix(path: &std::path::Path) -> Result<(OwnedFd, Phase), Failure> {
    let addr = UnixAddr::new(path).map_err(|e| Failure::Connect(e.into()))?;
    let socket = open(AddressFamily::Unix)?;
    match socket::connect(socket.as_raw_fd(), &addr) {
        Ok(()) => Ok((socket, Phase::Sending)),
        Err(Errno::EINPROGRESS | Errno::EINTR) => Ok((socket, Phase::Connecting)),
        Err(Errno::EAGAIN) => Err(Failure::Queue),
        Err(e) => Err(Failure::Connect(e.into())),
    }
}

fn open(family: AddressFamily) -> Result<OwnedFd, Failure> {
    socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Failure::Socket(e.into()))
}

/// How one request ended.
#[derive(Debug)]
pub enum Outcome {
    Answered(Answer),
    Failed(Failure),
    /// The deadline came first, in this phase.
    Deadline(Phase),
}

/// Sends `request` and waits for the answer until `deadline`; `Err` if one of `interrupts`
/// came first.
pub fn ask(
    request: &Request,
    deadline: Instant,
    interrupts: Option<&Interrupts>,
) -> Result<Outcome, Signal> {
    let exchange = match Exchange::start(request) {
        Ok(exchange) => exchange,
        Err(failure) => return Ok(Outcome::Failed(failure)),
    };
    let mut asking = Asking {
        exchange,
        deadline,
        ended: None,
    };
    event::run(&mut asking, interrupts)
}

/// One exchange, run on the event loop until it ends or the deadline comes.
struct Asking {
    exchange: Exchange,
    deadline: Instant,
    ended: Option<Result<Answer, Failure>>,
}

impl Machine for Asking {
    type Source = ();
    type Output = Outcome;

    fn tick(&mut self, now: Instant) -> Step<Outcome> {
        let until = self.exchange.until();
        if until.is_some_and(|until| now >= until.min(self.deadline))
            && let Some(answer) = self.exchange.give_up_body()
        {
            return Step::Done(Outcome::Answered(answer));
        }
        match self.ended.take() {
            Some(Ok(answer)) => Step::Done(Outcome::Answered(answer)),
            Some(Err(failure)) => Step::Done(Outcome::Failed(failure)),
            None if now >= self.deadline => Step::Done(Outcome::Deadline(self.exchange.phase())),
            None => Step::Sleep(Wake {
                at: until.map_or(self.deadline, |until| until.min(self.deadline)),
                exact: self.deadline,
            }),
        }
    }

    fn watch(&self, fds: &mut Watch<()>) {
        if self.exchange.wants_write() {
            fds.add_writable(self.exchange.fd(), ());
        } else {
            fds.add(self.exchange.fd(), ());
        }
    }

    fn ready(&mut self, (): ()) {
        self.ended = self.exchange.advance();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &[u8]) -> Option<Result<Answer, String>> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut exchange = Exchange {
            socket: a.into(),
            phase: Phase::Receiving,
            fallback: Vec::new(),
            first_refusal: None,
            request: Vec::new(),
            sent: 0,
            received: text.to_vec(),
            skipped: 0,
            new_line: true,
            head: false,
            failed: None,
        };
        exchange
            .parse()
            .or_else(|| exchange.give_up_body().map(Ok))
            .map(|r| r.map_err(|e| e.to_string()))
    }

    #[test]
    fn the_status_decides() {
        let ok = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nOK\n")
            .unwrap()
            .unwrap();
        assert!(ok.success());
        assert_eq!(ok.to_string(), "200 OK");
        let refused = parsed(
            concat!(
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 38\r\n\r\n",
                "Method GET not allowed, POST required."
            )
            .as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert!(!refused.success());
        assert_eq!(
            refused.to_string(),
            "405 Method Not Allowed (Method GET not allowed, POST required.)"
        );
        let moved = parsed(b"HTTP/1.0 302 Found\nLocation: /elsewhere\n\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            moved.to_string(),
            "302 Found (redirects to /elsewhere, not followed)"
        );
        let bare = parsed(b"HTTP/1.1 204\r\n\r\n").unwrap().unwrap();
        assert_eq!(bare.to_string(), "204");
    }

    #[test]
    fn interim_answers_are_skipped() {
        let answer = parsed(
            concat!(
                "HTTP/1.1 100 Continue\r\n\r\n",
                "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                "HTTP/1.1 503 Busy\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(answer.status, 503);
        let upgrade = parsed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!upgrade.success(), "101 is final, and no success");
        assert!(
            parsed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n").is_none(),
            "the final head is not whole yet"
        );
    }

    #[test]
    fn a_head_that_is_not_whole_or_not_http_is_no_answer() {
        assert!(parsed(b"HTTP/1.1 200 OK").is_none());
        assert!(parsed(b"HTTP/1.1 200 OK\r\nServer: x\r\n").is_none());
        for bad in [
            &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"<html>\n",
        ] {
            let e = parsed(bad).unwrap().unwrap_err();
            assert!(e.starts_with("not an HTTP/1.x answer"), "{e}");
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=HEADERS_MAX {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let e = parsed(&many).unwrap().unwrap_err();
        assert!(e.contains("more than 64 headers"), "{e}");
    }

    #[test]
    fn a_failures_body_is_read_as_framed() {
        let chunked = parsed(
            b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nbroke\r\n0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(chunked.to_string(), "500 Oops (broke)");
        let framed = parsed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnopeEXTRA")
            .unwrap()
            .unwrap();
        assert_eq!(framed.detail, "nope");
        let forged = parsed(b"HTTP/1.1 500 x\r\n\r\nline\nprestop: drained after 1s\x1b[2K")
            .unwrap()
            .unwrap();
        assert!(!forged.detail.contains(['\n', '\x1b']), "{forged}");
    }

    #[test]
    fn requests_are_written_whole() {
        let request = Request {
            method: "POST",
            endpoint: Endpoint::Tcp(vec!["127.0.0.1:15000".parse().unwrap()]),
            host: "127.0.0.1:15000".into(),
            target: "/healthcheck/fail".into(),
            url: "http://127.0.0.1:15000/healthcheck/fail".into(),
        };
        let text = String::from_utf8(request.bytes()).unwrap();
        assert!(
            text.starts_with("POST /healthcheck/fail HTTP/1.1\r\nHost: 127.0.0.1:15000\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"), "{text}");
        let get = Request {
            method: "GET",
            ..request
        };
        assert!(
            !String::from_utf8(get.bytes())
                .unwrap()
                .contains("Content-Length")
        );
        assert_eq!(
            get.describe(),
            "\"GET /healthcheck/fail HTTP/1.1\" to 127.0.0.1:15000"
        );
    }
}
