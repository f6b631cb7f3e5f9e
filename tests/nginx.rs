//! Real nginx (Debian's nginx-light), as PID 1 of a PID namespace as in a container, drained
//! by the hook of `examples/nginx.yaml`: let endpoint removal propagate and in-flight requests
//! finish while nginx still serves (`--wait-conns PORT --quiet-for 3s`), return 0, and let the
//! kubelet's stop signal (SIGQUIT, the official image's STOPSIGNAL) end nginx gracefully.
//!
//! Needs root (namespaces) and nginx (`.ci/install.sh` installs nginx-light); where either is
//! missing the tests say why and pass, except under `CI=true`, where that is a failure.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Guard, Running, TestEnv, can_unshare};

/// The example's hook, but for the test's port (its grace period is 60 s there).
fn example_hook(port: u16) -> Vec<String> {
    let hook =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nginx.yaml"))
            .unwrap();
    assert!(
        hook.contains(r#""--wait-conns", "80", "--quiet-for", "3s""#),
        "examples/nginx.yaml no longer has the hook this test proves"
    );
    [
        "drain",
        "--grace-period",
        "60",
        "--wait-conns",
        &port.to_string(),
        "--quiet-for",
        "3s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn nginx_binary() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/sbin/nginx");
    let found = path.is_file();
    assert!(
        found || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but nginx is missing: install the Debian package nginx-light (.ci/install.sh)"
    );
    found.then_some(path)
}

/// nginx as PID 1 of a fresh PID namespace, serving `big.bin` (`kib` KiB at `rate` per
/// connection) and `small.txt` on a port of its own.
struct Nginx {
    env: TestEnv,
    ns: Guard,
    /// PID 1 of the namespace, as this process sees it.
    master: u32,
    port: u16,
    conf: PathBuf,
}

impl Nginx {
    fn start(kib: usize, rate: &str) -> Option<Nginx> {
        let binary = nginx_binary()?;
        if !can_unshare() {
            eprintln!("skipped: needs root to create PID namespaces");
            return None;
        }
        let env = TestEnv::new();
        let www = env.path("www");
        fs::create_dir_all(&www).unwrap();
        fs::create_dir_all(env.path("run/tmp")).unwrap();
        fs::write(www.join("big.bin"), vec![b'x'; kib * 1024]).unwrap();
        fs::write(www.join("small.txt"), "ok\n").unwrap();
        // A port from bind(0) can be taken again before nginx binds it (by another test's
        // nginx or a client's ephemeral port): a master that could not listen exits, and
        // is started again on another port.
        for _ in 0..5 {
            let port = free_port();
            let conf = env.path("nginx.conf");
            write_conf(&conf, &env.path("run"), &www, port, rate);
            if let Some((ns, master)) = launch(&binary, &env.path("run"), &conf, port) {
                return Some(Nginx {
                    env,
                    ns,
                    master,
                    port,
                    conf,
                });
            }
        }
        panic!("nginx never came up; see its error log on stderr");
    }

    /// `prestop ARGS` inside the namespace, where PID 1 is nginx, as an exec hook runs.
    fn hook(&self, args: &[String]) -> Running {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.master.to_string())
            .args(["-p", "-m", "--"])
            .arg(common::bin())
            .args(args)
            .env("PRESTOP_STATE_DIR", self.env.state_dir())
            .env("PRESTOP_LOG_TARGET", "stderr")
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.env.path("bin").display()),
            )
            .stdin(Stdio::null());
        Running::spawn(&mut cmd)
    }

    /// The kubelet's stop signal to the container's PID 1.
    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.master as i32), signal).unwrap();
    }

    /// Waits (up to `within`) for nginx, and so the namespace, to end.
    fn wait_exit(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.ns.child().try_wait().unwrap().is_some() {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

fn write_conf(conf: &Path, run: &Path, www: &Path, port: u16, rate: &str) {
    fs::write(
        conf,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root root;\n\
             pid {run}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
             client_body_temp_path {run}/tmp/body;\n  proxy_temp_path {run}/tmp/proxy;\n\
             fastcgi_temp_path {run}/tmp/fastcgi;\n  uwsgi_temp_path {run}/tmp/uwsgi;\n\
             scgi_temp_path {run}/tmp/scgi;\n  keepalive_timeout 65s;\n\
             server {{\n    listen 127.0.0.1:{port};\n    root {www};\n\
             location /big.bin {{ limit_rate {rate}; }}\n  }}\n}}\n",
            run = run.display(),
            www = www.display(),
        ),
    )
    .unwrap();
}

/// nginx as PID 1 of a new PID namespace: the namespace's guard and the master's PID as
/// this process sees it, once the master has written its pid file (after binding), or
/// `None` if it exited first.
fn launch(binary: &Path, run: &Path, conf: &Path, port: u16) -> Option<(Guard, u32)> {
    let pid_file = run.join("nginx.pid");
    let _ = fs::remove_file(&pid_file);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(binary)
        .args(["-e", "stderr", "-p"])
        .arg(format!("{}/", run.display()))
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut ns = Guard::spawn(&mut cmd);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if ns.child().try_wait().unwrap().is_some() {
            return None;
        }
        if pid_file.exists() && TcpStream::connect(local(port)).is_ok() {
            break;
        }
        assert!(Instant::now() < end, "nginx never listened on {port}");
        thread::sleep(Duration::from_millis(10));
    }
    let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", ns.id())).unwrap();
    let master = children.split_whitespace().next()?.parse().unwrap();
    Some((ns, master))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A download of `big.bin`: how many body bytes came, of how many announced.
#[derive(Debug)]
struct Download {
    got: usize,
    expected: usize,
    finished: Instant,
}

impl Download {
    fn complete(&self) -> bool {
        self.expected > 0 && self.got == self.expected
    }
}

/// Starts a download; the channel says when its first body bytes arrived.
fn download(port: u16, started: mpsc::Sender<()>) -> JoinHandle<Download> {
    thread::spawn(move || {
        let mut conn = TcpStream::connect(local(port)).unwrap();
        conn.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut head_end = None;
        let mut told = false;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
            if head_end.is_none() {
                head_end = data
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4);
            }
            if let (Some(end), false) = (head_end, told)
                && data.len() > end
            {
                let _ = started.send(());
                told = true;
            }
        }
        let Some(end) = head_end else {
            let _ = started.send(());
            return Download {
                got: 0,
                expected: 0,
                finished: Instant::now(),
            };
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let expected = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Download {
            got: data.len() - end,
            expected,
            finished: Instant::now(),
        }
    })
}

/// `n` downloads, returned once each has begun to receive its body.
fn downloads(port: u16, n: usize) -> Vec<JoinHandle<Download>> {
    let (tx, rx) = mpsc::channel();
    let all: Vec<_> = (0..n).map(|_| download(port, tx.clone())).collect();
    for _ in 0..n {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a download never started");
    }
    all
}

/// A keep-alive connection that asked for `small.txt` and stays open, idle.
fn idle_keep_alive(port: u16) -> TcpStream {
    let mut conn = TcpStream::connect(local(port)).unwrap();
    conn.write_all(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).ends_with("ok\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "nginx closed a keep-alive connection");
        got.extend_from_slice(&buf[..n]);
    }
    conn
}

/// One pod termination with the example's hook: downloads in flight, idle keep-alive
/// clients, the hook, then SIGQUIT. Returns the hook's exit code, its log and the downloads.
fn terminate(
    nginx: &mut Nginx,
    in_flight: usize,
    idle: usize,
) -> (Option<i32>, String, Vec<Download>) {
    let _idle: Vec<TcpStream> = (0..idle).map(|_| idle_keep_alive(nginx.port)).collect();
    let running = downloads(nginx.port, in_flight);
    let hook = nginx.hook(&example_hook(nginx.port));
    let (code, _, log) = hook.finish();
    let returned = Instant::now();
    nginx.signal(nix::sys::signal::Signal::SIGQUIT);
    assert!(
        nginx.wait_exit(Duration::from_secs(20)),
        "nginx did not stop on SIGQUIT\n{log}"
    );
    let done: Vec<Download> = running.into_iter().map(|d| d.join().unwrap()).collect();
    for d in &done {
        assert!(
            d.finished <= returned + Duration::from_millis(500),
            "a download was still running when the hook returned: {d:?}\n{log}"
        );
    }
    (code, log, done)
}

#[test]
fn the_example_hook_lets_every_download_finish_and_is_never_killed() {
    let Some(mut nginx) = Nginx::start(2048, "1m") else {
        return;
    };
    let (code, log, done) = terminate(&mut nginx, 8, 4);
    assert_eq!(code, Some(0), "the hook: {log}");
    assert!(log.contains("conns :"), "{log}");
    let complete = done.iter().filter(|d| d.complete()).count();
    assert_eq!(complete, 8, "{done:?}\n{log}");
}

#[test]
fn sigterm_alone_cuts_the_downloads() {
    let Some(mut nginx) = Nginx::start(2048, "1m") else {
        return;
    };
    let running = downloads(nginx.port, 8);
    nginx.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(nginx.wait_exit(Duration::from_secs(20)));
    let done: Vec<Download> = running.into_iter().map(|d| d.join().unwrap()).collect();
    let cut = done.iter().filter(|d| !d.complete()).count();
    // Each download takes minutes at this rate: all are in flight, and all are cut.
    assert_eq!(
        cut, 8,
        "SIGTERM (nginx's fast stop) let some finish: {done:?}"
    );
}

/// Fifty terminations, ten at a time, each with downloads in flight and idle keep-alive
/// clients: every hook returns 0 once its downloads are over (the hook never stops nginx,
/// so nothing kills it: the stop signal comes after it, as the kubelet sends it), and the
/// stop signal cuts no download.
#[test]
fn fifty_terminations_return_0_and_cut_no_download() {
    if Nginx::start(1, "1m").is_none() {
        return;
    }
    let mut cut = 0;
    let mut codes = Vec::new();
    for _batch in 0..5 {
        let results: Vec<(Option<i32>, String, Vec<Download>)> = (0..10)
            .map(|_| {
                thread::spawn(|| {
                    let mut nginx = Nginx::start(256, "512k").unwrap();
                    terminate(&mut nginx, 3, 2)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        for (code, log, done) in results {
            if code != Some(0) {
                eprintln!("a hook ended with {code:?}:\n{log}");
            }
            codes.push(code);
            cut += done.iter().filter(|d| !d.complete()).count();
        }
    }
    eprintln!("nginx: 50 terminations with the example's hook: {cut} downloads cut");
    assert_eq!(cut, 0);
    assert!(codes.iter().all(|c| *c == Some(0)), "{codes:?}");
}

/// What the example recommended before: quit nginx from the hook and wait for its master.
/// The master is PID 1, and its exit takes the hook with it: killed, every time.
#[test]
fn a_hook_that_waits_for_pid_1_is_killed_with_it() {
    let Some(mut nginx) = Nginx::start(64, "1m") else {
        return;
    };
    let quit = format!(
        "/usr/sbin/nginx -e stderr -p {}/ -c {} -s quit",
        nginx.env.path("run").display(),
        nginx.conf.display()
    );
    let pidfile = format!("pidfile:{}", nginx.env.path("run/nginx.pid").display());
    let hook = nginx.hook(&[
        "drain".into(),
        "--exec".into(),
        quit,
        "--wait-pid".into(),
        pidfile,
    ]);
    let (code, _, log) = hook.finish();
    assert!(nginx.wait_exit(Duration::from_secs(10)));
    // Killed: nsenter passes its child's SIGKILL on (no exit code), or reports 128 + 9.
    assert!(matches!(code, None | Some(137)), "{code:?}: {log}");
    assert!(!log.contains("drained after"), "{log}");
}
