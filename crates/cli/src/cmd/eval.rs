//! `tau-resnet eval`: test loss and accuracy of a checkpoint on a data set.

use crate::cmd::outln;
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle::DType;
use serde::Serialize;
use tau_model::ModelConfig;

use super::Outcome;
use super::load::{ModelArgs, check_stat};
use tau_train::config::{
    AugmentKind, DTypeSpec, DataConfig, DeviceSpec, LogConfig, LossConfig, LossKind, OptimConfig,
    OptimKind, Reduction, RunConfig, ScheduleConfig, SourceKind, Subset, WeightDecayMode,
};
use tau_train::setup::{RunData, TauModel, check_fit};
use tau_train::trainer::evaluate;

/// The data sets `eval` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalData {
    /// MNIST test set.
    Mnist,
    /// CIFAR-10 test set.
    Cifar10,
    /// CIFAR-100 test set (fine labels).
    Cifar100,
    /// The `test/` part of an image folder (needs --data-dir).
    Folder,
}

/// Arguments of `tau-resnet eval`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  tau-resnet eval --checkpoint runs/mnist-resnet20-nobn --data mnist --data-dir ../data/mnist
  tau-resnet eval --checkpoint runs/mnist-resnet20-nobn/checkpoints/last --data mnist --json
  tau-resnet eval --checkpoint timm/resnet50.a1_in1k --data folder --data-dir imagenet-val

Images are normalized with the checkpoint's recorded mean and std (config.json
`preprocessing`), else the data set's usual ones; --mean and --std override both.")]
pub struct EvalArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The data set whose test split is evaluated.
    #[arg(long, value_enum)]
    pub data: EvalData,
    /// Directory of the data files (else `TAU_DATA_DIR`, else the hub).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Per-channel mean of the pixels in [0, 1], overriding the checkpoint's
    /// (comma-separated: 0.485,0.456,0.406).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "M,...",
        allow_hyphen_values = true
    )]
    pub mean: Option<Vec<f64>>,
    /// Per-channel standard deviation, overriding the checkpoint's (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "S,...")]
    pub std: Option<Vec<f64>>,
    /// Loss to report: `squared` or `cross_entropy` (default: squared for the theory
    /// network, cross-entropy otherwise).
    #[arg(long, value_name = "KIND", value_parser = ["squared", "cross_entropy"])]
    pub loss: Option<String>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 256, value_parser = super::positive())]
    pub batch_size: usize,
    /// Where to compute: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct EvalResult {
    checkpoint: String,
    data: String,
    examples: usize,
    loss_kind: String,
    test_loss: Option<f64>,
    test_acc: Option<f64>,
    /// The normalization applied (none for the theory network).
    #[serde(skip_serializing_if = "Option::is_none")]
    normalize: Option<NormalizeUsed>,
}

#[derive(Debug, Serialize)]
struct NormalizeUsed {
    mean: Vec<f64>,
    std: Vec<f64>,
    /// `command_line`, `checkpoint` or `data_set`.
    source: &'static str,
}

/// Runs `tau-resnet eval`.
///
/// # Errors
/// A missing or corrupt checkpoint or data set, a model that does not fit the data.
pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    let device = args.device.device()?;
    let (place, pretrained) = args.model.load(&device)?;
    let checkpoint = pretrained.config;
    let varmap = pretrained.varmap;
    let model_cfg = checkpoint.model.clone();
    let loss = match args.loss.as_deref() {
        None if !model_cfg.as_family().is_classifier() => LossKind::Squared,
        None | Some("cross_entropy") => LossKind::CrossEntropy,
        Some("squared") => LossKind::Squared,
        Some(other) => bail!("unknown --loss `{other}`: expected squared or cross_entropy"),
    };
    let source = match args.data {
        EvalData::Mnist => SourceKind::Mnist,
        EvalData::Cifar10 => SourceKind::Cifar10,
        EvalData::Cifar100 => SourceKind::Cifar100,
        EvalData::Folder => SourceKind::Folder,
    };
    let dtype = tau_model::checkpoint::varmap_dtype(&varmap).unwrap_or(DType::F32);
    let cfg = cfg_with_dtype(
        eval_config(
            model_cfg.clone(),
            source,
            args.data_dir.clone(),
            loss,
            args.batch_size,
        ),
        dtype,
    )?;
    let flat = model_cfg.in_channels().is_none();
    let normalize = normalization(&args, &checkpoint)?;
    // Only the test split is read: the training files need not exist, nor be downloaded.
    let (data, record) = RunData::load_test_with(
        &cfg,
        dtype,
        &device,
        flat,
        normalize.as_ref().map(|n| tau_data::Normalize {
            mean: n.mean.iter().map(|&m| m as f32).collect(),
            std: n.std.iter().map(|&s| s as f32).collect(),
        }),
    )?;
    check_fit(&model_cfg, &data, loss)?;
    let used = record.preprocessing.as_ref().map(|p| NormalizeUsed {
        mean: p.mean.clone(),
        std: p.std.clone(),
        source: normalize.as_ref().map_or("data_set", |n| n.source),
    });
    if let (Some(want), Some(got)) = (&checkpoint.preprocessing, &record.preprocessing)
        && want.input_size != got.input_size
    {
        tracing::warn!(
            "the checkpoint expects {:?} inputs, the data set's images are {:?}",
            want.input_size,
            got.input_size
        );
    }
    let test = data.test.context("the data set has no test split")?;
    let model = TauModel::from_varmap(&model_cfg, varmap, &device)?;
    let batch = eval_batch(
        &model_cfg,
        &data.input_shape,
        args.batch_size,
        test.len(),
        &device,
    )?;
    let (test_loss, test_acc) = evaluate(&model, test.as_ref(), loss, batch)?;
    let result = EvalResult {
        checkpoint: place,
        data: source.to_string(),
        examples: test.len(),
        loss_kind: match loss {
            LossKind::Squared => "squared".into(),
            LossKind::CrossEntropy => "cross_entropy".into(),
        },
        test_loss,
        test_acc,
        normalize: used,
    };
    if args.json {
        outln!("{}", serde_json::to_string(&result)?)?;
    } else {
        outln!("checkpoint  {}", result.checkpoint)?;
        outln!(
            "data        {} test ({} examples)",
            result.data,
            result.examples
        )?;
        if let Some(l) = test_loss {
            outln!("test loss   {l:.6} ({})", result.loss_kind)?;
        }
        if let Some(a) = test_acc {
            outln!("test acc    {:.2}%", 100.0 * a)?;
        }
        if let Some(n) = &result.normalize {
            outln!(
                "normalize   mean {:?} std {:?} ({})",
                n.mean,
                n.std,
                n.source.replace('_', " ")
            )?;
        }
    }
    Ok(Outcome::Finished)
}

/// The normalization `eval` applies to images: `--mean`/`--std` (both, or either with the
/// checkpoint's other one), else the checkpoint's; `None` leaves the data set's default.
fn normalization(
    args: &EvalArgs,
    checkpoint: &tau_model::CheckpointConfig,
) -> anyhow::Result<Option<NormalizeUsed>> {
    let recorded = checkpoint.preprocessing.as_ref();
    if args.mean.is_none() && args.std.is_none() {
        return Ok(recorded.map(|p| NormalizeUsed {
            mean: p.mean.clone(),
            std: p.std.clone(),
            source: "checkpoint",
        }));
    }
    let Some(channels) = checkpoint.model.in_channels() else {
        bail!("--mean and --std are for image models; the theory network takes unit-norm vectors");
    };
    let pick = |given: &Option<Vec<f64>>, name: &str, from: Option<&Vec<f64>>| {
        given.clone().or_else(|| from.cloned()).with_context(|| {
            format!("--{name} is needed too: the checkpoint records no preprocessing")
        })
    };
    let mean = pick(&args.mean, "mean", recorded.map(|p| &p.mean))?;
    let std = pick(&args.std, "std", recorded.map(|p| &p.std))?;
    check_stat("mean", &mean, channels)?;
    check_stat("std", &std, channels)?;
    Ok(Some(NormalizeUsed {
        mean,
        std,
        source: "command_line",
    }))
}

fn cfg_with_dtype(mut cfg: RunConfig, dtype: DType) -> anyhow::Result<RunConfig> {
    cfg.dtype = match dtype {
        DType::F32 => DTypeSpec::F32,
        DType::F64 => DTypeSpec::F64,
        other => bail!("checkpoints in {other:?} are not supported by eval (f32 or f64)"),
    };
    Ok(cfg)
}

/// The examples per forward pass: `--batch-size` (at most the test set), or on the CPU,
/// when a batch that large would not fit in the available memory, the largest that does
/// (with a warning; the results are the same up to the order of the sums).
fn eval_batch(
    model: &ModelConfig,
    input: &[usize],
    asked: usize,
    examples: usize,
    device: &candle::Device,
) -> anyhow::Result<usize> {
    let wanted = asked.min(examples).max(1);
    let Some(avail) = tau_train::memory::available().filter(|_| device.is_cpu()) else {
        return Ok(wanted);
    };
    let need = |b| tau_train::memory::inference(model, b, input);
    let batch = tau_train::memory::fitting_batch(need, wanted, avail);
    if batch == 0 {
        tau_train::memory::check(
            need(1),
            &format!("evaluating one example of shape {input:?}"),
            "the image size",
        )?;
        return Ok(1);
    }
    if batch < wanted {
        tracing::warn!(
            "--batch-size {asked}: a batch of {wanted} needs about {:.1} GiB of memory, {:.1} GiB \
             are available; evaluating in batches of {batch}",
            need(wanted) / tau_train::memory::GIB,
            avail as f64 / tau_train::memory::GIB
        );
    }
    Ok(batch)
}

fn eval_config(
    model: ModelConfig,
    source: SourceKind,
    dir: Option<PathBuf>,
    loss: LossKind,
    batch_size: usize,
) -> RunConfig {
    RunConfig {
        name: "eval".into(),
        seed: 0,
        epochs: Some(1),
        steps: None,
        target_loss: None,
        device: DeviceSpec::Cpu,
        dtype: DTypeSpec::F32,
        out_dir: None,
        model,
        data: DataConfig {
            source,
            dir,
            n: None,
            p: None,
            d: None,
            targets: Default::default(),
            n_test: 0,
            // Not read: eval loads only the test split (`RunData::load_test_with`).
            subset: Subset::All,
            test_subset: Subset::All,
            normalize: None,
            augment: AugmentKind::None,
            batch_size,
            drop_last: false,
            cifar100_fine: true,
            one_hot: true,
        },
        loss: LossConfig {
            kind: loss,
            reduction: Reduction::Mean,
        },
        optim: OptimConfig {
            kind: OptimKind::Sgd,
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            weight_decay_mode: WeightDecayMode::Coupled,
            schedule: ScheduleConfig::Constant,
            warmup: 0.0,
            small_lr_factor: 0.1,
            freeze: Vec::new(),
            clip_grad_norm: None,
        },
        log: LogConfig::default(),
    }
}
