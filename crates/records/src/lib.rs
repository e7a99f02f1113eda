//! The run records `tau-resnet` writes and `xtask` reads, defined once: `summary.json`
//! ([`Summary`]), `metrics.jsonl` ([`MetricsRecord`]), `probe.json` ([`ProbeRecord`]),
//! the file names of a run directory, the process exit codes ([`RunStatus::exit_code`],
//! [`exit_code`]), the exchange a sweep checks its points' configs with ([`CheckRequest`],
//! [`CheckReply`]), and the one durable atomic write every record goes through
//! ([`write_atomic`], [`write_json_atomic`]).
//!
//! The serde attributes of the record types are the on-disk format: changing one changes
//! the files every run writes and every sweep reads.

mod atomic;
mod check;
mod probe;
mod summary;

pub use atomic::{WriteError, WriteStep, sync_dir, write_atomic, write_json_atomic};
pub use check::{CHECK_COMMAND, CheckReply, CheckRequest};
pub use probe::{PROBE_FORMAT, ProbeRecord, ProbeTau};
pub use summary::{CodeVersion, LayerNorm, MetricsRecord, RunStatus, Summary, exit_code};

/// `summary.json`: the run's final status and numbers ([`Summary`]), written when a run
/// ends (finished, diverged or interrupted).
pub const SUMMARY_FILE: &str = "summary.json";
/// `metrics.jsonl`: one [`MetricsRecord`] per line, appended as the run goes.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// `probe.json`: the record of `tau-resnet probe --out DIR` ([`ProbeRecord`]).
pub const PROBE_FILE: &str = "probe.json";
/// `config.toml`: the resolved config of a run or a probe, as it ran.
pub const CONFIG_FILE: &str = "config.toml";
/// The files a sweep driver (xtask) keeps in a point's run directory beside the run's own:
/// the point's grid values, the process's output streams, why it failed. A new run starts
/// in a directory that holds nothing else (hidden files and an empty `checkpoints/` aside).
pub const DRIVER_FILES: &[&str] = &[
    "point.json",
    "stdout.log",
    "stderr.log",
    "xtask-failure.json",
    "xtask-failure.json.tmp",
];
/// `checkpoints/`: the folder of a run's checkpoints (its presence, with
/// [`CONFIG_FILE`], makes a run resumable).
pub const CHECKPOINTS_DIR: &str = "checkpoints";
