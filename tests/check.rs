//! `prestop check`: one look, exit 0 if drained and 1 if not.

mod common;

use std::process::Command;

use common::{Guard, TestEnv, stderr, stdout};

#[test]
fn reports_what_is_in_flight() {
    let env = TestEnv::new();
    let lock = env.touch("lock/a.lock");
    let sleeper = Guard::spawn(Command::new("sleep").arg("30"));
    let pid = sleeper.id().to_string();
    let out = env
        .prestop(["check", "--wait-lock", "lock/*.lock", "--wait-pid", &pid])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("1 in flight (lock {})", lock.display())),
        "{text}"
    );
    assert!(text.contains(&format!("pid {pid}: running")), "{text}");
    assert!(
        text.ends_with("prestop: not drained: 2 in flight\n"),
        "{text}"
    );
}

#[test]
fn exits_0_when_drained() {
    let env = TestEnv::new();
    env.touch("lock/a.txt");
    let out = env
        .prestop([
            "check",
            "--wait-lock",
            "lock/*.lock",
            "--wait-pid",
            "name:no-such-proc-xyz",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("prestop: drained\n"));
}

#[test]
fn needs_a_condition() {
    let env = TestEnv::new();
    let out = env.prestop(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1);
}

#[test]
fn doubled_and_trailing_slashes_still_match() {
    let env = TestEnv::new();
    env.touch("lock/a.lock");
    let out = env
        .prestop(["check", "--wait-lock", "lock//*.lock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
}

#[test]
fn wildcard_characters_in_the_working_directory_are_literal() {
    let env = TestEnv::new();
    env.touch("a[1]/lock/x.lock");
    let out = env
        .prestop(["check", "--wait-lock", "lock/*.lock"])
        .current_dir(env.path("a[1]"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 in flight"), "{}", stdout(&out));
}
