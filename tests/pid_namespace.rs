//! Behaviour that depends on what PID 1 is, inside real PID namespaces (needs root, as in
//! CI): progress lines reach PID 1's stdout, and a host init is never signalled by default.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Guard, TestEnv, can_unshare, prestop_command, stderr};

/// Runs `program args` as PID 1 of a new PID and mount namespace, its stdout in `stdout`.
/// Returns the guard and PID 1's PID as seen from here.
fn pid1(program: &Path, args: &[&str], stdout: &Path) -> (Guard, u32) {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(program)
        .args(args)
        .stdout(fs::File::create(stdout).unwrap())
        .stderr(Stdio::null());
    let guard = Guard::spawn(&mut cmd);
    let children = format!("/proc/{0}/task/{0}/children", guard.id());
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let text = fs::read_to_string(&children).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next() {
            // Wait until it has exec'd, so /proc/1 shows the program and not unshare.
            let pid: u32 = pid.parse().unwrap();
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let name = program.file_name().unwrap().to_str().unwrap();
            if comm.trim() == &name[..name.len().min(15)] {
                return (guard, pid);
            }
        }
        assert!(Instant::now() < end, "PID 1 of the namespace never started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `prestop ARGS` inside the namespace whose PID 1 is `pid`.
fn inside(pid: u32, env: &TestEnv, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("-t").arg(pid.to_string()).args(["-p", "-m", "--"]);
    cmd.arg(common::bin()).args(args);
    cmd.env("PRESTOP_STATE_DIR", env.state_dir());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PRESTOP_") && key != "PRESTOP_STATE_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    let _ = prestop_command; // the runner variant does not apply inside a namespace
    cmd
}

#[test]
fn progress_lines_reach_pid_1s_stdout() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    let app_stdout = env.path("app-stdout.log");
    let sleep = which("sleep");
    let (_ns, pid) = pid1(&sleep, &["30"], &app_stdout);
    let lock = env.touch("lock/a.lock");
    let mut hook = inside(
        pid,
        &env,
        &[
            "drain",
            "--log-format",
            "json",
            "--wait-lock",
            env.path("lock/*.lock").to_str().unwrap(),
            "--progress-interval",
            "200ms",
        ],
    );
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let hook = Guard::spawn(&mut hook);
    std::thread::sleep(Duration::from_millis(700));
    fs::remove_file(&lock).unwrap();
    let out = hook.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "the log went to stderr: {}",
        stderr(&out)
    );

    let text = fs::read_to_string(&app_stdout).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"start"), "{text}");
    assert!(names.contains(&"waiting"), "no progress line: {text}");
    assert_eq!(names.last(), Some(&"drained"), "{text}");
    // The summary also went to the hook's own stdout.
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["event"], "drained");
}

#[test]
fn a_host_init_as_pid_1_is_not_signalled_by_default() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    // A harmless stand-in for the host's init: `sleep`, under the name systemd.
    let fake_init = env.path("systemd");
    fs::copy(which("sleep"), &fake_init).unwrap();
    let (_ns, pid) = pid1(&fake_init, &["30"], &env.path("init-stdout.log"));

    let out = inside(pid, &env, &["drain", "--signal", "TERM"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--signal-target") && err.contains("systemd"),
        "{err}"
    );
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "PID 1 was signalled"
    );

    // An explicit target insists (checked with a dry run, so nothing is sent).
    let out = inside(
        pid,
        &env,
        &[
            "drain",
            "--signal",
            "TERM",
            "--signal-target",
            "1",
            "--dry-run",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn which(program: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not found"))
}
