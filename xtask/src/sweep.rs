//! `cargo xtask sweep`.

/// Arguments of `cargo xtask sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {}

/// Runs `cargo xtask sweep`.
pub fn run(_args: SweepArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask sweep` is not built yet")
}
