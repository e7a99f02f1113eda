//! Run configuration: the TOML file that describes one training run, `--set key=value`
//! overrides on dotted keys, and validation.
//!
//! A run config is read into a [`toml::Table`], overrides are applied to the table, and
//! the table is deserialized into [`RunConfig`] with `deny_unknown_fields` everywhere, so a
//! typo or an ill-typed value is an error that names the dotted key.
//!
//! ```toml
//! name = "theory-gd"
//! seed = 0
//! steps = 2000
//!
//! [model]
//! family = "theory"
//! # ... the model crate's config
//!
//! [data]
//! source = "synthetic"
//! n = 32
//! p = 16
//! d = 1
//!
//! [loss]
//! kind = "squared"
//!
//! [optim]
//! kind = "gd"
//! lr = 0.02
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Context, bail};
use serde::{Deserialize, Serialize};

mod device;

pub use device::{DTypeSpec, DeviceSpec};

/// The architecture part of a run config, `[model]` in the file: the model crate's config,
/// tagged by `family` (`theory`, `cifar_resnet`, `bottleneck_resnet`).
pub type ModelSection = tau_model::ModelConfig;

/// One training run, as written in a `configs/*.toml` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A short name for the run; the default output directory is `runs/<name>`.
    pub name: String,
    /// The seed of every random draw: initialization, data order, augmentation, synthetic data.
    pub seed: u64,
    /// Number of passes over the training set. Exactly one of `epochs` and `steps` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Number of optimizer steps. Exactly one of `epochs` and `steps` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Stop (status `finished`) as soon as a step's training loss is below this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_loss: Option<f64>,
    /// Where to compute: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Floating-point type of parameters and activations.
    #[serde(default)]
    pub dtype: DTypeSpec,
    /// The run directory; `runs/<name>` when absent. `tau-resnet train --out` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<PathBuf>,
    /// The architecture (the model crate's config, tagged by `family`).
    pub model: ModelSection,
    /// The training and test data.
    pub data: DataConfig,
    /// The training loss.
    #[serde(default)]
    pub loss: LossConfig,
    /// The optimizer and its learning-rate schedule.
    pub optim: OptimConfig,
    /// Logging, evaluation and checkpoint cadence.
    #[serde(default)]
    pub log: LogConfig,
}

/// Where the data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// MNIST (IDX files, raw or gzipped).
    Mnist,
    /// CIFAR-10 (binary version).
    Cifar10,
    /// CIFAR-100 (binary version).
    Cifar100,
    /// An image folder (`train/<class>/*.jpg`, `test/<class>/*.jpg`).
    Folder,
    /// Unit-norm Gaussian inputs with random targets (the theory's setting).
    Synthetic,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Mnist => "mnist",
            SourceKind::Cifar10 => "cifar10",
            SourceKind::Cifar100 => "cifar100",
            SourceKind::Folder => "folder",
            SourceKind::Synthetic => "synthetic",
        })
    }
}

/// Which training examples a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    /// The whole set.
    #[default]
    All,
    /// The first `n` examples in file order: `subset = { first_n = 1000 }`.
    FirstN(usize),
    /// The first `k` examples of every class: `subset = { balanced_k = 10 }`.
    BalancedK(usize),
    /// `n` examples drawn without replacement with the run's seed: `subset = { random_n = 1000 }`.
    RandomN(usize),
}

/// Targets of the synthetic data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TargetsKind {
    /// Independent standard Gaussian targets: `targets = "gaussian"`.
    #[default]
    Gaussian,
    /// Outputs of a random ReLU teacher network:
    /// `targets = { teacher = { width = 64, depth = 1 } }`.
    Teacher {
        /// Hidden width of the teacher.
        width: usize,
        /// Number of hidden ReLU layers (0: a linear teacher).
        depth: usize,
    },
}

/// Per-channel input normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeKind {
    /// Pixels scaled to [0, 1] only.
    None,
    /// MNIST's mean and standard deviation.
    Mnist,
    /// CIFAR-10's per-channel mean and standard deviation (the paper's values).
    Cifar10,
    /// Each image flattened to a vector of unit Euclidean norm (the theory network's input).
    UnitNorm,
}

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AugmentKind {
    /// No augmentation.
    #[default]
    None,
    /// Pad-4 random crop and horizontal flip.
    CifarStandard,
}

/// `[data]`: the data set, the subset used, preprocessing and batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist`, `cifar10`, `cifar100`, `folder` or `synthetic`.
    pub source: SourceKind,
    /// Directory of the files; otherwise `TAU_DATA_DIR`, then the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Synthetic data: number of training points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// Synthetic data: input dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<usize>,
    /// Synthetic data: output dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<usize>,
    /// Synthetic data: how targets are drawn.
    #[serde(default)]
    pub targets: TargetsKind,
    /// Synthetic data: number of test points (0: no test set).
    #[serde(default)]
    pub n_test: usize,
    /// Which training examples to use.
    #[serde(default)]
    pub subset: Subset,
    /// Which test examples to evaluate on.
    #[serde(default)]
    pub test_subset: Subset,
    /// Input normalization; by default the data set's own (MNIST, CIFAR-10), `none` for
    /// folders and synthetic data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<NormalizeKind>,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: AugmentKind,
    /// Mini-batch size for SGD; for full-batch GD, the chunk size the gradient is
    /// accumulated over (memory bound, not a change of algorithm).
    pub batch_size: usize,
    /// Drop the last incomplete batch of each epoch (SGD only).
    #[serde(default)]
    pub drop_last: bool,
    /// CIFAR-100: use the 100 fine labels (`true`) or the 20 coarse ones.
    #[serde(default = "default_true")]
    pub cifar100_fine: bool,
    /// Targets for the squared loss on a classification set: one-hot vectors.
    /// (Always on for classification data with the squared loss; here for clarity.)
    #[serde(default = "default_true")]
    pub one_hot: bool,
}

fn default_true() -> bool {
    true
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// `½‖y − y*‖²` per example (one-hot targets for classification data).
    Squared,
    /// Softmax cross-entropy on class labels.
    #[default]
    CrossEntropy,
}

/// How per-example losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// The mean over the examples (of the batch, or of the whole set for GD).
    #[default]
    Mean,
    /// The sum over the examples.
    Sum,
}

/// `[loss]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// `squared` or `cross_entropy`.
    pub kind: LossKind,
    /// `mean` (default) or `sum` over the examples.
    #[serde(default)]
    pub reduction: Reduction,
}

/// The optimization algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// Full-batch gradient descent: every step's gradient is over the whole training set
    /// (accumulated in chunks of `data.batch_size`). One step is one epoch.
    Gd,
    /// Stochastic gradient descent over shuffled mini-batches.
    Sgd,
}

/// How weight decay is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecayMode {
    /// L2 penalty added to the gradient before momentum (PyTorch `SGD(weight_decay=...)`).
    #[default]
    Coupled,
    /// Parameters shrunk by `lr · weight_decay` directly (decoupled, as in AdamW/SGDW).
    Decoupled,
}

/// A learning-rate schedule. Milestones are in the run's unit: epochs when the run is
/// counted in `epochs`, steps when it is counted in `steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleConfig {
    /// The base learning rate throughout: `schedule = "constant"`.
    #[default]
    Constant,
    /// Multiply by `gamma` at each milestone:
    /// `schedule = { step = { milestones = [100, 150], gamma = 0.1 } }`.
    Step {
        /// Epochs (or steps) at which the rate is multiplied by `gamma`.
        milestones: Vec<u64>,
        /// The factor applied at each milestone.
        gamma: f64,
    },
    /// Cosine annealing from the base rate to 0 over the run: `schedule = "cosine"`.
    Cosine,
}

/// `[optim]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// `gd` (full batch) or `sgd` (mini-batch).
    pub kind: OptimKind,
    /// Base learning rate.
    pub lr: f64,
    /// Momentum coefficient (0: plain gradient steps).
    #[serde(default)]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Weight decay coefficient (not applied to τ).
    #[serde(default)]
    pub weight_decay: f64,
    /// `coupled` (default, PyTorch SGD) or `decoupled`.
    #[serde(default)]
    pub weight_decay_mode: WeightDecayMode,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Linear warm-up length, in the run's unit (epochs or steps); 0 for none.
    #[serde(default)]
    pub warmup: f64,
    /// Learning-rate multiplier of τ and the scalar biases (the no-BN reference: 0.1).
    #[serde(default = "default_small_lr_factor")]
    pub small_lr_factor: f64,
    /// Parameters (by name prefix) that are not trained, on top of those the model marks
    /// frozen, e.g. `freeze = ["fc."]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// Clip the gradient's global L2 norm to this value before each update (PyTorch
    /// `clip_grad_norm_` after τ's gradient is divided by L); none by default, and 0 also
    /// means none (so `--set optim.clip_grad_norm=0` turns a config's clipping off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
}

fn default_small_lr_factor() -> f64 {
    0.1
}

/// `[log]`: cadence of records and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Write a training record every this many steps (0: only at the end of each epoch of
    /// an SGD run, and at the end of the run).
    #[serde(default = "default_every")]
    pub every: u64,
    /// Evaluate on the test set every this many epochs (run counted in `epochs`) or steps
    /// (run counted in `steps`); 0: only at the end. Default: every epoch, or with every
    /// training record for a run counted in steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u64>,
    /// Write a checkpoint every this many epochs (run counted in `epochs`) or steps (run
    /// counted in `steps`); 0: only at the end (and on Ctrl-C). Default: every epoch, or
    /// every 1000 steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
}

fn default_every() -> u64 {
    100
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            every: default_every(),
            eval_every: None,
            checkpoint_every: None,
        }
    }
}

impl LogConfig {
    /// The evaluation cadence in the run's unit (see [`LogConfig::eval_every`]).
    pub fn eval_every(&self, by_epochs: bool) -> u64 {
        self.eval_every
            .unwrap_or(if by_epochs { 1 } else { self.every })
    }

    /// The checkpoint cadence in the run's unit (see [`LogConfig::checkpoint_every`]).
    pub fn checkpoint_every(&self, by_epochs: bool) -> u64 {
        self.checkpoint_every
            .unwrap_or(if by_epochs { 1 } else { 1000 })
    }
}

impl RunConfig {
    /// Checks the settings that types alone cannot: exactly one of `epochs`/`steps`,
    /// positive sizes and rates, the data source's required keys, the model's own checks.
    ///
    /// # Errors
    /// The first problem found, naming the key.
    pub fn validate(&self) -> crate::Result<()> {
        match (self.epochs, self.steps) {
            (Some(_), Some(_)) => bail!("set only one of `epochs` and `steps`"),
            (None, None) => bail!("missing `epochs` or `steps`"),
            (Some(0), _) | (_, Some(0)) => bail!("`epochs`/`steps` must be positive"),
            _ => {}
        }
        if let Some(t) = self.target_loss
            && !(t.is_finite() && t > 0.0)
        {
            bail!("`target_loss` must be a positive number, got {t}");
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            bail!("`name` must be a non-empty name without path separators");
        }
        let d = &self.data;
        if d.batch_size == 0 {
            bail!("`data.batch_size` must be positive");
        }
        if d.source == SourceKind::Synthetic {
            for (key, v) in [("n", d.n), ("p", d.p), ("d", d.d)] {
                match v {
                    None => bail!("`data.{key}` is required for synthetic data"),
                    Some(0) => bail!("`data.{key}` must be positive"),
                    _ => {}
                }
            }
            if self.loss.kind == LossKind::CrossEntropy {
                bail!("synthetic data has real-valued targets: use `loss.kind = \"squared\"`");
            }
            for (key, s, size) in [
                ("subset", d.subset, "n"),
                ("test_subset", d.test_subset, "n_test"),
            ] {
                if s != Subset::All {
                    bail!(
                        "`data.{key}` does not apply to synthetic data: set `data.{size}` instead"
                    );
                }
            }
        } else {
            for (key, v) in [("n", d.n), ("p", d.p), ("d", d.d)] {
                if v.is_some() {
                    bail!("`data.{key}` only applies to synthetic data");
                }
            }
        }
        for (key, s) in [("subset", d.subset), ("test_subset", d.test_subset)] {
            if matches!(
                s,
                Subset::FirstN(0) | Subset::BalancedK(0) | Subset::RandomN(0)
            ) {
                bail!("`data.{key}` must select at least one example");
            }
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            bail!("`optim.lr` must be a positive number, got {}", o.lr);
        }
        if !(o.momentum.is_finite() && (0.0..1.0).contains(&o.momentum)) {
            bail!("`optim.momentum` must be in [0, 1), got {}", o.momentum);
        }
        if o.nesterov && o.momentum == 0.0 {
            bail!("`optim.nesterov` needs a positive `optim.momentum`");
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            bail!("`optim.weight_decay` must be ≥ 0, got {}", o.weight_decay);
        }
        if !(o.warmup.is_finite() && o.warmup >= 0.0) {
            bail!("`optim.warmup` must be ≥ 0, got {}", o.warmup);
        }
        if !(o.small_lr_factor.is_finite() && o.small_lr_factor >= 0.0) {
            bail!("`optim.small_lr_factor` must be ≥ 0");
        }
        if let Some(c) = o.clip_grad_norm
            && !(c.is_finite() && c >= 0.0)
        {
            bail!("`optim.clip_grad_norm` must be a number ≥ 0 (0: no clipping), got {c}");
        }
        if let ScheduleConfig::Step { milestones, gamma } = &o.schedule {
            if !(gamma.is_finite() && *gamma > 0.0) {
                bail!("`optim.schedule.step.gamma` must be positive, got {gamma}");
            }
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                bail!("`optim.schedule.step.milestones` must be increasing");
            }
        }
        if o.kind == OptimKind::Gd && d.augment != AugmentKind::None {
            bail!("full-batch GD sees a fixed training set: set `data.augment = \"none\"`");
        }
        self.model
            .validate()
            .map_err(|e| crate::error::err!("invalid `model`: {e}"))?;
        Ok(())
    }

    /// The run directory: `out` if given, else `out_dir` from the file, else `runs/<name>`.
    pub fn run_dir(&self, out: Option<&Path>) -> PathBuf {
        match (out, &self.out_dir) {
            (Some(o), _) => o.to_path_buf(),
            (None, Some(o)) => o.clone(),
            (None, None) => Path::new("runs").join(&self.name),
        }
    }

    /// The config as TOML text (what a run directory's `config.toml` holds).
    ///
    /// # Errors
    /// Only if a value cannot be represented in TOML.
    pub fn to_toml(&self) -> crate::Result<String> {
        toml::to_string(self).context("serializing the resolved config")
    }
}

/// Applies `key=value` overrides to a parsed TOML table.
///
/// The key is dotted (`model.depth`, `optim.schedule.step.gamma`); missing intermediate
/// tables are created. The value is parsed as a TOML value (`110`, `0.5`, `true`,
/// `"text"`, `[100, 150]`, `{ balanced_k = 10 }`) and, when that fails, taken as a
/// string, so `--set 'model.tau=0.5/sqrt(L)'` needs no TOML quotes inside the shell's.
///
/// # Errors
/// A missing `=`, an empty key segment, or a key that walks through a non-table value.
pub fn apply_overrides(table: &mut toml::Table, sets: &[String]) -> crate::Result<()> {
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .with_context(|| format!("override `{set}` is not of the form key=value"))?;
        let key = key.trim();
        let value = parse_value(raw.trim());
        let digits = raw.trim().trim_start_matches(['-', '+']).replace('_', "");
        if value.is_str() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            // An integer TOML cannot hold would otherwise become the string "1844…".
            bail!(
                "override `{set}`: {} is outside TOML's integer range (-2^63 to 2^63 - 1)",
                raw.trim()
            );
        }
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.trim().is_empty()) {
            bail!("override `{set}`: empty key segment in `{key}`");
        }
        let (last, parents) = parts.split_last().context("empty key")?;
        let mut cur = &mut *table;
        for (i, part) in parents.iter().enumerate() {
            let entry = cur
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                other => bail!(
                    "override `{set}`: `{}` is {}, not a table",
                    parts[..=i].join("."),
                    other.type_str()
                ),
            };
        }
        cur.insert(last.to_string(), value);
    }
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse `v = <raw>` as a one-line document so every TOML value form is accepted.
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) if t.len() == 1 => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        _ => toml::Value::String(raw.to_string()),
    }
}

/// Turns a (possibly overridden) table into a validated [`RunConfig`].
///
/// # Errors
/// An unknown key or an ill-typed value, naming the dotted key; or a failed
/// [`RunConfig::validate`].
pub fn config_from_table(table: toml::Table) -> crate::Result<RunConfig> {
    let model = table.get("model").cloned();
    let cfg: RunConfig =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            // The message alone: its Display adds the path again on a line of its own.
            let message = e.into_inner().message().to_string();
            if path == "model"
                && let Some((key, message)) = model.as_ref().and_then(locate_model_error)
            {
                return crate::error::err!("key `model.{key}`: {message}");
            }
            if path == "." || path.is_empty() {
                crate::error::err!("{message}")
            } else {
                crate::error::err!("key `{path}`: {message}")
            }
        })?;
    cfg.validate()?;
    Ok(cfg)
}

/// The key within a `[model]` table that does not read, and serde's message
/// ([`ModelConfig::locate_error`](tau_model::ModelConfig::locate_error)); the key is never
/// empty (an error of the table as a whole stays with `model`).
pub(crate) fn locate_model_error(model: &toml::Value) -> Option<(String, String)> {
    let json = serde_json::to_value(model).ok()?;
    tau_model::ModelConfig::locate_error(&json).filter(|(key, _)| !key.is_empty())
}

/// A run config from `table` with the `--set` overrides `sets` applied, validated: what
/// `tau-resnet train --config FILE --set ...` reads (less the file's name in the errors).
///
/// # Errors
/// A bad override, an unknown key or an ill-typed value (naming the key), or a failed
/// validation.
pub fn config_with_overrides(mut table: toml::Table, sets: &[String]) -> crate::Result<RunConfig> {
    apply_overrides(&mut table, sets)?;
    config_from_table(table)
}

/// Reads a run config file, applies `--set` overrides and validates the result.
///
/// # Errors
/// A missing or unreadable file, malformed TOML, a bad override, an unknown key or an
/// ill-typed value (naming the key), or a failed validation. Each names the file.
pub fn load_config(path: &Path, sets: &[String]) -> crate::Result<RunConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config {}", path.display()))?;
    apply_overrides(&mut table, sets)?;
    config_from_table(table).with_context(|| format!("config {}", path.display()))
}

#[cfg(test)]
mod tests;
