use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use clap::error::ErrorKind;
use prestop::cli::Cli;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e),
    };
    prestop::init_diagnostics();
    ExitCode::from(prestop::run(cli, started))
}

/// Help and version go out as clap renders them; every other parse error becomes one line
/// naming the option and the value, with exit code 2.
fn usage(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(prestop::error::EXIT_USAGE);
    }
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid usage");
    eprintln!(
        "prestop: {}",
        first.strip_prefix("error: ").unwrap_or(first)
    );
    ExitCode::from(prestop::error::EXIT_USAGE)
}
