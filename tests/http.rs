//! `--http` and `--wait-http`: real HTTP servers on loopback and on a unix socket, started
//! here, that record every request they get.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Running, TestEnv, assert_in_order, stderr, stdout, timed, with_fd_limit};

/// A request as the server read it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a request.
#[derive(Clone)]
enum Reply {
    /// A status, its reason and a body, framed by Content-Length.
    Status(u16, &'static str, String),
    /// These bytes as they are, then the connection is closed.
    Raw(Vec<u8>),
    /// Nothing at all: the connection stays open, unanswered, until the test ends.
    Silent,
    /// These bytes, then nothing more: the connection stays open until the test ends.
    Stalled(Vec<u8>),
    /// These bytes one at a time, each in a segment of its own.
    Slowly(Vec<u8>),
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A server that records each request it reads, then answers as its handler says.
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, handler): (_, Handler) = (seen.clone(), Arc::new(handler));
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (record, handler) = (record.clone(), handler.clone());
                thread::spawn(move || serve(conn, &record, &*handler));
            }
        });
        Server { addr, seen }
    }

    /// A server that answers the first request with `first`, and every later one with `then`.
    fn first_then(first: Reply, then: Reply) -> Server {
        let answered = AtomicUsize::new(0);
        Server::start(move |_| match answered.fetch_add(1, Ordering::SeqCst) {
            0 => first.clone(),
            _ => then.clone(),
        })
    }

    /// A server that answers every request with this status.
    fn answering(status: u16, reason: &'static str, body: &'static str) -> Server {
        Server::start(move |_| Reply::Status(status, reason, body.into()))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one request head, records it, and answers it.
fn serve<S: Read + Write>(conn: S, record: &Mutex<Vec<Seen>>, handler: &dyn Fn(&Seen) -> Reply) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let (method, target) = (words.next(), words.next());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return,
            Ok(_) if header.trim().is_empty() => break,
            Ok(_) => {
                if let Some((name, value)) = header.split_once(':') {
                    headers.push((name.trim().to_owned(), value.trim().to_owned()));
                }
            }
        }
    }
    let seen = Seen {
        method: method.unwrap_or_default().to_owned(),
        target: target.unwrap_or_default().to_owned(),
        headers,
    };
    record.lock().unwrap().push(seen.clone());
    let mut conn = reader.into_inner();
    match handler(&seen) {
        Reply::Status(status, reason, body) => {
            let reply = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
        Reply::Raw(bytes) => {
            let _ = conn.write_all(&bytes);
        }
        Reply::Silent => thread::sleep(Duration::from_secs(120)),
        Reply::Stalled(bytes) => {
            let _ = conn.write_all(&bytes);
            thread::sleep(Duration::from_secs(120));
        }
        Reply::Slowly(bytes) => {
            for byte in bytes {
                if conn.write_all(&[byte]).and_then(|()| conn.flush()).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// A port on which nothing listens: bound, then closed again.
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn drain(env: &TestEnv, args: &[&str]) -> std::process::Command {
    let mut full = vec!["drain", "--grace-period", "20", "--reserve", "2"];
    full.extend_from_slice(args);
    env.prestop(full)
}

#[test]
fn stop_actions_run_in_order_touch_signal_http_exec() {
    let env = TestEnv::new();
    let steps = env.path("steps.log");
    let sentinel = env.path("draining");
    let lock = env.touch("lock/job.lock");
    let script = format!(
        "trap 'echo signal >> {l}' USR1; echo ready; while :; do sleep 30 & wait $!; done",
        l = steps.display()
    );
    let mut app = std::process::Command::new("bash");
    app.args(["-c", &script])
        .stdout(std::process::Stdio::piped());
    let mut app = common::Guard::spawn(&mut app);
    let ready = common::lines_of(app.child().stdout.take().unwrap());
    assert_eq!(ready.recv_timeout(Duration::from_secs(5)).unwrap(), "ready");
    // Each request is recorded with whether the sentinel was there. The app writes its line
    // from a signal handler, a moment after the signal: the server gives it up to 5 s. Were
    // the request sent before the signal, the line would come after the request's.
    let server = {
        let (steps, sentinel) = (steps.clone(), sentinel.clone());
        Server::start(move |seen| {
            for _ in 0..500 {
                if fs::read_to_string(&steps).is_ok_and(|s| s.contains("signal")) {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let touched = if sentinel.exists() {
                "touched"
            } else {
                "untouched"
            };
            let line = format!("{} {} {touched}\n", seen.method, seen.target);
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&steps)
                .unwrap()
                .write_all(line.as_bytes())
                .unwrap();
            Reply::Status(200, "OK", "OK\n".into())
        })
    };
    let exec = format!(
        "sh -c 'echo exec >> {l}; rm {lock}'",
        l = steps.display(),
        lock = lock.display()
    );
    let (first, second) = (
        format!("POST {}", server.url("/healthcheck/fail")),
        server.url("/drain?graceful&inboundonly"),
    );
    let out = drain(
        &env,
        &[
            "--exec",
            &exec,
            "--http",
            &first,
            "--touch",
            sentinel.to_str().unwrap(),
            "--http",
            &second,
            "--signal",
            "USR1",
            "--signal-target",
            &app.id().to_string(),
            "--wait-lock",
            lock.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(
        fs::read_to_string(&steps).unwrap(),
        "signal\nPOST /healthcheck/fail touched\nGET /drain?graceful&inboundonly touched\nexec\n"
    );
    assert_in_order(
        &log,
        &[
            "touched ",
            "sent SIGUSR1",
            &format!("{first}: 200 OK after"),
            &format!("GET {second}: 200 OK after"),
            "running sh -c",
            "waiting for lock",
            "drained after",
        ],
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let host = server.addr.to_string();
    assert_eq!(seen[0].header("host"), Some(host.as_str()));
    assert_eq!(seen[0].header("connection"), Some("close"));
    assert_eq!(
        seen[0].header("content-length"),
        Some("0"),
        "a POST says its body is empty"
    );
    assert_eq!(seen[1].header("content-length"), None);
}

/// A stop action that did not get a 2xx: logged with why, exit 3, and what follows it still
/// runs (the exec, then the wait).
fn fails_and_still_drains(url: &str, why: &str) {
    let env = TestEnv::new();
    let lock = env.touch("lock/job.lock");
    let request = format!("POST {url}");
    let exec = format!("rm {}", lock.display());
    let out = drain(
        &env,
        &[
            "--http",
            &request,
            "--exec",
            &exec,
            "--wait-lock",
            lock.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    let failure = format!("{request}: {why}");
    assert_in_order(
        &log,
        &[
            &format!("stop action failed: {failure}"),
            "exited 0",
            "waiting for lock",
        ],
    );
    let summary = stdout(&out);
    assert!(
        summary.contains(&format!("but 1 stop action(s) failed: {failure}")),
        "{summary}"
    );
}

#[test]
fn a_status_other_than_2xx_fails_the_action() {
    let server = Server::answering(500, "Internal Server Error", "boom\n");
    fails_and_still_drains(&server.url("/shutdown"), "500 Internal Server Error (boom)");
    let server = Server::answering(404, "Not Found", "");
    fails_and_still_drains(&server.url("/nope"), "404 Not Found");
    // Envoy's admin API answers GET to a POST endpoint so, and says why.
    let server = Server::answering(
        405,
        "Method Not Allowed",
        "Method GET not allowed, POST required.",
    );
    fails_and_still_drains(
        &server.url("/healthcheck/fail"),
        "405 Method Not Allowed (Method GET not allowed, POST required.)",
    );
    let server = Server::start(|_| {
        Reply::Raw(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n\r\n".to_vec())
    });
    fails_and_still_drains(
        &server.url("/old"),
        "302 Found (redirects to /elsewhere, not followed)",
    );
    assert_eq!(server.seen().len(), 1, "a redirect is not followed");
}

#[test]
fn a_refused_connection_fails_the_action() {
    fails_and_still_drains(
        &format!("http://{}/x", closed_port()),
        "cannot connect: Connection refused (ECONNREFUSED)",
    );
}

#[test]
fn a_server_that_never_answers_holds_the_action_only_to_the_deadline() {
    let env = TestEnv::new();
    let server = Server::start(|_| Reply::Silent);
    let request = format!("POST {}", server.url("/healthcheck/fail"));
    // The actions after it find the deadline come: nothing reaches the app after it.
    let next = TcpListener::bind("127.0.0.1:0").unwrap();
    next.set_nonblocking(true).unwrap();
    let later = format!("POST http://{}/drain", next.local_addr().unwrap());
    let marker = env.path("exec-ran");
    let exec = format!("touch {}", marker.display());
    let (out, took) = timed(env.prestop([
        "drain",
        "--http",
        &request,
        "--http",
        &later,
        "--exec",
        &exec,
        "--grace-period",
        "3",
        "--reserve",
        "1",
    ]));
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    let summary = stdout(&out);
    assert!(
        summary.contains(&format!(
            "3 stop action(s) failed: {request}: no answer by the deadline (request sent, no \
             answer, after 2."
        )),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("{later}: not sent: the deadline had come")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("exec {exec}: not run: the deadline had come")),
        "{summary}"
    );
    assert!(!marker.exists(), "{log}");
    assert_eq!(
        next.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "connected after the deadline"
    );
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn a_redelivered_hook_does_not_send_the_request_again() {
    let env = TestEnv::new();
    let server = Server::answering(200, "OK", "OK\n");
    let request = format!("POST {}", server.url("/healthcheck/fail"));
    for _ in 0..2 {
        let out = drain(&env, &["--http", &request]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(server.seen().len(), 1, "{:?}", server.seen());
}

#[test]
fn requests_come_one_per_line_from_the_environment() {
    let env = TestEnv::new();
    let server = Server::answering(200, "OK", "");
    let requests = format!("POST {}\nPUT {}", server.url("/a"), server.url("/b"));
    let out = drain(&env, &[])
        .env("PRESTOP_HTTP", &requests)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen: Vec<String> = server
        .seen()
        .iter()
        .map(|s| format!("{} {}", s.method, s.target))
        .collect();
    assert_eq!(seen, ["POST /a", "PUT /b"]);
}

/// The app's in-flight counter: 503 with the count while work is in flight, 200 once none is.
fn counting_server(in_flight: &Arc<AtomicUsize>) -> Server {
    let count = in_flight.clone();
    Server::start(move |_| match count.load(Ordering::SeqCst) {
        0 => Reply::Status(200, "OK", "drained\n".into()),
        n => Reply::Status(503, "Service Unavailable", format!("{n} in flight\n")),
    })
}

#[test]
fn wait_http_waits_for_a_2xx_and_shows_the_last_status() {
    let env = TestEnv::new();
    let in_flight = Arc::new(AtomicUsize::new(3));
    let server = counting_server(&in_flight);
    let url = server.url("/drained");
    let mut hook = Running::spawn(&mut drain(
        &env,
        &["--wait-http", &url, "--progress-interval", "300ms"],
    ));
    hook.wait_for(&format!(
        "waiting: 1 in flight (GET {url}: 503 Service Unavailable (3 in flight))"
    ));
    in_flight.store(0, Ordering::SeqCst);
    let released = Instant::now();
    let (code, summary, log) = hook.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(summary.contains("drained after"), "{summary}");
    assert!(log.contains(&format!("GET {url} drained after")), "{log}");
    // Re-sent a second after each answer: seen within about that, generously bounded.
    assert!(released.elapsed() < Duration::from_secs(5), "{log}");
    let seen = server.seen();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.method == "GET" && s.target == "/drained")
    );
}

/// `check` looks for 10 s in all: a URL after one that took all of it is not asked, and says
/// so, rather than being asked late or shown as waiting for an answer.
#[test]
fn check_asks_no_url_once_its_time_has_run_out() {
    let env = TestEnv::new();
    let silent = Server::start(|_| Reply::Silent);
    let other = Server::answering(200, "OK", "");
    let (slow, next) = (silent.url("/slow"), other.url("/next"));
    let (out, took) = timed(env.prestop(["check", "--wait-http", &slow, "--wait-http", &next]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("GET {slow}: in flight (no answer yet after 10.")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "GET {next}: unknown (not asked: the look's time had run out)"
        )),
        "{text}"
    );
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn check_sends_one_request_and_a_dry_run_none() {
    let env = TestEnv::new();
    let in_flight = Arc::new(AtomicUsize::new(1));
    let server = counting_server(&in_flight);
    let url = server.url("/drained");
    let out = env
        .prestop(["check", "--wait-http", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "prestop: GET {url}: in flight (503 Service Unavailable (1 in flight))\n\
             prestop: not drained: 1 in flight\n"
        )
    );
    in_flight.store(0, Ordering::SeqCst);
    let out = env
        .prestop(["check", "--wait-http", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(": drained (200 OK)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(server.seen().len(), 2, "one request per check");
    let out = env
        .prestop([
            "check",
            "--wait-http",
            &format!("http://{}/", closed_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("unknown (cannot connect: Connection refused (ECONNREFUSED))"),
        "{}",
        stdout(&out)
    );

    let request = format!("POST {}", server.url("/healthcheck/fail"));
    let out = drain(
        &env,
        &["--http", &request, "--wait-http", &url, "--dry-run"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout(&out);
    assert!(
        plan.contains(&format!(
            "send {request}: \"POST /healthcheck/fail HTTP/1.1\" to {}; 2xx is success",
            server.addr
        )),
        "{plan}"
    );
    assert!(
        plan.contains(&format!(
            "GET {url} answers 2xx: \"GET /drained HTTP/1.1\" to {}",
            server.addr
        )),
        "{plan}"
    );
    assert_eq!(server.seen().len(), 2, "a dry run sent a request");
    assert!(!env.state_dir().exists());
}

/// A long poll: the endpoint holds the request until the test lets it answer.
fn long_poll_server() -> (Server, Sender<()>) {
    let (release, released): (Sender<()>, Receiver<()>) = mpsc::channel();
    let released = Mutex::new(released);
    let server = Server::start(move |_| {
        let _ = released.lock().unwrap().recv();
        Reply::Status(200, "OK", String::new())
    });
    (server, release)
}

#[test]
fn wait_http_holds_a_long_poll_open_until_it_is_answered() {
    let env = TestEnv::new();
    let (server, release) = long_poll_server();
    let url = server.url("/wait-for-drain");
    let mut hook = Running::spawn(&mut drain(
        &env,
        &["--wait-http", &url, "--progress-interval", "300ms"],
    ));
    // Held past the re-send cadence, and still the one request.
    hook.wait_for(&format!("GET {url}: no answer yet after 1."));
    assert_eq!(server.seen().len(), 1);
    release.send(()).unwrap();
    let (code, summary, log) = hook.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(summary.contains("drained after"), "{summary}");
    assert_eq!(server.seen().len(), 1, "{log}");
}

#[test]
fn the_deadline_holds_when_the_wait_endpoint_never_answers() {
    let env = TestEnv::new();
    let server = Server::start(|_| Reply::Silent);
    let url = server.url("/ready");
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-http",
        &url,
        "--grace-period",
        "3",
        "--reserve",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    let summary = stdout(&out);
    assert!(
        summary.contains(&format!(
            "1 still in flight (GET {url}: no answer yet after 2."
        )),
        "{summary}"
    );
}

#[test]
fn an_endpoint_that_cannot_be_reached_is_unknown_never_drained() {
    let env = TestEnv::new();
    let url = format!("http://{}/drained", closed_port());
    let out = env
        .prestop([
            "drain",
            "--wait-http",
            &url,
            "--grace-period",
            "3",
            "--reserve",
            "1",
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "cannot see GET {url}: cannot connect: Connection refused (ECONNREFUSED)"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches("cannot see").count(),
        1,
        "said once, not per request: {log}"
    );
}

#[test]
fn a_unix_socket_is_asked_as_localhost() {
    let env = TestEnv::new();
    let path = env.path("admin.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let answers = Arc::new(AtomicUsize::new(0));
    let answered = answers.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let n = answered.fetch_add(1, Ordering::SeqCst);
            serve(conn, &record, &move |_| match n {
                // The first wait request finds the app still busy.
                1 => Reply::Status(503, "Service Unavailable", String::new()),
                _ => Reply::Status(200, "OK", "OK\n".into()),
            });
        }
    });
    let socket = path.display();
    let request = format!("POST http://unix:{socket}:/healthcheck/fail");
    let wait = format!("http://unix:{socket}:/ready");
    let out = drain(&env, &["--http", &request, "--wait-http", &wait])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen = seen.lock().unwrap().clone();
    let lines: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {} {:?}", s.method, s.target, s.header("host")))
        .collect();
    assert_eq!(
        lines,
        [
            r#"POST /healthcheck/fail Some("localhost")"#,
            r#"GET /ready Some("localhost")"#,
            r#"GET /ready Some("localhost")"#
        ]
    );
}

#[test]
fn bad_requests_are_refused_before_anything_is_sent() {
    let server = Server::answering(200, "OK", "");
    let host = server.addr.to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("--http", "ftp://127.0.0.1/x".into(), "only http://"),
        (
            "--http",
            format!("POST https://{host}/x"),
            "TLS would more than double",
        ),
        ("--wait-http", format!("https://{host}/x"), "TLS"),
        ("--http", "POST http:///x".into(), "no host"),
        ("--http", "http://127.0.0.1:0/x".into(), "port 0"),
        ("--http", "http://127.0.0.1:65536/x".into(), "1 to 65535"),
        ("--http", format!("FETCH http://{host}/x"), "unknown method"),
        ("--http", format!("post http://{host}/x"), "write POST"),
        ("--http", format!("POST http://{host}/a b"), "no space"),
        ("--wait-http", format!("http://{host}/a b"), "no space"),
        ("--http", format!("POST http://{host}/a\nb"), "newline"),
        ("--http", format!("http://{host}/a\tb"), "control"),
        ("--http", format!("http://{host}/x#frag"), "fragment"),
        ("--http", "http://example.com/x".into(), "resolves no names"),
        ("--wait-http", format!("GET http://{host}/x"), "always GET"),
        ("--http", String::new(), "empty"),
    ];
    for (option, value, why) in &cases {
        let env = TestEnv::new();
        let sentinel = env.path("sentinel");
        let out = env
            .prestop([
                "drain",
                "--touch",
                sentinel.to_str().unwrap(),
                option,
                value,
            ])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{value:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{value:?}: {err}");
        assert!(err.starts_with(&format!("prestop: {option} \"")), "{err}");
        assert!(err.contains(why), "{value:?}: {err}");
        assert!(stdout(&out).is_empty());
        assert!(!sentinel.exists(), "{value:?}: the sentinel was touched");
        assert!(!env.state_dir().exists(), "{value:?}: a state dir");
    }
    // Credentials are refused, and not repeated in the error either.
    let env = TestEnv::new();
    let out = drain(
        &env,
        &["--http", &format!("POST http://admin:s3cret@{host}/x")],
    )
    .output()
    .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("\"POST http://***@{host}/x\"")),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    assert!(server.seen().is_empty(), "{:?}", server.seen());
}

/// What a misbehaving server sends is judged a failure, never a success, and never held
/// longer than the deadline or in more memory than a head's worth.
fn hostile(reply: Vec<u8>, why: &str) {
    let env = TestEnv::new();
    let bytes = Arc::new(reply);
    let server = Server::start(move |_| Reply::Raw(bytes.to_vec()));
    let request = format!("POST {}", server.url("/x"));
    let (out, took) = timed(drain(&env, &["--http", &request]));
    let summary = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{summary}{}", stderr(&out));
    assert!(
        summary.contains(&format!("{request}: {why}")),
        "{why:?} not in {summary}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_misbehaving_server_gets_no_benefit_of_the_doubt() {
    hostile(
        b"HTTP/1.1 200 OK".to_vec(),
        "the server closed the connection in the middle of its answer",
    );
    hostile(
        b"HTTP/1.1 20".to_vec(),
        "the server closed the connection in the middle of its answer",
    );
    hostile(
        Vec::new(),
        "the server closed the connection without an answer",
    );
    hostile(
        b"\x00\x01garbage\r\n\r\n".to_vec(),
        "not an HTTP/1.x answer",
    );
    let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
    while huge.len() < 10 << 20 {
        huge.extend_from_slice(format!("X-Padding: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    hostile(huge, "the answer's head is over 16 KiB, not read further");
    let mut interim = Vec::new();
    while interim.len() < 1 << 20 {
        interim.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    hostile(interim, "the answer's head is over 16 KiB");
}

#[test]
fn an_answer_that_comes_a_byte_at_a_time_is_read_whole() {
    let env = TestEnv::new();
    let reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let server = Server::start(move |_| Reply::Slowly(reply.to_vec()));
    let request = format!("POST {}", server.url("/x"));
    let out = drain(&env, &["--http", &request]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A failure's body that follows its head a byte at a time is still quoted, as far as
    // it has come within a tenth of a second.
    let reply = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
    let server = Server::start(move |_| Reply::Slowly(reply.to_vec()));
    let request = format!("POST {}", server.url("/x"));
    let out = drain(&env, &["--http", &request]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{request}: 503 Service Unavailable (b")),
        "{}",
        stdout(&out)
    );
}

/// A unix socket whose listener accepts nothing and whose queue is full refuses at once.
#[test]
fn a_unix_socket_with_a_full_queue_fails_at_once() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let env = TestEnv::new();
    let path = env.path("full.sock");
    let addr = UnixAddr::new(&path).unwrap();
    let stream = || {
        socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap()
    };
    let listener = stream();
    bind(listener.as_raw_fd(), &addr).unwrap();
    listen(&listener, Backlog::new(0).unwrap()).unwrap();
    let mut queued = Vec::new();
    loop {
        let client = stream();
        match connect(client.as_raw_fd(), &addr) {
            Ok(()) => queued.push(client),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(queued.len() < 100, "the queue never filled");
    }
    let request = format!("POST http://unix:{}:/healthcheck/fail", path.display());
    let (out, took) = timed(drain(&env, &["--http", &request]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("the server is not accepting connections"),
        "{}",
        stdout(&out)
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_server_that_answers_with_bare_line_feeds_is_read() {
    let env = TestEnv::new();
    let server = Server::start(|_| Reply::Raw(b"HTTP/1.0 200 OK\nServer: old\n\nOK".to_vec()));
    let request = format!("POST {}", server.url("/x"));
    let out = drain(&env, &["--http", &request]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_2xx_counts_only_while_the_endpoint_keeps_answering() {
    let env = TestEnv::new();
    // "Drained" once, then never another answer.
    let server = Server::first_then(Reply::Status(200, "OK", String::new()), Reply::Silent);
    let url = server.url("/drained");
    let out = wait_http_budget_3s(&env, &url, "2500ms");
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("GET {url} drained after")), "{log}");
    let summary = stdout(&out);
    assert!(
        summary.contains(&format!("1 still in flight (GET {url}: 200 OK ")),
        "{summary}"
    );
    assert!(summary.contains("ago, and no answer since"), "{summary}");
    assert!(server.seen().len() >= 2, "{:?}", server.seen());
}

/// A `--wait-http` drain with a 3 s budget, and at least `min_wait` of it.
fn wait_http_budget_3s(env: &TestEnv, url: &str, min_wait: &str) -> std::process::Output {
    env.prestop([
        "drain",
        "--wait-http",
        url,
        "--min-wait",
        min_wait,
        "--grace-period",
        "4",
        "--reserve",
        "1",
    ])
    .output()
    .unwrap()
}

/// A failure counts from its head: a 503 whose body never comes is in flight the moment its
/// head is read, although the 2xx before it is still fresh and the body is still awaited.
#[test]
fn a_failure_counts_from_its_head_not_its_body() {
    let env = TestEnv::new();
    let stalled = b"HTTP/1.1 503 Busy\r\nContent-Length: 1000\r\n\r\n".to_vec();
    let server = Server::first_then(
        Reply::Status(200, "OK", String::new()),
        Reply::Stalled(stalled),
    );
    let url = server.url("/drained");
    // The 503's head comes 1 s after the 200 (decided at 1.08 s, 80 ms to spare); its body
    // would be awaited until 1.1 s, and the 200 counted until then.
    let out = wait_http_budget_3s(&env, &url, "1080ms");
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(stdout(&out).contains("503 Busy"), "{}", stdout(&out));
}

/// Out of file descriptors, with more URLs to ask than sockets left: those that cannot be
/// asked are unknown, never drained.
#[test]
fn out_of_file_descriptors_no_url_passes_for_drained() {
    let env = TestEnv::new();
    let server = Server::start(|_| Reply::Silent);
    let urls: Vec<String> = (0..30).map(|i| server.url(&format!("/{i}"))).collect();
    let mut args = vec!["drain", "--grace-period", "3", "--reserve", "1"];
    for url in &urls {
        args.extend(["--wait-http", url]);
    }
    let mut cmd = env.prestop(args);
    with_fd_limit(&mut cmd, 20);
    let out = cmd.output().unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("cannot open a socket: Too many open files (EMFILE)"),
        "{log}"
    );
    assert!(
        stdout(&out).contains("30 still in flight"),
        "{}",
        stdout(&out)
    );
}
