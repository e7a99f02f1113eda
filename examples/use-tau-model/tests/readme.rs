//! The example runs to success, and the README quotes its story verbatim.

use std::path::Path;
use std::process::Command;

#[test]
fn example_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_use-tau-model"))
        .output()
        .expect("running the example");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lines between the `README` markers of src/main.rs, dedented by four spaces.
fn story() -> String {
    let src = include_str!("../src/main.rs");
    let start = src.find("// README:start\n").expect("start marker") + "// README:start\n".len();
    let end = src.find("    // README:end").expect("end marker");
    src[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn readme_quotes_the_example() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    assert!(
        readme.contains(&story()),
        "README.md's library example differs from examples/use-tau-model/src/main.rs; paste:\n{}",
        story()
    );
}
