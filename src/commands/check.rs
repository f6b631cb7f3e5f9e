//! `prestop check`: one look at the wait conditions, each printed with where it stands.
//!
//! It sets up no event source and waits for nothing: exit 0 if everything has drained, 1 if
//! not, so that a script or a readiness probe can ask the question a drain would.

use std::io::Write;

use crate::config::{self, WaitOptions};
use crate::error::Error;
use crate::exit::Exit;
use crate::process::Pid1;
use crate::report;
use crate::wait;

pub fn run(options: &WaitOptions) -> Result<Exit, Error> {
    let plan = config::wait_plan(options, Pid1::Real)?;
    if plan.is_empty() {
        return Err(Error::Config(
            "check needs something to look at: give a wait condition (see prestop check --help)"
                .into(),
        ));
    }
    let conditions = wait::look(&plan, false);
    let mut out = std::io::stdout().lock();
    for c in &conditions {
        let line = format!("{}: {}", c.label(), c.state());
        let _ = writeln!(out, "prestop: {}", report::escape(&line));
        for detail in c.details() {
            let _ = writeln!(out, "  {}", report::escape(&detail));
        }
    }
    let (total, _) = wait::in_flight(&conditions, 0);
    let unknown = conditions.iter().filter(|c| c.unknown().is_some()).count();
    if total == 0 {
        let _ = writeln!(out, "prestop: drained");
        Ok(Exit::Success)
    } else if unknown > 0 {
        let _ = writeln!(
            out,
            "prestop: not drained: {} in flight, {unknown} unknown",
            total - unknown
        );
        Ok(Exit::InFlight)
    } else {
        let _ = writeln!(out, "prestop: not drained: {total} in flight");
        Ok(Exit::InFlight)
    }
}
