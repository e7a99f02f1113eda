//! The subcommands of the `tau-resnet` binary, one module each.

pub mod bench;
pub mod eval;
pub mod export;
pub mod import;
pub mod load;
pub mod predict;
pub mod probe;
pub mod train;

use std::sync::atomic::{AtomicBool, Ordering};

use tau_records::{RunStatus, exit_code};

static QUIET: AtomicBool = AtomicBool::new(false);

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
