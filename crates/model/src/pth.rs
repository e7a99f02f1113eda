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
//! ([`ModelConfig::param_specs`](crate::ModelConfig::param_specs), the list checkpoint
//! loading checks against), and all the differences are reported in one error
//! ([`PthError::Mismatch`]) before any weight is read.
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

use std::fmt;
use std::path::{Path, PathBuf};

use candle::DType;

use crate::checkpoint::CheckpointError;

mod index;
mod load;
mod pickle;
mod scan;

pub use index::read_index;
pub use load::load_pth;

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

#[cfg(test)]
mod tests {
    use super::*;

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
