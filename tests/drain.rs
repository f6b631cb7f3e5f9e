//! `prestop drain` end to end: real binary, real files, real processes, real signals.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Guard, Running, SignalEcho, TestEnv, can_unshare, stderr, stdout, timed};

#[test]
fn exits_0_right_after_the_last_lock_is_removed() {
    let env = TestEnv::new();
    let a = env.touch("lock/a.lock");
    let b = env.touch("lock/b.lock");
    env.touch("lock/unrelated.txt");
    let mut hook = env.prestop([
        "drain",
        "--wait-lock",
        "lock/*.lock",
        "--grace-period",
        "30",
    ]);
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let guard = Guard::spawn(&mut hook);
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(a).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(b).unwrap();
    let removed = start.elapsed();
    let out = guard.wait_output();
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(took >= removed, "returned before the last lock went");
    assert!(took < removed + Duration::from_secs(2), "took {took:?}");
    assert!(
        stdout(&out).starts_with("prestop: drained after "),
        "{}",
        stdout(&out)
    );
    let log = stderr(&out);
    assert!(
        log.contains("prestop: draining, budget 25s (grace 30s, reserve 5s)"),
        "{log}"
    );
    assert!(log.contains("drained after"), "{log}");
}

#[test]
fn exits_1_at_grace_minus_reserve_naming_each_remaining_lock() {
    let env = TestEnv::new();
    env.touch("lock/a.lock");
    env.touch("lock/b.lock");
    let (out, took) = timed(env.prestop([
        "drain",
        "--wait-lock",
        "lock/*.lock",
        "--grace-period",
        "3",
        "--reserve",
        "1500ms",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        took >= Duration::from_millis(1500),
        "returned early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "overran the deadline: {took:?}"
    );
    let summary = stdout(&out);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(
        summary.contains("budget exhausted after 1.5s: 2 still in flight"),
        "{summary}"
    );
    for lock in ["a.lock", "b.lock"] {
        let path = env.path("lock").join(lock);
        assert!(
            summary.contains(&format!("lock {}", path.display())),
            "{summary}"
        );
    }
}

#[test]
fn a_lock_in_a_directory_that_appears_later_is_waited_for() {
    let env = TestEnv::new();
    let mut hook = env.prestop([
        "drain",
        "--wait-lock",
        "jobs/*/run/*.lock",
        "--min-wait",
        "700ms",
        "--progress-interval",
        "300ms",
        "--grace-period",
        "20",
    ]);
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let guard = Guard::spawn(&mut hook);
    std::thread::sleep(Duration::from_millis(200));
    let lock = env.touch("jobs/7/run/job.lock");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(lock.exists());
    fs::remove_file(&lock).unwrap();
    let removed = start.elapsed();
    let out = guard.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(start.elapsed() >= removed);
    let log = stderr(&out);
    assert!(
        log.contains(&format!("1 in flight (lock {})", lock.display())),
        "{log}"
    );
}

#[test]
fn a_waited_on_process_that_is_not_our_child_exits() {
    let env = TestEnv::new();
    let sleeper = Guard::spawn(Command::new("sleep").arg("30"));
    let mut hook = env.prestop(["drain", "--wait-pid", &sleeper.id().to_string()]);
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let hook = Guard::spawn(&mut hook);
    std::thread::sleep(Duration::from_millis(500));
    drop(sleeper); // kill and reap
    let killed = start.elapsed();
    let out = hook.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(start.elapsed() >= killed);
    assert!(start.elapsed() < killed + Duration::from_secs(2));
}

#[test]
fn a_zombie_counts_as_exited() {
    let env = TestEnv::new();
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    // Not reaped: it stays a zombie until `wait` below.
    let stat = format!("/proc/{pid}/stat");
    let end = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string(&stat).unwrap().contains(") Z ") {
        assert!(Instant::now() < end, "child never became a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (out, took) = timed(env.prestop(["drain", "--wait-pid", &pid.to_string()]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2));
    child.wait().unwrap();
}

#[test]
fn a_process_that_is_already_gone_is_drained() {
    let env = TestEnv::new();
    let pidfile = env.path("gone.pid");
    let mut child = Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    fs::write(&pidfile, format!("{}\n", child.id())).unwrap();
    let arg = format!("pidfile:{}", pidfile.display());
    let out = env.prestop(["drain", "--wait-pid", &arg]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn signal_reaches_a_pid_target() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let pid = echo.pid().to_string();
    let out = env
        .prestop(["drain", "--signal", "USR1", "--signal-target", &pid])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("sent SIGUSR1 to pid {pid}")));
    assert_eq!(echo.collect(Duration::from_millis(500)), ["USR1"]);
}

#[test]
fn signal_reaches_a_pidfile_target() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let pidfile = env.path("app.pid");
    fs::write(&pidfile, format!("{}\n", echo.pid())).unwrap();
    let target = format!("pidfile:{}", pidfile.display());
    let out = env
        .prestop(["drain", "--signal", "SIGTSTP", "--signal-target", &target])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(echo.collect(Duration::from_millis(500)), ["TSTP"]);
}

#[test]
fn signal_reaches_every_process_of_a_name_target() {
    let env = TestEnv::new();
    let name = format!("echo-{}", std::process::id());
    let first = SignalEcho::start_named(&name, false);
    let second = SignalEcho::start_named(&name, false);
    let bystander = SignalEcho::start(false);
    let target = format!("name:{name}");
    let out = env
        .prestop(["drain", "--signal", "12", "--signal-target", &target])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(first.collect(Duration::from_millis(500)), ["USR2"]);
    assert_eq!(second.collect(Duration::from_millis(100)), ["USR2"]);
    assert!(bystander.collect(Duration::from_millis(100)).is_empty());
}

#[test]
fn stop_actions_run_in_order_touch_signal_exec_then_wait() {
    let env = TestEnv::new();
    let steps = env.path("steps.log");
    let sentinel = env.path("draining");
    let lock = env.touch("lock/job.lock");
    // The app records whether the sentinel existed when the signal arrived.
    let script = format!(
        "trap 'if [ -e {s} ]; then echo signal-after-touch >> {l}; else echo signal-before-touch >> {l}; fi' USR1; \
         echo ready; while :; do sleep 30 & wait $!; done",
        s = sentinel.display(),
        l = steps.display()
    );
    let mut app = Command::new("bash");
    app.args(["-c", &script]).stdout(Stdio::piped());
    let mut app = Guard::spawn(&mut app);
    let ready = common::lines_of(app.child().stdout.take().unwrap());
    assert_eq!(ready.recv_timeout(Duration::from_secs(5)).unwrap(), "ready");
    // The app writes its line from a signal handler, a moment after the signal: the exec
    // gives it up to 5 s to appear. Were the exec run before the signal, prestop could not
    // send the signal while the exec waits, and the line would never come.
    let exec = format!(
        "sh -c 'for i in $(seq 500); do grep -q signal {l} && break; sleep 0.01; done; \
         echo exec >> {l}; rm {lock}; echo done-by-exec'",
        l = steps.display(),
        lock = lock.display()
    );
    let out = env
        .prestop([
            "drain",
            "--touch",
            sentinel.to_str().unwrap(),
            "--signal",
            "USR1",
            "--signal-target",
            &app.id().to_string(),
            "--exec",
            &exec,
            "--wait-lock",
            lock.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(sentinel.exists());
    assert_eq!(
        fs::read_to_string(&steps).unwrap(),
        "signal-after-touch\nexec\n"
    );
    common::assert_in_order(
        &stderr(&out),
        &[
            "touched ",
            "sent SIGUSR1",
            "running sh -c",
            "done-by-exec",
            "exited 0",
            "waiting for lock",
            "drained after",
        ],
    );
}

#[test]
fn a_failed_stop_action_still_drains_and_exits_3() {
    let env = TestEnv::new();
    let out = env.prestop(["drain", "--exec", "false"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 stop action(s) failed: exec false: exit status 1"));

    let out = env
        .prestop([
            "drain",
            "--signal",
            "USR1",
            "--signal-target",
            "name:no-such-process-xyz",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn exec_is_bounded_by_the_budget() {
    let env = TestEnv::new();
    let (out, took) = timed(env.prestop([
        "drain",
        "--exec",
        "sleep 30",
        "--grace-period",
        "2",
        "--reserve",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(stdout(&out).contains("still running at the deadline, killed"));
}

#[test]
fn min_wait_holds_the_hook_even_when_drained() {
    let env = TestEnv::new();
    let (out, took) = timed(env.prestop(["drain", "--min-wait", "800ms"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn quiet_for_needs_drained_to_hold() {
    let env = TestEnv::new();
    let lock = env.touch("lock/a.lock");
    let mut hook = env.prestop(["drain", "--wait-lock", "lock/*.lock", "--quiet-for", "1s"]);
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let guard = Guard::spawn(&mut hook);
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(&lock).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    env.touch("lock/b.lock"); // a new job starts: not quiet yet
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(env.path("lock/b.lock")).unwrap();
    let last = start.elapsed();
    let out = guard.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let took = start.elapsed();
    assert!(
        took >= last + Duration::from_millis(950),
        "{took:?} vs {last:?}"
    );
}

#[test]
fn an_interrupt_while_waiting_exits_128_plus_n() {
    let env = TestEnv::new();
    env.touch("lock/a.lock");
    let mut hook = Running::spawn(&mut env.prestop(["drain", "--wait-lock", "lock/*.lock"]));
    // Its first line comes once the signal mask is in place: a signal before it would kill
    // the hook outright instead of ending its wait.
    hook.wait_for("prestop: draining, budget");
    hook.guard.signal(nix::sys::signal::Signal::SIGINT);
    let (code, stdout, log) = hook.finish();
    assert_eq!(code, Some(130), "{log}");
    assert!(stdout.contains("interrupted by SIGINT"), "{stdout}");
}

#[test]
fn progress_lines_name_what_is_in_flight() {
    let env = TestEnv::new();
    let lock = env.touch("lock/a.lock");
    let out = env
        .prestop([
            "drain",
            "--wait-lock",
            "lock/*.lock",
            "--progress-interval",
            "200ms",
            "--grace-period",
            "2",
            "--reserve",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = stderr(&out);
    let progress = format!("waiting: 1 in flight (lock {})", lock.display());
    assert!(log.matches(&progress).count() >= 2, "{log}");
    assert!(log.contains("s elapsed, "), "{log}");
}

#[test]
fn options_read_their_environment_variables() {
    let env = TestEnv::new();
    env.touch("a/x.lock");
    env.touch("b/y.lock");
    let mut cmd = env.prestop(["drain"]);
    cmd.env("PRESTOP_GRACE_PERIOD", "2")
        .env("PRESTOP_RESERVE", "1")
        .env("PRESTOP_WAIT_LOCK", "a/*.lock\nb/*.lock")
        .env("PRESTOP_LOG_FORMAT", "json");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["event"], "exhausted");
    assert_eq!(summary["in_flight_count"], 2);
    assert_eq!(summary["exit_code"], 1);
}

#[test]
fn json_lines_parse_one_by_one() {
    let env = TestEnv::new();
    let log = env.path("hook.log");
    let echo = SignalEcho::start(false);
    let out = env
        .prestop([
            "drain",
            "--log-format",
            "json",
            "--log-target",
            log.to_str().unwrap(),
            "--signal",
            "USR1",
            "--signal-target",
            &echo.pid().to_string(),
            "--exec",
            "echo \"quoted\" output",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = fs::read_to_string(&log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "start",
            "signal",
            "exec",
            "exec_output",
            "exec_done",
            "drained"
        ]
    );
    assert_eq!(events[1]["pid"], echo.pid());
    assert_eq!(
        events[3]["message"],
        "echo \"quoted\" output: quoted output"
    );
    for e in &events {
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }
}

#[test]
fn dry_run_prints_the_plan_and_does_nothing() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let sentinel = env.path("draining");
    env.touch("lock/a.lock");
    let out = env
        .prestop([
            "drain",
            "--dry-run",
            "--touch",
            sentinel.to_str().unwrap(),
            "--signal",
            "TSTP",
            "--signal-target",
            &echo.pid().to_string(),
            "--exec",
            "true",
            "--wait-lock",
            "lock/*.lock",
            "--grace-period",
            "300",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout(&out);
    assert!(
        plan.contains("budget:    295s (grace 300s - reserve 5s)"),
        "{plan}"
    );
    assert!(plan.contains("1. touch "), "{plan}");
    assert!(
        plan.contains(&format!("2. send SIGTSTP to pid {}", echo.pid())),
        "{plan}"
    );
    assert!(plan.contains("3. run true"), "{plan}");
    assert!(plan.contains("(now: 1 in flight)"), "{plan}");
    assert!(!sentinel.exists());
    assert!(echo.collect(Duration::from_millis(300)).is_empty());
    assert!(
        !env.state_dir().exists(),
        "a dry run must not create the state dir"
    );
}

#[test]
fn exec_commands_start_with_no_signal_blocked() {
    let env = TestEnv::new();
    let out = env
        .prestop(["drain", "--exec", "grep SigBlk /proc/self/status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        // The tab comes escaped: no command's output can break or forge a log line.
        stderr(&out).contains("SigBlk:\\t0000000000000000"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn stop_after_holds_the_stop_actions() {
    let env = TestEnv::new();
    let echo = SignalEcho::start(false);
    let mut hook = env.prestop([
        "drain",
        "--stop-after",
        "700ms",
        "--signal",
        "USR1",
        "--signal-target",
        &echo.pid().to_string(),
    ]);
    hook.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let guard = Guard::spawn(&mut hook);
    let line = echo.lines.recv_timeout(Duration::from_secs(5)).unwrap();
    let arrived = start.elapsed();
    assert_eq!(line, "USR1");
    assert!(arrived >= Duration::from_millis(700), "{arrived:?}");
    assert!(arrived < Duration::from_secs(3), "{arrived:?}");
    let out = guard.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("holding the stop actions for 0.7s"));
}

#[test]
fn what_an_exec_command_leaves_running_is_killed_with_it() {
    let env = TestEnv::new();
    let marker = format!("prestop-exec-marker-{}", std::process::id());
    let exec = format!("bash -c '(exec -a {marker} sleep 30) & sleep 30'");
    let (out, took) = timed(env.prestop([
        "drain",
        "--exec",
        &exec,
        "--grace-period",
        "2",
        "--reserve",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(took < Duration::from_millis(1500), "{took:?}");
    std::thread::sleep(Duration::from_millis(100));
    let left: Vec<_> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&marker)
        })
        .collect();
    assert!(left.is_empty(), "left running after the hook");
}

/// The PID a stop signal was aimed at is reused by another process before the signal goes
/// out (`--stop-after` holds it): that process must not get it. The reuse is forced inside a
/// fresh PID namespace by writing the PID before it to `ns_last_pid`, so the newcomer gets
/// exactly the old PID; the test fails if it does not, as it would then prove nothing.
fn a_reused_pid_is_not_signalled(target: &str) {
    if !can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let env = TestEnv::new();
    let script = r#"
        set -u
        sleep 60 & victim=$!
        echo "$victim" > "$DIR/app.pid"
        target=${TARGET/@PID@/$victim}
        target=${target/@DIR@/$DIR}
        $RUNNER "$PRESTOP" drain --stop-after 2s --signal USR1 --signal-target "$target" \
            --state-dir "$DIR/state" --log-target stderr 2> "$DIR/hook.log" &
        hook=$!
        for _ in $(seq 1000); do
            grep -q 'holding the stop actions' "$DIR/hook.log" && break
            sleep 0.01
        done
        kill -9 "$victim"; wait "$victim" 2> /dev/null
        echo $((victim - 1)) > /proc/sys/kernel/ns_last_pid
        bash -c 'trap "echo got USR1 > $DIR/newcomer.log" USR1; echo $$ > $DIR/newcomer.pid;
                 while :; do sleep 1 & wait $!; done' &
        newcomer=$!
        wait "$hook"; echo "hook exit $?" >> "$DIR/hook.log"
        sleep 0.2
        echo "victim $victim newcomer $newcomer"
        kill -9 "$newcomer"
    "#;
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "bash", "-c", script])
        .env("DIR", env.dir.path())
        .env("PRESTOP", common::bin())
        .env(
            "RUNNER",
            std::env::var_os("PRESTOP_TEST_RUNNER").unwrap_or_default(),
        )
        .env("TARGET", target)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = stdout(&out);
    let log = fs::read_to_string(env.path("hook.log")).unwrap_or_default();
    let pids: Vec<&str> = said
        .lines()
        .find(|l| l.starts_with("victim "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        pids.len() == 4 && pids[1] == pids[3],
        "the PID was not reused, so the test proves nothing: {said} {}\n{log}",
        stderr(&out)
    );
    assert!(
        !env.path("newcomer.log").exists(),
        "the process that took the PID got the signal\n{log}"
    );
    assert!(log.contains("hook exit 3"), "{log}");
    assert!(!log.contains("sent SIGUSR1"), "{log}");
}

#[test]
fn a_reused_pid_is_not_signalled_for_a_pid_target() {
    a_reused_pid_is_not_signalled("@PID@");
}

#[test]
fn a_reused_pid_is_not_signalled_for_a_pidfile_target() {
    a_reused_pid_is_not_signalled("pidfile:@DIR@/app.pid");
}

/// A variable set from a YAML `|` block ends in a newline, and may hold blank lines: those
/// are no values. Every value around them is kept, in order; on the command line an empty
/// value is still refused.
#[test]
fn a_variable_written_as_a_yaml_block_drops_its_blank_lines() {
    let env = TestEnv::new();
    let a = env.path("a");
    let b = env.path("b");
    let out = env
        .prestop(["drain", "--grace-period", "30"])
        .env(
            "PRESTOP_TOUCH",
            format!("{}\n\n{}\n", a.display(), b.display()),
        )
        .env("PRESTOP_EXEC", "true\n")
        .env("PRESTOP_WAIT_LOCK", "lock/*.lock\n")
        .env("PRESTOP_WAIT_CONNS", "1\n\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(a.exists() && b.exists(), "{}", stderr(&out));

    let plan = env
        .prestop(["drain", "--dry-run"])
        .env("PRESTOP_WAIT_PID", "4242\n")
        .env("PRESTOP_HTTP", "POST http://127.0.0.1:9/drain\n")
        .env("PRESTOP_WAIT_HTTP", "\nhttp://127.0.0.1:9/drained\n")
        .output()
        .unwrap();
    let text = stdout(&plan);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
    for shown in ["pid 4242", "POST /drain", "http://127.0.0.1:9/drained"] {
        assert!(text.contains(shown), "{shown}:\n{text}");
    }

    let empty = env
        .prestop(["drain", "--touch", "", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(2));
    assert!(stderr(&empty).contains("--touch \"\": empty path"));
}

/// A switch set from its variable takes what people write in a manifest: `1`, `true`,
/// `yes`, `on`, and `0`, `false`, `no`, `off`, and nothing else.
#[test]
fn a_switch_from_its_variable_takes_one_or_yes() {
    let env = TestEnv::new();
    let marker = env.path("touched");
    let touch = marker.to_str().unwrap();
    for on in ["1", "true", "yes", "on"] {
        let out = env
            .prestop(["drain", "--touch", touch])
            .env("PRESTOP_DRY_RUN", on)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{on}: {}", stderr(&out));
        assert!(stdout(&out).contains("touch"), "{on}: {}", stdout(&out));
        assert!(!marker.exists(), "{on}: a dry run touched the file");
    }
    // Off: a real drain, which touches the file.
    for off in ["0", "false", "no", "off"] {
        let _ = fs::remove_file(&marker);
        // A state dir each: a second delivery would not touch again.
        let state = env.path(&format!("state-{off}"));
        let out = env
            .prestop(["drain", "--touch", touch, "--state-dir"])
            .arg(&state)
            .env("PRESTOP_DRY_RUN", off)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{off}: {}", stderr(&out));
        assert!(marker.exists(), "{off}: no real drain");
    }
    let _ = fs::remove_file(&marker);
    let out = env
        .prestop(["drain", "--touch", touch])
        .env("PRESTOP_DRY_RUN", "maybe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(!marker.exists());
}
