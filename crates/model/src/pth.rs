//! PyTorch `.pth` files read as the tensors of a model: the zip archive `torch.save` has
//! written since PyTorch 1.6 (`<name>/data.pkl`, a protocol-2 pickle, and one raw
//! little-endian file per storage under `<name>/data/`), parsed with candle's pickle
//! reader ([`candle::pickle`]).
//!
//! What is read: a bare `state_dict`, or one inside a dict (`{'state_dict': …}`,
//! `{'model': …}`, found by itself, or any key given in [`PthOptions::key`]); DataParallel's
//! `module.` prefix (and `torch.compile`'s `_orig_mod.`) is stripped when every tensor name
//! has it; [`Rename`]s replace name prefixes (akamaster's CIFAR ResNets call the head
//! `linear`: `linear.=fc.`); integer `*.num_batches_tracked` buffers are dropped. Then every
//! name and shape is checked against the model config's tensors
//! ([`ModelConfig::param_specs`], the list checkpoint loading checks against), and all the
//! differences are reported in one error ([`PthError::Mismatch`]) before any weight is read.
//!
//! Legacy files (PyTorch < 1.6, a bare pickle rather than a zip) are recognized and refused
//! with the command that re-saves them. A corrupt, truncated or hostile file is an error
//! naming the file and, where there is one, the tensor; memory stays bounded: the pickle is
//! checked (size, nesting, the objects it would build) before candle's reader runs, and no
//! tensor is read beyond what the archive holds.
//!
//! # Example
//!
//! akamaster/pytorch_resnet_cifar10's checkpoint layout, here a CIFAR ResNet-8 saved by
//! `torch.save` in that layout (`{'state_dict': …}`, DataParallel's `module.` prefix, the
//! head named `linear`), and the same weights as `{'model': …}` without the rename. (Its
//! `resnet20.pth` reads the same way with `"depth": 20`, but its option-A shortcut pads the
//! new channels on both sides, so the imported network does not compute its function.)
//!
//! ```
//! use std::path::Path;
//! use candle::{DType, Device, Tensor};
//! use tau_model::{Model, ModelConfig};
//! use tau_model::pth::{PthOptions, STRIPPED_PREFIXES, WRAPPER_KEYS, load_pth};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "cifar_resnet", "depth": 8, "tau": "1/sqrt(L)"}"#,
//! )?;
//! let options = PthOptions { renames: vec!["linear.=fc.".parse()?], ..Default::default() };
//! let path = dir.join("cifar8-akamaster.pth");
//! let (varmap, report) = load_pth(&path, &cfg, &options, &Device::Cpu)?;
//! // Every tensor of the config, found under the first of the WRAPPER_KEYS.
//! assert_eq!(report.tensors, cfg.param_specs().len());
//! assert_eq!((report.key.as_deref(), report.dtype), (Some(WRAPPER_KEYS[0]), DType::F32));
//! assert_eq!(report.stripped, [STRIPPED_PREFIXES[0]]); // "module."
//! assert_eq!(report.renamed[0].1, 2); // linear.weight, linear.bias
//! // One num_batches_tracked per BatchNorm: the stem's and two per block.
//! assert_eq!(report.dropped.len(), 1 + 2 * 3);
//! let model = Model::from_varmap(&cfg, &varmap, &Device::Cpu)?;
//! let xs = Tensor::ones((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! let logits = model.forward_t(&xs, false)?;
//! assert_eq!(logits.dims(), [2, 10]);
//!
//! // The same weights in `{'model': …}` (the second wrapper key), no rename needed.
//! let path = dir.join("cifar8-model-dataparallel.pth");
//! let (same, report) = load_pth(&path, &cfg, &PthOptions::default(), &Device::Cpu)?;
//! assert_eq!(report.key.as_deref(), Some(WRAPPER_KEYS[1]));
//! assert!(report.to_string().starts_with(&format!("{} tensors (f32) from the \"model\" entry", report.tensors)));
//! let again = Model::from_varmap(&cfg, &same, &Device::Cpu)?.forward_t(&xs, false)?;
//! assert_eq!((again - logits)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle::pickle::{Object, Stack};
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::checkpoint::{CheckpointError, check_varmap};
use crate::config::ModelConfig;

mod pickle;

use pickle::*;

/// Largest `data.pkl` read (a ResNet-152's is about 100 KB). A larger one is a
/// [`PthError::Pickle`]; see the [module example](self#example) for a file that fits.
pub const MAX_PICKLE_BYTES: u64 = 16 << 20;
/// Deepest nesting of pickled objects accepted (a state_dict's is about 6).
const MAX_PICKLE_DEPTH: u32 = 64;
/// An estimate of the bytes one pickled object takes once built.
const OBJECT_BYTES: u64 = 64;
/// Wrapper keys tried, in order, when a file holds a dict without tensors. See the
/// [module example](self#example).
pub const WRAPPER_KEYS: [&str; 2] = ["state_dict", "model"];
/// Prefixes stripped when every tensor name has them: DataParallel's and torch.compile's.
/// See the [module example](self#example).
pub const STRIPPED_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// How to read a `.pth` file (see the module docs and the [module example](self#example)).
#[derive(Debug, Clone, Default)]
pub struct PthOptions {
    /// The key of the state_dict in a dict wrapping it; `None` finds it: the whole file
    /// when it holds tensors, else its `state_dict` or `model` entry.
    pub key: Option<String>,
    /// Prefix renames, applied in order to every name (after the `module.` prefix is
    /// stripped); each must match at least one tensor.
    pub renames: Vec<Rename>,
    /// Convert every tensor to this float dtype (`None`: keep the file's, which must then
    /// be one dtype for all tensors).
    pub dtype: Option<DType>,
}

/// A prefix rename `old=new`: a tensor name starting with `old` has it replaced by `new`.
///
/// # Example
///
/// ```
/// use tau_model::pth::Rename;
///
/// let r: Rename = "linear.=fc.".parse().unwrap();
/// assert_eq!((r.from.as_str(), r.to.as_str()), ("linear.", "fc."));
/// assert_eq!(r.to_string(), "linear.=fc.");
/// let drop: Rename = "features.=".parse().unwrap(); // an empty NEW drops the prefix
/// assert_eq!(drop.to, "");
/// assert!("=fc.".parse::<Rename>().unwrap_err().contains("non-empty OLD"));
/// assert!("linear".parse::<Rename>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// The prefix to replace (not empty).
    pub from: String,
    /// What replaces it (may be empty: `features.=` drops a prefix).
    pub to: String,
}

impl std::str::FromStr for Rename {
    type Err = String;

    /// Parses `old=new`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((from, to)) if !from.is_empty() => Ok(Rename {
                from: from.to_string(),
                to: to.to_string(),
            }),
            _ => Err(format!(
                "rename {s:?}: expected OLD=NEW with a non-empty OLD prefix (e.g. linear.=fc.)"
            )),
        }
    }
}

impl fmt::Display for Rename {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.from, self.to)
    }
}

/// What an import did, for the user to check. See the [module example](self#example).
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    /// The dict key the state_dict was found under (`None`: the whole file).
    pub key: Option<String>,
    /// The prefixes stripped from every name (`module.`).
    pub stripped: Vec<String>,
    /// Each rename with the number of tensors it renamed.
    pub renamed: Vec<(Rename, usize)>,
    /// Tensors dropped: `*.num_batches_tracked` buffers the model does not have.
    pub dropped: Vec<String>,
    /// Entries of the state_dict that are not tensors (ignored).
    pub ignored: Vec<String>,
    /// The tensors imported.
    pub tensors: usize,
    /// Their dtype.
    pub dtype: DType,
    /// The dtypes in the file, when a conversion changed them.
    pub converted_from: Vec<DType>,
}

impl fmt::Display for ImportReport {
    /// One line: `35 tensors (f32) from the 'state_dict' entry; stripped module.; renamed
    /// linear.=fc. (2); dropped 7 num_batches_tracked`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tensors ({})", self.tensors, self.dtype.as_str())?;
        match &self.key {
            Some(k) => write!(f, " from the {k:?} entry")?,
            None => write!(f, " from the file's state_dict")?,
        }
        if !self.converted_from.is_empty() {
            let from: Vec<&str> = self.converted_from.iter().map(|d| d.as_str()).collect();
            write!(f, "; converted from {}", from.join(", "))?;
        }
        if !self.stripped.is_empty() {
            write!(f, "; stripped {}", self.stripped.join(""))?;
        }
        for (r, n) in &self.renamed {
            write!(f, "; renamed {r} ({n})")?;
        }
        if !self.dropped.is_empty() {
            write!(f, "; dropped {} num_batches_tracked", self.dropped.len())?;
        }
        if !self.ignored.is_empty() {
            write!(
                f,
                "; ignored non-tensor entries {}",
                self.ignored.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Everything that can go wrong reading a `.pth` file; each names the file and, where
/// there is one, the tensor.
///
/// # Example
///
/// ```
/// use std::path::Path;
/// use candle::Device;
/// use tau_model::ModelConfig;
/// use tau_model::pth::{PthError, PthOptions, load_pth};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
/// let (options, cpu) = (PthOptions::default(), Device::Cpu);
/// // A ResNet-8's weights read as a ResNet-14: the file lacks blocks layer{1,2,3}.1.
/// let resnet14: ModelConfig =
///     serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 14}"#)?;
/// let err = load_pth(&dir.join("cifar8-bare.pth"), &resnet14, &options, &cpu).err().unwrap();
/// let PthError::Mismatch { names, .. } = &err else { panic!("{err}") };
/// assert!(names.missing.contains(&"layer3.1.conv2.weight".to_string()));
/// assert!(names.unexpected.is_empty() && names.misshapen.is_empty());
/// assert!(err.to_string().contains("cifar8-bare.pth")); // the file, named
///
/// // A file torch.save wrote before PyTorch 1.6: refused with the command that re-saves it.
/// let err = load_pth(&dir.join("legacy.pth"), &resnet14, &options, &cpu).err().unwrap();
/// assert!(matches!(err, PthError::Legacy { .. }));
/// assert!(err.to_string().contains("torch.save(torch.load("));
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A pre-1.6 PyTorch file: a bare pickle, not a zip archive.
    #[error(
        "{}: a legacy PyTorch file (a pickle, as torch.save wrote before PyTorch 1.6), not the zip format this reader reads; re-save it with PyTorch >= 1.6, whose default _use_new_zipfile_serialization=True writes the zip format: python -c \"import torch; torch.save(torch.load('OLD.pth', map_location='cpu'), 'NEW.pth')\"",
        path.display()
    )]
    Legacy {
        /// The file.
        path: PathBuf,
    },
    /// Not a zip archive, or a damaged one.
    #[error("{}: not a PyTorch .pth file (torch.save's zip format): {message}", path.display())]
    NotZip {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A zip archive without the `data.pkl` every `torch.save` file holds.
    #[error("{}: a zip archive without data.pkl: not a file torch.save wrote", path.display())]
    NoDataPkl {
        /// The file.
        path: PathBuf,
    },
    /// `data.pkl` is corrupt, truncated, too large, or uses what this reader does not know.
    #[error("{}: data.pkl: {message}", path.display())]
    Pickle {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file holds no state_dict this reader can find.
    #[error("{}: {message}", path.display())]
    NotStateDict {
        /// The file.
        path: PathBuf,
        /// What the file holds instead.
        message: String,
    },
    /// One tensor cannot be read: a bad record, an unsupported dtype, a missing or short
    /// storage.
    #[error("{}: tensor {name:?}: {message}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A rename that does not apply, or names that collide after renaming.
    #[error("{}: {message}", path.display())]
    Rename {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file's tensors are not the model's: every missing, unexpected and misshapen
    /// tensor, by name.
    #[error("{}: the tensors do not match the {family} config:{details}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The model family.
        family: String,
        /// The differences.
        names: Box<NameMismatch>,
        /// The lists as text, with a suggested rename where one would fit.
        details: String,
    },
    /// The imported tensors failed the checkpoint checks (mixed dtypes).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// The names that differ between a file and a model ([`PthError::Mismatch`]). See the
/// [example](PthError#example).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NameMismatch {
    /// Tensors the model needs that the file lacks, in the model's order.
    pub missing: Vec<String>,
    /// Tensors of the file the model does not have, sorted.
    pub unexpected: Vec<String>,
    /// `(name, shape in the file, shape of the model)`.
    pub misshapen: Vec<(String, Vec<usize>, Vec<usize>)>,
}

/// One tensor record of a `.pth` file (after the prefix handling and renames). See the
/// [example](PthIndex#example).
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    /// The name (after stripping and renames).
    pub name: String,
    /// The name in the file.
    pub file_name: String,
    /// The element type: `Ok(dtype)` for the storages candle reads (f32, f64, f16, bf16,
    /// i64, u8), `Err(storage class)` for others (`IntStorage`, `BoolStorage`…).
    pub dtype: Result<DType, String>,
    /// The shape.
    pub shape: Vec<usize>,
    /// The strides, in elements.
    pub stride: Vec<usize>,
    /// The offset into the storage, in elements.
    pub offset: u64,
    /// The storage's key (its file is `<archive>/data/<key>`).
    pub storage: String,
    /// The storage's size in elements, as the pickle claims it.
    pub storage_len: u64,
}

/// The tensor records of a `.pth` file and where they were found, before any weight is
/// read ([`read_index`]).
///
/// # Example
///
/// ```
/// use std::path::Path;
/// use candle::DType;
/// use tau_model::pth::{PthOptions, read_index};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
/// let index = read_index(&dir.join("cifar8-model-dataparallel.pth"), &PthOptions::default())?;
/// assert_eq!((index.key.as_deref(), index.stripped.as_slice()), (Some("model"), &["module.".to_string()][..]));
/// // Sorted by name; the name in the file keeps DataParallel's prefix.
/// let conv = index.tensors.iter().find(|t| t.name == "layer3.0.conv2.weight").unwrap();
/// assert_eq!(conv.file_name, "module.layer3.0.conv2.weight");
/// assert_eq!((conv.dtype.clone(), conv.shape.as_slice()), (Ok(DType::F32), &[64, 64, 3, 3][..]));
/// assert_eq!(conv.stride, [576, 9, 3, 1]); // contiguous
/// assert!(index.tensors.windows(2).all(|w| w[0].name < w[1].name));
/// // The integer BatchNorm counters are records too, until load_pth drops them.
/// let counter = index.tensors.iter().find(|t| t.name == "bn1.num_batches_tracked").unwrap();
/// assert_eq!((counter.dtype.clone(), counter.shape.len()), (Ok(DType::I64), 0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PthIndex {
    /// The tensors, sorted by name.
    pub tensors: Vec<PthTensor>,
    /// The dict key the state_dict was found under (`None`: the whole file).
    pub key: Option<String>,
    /// The prefixes stripped from every name.
    pub stripped: Vec<String>,
    /// Each rename with the number of tensors it renamed.
    pub renamed: Vec<(Rename, usize)>,
    /// Entries of the state_dict that are not tensors.
    pub ignored: Vec<String>,
    /// The archive's folder (`<archive>` of `<archive>/data.pkl`).
    archive: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PthError + '_ {
    move |source| PthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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

/// Reads `path` as the tensors of `cfg` onto `device`: [`read_index`], the names and
/// shapes checked against the config (all differences in one error), then the weights,
/// each checked against what the archive holds. Returns the tensors as a `VarMap` (checked
/// by [`check_varmap`], as checkpoint saving does) and what was done. See the
/// [module example](self#example).
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
    let entry = format!("{archive}data/{key}");
    let f = zip.by_name(&entry).map_err(|e| {
        tensor_err(
            neediest,
            format!("storage {key} ({entry}) cannot be read from the archive: {e}"),
        )
    })?;
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
    // A prefix rename that would turn unexpected names into missing ones.
    let head = |n: &str| {
        n.split_once('.')
            .map(|(h, r)| (h.to_string(), r.to_string()))
    };
    let missing_rest: HashMap<String, String> = missing
        .iter()
        .filter_map(|n| head(n))
        .map(|(h, r)| (r, h))
        .collect();
    let mut hints: Vec<String> = unexpected
        .iter()
        .filter_map(|n| {
            let (h, r) = head(n)?;
            let to = missing_rest.get(&r)?;
            Some(format!("{h}.={to}."))
        })
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

    /// A pickle that copies a memoized list into a new list twice, `levels` times: the
    /// objects double at every level (a "billion laughs" of memo copies).
    fn laughs(levels: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for l in 0..levels {
            let id = l as u8;
            p.extend([b']', b'h', id, b'a', b'h', id, b'a', b'q', id + 1]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn memo_copies_are_bounded() {
        assert!(scan_pickle(&laughs(4)).is_ok());
        let err = scan_pickle(&laughs(60)).unwrap_err();
        assert!(err.contains("would build more than"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 100)); // TUPLE1 a hundred times
        p.push(b'.');
        let err = scan_pickle(&p).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn truncated_and_odd_pickles_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "no STOP"),
            (
                &[0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'],
                "runs past the end",
            ),
            (&[0x80, 2, 0x8a, 40], "40 bytes"),
            (&[0x80, 2, b'h', 3, b'.'], "memo 3"),
            (&[0x80, 2, b't', b'.'], "no mark"),
            (&[0x80, 2, b'R', b'.'], "empty stack"),
            (&[0x80, 4, 0x95], "opcode 0x95"),
            (&[0x80, 2, b'c', b'a'], "GLOBAL"),
            (&[0x80, 2, b'X', 1, 0, 0, 0, 0xff, b'.'], "UTF-8"),
        ];
        for (p, want) in cases {
            let err = scan_pickle(p).unwrap_err();
            assert!(err.contains(want), "{p:?}: {err}");
        }
        assert!(scan_pickle(&[0x80, 2, b'}', b'.']).is_ok());
    }

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

    #[test]
    fn renames_parse() {
        let r: Rename = "linear.=fc.".parse().unwrap();
        assert_eq!((r.from.as_str(), r.to.as_str()), ("linear.", "fc."));
        let r: Rename = "features.=".parse().unwrap();
        assert_eq!(r.to, "");
        assert!("=fc.".parse::<Rename>().is_err());
        assert!("linear.".parse::<Rename>().is_err());
    }
}
