//! Loading checkpoints from a local directory or a Hugging Face hub model repo
//! ([`tau_hub`]): the local cache is tried first with no network access, and the files are
//! downloaded only on a cache miss, so a cached repo loads offline.
//!
//! Besides this crate's own checkpoints, timm's ResNet repos load as they are
//! (`timm/resnet50.a1_in1k`: their `config.json` is read by [`crate::timm`]), and so do
//! repos of bare torchvision weights without a `config.json` (`lmz/candle-resnet`'s
//! `resnet50.safetensors`) given the file name and the architecture:
//!
//! ```no_run
//! use candle::Device;
//! use tau_model::hub::{HubOptions, LoadSpec, load_pretrained};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let timm = load_pretrained("timm/resnet50.a1_in1k", &LoadSpec::default(), &HubOptions::default(), &dev)?;
//! let spec = LoadSpec {
//!     weights_file: Some("resnet50.safetensors".into()),
//!     config: Some(tau_model::timm::architecture_checkpoint_config("resnet50")?),
//!     ..Default::default()
//! };
//! let candle = load_pretrained("lmz/candle-resnet", &spec, &HubOptions::default(), &dev)?;
//! let model = candle.model(&dev)?;
//! // What the weights expect: ImageNet's statistics, resize to 256, crop 224.
//! assert_eq!(candle.config.preprocessing, Some(tau_model::Preprocessing::imagenet()));
//! # Ok(()) }
//! ```
//!
//! # Example
//!
//! A checkpoint loads from its directory, and from a hub cache with no network access
//! (`local_files_only`), here a cache laid out as the hub's: `refs/main` names the
//! commit, `snapshots/<commit>/` holds the files.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use tau_model::hub::{self, HubOptions};
//! use tau_model::{Model, ModelConfig, checkpoint, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let dev = Device::Cpu;
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "theory", "input_dim": 2, "width": 8, "depth": 4}"#,
//! )?;
//! let ckpt = tmp.path().join("ckpt");
//! checkpoint::save(&ckpt, &cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?)?;
//! let (cfg1, varmap1) = hub::from_pretrained(ckpt.to_str().unwrap(), None, &dev)?;
//!
//! // The same files as the repo `tau-resnet/example` in a hub cache.
//! let (cache, commit) = (tmp.path().join("hub"), "0123456789abcdef0123456789abcdef01234567");
//! let repo = cache.join("models--tau-resnet--example");
//! std::fs::create_dir_all(repo.join("refs"))?;
//! std::fs::write(repo.join("refs/main"), commit)?;
//! let snapshot = repo.join("snapshots").join(commit);
//! std::fs::create_dir_all(&snapshot)?;
//! for file in [checkpoint::CONFIG_FILE, checkpoint::WEIGHTS_FILE] {
//!     std::fs::copy(ckpt.join(file), snapshot.join(file))?;
//! }
//! let options = HubOptions {
//!     cache_dir: Some(cache),
//!     local_files_only: true,
//!     ..Default::default()
//! };
//! let (cfg2, varmap2) = hub::from_pretrained_with("tau-resnet/example", None, &options, &dev)?;
//! assert_eq!((&cfg1, &cfg2), (&cfg, &cfg));
//!
//! let xs = Tensor::ones((3, 2), DType::F32, &dev)?;
//! let y1 = Model::from_varmap(&cfg1, &varmap1, &dev)?.forward_t(&xs, false)?;
//! let y2 = Model::from_varmap(&cfg2, &varmap2, &dev)?.forward_t(&xs, false)?;
//! assert_eq!(y1.to_vec2::<f32>()?, y2.to_vec2::<f32>()?);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle::Device;
use candle_nn::VarMap;

use crate::checkpoint::{self, CONFIG_FILE, CheckpointConfig, CheckpointError, WEIGHTS_FILE};
use crate::config::ModelConfig;
use crate::model::Model;

/// Where and how to reach the hub. The defaults are `huggingface_hub`'s: the cache directory,
/// endpoint and token from the environment (`HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`,
/// `HF_TOKEN`…; see [`tau_hub`]).
///
/// # Example
///
/// A cache of its own, never the network: a cached file is found, a missing one is an
/// error naming it.
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::hub::{self, HubOptions};
/// use tau_model::{CheckpointError, ModelConfig, checkpoint, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// # let dev = Device::Cpu;
/// # let cfg: ModelConfig = serde_json::from_str(
/// #     r#"{"family": "theory", "input_dim": 2, "width": 8, "depth": 4}"#)?;
/// # let ckpt = tmp.path().join("ckpt");
/// # checkpoint::save(&ckpt, &cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?)?;
/// // `tau-resnet/example` in a hub cache (see the module example).
/// # let (cache, commit) = (tmp.path().join("hub"), "0123456789abcdef0123456789abcdef01234567");
/// # let repo = cache.join("models--tau-resnet--example");
/// # std::fs::create_dir_all(repo.join("refs"))?;
/// # std::fs::write(repo.join("refs/main"), commit)?;
/// # let snapshot = repo.join("snapshots").join(commit);
/// # std::fs::create_dir_all(&snapshot)?;
/// # for file in [checkpoint::CONFIG_FILE, checkpoint::WEIGHTS_FILE] {
/// #     std::fs::copy(ckpt.join(file), snapshot.join(file))?;
/// # }
/// let options = HubOptions {
///     cache_dir: Some(cache),
///     local_files_only: true,
///     ..Default::default()
/// };
/// let (config, weights) = hub::fetch("tau-resnet/example", Some("main"), &options)?;
/// assert_eq!(config, snapshot.join("config.json"));
/// assert_eq!(weights, snapshot.join("model.safetensors"));
///
/// let err = hub::fetch_file("tau-resnet/absent", None, "config.json", &options).unwrap_err();
/// let CheckpointError::Hub { id, message } = &err else { panic!("{err}") };
/// assert_eq!(id, "tau-resnet/absent");
/// assert!(message.starts_with("config.json: "));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The hub cache directory (the `…/huggingface/hub` folder).
    pub cache_dir: Option<PathBuf>,
    /// The hub endpoint URL.
    pub endpoint: Option<String>,
    /// An access token.
    pub token: Option<String>,
    /// How many times an interrupted download is resumed (`None`: 0).
    pub retry_max_attempts: Option<usize>,
    /// Never download: a cache miss is an error.
    pub local_files_only: bool,
}

impl HubOptions {
    fn hub_options(&self) -> tau_hub::HubOptions {
        tau_hub::HubOptions {
            cache_dir: self.cache_dir.clone(),
            endpoint: self.endpoint.clone(),
            token: self.token.clone(),
            retries: self.retry_max_attempts,
            offline: self.local_files_only,
        }
    }
}

/// What to load from a checkpoint directory or hub repo, beyond its name.
///
/// # Example
///
/// Bare weights, as torchvision's: another file name and no `config.json`, so the config
/// is given.
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::checkpoint::{self, CheckpointConfig};
/// use tau_model::hub::{self, HubOptions, LoadSpec};
/// use tau_model::{ModelConfig, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let (dir, dev) = (tmp.path().join("bare"), Device::Cpu);
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "theory", "input_dim": 2, "width": 8, "depth": 4}"#,
/// )?;
/// checkpoint::save(&dir, &cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?)?;
/// std::fs::rename(dir.join("model.safetensors"), dir.join("theory.safetensors"))?;
/// std::fs::remove_file(dir.join("config.json"))?;
///
/// let spec = LoadSpec {
///     weights_file: Some("theory.safetensors".into()),
///     config: Some(CheckpointConfig::new(cfg.clone())),
///     ..Default::default()
/// };
/// let id = dir.to_str().unwrap();
/// let loaded = hub::load_pretrained(id, &spec, &HubOptions::default(), &dev)?;
/// assert_eq!(loaded.config.model, cfg);
/// assert_eq!(loaded.weights_path, dir.join("theory.safetensors"));
/// // A weights file outside the directory is refused.
/// let outside = LoadSpec { weights_file: Some("../theory.safetensors".into()), ..spec };
/// assert!(hub::load_pretrained(id, &outside, &HubOptions::default(), &dev).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoadSpec {
    /// Branch, tag or commit of a hub repo (default `main`).
    pub revision: Option<String>,
    /// The weights file in the directory or repo (default `model.safetensors`), such as
    /// `resnet50.safetensors`.
    pub weights_file: Option<String>,
    /// The config to use instead of the directory's or repo's `config.json` (for weights
    /// without one: [`crate::timm::architecture_checkpoint_config`]).
    pub config: Option<CheckpointConfig>,
}

/// A loaded checkpoint: its whole config (model, preprocessing, class names) and tensors.
///
/// # Example
///
/// The checkpoint says how to prepare an image for its model.
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::checkpoint::{self, CheckpointConfig};
/// use tau_model::hub::{self, HubOptions, LoadSpec};
/// use tau_model::preprocess::{Preprocessing, image};
/// use tau_model::{ModelConfig, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let tmp = tempfile::tempdir()?;
/// let (dir, dev) = (tmp.path().join("cifar"), Device::Cpu);
/// let model: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
/// let mut cfg = CheckpointConfig::new(model.clone());
/// cfg.preprocessing = Some(Preprocessing::cifar10());
/// checkpoint::save_with(&dir, &cfg, &init_varmap(&model, 0, DType::F32, &dev)?)?;
///
/// let id = dir.to_str().unwrap();
/// let loaded = hub::load_pretrained(id, &LoadSpec::default(), &HubOptions::default(), &dev)?;
/// assert_eq!(loaded.weights_path, dir.join("model.safetensors"));
/// let prep = loaded.config.preprocessing.as_ref().unwrap();
/// let img = image::DynamicImage::new_rgb8(48, 40); // W×H: resized to 38×32, cropped to 32×32
/// let xs = prep.image_to_tensor(&img, &dev)?.unsqueeze(0)?;
/// let logits = loaded.model(&dev)?.forward_t(&xs, false)?;
/// assert_eq!(logits.dims(), [1, 10]);
/// # Ok(()) }
/// ```
pub struct Pretrained {
    /// The config, as read (or as given in [`LoadSpec::config`]).
    pub config: CheckpointConfig,
    /// Every tensor, checked against the config.
    pub varmap: VarMap,
    /// The weights file read (in the hub cache for a repo).
    pub weights_path: PathBuf,
}

impl std::fmt::Debug for Pretrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrained")
            .field("config", &self.config)
            .field("weights_path", &self.weights_path)
            .finish_non_exhaustive()
    }
}

impl Pretrained {
    /// The model, reading its tensors from [`Self::varmap`]. See the
    /// [example](Pretrained#example).
    ///
    /// # Errors
    /// Device errors.
    pub fn model(&self, device: &Device) -> candle::Result<Model> {
        Model::from_varmap(&self.config.model, &self.varmap, device)
    }
}

/// Loads a checkpoint (see [`checkpoint::load`]) from a local directory or a hub repo id,
/// with the default hub settings. See the [module example](self#example).
///
/// # Errors
/// As [`from_pretrained_with`].
pub fn from_pretrained(
    id_or_path: &str,
    revision: Option<&str>,
    device: &Device,
) -> Result<(ModelConfig, VarMap), CheckpointError> {
    from_pretrained_with(id_or_path, revision, &HubOptions::default(), device)
}

/// Loads a checkpoint from `id_or_path`: an existing local directory is loaded directly;
/// otherwise it is a hub model repo id (`owner/name`), whose `config.json` and
/// `model.safetensors` at `revision` (default `main`) come from the local cache, else
/// from the hub. [`load_pretrained`] returns the whole config and reads other layouts.
/// See the [module example](self#example).
///
/// # Errors
/// A path that is neither a directory nor a repo id, a repo or file the cache and the hub
/// cannot provide ([`CheckpointError::Hub`]), and every error of [`checkpoint::load`].
pub fn from_pretrained_with(
    id_or_path: &str,
    revision: Option<&str>,
    options: &HubOptions,
    device: &Device,
) -> Result<(ModelConfig, VarMap), CheckpointError> {
    let spec = LoadSpec {
        revision: revision.map(str::to_string),
        ..Default::default()
    };
    let p = load_pretrained(id_or_path, &spec, options, device)?;
    Ok((p.config.model, p.varmap))
}

/// Whether `name` is a relative path inside a directory (no `..`, not absolute).
fn is_inner_file(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Loads a checkpoint from a local directory or a hub repo id (see
/// [`from_pretrained_with`]), in any layout: this crate's, timm's (its `config.json` is
/// recognized), or bare weights with [`LoadSpec::weights_file`] and [`LoadSpec::config`].
/// See the [example](LoadSpec#example) and [this one](Pretrained#example).
///
/// # Errors
/// As [`from_pretrained_with`]; a weights file name that leaves the directory.
pub fn load_pretrained(
    id_or_path: &str,
    spec: &LoadSpec,
    options: &HubOptions,
    device: &Device,
) -> Result<Pretrained, CheckpointError> {
    let weights_file = spec.weights_file.as_deref().unwrap_or(WEIGHTS_FILE);
    if !is_inner_file(weights_file) {
        return Err(CheckpointError::Hub {
            id: id_or_path.to_string(),
            message: format!("weights file {weights_file:?} is not a file name inside it"),
        });
    }
    let path = Path::new(id_or_path);
    let (config, weights_path) = if path.is_dir() {
        let config = match &spec.config {
            Some(c) => c.clone(),
            None => checkpoint::load_config(&path.join(CONFIG_FILE))?,
        };
        (config, path.join(weights_file))
    } else if path.exists() || !tau_hub::is_repo_id(id_or_path) {
        return Err(CheckpointError::Hub {
            id: id_or_path.to_string(),
            message: "neither a checkpoint directory nor a hub repo id (owner/name)".into(),
        });
    } else {
        let revision = spec.revision.as_deref();
        let config = match &spec.config {
            Some(c) => c.clone(),
            None => {
                checkpoint::load_config(&fetch_file(id_or_path, revision, CONFIG_FILE, options)?)?
            }
        };
        let weights = fetch_file(id_or_path, revision, weights_file, options)?;
        (config, weights)
    };
    if spec.config.is_some() {
        config.check().map_err(|message| CheckpointError::Config {
            path: PathBuf::from("the given config"),
            message,
        })?;
    }
    let varmap = checkpoint::load_weights(&config, &weights_path, device)?;
    Ok(Pretrained {
        config,
        varmap,
        weights_path,
    })
}

/// Paths of `config.json` and `model.safetensors` of a hub repo, cache first. See the
/// [example](HubOptions#example).
///
/// # Errors
/// [`CheckpointError::Hub`] naming the file the cache and the hub cannot provide.
pub fn fetch(
    id: &str,
    revision: Option<&str>,
    options: &HubOptions,
) -> Result<(PathBuf, PathBuf), CheckpointError> {
    Ok((
        fetch_file(id, revision, CONFIG_FILE, options)?,
        fetch_file(id, revision, WEIGHTS_FILE, options)?,
    ))
}

/// The local path of one file of a hub repo, cache first (downloaded on a cache miss
/// unless [`HubOptions::local_files_only`]). See the [example](HubOptions#example).
///
/// # Errors
/// [`CheckpointError::Hub`] naming the file the cache and the hub cannot provide.
pub fn fetch_file(
    id: &str,
    revision: Option<&str>,
    file: &str,
    options: &HubOptions,
) -> Result<PathBuf, CheckpointError> {
    let hub = options.hub_options();
    tau_hub::fetch(tau_hub::RepoKind::Model, id, revision, file, &hub).map_err(|e| {
        CheckpointError::Hub {
            id: id.to_string(),
            message: format!("{file}: {e}"),
        }
    })
}
