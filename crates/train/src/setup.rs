//! Turning a validated [`RunConfig`] into a run: loading the data, building the model and
//! its optimizer, creating the run directory, and resuming a run from its last checkpoint.
//!
//! Everything that can fail on bad input (config, data files, model/data mismatch,
//! checkpoint) is checked before the run directory is created, so a failed start leaves
//! nothing behind.

use std::path::{Path, PathBuf};

use crate::error::{Context, bail};
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use tau_model::family::Input;
use tau_model::{Model, ModelConfig, ParamKind};
use tau_records::{CONFIG_FILE, METRICS_FILE};

use crate::config::{LossKind, RunConfig, SourceKind};
use crate::optim::{Param, ParamSpec, Sgd, SgdConfig};
use crate::records::{MetricsWriter, Summary};
use crate::trainer::{
    ModelStore, RunOptions, Session, TrainModel, TrainState, last_checkpoint,
    load_checkpoint_state, natural_cmp, run_loop, write_config,
};

mod data;

pub use data::{DataRecord, ImageData, RunData, load_data, load_data_with};

/// A τ-ResNet of the model crate, as the loop sees it.
pub struct TauModel {
    /// The architecture.
    pub cfg: ModelConfig,
    /// The model's tensors (weights and BatchNorm statistics).
    pub varmap: VarMap,
    /// The built model, reading its tensors from `varmap`.
    pub model: Model,
    /// The device the tensors live on.
    pub device: Device,
    /// What each checkpoint records beside the architecture: the input's preprocessing,
    /// the data set, the class names (see [`tau_model::CheckpointConfig`]).
    pub record: tau_model::CheckpointConfig,
}

impl TauModel {
    /// Initializes a model with `seed`.
    ///
    /// # Errors
    /// An invalid config or device errors.
    pub fn init(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let varmap =
            tau_model::init_varmap(cfg, seed, dtype, device).context("initializing the model")?;
        Self::from_varmap(cfg, varmap, device)
    }

    /// Wraps a model config and its tensors (for example a loaded checkpoint); the model's
    /// dtype is the tensors'.
    ///
    /// # Errors
    /// Tensors that do not fit the config (missing, unexpected, misshapen, mixed dtypes).
    pub fn from_varmap(cfg: &ModelConfig, varmap: VarMap, device: &Device) -> crate::Result<Self> {
        let model = Model::from_varmap(cfg, &varmap, device).context("building the model")?;
        Ok(TauModel {
            cfg: cfg.clone(),
            varmap,
            model,
            device: device.clone(),
            record: tau_model::CheckpointConfig::new(cfg.clone()),
        })
    }

    /// Loads the weights of a checkpoint directory (`config.json` + `model.safetensors`)
    /// into this model, after checking that the checkpoint has this architecture.
    ///
    /// # Errors
    /// Missing or corrupt files, another architecture, a missing tensor or one of another
    /// shape.
    pub fn load_weights(&self, dir: &Path) -> crate::Result<()> {
        let (ck_cfg, weights) = tau_model::checkpoint::load(dir, &self.device)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        if ck_cfg != self.cfg {
            bail!(
                "{} holds a different architecture ({}) than the run ({})",
                dir.display(),
                describe(&ck_cfg),
                describe(&self.cfg)
            );
        }
        let weights = weights
            .data()
            .lock()
            .map_err(|_| crate::error::err!("checkpoint lock poisoned"))?
            .clone();
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| crate::error::err!("model lock poisoned"))?;
        for (name, var) in data.iter() {
            let t = weights
                .get(name)
                .with_context(|| format!("{}: tensor `{name}` is missing", dir.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, the model needs {:?}",
                    dir.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.as_tensor().to_dtype(var.dtype())?)
                .with_context(|| format!("{}: loading `{name}`", dir.display()))?;
        }
        Ok(())
    }
}

/// A one-line description of an architecture for error messages.
pub fn describe(cfg: &ModelConfig) -> String {
    serde_json::to_string(cfg).unwrap_or_else(|_| cfg.family().to_string())
}

impl TrainModel for TauModel {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle::Result<Tensor> {
        self.model.forward_t(xs, train)
    }

    fn learnable_tau(&self) -> candle::Result<Option<f64>> {
        if self.cfg.learnable_tau() {
            Ok(Some(self.model.tau()?))
        } else {
            Ok(None)
        }
    }

    fn h_ratio(&self, xs: &Tensor) -> candle::Result<Option<f64>> {
        match self.model.as_theory() {
            Some(t) => Ok(t.forward_traced(xs)?.mean_ratio()),
            None => Ok(None),
        }
    }

    fn inference(&self) -> candle::Result<Option<Box<dyn TrainModel>>> {
        let model = Model::inference(&self.cfg, &self.varmap, &self.device)?;
        Ok(Some(Box::new(Inference(model))))
    }

    fn loss_backward(
        &self,
        xs: &Tensor,
        loss: &mut dyn FnMut(&Tensor) -> candle::Result<Tensor>,
    ) -> candle::Result<Option<(Tensor, Tensor, candle::backprop::GradStore)>> {
        self.model.loss_backward(xs, loss)
    }
}

/// A model on detached tensors ([`Model::inference`]): what [`TauModel`] evaluates with.
struct Inference(Model);

impl TrainModel for Inference {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle::Result<Tensor> {
        self.0.forward_t(xs, train)
    }
}

impl ModelStore for TauModel {
    fn save(&self, dir: &Path) -> crate::Result<()> {
        let record = tau_model::CheckpointConfig {
            model: self.cfg.clone(),
            ..self.record.clone()
        };
        tau_model::checkpoint::save_with(dir, &record, &self.varmap)
            .with_context(|| format!("writing the model checkpoint into {}", dir.display()))
    }
}

impl TauModel {
    /// The optimizer's parameters: every trainable tensor (by the model's [`ParamKind`]),
    /// minus the config's `optim.freeze` prefixes, in natural name order, with its group:
    /// τ, the scalar biases and Fixup's multipliers at `small_lr_factor` × lr, τ's
    /// gradient divided by L, no weight decay on τ; SkipInit's and ReZero's α at the main
    /// lr without weight decay.
    ///
    /// # Errors
    /// An `optim.freeze` prefix that matches no parameter; a poisoned lock (not expected).
    pub fn params(&self, cfg: &RunConfig) -> crate::Result<Vec<Param>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| crate::error::err!("model lock poisoned"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        if let Some(f) =
            (cfg.optim.freeze.iter()).find(|f| !names.iter().any(|n| n.starts_with(f.as_str())))
        {
            let examples: Vec<&str> = names.iter().take(3).map(|n| n.as_str()).collect();
            bail!(
                "`optim.freeze`: no parameter name starts with `{f}` (the model's names are like {})",
                examples.join(", ")
            );
        }
        let small = cfg.optim.small_lr_factor;
        let l = self.cfg.n_blocks().max(1) as f64;
        let mut params = Vec::new();
        for name in names {
            if cfg
                .optim
                .freeze
                .iter()
                .any(|f| name.starts_with(f.as_str()))
            {
                continue;
            }
            let spec = match self.cfg.param_kind(name) {
                ParamKind::Weight | ParamKind::BnAffine => ParamSpec::WEIGHT,
                // Fixup's scalars, biases and multipliers alike, at lr/10 (the Fixup
                // authors' code), with weight decay as every other group there.
                ParamKind::ScalarBias | ParamKind::BranchScale => ParamSpec {
                    lr_mult: small,
                    grad_scale: 1.0,
                    weight_decay: true,
                },
                // SkipInit's and ReZero's α at the main learning rate (ReZero trains α
                // with the network's weights); no weight decay, like τ (a scale).
                ParamKind::Alpha => ParamSpec {
                    lr_mult: 1.0,
                    grad_scale: 1.0,
                    weight_decay: false,
                },
                ParamKind::Tau => ParamSpec {
                    lr_mult: small,
                    grad_scale: 1.0 / l,
                    weight_decay: false,
                },
                ParamKind::Buffer | ParamKind::Frozen => continue,
            };
            params.push(Param {
                name: name.clone(),
                var: data[name].clone(),
                spec,
            });
        }
        Ok(params)
    }
}

/// Checks that the model takes the data's inputs and produces its outputs.
///
/// # Errors
/// A mismatch, naming the model key to change.
pub fn check_fit(model: &ModelConfig, data: &RunData, loss: LossKind) -> crate::Result<()> {
    match model.as_family().input() {
        Input::Vectors { dim } => {
            if data.input_shape != [dim] {
                bail!(
                    "`model.input_dim` is {}, the data has {} features per example",
                    dim,
                    data.input_shape.iter().product::<usize>()
                );
            }
            if model.num_outputs() != data.outputs {
                bail!(
                    "`model.output_dim` is {}, the data has {} {}",
                    model.num_outputs(),
                    data.outputs,
                    if loss == LossKind::CrossEntropy {
                        "classes"
                    } else {
                        "target dimensions"
                    }
                );
            }
        }
        Input::Images { channels } => check_image_model(channels, model.num_outputs(), data)?,
    }
    Ok(())
}

fn check_image_model(in_channels: usize, num_classes: usize, data: &RunData) -> crate::Result<()> {
    match data.input_shape.as_slice() {
        [c, _, _] if *c == in_channels => {}
        [c, _, _] => bail!("`model.in_channels` is {in_channels}, the images have {c} channels"),
        _ => bail!("convolutional models need image data, not vectors"),
    }
    if num_classes != data.outputs {
        bail!(
            "`model.num_classes` is {num_classes}, the data has {} classes",
            data.outputs
        );
    }
    Ok(())
}

/// A run ready to start or continue: everything loaded and checked.
pub struct Prepared {
    /// The resolved config.
    pub cfg: RunConfig,
    /// The device.
    pub device: Device,
    /// The model.
    pub model: TauModel,
    /// The optimizer over its trained parameters.
    pub optimizer: Sgd,
    /// The data.
    pub data: RunData,
}

/// Loads the data and builds the model and optimizer of a validated config, on `device`.
///
/// # Errors
/// Bad data, a model that does not fit the data, device errors.
pub fn prepare(cfg: &RunConfig, device: &Device) -> crate::Result<Prepared> {
    let dtype = cfg.dtype.dtype();
    let flat = matches!(cfg.model.as_family().input(), Input::Vectors { .. });
    if cfg.loss.kind == LossKind::CrossEntropy && cfg.data.source == SourceKind::Synthetic {
        bail!("synthetic data has real-valued targets: use `loss.kind = \"squared\"`");
    }
    let (data, record) = load_data_with(cfg, dtype, device, flat, None)?;
    if device.is_cpu() {
        check_step_memory(cfg, &data)?;
    }
    let mut prepared = Prepared::from_parts(cfg, device, data)?;
    prepared.model.record = record.checkpoint_config(&cfg.model);
    Ok(prepared)
}

/// Refuses a run whose training step (a batch of `data.batch_size` examples, or the
/// whole training set when it is smaller) needs more memory than is available.
fn check_step_memory(cfg: &RunConfig, data: &RunData) -> crate::Result<()> {
    let batch = cfg.data.batch_size.min(data.train.len()).max(1);
    let lower = match cfg.model.as_theory() {
        Some(_) => format!(
            "data.batch_size ({}), model.width or model.depth",
            cfg.data.batch_size
        ),
        None => format!("data.batch_size ({}) or model.depth", cfg.data.batch_size),
    };
    crate::memory::check(
        crate::memory::step(&cfg.model, batch, &data.input_shape),
        &format!(
            "a training step on {batch} examples of shape {:?}",
            data.input_shape
        ),
        &lower,
    )
}

impl Prepared {
    /// Builds the model and optimizer of a validated config for data already loaded
    /// (for data sets that do not come from `[data]`, such as test fixtures).
    ///
    /// # Errors
    /// A model that does not fit the data, device errors.
    pub fn from_parts(cfg: &RunConfig, device: &Device, data: RunData) -> crate::Result<Prepared> {
        check_fit(&cfg.model, &data, cfg.loss.kind)?;
        let model = TauModel::init(&cfg.model, cfg.seed, cfg.dtype.dtype(), device)?;
        let params = model.params(cfg)?;
        if params.is_empty() {
            bail!("the model has no trained parameters (see `optim.freeze`)");
        }
        let optimizer = Sgd::new(
            params,
            SgdConfig {
                momentum: cfg.optim.momentum,
                nesterov: cfg.optim.nesterov,
                weight_decay: cfg.optim.weight_decay,
                weight_decay_mode: cfg.optim.weight_decay_mode,
            },
        );
        Ok(Prepared {
            cfg: cfg.clone(),
            device: device.clone(),
            model,
            optimizer,
            data,
        })
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

fn session<'a>(p: &'a mut Prepared) -> Session<'a> {
    Session {
        cfg: &p.cfg,
        model: &p.model,
        optimizer: &mut p.optimizer,
        train: p.data.train.as_ref(),
        test: p.data.test.as_deref(),
        store: &p.model,
        device_name: device_name(&p.device),
    }
}

/// Starts a new run in `run_dir`: refuses a directory that already holds a run, or holds
/// anything but a sweep driver's files ([`tau_records::DRIVER_FILES`]); creates it, writes
/// `config.toml`, then trains.
///
/// # Errors
/// An existing run or other files in `run_dir`, an unwritable directory, and the errors of
/// the loop.
pub fn start(mut prepared: Prepared, run_dir: &Path, opts: &RunOptions) -> crate::Result<Summary> {
    let text = prepared.cfg.to_toml()?;
    if run_dir.join(CONFIG_FILE).exists() || run_dir.join(METRICS_FILE).exists() {
        bail!(
            "{} already holds a run: resume it with `--resume {}` or choose another `--out`",
            run_dir.display(),
            run_dir.display()
        );
    }
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", run_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with('.')
                || tau_records::DRIVER_FILES.contains(&name.as_str())
                || name == tau_records::CHECKPOINTS_DIR;
            if !ours {
                bail!(
                    "{} is not empty and holds no run (`{name}` is there): choose another \
                     `--out`, or empty it",
                    run_dir.display()
                );
            }
        }
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    write_config(run_dir, &text)?;
    let metrics = MetricsWriter::create(run_dir)?;
    let state = TrainState {
        seed: prepared.cfg.seed,
        ..TrainState::default()
    };
    run_loop(session(&mut prepared), run_dir, state, metrics, opts)
}

/// The resolved config of an existing run directory.
///
/// # Errors
/// A missing or invalid `config.toml`.
pub fn run_config(run_dir: &Path) -> crate::Result<RunConfig> {
    let path = run_dir.join(CONFIG_FILE);
    if !path.exists() {
        bail!(
            "{} is not a run directory (no config.toml)",
            run_dir.display()
        );
    }
    crate::config::load_config(&path, &[])
}

/// Continues the run in `run_dir` from its last checkpoint.
///
/// # Errors
/// No checkpoint, a checkpoint of another architecture or a corrupt one, and the errors
/// of the loop.
pub fn resume(mut prepared: Prepared, run_dir: &Path, opts: &RunOptions) -> crate::Result<Summary> {
    let ckpt = last_checkpoint(run_dir).with_context(|| {
        format!(
            "{} has no checkpoint to resume from (checkpoints/last)",
            run_dir.display()
        )
    })?;
    prepared.model.load_weights(&ckpt)?;
    let state = load_checkpoint_state(&ckpt, &mut prepared.optimizer)?;
    if state.seed != prepared.cfg.seed {
        bail!(
            "{}: checkpoint seed {} differs from the config's seed {}",
            ckpt.display(),
            state.seed,
            prepared.cfg.seed
        );
    }
    let metrics = MetricsWriter::resume(run_dir, state.metrics_len)?;
    run_loop(session(&mut prepared), run_dir, state, metrics, opts)
}

/// The default run directory for a config and an optional `--out`.
pub fn run_dir_for(cfg: &RunConfig, out: Option<&Path>) -> PathBuf {
    cfg.run_dir(out)
}
