//! `--dry-run`: what the hook would do, from the validated configuration, done nowhere.
//!
//! It prints the budget, the stop actions in the order they would run, each wait condition
//! with where it stands now, and where the log would go. It may look (read `/proc`, list a
//! directory); it must never touch, signal, run, send or create anything, the state directory
//! included: an HTTP request, even a `--wait-http` GET, is not sent.

use std::io::Write;
use std::time::Instant;

use crate::config::{Config, LogFormat, LogTarget, show};
use crate::process::Named;
use crate::report;
use crate::wait;

pub fn print(config: &Config) {
    let b = config.budget;
    let mut lines = vec![
        "prestop: dry run: options are valid; nothing was done".to_owned(),
        format!(
            "budget:    {} (grace {} - reserve {}), from the first invocation's start",
            show(b.total()),
            show(b.grace),
            show(b.reserve)
        ),
        format!("min-wait:  {}", show(b.min_wait)),
        format!(
            "stop at:   {} after termination began",
            show(config.stop.after)
        ),
        format!("quiet-for: {}", show(b.quiet_for)),
    ];
    let mut steps = Vec::new();
    for path in &config.stop.touch {
        steps.push(format!("touch {}", path.display()));
    }
    if let Some(action) = &config.stop.signal {
        let default = if action.explicit_target {
            ""
        } else {
            " (the default target)"
        };
        let by = Instant::now() + config.budget.total();
        let now = match action.target.resolve(action.pid1, by) {
            Ok(Named::NoPidfile) => " (now: no pidfile; it is read when the hook runs)".into(),
            Ok(Named::Pids(pids)) if pids.is_empty() => " (now: no such process)".into(),
            Ok(Named::Pids(pids)) => {
                let pids: Vec<String> = pids.iter().map(ToString::to_string).collect();
                format!(" (now: pid {})", pids.join(", "))
            }
            Err(why) => format!(" (now: unknown: {why})"),
        };
        steps.push(format!(
            "send {} to {}{default}{now}",
            action.signal, action.target
        ));
    }
    for request in &config.stop.http {
        steps.push(format!(
            "send {request}: {}; 2xx is success",
            request.describe()
        ));
    }
    for command in &config.stop.exec {
        steps.push(format!(
            "run {} ({})",
            command.display,
            command.program.display()
        ));
    }
    push_list(
        &mut lines,
        "stop:",
        &steps,
        "nothing (no --touch, --signal, --http or --exec)",
    );

    let waits: Vec<String> = wait::look(&config.wait, true)
        .iter()
        .map(|c| c.plan())
        .collect();
    push_list(&mut lines, "wait:", &waits, "nothing to wait for");
    lines.push(format!(
        "polling:   every {} where no event source serves; progress every {}",
        show(config.wait.poll_interval),
        show(config.output.progress_interval)
    ));
    let target = match &config.output.target {
        LogTarget::Auto => format!("auto ({})", report::describe_auto()),
        LogTarget::Pid1 => "/proc/1/fd/1".into(),
        LogTarget::Stdout => "stdout".into(),
        LogTarget::Stderr => "stderr".into(),
        LogTarget::File(path) => path.display().to_string(),
    };
    lines.push(format!(
        "log:       {} lines to {target}; the summary also to stdout",
        match config.output.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    ));
    lines.push(format!("state dir: {}", config.state_dir.display()));
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{}", report::escape(&line));
    }
}

fn push_list(lines: &mut Vec<String>, heading: &str, items: &[String], empty: &str) {
    if items.is_empty() {
        lines.push(format!("{heading:<10} {empty}"));
    }
    for (i, item) in items.iter().enumerate() {
        let heading = if i == 0 { heading } else { "" };
        lines.push(format!("{heading:<10} {}. {item}", i + 1));
    }
}
