//! `cargo xtask report`.

/// Arguments of `cargo xtask report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {}

/// Runs `cargo xtask report`.
pub fn run(_args: ReportArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask report` is not built yet")
}
