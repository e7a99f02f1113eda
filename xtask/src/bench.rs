//! `cargo xtask bench`.

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Runs `cargo xtask bench`.
pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask bench` is not built yet")
}
