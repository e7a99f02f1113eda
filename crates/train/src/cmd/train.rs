//! `tau-resnet train`.

use super::Outcome;

/// Arguments of `tau-resnet train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {}

/// Runs `tau-resnet train`.
///
/// # Errors
/// Not built yet: always an error.
pub fn run(_args: TrainArgs) -> anyhow::Result<Outcome> {
    anyhow::bail!("`tau-resnet train` is not built yet")
}
