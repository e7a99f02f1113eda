//! The tensor records of a `.pth` file, before any weight is read: [`read_index`] finds
//! the state_dict in the vetted `data.pkl`, strips DataParallel's and `torch.compile`'s
//! prefixes and applies the [`Rename`]s into a [`PthIndex`].
//!
//! # Example
//!
//! akamaster's layout (`module.` prefix, the head named `linear`) read with the rename
//! its head needs, and with a misspelt one, which matches nothing and is refused.
//!
//! ```
//! use std::path::Path;
//! use tau_model::pth::{PthError, PthOptions, read_index};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
//! let path = dir.join("cifar8-akamaster.pth");
//! let options = PthOptions { renames: vec!["linear.=fc.".parse()?], ..Default::default() };
//! let index = read_index(&path, &options)?;
//! assert_eq!((index.stripped.as_slice(), index.renamed[0].1), (&["module.".to_string()][..], 2));
//! let fc = index.tensors.iter().find(|t| t.name == "fc.weight").unwrap();
//! assert_eq!(fc.file_name, "module.linear.weight");
//!
//! let typo = PthOptions { renames: vec!["lienar.=fc.".parse()?], ..Default::default() };
//! let err = read_index(&path, &typo).unwrap_err();
//! assert!(matches!(err, PthError::Rename { .. }), "{err}");
//! assert!(err.to_string().contains("rename lienar.=fc. matches no tensor"), "{err}");
//! # Ok(()) }
//! ```

use std::collections::HashSet;

use candle::pickle::{Object, Stack};

use super::pickle::{
    describe, find_data_pkl, find_state_dict, open_zip, read_entry_limited, tensor_record,
};
use super::scan::scan_pickle;
use super::*;

/// Reads the tensor records of `path` (no weights): finds the state_dict, strips the
/// `module.` prefix, applies the renames. See the [example](PthIndex#example).
///
/// # Errors
/// A legacy or non-zip file, a zip without `data.pkl`, a corrupt or unsupported pickle, no
/// state_dict, a bad tensor record, a rename matching nothing, names colliding.
pub fn read_index(path: &Path, options: &PthOptions) -> Result<PthIndex, PthError> {
    let mut zip = open_zip(path)?;
    let pkl_name = find_data_pkl(path, &mut zip)?;
    let archive = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
    let bytes = read_entry_limited(path, &mut zip, &pkl_name, MAX_PICKLE_BYTES, "data.pkl")?;
    let pickle_err = |message: String| PthError::Pickle {
        path: path.to_path_buf(),
        message,
    };
    scan_pickle(&bytes).map_err(pickle_err)?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(&bytes))
        .map_err(|e| pickle_err(e.to_string()))?;
    let obj = stack.finalize().map_err(|e| pickle_err(e.to_string()))?;
    let (key, entries) = find_state_dict(path, obj, options.key.as_deref())?;

    let mut tensors = Vec::new();
    let mut ignored = Vec::new();
    for (k, v) in entries {
        let Object::Unicode(name) = k else {
            ignored.push(describe(&k));
            continue;
        };
        match tensor_record(&v, 0) {
            Ok(Some(t)) => tensors.push((name, t)),
            Ok(None) if name == "_metadata" => {}
            Ok(None) => ignored.push(name),
            Err(message) => {
                return Err(PthError::Tensor {
                    path: path.to_path_buf(),
                    name,
                    message,
                });
            }
        }
    }
    if tensors.is_empty() {
        return Err(PthError::NotStateDict {
            path: path.to_path_buf(),
            message: format!(
                "the {} holds no tensors",
                key.as_ref()
                    .map_or("file".to_string(), |k| format!("{k:?} entry"))
            ),
        });
    }

    let mut names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let (stripped, renamed) = strip_and_rename(path, &mut names, &options.renames)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for ((file_name, mut t), name) in tensors.into_iter().zip(names) {
        if !seen.insert(name.clone()) {
            return Err(PthError::Rename {
                path: path.to_path_buf(),
                message: format!(
                    "two tensors are named {name:?}{}",
                    if renamed.is_empty() && stripped.is_empty() {
                        String::new()
                    } else {
                        " after the prefixes are stripped and renamed".to_string()
                    }
                ),
            });
        }
        t.name = name;
        t.file_name = file_name;
        out.push(t);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PthIndex {
        tensors: out,
        key,
        stripped,
        renamed,
        ignored,
        archive,
    })
}

/// Each rename with the number of names it changed.
type RenameCounts = Vec<(Rename, usize)>;

/// Strips the [`STRIPPED_PREFIXES`] every name has, then applies `renames` in order;
/// returns the prefixes stripped and each rename's count.
fn strip_and_rename(
    path: &Path,
    names: &mut [String],
    renames: &[Rename],
) -> Result<(Vec<String>, RenameCounts), PthError> {
    let mut stripped = Vec::new();
    while let Some(p) = STRIPPED_PREFIXES
        .iter()
        .find(|p| names.iter().all(|n| n.starts_with(*p) && n.len() > p.len()))
    {
        for n in names.iter_mut() {
            n.drain(..p.len());
        }
        stripped.push(p.to_string());
    }
    let mut renamed = Vec::new();
    for r in renames {
        let mut count = 0;
        for n in names.iter_mut() {
            if let Some(rest) = n.strip_prefix(r.from.as_str()) {
                *n = format!("{}{rest}", r.to);
                count += 1;
            }
        }
        if count == 0 {
            let firsts: std::collections::BTreeSet<&str> = names
                .iter()
                .map(|n| n.split('.').next().unwrap_or(n))
                .collect();
            let firsts: Vec<&str> = firsts.into_iter().collect();
            return Err(PthError::Rename {
                path: path.to_path_buf(),
                message: format!(
                    "rename {r} matches no tensor (the names start with {})",
                    firsts.join(", ")
                ),
            });
        }
        renamed.push((r.clone(), count));
    }
    Ok((stripped, renamed))
}
