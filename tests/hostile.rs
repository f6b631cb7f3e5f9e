//! Hostile and careless input, one test per class of broken promise: a false "drained" when
//! prestop cannot see, a hang past the deadline, a signal to the wrong process, a value
//! that splits or forges a line. Each reproduces what a user could do; each failed before
//! prestop handled its class.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Guard, Running, SignalEcho, TestEnv, can_unshare, stderr, stdout, timed, with_fd_limit,
};

/// Whether this test process may switch users (root); CI must be able to.
fn can_switch_user() -> bool {
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not root: cannot run a hook as another user"
    );
    root
}

/// The binary under test, copied where any user may run it (the checkout may not be
/// searchable by them).
fn public_copy(env: &TestEnv) -> PathBuf {
    let dir = env.path("bin");
    fs::create_dir_all(&dir).unwrap();
    for d in [env.dir.path(), dir.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let copy = dir.join("prestop");
    fs::copy(common::bin(), &copy).unwrap();
    copy
}

// ---------------------------------------------------------------------------------------
// Never a false "drained"
// ---------------------------------------------------------------------------------------

/// A lock directory the hook's user may not read (another `runAsUser`): the glob is unknown,
/// which counts as in flight until the deadline, and `check` says so.
#[test]
fn a_lock_directory_the_hook_cannot_read_is_unknown_not_drained() {
    if !can_switch_user() {
        eprintln!("skipped: needs root to run the hook as another user");
        return;
    }
    let env = TestEnv::new();
    let prestop = public_copy(&env);
    let locks = env.path("srv/locks");
    fs::create_dir_all(&locks).unwrap();
    fs::write(locks.join("job.lock"), "").unwrap();
    fs::set_permissions(env.path("srv"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&locks, fs::Permissions::from_mode(0o700)).unwrap();
    let glob = format!("{}/*.lock", locks.display());
    let nobody = |args: &[&str]| {
        let mut cmd = Command::new(&prestop);
        cmd.uid(65534).gid(65534).args(args).stdin(Stdio::null());
        cmd.env_remove("PRESTOP_STATE_DIR");
        cmd
    };
    let state = env.path("state-nobody");
    let (out, took) = timed(nobody(&[
        "drain",
        "--wait-lock",
        &glob,
        "--grace-period",
        "3",
        "--reserve",
        "1500ms",
        "--log-target",
        "stderr",
        "--state-dir",
        state.to_str().unwrap(),
    ]));
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        took >= Duration::from_millis(1500),
        "returned early: {took:?}\n{log}"
    );
    let summary = stdout(&out);
    assert!(
        summary.contains("unknown (cannot read") && summary.contains("(EACCES)"),
        "{summary}"
    );
    assert_eq!(
        log.matches("cannot see lock").count(),
        1,
        "said once: {log}"
    );

    let out = nobody(&["check", "--wait-lock", &glob]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(": unknown (cannot read"),
        "{}",
        stdout(&out)
    );
}

/// Out of file descriptors, with more processes to wait for than it can pin: every one of
/// them still counts, none passes for exited.
#[test]
fn out_of_file_descriptors_no_process_passes_for_exited() {
    let env = TestEnv::new();
    let name = format!("fd-hog-{}", std::process::id());
    let _sleepers: Vec<Guard> = (0..100)
        .map(|_| {
            let mut cmd = Command::new("sleep");
            cmd.arg0(&name).arg("60");
            Guard::spawn(&mut cmd)
        })
        .collect();
    let mut cmd = env.prestop([
        "drain",
        "--wait-pid",
        &format!("name:{name}"),
        "--grace-period",
        "3",
        "--reserve",
        "2",
    ]);
    with_fd_limit(&mut cmd, 40);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("100 still in flight"),
        "every process counts: {summary}"
    );
}

/// With no file descriptor to spare, the log and the summary still go out (through the
/// descriptors prestop was given): a `FailedPreStopHook` event still says why.
#[test]
fn out_of_file_descriptors_the_summary_still_goes_out() {
    let env = TestEnv::new();
    env.touch("lock/a.lock");
    for limit in [4, 5] {
        let mut cmd = env.prestop([
            "drain",
            "--wait-lock",
            "lock/*.lock",
            "--log-target",
            "stderr",
            "--grace-period",
            "3",
            "--reserve",
            "2",
        ]);
        with_fd_limit(&mut cmd, limit);
        let out = cmd.output().unwrap();
        let summary = stdout(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "limit {limit}: {}",
            stderr(&out)
        );
        assert!(
            summary.starts_with("prestop: budget exhausted after 1.0s: 1 still in flight"),
            "limit {limit}: {summary:?}"
        );
        assert!(
            stderr(&out).contains("Too many open files (EMFILE)"),
            "limit {limit}: {}",
            stderr(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Nothing outlives the deadline
// ---------------------------------------------------------------------------------------

/// Symlinks back up the tree under a `**`: no walk goes round them, and drain, check and a
/// dry run all end in time.
#[test]
fn a_symlink_loop_under_double_star_ends_in_time() {
    let env = TestEnv::new();
    let root = env.path("L");
    fs::create_dir_all(root.join("jobs")).unwrap();
    std::os::unix::fs::symlink(".", root.join("again")).unwrap();
    std::os::unix::fs::symlink("..", root.join("jobs/up")).unwrap();
    let lock = root.join("jobs/a.lock");
    fs::write(&lock, "").unwrap();
    let glob = format!("{}/**/*.lock", root.display());
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-lock",
        &glob,
        "--grace-period",
        "3",
        "--reserve",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Seen through the real directory once, never through the links.
    assert!(
        stdout(&out).contains(&format!("1 still in flight (lock {})", lock.display())),
        "{}",
        stdout(&out)
    );
    for args in [
        ["check", "--wait-lock", &glob],
        ["drain", "--dry-run", "--wait-lock"],
    ] {
        let mut cmd = env.prestop(args);
        if args[0] == "drain" {
            cmd.arg(&glob);
        }
        let (out, took) = timed(cmd);
        assert!(took < Duration::from_secs(5), "{args:?}: {took:?}");
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    }
}

/// A glob that spans a whole tree (`/proc/**`) is unknown rather than walked for ever, and
/// the stop actions do not wait for it.
#[test]
fn a_glob_over_a_huge_tree_is_bounded_and_the_stop_actions_do_not_wait() {
    let env = TestEnv::new();
    let sentinel = env.path("draining");
    let mut hook = Running::spawn(&mut env.prestop([
        "drain",
        "--touch",
        sentinel.to_str().unwrap(),
        "--wait-lock",
        "/proc/**/x.lock",
        "--grace-period",
        "4",
        "--reserve",
        "1",
    ]));
    let start = Instant::now();
    hook.wait_for("touched ");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the touch waited for the walk"
    );
    let (code, summary, log) = hook.finish();
    assert!(start.elapsed() < Duration::from_secs(5), "{log}");
    assert_eq!(code, Some(1), "{log}");
    assert!(summary.contains("unknown ("), "{summary}");
}

/// A FIFO planted under the state file's name (and the lock file's): prestop neither blocks
/// on it nor trusts it, and still drains.
#[test]
fn a_fifo_in_the_state_directory_never_blocks() {
    let env = TestEnv::new();
    let args = ["drain", "--grace-period", "30"];
    let out = env.prestop(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut planted = 0;
    for entry in fs::read_dir(env.state_dir()).unwrap() {
        let path = entry.unwrap().path();
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        planted += 1;
    }
    assert_eq!(planted, 2, "a lock file and a state file");
    let (out, took) = timed(env.prestop(args));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
}

/// A second delivery waiting for the first one's lock ends at once on SIGTERM, with 143.
#[test]
fn a_delivery_waiting_for_the_lock_can_be_interrupted() {
    let env = TestEnv::new();
    let args = ["drain", "--stop-after", "3s", "--grace-period", "10"];
    let mut first = Running::spawn(&mut env.prestop(args));
    first.wait_for("holding the stop actions");
    let mut second = Running::spawn(&mut env.prestop(args));
    second.wait_for("is running the stop actions; waiting for it");
    let signalled = Instant::now();
    second.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, summary, log) = second.finish();
    assert_eq!(code, Some(143), "{log}");
    assert!(signalled.elapsed() < Duration::from_secs(2), "{log}");
    assert!(summary.contains("interrupted by SIGTERM"), "{summary}");
    first.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = first.finish();
}

/// 150,000 lock files: the look at them stops at the deadline instead of running past it.
#[test]
fn a_huge_lock_directory_does_not_hold_the_hook_past_its_deadline() {
    let env = TestEnv::new();
    let dir = env.path("lock");
    fs::create_dir(&dir).unwrap();
    for i in 0..150_000 {
        fs::File::create(dir.join(format!("{i}.lock"))).unwrap();
    }
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-lock",
        "lock/*.lock",
        "--grace-period",
        "3",
        "--reserve",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        took < Duration::from_millis(2250),
        "the deadline was 2 s, the hook returned after {took:?}"
    );
}

/// `--exec` output with no newline at all costs time in proportion to its size.
#[test]
fn exec_output_without_newlines_costs_linear_time() {
    let env = TestEnv::new();
    let start = Instant::now();
    let out = env
        .prestop([
            "drain",
            "--exec",
            "head -c 40000000 /dev/zero",
            "--log-target",
            "/dev/null",
            "--grace-period",
            "30",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // 40 MB went through; quadratic handling takes minutes here, linear well under a second.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Only the process named
// ---------------------------------------------------------------------------------------

/// A program named longer than the kernel's 15-byte `comm` runs in two variants whose
/// names share those 15 bytes: `name:` reaches only the one named.
#[test]
fn a_long_name_never_matches_by_its_first_15_bytes() {
    let env = TestEnv::new();
    let bin = env.path("bin");
    fs::create_dir(&bin).unwrap();
    let sleep = which("sleep");
    let start = |name: &str| {
        let program = bin.join(name);
        fs::copy(&sleep, &program).unwrap();
        Guard::spawn(Command::new(&program).arg("60"))
    };
    let eu_name = format!("payments-consumer-eu-{}", std::process::id());
    let us_name = format!("payments-consumer-us-{}", std::process::id());
    let mut eu = start(&eu_name);
    let mut us = start(&us_name);
    let comm = |guard: &Guard| fs::read_to_string(format!("/proc/{}/comm", guard.id())).unwrap();
    assert_eq!(comm(&eu), comm(&us), "the kernel cut both names the same");
    let out = env
        .prestop([
            "drain",
            "--signal",
            "USR1",
            "--signal-target",
            &format!("name:{eu_name}"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let end = Instant::now() + Duration::from_secs(5);
    while eu.child().try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the named process never got USR1");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        us.child().try_wait().unwrap().is_none(),
        "the other process got the signal"
    );
}

/// A copy of prestop (another inode: an upgrade, another image's binary) is a prestop
/// process too. In a PID namespace of its own, so that `name:prestop` can reach no other.
#[test]
fn a_copy_of_prestop_is_never_a_target() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    fs::create_dir_all(env.path("copy")).unwrap();
    let copy = env.path("copy/prestop");
    fs::copy(common::bin(), &copy).unwrap();
    let script = format!(
        "{copy} drain --min-wait 20s --state-dir {s}1 --log-target {log} & C=$!; \
         n=0; until grep -qs 'draining, budget' {log} || [ $n -gt 200 ]; do \
         n=$((n+1)); sleep 0.05; done; \
         {p} drain --state-dir {s}2 --log-target stderr --signal USR1 \
         --signal-target name:prestop; echo rc=$?; \
         kill -0 $C && echo copy alive",
        copy = copy.display(),
        p = common::bin().display(),
        s = env.path("state").display(),
        log = env.path("copy.log").display(),
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("rc=3") && text.contains("copy alive"),
        "{text}{}",
        stderr(&out)
    );
    assert!(text.contains("no process matches"), "{text}");
}

/// `name:prestop` never reaches another prestop process.
#[test]
fn no_prestop_process_is_ever_a_target() {
    let env = TestEnv::new();
    // The same executable under a name of its own (a hard link: the same file), so that no
    // other process on this machine can answer to it.
    let name = format!("prestop-twin-{}", std::process::id());
    let twin = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&name);
    let _ = fs::remove_file(&twin);
    fs::hard_link(common::bin(), &twin).unwrap();
    let mut bystander = Running::spawn(&mut env.prestop_as(
        &twin,
        [
            "drain",
            "--min-wait",
            "20s",
            "--state-dir",
            env.path("other-state").to_str().unwrap(),
        ],
    ));
    bystander.wait_for("draining, budget");
    let out = env
        .prestop([
            "drain",
            "--signal",
            "USR1",
            "--signal-target",
            &format!("name:{name}"),
        ])
        .output()
        .unwrap();
    let _ = fs::remove_file(&twin);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no process matches"),
        "{}",
        stdout(&out)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bystander.guard.child().try_wait().unwrap().is_none(),
        "the other prestop got USR1"
    );
}

/// In a rehearsal, every spelling of PID 1 is the app: `01`, and a pidfile holding 1.
/// Run inside a PID namespace whose PID 1 is the rehearsal itself, so that a mistake
/// cannot reach this machine's init.
#[test]
fn every_spelling_of_pid_1_means_the_app_in_a_rehearsal() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    let pidfile = env.path("one.pid");
    fs::write(&pidfile, "1\n").unwrap();
    // The app takes a lock and gives it up when the signal comes, so the hook waits for
    // that, and SIGTERM never overtakes the signal's handler.
    let lock = env.path("busy.lock");
    let app = format!(
        "touch {l}; trap 'echo got USR1; rm -f {l}' USR1; trap 'exit 0' TERM; \
         while :; do sleep 1 & wait $!; done",
        l = lock.display()
    );
    for target in ["01", &format!("pidfile:{}", pidfile.display())] {
        let out = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(common::bin())
            .args([
                "rehearse",
                "--signal",
                "USR1",
                "--signal-target",
                target,
                "--wait-lock",
                lock.to_str().unwrap(),
                "--after",
                "300ms",
                "--grace-period",
                "10",
                "--",
                "bash",
                "-c",
                &app,
            ])
            .env("PRESTOP_STATE_DIR", env.state_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{target}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("got USR1"),
            "{target}: the app never got the signal\n{}",
            stderr(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Values and output
// ---------------------------------------------------------------------------------------

/// One argument is one value: a newline inside one is refused, not split (only a PRESTOP_*
/// variable takes one value per line), and a control character in a path, glob or command
/// is refused, naming the option.
#[test]
fn a_newline_in_an_argument_is_refused_not_split() {
    let env = TestEnv::new();
    let a = env.path("A");
    let b = env.path("B");
    let two = format!("{}\n{}", a.display(), b.display());
    for (option, value) in [
        ("--touch", two.as_str()),
        ("--exec", "true\ntrue"),
        ("--wait-lock", "lock/*.lock\n/etc/*"),
        ("--wait-pid", "1\n2"),
        ("--touch", "/tmp/tab\there"),
    ] {
        let out = env
            .prestop(["drain", option, value, "--dry-run"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{option}: {err}");
        assert_eq!(err.lines().count(), 1, "{option}: {err}");
        assert!(err.contains(option), "{option} not named: {err}");
    }
    assert!(!a.exists() && !b.exists());
    // The environment still takes one value per line.
    let out = env
        .prestop(["drain"])
        .env("PRESTOP_TOUCH", &two)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(a.exists() && b.exists());
}

/// A lock file named to look like prestop's own lines, and command output with control
/// characters: text output escapes them, so no line is forged.
#[test]
fn no_name_or_output_forges_a_log_line() {
    let env = TestEnv::new();
    let forged = "x\nprestop: drained after 0.1s\n.lock";
    env.touch(&format!("lock/{forged}"));
    let out = env
        .prestop([
            "drain",
            "--wait-lock",
            "lock/*.lock",
            "--exec",
            "printf 'a\\033[2Kb\\rprestop: drained after 0.2s\\n'",
            "--grace-period",
            "2",
            "--reserve",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    for text in [stdout(&out), stderr(&out)] {
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("prestop: drained after 0.")),
            "a forged line:\n{text}"
        );
        assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
    }
    assert!(stdout(&out).contains("x\\nprestop: drained after 0.1s\\n.lock"));

    // `check` names the lock, and a dry run names what it cannot read.
    let hidden = env.path("locks2/d\nprestop: drained after 0.3s");
    fs::create_dir_all(&hidden).unwrap();
    for args in [
        &["check", "--wait-lock", "lock/*.lock"][..],
        &["drain", "--dry-run", "--wait-lock", "locks2/*/*.lock"],
    ] {
        let out = env.prestop(args).output().unwrap();
        let text = stdout(&out);
        assert!(
            !text
                .lines()
                .any(|l| l.contains("drained after 0.")
                    && !l.contains("\\nprestop: drained after 0.")),
            "a forged line:\n{text}"
        );
    }
}

/// A name that a viewer would show reordered (a right-to-left override) or broken across
/// lines (U+2028): escaped in text and in JSON.
#[test]
fn no_name_reorders_or_breaks_a_log_line() {
    let env = TestEnv::new();
    let hidden = [
        '\u{202e}', '\u{2028}', '\u{2029}', '\u{2066}', '\u{200f}', '\u{61c}',
    ];
    env.touch("lock/\u{202e}kcol.a\u{2028}prestop: drained after 0.1s\u{2029}\u{2066}\u{200f}\u{61c}.lock");
    for format in ["text", "json"] {
        let out = env
            .prestop([
                "drain",
                "--wait-lock",
                "lock/*.lock",
                "--log-format",
                format,
                "--grace-period",
                "2",
                "--reserve",
                "1",
            ])
            .output()
            .unwrap();
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(!text.contains(hidden), "{format}: {text:?}");
        for c in hidden {
            // `\u{202e}` in text, `\u202e` in JSON.
            let code = format!("{:x}", u32::from(c));
            let escaped = match format {
                "text" => format!("\\u{{{code}}}"),
                _ => format!("\\u{code:0>4}"),
            };
            assert!(text.contains(&escaped), "{format}: {escaped} not in {text}");
        }
    }
}

/// Every bad value is one line naming the option: not UTF-8 (as an argument or from the
/// environment), a negative duration that looks like a flag.
#[test]
fn every_bad_value_is_one_line_naming_the_option() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::new();
    let not_utf8 = std::ffi::OsStr::from_bytes(b"3\xff0");
    let cases: Vec<(Command, &str)> = vec![
        (
            {
                let mut c = env.prestop(["drain", "--grace-period"]);
                c.arg(not_utf8);
                c
            },
            "--grace-period",
        ),
        (
            {
                let mut c = env.prestop(["drain"]);
                c.env("PRESTOP_RESERVE", not_utf8);
                c
            },
            "--reserve",
        ),
        (
            {
                let mut c = env.prestop(["drain", "--wait-lock"]);
                c.arg(not_utf8);
                c
            },
            "--wait-lock",
        ),
        (
            env.prestop(["rehearse", "--after", "-1s", "--", "true"]),
            "--after",
        ),
        (
            env.prestop(["rehearse", "--stop-signal", "-9", "--", "true"]),
            "--stop-signal",
        ),
        // Shell glob syntax that this dialect would read literally, matching nothing.
        (
            env.prestop(["drain", "--wait-lock", "/tmp/*.{lock,pid}"]),
            "--wait-lock",
        ),
        (
            env.prestop(["check", "--wait-lock", "/tmp/[^a]*.lock"]),
            "--wait-lock",
        ),
        (
            env.prestop(["rehearse", "--pid-namespace", "--", "/nonexistent/app"]),
            "APP",
        ),
        (
            {
                let mut c = env.prestop(["demo"]);
                c.env("TMPDIR", "/tmp/x\ny");
                c
            },
            "TMPDIR",
        ),
        (
            env.prestop(["drain\rprestop: drained\u{1b}[2J"]),
            "unrecognized subcommand",
        ),
    ];
    for (mut cmd, option) in cases {
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{option}: {err}");
        assert_eq!(err.lines().count(), 1, "{option}: {err}");
        assert!(err.contains(option), "{option} not named: {err}");
        assert!(!err.contains(['\r', '\u{1b}']), "{option}: {err:?}");
    }
}

/// Validate before acting: a `--touch` that is a FIFO or a directory, a `--log-target` that
/// is a directory or a FIFO: exit 2, and nothing done.
#[test]
fn paths_that_cannot_work_are_refused_before_anything_is_done() {
    let env = TestEnv::new();
    let fifo = env.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let dir = env.path("dir");
    fs::create_dir(&dir).unwrap();
    let echo = SignalEcho::start(false);
    let pid = echo.pid().to_string();
    let sentinel = env.path("sentinel");
    let (loop1, loop2) = (env.path("loop1"), env.path("loop2"));
    std::os::unix::fs::symlink(&loop1, &loop2).unwrap();
    std::os::unix::fs::symlink(&loop2, &loop1).unwrap();
    let dangling = env.path("dangling");
    std::os::unix::fs::symlink(env.path("nowhere/x"), &dangling).unwrap();
    let slash = env.path("new/");
    for (option, value) in [
        ("--touch", &fifo),
        ("--touch", &dir),
        ("--touch", &loop1),
        ("--touch", &dangling),
        ("--touch", &slash),
        ("--log-target", &dir),
        ("--log-target", &fifo),
        ("--log-target", &slash),
    ] {
        let out = env
            .prestop([
                "drain",
                "--touch",
                sentinel.to_str().unwrap(),
                "--signal",
                "USR1",
                "--signal-target",
                &pid,
                option,
                value.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{option} {value:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(option), "{err}");
    }
    assert!(!sentinel.exists());
    assert!(echo.collect(Duration::from_millis(200)).is_empty());
}

/// A pidfile that leads to a secret: the error says what shape the content has, never what
/// it is.
#[test]
fn a_pidfile_error_never_shows_what_the_file_holds() {
    let env = TestEnv::new();
    let secret = env.path("secret");
    fs::write(&secret, "hunter2-password\n").unwrap();
    let link = env.path("app.pid");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let target = format!("pidfile:{}", link.display());
    for option in ["--wait-pid", "--signal-target"] {
        let mut args = vec!["drain", option, &target];
        if option == "--signal-target" {
            args.extend(["--signal", "USR1"]);
        }
        let out = env.prestop(&args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("other than digits"), "{err}");
    }
}

/// Binary garbage in the state file is replaced under the lock, so the next delivery of the
/// same hook does not run the stop actions again.
#[test]
fn a_garbage_state_file_is_replaced() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let args = [
        "drain",
        "--signal",
        "USR1",
        "--signal-target",
        &echo.pid().to_string(),
        "--grace-period",
        "30",
    ];
    let run = || {
        let out = env.prestop(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    };
    run();
    assert_eq!(echo.collect(Duration::from_millis(300)), ["USR1"]);
    let state = state_file(&env.state_dir());
    fs::write(&state, [0xff, 0xfe, 0x00, 0x9c, b'\n', 0x80]).unwrap();
    run();
    assert_eq!(
        echo.collect(Duration::from_millis(300)),
        ["USR1"],
        "an unreadable record means a new termination"
    );
    run();
    assert!(
        echo.collect(Duration::from_millis(300)).is_empty(),
        "the record was not replaced: the stop actions ran again"
    );
}

fn state_file(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "state"))
        .expect("a state file")
}

// ---------------------------------------------------------------------------------------
// What real pods and rehearsals showed
// ---------------------------------------------------------------------------------------

/// An app that exits because of the hook's signal: graceful every time, whichever exit is
/// seen first, with what a pod would do on the timeline.
#[test]
fn a_rehearsal_verdict_does_not_depend_on_which_exit_is_seen_first() {
    let env = TestEnv::new();
    for run in 0..10 {
        let out = env
            .prestop([
                "rehearse",
                "--signal",
                "INT",
                "--wait-pid",
                "1",
                "--after",
                "100ms",
                "--grace-period",
                "10",
                "--",
                "sleep",
                "60",
            ])
            .output()
            .unwrap();
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "run {run}: {log}");
        assert!(log.contains("Verdict: graceful"), "run {run}: {log}");
        assert!(
            log.contains("hook killed with the container, as in a pod"),
            "run {run}: {log}"
        );
    }
}

/// In a PID namespace the app's exit kills the hook for real: the verdict says so, and
/// does not blame a budget that never ran out.
#[test]
fn a_pid_namespace_rehearsal_blames_no_budget_when_the_app_exits() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    let out = env
        .prestop([
            "rehearse",
            "--pid-namespace",
            "--signal",
            "TERM",
            "--wait-pid",
            "1",
            "--after",
            "300ms",
            "--grace-period",
            "10",
            "--",
            "bash",
            "-c",
            // PID 1 of a namespace gets only the signals it handles.
            "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done",
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(!log.contains("budget ran out"), "{log}");
    assert!(log.contains("FailedPreStopHook"), "{log}");
}

/// A pidfile is read when it is used: the app writes it after the options are checked, and
/// a missing one at hook time means the process is gone (for a wait) or a failed action
/// (for a signal); a dry run notes it.
#[test]
fn a_pidfile_is_read_when_it_is_used() {
    let env = TestEnv::new();
    let pidfile = env.path("run/app.pid");
    fs::create_dir_all(pidfile.parent().unwrap()).unwrap();
    let script = format!(
        "echo $$ > {p}; trap 'rm -f {p}; exit 0' TERM; while :; do sleep 1 & wait $!; done",
        p = pidfile.display()
    );
    let target = format!("pidfile:{}", pidfile.display());
    let out = env
        .prestop([
            "rehearse",
            "--signal",
            "TERM",
            "--signal-target",
            &target,
            "--wait-pid",
            &target,
            "--after",
            "500ms",
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

    // At hook time there is no pidfile: gone for the wait, a failed action for the signal.
    let out = env
        .prestop(["drain", "--wait-pid", &target])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the pidfile is gone"),
        "{}",
        stderr(&out)
    );
    let out = env
        .prestop(["drain", "--signal", "USR1", "--signal-target", &target])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = env
        .prestop(["drain", "--dry-run", "--wait-pid", &target])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("no pidfile yet"), "{}", stdout(&out));
}

// ---------------------------------------------------------------------------------------
// Blind spots: where prestop could not see, and said "drained"
// ---------------------------------------------------------------------------------------

/// Runs `prestop ARGS` as nobody (a public copy of the binary, no state dir inherited).
fn as_nobody(prestop: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(prestop);
    cmd.uid(65534).gid(65534).args(args).stdin(Stdio::null());
    cmd.env_remove("PRESTOP_STATE_DIR");
    cmd.output().unwrap()
}

/// A directory under a `*` part that can be listed but not entered (`r--` for the hook's
/// user): whether it holds locks cannot be seen, so the glob is unknown, as it is for a
/// literal part; and a symlink under `*` into a private directory likewise.
#[test]
fn a_directory_listed_but_not_entered_is_unknown() {
    if !can_switch_user() {
        eprintln!("skipped: needs root to run the hook as another user");
        return;
    }
    let env = TestEnv::new();
    let prestop = public_copy(&env);
    env.touch("srv/jobs/a/1.lock");
    env.touch("private/q/1.lock");
    fs::create_dir_all(env.path("links")).unwrap();
    std::os::unix::fs::symlink(env.path("private/q"), env.path("links/q")).unwrap();
    for (dir, mode) in [
        ("srv", 0o755),
        ("srv/jobs", 0o744),
        ("srv/jobs/a", 0o755),
        ("private", 0o700),
        ("links", 0o755),
    ] {
        fs::set_permissions(env.path(dir), fs::Permissions::from_mode(mode)).unwrap();
    }
    for glob in ["srv/jobs/*/*.lock", "links/*/*.lock"] {
        let glob = env.path(glob);
        let out = as_nobody(&prestop, &["check", "--wait-lock", glob.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{glob:?}: {}", stdout(&out));
        assert!(
            stdout(&out).contains(": unknown (") && stdout(&out).contains("(EACCES)"),
            "{}",
            stdout(&out)
        );
    }
}

/// Lock files and directories whose names are not UTF-8 are locks like any other.
#[test]
fn a_lock_whose_name_is_not_utf8_is_still_a_lock() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::new();
    let name = |bytes: &[u8]| std::ffi::OsStr::from_bytes(bytes).to_owned();
    fs::create_dir_all(env.path("u")).unwrap();
    fs::write(env.path("u").join(name(b"\xff.lock")), "").unwrap();
    let odd_dir = env.path("u2").join(name(b"\xfe"));
    fs::create_dir_all(&odd_dir).unwrap();
    fs::write(odd_dir.join("job.lock"), "").unwrap();
    for glob in ["u/*.lock", "u2/*/*.lock", "u2/**/*.lock"] {
        let out = env
            .prestop(["check", "--wait-lock", glob])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{glob}: {}", stdout(&out));
        assert!(stdout(&out).contains("1 in flight"), "{}", stdout(&out));
    }
}

/// A process whose main thread has exited while another thread works on: a zombie leader
/// with work in flight. It runs until its last thread ends, and the drain waits for that.
#[test]
fn a_process_whose_main_thread_exited_is_still_running() {
    let env = TestEnv::new();
    let done = env.path("done");
    let script = "import ctypes, sys, threading, time\n\
                  def work():\n    time.sleep(2)\n    open(sys.argv[1], 'w').close()\n\
                  threading.Thread(target=work).start()\n\
                  print('ready', flush=True)\n\
                  ctypes.CDLL(None).pthread_exit(None)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .arg(&done)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut app = Guard::spawn(&mut cmd);
    let lines = common::lines_of(app.child().stdout.take().unwrap());
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(10)).unwrap(),
        "ready"
    );
    let pid = app.id().to_string();
    let out = env.prestop(["check", "--wait-pid", &pid]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("running"), "{}", stdout(&out));
    let out = env
        .prestop(["drain", "--wait-pid", &pid, "--grace-period", "30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        done.exists(),
        "drained before the last thread's work was done"
    );
}

/// Under `hidepid=2`, another user's process is hidden from the hook: a PID whose pidfd says
/// it runs, and a name that may match hidden processes, are unknown, never exited.
#[test]
fn a_process_hidden_by_hidepid_is_unknown() {
    if !can_unshare() || !can_switch_user() {
        eprintln!("skipped: needs root for namespaces and another user");
        return;
    }
    let env = TestEnv::new();
    let prestop = public_copy(&env);
    let nobody = format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups {}",
        prestop.display()
    );
    let script = format!(
        "mount -t proc -o hidepid=2 proc /proc; sleep 30 & S=$!; \
         {nobody} check --wait-pid $S; echo rc=$?; \
         {nobody} check --wait-pid name:sleep; echo rc=$?; kill $S"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(text.matches("rc=1").count(), 2, "{text}{}", stderr(&out));
    assert!(text.contains("/proc hides it"), "{text}");
    assert!(
        text.contains("hidepid=invisible") || text.contains("hidepid=2"),
        "{text}"
    );
}

/// A PID namespace that still sees its parent's `/proc`: PIDs there name other processes
/// than the same numbers do here, so a name cannot be looked up, and no one is signalled.
#[test]
fn a_proc_of_another_pid_namespace_is_refused() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    let echo = SignalEcho::start_named("hostile-bystander", false);
    let script = format!(
        "{p} check --wait-pid name:hostile-bystander; echo rc=$?; \
         {p} drain --state-dir {s} --log-target stderr --signal KILL \
         --signal-target name:hostile-bystander; echo rc=$?",
        p = common::bin().display(),
        s = env.state_dir().display()
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.contains("another PID namespace"), "{text}");
    assert!(text.contains("rc=1") && text.contains("rc=3"), "{text}");
    assert!(echo.collect(Duration::from_millis(300)).is_empty());
    let mut echo = echo;
    assert!(
        echo.guard.child().try_wait().unwrap().is_none(),
        "signalled"
    );
}

/// A symlinked directory on the glob's path swapped for another (an atomic deploy), with a
/// lock in the new one: the drain's last look before "drained" finds it.
#[test]
fn a_swapped_symlink_on_the_glob_path_is_seen() {
    let env = TestEnv::new();
    env.touch("app/r1/lock/a.lock");
    fs::create_dir_all(env.path("app/r2/lock")).unwrap();
    std::os::unix::fs::symlink("r1", env.path("app/current")).unwrap();
    let mut drain = Running::spawn(&mut env.prestop([
        "drain",
        "--wait-lock",
        "app/current/lock/*.lock",
        "--grace-period",
        "30",
        "--progress-interval",
        "100ms",
    ]));
    drain.wait_for("draining, budget");
    env.touch("app/r2/lock/b.lock");
    std::os::unix::fs::symlink("r2", env.path("app/next")).unwrap();
    fs::rename(env.path("app/next"), env.path("app/current")).unwrap();
    fs::remove_file(env.path("app/r1/lock/a.lock")).unwrap();
    drain.wait_for("b.lock");
    fs::remove_file(env.path("app/r2/lock/b.lock")).unwrap();
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
}

// ---------------------------------------------------------------------------------------
// Never past the deadline, whatever the hook's children and readers do
// ---------------------------------------------------------------------------------------

/// Waits up to `limit` for the child to exit; its exit code. The guard kills it otherwise.
fn exit_within(guard: &mut Guard, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = guard.child().try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < end, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An `--exec` command that leaves its process group and ignores SIGTERM is still killed
/// at the deadline; the hook ends then (its budget is 2 s; 2 s more for a loaded machine).
#[test]
fn an_exec_that_leaves_its_group_is_killed_at_the_deadline() {
    let env = TestEnv::new();
    let script = env.path("escape.py");
    fs::write(
        &script,
        "import os, signal\n\
         os.setpgid(0, os.getpgid(os.getppid()))\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         while True:\n    signal.pause()\n",
    )
    .unwrap();
    let exec = format!("python3 {}", script.display());
    let mut cmd = env.prestop([
        "drain",
        "--exec",
        &exec,
        "--grace-period",
        "3",
        "--reserve",
        "1",
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut hook = Guard::spawn(&mut cmd);
    assert_eq!(exit_within(&mut hook, Duration::from_secs(4)), Some(3));
}

/// `--exec yes` floods the log of a hook whose stdout and stderr are `output()` (nobody
/// reads them): lines are dropped, and the hook, its budget 2 s, ends by 4 s, logging to
/// either.
fn flood_unread(env: &TestEnv, output: &dyn Fn() -> (Stdio, Stdio)) {
    for target in ["stderr", "stdout"] {
        let state = env.path(&format!("state-{target}"));
        let mut cmd = env.prestop([
            "drain",
            "--state-dir",
            state.to_str().unwrap(),
            "--exec",
            "yes",
            "--log-target",
            target,
            "--grace-period",
            "3",
            "--reserve",
            "1",
        ]);
        let (stdout, stderr) = output();
        cmd.stdout(stdout).stderr(stderr);
        let mut hook = Guard::spawn(&mut cmd);
        // Only the hook holds the unread end now.
        drop(cmd);
        assert_eq!(
            exit_within(&mut hook, Duration::from_secs(4)),
            Some(3),
            "log to {target}"
        );
    }
}

/// The hook's stderr or stdout a pipe that nobody reads: both stay open and unread until
/// the hook has exited.
#[test]
fn an_unread_log_pipe_cannot_hold_the_hook() {
    flood_unread(&TestEnv::new(), &|| (Stdio::piped(), Stdio::piped()));
}

/// The hook's stdout and stderr a terminal nobody reads (a stopped `kubectl exec -t`,
/// Ctrl-S): writes to it cannot block.
#[test]
fn an_unread_terminal_cannot_hold_the_hook() {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = pty.slave;
    flood_unread(&TestEnv::new(), &|| {
        (
            slave.try_clone().unwrap().into(),
            slave.try_clone().unwrap().into(),
        )
    });
    drop(pty.master);
}

/// A rehearsal ends what its hook's `--exec` started, when the app exits during the hook and
/// when it is interrupted. Run in a PID namespace, to look at every process left.
#[test]
fn a_rehearsal_leaves_nothing_running() {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    // Every process's command line but the shell's own (PID 1, whose script names them).
    let script = format!(
        "running() {{ for c in /proc/[0-9]*/cmdline; do [ $c = /proc/1/cmdline ] && continue; \
         tr '\\0' ' ' < $c 2>/dev/null; echo; done; }}; \
         {p} rehearse --exec 'sleep 301' --after 300ms --grace-period 10 -- sleep 1 \
         2>/dev/null; {p} rehearse --exec 'sleep 302' --after 300ms --grace-period 10 \
         -- sleep 100 2>/dev/null & R=$!; \
         n=0; until running | grep -q 'sleep 302 $' || [ $n -gt 200 ]; do \
         n=$((n+1)); sleep 0.05; done; \
         kill -INT $R; wait $R; echo rc=$?; running",
        p = common::bin().display()
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.contains("rc=130"), "{text}{}", stderr(&out));
    assert!(
        !text
            .lines()
            .any(|l| l.ends_with("sleep 301 ") || l.ends_with("sleep 302 ")),
        "left running:\n{text}"
    );
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not found"))
}
