//! `tau-resnet eval`.

use super::Outcome;

/// Arguments of `tau-resnet eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {}

/// Runs `tau-resnet eval`.
///
/// # Errors
/// Not built yet: always an error.
pub fn run(_args: EvalArgs) -> anyhow::Result<Outcome> {
    anyhow::bail!("`tau-resnet eval` is not built yet")
}
