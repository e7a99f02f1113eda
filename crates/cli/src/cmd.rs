//! The subcommands of the `tau-resnet` binary, one module each.

pub mod bench;
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
