//! A `.pth` file read as a model's tensors: [`load_pth`] checks the names and shapes of
//! the [`PthIndex`] against the config, all differences in one error, then reads each
//! storage, bounded by what the archive holds, into a `VarMap`.
//!
//! # Example
//!
//! akamaster's file without the rename of its head: one error lists what is missing and
//! what is unexpected, and suggests the rename.
//!
//! ```
//! use std::path::Path;
//! use candle::Device;
//! use tau_model::ModelConfig;
//! use tau_model::pth::{PthError, PthOptions, load_pth};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth/cifar8-akamaster.pth");
//! let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
//! let err = load_pth(&path, &cfg, &PthOptions::default(), &Device::Cpu).err().unwrap();
//! let PthError::Mismatch { names, .. } = &err else { panic!("{err}") };
//! assert_eq!(names.missing, ["fc.weight", "fc.bias"]); // in the model's order
//! assert_eq!(names.unexpected, ["linear.bias", "linear.weight"]); // sorted
//! assert!(err.to_string().contains("a rename would match them: linear.=fc."), "{err}");
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};

use candle::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::pickle::{check_byte_order, open_zip};
use super::*;
use crate::checkpoint::check_varmap;
use crate::config::ModelConfig;

/// Reads `path` as the tensors of `cfg` onto `device`: [`read_index`], the names and
/// shapes checked against the config (all differences in one error), then the weights,
/// each checked against what the archive holds. Returns the tensors as a `VarMap` (checked
/// by [`check_varmap`], as checkpoint saving does) and what was done. See the
/// [module example](super#example).
///
/// # Errors
/// See [`PthError`].
pub fn load_pth(
    path: &Path,
    cfg: &ModelConfig,
    options: &PthOptions,
    device: &Device,
) -> Result<(VarMap, ImportReport), PthError> {
    cfg.validate()?;
    if let Some(dt) = options.dtype
        && !dt.is_float()
    {
        return Err(candle::Error::Msg(format!(
            "cannot import as {}: a float dtype (f32, f64, f16, bf16) is needed",
            dt.as_str()
        ))
        .into());
    }
    let index = read_index(path, options)?;
    let specs = cfg.param_specs();
    let expected: HashMap<&str, &[usize]> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.shape.as_slice()))
        .collect();

    let mut dropped = Vec::new();
    let mut kept = Vec::new();
    for t in &index.tensors {
        if t.name.ends_with(".num_batches_tracked") && !expected.contains_key(t.name.as_str()) {
            dropped.push(t.name.clone());
            continue;
        }
        match &t.dtype {
            Ok(dt) if dt.is_float() => {}
            found => {
                let found = match found {
                    Ok(dt) => format!("dtype {}", dt.as_str()),
                    Err(class) => format!("storage class {class}"),
                };
                return Err(PthError::Tensor {
                    path: path.to_path_buf(),
                    name: t.file_name.clone(),
                    message: format!(
                        "{found}: only float tensors (f32, f64, f16, bf16) are model weights"
                    ),
                });
            }
        }
        kept.push(t);
    }
    check_names(path, cfg, &specs, &kept)?;

    // The weights, one storage at a time (a storage shared by several tensors is read once).
    let file_len = std::fs::metadata(path).map_err(io_err(path))?.len();
    let mut zip = open_zip(path)?;
    check_byte_order(path, &mut zip, &index.archive)?;
    let mut by_storage: BTreeMap<&str, Vec<&PthTensor>> = BTreeMap::new();
    for t in &kept {
        by_storage.entry(t.storage.as_str()).or_default().push(t);
    }
    let mut converted_from = Vec::new();
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("the VarMap lock is poisoned".into()))?;
        for (key, ts) in by_storage {
            let storage = read_storage(path, &mut zip, &index.archive, key, &ts, file_len)?;
            for t in ts {
                let dtype = t.dtype.clone().map_err(|class| PthError::Tensor {
                    path: path.to_path_buf(),
                    name: t.file_name.clone(),
                    message: format!("storage class {class}"),
                })?;
                let bytes = gather(&storage, t, dtype.size_in_bytes());
                let mut x = Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)?;
                if let Some(want) = options.dtype
                    && want != dtype
                {
                    if !converted_from.contains(&dtype) {
                        converted_from.push(dtype);
                    }
                    x = x.to_dtype(want)?;
                }
                let x = x.to_device(device)?;
                data.insert(t.name.clone(), Var::from_tensor(&x)?);
            }
        }
    }
    let dtype = check_varmap(cfg, &varmap)?;
    converted_from.sort_by_key(|d| d.as_str());
    let report = ImportReport {
        key: index.key,
        stripped: index.stripped,
        renamed: index.renamed,
        dropped,
        ignored: index.ignored,
        tensors: kept.len(),
        dtype,
        converted_from,
    };
    Ok((varmap, report))
}

/// The bytes of storage `key` that the tensors `ts` read, each tensor's span checked
/// against the storage's claimed size, the file's length and the archive entry before
/// anything is allocated (an error names the tensor needing the most).
fn read_storage(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
    archive: &str,
    key: &str,
    ts: &[&PthTensor],
    file_len: u64,
) -> Result<Vec<u8>, PthError> {
    let tensor_err = |t: &PthTensor, message: String| PthError::Tensor {
        path: path.to_path_buf(),
        name: t.file_name.clone(),
        message,
    };
    // A storage missing from the archive is said as such before its size is weighed.
    let entry = format!("{archive}data/{key}");
    let f = zip.by_name(&entry).map_err(|e| {
        tensor_err(
            ts[0],
            format!("storage {key} ({entry}) cannot be read from the archive: {e}"),
        )
    })?;
    let (mut needed, mut neediest) = (0u64, ts[0]);
    for &t in ts {
        let esize = t.dtype.as_ref().map_or(1, |d| d.size_in_bytes()) as u64;
        let end = span_end(t)
            .ok_or_else(|| tensor_err(t, "its shape, strides and offset overflow".into()))?;
        if end > t.storage_len {
            return Err(tensor_err(
                t,
                format!(
                    "needs elements up to {end} of storage {key}, which has {}",
                    t.storage_len
                ),
            ));
        }
        let bytes = end.saturating_mul(esize);
        if bytes > file_len {
            return Err(tensor_err(
                t,
                format!("storage {key} would need {bytes} bytes, more than the file's {file_len}"),
            ));
        }
        if bytes > needed {
            (needed, neediest) = (bytes, t);
        }
    }
    if f.size() < needed {
        return Err(tensor_err(
            neediest,
            format!(
                "storage {key} holds {} bytes, the tensors need {needed} (truncated file?)",
                f.size()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(needed as usize);
    f.take(needed)
        .read_to_end(&mut buf)
        .map_err(|e| tensor_err(neediest, format!("reading storage {key}: {e}")))?;
    if (buf.len() as u64) < needed {
        return Err(tensor_err(
            neediest,
            format!(
                "storage {key} ends after {} bytes, the tensors need {needed}",
                buf.len()
            ),
        ));
    }
    Ok(buf)
}

/// Every missing, unexpected and misshapen tensor, in one error.
fn check_names(
    path: &Path,
    cfg: &ModelConfig,
    specs: &[crate::config::ParamSpec],
    kept: &[&PthTensor],
) -> Result<(), PthError> {
    let found: HashMap<&str, &[usize]> = kept
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let expected: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<String> = specs
        .iter()
        .filter(|s| !found.contains_key(s.name.as_str()))
        .map(|s| s.name.clone())
        .collect();
    let unexpected: Vec<String> = kept
        .iter()
        .filter(|t| !expected.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    let misshapen: Vec<(String, Vec<usize>, Vec<usize>)> = specs
        .iter()
        .filter_map(|s| {
            let f = found.get(s.name.as_str())?;
            (*f != s.shape.as_slice()).then(|| (s.name.clone(), f.to_vec(), s.shape.clone()))
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && misshapen.is_empty() {
        return Ok(());
    }
    let mut details = String::new();
    let list = |names: &[String]| -> String {
        const SHOWN: usize = 12;
        let mut s = names
            .iter()
            .take(SHOWN)
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            s.push_str(&format!(", and {} more", names.len() - SHOWN));
        }
        s
    };
    if !missing.is_empty() {
        details.push_str(&format!(
            "\n  missing ({}): {}",
            missing.len(),
            list(&missing)
        ));
    }
    if !unexpected.is_empty() {
        details.push_str(&format!(
            "\n  unexpected ({}): {}",
            unexpected.len(),
            list(&unexpected)
        ));
    }
    if !misshapen.is_empty() {
        let shown: Vec<String> = misshapen
            .iter()
            .map(|(n, f, e)| format!("{n} is {f:?} in the file, {e:?} in the model"))
            .collect();
        details.push_str(&format!(
            "\n  misshapen ({}): {}",
            misshapen.len(),
            list(&shown)
        ));
    }
    // A prefix rename that would turn unexpected names into missing ones: `h.=t.` when the
    // names under `h.` in the file are exactly those missing under `t.`, and neither `h`
    // nor `t` pairs with anything else (a lone `weight` under several heads proves nothing).
    let subtrees = |names: &[String]| {
        let mut by_head: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in names {
            if let Some((h, r)) = n.split_once('.') {
                by_head
                    .entry(h.to_string())
                    .or_default()
                    .insert(r.to_string());
            }
        }
        by_head
    };
    let (from, to) = (subtrees(&unexpected), subtrees(&missing));
    let pairs: Vec<(&String, &String)> = from
        .iter()
        .flat_map(|(h, rest)| {
            to.iter()
                .filter(move |(_, r)| *r == rest)
                .map(move |(t, _)| (h, t))
        })
        .collect();
    let unique =
        |h: &String, t: &String| pairs.iter().filter(|(a, b)| *a == h || *b == t).count() == 1;
    let mut hints: Vec<String> = pairs
        .iter()
        .filter(|(h, t)| unique(h, t))
        .map(|(h, t)| format!("{h}.={t}."))
        .collect();
    hints.sort();
    hints.dedup();
    if !hints.is_empty() {
        details.push_str(&format!(
            "\n  a rename would match them: {}",
            hints.join(" ")
        ));
    }
    if cfg.family() == "cifar_resnet" && unexpected.iter().any(|n| n.contains(".downsample.")) {
        let shortcut = if unexpected.iter().any(|n| n.contains(".downsample.0.")) {
            "conv_bn"
        } else {
            "subsample_bn"
        };
        details.push_str(&format!(
            "\n  the file's shortcut has parameters (downsample): its CIFAR ResNet looks like shortcut = \"{shortcut}\""
        ));
    }
    Err(PthError::Mismatch {
        path: path.to_path_buf(),
        family: cfg.family().to_string(),
        names: Box::new(NameMismatch {
            missing,
            unexpected,
            misshapen,
        }),
        details,
    })
}

/// One past the last storage element the tensor reads (`None` on overflow).
fn span_end(t: &PthTensor) -> Option<u64> {
    if t.shape.contains(&0) {
        return Some(t.offset);
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last = last.checked_add((d as u64 - 1).checked_mul(s as u64)?)?;
    }
    last.checked_add(1)
}

/// The tensor's elements in row-major order, from the storage bytes (`esize` bytes each).
fn gather(storage: &[u8], t: &PthTensor, esize: usize) -> Vec<u8> {
    let numel: usize = t.shape.iter().product();
    let offset = t.offset as usize;
    let contiguous = {
        let mut acc = 1;
        let mut ok = true;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != acc {
                ok = false;
            }
            acc *= d;
        }
        ok
    };
    if contiguous || numel == 0 {
        return storage[offset * esize..(offset + numel) * esize].to_vec();
    }
    let mut out = Vec::with_capacity(numel * esize);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[at * esize..(at + 1) * esize]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(shape: Vec<usize>, stride: Vec<usize>, offset: u64) -> PthTensor {
        PthTensor {
            name: "w".into(),
            file_name: "w".into(),
            dtype: Ok(DType::U8),
            shape,
            stride,
            offset,
            storage: "0".into(),
            storage_len: 100,
        }
    }

    #[test]
    fn strided_tensors_are_gathered_in_row_major_order() {
        let storage: Vec<u8> = (0..20).collect();
        // A 2×3 tensor at offset 1: contiguous, transposed (a 3×2 stored column-major),
        // and with a broadcast (stride 0) dimension.
        let t = record(vec![2, 3], vec![3, 1], 1);
        assert_eq!(gather(&storage, &t, 1), [1, 2, 3, 4, 5, 6]);
        assert_eq!(span_end(&t), Some(7));
        let t = record(vec![2, 3], vec![1, 2], 1);
        assert_eq!(gather(&storage, &t, 1), [1, 3, 5, 2, 4, 6]);
        let t = record(vec![2, 3], vec![0, 1], 0);
        assert_eq!(gather(&storage, &t, 1), [0, 1, 2, 0, 1, 2]);
        assert_eq!(span_end(&t), Some(3));
        // Two-byte elements.
        let t = record(vec![2], vec![2], 0);
        assert_eq!(gather(&storage, &t, 2), [0, 1, 4, 5]);
        let t = record(vec![0, 3], vec![3, 1], 5);
        assert_eq!(gather(&storage, &t, 1), Vec::<u8>::new());
        assert_eq!(span_end(&record(vec![2], vec![usize::MAX], 0)), None);
    }
}
