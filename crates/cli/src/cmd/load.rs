//! Loading a model for `eval` and `predict`: a checkpoint directory, a run directory, or a
//! hub repo in this project's layout, timm's, or as bare torchvision weights.

use std::path::Path;

use anyhow::{Context, bail};
use candle::Device;
use tau_model::hub::{HubOptions, LoadSpec, Pretrained, load_pretrained};

use tau_train::trainer::last_checkpoint;

/// Where a command's model comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A checkpoint directory (`config.json` + `model.safetensors`), a run directory (its
    /// last checkpoint), or a Hugging Face hub model id: this project's, timm's
    /// (`timm/resnet50.a1_in1k`), or bare weights with --weights-file and --arch.
    #[arg(long, value_name = "DIR_OR_HUB_ID")]
    pub checkpoint: String,
    /// Revision (branch, tag or commit) of a hub checkpoint.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// The weights file in the directory or repo (default `model.safetensors`), such as
    /// `resnet50.safetensors` of `lmz/candle-resnet`.
    #[arg(long, value_name = "NAME")]
    pub weights_file: Option<String>,
    /// The architecture of weights without a `config.json`: resnet50, resnet101 or
    /// resnet152 (torchvision names; τ = 1, BatchNorm, ImageNet preprocessing).
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    /// Use only files already in the hub cache, never the network (for `eval`, the data
    /// set's too, as HF_HUB_OFFLINE=1 does).
    #[arg(long)]
    pub offline: bool,
}

impl ModelArgs {
    /// Loads the model on `device`, f16/bf16 weights widened to f32; returns where it came
    /// from (for messages) with it.
    ///
    /// # Errors
    /// An unknown architecture, a missing or corrupt checkpoint (naming the file and the
    /// tensor), a repo the cache and the hub cannot provide.
    pub fn load(&self, device: &Device) -> anyhow::Result<(String, Pretrained)> {
        let config = match &self.arch {
            Some(arch) => Some(
                tau_model::timm::architecture_checkpoint_config(arch)
                    .map_err(anyhow::Error::msg)
                    .context("--arch")?,
            ),
            None => None,
        };
        let p = Path::new(&self.checkpoint);
        if let Some(rev) = &self.revision
            && p.is_dir()
        {
            anyhow::bail!(
                "--revision {rev}: {} is a local directory; a revision applies to hub ids only",
                self.checkpoint
            );
        }
        let place = if p.is_dir()
            && config.is_none()
            && !p.join(tau_model::checkpoint::CONFIG_FILE).is_file()
            && (p.join(tau_records::CHECKPOINTS_DIR).exists()
                || p.join(tau_records::CONFIG_FILE).is_file())
        {
            last_checkpoint(p)
                .with_context(|| {
                    format!(
                        "{} is a run directory without a checkpoint (checkpoints/last): \
                         a run that diverged or was killed before its first checkpoint has none",
                        self.checkpoint
                    )
                })?
                .display()
                .to_string()
        } else {
            self.checkpoint.clone()
        };
        let spec = LoadSpec {
            revision: self.revision.clone(),
            weights_file: self.weights_file.clone(),
            config,
        };
        let options = HubOptions {
            local_files_only: self.offline,
            ..Default::default()
        };
        let mut pretrained = load_pretrained(&place, &spec, &options, device).map_err(|e| {
            let hint = match &e {
                tau_model::CheckpointError::Hub { message, .. }
                    if message.starts_with(tau_model::checkpoint::CONFIG_FILE)
                        && self.arch.is_none() =>
                {
                    " (for weights without a config.json, give --weights-file and --arch)"
                }
                _ => "",
            };
            anyhow::Error::new(e).context(format!("loading checkpoint {place}{hint}"))
        })?;
        // Half-precision weights (`import --dtype bf16`) compute in f32: candle's CPU
        // kernels have no matrix product or convolution in f16 or bf16, and widening is exact.
        pretrained.varmap = tau_model::checkpoint::widen_to_f32(&pretrained.varmap)?;
        Ok((place, pretrained))
    }
}

/// A per-channel statistic given on the command line: one value per channel.
///
/// # Errors
/// A count other than `channels`, a non-finite value, a non-positive std.
pub fn check_stat(name: &str, values: &[f64], channels: usize) -> anyhow::Result<()> {
    if values.len() != channels {
        bail!(
            "--{name} has {} values, the model takes {channels} channels",
            values.len()
        );
    }
    if values
        .iter()
        .any(|v| !v.is_finite() || (name == "std" && *v <= 0.0))
    {
        bail!("--{name} {values:?}: every value must be finite (and a std positive)");
    }
    Ok(())
}
