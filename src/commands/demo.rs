//! `prestop demo`: the README's first command, a rehearsal of the built-in sample worker.
//!
//! The demo's hook is an ordinary drain command line, shown to the user and parsed exactly
//! as a pod would run it; the rehearsal then plays the kubelet against the sample worker. It
//! must work on a fresh machine with no setup, and leave nothing behind.

use std::ffi::OsString;

use crate::cli;
use crate::error::Error;
use crate::exit::Exit;
use crate::rehearse::Scratch;

pub fn run() -> Result<Exit, Error> {
    // The hook names its lock glob under it, and refuses a path that could forge a line.
    let tmp = std::env::temp_dir();
    if tmp
        .as_os_str()
        .to_string_lossy()
        .chars()
        .any(char::is_control)
    {
        return Err(Error::usage(
            "TMPDIR",
            tmp.as_os_str(),
            "holds a control character; the demo's lock files live under it",
        ));
    }
    let scratch =
        Scratch::new("demo").map_err(|e| Error::system("cannot create the demo's directory", e))?;
    let locks = scratch.path().join("lock");
    let glob = format!("{}/*.lock", locks.display());
    let exe = std::env::current_exe()
        .map_err(|e| Error::system("cannot find prestop's own binary", e))?;
    let hook: Vec<OsString> = [
        "--signal",
        "TSTP",
        "--wait-lock",
        glob.as_str(),
        "--grace-period",
        "15s",
        "--reserve",
        "3s",
        "--progress-interval",
        "1s",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    eprintln!(
        "prestop demo: a rehearsal of a pod's termination, with a sample worker.\n\n\
         The worker takes jobs of 1-4 s, three at a time, and holds a lock file per job in\n\
         {locks}.\n\
         After 4 s the pod is told to terminate, and prestop plays the kubelet's part:\n\
         \x20 1. the preStop hook runs (SIGTSTP tells the worker to take no new jobs;\n\
         \x20    then the hook waits until no lock file is left):\n\
         \x20      prestop drain --signal TSTP --wait-lock '{glob}' \\\n\
         \x20                    --grace-period 15s --reserve 3s\n\
         \x20 2. when the hook returns, the worker gets SIGTERM;\n\
         \x20 3. if it were still running when the 15 s grace period ends, it would get SIGKILL.\n",
        locks = locks.display(),
    );
    let drain =
        cli::parse_drain(&hook).map_err(|e| Error::Config(format!("the demo's own hook: {e}")))?;
    let app = [
        exe.into_os_string(),
        "sample-worker".into(),
        "--lock-dir".into(),
        locks.into_os_string(),
    ];
    let rehearsal = super::Rehearsal {
        after: "4s".as_ref(),
        stop_signal: "TERM".as_ref(),
        pid_namespace: false,
        app: &app,
    };
    let exit = super::rehearse(&drain, &hook, &rehearsal);
    drop(scratch);
    exit
}
