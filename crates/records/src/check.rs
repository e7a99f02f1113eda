//! The exchange of `tau-resnet check-points`, the hidden subcommand a sweep driver checks
//! every point's config with before it starts any: one [`CheckRequest`] as JSON on
//! standard input, one [`CheckReply`] as JSON on standard output.

use serde::{Deserialize, Serialize};

/// The name of the subcommand.
pub const CHECK_COMMAND: &str = "check-points";

/// The points to check: the command that would run them, the base config they share and
/// each point's `--set` overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// `train` or `probe`.
    pub command: String,
    /// The base config, TOML text (what `--config FILE` would read).
    pub base: String,
    /// Each point's overrides, as `--set KEY=VALUE` takes them.
    pub points: Vec<Vec<String>>,
}

/// The verdict on each point of a [`CheckRequest`], in its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckReply {
    /// `None` for a point `tau-resnet <command>` accepts; the error it would stop with
    /// otherwise (one line).
    pub errors: Vec<Option<String>>,
}
