//! `tau-resnet bench`.

use super::Outcome;

/// Arguments of `tau-resnet bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Runs `tau-resnet bench`.
///
/// # Errors
/// Not built yet: always an error.
pub fn run(_args: BenchArgs) -> anyhow::Result<Outcome> {
    anyhow::bail!("`tau-resnet bench` is not built yet")
}
