//! `tau-resnet probe`.

use super::Outcome;

/// Arguments of `tau-resnet probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {}

/// Runs `tau-resnet probe`.
///
/// # Errors
/// Not built yet: always an error.
pub fn run(_args: ProbeArgs) -> anyhow::Result<Outcome> {
    anyhow::bail!("`tau-resnet probe` is not built yet")
}
