//! The data of a run: synthetic points, or an image data set with its subsets,
//! normalization and augmentation, and what a checkpoint records of it.

use crate::error::{Context, bail};
use candle::{DType, Device, Tensor};
use tau_model::ModelConfig;

use crate::config::{AugmentKind, NormalizeKind, RunConfig, SourceKind, Subset, TargetsKind};
use crate::loss::Targets;
use crate::trainer::{TensorData, TrainData};

/// An image data set drawn into batches by the data crate (normalization, augmentation).
pub struct ImageData {
    ds: tau_data::ImageDataset,
    normalize: tau_data::Normalize,
    augment: tau_data::Augment,
    seed: u64,
    dtype: DType,
    device: Device,
}

impl TrainData for ImageData {
    fn len(&self) -> usize {
        self.ds.len()
    }

    fn batch(&self, indices: &[usize], augment: Option<u64>) -> crate::Result<(Tensor, Targets)> {
        let (aug, epoch) = match augment {
            Some(e) => (self.augment, e),
            None => (tau_data::Augment::None, 0),
        };
        let (xs, ys) = tau_data::make_batch(
            &self.ds,
            indices,
            &self.normalize,
            aug,
            self.seed,
            epoch,
            &self.device,
        )?;
        Ok((
            xs.to_dtype(self.dtype)?,
            Targets::Classes(ys, self.ds.num_classes),
        ))
    }
}

/// The data of a run.
pub struct RunData {
    /// Training set.
    pub train: Box<dyn TrainData>,
    /// Test set, if any.
    pub test: Option<Box<dyn TrainData>>,
    /// Shape of one input: `[features]` or `[C, H, W]`.
    pub input_shape: Vec<usize>,
    /// Output dimension the model needs (classes, or the targets' dimension).
    pub outputs: usize,
}

impl RunData {
    /// [`load_data_with`] for evaluation: only the test split of an image data set is
    /// looked for and read ([`tau_data::Splits::TestOnly`]), so a directory (or
    /// `TAU_DATA_DIR`) holding only the test files is enough and the hub's training file
    /// is not downloaded. `train` is then empty; the input shape, the classes and the
    /// [`DataRecord`] come from the test split (an image folder's classes are the
    /// subfolders of its `test/`). A grayscale image folder evaluated by a model taking
    /// RGB gets its images replicated to RGB, as [`tau_data::folder`] does for a
    /// grayscale test split of an RGB training split. Synthetic data is generated whole,
    /// as by [`load_data_with`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// use candle::{DType, Device};
    /// use tau_train::config::load_config;
    /// use tau_train::setup::RunData;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // `data.dir` holds only MNIST's t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte.
    /// let sets = ["data.dir=\"mnist-test\"".to_string()];
    /// let cfg = load_config("configs/mnist-resnet20-nobn.toml".as_ref(), &sets)?;
    /// let (data, _record) =
    ///     RunData::load_test_with(&cfg, DType::F32, &Device::Cpu, false, None)?;
    /// assert!(data.train.is_empty());
    /// assert_eq!(data.test.map(|t| t.len()), Some(10_000));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`load_data_with`], naming the missing or corrupt test file; an empty test split
    /// is not an error here (`test` is `None`).
    pub fn load_test_with(
        cfg: &RunConfig,
        dtype: DType,
        device: &Device,
        flat: bool,
        normalize_override: Option<tau_data::Normalize>,
    ) -> crate::Result<(RunData, DataRecord)> {
        load_splits(
            cfg,
            dtype,
            device,
            flat,
            normalize_override,
            tau_data::Splits::TestOnly,
        )
    }
}

/// What a model trained on a run's data expects and outputs, as its checkpoints record
/// it (the fields of [`tau_model::CheckpointConfig`] beside the model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataRecord {
    /// The normalization and image size (image data for convolutional models only).
    pub preprocessing: Option<tau_model::Preprocessing>,
    /// The data set's name (`mnist`, `cifar10`, `cifar100`).
    pub dataset: Option<String>,
    /// The class names, by label.
    pub class_names: Option<Vec<String>>,
}

impl DataRecord {
    /// The checkpoint config of `model` recording this (class names only when there is
    /// one per output).
    pub fn checkpoint_config(&self, model: &ModelConfig) -> tau_model::CheckpointConfig {
        let mut c = tau_model::CheckpointConfig::new(model.clone());
        c.preprocessing = self
            .preprocessing
            .clone()
            .filter(|p| model.in_channels() == Some(p.channels()));
        c.dataset = self.dataset.clone();
        c.class_names = self
            .class_names
            .clone()
            .filter(|n| n.len() == model.num_outputs());
        c
    }
}

/// An `f32` statistic as the `f64` of its shortest decimal form (0.4914, not
/// 0.49140000343322754).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The largest synthetic data set accepted (elements of inputs plus targets).
const MAX_SYNTHETIC_ELEMENTS: usize = 1 << 30;

fn subset(ds: &tau_data::ImageDataset, s: Subset, seed: u64) -> tau_data::ImageDataset {
    match s {
        Subset::All => ds.clone(),
        Subset::FirstN(n) => ds.first_n(n),
        Subset::BalancedK(k) => ds.balanced_first_k(k),
        Subset::RandomN(n) => ds.random_n(n, seed),
    }
}

fn flat_tensor_data(
    ds: &tau_data::ImageDataset,
    dtype: DType,
    device: &Device,
) -> crate::Result<TensorData> {
    let (xs, _) = tau_data::flatten_unit_norm(ds, dtype, device)?;
    let labels = Tensor::new(ds.labels.as_slice(), device)?;
    TensorData::new(xs, Targets::Classes(labels, ds.num_classes))
}

/// Loads the data of a run: the source, the subsets, preprocessing. `flat` gives each
/// example as a unit-norm vector (the theory network's input).
///
/// # Errors
/// Missing or corrupt data files (naming the file), impossible sizes, settings that do not
/// fit together.
pub fn load_data(
    cfg: &RunConfig,
    dtype: DType,
    device: &Device,
    flat: bool,
) -> crate::Result<RunData> {
    Ok(load_data_with(cfg, dtype, device, flat, None)?.0)
}

/// [`load_data`] with an explicit per-channel normalization of the images (instead of
/// `data.normalize`, as `eval` applies a checkpoint's), also returning what a checkpoint
/// of a model trained on it records ([`DataRecord`]).
///
/// # Errors
/// As [`load_data`]; a normalization with another number of channels than the images.
pub fn load_data_with(
    cfg: &RunConfig,
    dtype: DType,
    device: &Device,
    flat: bool,
    normalize_override: Option<tau_data::Normalize>,
) -> crate::Result<(RunData, DataRecord)> {
    load_splits(
        cfg,
        dtype,
        device,
        flat,
        normalize_override,
        tau_data::Splits::TrainAndTest,
    )
}

/// [`load_data_with`] reading both splits, or only the test split
/// ([`RunData::load_test_with`]).
fn load_splits(
    cfg: &RunConfig,
    dtype: DType,
    device: &Device,
    flat: bool,
    normalize_override: Option<tau_data::Normalize>,
    splits: tau_data::Splits,
) -> crate::Result<(RunData, DataRecord)> {
    let d = &cfg.data;
    if d.source == SourceKind::Synthetic {
        return Ok((synthetic_data(cfg, dtype, device)?, DataRecord::default()));
    }
    let source = match d.source {
        SourceKind::Mnist => tau_data::DataSource::Mnist,
        SourceKind::Cifar10 => tau_data::DataSource::Cifar10,
        SourceKind::Cifar100 => tau_data::DataSource::Cifar100,
        SourceKind::Folder => tau_data::DataSource::Folder,
        SourceKind::Synthetic => unreachable_synthetic()?,
    };
    let opts = tau_data::LoadOptions {
        dir: d.dir.clone(),
        cifar100_labels: if d.cifar100_fine {
            tau_data::Cifar100Labels::Fine
        } else {
            tau_data::Cifar100Labels::Coarse
        },
        splits,
    };
    let split = tau_data::load(&source, &opts).with_context(|| format!("loading {}", d.source))?;
    let mut train = subset(&split.train, d.subset, cfg.seed);
    let mut test = subset(&split.test, d.test_subset, cfg.seed.wrapping_add(1));
    if splits == tau_data::Splits::TestOnly {
        // The training split is empty but carries the test split's shape and classes.
        if d.source == SourceKind::Folder
            && test.shape[0] == 1
            && !flat
            && cfg.model.in_channels() == Some(3)
        {
            // As with both splits loaded, where an RGB training split makes a grayscale
            // test split RGB.
            test = test.to_rgb();
            train = test.first_n(0);
        }
    } else if train.is_empty() {
        bail!("the training set is empty after `data.subset`");
    }
    let [c, h, w] = train.shape;
    let outputs = train.num_classes;
    let mut record = DataRecord {
        preprocessing: None,
        dataset: matches!(
            d.source,
            SourceKind::Mnist | SourceKind::Cifar10 | SourceKind::Cifar100
        )
        .then(|| d.source.to_string()),
        class_names: (train.class_names.len() == outputs).then(|| train.class_names.clone()),
    };
    let normalize = d.normalize.unwrap_or(match (flat, d.source) {
        (true, _) => NormalizeKind::UnitNorm,
        (false, SourceKind::Mnist) => NormalizeKind::Mnist,
        (false, SourceKind::Cifar10 | SourceKind::Cifar100) => NormalizeKind::Cifar10,
        (false, _) => NormalizeKind::None,
    });
    if flat != (normalize == NormalizeKind::UnitNorm) {
        if flat {
            bail!(
                "the theory network takes unit-norm vectors: set `data.normalize = \"unit_norm\"` (or leave it out)"
            );
        }
        bail!(
            "`data.normalize = \"unit_norm\"` is for the theory network; convolutional models take images"
        );
    }
    if flat {
        let train = flat_tensor_data(&train, dtype, device)?;
        let test: Option<Box<dyn TrainData>> = if test.is_empty() {
            None
        } else {
            Some(Box::new(flat_tensor_data(&test, dtype, device)?))
        };
        return Ok((
            RunData {
                train: Box::new(train),
                test,
                input_shape: vec![c * h * w],
                outputs,
            },
            record,
        ));
    }
    let norm = image_normalization(normalize_override, normalize, c)?;
    record.preprocessing = Some(tau_model::Preprocessing {
        mean: norm.mean.iter().copied().map(decimal).collect(),
        std: norm.std.iter().copied().map(decimal).collect(),
        input_size: [c, h, w],
        crop_pct: 1.0,
        interpolation: tau_model::preprocess::Interpolation::Bilinear,
    });
    let augment = match d.augment {
        AugmentKind::None => tau_data::Augment::None,
        AugmentKind::CifarStandard => tau_data::Augment::CifarStandard,
    };
    let make = |ds: tau_data::ImageDataset| ImageData {
        ds,
        normalize: norm.clone(),
        augment,
        seed: cfg.seed,
        dtype,
        device: device.clone(),
    };
    let test: Option<Box<dyn TrainData>> = if test.is_empty() {
        None
    } else {
        Some(Box::new(make(test)))
    };
    Ok((
        RunData {
            train: Box::new(make(train)),
            test,
            input_shape: vec![c, h, w],
            outputs,
        },
        record,
    ))
}

fn unreachable_synthetic() -> crate::Result<tau_data::DataSource> {
    bail!("synthetic data is handled before loading files")
}

/// Points on the unit sphere with Gaussian or teacher targets (`data.source =
/// "synthetic"`), the first `data.n` for training and the next `data.n_test` for testing.
fn synthetic_data(cfg: &RunConfig, dtype: DType, device: &Device) -> crate::Result<RunData> {
    let d = &cfg.data;
    let (n, p, out) = (d.n.unwrap_or(0), d.p.unwrap_or(0), d.d.unwrap_or(0));
    let total = n.saturating_add(d.n_test);
    // Drawn in host memory whatever the device: what this machine can hold, then the
    // fixed bound.
    crate::memory::check(
        crate::memory::synthetic(d),
        "the synthetic data set",
        "data.n, data.n_test, data.p or data.d",
    )?;
    if total.saturating_mul(p.saturating_add(out)) > MAX_SYNTHETIC_ELEMENTS {
        bail!("synthetic data of {total} points × {p} inputs is too large");
    }
    let targets = match d.targets {
        TargetsKind::Gaussian => tau_data::Targets::Gaussian,
        TargetsKind::Teacher { width, depth } => tau_data::Targets::Teacher { width, depth },
    };
    let all = tau_data::sphere(total, p, out, targets, cfg.seed);
    let (xs, ys) = all.to_tensors(dtype, device)?;
    let train = TensorData::new(xs.narrow(0, 0, n)?, Targets::Values(ys.narrow(0, 0, n)?))?;
    let test: Option<Box<dyn TrainData>> = if d.n_test > 0 {
        Some(Box::new(TensorData::new(
            xs.narrow(0, n, d.n_test)?,
            Targets::Values(ys.narrow(0, n, d.n_test)?),
        )?))
    } else {
        None
    };
    Ok(RunData {
        train: Box::new(train),
        test,
        input_shape: vec![p],
        outputs: out,
    })
}

/// The per-channel normalization of `c`-channel images: an explicit one (checked), else
/// the config's.
fn image_normalization(
    normalize_override: Option<tau_data::Normalize>,
    normalize: NormalizeKind,
    c: usize,
) -> crate::Result<tau_data::Normalize> {
    let norm = match (normalize_override, normalize) {
        (Some(n), _) => {
            if n.mean.len() != c || n.std.len() != c {
                bail!(
                    "the normalization has {} means and {} stds, the images have {c} channels",
                    n.mean.len(),
                    n.std.len()
                );
            }
            n
        }
        (None, NormalizeKind::Mnist) => tau_data::Normalize::mnist(),
        (None, NormalizeKind::Cifar10) => tau_data::Normalize::cifar10(),
        (None, NormalizeKind::None | NormalizeKind::UnitNorm) => tau_data::Normalize::identity(c),
    };
    if norm.mean.len() != c {
        bail!(
            "`data.normalize = \"{}\"` has {} channels, the images have {c}",
            serde_json::to_value(normalize)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{normalize:?}")),
            norm.mean.len()
        );
    }
    Ok(norm)
}
