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

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, PthError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut f, &mut magic).map_err(io_err(path))?;
    if n >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
        return Err(PthError::Legacy {
            path: path.to_path_buf(),
        });
    }
    if n < 4 || &magic != b"PK\x03\x04" {
        return Err(PthError::NotZip {
            path: path.to_path_buf(),
            message: if n == 0 {
                "the file is empty".into()
            } else {
                format!(
                    "it starts with bytes {:02x?}, not a zip header",
                    &magic[..n]
                )
            },
        });
    }
    let f = File::open(path).map_err(io_err(path))?;
    zip::ZipArchive::new(BufReader::new(f)).map_err(|e| PthError::NotZip {
        path: path.to_path_buf(),
        message: format!("{e} (truncated or damaged?)"),
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The name of the archive's `data.pkl` (`<archive>/data.pkl`, the shallowest one).
fn find_data_pkl(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
) -> Result<String, PthError> {
    zip.file_names()
        .filter_map(|n| n.ok())
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.to_string()))
        .map(|n| n.into_owned())
        .ok_or_else(|| PthError::NoDataPkl {
            path: path.to_path_buf(),
        })
}

fn read_entry_limited(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
    name: &str,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, PthError> {
    let pickle_err = |message: String| PthError::Pickle {
        path: path.to_path_buf(),
        message,
    };
    let f = zip
        .by_name(name)
        .map_err(|e| pickle_err(format!("cannot be read from the archive: {e}")))?;
    if f.size() > limit {
        return Err(pickle_err(format!(
            "{what} is {} bytes, more than the {limit} a state_dict's takes",
            f.size()
        )));
    }
    let mut buf = Vec::new();
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| pickle_err(format!("reading {what}: {e}")))?;
    Ok(buf)
}

/// Refuses big-endian archives (`<archive>/byteorder` says `big`); files without the
/// record (PyTorch < 1.10) are little-endian.
fn check_byte_order(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
    archive: &str,
) -> Result<(), PthError> {
    let name = format!("{archive}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(());
    }
    let order = read_entry_limited(path, zip, &name, 16, "byteorder")?;
    match order.trim_ascii() {
        b"little" => Ok(()),
        other => Err(PthError::NotZip {
            path: path.to_path_buf(),
            message: format!(
                "byte order {:?}: only little-endian files are read",
                String::from_utf8_lossy(other)
            ),
        }),
    }
}

/// A short description of a pickled object, for messages.
fn describe(obj: &Object) -> String {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => format!("class {module_name}.{class_name}"),
        Object::Int(v) => format!("int {v}"),
        Object::Long(v) => format!("int {v}"),
        Object::Float(v) => format!("float {v}"),
        Object::Unicode(s) => format!("{s:?}"),
        Object::Bool(b) => format!("{b}"),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Mark => "a mark".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("an object of class {module_name}.{class_name}"),
            // A module pickled whole: BUILD(REDUCE(class, args), state).
            Object::Reduce { .. } => describe(callable),
            _ => "an object".into(),
        },
        Object::PersistentLoad(_) => "a storage".into(),
    }
}

fn is_tensor(obj: &Object) -> bool {
    matches!(tensor_record(obj, 0), Ok(Some(_)))
}

/// The entries of an unpickled dict, key and value.
type DictEntries = Vec<(Object, Object)>;

/// The state_dict inside the unpickled object: its entries and the key it was under.
fn find_state_dict(
    path: &Path,
    obj: Object,
    key: Option<&str>,
) -> Result<(Option<String>, DictEntries), PthError> {
    let not = |message: String| PthError::NotStateDict {
        path: path.to_path_buf(),
        message,
    };
    let entries = match obj {
        Object::Dict(entries) => entries,
        other => {
            return Err(not(format!(
                "holds {}, not a state_dict (a dict of tensors): save model.state_dict()",
                describe(&other)
            )));
        }
    };
    let keys = |entries: &[(Object, Object)]| -> String {
        let ks: Vec<String> = entries.iter().map(|(k, _)| describe(k)).collect();
        ks.join(", ")
    };
    let take = |entries: Vec<(Object, Object)>, key: &str| -> Result<_, PthError> {
        let all = keys(&entries);
        let value = entries
            .into_iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v);
        match value {
            Some(Object::Dict(inner)) => Ok((Some(key.to_string()), inner)),
            Some(other) => Err(not(format!(
                "the {key:?} entry holds {}, not a state_dict (a dict of tensors){}",
                describe(&other),
                if matches!(other, Object::Reduce { .. } | Object::Build { .. }) {
                    ": a pickled module; save model.state_dict() instead"
                } else {
                    ""
                }
            ))),
            None => Err(not(format!("no {key:?} entry; the file's keys: {all}"))),
        }
    };
    if let Some(key) = key {
        return take(entries, key);
    }
    if entries.iter().any(|(_, v)| is_tensor(v)) {
        return Ok((None, entries));
    }
    for k in WRAPPER_KEYS {
        if entries
            .iter()
            .any(|(key, _)| matches!(key, Object::Unicode(s) if s == k))
        {
            return take(entries, k);
        }
    }
    Err(not(format!(
        "holds a dict without tensors and without a {} entry; its keys: {}; give the key of the state_dict",
        WRAPPER_KEYS.map(|k| format!("{k:?}")).join(" or "),
        keys(&entries)
    )))
}

fn int(obj: &Object, what: &str) -> Result<u64, String> {
    match obj {
        Object::Int(v) if *v >= 0 => Ok(*v as u64),
        Object::Long(v) if *v >= 0 => Ok(*v as u64),
        other => Err(format!("{what} is {}, not a size", describe(other))),
    }
}

fn ints(obj: &Object, what: &str) -> Result<Vec<usize>, String> {
    match obj {
        Object::Tuple(items) => items
            .iter()
            .map(|o| {
                let v = int(o, what)?;
                usize::try_from(v).map_err(|_| format!("{what} {v} is too large"))
            })
            .collect(),
        other => Err(format!("{what} is {}, not a tuple", describe(other))),
    }
}

/// The storage classes of `torch.save` and their dtypes (those candle reads).
fn storage_dtype(class: &str) -> Result<DType, String> {
    Ok(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(other.to_string()),
    })
}

/// The tensor record `obj` describes (`torch._utils._rebuild_tensor_v2` and the wrappers
/// `_rebuild_parameter`, `_rebuild_parameter_with_state`, `_rebuild_from_type_v2` around
/// it); `Ok(None)` when `obj` is not a tensor, `Err` for a malformed record.
fn tensor_record(obj: &Object, depth: usize) -> Result<Option<PthTensor>, String> {
    let Object::Reduce { callable, args } = obj else {
        return Ok(None);
    };
    let Object::Class {
        module_name,
        class_name,
    } = &**callable
    else {
        return Ok(None);
    };
    let Object::Tuple(args) = &**args else {
        return Ok(None);
    };
    if module_name != "torch._utils" && module_name != "torch._tensor" {
        return Ok(None);
    }
    if depth > 4 {
        return Err("tensor record nested too deeply".into());
    }
    let bad = |what: &str| format!("malformed tensor record: {what}");
    match class_name.as_str() {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let data = args.first().ok_or_else(|| bad("parameter without data"))?;
            return tensor_record(data, depth + 1)?
                .map(Some)
                .ok_or_else(|| bad("parameter data is not a tensor"));
        }
        "_rebuild_from_type_v2" => {
            // (func, type, args, state)
            let (Some(func), Some(inner)) = (args.first(), args.get(2)) else {
                return Err(bad("_rebuild_from_type_v2 with fewer than 3 arguments"));
            };
            let inner = Object::Reduce {
                callable: Box::new(func.clone()),
                args: Box::new(inner.clone()),
            };
            return tensor_record(&inner, depth + 1)?
                .map(Some)
                .ok_or_else(|| bad("_rebuild_from_type_v2 of something else than a tensor"));
        }
        "_rebuild_tensor_v2" => {}
        other => {
            return Err(format!(
                "saved with torch._utils.{other}, which this reader does not read (a quantized or sparse tensor?)"
            ));
        }
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if args.len() < 4 {
        return Err(bad("_rebuild_tensor_v2 with fewer than 4 arguments"));
    }
    let Object::PersistentLoad(pid) = &args[0] else {
        return Err(bad("the storage is not a persistent id"));
    };
    // ('storage', storage class, key, location, numel)
    let Object::Tuple(pid) = &**pid else {
        return Err(bad("the storage id is not a tuple"));
    };
    if pid.len() < 5 || pid[0] != Object::Unicode("storage".into()) {
        return Err(bad(
            "the storage id is not ('storage', class, key, location, size)",
        ));
    }
    let Object::Class { class_name, .. } = &pid[1] else {
        return Err(bad("the storage class is not a class"));
    };
    let Object::Unicode(key) = &pid[2] else {
        return Err(bad("the storage key is not a string"));
    };
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(bad(&format!("storage key {key:?}")));
    }
    let storage_len = int(&pid[4], "the storage size")?;
    let offset = int(&args[1], "the storage offset")?;
    let shape = ints(&args[2], "the size")?;
    let stride = ints(&args[3], "the stride")?;
    if shape.len() != stride.len() {
        return Err(bad(&format!(
            "size {shape:?} and stride {stride:?} of different lengths"
        )));
    }
    Ok(Some(PthTensor {
        name: String::new(),
        file_name: String::new(),
        dtype: storage_dtype(class_name),
        shape,
        stride,
        offset,
        storage: key.clone(),
        storage_len,
    }))
}

/// Checks a pickle before candle's reader builds it: only the opcodes that reader knows
/// (protocol 2, as `torch.save` writes), every argument inside the data, nesting at most
/// [`MAX_PICKLE_DEPTH`], and the objects it builds (memo copies included) within a memory
/// budget proportional to its size, so that a hostile file cannot make the reader allocate
/// without bound, recurse without bound or panic. It follows the reader's stack: each
/// slot is the nesting depth and estimated size of the object there.
fn scan_pickle(data: &[u8]) -> Result<(), String> {
    #[derive(Clone, Copy)]
    struct Slot {
        mark: bool,
        depth: u32,
        bytes: u64,
    }
    let leaf = |bytes: u64| {
        let s = Slot {
            mark: false,
            depth: 1,
            bytes: OBJECT_BYTES + bytes,
        };
        (s, s.bytes)
    };
    let budget = (64u64 << 20) + 32 * data.len() as u64;
    let mut built: u64 = 0;
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: HashMap<u32, Slot> = HashMap::new();
    let mut pos = 0usize;
    let arg = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| format!("truncated: an argument at byte {pos} runs past the end"))?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    fn pop(stack: &mut Vec<Slot>) -> Result<Slot, String> {
        stack
            .pop()
            .ok_or_else(|| "malformed: pops an empty stack".to_string())
    }
    fn to_mark(stack: &mut Vec<Slot>) -> Result<Vec<Slot>, String> {
        let at = stack
            .iter()
            .rposition(|s| s.mark)
            .ok_or_else(|| "malformed: no mark on the stack".to_string())?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    let combine = |items: &[Slot]| {
        let s = Slot {
            mark: false,
            depth: 1 + items.iter().map(|s| s.depth).max().unwrap_or(0),
            bytes: OBJECT_BYTES + items.iter().map(|s| s.bytes).sum::<u64>(),
        };
        (s, OBJECT_BYTES)
    };
    while pos < data.len() {
        let at = pos;
        let op = data[pos];
        pos += 1;
        // The object this op pushes, with the bytes it allocates (a new object's own; its
        // children are moved into it, not copied).
        let pushed: Option<(Slot, u64)> = match op {
            0x80 => {
                arg(&mut pos, 1)?;
                None
            }
            b'c' => {
                let mut len = 0;
                for _ in 0..2 {
                    let nl = data[pos..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| format!("truncated: GLOBAL at byte {at}"))?;
                    len += nl;
                    pos += nl + 1;
                }
                Some(leaf(len as u64))
            }
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                arg(&mut pos, n)?;
                Some(leaf(0))
            }
            0x8a => {
                let n = arg(&mut pos, 1)?[0] as usize;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes at byte {at} (at most 8)"));
                }
                arg(&mut pos, n)?;
                Some(leaf(0))
            }
            b'X' => {
                let n = u32_at(arg(&mut pos, 4)?) as usize;
                let s = arg(&mut pos, n)?;
                std::str::from_utf8(s)
                    .map_err(|_| format!("a string at byte {at} is not UTF-8"))?;
                Some(leaf(n as u64))
            }
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | b'd' => Some(leaf(0)),
            b'(' => {
                stack.push(Slot {
                    mark: true,
                    ..leaf(0).0
                });
                built += OBJECT_BYTES;
                None
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    arg(&mut pos, 1)?[0] as u32
                } else {
                    u32_at(arg(&mut pos, 4)?)
                };
                let top = *stack
                    .last()
                    .ok_or_else(|| "malformed: memoizes an empty stack".to_string())?;
                built += top.bytes;
                memo.insert(id, top);
                None
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    arg(&mut pos, 1)?[0] as u32
                } else {
                    u32_at(arg(&mut pos, 4)?)
                };
                let s = *memo
                    .get(&id)
                    .ok_or_else(|| format!("malformed: memo {id} read before it is written"))?;
                built += s.bytes;
                stack.push(s);
                None
            }
            b'Q' => {
                let x = pop(&mut stack)?;
                Some(combine(&[x]))
            }
            b't' => {
                let items = to_mark(&mut stack)?;
                Some(combine(&items))
            }
            0x85..=0x87 => {
                let k = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(k);
                for _ in 0..k {
                    items.push(pop(&mut stack)?);
                }
                Some(combine(&items))
            }
            b'b' | b'R' | 0x81 => {
                let a = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                Some(combine(&[a, b]))
            }
            b'a' | b's' | b'e' | b'u' => {
                let items = match op {
                    b'a' => vec![pop(&mut stack)?],
                    b's' => vec![pop(&mut stack)?, pop(&mut stack)?],
                    _ => to_mark(&mut stack)?,
                };
                let top = stack
                    .last_mut()
                    .ok_or_else(|| "malformed: adds items to an empty stack".to_string())?;
                for s in items {
                    top.depth = top.depth.max(s.depth + 1);
                    top.bytes += s.bytes;
                }
                if top.depth > MAX_PICKLE_DEPTH {
                    return Err(format!("objects nested deeper than {MAX_PICKLE_DEPTH}"));
                }
                None
            }
            b'.' => return Ok(()),
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at byte {at} is not one of the protocol-2 opcodes torch.save writes (a newer pickle protocol or not a torch.save file)"
                ));
            }
        };
        if let Some((s, allocated)) = pushed {
            if s.depth > MAX_PICKLE_DEPTH {
                return Err(format!("objects nested deeper than {MAX_PICKLE_DEPTH}"));
            }
            built += allocated;
            stack.push(s);
        }
        if built > budget {
            return Err(format!(
                "would build more than {budget} bytes of objects from {} bytes (repeated memo copies?)",
                data.len()
            ));
        }
    }
    Err("truncated: no STOP opcode".into())
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
