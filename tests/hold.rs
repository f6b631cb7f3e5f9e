//! `prestop hold`: real jobs under real lock files, killed for real, with real drains.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Guard, Running, TestEnv, lines_of, stderr, stdout, with_fd_limit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A lock directory and a state directory shared by `hold` and the drain.
struct Jobs {
    env: TestEnv,
    locks: PathBuf,
}

impl Jobs {
    fn new() -> Jobs {
        let env = TestEnv::new();
        let locks = env.path("lock");
        fs::create_dir_all(&locks).unwrap();
        Jobs { env, locks }
    }

    /// `prestop hold --lock-dir LOCKS -- COMMAND...`, sharing the test's state dir.
    fn hold(&self, command: &[&str]) -> Command {
        let mut cmd = self.env.prestop(["hold", "--lock-dir"]);
        cmd.arg(&self.locks).arg("--").args(command);
        cmd
    }

    fn glob(&self) -> String {
        format!("{}/*.lock", self.locks.display())
    }

    fn lock_files(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.locks)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// A drain of the test's state dir with nothing to wait for, held for a second (of a 2 s
    /// grace period), once it has begun.
    fn one_second_drain(&self) -> Running {
        let mut drain = Running::spawn(&mut self.env.prestop([
            "drain",
            "--grace-period",
            "2",
            "--reserve",
            "1",
            "--min-wait",
            "1s",
        ]));
        drain.wait_for("draining, budget");
        drain
    }

    /// Waits for the one lock file to name COMMAND's process; that process's PID.
    fn child_pid(&self) -> i32 {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            for path in self.lock_files() {
                let text = fs::read_to_string(&path).unwrap_or_default();
                if let Some(pid) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("child="))
                    .and_then(|rest| rest.split(' ').next())
                {
                    return pid.parse().unwrap();
                }
            }
            assert!(Instant::now() < end, "no lock file names its job");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Kills a held job's COMMAND when dropped: it runs in a process group of its own, which a
/// failing test's `Guard` (the `hold` process's group) would not reach.
struct KillJob(i32);

impl Drop for KillJob {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

fn gone(pid: i32) -> bool {
    // Reaped by `hold`, or a zombie of a parent that is gone too.
    kill(Pid::from_raw(pid), None).is_err()
        || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// A job killed outright (`hold` and its COMMAND, as the OOM killer or `kill -9` on the
/// group would) leaves its lock file: it is stale, the drain ends at once (not at the
/// deadline) and names it. A live job keeps the drain waiting until it ends.
#[test]
fn a_killed_jobs_lock_is_stale_and_a_live_one_is_waited_for() {
    let jobs = Jobs::new();
    let mut killed = Guard::spawn(&mut jobs.hold(&["sleep", "60"]));
    let child = jobs.child_pid();
    let _job = KillJob(child);
    let live_marker = jobs.env.path("live-done");
    let script = format!("sleep 2; touch {}", live_marker.display());
    let mut live = Guard::spawn(&mut jobs.hold(&["sh", "-c", &script]));
    let end = Instant::now() + Duration::from_secs(10);
    while jobs.lock_files().len() < 2 {
        assert!(Instant::now() < end, "the live job's lock never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both the wrapper and its job, at once: the lock file stays behind.
    kill(Pid::from_raw(killed.id() as i32), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    killed.child().wait().unwrap();
    assert_eq!(jobs.lock_files().len(), 2);

    let state = jobs.env.path("drain-state");
    let glob = jobs.glob();
    let out = jobs
        .env
        .prestop([
            "drain",
            "--wait-lock",
            &glob,
            "--grace-period",
            "60",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        live_marker.exists(),
        "drained before the live job ended:\n{log}"
    );
    assert_eq!(
        log.matches("stale lock").count(),
        1,
        "named once, by name:\n{log}"
    );
    assert!(
        log.contains(&format!("sleep.{}.lock", killed.id())),
        "{log}"
    );
    assert!(log.contains("is gone"), "{log}");
    assert_eq!(live.child().wait().unwrap().code(), Some(0));
}

/// A job whose lock appears while the drain watches (started against another state
/// directory, so not refused), then killed outright: the drain sees it stale at once, from
/// the exit of the processes its lock names, and ends.
#[test]
fn a_job_killed_during_the_drain_is_stale_at_once() {
    let jobs = Jobs::new();
    let mut drain = Running::spawn(&mut jobs.env.prestop([
        "drain",
        "--wait-lock",
        &jobs.glob(),
        "--grace-period",
        "60",
        "--min-wait",
        "1s",
        "--progress-interval",
        "100ms",
    ]));
    drain.wait_for("draining, budget");
    let mut cmd = jobs.hold(&["sleep", "60"]);
    cmd.env("PRESTOP_STATE_DIR", jobs.env.path("elsewhere"));
    let mut job = Guard::spawn(&mut cmd);
    let child = jobs.child_pid();
    let _job = KillJob(child);
    drain.wait_for("1 in flight");
    kill(Pid::from_raw(job.id() as i32), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(child), Signal::SIGKILL).unwrap();
    job.child().wait().unwrap();
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stale lock"), "{log}");
    assert_eq!(jobs.lock_files().len(), 1, "the killed job's file stays");
}

/// Every signal a supervisor sends reaches COMMAND once, through `hold`, which outlives
/// none of them itself: a job that echoes each signal it gets.
#[test]
fn every_forwarded_signal_reaches_the_job() {
    let jobs = Jobs::new();
    let script = "import signal, sys\n\
                  def echo(n, _):\n    print(signal.Signals(n).name, flush=True)\n    \
                  sys.exit(0) if n == signal.SIGTERM else None\n\
                  for s in ('HUP','INT','QUIT','USR1','USR2','ALRM','TSTP','TTIN','TTOU',\
                  'WINCH','CONT','TERM'):\n    signal.signal(getattr(signal, 'SIG' + s), echo)\n\
                  print('ready', flush=True)\n\
                  while True:\n    signal.pause()\n";
    let mut cmd = jobs.hold(&["python3", "-c", script]);
    cmd.stdout(Stdio::piped());
    let mut hold = Guard::spawn(&mut cmd);
    let lines = lines_of(hold.child().stdout.take().unwrap());
    let next = || lines.recv_timeout(Duration::from_secs(10)).unwrap();
    let _job = KillJob(jobs.child_pid());
    assert_eq!(next(), "ready");
    for signal in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGWINCH,
        Signal::SIGCONT,
        Signal::SIGTERM,
    ] {
        hold.signal(signal);
        assert_eq!(next(), signal.as_str(), "{signal} not forwarded");
    }
    let status = hold.child().wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(jobs.lock_files().is_empty(), "{:?}", jobs.lock_files());
}

/// `hold` exits as COMMAND did (its code, or 128+N) and removes the lock file on every
/// path: a normal exit, a failure, a signal, and `hold` itself told to stop.
#[test]
fn the_jobs_status_passes_through_and_the_lock_always_goes() {
    let jobs = Jobs::new();
    for (command, code) in [
        (&["true"][..], 0),
        (&["sh", "-c", "exit 7"], 7),
        (&["sh", "-c", "kill -TERM $$"], 143),
        (&["sh", "-c", "kill -KILL $$"], 137),
    ] {
        let out = jobs.hold(command).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{command:?}: {}",
            stderr(&out)
        );
        assert!(jobs.lock_files().is_empty(), "{command:?}");
    }
    // Output passes through untouched.
    let out = jobs.hold(&["echo", "through"]).output().unwrap();
    assert_eq!(stdout(&out), "through\n");
    assert_eq!(stderr(&out), "");

    let mut hold = Guard::spawn(&mut jobs.hold(&["sleep", "60"]));
    let child = jobs.child_pid();
    let _job = KillJob(child);
    hold.signal(Signal::SIGTERM);
    assert_eq!(hold.child().wait().unwrap().code(), Some(143));
    assert!(jobs.lock_files().is_empty());
    assert!(gone(child), "the job was left running");
}

/// `--lock-pid`: a lock file holding the PID of a process that is gone is stale, of a live
/// one held, of a process that started after the file was written (a reused PID) stale;
/// garbage is held.
#[test]
fn lock_pid_judges_pid_files() {
    let env = TestEnv::new();
    let dir = env.path("pids");
    fs::create_dir_all(&dir).unwrap();
    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    fs::write(dir.join("dead.lock"), format!("{}\n", exited.id())).unwrap();
    let mut alive = Guard::spawn(Command::new("sleep").arg("60"));
    fs::write(dir.join("alive.lock"), format!("{}\n", alive.id())).unwrap();
    let reused = dir.join("reused.lock");
    fs::write(&reused, format!("{}\n", alive.id())).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&reused)
        .unwrap()
        .set_modified(old)
        .unwrap();
    fs::write(dir.join("garbage.lock"), "held by the nightly export\n").unwrap();
    let glob = format!("{}/*.lock", dir.display());

    let out = env
        .prestop(["check", "--lock-pid", "--wait-lock", &glob])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(": 2 in flight ("), "{text}");
    assert!(
        text.contains("alive.lock") && text.contains("garbage.lock"),
        "{text}"
    );
    assert!(text.contains("dead.lock: its holder pid"), "{text}");
    assert!(text.contains("reused.lock: pid"), "{text}");
    // Without --lock-pid a PID file is a lock file like any other.
    let out = env
        .prestop(["check", "--wait-lock", &glob])
        .output()
        .unwrap();
    assert!(stdout(&out).contains(": 4 in flight ("), "{}", stdout(&out));

    // The drain waits for the live PID alone, and ends when it exits.
    let mut drain = Running::spawn(&mut env.prestop([
        "drain",
        "--lock-pid",
        "--wait-lock",
        &glob,
        "--grace-period",
        "60",
        "--progress-interval",
        "100ms",
    ]));
    drain.wait_for("draining, budget");
    fs::remove_file(dir.join("garbage.lock")).unwrap();
    // The live PID's file alone keeps it waiting.
    drain.wait_for("waiting: 1 in flight (lock ");
    alive.signal(Signal::SIGKILL);
    alive.child().wait().unwrap();
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
}

/// Once a drain has begun, `hold` starts nothing (75, one line); once that termination is
/// over (its grace period and the kubelet's 2 s), it runs again.
#[test]
fn no_job_starts_once_a_drain_has_begun() {
    let jobs = Jobs::new();
    let marker = jobs.env.path("x");
    let drain = jobs.one_second_drain();
    let began = Instant::now();
    let out = jobs
        .hold(&["touch", marker.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("a drain began"), "{}", stderr(&out));
    assert!(!marker.exists());
    assert!(jobs.lock_files().is_empty());
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
    // Still the same termination until grace + 2 s.
    let out = jobs.hold(&["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    std::thread::sleep((began + Duration::from_secs(5)).saturating_duration_since(Instant::now()));
    let out = jobs
        .hold(&["touch", marker.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(marker.exists());
}

/// 1,000 jobs of random lengths, 40 at a time, with a drain started midway: every job
/// that started ended before "drained", none started once the drain was over, no lock
/// file is left.
#[test]
fn a_thousand_jobs_and_a_drain() {
    let jobs = Jobs::new();
    let started = jobs.env.path("started");
    let ended = jobs.env.path("ended");
    fs::create_dir_all(&started).unwrap();
    fs::create_dir_all(&ended).unwrap();
    let mut running: Vec<Guard> = Vec::new();
    let mut refused = 0;
    let mut drain: Option<Running> = None;
    let mut drained_at = None;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    // Reaps the jobs that ended, and notes when the drain did, to a few milliseconds.
    let reap = |running: &mut Vec<Guard>,
                drain: &mut Option<Running>,
                refused: &mut usize,
                drained_at: &mut Option<SystemTime>| {
        running.retain_mut(|g| {
            let Some(status) = g.child().try_wait().unwrap() else {
                return true;
            };
            match status.code() {
                Some(0) => {}
                Some(75) => *refused += 1,
                other => panic!("a job ended with {other:?}"),
            }
            false
        });
        if let Some(d) = drain.as_mut()
            && drained_at.is_none()
            && d.guard.child().try_wait().unwrap().is_some()
        {
            *drained_at = Some(SystemTime::now());
        }
    };
    for i in 0..1000 {
        while running.len() >= 40 {
            reap(&mut running, &mut drain, &mut refused, &mut drained_at);
            std::thread::sleep(Duration::from_millis(1));
        }
        if i == 500 {
            let mut d = Running::spawn(&mut jobs.env.prestop([
                "drain",
                "--wait-lock",
                &jobs.glob(),
                "--grace-period",
                "120",
                "--progress-interval",
                "10s",
            ]));
            d.wait_for("draining, budget");
            drain = Some(d);
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let ms = seed % 300;
        let script = format!(
            "touch {s}/{i}; sleep 0.{ms:03}; touch {e}/{i}",
            s = started.display(),
            e = ended.display()
        );
        let mut cmd = jobs.hold(&["sh", "-c", &script]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        running.push(Guard::spawn(&mut cmd));
    }
    let end = Instant::now() + Duration::from_secs(60);
    while !running.is_empty() || drained_at.is_none() {
        assert!(Instant::now() < end, "jobs or the drain never ended");
        reap(&mut running, &mut drain, &mut refused, &mut drained_at);
        std::thread::sleep(Duration::from_millis(1));
    }
    let (code, _, log) = drain.expect("the drain ran").finish();
    assert_eq!(code, Some(0), "{log}");
    let mut last_end = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(&started).unwrap() {
        let name = entry.unwrap().file_name();
        let end = ended.join(&name);
        assert!(end.exists(), "job {name:?} started and never ended");
        last_end = last_end.max(fs::metadata(end).unwrap().modified().unwrap());
    }
    // Every job launched once the drain had begun is refused; one launched a moment before
    // may be too, if its `hold` looked after the drain had begun.
    for i in 500..1000 {
        assert!(
            !started.join(i.to_string()).exists(),
            "job {i} ran during the drain"
        );
    }
    assert!(refused >= 500, "only {refused} jobs were refused");
    assert!(jobs.lock_files().is_empty(), "{:?}", jobs.lock_files());
    let drained_at = drained_at.unwrap();
    let lag = drained_at
        .duration_since(last_end)
        .unwrap_or_else(|_| panic!("the drain ended before the last job:\n{log}"));
    eprintln!(
        "hold: {} jobs ran, {refused} refused once the drain had begun; the drain ended \
         {lag:?} after the last job",
        fs::read_dir(&started).unwrap().count()
    );
}

/// Every bad value is one line naming the option, exit 2, and nothing is run.
#[test]
fn bad_input_runs_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let jobs = Jobs::new();
    let marker = jobs.env.path("ran");
    let touch = ["touch", marker.to_str().unwrap()];
    let a_file = jobs.env.touch("a-file");
    let lock_dir: std::ffi::OsString = jobs.locks.clone().into();
    let os = |s: &str| std::ffi::OsString::from(s);
    let with_name = |name: std::ffi::OsString| {
        vec![
            os("hold"),
            os("--lock-dir"),
            lock_dir.clone(),
            os("--name"),
            name,
            os("--"),
        ]
    };
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (vec![os("hold"), os("--")], "COMMAND"),
        (vec![os("hold"), os("--"), os(touch[0])], "--lock-dir"),
        (
            vec![
                os("hold"),
                os("--lock-dir"),
                jobs.env.path("missing").into(),
                os("--"),
            ],
            "--lock-dir",
        ),
        (
            vec![os("hold"), os("--lock-dir"), a_file.into(), os("--")],
            "--lock-dir",
        ),
        (
            vec![os("hold"), os("--lock-dir"), os("/tmp/x\ny"), os("--")],
            "--lock-dir",
        ),
        (with_name(os("a/b")), "--name"),
        (with_name(os(".hidden")), "--name"),
        (
            with_name(std::ffi::OsStr::from_bytes(b"x\xff").into()),
            "--name",
        ),
        (
            vec![
                os("hold"),
                os("--lock-dir"),
                lock_dir.clone(),
                os("--"),
                os("/nonexistent/job"),
            ],
            "COMMAND",
        ),
    ];
    for (mut args, option) in cases {
        let needs_command = args.last().is_some_and(|a| a == "--");
        if needs_command && option != "COMMAND" {
            args.extend(touch.iter().map(Into::into));
        }
        let out = jobs.env.prestop(&args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(option), "{args:?}: {err}");
        assert!(!marker.exists(), "{args:?} ran the job");
        assert!(jobs.lock_files().is_empty());
    }
}

/// A drain of `jobs`' lock directory against a state directory of its own (so that nothing
/// is refused meanwhile), once it waits for one lock in flight.
fn drain_locks(jobs: &Jobs) -> Running {
    let state = jobs.env.path("drain-state");
    let mut drain = Running::spawn(&mut jobs.env.prestop([
        "drain",
        "--wait-lock",
        &jobs.glob(),
        "--grace-period",
        "30",
        "--state-dir",
        state.to_str().unwrap(),
    ]));
    drain.wait_for("(1 in flight)");
    drain
}

/// A job that runs until the test creates `go`, then creates `done`.
fn gated_job(jobs: &Jobs, before: &str) -> (String, PathBuf, PathBuf) {
    let (go, done) = (jobs.env.path("go"), jobs.env.path("done"));
    let script = format!(
        "{before} while [ ! -e {} ]; do sleep 0.05; done; touch {}",
        go.display(),
        done.display()
    );
    (script, go, done)
}

/// `hold` killed outright (SIGKILL, the OOM killer) while its job runs: the job holds the
/// lock it inherited, so the drain waits for the job, not for `hold`.
#[test]
fn a_job_whose_hold_is_killed_keeps_its_lock() {
    let jobs = Jobs::new();
    let (script, go, done) = gated_job(&jobs, "");
    let mut hold = Guard::spawn(&mut jobs.hold(&["sh", "-c", &script]));
    let child = jobs.child_pid();
    let _job = KillJob(child);
    kill(Pid::from_raw(hold.id() as i32), Signal::SIGKILL).unwrap();
    hold.child().wait().unwrap();
    let drain = drain_locks(&jobs);
    fs::write(&go, "").unwrap();
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(done.exists(), "drained while the job ran:\n{log}");
    assert!(log.contains("stale lock"), "{log}");
}

/// A job that closes every descriptor it inherited, the lock's too, and whose `hold` is then
/// killed: nothing holds the lock, but the process it names runs. Held until that ends.
#[test]
fn a_job_that_let_go_of_its_lock_is_waited_for_while_it_runs() {
    let jobs = Jobs::new();
    let closed = jobs.env.path("closed");
    let before = format!(
        "exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; touch {};",
        closed.display()
    );
    let (script, go, done) = gated_job(&jobs, &before);
    let mut hold = Guard::spawn(&mut jobs.hold(&["sh", "-c", &script]));
    let child = jobs.child_pid();
    let _job = KillJob(child);
    assert!(common::wait_for_path(&closed, Duration::from_secs(10)));
    let lock = jobs.lock_files().pop().unwrap();
    let holds_it = fs::read_dir(format!("/proc/{child}/fd"))
        .unwrap()
        .any(|fd| fs::read_link(fd.unwrap().path()).is_ok_and(|to| to == lock));
    assert!(!holds_it, "the job still has the lock's descriptor");
    kill(Pid::from_raw(hold.id() as i32), Signal::SIGKILL).unwrap();
    hold.child().wait().unwrap();
    let drain = drain_locks(&jobs);
    fs::write(&go, "").unwrap();
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
    assert!(done.exists(), "drained while the job ran:\n{log}");
}

/// A state directory that is a symlink to nothing is one a drain would refuse (it runs
/// uncoordinated and records nothing there): `hold` cannot tell, and starts nothing.
#[test]
fn a_dangling_state_dir_starts_no_job() {
    let jobs = Jobs::new();
    let link = jobs.env.path("state-link");
    std::os::unix::fs::symlink("missing/x", &link).unwrap();
    let marker = jobs.env.path("ran");
    let out = jobs
        .env
        .prestop(["hold", "--lock-dir"])
        .arg(&jobs.locks)
        .arg("--state-dir")
        .arg(&link)
        .args(["--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(!marker.exists());
    assert!(jobs.lock_files().is_empty(), "{:?}", jobs.lock_files());
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));
}

/// With descriptors running out, `hold` either refuses to start the job (125) or, once the
/// job runs, forwards every signal to it and sees it end: never a job it cannot stop. Each
/// limit from the fewest descriptors that can start a job upwards, so that the ones where
/// no pidfd can be had for the job are among them.
#[test]
fn signals_are_forwarded_with_no_descriptor_to_spare() {
    let mut started = 0;
    for limit in 5u64..=12 {
        let jobs = Jobs::new();
        let mut cmd = jobs.hold(&["sh", "-c", "trap 'exit 7' TERM; echo ready; sleep 5 & wait"]);
        with_fd_limit(&mut cmd, limit);
        // The job's output and `hold`'s messages, in one stream (a shell this short of
        // descriptors cannot even redirect its output).
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut hold = Guard::spawn(&mut cmd);
        let lines = lines_of(hold.child().stdout.take().unwrap());
        let errors = lines_of(hold.child().stderr.take().unwrap());
        let mut log = String::new();
        let ready = loop {
            match lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("ready") => break true,
                Ok(line) => log.push_str(&line),
                Err(_) => break false,
            }
        };
        if !ready {
            // Refused (125), the job not started (126: no descriptor for the spawn, as under
            // qemu), or, this few, `hold` not even loaded (127: the dynamic loader).
            let code = hold.child().wait().unwrap().code();
            log.extend(errors.try_iter());
            assert!(
                matches!(code, Some(125..=127)),
                "limit {limit}: {code:?} {log}"
            );
            assert!(jobs.lock_files().is_empty(), "limit {limit}");
            continue;
        }
        started += 1;
        let sent = Instant::now();
        hold.signal(Signal::SIGTERM);
        let code = hold.child().wait().unwrap().code();
        assert_eq!(
            code,
            Some(7),
            "limit {limit}: the job did not get SIGTERM: {log}"
        );
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "limit {limit}: the signal waited for the job's end"
        );
        assert!(jobs.lock_files().is_empty(), "limit {limit}");
    }
    assert!(started >= 3, "only {started} limits started a job");
}

/// Ctrl-Z on a terminal stops the job (its group is the foreground one), and `hold` with it,
/// so that the shell gets the terminal back; continued, `hold` continues the job.
#[test]
fn ctrl_z_stops_hold_with_its_job() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::process::CommandExt;
    let jobs = Jobs::new();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut master = std::fs::File::from(pty.master);
    let mut cmd = jobs.hold(&["sh", "-c", "echo ready; sleep 1; echo done"]);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: between fork and exec, only setsid and ioctl, both async-signal-safe: `hold`
    // becomes a session leader with the pty as its controlling terminal, as a shell's job.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::setsid() < 0 || nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut hold = cmd.spawn().unwrap();
    // The terminal's other end reads until the last descriptor of this end is closed.
    drop(cmd);
    drop(slave);
    let pid = Pid::from_raw(hold.id() as i32);
    let _guard = KillJob(hold.id() as i32);
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        let mut master = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let wait_text = |needle: &str| {
        let end = Instant::now() + Duration::from_secs(10);
        while !output.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < end,
                "no {needle:?}: {:?}",
                output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_text("ready");
    master.write_all(&[0x1a]).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WUNTRACED | WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => break,
            WaitStatus::StillAlive => {}
            other => panic!("hold: {other:?}"),
        }
        assert!(Instant::now() < end, "hold did not stop with its job");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!output.lock().unwrap().contains("done"));
    kill(pid, Signal::SIGCONT).unwrap();
    wait_text("done");
    let status = loop {
        match waitpid(pid, None).unwrap() {
            WaitStatus::Exited(_, code) => break code,
            WaitStatus::Continued(_) => {}
            other => panic!("hold: {other:?}"),
        }
    };
    assert_eq!(status, 0);
    // Reaped by the `waitpid` above: this only lets go of the handle.
    let _ = hold.wait();
    drop(master);
    let _ = reader.join();
    assert!(jobs.lock_files().is_empty());
}

/// A job started in a PID namespace of its own (another PID 1) during a drain is refused
/// too: the drain's record is this boot's, and its termination is not over.
#[test]
fn a_job_in_another_pid_namespace_is_refused_during_a_drain() {
    if !common::can_unshare() {
        eprintln!("skipped: needs root to create PID namespaces");
        return;
    }
    let jobs = Jobs::new();
    let marker = jobs.env.path("x");
    let drain = jobs.one_second_drain();
    let hold = jobs.hold(&["touch", marker.to_str().unwrap()]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(hold.get_program())
        .args(hold.get_args())
        .envs(hold.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .current_dir(jobs.env.dir.path());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(!marker.exists());
    let (code, _, log) = drain.finish();
    assert_eq!(code, Some(0), "{log}");
}
