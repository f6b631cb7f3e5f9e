//! `prestop hold`'s options, checked: the lock directory, the lock's name, the state
//! directory and the job's command.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{find_program, no_controls, path, text};
use crate::error::Error;

/// `hold`'s options as given.
#[derive(Clone, Debug, Default)]
pub struct HoldOptions {
    pub lock_dir: Option<OsString>,
    pub name: Option<OsString>,
    pub state_dir: OsString,
    pub command: Vec<OsString>,
}

/// A job to run under a lock file.
#[derive(Clone, Debug)]
pub struct HoldConfig {
    pub lock_dir: PathBuf,
    /// The lock file's name before `.PID.lock`.
    pub name: String,
    pub state_dir: PathBuf,
    /// COMMAND, resolved as `execvp` would.
    pub program: PathBuf,
    /// COMMAND and its arguments, as given.
    pub argv: Vec<OsString>,
}

impl HoldConfig {
    /// The command line, for the lock file and messages.
    pub fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The longest `--name`: with `.PID-N.lock` it stays well within a file name's 255 bytes.
const NAME_MAX: usize = 200;

pub fn hold(options: &HoldOptions) -> Result<HoldConfig, Error> {
    let Some((program, _)) = options.command.split_first() else {
        return Err(Error::Config(
            "hold needs the job to run: prestop hold --lock-dir DIR -- COMMAND [ARGS...]".into(),
        ));
    };
    let lock_dir = lock_dir(options.lock_dir.as_ref())?;
    no_controls("COMMAND", program)?;
    let program_text = text("COMMAND", program)?;
    let resolved = find_program(program_text)
        .ok_or_else(|| Error::usage("COMMAND", program, "not found, or not an executable file"))?;
    let name = if let Some(name) = &options.name {
        lock_name("--name", text("--name", name)?)?
    } else {
        let base = program_text.rsplit('/').next().unwrap_or(program_text);
        lock_name("COMMAND", base).map_err(|_| {
            Error::usage(
                "COMMAND",
                program,
                "its file name cannot name a lock file: give --name",
            )
        })?
    };
    Ok(HoldConfig {
        lock_dir,
        name,
        state_dir: PathBuf::from(path("--state-dir", &options.state_dir)?),
        program: resolved,
        argv: options.command.clone(),
    })
}

fn lock_dir(value: Option<&OsString>) -> Result<PathBuf, Error> {
    let Some(value) = value else {
        return Err(Error::Config(
            "hold needs --lock-dir DIR (or PRESTOP_LOCK_DIR): the directory whose lock files \
             the preStop hook's --wait-lock glob waits for"
                .into(),
        ));
    };
    let dir = PathBuf::from(path("--lock-dir", value)?);
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(Error::usage("--lock-dir", value, "not a directory")),
        Err(e) => {
            return Err(Error::usage(
                "--lock-dir",
                value,
                crate::process::describe_io(&e),
            ));
        }
    }
    let flags = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
    if let Err(e) = nix::unistd::access(&dir, flags) {
        return Err(Error::usage(
            "--lock-dir",
            value,
            format!("cannot create files in it: {} ({e:?})", e.desc()),
        ));
    }
    Ok(dir)
}

/// A lock name: one plain file-name component, not hidden (hidden names are `hold`'s
/// temporary files, and a shell's `*.lock` skips them), short enough for the suffix.
fn lock_name(option: &str, name: &str) -> Result<String, Error> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_MAX {
        "longer than 200 bytes"
    } else if name.contains('/') {
        "holds a '/': it names a file, not a path"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if name.chars().any(char::is_control) {
        "holds a control character"
    } else {
        return Ok(name.to_owned());
    };
    Err(Error::usage(option, name, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_one_plain_component() {
        assert_eq!(lock_name("--name", "report-build").unwrap(), "report-build");
        for bad in ["", "a/b", ".hidden", "x\ny", &"n".repeat(201)] {
            let e = lock_name("--name", bad).unwrap_err().to_string();
            assert!(e.starts_with("--name "), "{e}");
        }
    }
}
