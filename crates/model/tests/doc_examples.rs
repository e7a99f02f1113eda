//! Every public item of the covered source files carries a doc example or a link to one,
//! and every covered module opens with an example.
//!
//! An item's doc comment counts when it holds a code block (```` ``` ````) or a Markdown
//! link whose target ends in `#example` (`[example](TauRule#example)`,
//! `[module example](self#example)`); the example it points to is a doc-test, run by
//! `cargo test --doc`, and `cargo doc` with `-D warnings` checks that the link resolves.
//! Items inside `#[cfg(test)]` modules are skipped; enum variants and struct fields are
//! covered by their type's example.

use std::path::{Path, PathBuf};

/// The files held to the rule, relative to `crates/model/src`: every `.rs` file of the
/// crate, found by walking the directory, so that a new file (a new model family, say) is
/// held to it from the start without being registered anywhere.
fn covered() -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src_dir(), &src_dir(), &mut files);
    files.sort();
    files
}

/// A public item that needs an example: its line (1-based), kind and name.
#[derive(Debug)]
struct Item {
    line: usize,
    kind: String,
    name: String,
}

/// The kind and name of a `pub` item declared on `line` (not `pub(crate)`, not `pub use`).
fn pub_item(line: &str) -> Option<(String, String)> {
    let mut rest = line.trim_start().strip_prefix("pub ")?;
    // `pub const fn`, `pub unsafe fn`, `pub async fn` are functions; `pub const NAME` is not.
    while let Some(r) = ["const ", "unsafe ", "async "].iter().find_map(|q| {
        rest.strip_prefix(q).filter(|r| {
            ["fn ", "unsafe ", "async "]
                .iter()
                .any(|k| r.starts_with(k))
        })
    }) {
        rest = r;
    }
    let (kind, rest) = rest.split_once(' ')?;
    if !matches!(
        kind,
        "fn" | "struct" | "enum" | "trait" | "type" | "const" | "static" | "union" | "mod"
    ) {
        return None;
    }
    let name: String = rest
        .trim_start_matches("mut ")
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then(|| (kind.to_string(), name))
}

/// The lines of `src` with the bodies of `#[cfg(test)]` items blanked out.
fn without_test_modules(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        out.push(line.to_string());
        if line.trim() != "#[cfg(test)]" {
            continue;
        }
        // Skip up to the item's opening brace, then to the brace that closes it.
        let mut depth = 0usize;
        let mut opened = false;
        for line in lines.by_ref() {
            out.push(String::new());
            let code = line.split("//").next().unwrap_or("");
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && code.trim_end().ends_with(';')) {
                break;
            }
        }
    }
    out
}

/// The doc comment and attributes directly above line `i`.
fn doc_above(lines: &[String], i: usize) -> String {
    let mut doc = Vec::new();
    let mut j = i;
    while j > 0 {
        let l = lines[j - 1].trim();
        if l.starts_with("///") || l.starts_with("#[") {
            doc.push(l);
            j -= 1;
        } else if l.ends_with(']') || l.ends_with("],") || l.ends_with(')') {
            // The last line of an attribute spread over several lines: go to its `#[`.
            let start = (0..j - 1)
                .rev()
                .find(|&k| lines[k].trim().starts_with("#["));
            match start {
                Some(k) if lines[k + 1..j].iter().all(|l| !l.trim().starts_with("///")) => {
                    j = k;
                }
                _ => break,
            }
        } else {
            break;
        }
    }
    doc.reverse();
    doc.join("\n")
}

/// Whether a doc comment holds an example or a Markdown link to one.
fn has_example(doc: &str) -> bool {
    doc.contains("```") || links_to_example(doc)
}

/// Whether `doc` has a link `[text](target#example)`.
fn links_to_example(doc: &str) -> bool {
    doc.match_indices("](").any(|(pos, _)| {
        let target = &doc[pos + 2..];
        target
            .find(')')
            .is_some_and(|end| target[..end].ends_with("#example"))
    })
}

/// The public items of `src` without an example or a link to one.
fn missing_examples(src: &str) -> Vec<Item> {
    let lines = without_test_modules(src);
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let (kind, name) = pub_item(line)?;
            // `pub mod name;` is documented by its file's `//!` docs, checked on their own.
            if kind == "mod" && line.trim_end().ends_with(';') {
                return None;
            }
            (!has_example(&doc_above(&lines, i))).then(|| Item {
                line: i + 1,
                kind,
                name,
            })
        })
        .collect()
}

/// Whether the module docs (`//!`) of `src` hold an example.
fn module_has_example(src: &str) -> bool {
    let docs: Vec<&str> = src
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("//!"))
        .collect();
    docs.join("\n").contains("```")
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn every_public_item_of_the_covered_files_has_an_example() {
    let mut problems = Vec::new();
    for file in &covered() {
        let path = src_dir().join(file);
        let src =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !module_has_example(&src) {
            problems.push(format!("src/{file}: the module docs have no example"));
        }
        for item in missing_examples(&src) {
            problems.push(format!(
                "src/{file}:{}: pub {} {} has no example and no [..](..#example) link",
                item.line, item.kind, item.name
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} public items without an example:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The `.rs` files under `dir`, relative to `root`, with `/` separators.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap();
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
}

/// The walk finds the crate's files, nested modules included (a broken walk would make
/// the rule above vacuous).
#[test]
fn every_source_file_is_covered() {
    let files = covered();
    for expected in [
        "lib.rs",
        "config.rs",
        "model.rs",
        "family.rs",
        "resnet/cifar/network.rs",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "src/{expected} not found among {files:?}"
        );
    }
    assert!(
        files.len() >= 20,
        "only {} files found: {files:?}",
        files.len()
    );
}

/// The scanner itself: an undocumented item is found, a linked or exemplified one is
/// not, and test modules are skipped.
#[test]
fn the_scan_finds_an_item_without_an_example() {
    let src = r#"//! A module.
//!
//! ```
//! assert!(true);
//! ```

/// With an example.
///
/// ```
/// assert_eq!(1 + 1, 2);
/// ```
pub struct Shown;

/// Linked. See the [example](Shown#example).
#[derive(Debug)]
#[cfg_attr(
    feature = "x",
    derive(Clone)
)]
pub enum Linked {}

impl Shown {
    /// Nothing to see.
    pub fn bare(&self) {}

    /// Only a mention of an example, no link.
    pub const fn mentioned() {}

    /// In the [module example](self#example).
    pub(crate) fn private() {}
}

/// No doc example.
pub const LIMIT: usize = 1;

pub mod inner;

#[cfg(test)]
mod tests {
    pub fn helper() {}
}

pub static AFTER_TESTS: u8 = 0;
"#;
    assert!(module_has_example(src));
    let missing: Vec<String> = missing_examples(src)
        .iter()
        .map(|i| format!("{}:{} {}", i.line, i.kind, i.name))
        .collect();
    assert_eq!(
        missing,
        [
            "24:fn bare",
            "27:fn mentioned",
            "34:const LIMIT",
            "43:static AFTER_TESTS"
        ]
    );
    assert!(!module_has_example("//! No example here.\npub fn f() {}\n"));
}
