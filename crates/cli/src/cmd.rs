//! The subcommands of the `tau-resnet` binary, one module each.

pub mod bench;
pub mod check;
pub mod eval;
pub mod export;
pub mod import;
pub mod load;
pub mod predict;
pub mod probe;
pub mod train;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tau_records::{RunStatus, exit_code};

static QUIET: AtomicBool = AtomicBool::new(false);
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Prints a line to standard output like `println!`, but returns an error instead of
/// panicking when the output cannot be written (`> /dev/full`: "writing to standard
/// output: No space left on device"). A closed pipe (`tau-resnet import x.pth --list |
/// head -1`) is not an error: the rest of the output is dropped and the command ends as
/// it would have, with its own exit status.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// A clap parser of a count that must be at least 1 (`--batch-size 0` is a usage error,
/// exit status 2, like any malformed flag).
pub fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// What [`outln!`] runs.
pub(crate) fn write_stdout(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        result => result.context("writing to standard output"),
    }
}

/// Turns progress bars off (`--quiet`) or on for the commands of this process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether commands should draw progress bars (not under `--quiet`).
pub fn progress_enabled() -> bool {
    !QUIET.load(Ordering::Relaxed)
}

/// How a command ended, as the process exit code tells a calling script or sweep.
///
/// A run that ends with a result (finished, or diverged: divergence is data) is not a
/// failure; errors (bad config, I/O) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command did its work (a run finished).
    Finished,
    /// The run diverged: a non-finite loss or gradient. A result, recorded in `summary.json`.
    Diverged,
    /// The run was interrupted (Ctrl-C) after writing a checkpoint.
    Interrupted,
}

impl Outcome {
    /// The process exit code for this outcome: 0 finished, 3 diverged, 130 interrupted
    /// ([`tau_records::exit_code`], the codes xtask reads). Errors exit with 1 and
    /// command-line mistakes with 2.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Finished => exit_code::FINISHED,
            Outcome::Diverged => exit_code::DIVERGED,
            Outcome::Interrupted => exit_code::INTERRUPTED,
        }
    }
}

impl From<RunStatus> for Outcome {
    /// The outcome of a training run that ended with this status (same exit code).
    fn from(status: RunStatus) -> Outcome {
        match status {
            RunStatus::Finished => Outcome::Finished,
            RunStatus::Diverged => Outcome::Diverged,
            RunStatus::Interrupted => Outcome::Interrupted,
        }
    }
}

/// The one line an error is reported with: its message and its causes, joined by ": ",
/// each cause left out when the message before it already ends with it (errors that
/// print their source in their own message and also return it as `source()`, as
/// `path: No such file or directory (os error 2)` does, would otherwise say it twice).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        /// As thiserror's `#[error("config.json: {source}")]` with a `source` field.
        #[derive(Debug)]
        struct Io {
            source: std::io::Error,
        }
        impl std::fmt::Display for Io {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "config.json: {}", self.source)
            }
        }
        impl std::error::Error for Io {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file (os error 2)");
        let err = anyhow::Error::new(Io { source: io() }).context("loading checkpoint run");
        assert_eq!(
            error_line(&err),
            "loading checkpoint run: config.json: No such file (os error 2)"
        );
        // Causes that add something are all kept.
        let err = anyhow::Error::new(io()).context("reading x");
        assert_eq!(error_line(&err), "reading x: No such file (os error 2)");
        assert_eq!(format!("{err:#}"), error_line(&err));
    }
}
