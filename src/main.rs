use std::process::ExitCode;
use std::time::Instant;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use prestop::exit::Exit;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match prestop::cli::parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e),
    };
    prestop::init_diagnostics();
    ExitCode::from(prestop::run(cli, started).code())
}

/// Help and version go out as clap renders them; every other parse error becomes one line
/// naming the option and the value, with exit code 2.
fn usage(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::from(Exit::Success.code());
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(Exit::Usage.code());
    }
    // clap's message runs up to its first blank line (a missing argument is named on the
    // line after the first); what follows is a usage hint. The argument it quotes is
    // escaped first, so that a newline in it cannot break the line; whatever control
    // characters are left (a `\r`, an escape sequence) are escaped in the line as a whole.
    let mut rendered = e.render().to_string();
    for kind in [
        ContextKind::InvalidArg,
        ContextKind::InvalidValue,
        ContextKind::InvalidSubcommand,
    ] {
        if let Some(ContextValue::String(arg)) = e.get(kind) {
            rendered = rendered.replace(arg.as_str(), &prestop::report::escape(arg));
        }
    }
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    eprintln!(
        "prestop: {}",
        prestop::report::escape(message.strip_prefix("error: ").unwrap_or(&message))
    );
    ExitCode::from(Exit::Usage.code())
}
