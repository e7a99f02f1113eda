//! `tau-resnet eval`: test loss and accuracy of a checkpoint on a data set.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle::DType;
use serde::Serialize;
use tau_model::ModelConfig;

use super::Outcome;
use crate::config::{
    AugmentKind, DTypeSpec, DataConfig, DeviceSpec, LogConfig, LossConfig, LossKind, OptimConfig,
    OptimKind, Reduction, RunConfig, ScheduleConfig, SourceKind, Subset, WeightDecayMode,
};
use crate::setup::{TauModel, check_fit, load_data};
use crate::trainer::{evaluate, last_checkpoint};

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
  tau-resnet eval --checkpoint runs/mnist-resnet20-nobn/checkpoints/last --data mnist --json")]
pub struct EvalArgs {
    /// A checkpoint directory (`config.json` + `model.safetensors`), a run directory
    /// (its last checkpoint), or a Hugging Face hub model id.
    #[arg(long, value_name = "DIR_OR_HUB_ID")]
    pub checkpoint: String,
    /// The data set whose test split is evaluated.
    #[arg(long, value_enum)]
    pub data: EvalData,
    /// Directory of the data files (else `TAU_DATA_DIR`, else the hub).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Revision (branch, tag or commit) of a hub checkpoint.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Loss to report: `squared` or `cross_entropy` (default: squared for the theory
    /// network, cross-entropy otherwise).
    #[arg(long, value_name = "KIND")]
    pub loss: Option<String>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 256)]
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
}

/// Loads the checkpoint `arg` names: a checkpoint directory, a run directory (its last
/// checkpoint), or a hub model id.
fn load_checkpoint(
    arg: &str,
    revision: Option<&str>,
    device: &candle::Device,
) -> anyhow::Result<(String, ModelConfig, candle_nn::VarMap)> {
    let p = Path::new(arg);
    let (place, id) = if p.is_dir() && !p.join("config.json").is_file() {
        let dir = last_checkpoint(p).with_context(|| {
            format!("{arg} is neither a checkpoint (config.json) nor a run directory with checkpoints/last")
        })?;
        (dir.display().to_string(), dir)
    } else {
        (arg.to_string(), PathBuf::from(arg))
    };
    let id = id.to_string_lossy().to_string();
    let (cfg, varmap) = tau_model::hub::from_pretrained(&id, revision, device)
        .with_context(|| format!("loading checkpoint {place}"))?;
    Ok((place, cfg, varmap))
}

/// Runs `tau-resnet eval`.
///
/// # Errors
/// A missing or corrupt checkpoint or data set, a model that does not fit the data.
pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let device = args.device.device()?;
    let (place, model_cfg, varmap) =
        load_checkpoint(&args.checkpoint, args.revision.as_deref(), &device)?;
    let loss = match args.loss.as_deref() {
        None if matches!(model_cfg, ModelConfig::Theory(_)) => LossKind::Squared,
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
    let flat = matches!(model_cfg, ModelConfig::Theory(_));
    let data = load_data(&cfg, dtype, &device, flat)?;
    check_fit(&model_cfg, &data, loss)?;
    let test = data.test.context("the data set has no test split")?;
    let model = TauModel::from_varmap(&model_cfg, varmap, &device)?;
    let (test_loss, test_acc) = evaluate(&model, test.as_ref(), loss, args.batch_size)?;
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
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("checkpoint  {}", result.checkpoint);
        println!(
            "data        {} test ({} examples)",
            result.data, result.examples
        );
        if let Some(l) = test_loss {
            println!("test loss   {l:.6} ({})", result.loss_kind);
        }
        if let Some(a) = test_acc {
            println!("test acc    {:.2}%", 100.0 * a);
        }
    }
    Ok(Outcome::Finished)
}

fn cfg_with_dtype(mut cfg: RunConfig, dtype: DType) -> anyhow::Result<RunConfig> {
    cfg.dtype = match dtype {
        DType::F32 => DTypeSpec::F32,
        DType::F64 => DTypeSpec::F64,
        other => bail!("checkpoints in {other:?} are not supported by eval (f32 or f64)"),
    };
    Ok(cfg)
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
            // Only the test split is used; keep one training example to load cheaply.
            subset: Subset::FirstN(1),
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
