//! The errors that stop prestop before or instead of a drain, and the exit code of each.
//!
//! A drain that runs to its end is not an error: its result is an `Outcome` (drained,
//! exhausted, interrupted), decided in `drain`. This module only covers what makes prestop
//! give up, and it must keep every message to one line that names the option and the value.

use std::ffi::OsStr;
use std::fmt;

use crate::exit::Exit;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option value: names the option, the value and what is wrong with it.
    #[error("{option} {value}: {reason}")]
    Usage {
        option: String,
        value: Quoted,
        reason: String,
    },
    /// A configuration that is wrong as a whole (such as reserve >= grace).
    #[error("{0}")]
    Config(String),
    /// The machine refused something prestop needs to run at all.
    #[error("{context}: {source}")]
    System {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn usage(option: &str, value: impl AsRef<OsStr>, reason: impl Into<String>) -> Self {
        Error::Usage {
            option: option.to_owned(),
            value: Quoted(value.as_ref().to_string_lossy().into_owned()),
            reason: reason.into(),
        }
    }

    pub fn system(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::System {
            context: context.into(),
            source,
        }
    }

    /// The documented exit code: 2 for anything the user can fix in the command line;
    /// 1 when the system failed us, since the drain could not be confirmed.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Usage { .. } | Error::Config(_) => Exit::Usage,
            Error::System { .. } => Exit::InFlight,
        }
    }
}

/// A user-supplied value shown in an error: quoted, with control characters escaped, so
/// the message stays on one line whatever the value holds.
#[derive(Debug)]
pub struct Quoted(pub String);

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_one_line_and_name_option_and_value() {
        let e = Error::usage("--grace-period", "3\n0", "not a duration");
        let text = e.to_string();
        assert_eq!(text, r#"--grace-period "3\n0": not a duration"#);
        assert!(!text.contains('\n'));
        assert_eq!(e.exit(), Exit::Usage);
    }
}
