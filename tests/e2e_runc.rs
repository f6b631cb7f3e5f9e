//! End to end: prestop as the preStop hook of a real OCI container, run by `runc`.
//!
//! Each test lays out a root filesystem with no shell in it, only the static prestop, the
//! static sample app (`examples/sample_app.rs`) and empty `/tmp`, `/proc` and `/dev`. It runs
//! that with `runc run -d` and plays the kubelet's termination sequence against it: the hook
//! goes in by `runc exec`, PID 1 gets SIGTERM once the hook returns, and SIGKILL comes at
//! the grace deadline (2 s later if the hook overran). The container's stdout is a pipe, as
//! a container runtime would hand it over, so the test reads what `kubectl logs` would
//! show. Nothing is mocked: the kernel's namespaces, a real PID 1 and the real binaries.
//!
//! The binaries come from `PRESTOP_E2E_BIN` and `PRESTOP_E2E_APP` if those are set (static
//! binaries built beforehand). Otherwise this suite builds them for the host's musl target
//! into `target/e2e`. It needs a target directory of its own because the `cargo test` that
//! runs it may still hold the lock on the usual one.
//!
//! runc needs root. Where it cannot run, every test here says why and passes. Under
//! `CI=true` that is a failure instead, so CI cannot go green without having run the suite.
//!
//! Timing: bounds are generous (seconds, not milliseconds), because a 2-core CI machine
//! runs these side by side. The precise latency figures belong to the benchmarks.

mod common;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use common::{Guard, TestEnv};

/// The workload every scenario shares: a job every 300 ms that holds its lock for 1.5 s,
/// so about five jobs are in flight at any moment.
const WORKLOAD: [&str; 4] = ["--every", "300ms", "--job", "1500ms"];

/// Where the sample app keeps its lock files inside the container.
const LOCKS: &str = "/tmp/lock/*.lock";

/// The kubelet's one-off extension when a preStop hook overruns the grace period.
const KUBELET_EXTENSION: Duration = Duration::from_secs(2);

/// What Kubernetes (containerd) grants a container by default. The hook gets the same set
/// as PID 1, as it does in a pod; that matters because opening `/proc/1/fd/1` is checked
/// like ptrace, against the capabilities of both processes.
const CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

// ---------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------

/// (a) Jobs in flight finish: the app hears SIGTSTP, takes no new job, and gets SIGTERM
/// only after its last job ended. prestop's own lines are in the container's log.
#[test]
fn jobs_in_flight_finish_before_sigterm() {
    let Some(bins) = binaries() else { return };
    let mut container = Container::start(bins, "finish", &WORKLOAD);
    container.wait_for_line("sample_app: job 4 started");
    let grace = Duration::from_secs(10);
    let t = container.terminate(
        &Hook::exec(&[
            "--grace-period",
            "10",
            "--reserve",
            "3",
            "--signal",
            "TSTP",
            "--wait-lock",
            LOCKS,
            "--progress-interval",
            "300ms",
        ]),
        grace,
    );
    let hook = &t.hooks[0];
    assert_eq!(hook.code, Some(0), "hook exit code\n{t}");
    assert!(
        hook.stdout.contains("prestop: drained after"),
        "summary on the hook's stdout\n{t}"
    );

    // prestop's progress went to PID 1's stdout, which is what `kubectl logs` shows.
    for line in [
        "prestop: draining, budget 7s (grace 10s, reserve 3s)",
        "prestop: sent SIGTSTP to pid 1",
        "prestop: waiting for lock /tmp/lock/*.lock",
        "prestop: waiting: ",
        "prestop: drained after",
    ] {
        assert!(t.has(line), "container log lacks {line:?}\n{t}");
    }

    let quiet = t
        .position("sample_app: SIGTSTP: taking no new jobs")
        .expect("SIGTSTP seen");
    let term = t.position("sample_app: SIGTERM").expect("SIGTERM seen");
    let last_done = t.last_position("sample_app: job ").expect("jobs ran");
    assert!(
        t.log[last_done].ends_with(" done") && last_done < term,
        "the last job must end before SIGTERM\n{t}"
    );
    assert!(
        !t.log[quiet..].iter().any(|l| l.contains(" started (")),
        "no job may start after SIGTSTP\n{t}"
    );
    assert_eq!(
        t.count(" started ("),
        t.count(" done"),
        "every job finished\n{t}"
    );
    assert_eq!(t.abandoned(), Some(0), "{t}");

    assert!(
        hook.returned < Duration::from_secs(7),
        "drained well inside the budget\n{t}"
    );
    assert!(!t.killed, "the app exits on SIGTERM by itself\n{t}");
    assert!(t.stopped.is_some_and(|s| s < grace), "{t}");
}

/// (b) A job that outlives the budget: the hook gives up at grace − reserve with exit 1 and
/// names the job's lock, so the app still has its reserve to shut down after SIGTERM.
#[test]
fn job_outliving_the_budget_leaves_the_reserve() {
    let Some(bins) = binaries() else { return };
    let mut container = Container::start(
        bins,
        "outlive",
        &["--every", "300ms", "--job", "1s", "--first-job", "60s"],
    );
    container.wait_for_line("sample_app: job 3 started");
    let (grace, reserve) = (Duration::from_secs(5), Duration::from_secs(2));
    let budget = Duration::from_secs(3); // grace - reserve
    let t = container.terminate(
        &Hook::exec(&[
            "--grace-period",
            "5",
            "--reserve",
            "2",
            "--signal",
            "TSTP",
            "--wait-lock",
            LOCKS,
        ]),
        grace,
    );
    let hook = &t.hooks[0];
    assert_eq!(hook.code, Some(1), "exit 1: budget exhausted\n{t}");
    assert!(
        hook.stdout.contains("budget exhausted after")
            && hook
                .stdout
                .contains("1 still in flight (lock /tmp/lock/job-1.lock)"),
        "the summary (the FailedPreStopHook message) names the lock\n{t}"
    );
    // The deadline counts from prestop's own start, a little after the kubelet's t0.
    assert!(
        hook.returned >= budget && hook.returned < budget + Duration::from_millis(1500),
        "the hook returns at grace - reserve ({budget:?}), not at {:?}\n{t}",
        hook.returned
    );
    let left_for_app = grace.saturating_sub(t.sigterm);
    assert!(
        left_for_app + Duration::from_secs(1) >= reserve,
        "SIGTERM at {:?} leaves the app {left_for_app:?} of its {reserve:?} reserve\n{t}",
        t.sigterm
    );
    assert!(
        t.has("sample_app: abandoned job 1 (/tmp/lock/job-1.lock)"),
        "{t}"
    );
    assert_eq!(
        t.abandoned(),
        Some(1),
        "only the long job is cut short\n{t}"
    );
    assert!(
        !t.killed,
        "the app shut down inside its reserve, before SIGKILL\n{t}"
    );
    assert!(t.stopped.is_some_and(|s| s < grace), "{t}");
}

/// (c) At-least-once delivery: the same hook twice at once. The stop signal reaches the app
/// once; the second invocation joins the first one's drain and both report it.
#[test]
fn hook_delivered_twice_signals_once() {
    let Some(bins) = binaries() else { return };
    let mut container = Container::start(bins, "twice", &WORKLOAD);
    container.wait_for_line("sample_app: job 3 started");
    let hook = Hook::Exec {
        args: drain_args(&[
            "--grace-period",
            "10",
            "--reserve",
            "3",
            "--signal",
            "TSTP",
            "--wait-lock",
            LOCKS,
        ]),
        deliveries: 2,
    };
    let t = container.terminate(&hook, Duration::from_secs(10));
    for (i, hook) in t.hooks.iter().enumerate() {
        assert_eq!(hook.code, Some(0), "delivery {i}\n{t}");
        assert!(
            hook.stdout.contains("prestop: drained after"),
            "delivery {i}\n{t}"
        );
    }
    assert_eq!(
        t.count("sample_app: SIGTSTP"),
        1,
        "the app heard SIGTSTP once\n{t}"
    );
    assert_eq!(t.count("prestop: sent SIGTSTP"), 1, "{t}");
    assert_eq!(t.count("prestop: draining, budget"), 1, "one leader\n{t}");
    assert_eq!(
        t.count("prestop: joining the drain begun"),
        1,
        "one follower\n{t}"
    );
    assert_eq!(t.abandoned(), Some(0), "{t}");
    assert!(!t.killed, "{t}");
}

/// (d) What prestop changes, as a number: the same workload terminated with no hook, with a
/// fixed sleep as long as prestop's budget, and with prestop. Printed in the test output.
#[test]
fn abandoned_jobs_without_prestop_are_counted() {
    let Some(bins) = binaries() else { return };
    let grace = Duration::from_secs(6);
    let budget = Duration::from_secs(4);
    let hooks = [
        ("no preStop hook", Hook::None),
        // A shell-less image cannot run `sleep 4`, so this is the kubelet's own `sleep`
        // action (on by default since Kubernetes 1.30), what such an image would use.
        ("preStop sleep 4s", Hook::Sleep(budget)),
        (
            "preStop prestop drain",
            Hook::exec(&[
                "--grace-period",
                "6",
                "--reserve",
                "2",
                "--signal",
                "TSTP",
                "--wait-lock",
                LOCKS,
            ]),
        ),
    ];
    // Side by side, so the comparison costs the time of one termination, not three.
    let results: Vec<(&str, Termination)> = std::thread::scope(|scope| {
        let runs: Vec<_> = hooks
            .iter()
            .enumerate()
            .map(|(i, (name, hook))| {
                scope.spawn(move || {
                    let mut c = Container::start(bins, &format!("compare{i}"), &WORKLOAD);
                    c.wait_for_line("sample_app: job 5 started");
                    (*name, c.terminate(hook, grace))
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("scenario thread"))
            .collect()
    });

    let mut table =
        format!("e2e_runc: jobs abandoned at SIGTERM (a 1.5s job every 300ms, grace {grace:?}):\n");
    for (name, t) in &results {
        let n = t.abandoned().map_or_else(|| "?".into(), |n| n.to_string());
        let _ = writeln!(
            table,
            "  {name:<24} {n:>3} abandoned, {:>3} finished",
            t.count(" done")
        );
    }
    show(&table);

    let [(_, none), (_, sleep), (_, prestop)] = &results[..] else {
        unreachable!()
    };
    assert!(none.abandoned().is_some_and(|n| n > 0), "{table}\n{none}");
    assert!(sleep.abandoned().is_some_and(|n| n > 0), "{table}\n{sleep}");
    assert_eq!(prestop.abandoned(), Some(0), "{table}\n{prestop}");
    assert_eq!(prestop.hooks[0].code, Some(0), "{prestop}");
}

/// (e) `shareProcessNamespace: true`: PID 1 is the pod's `/pause`, in a container of its
/// own. The hook finds its container's own main process (the oldest in its cgroup, which
/// `runc exec` joins), sends it the default signal and logs to its stdout; `/pause` is
/// left alone.
#[test]
fn a_shared_process_namespace_drains_the_containers_own_app() {
    let Some(bins) = binaries() else { return };
    let pause = Container::start_as(bins, "pause", "/pause", &["--every", "1000s"], None);
    let mut app = Container::start_as(
        bins,
        "shared",
        "/sample_app",
        &WORKLOAD,
        Some(pause.init_pid()),
    );
    app.wait_for_line("sample_app: job 3 started");
    let t = app.terminate(
        &Hook::exec(&[
            "--grace-period",
            "10",
            "--reserve",
            "3",
            "--signal",
            "TSTP",
            "--wait-lock",
            LOCKS,
        ]),
        Duration::from_secs(10),
    );
    let hook = &t.hooks[0];
    assert_eq!(hook.code, Some(0), "hook exit code\n{t}");
    assert!(t.has("sample_app: SIGTSTP: taking no new jobs"), "{t}");
    assert!(
        t.has("prestop: sent SIGTSTP to pid ")
            && !t.log.iter().any(|l| l == "prestop: sent SIGTSTP to pid 1"),
        "the app, not PID 1 (/pause), got the signal\n{t}"
    );
    assert!(
        t.has("prestop: drained after"),
        "prestop's lines are in the app container's log\n{t}"
    );
    assert_eq!(t.abandoned(), Some(0), "{t}");
    assert!(pause.is_running(), "/pause was stopped\n{t}");
    show(&format!(
        "e2e_runc: shared process namespace: {}\n",
        t.log
            .iter()
            .find(|l| l.starts_with("prestop: sent"))
            .map_or("no signal sent", String::as_str)
    ));
}

/// (f) nginx in a container with no shell (the binary, the libraries `ldd` lists, a config),
/// stopped as the official image is (STOPSIGNAL SIGQUIT), with the hook of
/// `examples/nginx.yaml`: every download in flight finishes, the hook exits 0.
#[test]
fn nginx_without_a_shell_drains_with_the_example_hook() {
    let Some(bins) = binaries() else { return };
    let Some(nginx) = nginx_binary() else { return };
    let env = TestEnv::new();
    nginx_bundle(&env, bins, &nginx);
    let mut container = Container::launch(env, "nginx", "QUIT");
    container.wait_for_line("start worker process");
    let netns = format!("/proc/{}/ns/net", container.init_pid());
    let started = std::sync::Arc::new(std::sync::Barrier::new(5));
    let downloads: Vec<_> = (0..4)
        .map(|_| {
            let (netns, started) = (netns.clone(), started.clone());
            std::thread::spawn(move || download_in(&netns, &started))
        })
        .collect();
    started.wait();
    let hook = Hook::exec(&[
        "--grace-period",
        "60",
        "--wait-conns",
        "80",
        "--quiet-for",
        "3s",
    ]);
    let t = container.terminate(&hook, Duration::from_secs(20));
    let done: Vec<(usize, usize)> = downloads.into_iter().map(|d| d.join().unwrap()).collect();
    assert_eq!(t.hooks[0].code, Some(0), "{t}");
    assert!(
        done.iter()
            .all(|&(got, expected)| expected > 0 && got == expected),
        "a download was cut: {done:?}\n{t}"
    );
    assert!(!t.killed, "nginx stopped on SIGQUIT by itself\n{t}");
    assert!(t.has("prestop: drained after"), "{t}");
}

/// The nginx of the machine running the tests (Debian's nginx-light); CI installs it.
fn nginx_binary() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/sbin/nginx");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "e2e_runc: CI=true but nginx is missing (Debian package nginx-light)"
    );
    show("e2e_runc: nginx scenario skipped: no /usr/sbin/nginx\n");
    None
}

/// A root filesystem with nginx, the shared libraries it links (as `ldd` lists them), a
/// config, 2 MiB to download at 1 MiB/s, and prestop. No shell, no coreutils.
fn nginx_bundle(env: &TestEnv, bins: &Binaries, nginx: &Path) {
    let rootfs = env.path("bundle/rootfs");
    for dir in ["tmp", "proc", "dev", "etc/nginx", "usr/sbin", "www"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    let copy = |from: &Path| {
        let to = rootfs.join(from.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    };
    copy(nginx);
    let ldd = Command::new("ldd").arg(nginx).output().expect("ldd");
    for line in common::stdout(&ldd).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            copy(&path);
        }
    }
    std::fs::copy(&bins.prestop, rootfs.join("prestop")).unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/nonexistent\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(rootfs.join("www/big.bin"), vec![b'x'; 2 << 20]).unwrap();
    std::fs::write(
        rootfs.join("etc/nginx/nginx.conf"),
        "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root root;\n\
         pid /tmp/nginx.pid;\nerror_log stderr notice;\n\
         events { worker_connections 1024; }\n\
         http {\n  access_log off;\n  default_type application/octet-stream;\n\
         client_body_temp_path /tmp/body;\n  proxy_temp_path /tmp/proxy;\n\
         fastcgi_temp_path /tmp/fastcgi;\n  uwsgi_temp_path /tmp/uwsgi;\n\
         scgi_temp_path /tmp/scgi;\n\
         server {\n    listen 80;\n    root /www;\n    limit_rate 1m;\n  }\n}\n",
    )
    .unwrap();
    let args = [
        "/usr/sbin/nginx",
        "-e",
        "stderr",
        "-c",
        "/etc/nginx/nginx.conf",
    ];
    std::fs::write(env.path("bundle/config.json"), config_json(&args, None)).unwrap();
}

/// Downloads `/big.bin` from port 80 of the network namespace `netns` (the container's),
/// from a thread that has joined it; says on `started` once the body is coming. Returns the
/// body bytes received and the announced length.
fn download_in(netns: &str, started: &std::sync::Barrier) -> (usize, usize) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let ns = File::open(netns).unwrap();
    // SAFETY: setns on an fd we own, with the network-namespace type: only this thread moves.
    let rc = unsafe { nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", 80)).unwrap();
    conn.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut head = None;
    let mut told = false;
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        head = head.or_else(|| {
            data.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4)
        });
        if let (Some(end), false) = (head, told)
            && data.len() > end
        {
            started.wait();
            told = true;
        }
    }
    if !told {
        started.wait();
    }
    let Some(end) = head else { return (0, 0) };
    let expected = String::from_utf8_lossy(&data[..end])
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (data.len() - end, expected)
}

// ---------------------------------------------------------------------------------------
// The kubelet's side
// ---------------------------------------------------------------------------------------

/// A preStop hook as a pod spec would give it.
enum Hook {
    None,
    /// The kubelet's `sleep` action: no process in the container at all.
    Sleep(Duration),
    /// An exec hook running `/prestop ARGS`, delivered this many times at once.
    Exec {
        args: Vec<String>,
        deliveries: usize,
    },
}

impl Hook {
    fn exec(drain: &[&str]) -> Hook {
        Hook::Exec {
            args: drain_args(drain),
            deliveries: 1,
        }
    }
}

fn drain_args(options: &[&str]) -> Vec<String> {
    ["/prestop", "drain"]
        .iter()
        .chain(options)
        .map(ToString::to_string)
        .collect()
}

/// One run of the hook: its exit code, its own output (which only a `FailedPreStopHook`
/// event would show), and when it returned, from the start of the termination.
struct HookRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    returned: Duration,
}

/// What happened during a termination; times are from its start (the kubelet's t0).
struct Termination {
    hooks: Vec<HookRun>,
    sigterm: Duration,
    /// When the container's stdout closed: PID 1 and everything in its namespace are gone.
    stopped: Option<Duration>,
    /// Whether the grace deadline came and SIGKILL was needed.
    killed: bool,
    /// The container's stdout, line by line.
    log: Vec<String>,
}

impl Termination {
    fn has(&self, needle: &str) -> bool {
        self.position(needle).is_some()
    }

    fn position(&self, needle: &str) -> Option<usize> {
        self.log.iter().position(|l| l.contains(needle))
    }

    fn last_position(&self, needle: &str) -> Option<usize> {
        self.log.iter().rposition(|l| l.contains(needle))
    }

    fn count(&self, needle: &str) -> usize {
        self.log.iter().filter(|l| l.contains(needle)).count()
    }

    /// The sample app's own count, from its last line.
    fn abandoned(&self) -> Option<usize> {
        self.log.iter().rev().find_map(|l| {
            l.strip_prefix("sample_app: exiting: ")?
                .strip_suffix(" abandoned")?
                .parse()
                .ok()
        })
    }
}

/// Everything a failed assertion needs to be understood.
impl std::fmt::Display for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "--- SIGTERM at {:?}, stopped at {:?}, SIGKILL needed: {}",
            self.sigterm, self.stopped, self.killed
        )?;
        for (i, h) in self.hooks.iter().enumerate() {
            writeln!(f, "--- hook {i}: exit {:?} after {:?}", h.code, h.returned)?;
            writeln!(f, "stdout:\n{}stderr:\n{}", h.stdout, h.stderr)?;
        }
        writeln!(f, "--- container stdout:")?;
        for line in &self.log {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// A container running the sample app as PID 1. Dropping it kills and deletes it.
struct Container {
    env: TestEnv,
    id: String,
    log: Log,
    stop_signal: &'static str,
}

impl Container {
    fn start(bins: &Binaries, name: &str, app_args: &[&str]) -> Container {
        Container::start_as(bins, name, "/sample_app", app_args, None)
    }

    /// A container whose main process is the sample app under the name `program`; with
    /// `pid_ns`, in the PID namespace of that (host) PID's process, as the containers of a
    /// pod with `shareProcessNamespace: true` are.
    fn start_as(
        bins: &Binaries,
        name: &str,
        program: &str,
        app_args: &[&str],
        pid_ns: Option<u32>,
    ) -> Container {
        let env = TestEnv::new();
        // The lifetime ends the app (and so the container) even if this test process is
        // killed before its Drop can.
        let mut args = vec![program, "--lifetime", "120s"];
        args.extend_from_slice(app_args);
        bundle(&env, bins, &args, pid_ns);
        let mut container = Container::launch(env, name, "TERM");
        container.wait_for_line("sample_app: ready");
        container
    }

    /// Runs the bundle laid out in `env`; `stop_signal` is what the kubelet sends PID 1 when
    /// the hook has returned (the image's STOPSIGNAL).
    fn launch(env: TestEnv, name: &str, stop_signal: &'static str) -> Container {
        let id = format!("prestop-e2e-{name}-{}", std::process::id());
        let (read, write) = pipe();
        let status = Command::new("runc")
            .arg("--root")
            .arg(env.path("runc"))
            .args(["run", "--detach", "--bundle"])
            .arg(env.path("bundle"))
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(write.try_clone().expect("dup pipe"))
            .stderr(write)
            .status()
            .expect("run runc");
        // The Command and with it our copies of the write end are gone, so the pipe closes
        // exactly when the container's last process does.
        let mut container = Container {
            env,
            id,
            log: Log::read(read),
            stop_signal,
        };
        assert!(
            status.success(),
            "runc run failed ({status}):\n{}",
            container.log.settle(Duration::from_millis(200))
        );
        container
    }

    /// The host PID of the container's main process, as `runc state` says.
    fn init_pid(&self) -> u32 {
        let out = self
            .runc()
            .args(["state", &self.id])
            .output()
            .expect("runc state");
        let state: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("runc state is JSON");
        u32::try_from(state["pid"].as_u64().expect("a pid")).unwrap()
    }

    fn is_running(&self) -> bool {
        let out = self
            .runc()
            .args(["state", &self.id])
            .output()
            .expect("runc state");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|state| state["status"] == "running")
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(self.env.path("runc"));
        cmd.stdin(Stdio::null());
        cmd
    }

    fn wait_for_line(&mut self, needle: &str) {
        let found = self.log.wait_for(needle, Duration::from_secs(10));
        assert!(
            found,
            "no {needle:?} in the container's log:\n{}",
            self.log.lines.join("\n")
        );
    }

    /// `runc kill`: a signal to PID 1, as the kubelet sends it through the runtime.
    fn kill(&self, signal: &str) {
        let _ = self
            .runc()
            .args(["kill", &self.id, signal])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Plays the kubelet's termination: the hook, SIGTERM once it returns (or at the grace
    /// deadline), SIGKILL at the deadline, 2 s later if the hook overran.
    fn terminate(&mut self, hook: &Hook, grace: Duration) -> Termination {
        let t0 = Instant::now();
        let deadline = t0 + grace;
        let mut running: Vec<Guard> = Vec::new();
        match hook {
            Hook::None => {}
            Hook::Sleep(d) => std::thread::sleep((*d).min(grace)),
            Hook::Exec { args, deliveries } => {
                for _ in 0..*deliveries {
                    let mut cmd = self.runc();
                    cmd.args(["exec", &self.id])
                        .args(args)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped());
                    running.push(Guard::spawn(&mut cmd));
                }
            }
        }
        let mut hooks: Vec<Option<HookRun>> = running.iter().map(|_| None).collect();
        let finished = |hooks: &mut Vec<Option<HookRun>>, running: &mut Vec<Guard>| {
            for (slot, guard) in hooks.iter_mut().zip(running.iter_mut()) {
                if slot.is_none() && guard.child().try_wait().expect("wait for hook").is_some() {
                    *slot = Some(HookRun {
                        code: None,
                        stdout: String::new(),
                        stderr: String::new(),
                        returned: t0.elapsed(),
                    });
                }
            }
            hooks.iter().all(Option::is_some)
        };
        while !finished(&mut hooks, &mut running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let overran = !finished(&mut hooks, &mut running);

        let sigterm = t0.elapsed();
        self.kill(self.stop_signal);
        let kill_at = if overran {
            deadline + KUBELET_EXTENSION
        } else {
            deadline
        };
        let mut stopped = self.log.wait_closed(kill_at);
        let killed = stopped.is_none();
        if killed {
            self.kill("KILL");
            stopped = self
                .log
                .wait_closed(Instant::now() + Duration::from_secs(10));
        }

        // Every hook has ended by now: on its own, or with the container.
        let hooks = hooks
            .into_iter()
            .zip(running)
            .map(|(run, guard)| {
                let out = guard.wait_output();
                let mut run = run.unwrap_or(HookRun {
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    returned: t0.elapsed(),
                });
                run.code = out.status.code();
                run.stdout = common::stdout(&out);
                run.stderr = common::stderr(&out);
                run
            })
            .collect();
        Termination {
            hooks,
            sigterm,
            stopped: stopped.map(|at| at.saturating_duration_since(t0)),
            killed,
            log: self.log.lines.clone(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill("KILL");
        let _ = self
            .runc()
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The container's stdout as it arrives, read by a thread so the test can wait on it.
struct Log {
    events: Receiver<Event>,
    lines: Vec<String>,
    closed: Option<Instant>,
}

enum Event {
    Line(String),
    Closed(Instant),
}

impl Log {
    fn read(pipe: OwnedFd) -> Log {
        let (tx, rx) = channel();
        std::thread::spawn(move || read_lines(File::from(pipe), &tx));
        Log {
            events: rx,
            lines: Vec::new(),
            closed: None,
        }
    }

    /// Takes in what arrives until `until`, or until `done` says enough.
    fn pump(&mut self, until: Instant, done: impl Fn(&Log) -> bool) {
        while !done(self) && self.closed.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Line(line)) => self.lines.push(line),
                Ok(Event::Closed(at)) => self.closed = Some(at),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let seen = |log: &Log| log.lines.iter().any(|l| l.contains(needle));
        self.pump(Instant::now() + timeout, seen);
        seen(self)
    }

    /// When the pipe closed, if it did by `until`.
    fn wait_closed(&mut self, until: Instant) -> Option<Instant> {
        self.pump(until, |_| false);
        self.closed
    }

    /// Everything that arrives within `window`, for an error message.
    fn settle(&mut self, window: Duration) -> String {
        self.pump(Instant::now() + window, |_| false);
        self.lines.join("\n")
    }
}

fn read_lines(pipe: File, tx: &Sender<Event>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches('\n')
                    .to_owned();
                if tx.send(Event::Line(line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Event::Closed(Instant::now()));
}

/// A pipe whose ends are close-on-exec, so that no other child of this test process (tests
/// run in parallel) inherits the write end and keeps the pipe open past the container.
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

// ---------------------------------------------------------------------------------------
// The bundle: a root filesystem with no shell, and its OCI config
// ---------------------------------------------------------------------------------------

/// Lays out `bundle/rootfs` (the two binaries and empty `/tmp`, `/proc`, `/dev`; runc mounts
/// proc, and tmpfs on `/dev` and `/tmp`) and `bundle/config.json` running `args`. The app
/// is there under the name `args[0]` too (a stand-in for `/pause`, say).
fn bundle(env: &TestEnv, bins: &Binaries, args: &[&str], pid_ns: Option<u32>) {
    let rootfs = env.path("bundle/rootfs");
    for dir in ["tmp", "proc", "dev"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy(&bins.prestop, rootfs.join("prestop")).unwrap();
    std::fs::copy(&bins.app, rootfs.join("sample_app")).unwrap();
    if let Some(program) = args.first().and_then(|p| p.strip_prefix('/'))
        && program != "sample_app"
        && program != "prestop"
    {
        std::fs::copy(&bins.app, rootfs.join(program)).unwrap();
    }
    std::fs::write(env.path("bundle/config.json"), config_json(args, pid_ns)).unwrap();
}

/// A minimal OCI runtime config, close to what a kubelet asks of containerd: a read-only
/// root with tmpfs `/tmp` (an emptyDir), fresh namespaces, the default capabilities, and
/// no terminal, so the container's stdio is the pipe given to `runc run`.
fn config_json(args: &[&str], pid_ns: Option<u32>) -> String {
    let args = json_list(args);
    let caps = json_list(&CAPABILITIES);
    let pid = match pid_ns {
        Some(host_pid) => format!(r#"{{ "type": "pid", "path": "/proc/{host_pid}/ns/pid" }}"#),
        None => r#"{ "type": "pid" }"#.to_owned(),
    };
    format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false,
    "user": {{ "uid": 0, "gid": 0 }},
    "args": {args},
    "env": ["PATH=/"],
    "cwd": "/",
    "capabilities": {{ "bounding": {caps}, "effective": {caps}, "permitted": {caps} }},
    "noNewPrivileges": true
  }},
  "root": {{ "path": "rootfs", "readonly": true }},
  "hostname": "prestop-e2e",
  "mounts": [
    {{ "destination": "/proc", "type": "proc", "source": "proc" }},
    {{ "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
       "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }},
    {{ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
       "options": ["nosuid", "nodev", "mode=1777", "size=16m"] }}
  ],
  "linux": {{
    "namespaces": [
      {pid}, {{ "type": "network" }}, {{ "type": "ipc" }},
      {{ "type": "uts" }}, {{ "type": "mount" }}
    ],
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }}
}}
"#
    )
}

fn json_list(items: &[&str]) -> String {
    serde_json::Value::from(items).to_string()
}

// ---------------------------------------------------------------------------------------
// Setup, once per run: the static binaries, and whether runc can run here at all
// ---------------------------------------------------------------------------------------

struct Binaries {
    prestop: PathBuf,
    app: PathBuf,
}

enum Setup {
    Ready(Binaries),
    /// runc cannot run here: skipped, except under CI=true.
    Unavailable(String),
    /// Something that should work did not: always a failure.
    Broken(String),
}

/// The binaries, or `None` when the suite must be skipped (after saying why).
fn binaries() -> Option<&'static Binaries> {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    static SAID: Once = Once::new();
    match SETUP.get_or_init(prepare) {
        Setup::Ready(bins) => Some(bins),
        Setup::Broken(why) => panic!("e2e_runc: {why}"),
        Setup::Unavailable(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "e2e_runc: CI=true, but the runc suite cannot run: {why}"
            );
            SAID.call_once(|| show(&format!("e2e_runc: skipped: {why}\n")));
            None
        }
    }
}

fn prepare() -> Setup {
    match Command::new("runc").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Setup::Unavailable(format!(
                "`runc --version` failed: {}",
                common::stderr(&out)
            ));
        }
        Err(e) => {
            return Setup::Unavailable(format!(
                "runc not found ({e}); install the Debian package runc (`bash .ci/install.sh`)"
            ));
        }
    }
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        return Setup::Unavailable(format!(
            "runc needs root to create containers; this is uid {uid}"
        ));
    }
    let bins = match prebuilt() {
        Some(bins) => bins,
        None => match build() {
            Ok(bins) => bins,
            Err(setup) => return setup,
        },
    };
    match probe(&bins) {
        Ok(()) => Setup::Ready(bins),
        Err(why) => Setup::Unavailable(format!("runc cannot run a container here: {why}")),
    }
}

/// `PRESTOP_E2E_BIN` and `PRESTOP_E2E_APP`, when both are given.
fn prebuilt() -> Option<Binaries> {
    let prestop = PathBuf::from(std::env::var_os("PRESTOP_E2E_BIN")?);
    let app = PathBuf::from(std::env::var_os("PRESTOP_E2E_APP")?);
    Some(Binaries { prestop, app })
}

/// Builds the static release binaries for the host's musl target into `target/e2e`, the
/// same place `.ci/packaging.sh` builds, so CI compiles them once.
fn build() -> Result<Binaries, Setup> {
    let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", &target])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(common::stdout(&out).trim()));
    if !libdir.is_some_and(|dir| dir.is_dir()) {
        return Err(Setup::Unavailable(format!(
            "the Rust target {target} is not installed (`rustup target add {target}`)"
        )));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = manifest.join("target/e2e");
    show(&format!(
        "e2e_runc: building static {target} binaries into {}\n",
        target_dir.display()
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(manifest)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--release", "--locked", "--target", &target])
        .args(["--bin", "prestop", "--example", "sample_app"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Setup::Broken(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(Setup::Broken(format!(
            "building the static binaries failed:\n{}",
            common::stderr(&out)
        )));
    }
    let release = target_dir.join(&target).join("release");
    Ok(Binaries {
        prestop: release.join("prestop"),
        app: release.join("examples/sample_app"),
    })
}

/// Runs `/prestop --version` in a container: proves that runc works here, and that the
/// binary needs nothing from the image (no shell, no libc, no loader).
fn probe(bins: &Binaries) -> Result<(), String> {
    let env = TestEnv::new();
    bundle(&env, bins, &["/prestop", "--version"], None);
    let out = Command::new("runc")
        .arg("--root")
        .arg(env.path("runc"))
        .args(["run", "--bundle"])
        .arg(env.path("bundle"))
        .arg(format!("prestop-e2e-probe-{}", std::process::id()))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = common::stdout(&out);
    if out.status.success() && stdout.starts_with("prestop ") {
        Ok(())
    } else {
        Err(format!(
            "{} {}{}",
            out.status,
            stdout,
            common::stderr(&out).trim()
        ))
    }
}

/// Writes straight to the test's stderr: libtest captures only the print macros, and these
/// lines (why the suite was skipped, the numbers of scenario d) must show in CI's log.
fn show(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
