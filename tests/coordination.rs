//! At-least-once delivery: invocations of the same hook share one termination.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Guard, Running, SignalEcho, TestEnv, stderr};

fn hook(env: &TestEnv, echo: &SignalEcho, grace: &str) -> std::process::Command {
    let mut cmd = env.prestop([
        "drain",
        "--signal",
        "USR1",
        "--signal-target",
        &echo.pid().to_string(),
        "--wait-lock",
        "lock/*.lock",
        "--grace-period",
        grace,
        "--reserve",
        "1",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

#[test]
fn two_concurrent_invocations_signal_once_and_both_drain() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let lock = env.touch("lock/job.lock");
    let first = Guard::spawn(&mut hook(&env, &echo, "30"));
    let second = Guard::spawn(&mut hook(&env, &echo, "30"));
    std::thread::sleep(Duration::from_millis(700));
    fs::remove_file(lock).unwrap();
    let (a, b) = (first.wait_output(), second.wait_output());
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    assert_eq!(
        echo.collect(Duration::from_millis(500)),
        ["USR1"],
        "exactly one signal"
    );
    let logs = format!("{}{}", stderr(&a), stderr(&b));
    assert_eq!(logs.matches("sent SIGUSR1").count(), 1, "{logs}");
    assert_eq!(logs.matches("joining the drain begun").count(), 1, "{logs}");
}

#[test]
fn a_late_second_invocation_ends_at_the_first_ones_deadline() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    env.touch("lock/job.lock");
    let start = Instant::now();
    let first = Guard::spawn(&mut hook(&env, &echo, "4"));
    std::thread::sleep(Duration::from_millis(1500));
    let second_start = Instant::now();
    let second = Guard::spawn(&mut hook(&env, &echo, "4"));
    let b = second.wait_output();
    let second_took = second_start.elapsed();
    let a = first.wait_output();
    assert_eq!(a.status.code(), Some(1), "{}", stderr(&a));
    assert_eq!(b.status.code(), Some(1), "{}", stderr(&b));
    // The first deadline is 3 s after the first start; the second's own would be 3 s after
    // its start, at 4.5 s.
    let deadline = Duration::from_secs(3);
    assert!(start.elapsed() >= deadline);
    assert!(second_took < Duration::from_millis(2500), "{second_took:?}");
    assert!(second_took >= Duration::from_secs(1), "{second_took:?}");
    assert!(
        stderr(&b).contains("joining the drain begun 1."),
        "{}",
        stderr(&b)
    );
    assert_eq!(echo.collect(Duration::from_millis(300)), ["USR1"]);
}

#[test]
fn a_different_hook_is_a_different_termination() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let pid = echo.pid().to_string();
    for signal in ["USR1", "USR2"] {
        let out = env
            .prestop(["drain", "--signal", signal, "--signal-target", &pid])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
    }
    assert_eq!(echo.collect(Duration::from_millis(500)), ["USR1", "USR2"]);
}

#[test]
fn an_unusable_state_dir_warns_and_runs_uncoordinated() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let link = env.path("state-link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let out = env
        .prestop([
            "drain",
            "--signal",
            "USR1",
            "--signal-target",
            &echo.pid().to_string(),
            "--state-dir",
            link.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("unusable"), "{}", stderr(&out));
    assert!(stderr(&out).contains("running uncoordinated"));
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through a symlink"
    );
    assert_eq!(echo.collect(Duration::from_millis(500)), ["USR1"]);
}

#[test]
fn an_interrupted_leader_leaves_the_stop_actions_to_the_next_delivery() {
    let env = TestEnv::new();
    let sentinel = env.path("draining");
    let args = [
        "drain",
        "--stop-after",
        "1500ms",
        "--touch",
        sentinel.to_str().unwrap(),
    ];
    let mut first = Running::spawn(&mut env.prestop(args));
    first.wait_for("holding the stop actions");
    first.guard.signal(nix::sys::signal::Signal::SIGINT);
    let (code, _, log) = first.finish();
    assert_eq!(code, Some(130), "{log}");
    assert!(!sentinel.exists());

    let out = env.prestop(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        sentinel.exists(),
        "the second delivery skipped the stop actions"
    );
    assert!(
        stderr(&out).contains("running them again"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_state_dir_others_can_write_to_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new();
    let shared = env.path("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let out = env
        .prestop(["drain", "--state-dir", shared.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("writable by others"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0);
}

/// A second delivery reports the stop actions' failures as its own: the kubelet waits for
/// whichever delivery it ran, and a failed action must not turn into exit 0 on the way.
#[test]
fn a_second_delivery_reports_the_first_ones_failed_stop_action() {
    let env = TestEnv::new();
    let lock = env.touch("lock/job.lock");
    let delivery = || {
        env.prestop([
            "drain",
            "--exec",
            "false",
            "--wait-lock",
            "lock/*.lock",
            "--grace-period",
            "30",
        ])
    };
    let mut first = Running::spawn(&mut delivery());
    first.wait_for("waiting for lock");
    let mut second = Running::spawn(&mut delivery());
    second.wait_for("stop action(s) failed in the delivery that ran them: exec false");
    fs::remove_file(lock).unwrap();
    let (a, a_out, a_log) = first.finish();
    let (b, b_out, b_log) = second.finish();
    assert_eq!(a, Some(3), "{a_log}");
    assert_eq!(b, Some(3), "{b_log}");
    for summary in [a_out, b_out] {
        assert!(
            summary.contains("but 1 stop action(s) failed: exec false: "),
            "{summary}"
        );
    }
    let logs = format!("{a_log}{b_log}");
    assert_eq!(
        logs.matches("stop action failed: exec false").count(),
        1,
        "run once: {logs}"
    );
}
