//! `tau-resnet export`: a hub-ready folder from a finished run: `config.json` (with the
//! preprocessing), `model.safetensors` (weights and buffers, no optimizer state) and a
//! `README.md` model card, ready for `huggingface-cli upload`.

use crate::cmd::outln;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle::Device;
use tau_model::{CheckpointConfig, Preprocessing};
use tau_records::{RunStatus, SUMMARY_FILE, Summary};

use super::Outcome;
use tau_train::config::{NormalizeKind, RunConfig, SourceKind};
use tau_train::setup::run_config;
use tau_train::trainer::last_checkpoint;

mod card;

use card::model_card;

/// Arguments of `tau-resnet export`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  tau-resnet export runs/cifar10-resnet110-bn hub/resnet110-cifar10
  huggingface-cli upload my-name/resnet110-cifar10 hub/resnet110-cifar10

The folder holds config.json (architecture, tau, preprocessing, class names),
model.safetensors (weights and BatchNorm statistics, no optimizer state) and README.md, a
model card with the hub's YAML metadata and the run's metrics and config.")]
pub struct ExportArgs {
    /// The run directory (`config.toml`, `summary.json`, `checkpoints/last`).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// The folder to write (refused when it exists and is not empty, unless --force).
    #[arg(value_name = "OUT_DIR")]
    pub out_dir: PathBuf,
    /// Write into a non-empty OUT_DIR, replacing the three files.
    #[arg(long)]
    pub force: bool,
    /// The hub repo id the card's usage examples name (default `<your-name>/<run name>`).
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo_id: Option<String>,
}

/// The hub data set repos of the data sets `tau-resnet` downloads.
fn hub_dataset(source: SourceKind) -> Option<&'static str> {
    match source {
        SourceKind::Mnist => Some("ylecun/mnist"),
        SourceKind::Cifar10 => Some("uoft-cs/cifar10"),
        SourceKind::Cifar100 => Some("uoft-cs/cifar100"),
        SourceKind::Folder | SourceKind::Synthetic => None,
    }
}

/// What a checkpoint written before checkpoints recorded their preprocessing would have
/// recorded: the run's normalization, the data set's image size, and the class names of
/// MNIST and CIFAR-10 (their loaders' names).
fn record_from_run(cfg: &RunConfig, checkpoint: &mut CheckpointConfig) {
    let d = &cfg.data;
    if checkpoint.dataset.is_none()
        && matches!(
            d.source,
            SourceKind::Mnist | SourceKind::Cifar10 | SourceKind::Cifar100
        )
    {
        checkpoint.dataset = Some(d.source.to_string());
    }
    let Some(channels) = checkpoint.model.in_channels() else {
        return;
    };
    if checkpoint.preprocessing.is_none() {
        let size = match d.source {
            SourceKind::Mnist => Some([1, 28, 28]),
            SourceKind::Cifar10 | SourceKind::Cifar100 => Some([3, 32, 32]),
            _ => None,
        };
        let normalize = d.normalize.unwrap_or(match d.source {
            SourceKind::Mnist => NormalizeKind::Mnist,
            SourceKind::Cifar10 | SourceKind::Cifar100 => NormalizeKind::Cifar10,
            _ => NormalizeKind::None,
        });
        if let Some(size) = size.filter(|s| s[0] == channels) {
            let p = match normalize {
                NormalizeKind::Mnist => Preprocessing::mnist(),
                NormalizeKind::Cifar10 => Preprocessing::cifar10(),
                NormalizeKind::None | NormalizeKind::UnitNorm => Preprocessing::identity(size),
            };
            if p.channels() == channels {
                checkpoint.preprocessing = Some(Preprocessing {
                    input_size: size,
                    ..p
                });
            }
        }
    }
    if checkpoint.class_names.is_none() {
        let names: Option<Vec<String>> = match d.source {
            SourceKind::Mnist => Some((0..10).map(|i| i.to_string()).collect()),
            SourceKind::Cifar10 => Some(
                [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ]
                .map(String::from)
                .to_vec(),
            ),
            _ => None,
        };
        checkpoint.class_names = names.filter(|n| n.len() == checkpoint.model.num_outputs());
    }
}

/// Whether `dir` exists and holds anything.
fn non_empty(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        bail!("{} exists and is not a directory", dir.display());
    }
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .next()
        .is_some())
}

/// Runs `tau-resnet export`.
///
/// # Errors
/// Not a finished run (no config, summary or checkpoint; a diverged run), a corrupt
/// checkpoint (naming the file and tensor), a non-empty OUT_DIR without --force, I/O.
pub fn run(args: ExportArgs) -> anyhow::Result<Outcome> {
    let run_dir = &args.run_dir;
    let cfg = run_config(run_dir)?;
    let summary_path = run_dir.join(SUMMARY_FILE);
    let summary: Summary =
        serde_json::from_slice(&std::fs::read(&summary_path).with_context(|| {
            format!("reading {} (is the run finished?)", summary_path.display())
        })?)
        .with_context(|| format!("{}: not a run summary", summary_path.display()))?;
    match summary.status {
        RunStatus::Finished => {}
        RunStatus::Diverged => bail!(
            "{}: the run diverged{}; its weights are not exported",
            run_dir.display(),
            summary
                .diverged_at_step
                .map_or_else(String::new, |s| format!(" at step {s}"))
        ),
        RunStatus::Interrupted => tracing::warn!(
            "{}: the run was interrupted after {} steps; exporting its last checkpoint",
            run_dir.display(),
            summary.steps
        ),
    }
    let ckpt = last_checkpoint(run_dir)
        .with_context(|| format!("{} has no checkpoint (checkpoints/last)", run_dir.display()))?;
    let (mut checkpoint, varmap) = tau_model::checkpoint::load_checkpoint(&ckpt, &Device::Cpu)
        .with_context(|| format!("loading checkpoint {}", ckpt.display()))?;
    record_from_run(&cfg, &mut checkpoint);
    let learned_tau = if checkpoint.model.learnable_tau() {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("model lock poisoned"))?;
        match data.get("tau") {
            Some(t) => Some(
                t.as_tensor()
                    .flatten_all()?
                    .to_dtype(candle::DType::F64)?
                    .to_vec1::<f64>()?[0],
            ),
            None => None,
        }
    } else {
        None
    };
    let out = &args.out_dir;
    if non_empty(out)? && !args.force {
        bail!(
            "{} exists and is not empty: choose another folder or pass --force",
            out.display()
        );
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| summary.name.clone());
    let repo_id = args
        .repo_id
        .clone()
        .unwrap_or_else(|| format!("<your-name>/{name}"));
    // The card shows the config without the paths of this machine.
    let mut shown = cfg.clone();
    shown.data.dir = None;
    shown.out_dir = None;
    let config_toml = shown.to_toml()?;
    let card = model_card(
        &name,
        &repo_id,
        &checkpoint,
        learned_tau,
        &cfg,
        &config_toml,
        &summary,
    );
    // config.json and model.safetensors (each atomic), then the card.
    tau_model::checkpoint::save_with(out, &checkpoint, &varmap)
        .with_context(|| format!("writing the model into {}", out.display()))?;
    tau_records::write_atomic(&out.join("README.md"), card.as_bytes())?;
    tau_records::sync_dir(out);
    let extra: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !["config.json", "model.safetensors", "README.md"].contains(&n.as_str()))
        .collect();
    if !extra.is_empty() {
        tracing::warn!(
            "{} also holds {extra:?}, which an upload of the folder would include",
            out.display()
        );
    }
    outln!(
        "exported {} ({}) to {}",
        ckpt.display(),
        summary.status.as_str(),
        out.display()
    )?;
    for f in ["config.json", "model.safetensors", "README.md"] {
        let len = std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
        outln!("  {f:<18} {len:>10} bytes")?;
    }
    Ok(Outcome::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tau_records::CodeVersion;

    /// The card of a finished CIFAR-10 run of the model `[model]` describes.
    fn card_for(model: &str) -> String {
        let toml = format!(
            "name = \"card\"\nseed = 0\nsteps = 10\n[model]\n{model}\n\
             [data]\nsource = \"cifar10\"\nbatch_size = 8\n[optim]\nkind = \"sgd\"\nlr = 0.1\n"
        );
        let cfg = tau_train::config::config_from_table(toml.parse().unwrap()).unwrap();
        let mut checkpoint = CheckpointConfig::new(cfg.model.clone());
        checkpoint.dataset = Some("CIFAR-10".into());
        let summary = Summary {
            name: "card".into(),
            status: RunStatus::Finished,
            diverged_at_step: None,
            divergence_reason: None,
            steps: 10,
            epochs_completed: 0,
            reached_target_at_step: None,
            final_metrics: None,
            best_train_loss: None,
            best_test_loss: None,
            best_test_acc: None,
            wall_s: 1.0,
            device: "cpu".into(),
            version: CodeVersion::from_build("0.1.0", None),
        };
        model_card("card", "me/card", &checkpoint, None, &cfg, &toml, &summary)
    }

    /// The prose of a card: everything before the training config, which quotes the TOML.
    fn prose(card: &str) -> &str {
        card.split("## Training config").next().unwrap()
    }

    /// The card once called every CIFAR ResNet's shortcut option A, whatever `shortcut` was.
    #[test]
    fn the_card_names_the_shortcut_of_the_model() {
        let card = card_for("family = \"cifar_resnet\"\ndepth = 20\nshortcut = \"conv_bn\"");
        let text = prose(&card);
        assert!(
            text.contains("BatchNorm, option-B conv-BatchNorm shortcut, 3 input channels"),
            "{text}"
        );
        assert!(!text.contains("option-A"), "{text}");
        // The usage paragraph names it too; τ still scales the branches.
        assert!(
            text.contains("`shortcut(x)` is BatchNorm of a 1×1 stride-2 convolution of x")
                && text.contains("relu(shortcut(x) + tau * branch(x))")
                && text.contains("τ rule: `1/sqrt(L)`"),
            "{text}"
        );
        let sub = card_for("family = \"cifar_resnet\"\ndepth = 8\nshortcut = \"subsample_bn\"");
        assert!(
            prose(&sub).contains("is BatchNorm of x at every other pixel")
                && !prose(&sub).contains("option-A"),
            "{sub}"
        );
        let plain = card_for("family = \"cifar_resnet\"\ndepth = 8");
        assert!(prose(&plain).contains("option-A shortcut"), "{plain}");
    }

    /// The card once described a τ rule and a τ-scaled PyTorch block for Fixup, SkipInit
    /// and ReZero models, which have no τ.
    #[test]
    fn the_card_of_a_fixup_model_describes_fixup_not_tau() {
        let card =
            card_for("family = \"cifar_resnet\"\ndepth = 20\nnorm = \"none\"\nscaling = \"fixup\"");
        let text = prose(&card);
        assert!(
            text.contains("(no normalization, scalar biases, Fixup branch scaling, option-A shortcut,")
                && text.contains("scaled by Fixup (Zhang, Dauphin & Ma")
                && text.contains("one learnable `scale` per residual block (`layer1.0.scale`, …), initialized at 1, at L = 9 residual blocks; no τ")
                && text.contains("`relu(shortcut(x) + scale * branch(x) + bias2b)`"),
            "{text}"
        );
        for tau in ["τ rule", "tau * branch", "x_l + τ·F(x_l)", "τ ="] {
            assert!(!text.contains(tau), "{tau:?} in\n{text}");
        }
        let rezero =
            card_for("family = \"cifar_resnet\"\ndepth = 8\nnorm = \"none\"\nscaling = \"rezero\"");
        let text = prose(&rezero);
        assert!(
            text.contains("no normalization, no biases, ReZero branch scaling")
                && text
                    .contains("`alpha` per residual block (`layer1.0.alpha`, …), initialized at 0")
                && text.contains("`shortcut(x) + alpha * branch(x)`")
                && !text.contains("relu(shortcut(x) + alpha")
                && !text.contains("τ rule"),
            "{text}"
        );
        let skipinit = card_for("family = \"cifar_resnet\"\ndepth = 8\nscaling = \"skipinit\"");
        assert!(
            prose(&skipinit).contains("`relu(shortcut(x) + alpha * branch(x))`"),
            "{skipinit}"
        );
    }
}
