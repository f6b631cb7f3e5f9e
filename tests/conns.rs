//! `--wait-conns PORT`: real listeners, real client connections over loopback, real requests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Running, TestEnv, stderr, stdout, timed};

/// A minimal HTTP/1.1 server: each request (a line ending a blank line) is answered after
/// `delay`, on a keep-alive connection.
struct Server {
    port: u16,
}

impl Server {
    fn start(bind: &str, delay: Duration) -> Server {
        let listener = TcpListener::bind(bind).unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                thread::spawn(move || serve(conn, delay));
            }
        });
        Server { port }
    }
}

fn serve(conn: TcpStream, delay: Duration) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => {
                thread::sleep(delay);
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if writer.write_all(reply).is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

/// A client that sends one request and reads its answer; the connection stays open (idle,
/// keep-alive) for as long as the value lives.
fn ask(addr: SocketAddr) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = [0u8; 40];
    conn.read_exact(&mut reply).unwrap();
    conn
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn drain(env: &TestEnv, port: u16, extra: &[&str]) -> std::process::Command {
    let port = port.to_string();
    let mut args = vec![
        "drain",
        "--wait-conns",
        &port,
        "--grace-period",
        "12",
        "--reserve",
        "2",
    ];
    args.extend_from_slice(extra);
    env.prestop(args)
}

#[test]
fn idle_keep_alive_connections_do_not_hold_the_drain() {
    let env = TestEnv::new();
    let server = Server::start("127.0.0.1:0", Duration::ZERO);
    let _idle: Vec<TcpStream> = (0..5).map(|_| ask(local(server.port))).collect();
    // Their last answers went out over a second ago: idle, not still sending.
    thread::sleep(Duration::from_millis(1100));
    let (out, took) = timed(drain(&env, server.port, &[]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(took < Duration::from_secs(3), "{took:?}");
    let (out, _) = timed(env.prestop(["check", "--wait-conns", &server.port.to_string()]));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("0 in flight, 5 idle"),
        "{}",
        stdout(&out)
    );
    // Counted, they hold it to the deadline.
    let port = server.port.to_string();
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-conns",
        &port,
        "--count-idle-conns",
        "--grace-period",
        "3",
        "--reserve",
        "2",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_request_answered_after_3s_holds_the_drain_until_it_is() {
    let env = TestEnv::new();
    let server = Server::start("127.0.0.1:0", Duration::from_secs(3));
    let addr = local(server.port);
    // Connected here, so that the request is on its way before the hook starts.
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let asked = Instant::now();
    let client = thread::spawn(move || {
        let mut reply = [0u8; 40];
        conn.read_exact(&mut reply).unwrap();
        conn
    });
    let mut hook = Running::spawn(&mut drain(
        &env,
        server.port,
        &["--progress-interval", "500ms"],
    ));
    hook.wait_for("1 in flight, 0 idle");
    let (code, summary, log) = hook.finish();
    // Taken before the client is joined, which waits for the answer itself.
    let returned = asked.elapsed();
    let answered = client.join().unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        returned >= Duration::from_millis(2900),
        "returned {returned:?} after the request, before its answer: {log}"
    );
    assert!(summary.contains("drained after"), "{summary}");
    drop(answered);
}

#[test]
fn the_last_in_flight_connection_closing_ends_the_wait_at_once() {
    let env = TestEnv::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(local(port)).unwrap();
    let (server_side, _) = listener.accept().unwrap();
    // Nothing exchanged yet: in flight.
    let mut hook = Running::spawn(&mut drain(&env, port, &[]));
    hook.wait_for("1 in flight");
    thread::sleep(Duration::from_millis(200));
    let closed = Instant::now();
    drop(server_side);
    drop(client);
    let (code, _, log) = hook.finish();
    assert_eq!(code, Some(0), "{log}");
    // Well under the once-a-second dump: the socket-destroy event ended it.
    assert!(
        closed.elapsed() < Duration::from_millis(500),
        "{:?}\n{log}",
        closed.elapsed()
    );
}

#[test]
fn a_new_connection_during_quiet_for_restarts_the_window() {
    let env = TestEnv::new();
    let server = Server::start("127.0.0.1:0", Duration::ZERO);
    let port = server.port;
    let start = Instant::now();
    let mut hook = Running::spawn(&mut drain(&env, port, &["--quiet-for", "2s"]));
    hook.wait_for("waiting for conns");
    // A short-lived connection every 0.5 s for 2 s: each restarts the quiet window, even
    // those that come and go between two looks.
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(500));
        drop(ask(local(port)));
    }
    let last = start.elapsed();
    let (code, _, log) = hook.finish();
    let took = start.elapsed();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        took >= last + Duration::from_millis(1900),
        "quiet for 2 s after the last connection at {last:?}, but returned at {took:?}\n{log}"
    );
}

#[test]
fn ipv6_and_v4_mapped_clients_are_seen() {
    let env = TestEnv::new();
    // A dual-stack listener: IPv4 clients show as ::ffff:127.0.0.1.
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let v6 = TcpStream::connect((Ipv6Addr::LOCALHOST, port)).unwrap();
    let v4 = TcpStream::connect(local(port)).unwrap();
    let accepted: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
    let out = env
        .prestop(["check", "--wait-conns", &port.to_string()])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("2 in flight"), "{text}");
    assert!(
        text.contains("[::1]:") && text.contains("127.0.0.1:"),
        "{text}"
    );
    // Only the address asked for: the IPv4 client of the dual-stack listener.
    let out = env
        .prestop(["check", "--wait-conns", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("1 in flight"), "{}", stdout(&out));
    let out = env
        .prestop(["check", "--wait-conns", &format!("[::1]:{port}")])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("1 in flight"), "{}", stdout(&out));
    drop((v6, v4, accepted));
}

#[test]
fn the_accept_backlog_counts() {
    let env = TestEnv::new();
    // A listener that never accepts: its clients wait in the accept queue.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _queued: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(local(port)).unwrap())
        .collect();
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-conns",
        &port.to_string(),
        "--grace-period",
        "3",
        "--reserve",
        "2",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        stdout(&out).contains("3 still in flight") && stdout(&out).contains("not accepted yet"),
        "{}",
        stdout(&out)
    );
    drop(listener);
}

#[test]
fn a_port_nobody_listens_on_is_drained_at_once() {
    let env = TestEnv::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, took) = timed(drain(&env, port, &[]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn bad_ports_are_refused() {
    let env = TestEnv::new();
    for bad in [
        "0",
        "65536",
        "localhost:80",
        "example.com:8080",
        ":",
        "http",
        "",
        "+80",
        "[::1]",
        "1.2.3:80",
        "[::1]:0",
        "-1",
        "-80",
    ] {
        let out = env
            .prestop(["drain", "--wait-conns", bad, "--dry-run"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
        assert!(err.contains("--wait-conns"), "{bad:?}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

/// A seccomp profile that refuses netlink sockets, as a strict one might: prestop says so
/// once and reads `/proc/net/tcp` instead, where it cannot tell idle from busy, so every open
/// connection counts as in flight (never a false "drained").
#[test]
fn where_seccomp_refuses_netlink_proc_net_tcp_stands_in() {
    let env = TestEnv::new();
    let server = Server::start("127.0.0.1:0", Duration::ZERO);
    let _idle: Vec<TcpStream> = (0..2).map(|_| ask(local(server.port))).collect();
    let port = server.port.to_string();
    let mut cmd = env.prestop([
        "drain",
        "--wait-conns",
        &port,
        "--grace-period",
        "3",
        "--reserve",
        "2",
    ]);
    refuse_netlink(&mut cmd);
    let (out, took) = timed(cmd);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_eq!(log.matches("netlink refused").count(), 1, "{log}");
    assert!(
        log.contains("(EPERM)") && log.contains("/proc/net/tcp"),
        "{log}"
    );
    assert!(
        stdout(&out).contains("2 still in flight"),
        "{}",
        stdout(&out)
    );
    // Nothing on a port: drained, fallback or not.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = drain(&env, port, &[]);
    refuse_netlink(&mut cmd);
    let (out, _) = timed(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Installs, in the child, a seccomp filter that fails `socket(AF_NETLINK, ...)` with EPERM.
fn refuse_netlink(cmd: &mut std::process::Command) {
    use nix::libc;
    use std::os::unix::process::CommandExt;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7;
    const LD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let filter = [
        op(LD, 0, 0, 4), // seccomp_data.arch
        op(JEQ, 1, 0, ARCH),
        op(RET, 0, 0, 0x7fff_0000), // another architecture: allow
        op(LD, 0, 0, 0),            // seccomp_data.nr
        op(JEQ, 0, 3, libc::SYS_socket as u32),
        op(LD, 0, 0, 16), // the low word of args[0], the address family
        op(JEQ, 0, 1, libc::AF_NETLINK as u32),
        op(RET, 0, 0, 0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO
        op(RET, 0, 0, 0x7fff_0000),                      // SECCOMP_RET_ALLOW
    ];
    // SAFETY: between fork and exec; prctl is async-signal-safe, and the filter lives on the
    // caller's stack, which the child's copy keeps until exec.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &raw const prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An app that writes a large response and closes leaves its end in the kernel's send queue
/// (FIN-WAIT-1): in flight until the client has it, as the pod's teardown would cut it.
#[test]
fn a_response_still_queued_after_the_app_closed_holds_the_drain() {
    let env = TestEnv::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"GET /big HTTP/1.1\r\n\r\n").unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut request = [0u8; 21];
    conn.read_exact(&mut request).unwrap();
    // As much as the socket takes without blocking, then close: the rest of the kernel's
    // work is delivering it to a client that is not reading yet.
    conn.set_nonblocking(true).unwrap();
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while let Ok(n) = conn.write(&chunk) {
        sent += n;
    }
    assert!(sent > 64 << 10, "only {sent} bytes queued");
    drop(conn);
    let reader = thread::spawn(move || {
        thread::sleep(Duration::from_secs(2));
        let mut all = Vec::new();
        client.read_to_end(&mut all).unwrap();
        all.len()
    });
    let (out, took) = timed(drain(&env, port, &[]));
    assert_eq!(reader.join().unwrap(), sent);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        took >= Duration::from_millis(1500),
        "drained before the response was delivered: {took:?}\n{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
}

/// `0.0.0.0:PORT` and `[::]:PORT` are where a server listens; they mean every local address,
/// as a bare port does, not a connection's local address (which none ever has).
#[test]
fn a_wildcard_address_means_every_address() {
    let env = TestEnv::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(local(port)).unwrap();
    let (_conn, _) = listener.accept().unwrap();
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // The same port written three ways is one condition.
    let plan = env
        .prestop([
            "drain",
            "--dry-run",
            "--wait-conns",
            &port.to_string(),
            "--wait-conns",
            &format!(":{port}"),
            "--wait-conns",
            &format!("0.0.0.0:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&plan)
            .matches(&format!("no connection to :{port} in flight"))
            .count(),
        1,
        "{}",
        stdout(&plan)
    );
    for spec in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let out = env
            .prestop(["check", "--wait-conns", &spec])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{spec}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("request not read"),
            "{spec}: {}",
            stdout(&out)
        );
    }
}

/// A client that closed an idle keep-alive connection leaves it in CLOSE-WAIT until the app
/// reads the end: its one unread "byte" is the FIN, not a request. Idle, the app's to close.
#[test]
fn an_idle_connection_the_client_closed_is_not_a_request() {
    let env = TestEnv::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(local(port)).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut ping = [0u8; 4];
    conn.read_exact(&mut ping).unwrap();
    conn.write_all(b"pong").unwrap();
    client.read_exact(&mut ping).unwrap();
    drop(client);
    // Their last exchange over a second ago: not still sending either.
    thread::sleep(Duration::from_millis(1100));
    let out = env
        .prestop(["check", "--wait-conns", &port.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("CLOSE-WAIT idle"), "{}", stdout(&out));
    drop(conn);
}
