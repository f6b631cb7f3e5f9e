//! `prestop rehearse` and `prestop demo`: the local kubelet, against real processes.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Guard, TestEnv, can_unshare, stderr, stdout, timed};

/// An app in bash: holds `lock` for `work` seconds after start, exits 0 on TERM (unless
/// `ignore_term`), and prints each signal it gets.
fn app(lock: &str, work: &str, ignore_term: bool) -> String {
    let on_term = if ignore_term {
        "echo ignoring TERM"
    } else {
        "echo TERM; exit 0"
    };
    format!(
        "touch {lock}; (sleep {work}; rm -f {lock}) & \
         trap 'echo TSTP' TSTP; trap '{on_term}' TERM; \
         while :; do sleep 30 & wait $!; done"
    )
}

/// The offset in the timeline of the first line containing `what`.
fn offset(timeline: &str, what: &str) -> f64 {
    let timeline = &timeline[timeline.find("Timeline (").expect("no timeline")..];
    let line = timeline
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("{what:?} not in the timeline:\n{timeline}"));
    line.split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap()
}

#[test]
fn a_graceful_rehearsal() {
    let env = TestEnv::new();
    let lock = env.path("job.lock");
    let script = app(lock.to_str().unwrap(), "1", false);
    let out = env
        .prestop([
            "rehearse",
            "--signal",
            "TSTP",
            "--wait-lock",
            lock.to_str().unwrap(),
            "--grace-period",
            "10",
            "--after",
            "300ms",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    // The app's own output passes through; target 1 meant the app.
    assert_eq!(stdout(&out), "TSTP\nTERM\n");
    assert!(
        log.contains("Verdict: graceful: the app drained and exited with"),
        "{log}"
    );
    let signal = offset(&log, "hook: sent SIGTSTP");
    let drained = offset(&log, "hook: drained after");
    let term = offset(&log, "SIGTERM sent to the app");
    let exited = offset(&log, "app exited: exit status 0");
    assert!(offset(&log, "app started") < 0.0);
    assert!(
        signal < drained && drained <= term && term <= exited,
        "{log}"
    );
    assert!((0.4..3.0).contains(&drained), "{log}");
    assert!(log.contains("+10.000s  (the grace period ends)"), "{log}");
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_at_the_grace_deadline() {
    let env = TestEnv::new();
    let lock = env.path("none.lock");
    let script = app(lock.to_str().unwrap(), "0", true);
    let (out, took) = timed(env.prestop([
        "rehearse",
        "--grace-period",
        "2",
        "--reserve",
        "1",
        "--after",
        "200ms",
        "--",
        "bash",
        "-c",
        &script,
    ]));
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("Verdict: killed"), "{log}");
    assert!(stdout(&out).contains("ignoring TERM"));
    let kill = offset(&log, "SIGKILL sent to the app's process group");
    assert!(
        (1.95..2.5).contains(&kill),
        "SIGKILL at {kill}, not at the deadline:\n{log}"
    );
    assert!(took >= Duration::from_millis(2150), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn an_app_that_exits_early_is_reported() {
    let env = TestEnv::new();
    let (out, took) = timed(env.prestop([
        "rehearse",
        "--after",
        "20s",
        "--",
        "bash",
        "-c",
        "echo bye; exit 3",
    ]));
    let log = stderr(&out);
    assert!(
        took < Duration::from_secs(5),
        "waited for --after anyway: {took:?}"
    );
    assert!(
        log.contains("app exited on its own: exit status 3"),
        "{log}"
    );
    assert!(!log.contains("SIGTERM sent"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
}

#[test]
fn a_drain_past_the_deadline_is_drained_late() {
    let env = TestEnv::new();
    let lock = env.path("long.lock");
    let script = app(lock.to_str().unwrap(), "3", false);
    let out = env
        .prestop([
            "rehearse",
            "--wait-lock",
            lock.to_str().unwrap(),
            "--grace-period",
            "6",
            "--reserve",
            "4",
            "--after",
            "200ms",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("Verdict: drained-late"), "{log}");
    let returned = offset(&log, "hook returned (exit 1)");
    assert!((1.9..2.6).contains(&returned), "{log}");
    assert!(
        log.contains("hook: budget exhausted after 2.0s: 1 still in flight"),
        "{log}"
    );
}

#[test]
fn ctrl_c_ends_the_apps_whole_process_group() {
    let env = TestEnv::new();
    let marker = format!("prestop-marker-{}", std::process::id());
    let script =
        format!("(exec -a {marker} sleep 300) & (exec -a {marker} sleep 300) & wait; echo done");
    let mut cmd = env.prestop([
        "rehearse", "--after", "30s", "--", "bash", "-c", &script, &marker,
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let rehearsal = Guard::spawn(&mut cmd);
    let end = Instant::now() + Duration::from_secs(10);
    while marked(&marker).len() < 3 {
        assert!(Instant::now() < end, "the app never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    rehearsal.signal(nix::sys::signal::Signal::SIGINT);
    let out = rehearsal.wait_output();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let left = marked(&marker);
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Live processes whose command line contains `marker`.
fn marked(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn the_target_1_is_pid_1_inside_a_pid_namespace() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    // The app gives up a lock when the signal comes, and the hook waits for that: SIGTERM
    // never overtakes the signal's handler.
    let lock = env.path("busy.lock");
    let script = format!(
        "touch {l}; trap 'echo USR1 as pid $$; rm -f {l}' USR1; trap 'exit 0' TERM; \
         while :; do sleep 30 & wait $!; done",
        l = lock.display()
    );
    let out = env
        .prestop([
            "rehearse",
            "--pid-namespace",
            "--signal",
            "USR1",
            "--wait-lock",
            lock.to_str().unwrap(),
            "--after",
            "300ms",
            "--grace-period",
            "10",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "USR1 as pid 1\n");
    assert!(
        stderr(&out).contains("hook: sent SIGUSR1 to pid 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_rehearsal_input_is_refused() {
    let env = TestEnv::new();
    for (args, needle) in [
        (
            vec!["rehearse", "--after", "soon", "--", "true"],
            "--after \"soon\"",
        ),
        (
            vec!["rehearse", "--stop-signal", "NOPE", "--", "true"],
            "--stop-signal \"NOPE\"",
        ),
        (
            vec!["rehearse", "--grace-period", "x", "--", "true"],
            "--grace-period \"x\"",
        ),
        (vec!["rehearse", "--", "/no/such/app"], "/no/such/app"),
        (
            vec!["rehearse"],
            "required arguments were not provided: <APP>...",
        ),
    ] {
        let out = env.prestop(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
}

#[test]
fn the_demo_drains_its_worker_gracefully() {
    let env = TestEnv::new();
    let (out, took) = timed(env.prestop(["demo"]));
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("Verdict: graceful"), "{log}");
    let worker = stdout(&out);
    assert!(worker.contains("SIGTSTP: taking no new jobs"), "{worker}");
    assert!(
        worker.contains("SIGTERM: exiting, no job abandoned"),
        "{worker}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    // Its temporary directory is gone.
    let dir = log
        .split_whitespace()
        .find(|w| w.contains("prestop-demo-"))
        .expect("the demo names its directory");
    let locks = std::path::Path::new(dir.trim_end_matches('.'));
    let scratch = locks.parent().unwrap();
    assert!(
        scratch.starts_with(std::env::temp_dir()),
        "{}",
        scratch.display()
    );
    assert!(!scratch.exists(), "{} was left behind", scratch.display());
}

#[test]
fn an_app_that_exits_during_the_hook_stops_the_container() {
    let env = TestEnv::new();
    let lock = env.touch("job.lock");
    let out = env
        .prestop([
            "rehearse",
            "--signal",
            "TERM",
            "--wait-lock",
            lock.to_str().unwrap(),
            "--after",
            "300ms",
            "--grace-period",
            "5",
            "--reserve",
            "1",
            "--",
            "sleep",
            "100",
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    // It exited before SIGKILL: graceful, with what a pod would record on the timeline.
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("app exited during the hook (killed by SIGTERM)"),
        "{log}"
    );
    assert!(
        log.contains("hook killed with the container, as in a pod"),
        "{log}"
    );
    assert!(
        log.contains("Verdict: graceful: the app exited by itself")
            && log.contains("FailedPreStopHook"),
        "{log}"
    );
}
