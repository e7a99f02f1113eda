//! Checkpoints: a directory holding `config.json` (the architecture, τ rule and resolved
//! τ) and `model.safetensors` (every parameter and buffer, PyTorch names), the Hugging
//! Face layout. Both files are written atomically (temporary file, then rename), and
//! loading checks every tensor's name, shape and dtype against the config, and that its
//! values are finite.
//!
//! `config.json` is one of
//! - the wrapper this module writes ([`CheckpointConfig`]):
//!   `{"model": {"family": "cifar_resnet", ...}, "n_blocks": 54, "tau_resolved": 0.136,
//!   "dtype": "f32", "preprocessing": {"mean": [...], "std": [...], "input_size": [3, 32, 32]},
//!   "dataset": "cifar10", "class_names": ["airplane", ...]}` (all fields but `model`
//!   optional: checkpoints written before the preprocessing fields load unchanged);
//! - a bare model config `{"family": "cifar_resnet", "depth": 110, ...}`, handy when
//!   exporting from PyTorch;
//! - timm's `{"architecture": "resnet50", "num_classes": 1000, "pretrained_cfg": {...}}`
//!   (see [`crate::timm`]).
//!
//! # Example
//!
//! A save and load round trip: the files, what `config.json` records, and every tensor
//! back bit for bit.
//!
//! ```
//! use candle::{DType, Device};
//! use tau_model::checkpoint::{self, CONFIG_FILE, WEIGHTS_FILE};
//! use tau_model::{ModelConfig, init_varmap, named_vars};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let (dir, dev) = (tmp.path().join("theory-l4"), Device::Cpu);
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "theory", "input_dim": 2, "width": 8, "depth": 4, "tau": "1/sqrt(L)"}"#,
//! )?;
//! let varmap = init_varmap(&cfg, 0, DType::F32, &dev)?;
//! assert_eq!(checkpoint::check_varmap(&cfg, &varmap)?, DType::F32);
//! checkpoint::save(&dir, &cfg, &varmap)?;
//! assert!(dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file());
//!
//! // config.json records L, τ resolved there (1/√4) and the dtype.
//! let written = checkpoint::load_config(&dir.join(CONFIG_FILE))?;
//! assert_eq!(written.n_blocks, Some(4));
//! assert_eq!(written.tau_resolved, Some(0.5));
//! assert_eq!(written.dtype.as_deref(), Some("f32"));
//!
//! let (cfg2, varmap2) = checkpoint::load(&dir, &dev)?;
//! assert_eq!(cfg2, cfg);
//! assert_eq!(checkpoint::varmap_dtype(&varmap2), Some(DType::F32));
//! let (before, after) = (named_vars(&varmap), named_vars(&varmap2));
//! assert_eq!(before.len(), 6); // A, W_1..W_4, B
//! for ((name, x), (name2, y)) in before.iter().zip(&after) {
//!     assert_eq!(name, name2);
//!     assert_eq!(x.flatten_all()?.to_vec1::<f32>()?, y.flatten_all()?.to_vec1::<f32>()?);
//! }
//! // The same from explicit file paths, and the weights alone for a config already read.
//! let (cfg3, _) = checkpoint::load_files(&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_FILE), &dev)?;
//! assert_eq!(cfg3, cfg);
//! let weights = checkpoint::load_weights(&written, &dir.join(WEIGHTS_FILE), &dev)?;
//! assert_eq!(named_vars(&weights).len(), 6);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::preprocess::Preprocessing;

mod loading;
mod saving;

pub use loading::{load, load_checkpoint, load_config, load_files, load_weights};
pub use saving::{save, save_with};

/// The architecture file of a checkpoint. See the [module example](self#example).
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of a checkpoint. See the [module example](self#example).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Largest `config.json` read (a config is a few hundred bytes; timm's with ImageNet's
/// class names and descriptions about 100 KB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Everything that can go wrong saving or loading a checkpoint; each names the file and,
/// where there is one, the tensor.
///
/// # Example
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::{CheckpointError, ModelConfig, checkpoint, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let (dir, dev) = (tmp.path(), Device::Cpu);
/// // Nothing there: the I/O error names the file.
/// let err = checkpoint::load(&dir.join("absent"), &dev).err().unwrap();
/// let CheckpointError::Io { path, .. } = &err else { panic!("{err}") };
/// assert!(path.ends_with("absent/config.json"));
///
/// // The weights of a depth-2 theory network under a config that says depth 3.
/// let json = |depth| {
///     format!(r#"{{"family": "theory", "input_dim": 2, "width": 4, "depth": {depth}}}"#)
/// };
/// let cfg: ModelConfig = serde_json::from_str(&json(2))?;
/// checkpoint::save(dir, &cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?)?;
/// std::fs::write(dir.join("config.json"), json(3))?;
/// let err = checkpoint::load(dir, &dev).err().unwrap();
/// let CheckpointError::MissingTensor { name, .. } = &err else { panic!("{err}") };
/// assert_eq!(name, "blocks.2.weight");
/// assert!(err.to_string().ends_with(
///     r#"model.safetensors: missing tensor "blocks.2.weight" (required by the theory config)"#
/// ));
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` does not parse or describes an invalid model.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `model.safetensors` is not a valid safetensors file (truncated, garbage, bad header).
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor the config requires is absent.
    #[error("{}: missing tensor {name:?} (required by the {family} config)", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The model family.
        family: String,
    },
    /// A tensor the config does not know.
    #[error("{}: unexpected tensor {name:?} (not part of the {family} config)", path.display())]
    UnexpectedTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The model family.
        family: String,
    },
    /// A tensor whose shape differs from the config's.
    #[error("{}: tensor {name:?} has shape {found:?}, the config expects {expected:?}", path.display())]
    Shape {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor of a non-float dtype, or of a dtype different from the others.
    #[error("{}: tensor {name:?} has dtype {found}, expected {expected}", path.display())]
    Dtype {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Dtype in the file.
        found: String,
        /// What was expected.
        expected: String,
    },
    /// A tensor holding NaN or infinite values (the weights of a diverged or corrupt
    /// run), which would make every output NaN.
    #[error(
        "{}: tensor {name:?} holds non-finite values ({})",
        path.display(),
        non_finite_counts(*nan, *inf)
    )]
    NonFinite {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// How many of its values are NaN.
        nan: usize,
        /// How many are +∞ or −∞.
        inf: usize,
    },
    /// The hub could not provide the checkpoint.
    #[error("hub repo {id:?}: {message}")]
    Hub {
        /// The repo id.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// A tensor operation failed (device errors).
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// The `config.json` this module writes: the architecture, and what a user of the
/// weights needs to know (the input's preprocessing, the data set, the class names).
///
/// # Example
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::checkpoint::{self, CheckpointConfig};
/// use tau_model::{ModelConfig, Preprocessing, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let model: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
/// let mut cfg = CheckpointConfig::new(model.clone());
/// cfg.preprocessing = Some(Preprocessing::cifar10());
/// cfg.dataset = Some("cifar10".into());
/// cfg.class_names = Some(
///     ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
///         .map(String::from)
///         .to_vec(),
/// );
/// cfg.check()?;
/// assert_eq!(cfg.class_name(3), "cat");
/// // One class name per output of the model, which has 10.
/// let mut short = cfg.clone();
/// short.class_names = Some(vec!["cat".into()]);
/// assert_eq!(short.check().unwrap_err(), "class_names has 1 names, the model has 10 outputs");
///
/// // save_with writes it next to the weights, with L, τ and the dtype filled in.
/// let varmap = init_varmap(&model, 0, DType::F32, &Device::Cpu)?;
/// checkpoint::save_with(tmp.path(), &cfg, &varmap)?;
/// let (back, _varmap) = checkpoint::load_checkpoint(tmp.path(), &Device::Cpu)?;
/// assert_eq!(back.preprocessing, Some(Preprocessing::cifar10()));
/// assert_eq!(back.n_blocks, Some(3)); // depth 8 = 6·1 + 2: three blocks
///
/// // A config written before the preprocessing fields existed reads with them unset.
/// let old: CheckpointConfig = serde_json::from_str(
///     r#"{"model": {"family": "cifar_resnet", "depth": 20}, "n_blocks": 9, "dtype": "f32"}"#,
/// )?;
/// assert_eq!(old.preprocessing, None);
/// assert_eq!(old.class_name(7), "class 7");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The architecture.
    pub model: ModelConfig,
    /// L, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_blocks: Option<usize>,
    /// τ resolved at L (a learnable τ's current value is the `tau` tensor); checked
    /// against the rule on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau_resolved: Option<f64>,
    /// The weights' dtype (`f32`, `f64`, `f16`, `bf16`); checked on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// What the model expects of its input (mean, std, input size and channels, resize
    /// and crop); its channels must be the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<Preprocessing>,
    /// The data set the weights were trained on (`mnist`, `cifar10`, `imagenet-1k`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The name of each output class, one per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl CheckpointConfig {
    /// A config of `model` with nothing else recorded. See the
    /// [example](CheckpointConfig#example).
    pub fn new(model: ModelConfig) -> Self {
        CheckpointConfig {
            model,
            n_blocks: None,
            tau_resolved: None,
            dtype: None,
            preprocessing: None,
            dataset: None,
            class_names: None,
        }
    }

    /// The name of class `i`: its [`Self::class_names`] entry, else `class {i}`. See the
    /// [example](CheckpointConfig#example).
    pub fn class_name(&self, i: usize) -> String {
        self.class_names
            .as_ref()
            .and_then(|n| n.get(i))
            .cloned()
            .unwrap_or_else(|| format!("class {i}"))
    }

    /// Checks everything beside the model's own settings: `n_blocks` and `tau_resolved`
    /// against the model, a known `dtype`, a valid preprocessing with the model's input
    /// channels, one class name per output. See the [example](CheckpointConfig#example).
    ///
    /// # Errors
    /// One message naming the bad field.
    pub fn check(&self) -> Result<(), String> {
        let model = &self.model;
        model.validate().map_err(|e| e.to_string())?;
        if let Some(n) = self.n_blocks
            && n != model.n_blocks()
        {
            return Err(format!(
                "n_blocks is {n} but the model has {} blocks",
                model.n_blocks()
            ));
        }
        if let Some(tau) = self.tau_resolved {
            let want = model.tau_init();
            if !tau.is_finite() || (tau - want).abs() > 1e-9 * want.abs() {
                return Err(format!(
                    "tau_resolved is {tau} but rule {} gives {want} at L = {}",
                    model.tau_rule(),
                    model.n_blocks()
                ));
            }
        }
        if let Some(s) = &self.dtype {
            s.parse::<DType>()
                .map_err(|_| format!("unknown dtype {s:?}"))?;
        }
        if let Some(p) = &self.preprocessing {
            p.validate().map_err(|e| e.to_string())?;
            match model.in_channels() {
                Some(c) if c != p.channels() => {
                    return Err(format!(
                        "preprocessing: input_size has {} channels, the model takes {c}",
                        p.channels()
                    ));
                }
                None => {
                    return Err(format!(
                        "preprocessing is for image models; the {} network takes vectors",
                        model.family()
                    ));
                }
                _ => {}
            }
        }
        if let Some(names) = &self.class_names
            && names.len() != model.num_outputs()
        {
            return Err(format!(
                "class_names has {} names, the model has {} outputs",
                names.len(),
                model.num_outputs()
            ));
        }
        Ok(())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `3 NaN`, `2 infinite` or `3 NaN, 2 infinite`: what [`CheckpointError::NonFinite`] says.
fn non_finite_counts(nan: usize, inf: usize) -> String {
    match (nan, inf) {
        (n, 0) => format!("{n} NaN"),
        (0, i) => format!("{i} infinite"),
        (n, i) => format!("{n} NaN, {i} infinite"),
    }
}

fn dtype_name(dtype: DType) -> String {
    dtype.as_str().to_string()
}

/// The tensors of `varmap`, by name.
fn varmap_tensors(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle::Error::Msg("the VarMap lock is poisoned".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect())
}

/// The dtype shared by the tensors of a `VarMap` (`None` when it is empty). See the
/// [module example](self#example).
pub fn varmap_dtype(varmap: &VarMap) -> Option<DType> {
    let data = varmap.data().lock().ok()?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names.first().map(|n| data[*n].dtype())
}

/// The tensors of `varmap` in a dtype every device computes in: in f32 when they are
/// narrower (f16, bf16, the 8-bit floats), in which candle's CPU kernels have no matrix
/// product or convolution; else `varmap` itself (f32, f64). Widening is exact: a model
/// built from the result computes with the checkpoint's very weights.
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::checkpoint::{varmap_dtype, widen_to_f32};
/// use tau_model::{ModelConfig, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
/// let half = init_varmap(&cfg, 0, DType::BF16, &Device::Cpu)?;
/// let wide = widen_to_f32(&half)?;
/// assert_eq!(varmap_dtype(&wide), Some(DType::F32));
/// let double = init_varmap(&cfg, 0, DType::F64, &Device::Cpu)?;
/// assert_eq!(varmap_dtype(&widen_to_f32(&double)?), Some(DType::F64));
/// # Ok(()) }
/// ```
///
/// # Errors
/// A device error converting a tensor.
pub fn widen_to_f32(varmap: &VarMap) -> Result<VarMap, CheckpointError> {
    let wide_enough = |t: &Tensor| matches!(t.dtype(), DType::F32 | DType::F64);
    let tensors = varmap_tensors(varmap)?;
    if tensors.values().all(wide_enough) {
        return Ok(varmap.clone());
    }
    let wide = VarMap::new();
    {
        let mut data = wide
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("the VarMap lock is poisoned".into()))?;
        for (name, t) in tensors {
            let t = if wide_enough(&t) {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(wide)
}

/// Checks names, shapes and one common float dtype of `(name, shape, dtype)` entries
/// against `cfg`; returns that dtype.
fn check_tensors<'a>(
    cfg: &ModelConfig,
    path: &Path,
    entries: impl Iterator<Item = (&'a str, Vec<usize>, Result<DType, String>)>,
    expected_dtype: Option<DType>,
) -> Result<DType, CheckpointError> {
    let specs = cfg.param_specs();
    let by_name: HashMap<&str, &[usize]> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.shape.as_slice()))
        .collect();
    let family = cfg.family().to_string();
    let mut seen = std::collections::HashSet::new();
    let mut dtype = expected_dtype;
    let mut entries: Vec<_> = entries.collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (name, shape, dt) in entries {
        if name.ends_with(".num_batches_tracked") {
            continue;
        }
        let Some(expected) = by_name.get(name) else {
            return Err(CheckpointError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                family,
            });
        };
        if shape != *expected {
            return Err(CheckpointError::Shape {
                path: path.to_path_buf(),
                name: name.to_string(),
                found: shape,
                expected: expected.to_vec(),
            });
        }
        let dt = match dt {
            Ok(dt) if dt.is_float() => dt,
            Ok(dt) => {
                return Err(CheckpointError::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    found: dtype_name(dt),
                    expected: "a float dtype (f32, f64, f16, bf16)".into(),
                });
            }
            Err(found) => {
                return Err(CheckpointError::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    found,
                    expected: "a float dtype (f32, f64, f16, bf16)".into(),
                });
            }
        };
        match dtype {
            Some(want) if want != dt => {
                return Err(CheckpointError::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    found: dtype_name(dt),
                    expected: format!("{} like the other tensors", dtype_name(want)),
                });
            }
            _ => dtype = Some(dt),
        }
        seen.insert(name.to_string());
    }
    if let Some(spec) = specs.iter().find(|s| !seen.contains(&s.name)) {
        return Err(CheckpointError::MissingTensor {
            path: path.to_path_buf(),
            name: spec.name.clone(),
            family,
        });
    }
    dtype.ok_or_else(|| CheckpointError::Config {
        path: path.to_path_buf(),
        message: "the model has no tensors".into(),
    })
}

/// Checks that `varmap` holds exactly the tensors `cfg` describes: every name present,
/// none extra, each of its config shape, all of one float dtype; returns that dtype.
/// Errors name the tensor (the path they carry is `VarMap`). See the
/// [module example](self#example).
///
/// # Errors
/// A missing, unexpected, misshapen or mistyped tensor.
pub fn check_varmap(cfg: &ModelConfig, varmap: &VarMap) -> Result<DType, CheckpointError> {
    let tensors = varmap_tensors(varmap)?;
    check_tensors(
        cfg,
        Path::new("VarMap"),
        tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.dims().to_vec(), Ok(t.dtype()))),
        None,
    )
}
