//! `tau-resnet import`: a PyTorch `.pth` file (`torch.save`'s zip format) turned into a
//! checkpoint directory (`config.json` + `model.safetensors`) that `eval`, `predict` and
//! `tau_model::hub::from_pretrained` load. The reading and checking is tau-model's
//! ([`tau_model::pth`]); this command finds the config, prints what was done, and writes.

use crate::cmd::outln;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle::{DType, Device};
use tau_model::pth::{PthOptions, Rename, load_pth, read_index};
use tau_model::{CheckpointConfig, ModelConfig, Preprocessing};

use super::Outcome;

/// Arguments of `tau-resnet import`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  tau-resnet import resnet20.pth --config resnet20.json --out checkpoints/resnet20
  tau-resnet import akamaster-resnet20.pth --config resnet20.json --rename linear.=fc. \\
      --dataset cifar10 --out checkpoints/resnet20-akamaster
  tau-resnet import model.pth --list

The file is what torch.save writes (PyTorch >= 1.6, zip format): a state_dict, bare or
in a dict under 'state_dict' or 'model' (found by itself; --key names another entry).
DataParallel's 'module.' prefix is stripped; --rename replaces other name prefixes.
Every name and shape is checked against the config before anything is written.
The config is a model config (JSON, or TOML: a bare table or a run config's [model]),
or a checkpoint's config.json (its preprocessing and class names are kept).")]
pub struct ImportArgs {
    /// The `.pth` file.
    #[arg(value_name = "MODEL.pth")]
    pub pth: PathBuf,
    /// The model's config: JSON or TOML (see below).
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    pub config: Option<PathBuf>,
    /// The checkpoint directory to write (refused when it exists and is not empty,
    /// unless --force).
    #[arg(long, value_name = "DIR", required_unless_present = "list")]
    pub out: Option<PathBuf>,
    /// Replace a name prefix: `OLD=NEW` (repeatable, applied in order), e.g.
    /// `linear.=fc.`.
    #[arg(long, value_name = "OLD=NEW", value_parser = parse_rename)]
    pub rename: Vec<Rename>,
    /// The entry of a dict holding the state_dict (default: found by itself).
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Convert the weights to this dtype: f32, f64, f16 or bf16 (default: the file's).
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// The data set the weights were trained on: cifar10, cifar100 or mnist; records
    /// its preprocessing (mean, std, input size) and class names in config.json.
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// Write into a non-empty --out, replacing config.json and model.safetensors.
    #[arg(long)]
    pub force: bool,
    /// Print the file's tensors (name, dtype, shape) after the prefix handling and
    /// renames, and write nothing.
    #[arg(long)]
    pub list: bool,
}

fn parse_rename(s: &str) -> Result<Rename, String> {
    s.parse()
}

/// Reads `--config`: JSON (a bare model config, a checkpoint's config.json, timm's) or
/// TOML (a bare model table with `family`, or a run config's `[model]` table).
///
/// # Errors
/// An unreadable file, a config that does not parse or is not a valid model.
pub fn read_config(path: &Path) -> anyhow::Result<CheckpointConfig> {
    let is_toml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    if !is_toml {
        return Ok(tau_model::checkpoint::load_config(path)?);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let model = match table.get("model") {
        Some(toml::Value::Table(m)) if !table.contains_key("family") => m.clone(),
        _ => table,
    };
    let model: ModelConfig = model
        .try_into()
        .with_context(|| format!("{}: not a model config", path.display()))?;
    let config = CheckpointConfig::new(model);
    config
        .check()
        .map_err(anyhow::Error::msg)
        .with_context(|| path.display().to_string())?;
    Ok(config)
}

/// What `--dataset` records: the data set's name, preprocessing and class names.
fn record_dataset(name: &str, config: &mut CheckpointConfig) -> anyhow::Result<()> {
    let (preprocessing, classes): (Preprocessing, Option<Vec<String>>) = match name {
        "cifar10" => (
            Preprocessing::cifar10(),
            Some(tau_data::cifar::CIFAR10_CLASSES.map(String::from).to_vec()),
        ),
        "cifar100" => (
            Preprocessing::cifar10(),
            Some(
                tau_data::cifar::CIFAR100_FINE_CLASSES
                    .map(String::from)
                    .to_vec(),
            ),
        ),
        "mnist" => (
            Preprocessing::mnist(),
            Some((0..10).map(|i| i.to_string()).collect()),
        ),
        other => bail!("--dataset {other:?}: expected cifar10, cifar100 or mnist"),
    };
    let model = &config.model;
    if model.in_channels() != Some(preprocessing.channels()) {
        bail!(
            "--dataset {name}: its images have {} channels, the model takes {}",
            preprocessing.channels(),
            model
                .in_channels()
                .map_or("vectors".to_string(), |c| c.to_string())
        );
    }
    config.dataset = Some(name.to_string());
    config.preprocessing = Some(preprocessing);
    config.class_names = classes.filter(|c| c.len() == model.num_outputs());
    Ok(())
}

fn print_list(args: &ImportArgs, options: &PthOptions) -> anyhow::Result<Outcome> {
    let index = read_index(&args.pth, options)?;
    let where_ = index
        .key
        .as_ref()
        .map_or("the file".to_string(), |k| format!("entry {k:?}"));
    outln!(
        "{}: {} tensors in {where_}{}",
        args.pth.display(),
        index.tensors.len(),
        if index.stripped.is_empty() {
            String::new()
        } else {
            format!(" (stripped {})", index.stripped.join(""))
        }
    )?;
    for t in &index.tensors {
        let dtype = match &t.dtype {
            Ok(d) => d.as_str().to_string(),
            Err(class) => class.clone(),
        };
        outln!("{}\t{dtype}\t{:?}", t.name, t.shape)?;
    }
    Ok(Outcome::Finished)
}

/// Runs `tau-resnet import`.
///
/// # Errors
/// A bad config or `.pth` file (naming the file and the tensor), tensors that do not
/// match the config (all of them listed), an output directory that is not empty.
pub fn run(args: ImportArgs) -> anyhow::Result<Outcome> {
    let dtype = match &args.dtype {
        None => None,
        Some(s) => Some(
            s.parse::<DType>()
                .ok()
                .filter(|d| d.is_float())
                .with_context(|| format!("--dtype {s:?}: expected f32, f64, f16 or bf16"))?,
        ),
    };
    let options = PthOptions {
        key: args.key.clone(),
        renames: args.rename.clone(),
        dtype,
    };
    if args.list {
        return print_list(&args, &options);
    }
    let (Some(config_path), Some(out)) = (&args.config, &args.out) else {
        bail!("--config and --out are needed (or --list)");
    };
    let mut config = read_config(config_path)?;
    if let Some(name) = &args.dataset {
        record_dataset(name, &mut config)?;
    }
    if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a directory", out.display());
        }
        let non_empty = std::fs::read_dir(out)
            .with_context(|| format!("listing {}", out.display()))?
            .next()
            .is_some();
        if non_empty && !args.force {
            bail!(
                "{} exists and is not empty (--force writes into it)",
                out.display()
            );
        }
    }
    let (varmap, report) = load_pth(&args.pth, &config.model, &options, &Device::Cpu)
        .with_context(|| format!("importing {}", args.pth.display()))?;
    tau_model::checkpoint::save_with(out, &config, &varmap)
        .with_context(|| format!("writing the checkpoint {}", out.display()))?;
    outln!(
        "{}: {report}\nwrote {} ({} {}, L = {}, tau = {:.6}, {} parameters)",
        args.pth.display(),
        out.display(),
        config.model.family(),
        describe_depth(&config.model),
        config.model.n_blocks(),
        config.model.tau_init(),
        config.model.num_parameters()
    )?;
    Ok(Outcome::Finished)
}

fn describe_depth(model: &ModelConfig) -> String {
    format!("depth {}", model.as_family().depth())
}
