//! `cargo xtask cuda-toolkit` and `cargo xtask gpu-check`: the project's two GPU scripts
//! (`scripts/cuda-toolkit.sh`, `scripts/gpu-check.sh`) run from the workspace root with the
//! arguments given, so that they sit beside the other tasks. The GPU machine itself has no
//! Rust toolchain: there `scripts/gpu-check.sh run` is called directly.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Arguments passed through to a script.
#[derive(Debug, clap::Args)]
pub struct ScriptArgs {
    /// Arguments for the script (see its --help).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `bash scripts/NAME args…` in the workspace root; fails when it does.
pub fn run(name: &str, args: &ScriptArgs) -> anyhow::Result<()> {
    let root = crate::sweep::workspace_root();
    let script = Path::new("scripts").join(name);
    if !root.join(&script).is_file() {
        bail!("{} not found in {}", script.display(), root.display());
    }
    let status = Command::new("bash")
        .arg(&script)
        .args(&args.args)
        .current_dir(&root)
        .status()
        .with_context(|| format!("running bash {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> ScriptArgs {
        ScriptArgs {
            args: a.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn scripts_run_from_the_root_and_their_failures_are_errors() {
        // --help of both scripts prints their usage and succeeds.
        run("gpu-check.sh", &args(&["--help"])).unwrap();
        run("cuda-toolkit.sh", &args(&["--help"])).unwrap();
        // An unknown command fails, and says which script.
        let err = run("gpu-check.sh", &args(&["no-such-command"])).unwrap_err();
        assert!(err.to_string().contains("gpu-check.sh failed"), "{err}");
        let err = run("no-such-script.sh", &args(&[])).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
