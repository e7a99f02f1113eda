//! Captures the git commit the binary is built from (`TAU_GIT_COMMIT`), for the code
//! version in each run's `summary.json`. Outside a git checkout, or without git, the
//! variable is empty and the summary says the commit is unknown.

use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "HEAD"]);
    println!("cargo:rustc-env=TAU_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves (a commit, a checkout).
    let git_dir = git(&["rev-parse", "--absolute-git-dir"]);
    if !git_dir.is_empty() {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
        if !head_ref.is_empty() {
            println!("cargo:rerun-if-changed={git_dir}/{head_ref}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
