//! docs/ARCHITECTURE.md's crate table names every workspace member, and nothing else.

use std::collections::BTreeSet;
use std::path::Path;

/// The folders of the workspace members: `crates/*` and `examples/*` holding a Cargo.toml,
/// and `xtask` (the root manifest's `members = ["crates/*", "examples/*", "xtask"]`).
fn members(root: &Path) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"members = ["crates/*", "examples/*", "xtask"]"#),
        "the workspace members changed: update this test"
    );
    let mut out = BTreeSet::new();
    for parent in ["crates", "examples"] {
        for entry in std::fs::read_dir(root.join(parent)).unwrap() {
            let path = entry.unwrap().path();
            if path.join("Cargo.toml").is_file() {
                out.insert(format!(
                    "{parent}/{}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    out.insert("xtask".into());
    out
}

/// The first column of the table under "## Crate boundaries".
fn table_crates(doc: &str) -> BTreeSet<String> {
    let section = doc
        .split("## Crate boundaries")
        .nth(1)
        .expect("docs/ARCHITECTURE.md has a Crate boundaries section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .filter_map(|l| l.split('|').nth(1))
        .map(|c| c.trim().trim_matches('`').to_string())
        .collect()
}

#[test]
fn architecture_table_lists_every_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let table = table_crates(&doc);
    assert_eq!(table, members(&root), "docs/ARCHITECTURE.md's crate table");
    // Each member's package name is in the table's second column.
    for dir in members(&root) {
        let manifest = std::fs::read_to_string(root.join(&dir).join("Cargo.toml")).unwrap();
        let name = manifest
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .unwrap()
            .trim_matches('"');
        assert!(
            doc.contains(&format!("| `{dir}` | `{name}`")),
            "{dir}: package `{name}` not in the table"
        );
    }
}
