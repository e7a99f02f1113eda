//! `cargo xtask sweep` (which builds xtask, then `tau-resnet`, in the release profile) and
//! the README's test command (`cargo test --workspace --release`) compile the dependencies
//! they share once only if cargo resolves the same features for them in both builds: a
//! dependency built with another feature set is compiled again, and with it everything
//! above it (a feature of `serde_core` or `getrandom` recompiles candle). Cargo resolves
//! features per build from the packages it builds, so a dev-dependency or an xtask
//! dependency that turns on a feature splits the builds; this test says which.
//!
//! xtask's own build is not held to this: its dependencies (serde, syn, regex, image's
//! helpers) resolve fewer features than the test build's, and unifying them would mean
//! declaring host-side dependencies it does not use; they are small, and compiled twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// `name vX.Y.Z` → its features, as `cargo tree` resolves them for `args`.
fn features(args: &[&str]) -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "tree",
            "--offline",
            "--prefix",
            "none",
            "--format",
            "{p}|{f}",
        ])
        .args(args)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (package, features) = l.split_once('|')?;
            // `name vX.Y.Z (path or "proc-macro")`: the name and version identify it.
            let id: Vec<&str> = package.split_whitespace().take(2).collect();
            let features = features.trim_end_matches(" (*)");
            Some((id.join(" "), features.to_string()))
        })
        .collect()
}

fn assert_same_features(build: &[&str], what: &str) {
    let alone = features(build);
    let tests = features(&["--workspace", "-e", "normal,build,dev"]);
    let split: Vec<String> = alone
        .iter()
        .filter_map(|(id, f)| {
            let t = tests.get(id)?;
            (t != f).then(|| format!("{id}: [{f}] alone, [{t}] in the test build"))
        })
        .collect();
    assert!(
        split.is_empty(),
        "{what} and `cargo test --workspace --release` resolve different features, so the \
         test build compiles these (and everything above them) a second time; declare the \
         test build's features in {what}'s Cargo.toml (see crates/cli/Cargo.toml):\n{}",
        split.join("\n")
    );
}

#[test]
fn the_sweep_binary_and_the_tests_share_their_dependency_builds() {
    assert_same_features(&["-p", "tau-resnet", "-e", "normal,build"], "tau-resnet");
}
