//! Bad input: one line on stderr naming the option and the value, exit 2, nothing done.

mod common;

use std::fs;
use std::time::Duration;

use common::{SignalEcho, TestEnv, stderr, stdout};

/// Runs `prestop drain ARGS` with a sentinel and a signal target that must both stay
/// untouched, and checks the error names `option` and `value`.
fn refused(args: &[&str], option: &str, value: &str) {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let sentinel = env.path("sentinel");
    let mut full = vec!["drain", "--touch", sentinel.to_str().unwrap()];
    let pid = echo.pid().to_string();
    if !args.contains(&"--signal") {
        full.extend(["--signal", "USR1"]);
    }
    if !args.contains(&"--signal-target") {
        full.extend(["--signal-target", &pid]);
    }
    full.extend(args);
    let out = env.prestop(&full).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("prestop: "), "{err}");
    assert!(
        err.contains(option),
        "{args:?}: option {option} not named: {err}"
    );
    assert!(
        err.contains(value),
        "{args:?}: value {value} not named: {err}"
    );
    assert!(stdout(&out).is_empty());
    assert!(!sentinel.exists(), "{args:?}: the sentinel was touched");
    assert!(
        echo.collect(Duration::from_millis(150)).is_empty(),
        "{args:?}: a signal was sent"
    );
    assert!(
        !env.state_dir().exists(),
        "{args:?}: the state dir was created"
    );
}

#[test]
fn bad_durations() {
    refused(&["--grace-period", "abc"], "--grace-period", "\"abc\"");
    refused(&["--grace-period", "-5s"], "--grace-period", "\"-5s\"");
    refused(&["--reserve", "5 parsecs"], "--reserve", "\"5 parsecs\"");
    refused(
        &["--min-wait", "99999999999999999999"],
        "--min-wait",
        "99999999999999999999",
    );
    refused(&["--quiet-for", ""], "--quiet-for", "\"\"");
    refused(&["--poll-interval", "0"], "--poll-interval", "\"0\"");
    refused(&["--poll-interval", "1ns"], "--poll-interval", "\"1ns\"");
    refused(
        &["--progress-interval", "0s"],
        "--progress-interval",
        "\"0s\"",
    );
}

#[test]
fn a_reserve_that_leaves_no_time() {
    refused(
        &["--grace-period", "10", "--reserve", "10s"],
        "--reserve",
        "10s",
    );
    refused(&["--grace-period", "0"], "--grace-period", "0s");
    refused(
        &["--grace-period", "10", "--min-wait", "6s"],
        "--min-wait",
        "6s",
    );
}

#[test]
fn bad_globs() {
    refused(
        &["--wait-lock", "/tmp/[abc"],
        "--wait-lock",
        "\"/tmp/[abc\"",
    );
    refused(&["--wait-lock", ""], "--wait-lock", "\"\"");
}

#[test]
fn bad_signals() {
    refused(&["--signal", "FOO"], "--signal", "\"FOO\"");
    refused(&["--signal", "0"], "--signal", "\"0\"");
    refused(&["--signal", "99"], "--signal", "\"99\"");
}

#[test]
fn bad_targets() {
    for target in ["0", "-1", "abc", "name:", "name:a/b", "pid:4", "4294967296"] {
        refused(
            &["--signal-target", target],
            "--signal-target",
            &format!("{target:?}"),
        );
        refused(
            &["--wait-pid", target],
            "--wait-pid",
            &format!("{target:?}"),
        );
    }
}

#[test]
fn bad_pidfiles() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("minus-one", "-1\n"),
        ("zero", "0\n"),
        ("text", "nginx\n"),
        ("empty", ""),
        ("huge", "99999999999999999999999\n"),
        ("spaces", " 42\n"),
        ("two", "42\n43\n"),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        let target = format!("pidfile:{}", path.display());
        refused(&["--signal-target", &target], "--signal-target", &target);
        refused(&["--wait-pid", &target], "--wait-pid", &target);
    }
    // A pidfile that is not there is read when the hook runs: no usage error (tests/hostile.rs).
}

#[test]
fn bad_paths() {
    refused(
        &["--touch", "/nonexistent-dir/x"],
        "--touch",
        "/nonexistent-dir/x",
    );
    refused(
        &["--log-target", "/nonexistent-dir/log"],
        "--log-target",
        "/nonexistent-dir/log",
    );
    refused(&["--touch", "/tmp"], "--touch", "/tmp");
    refused(&["--state-dir", ""], "--state-dir", "\"\"");
}

#[test]
fn bad_exec_commands() {
    refused(
        &["--exec", "no-such-program-xyz --flag"],
        "--exec",
        "no-such-program-xyz",
    );
    refused(&["--exec", "echo 'unterminated"], "--exec", "unterminated");
    refused(&["--exec", "  "], "--exec", "\"  \"");
}

#[test]
fn bad_formats_and_unknown_options() {
    refused(&["--log-format", "xml"], "--log-format", "\"xml\"");
    refused(&["--bogus-flag"], "--bogus-flag", "--bogus-flag");
}

#[test]
fn a_signal_target_without_a_signal() {
    let env = TestEnv::new();
    let out = env
        .prestop(["drain", "--signal-target", "42"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--signal-target \"42\""));
}

#[test]
fn bad_values_from_the_environment() {
    let env = TestEnv::new();
    let out = env
        .prestop(["drain"])
        .env("PRESTOP_GRACE_PERIOD", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--grace-period \"soon\""),
        "{}",
        stderr(&out)
    );
}
