//! `cargo xtask bench`: builds the release `tau-resnet` binary and runs `tau-resnet bench`,
//! which measures training-step throughput (xtask itself never computes a gradient).

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::sweep::{build_tau_resnet, workspace_root};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Print one JSON object per measured point instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Use this `tau-resnet` binary instead of building the release one.
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Further arguments for `tau-resnet bench` (after `--`), e.g.
    /// `-- --depths 20 --norms none --theory-depth 0 --steps 3`.
    #[arg(last = true)]
    pub rest: Vec<String>,
}

/// Builds `tau-resnet` in release mode and returns its path.
fn build_release_binary() -> anyhow::Result<PathBuf> {
    build_tau_resnet()?;
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let bin = target
        .join("release")
        .join(format!("tau-resnet{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        anyhow::bail!("built tau-resnet but found no binary at {}", bin.display());
    }
    Ok(bin)
}

/// Runs `cargo xtask bench`.
///
/// # Errors
/// The build fails, or `tau-resnet bench` fails or cannot be started.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let bin = match args.bin {
        Some(b) => b,
        None => build_release_binary()?,
    };
    let mut cmd = Command::new(&bin);
    cmd.arg("bench");
    if args.json {
        cmd.arg("--json");
    }
    cmd.args(&args.rest);
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        anyhow::bail!("{} bench failed ({status})", bin.display());
    }
    Ok(())
}
