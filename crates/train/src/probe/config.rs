//! The probe's configuration: a run config's `[model]` and `seed` or a probe config
//! with a `[probe]` table, the command-line flags and `--set` overrides on top; or, with
//! `probe.checkpoint` (`--checkpoint`), the model of a trained checkpoint.

use crate::error::{Context, bail};

use super::*;

/// The `[probe]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    /// Inputs per seed (default 64 for the theory network, 8 for the ResNets).
    #[serde(default)]
    pub n_inputs: Option<usize>,
    /// Number of seeds, consecutive from the config's `seed` (default 3).
    #[serde(default = "default_seeds")]
    pub n_seeds: usize,
    /// The τ rules to probe, as written (default: the model's own τ).
    #[serde(default)]
    pub taus: Vec<String>,
    /// Height and width of the ResNets' random input images (default: the checkpoint's
    /// input size, else 64 for a bottleneck ResNet and 32 for the others).
    #[serde(default)]
    pub image_size: Option<usize>,
    /// The τ rules (a subset of `taus`, as written there) that get the backward probe of
    /// the theory network; absent: all of them.
    #[serde(default)]
    pub grad_taus: Option<Vec<String>>,
    /// A checkpoint directory or a run directory (its last checkpoint) whose trained
    /// weights are probed instead of freshly drawn ones; the model is the checkpoint's.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
}

fn default_seeds() -> usize {
    3
}

/// Top-level keys of a run config that the probe reads past.
const RUN_KEYS: &[&str] = &[
    "name", "steps", "epochs", "device", "dtype", "out_dir", "data", "loss", "optim", "log",
];

/// A probe config, read and checked: what [`run_probe`] probes.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    /// The model (the checkpoint's, with `probe.checkpoint`).
    pub model: ModelConfig,
    /// The first seed; the probe uses `probe.n_seeds` consecutive ones.
    pub seed: u64,
    /// The `[probe]` settings.
    pub settings: ProbeSettings,
    /// The τ rules to probe: the model's own, or `probe.taus`.
    pub rules: Vec<ProbeTauRule>,
    /// The resolved config (overrides applied), as written beside `probe.json`.
    pub table: toml::Table,
    /// The checkpoint directory whose weights are probed (resolved from a run directory).
    pub checkpoint: Option<PathBuf>,
}

/// Checks that `table` with the `--set` overrides `sets` applied is a valid probe config
/// (the keys, the model, the `[probe]` settings and every τ rule), as `tau-resnet probe
/// --config FILE --set ...` would read it, without probing anything.
///
/// # Errors
/// The first problem found, naming the key.
pub fn validate_config(table: toml::Table, sets: &[String]) -> crate::Result<()> {
    resolve_config(table, sets).map(|_| ())
}

/// Reads a probe config: `table` (a run config's `[model]` and `seed`, or a probe config
/// with `seed`, `[model]` and `[probe]`; empty for the defaults: the theory network) with
/// the `--set` overrides `sets` applied; with `probe.checkpoint`, the checkpoint's model.
///
/// # Errors
/// The first problem found, naming the key.
pub fn resolve_config(mut table: toml::Table, sets: &[String]) -> crate::Result<ProbePlan> {
    crate::config::apply_overrides(&mut table, sets)?;
    let settings = probe_settings(&table)?;
    let checkpoint = checkpoint_model(&mut table, &settings)?;
    let model_table = match table.get_mut("model") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => bail!("`model` must be a table"),
        None => {
            table.insert("model".into(), toml::Value::Table(toml::Table::new()));
            match table.get_mut("model") {
                Some(toml::Value::Table(t)) => t,
                _ => bail!("`model` must be a table"),
            }
        }
    };
    model_table
        .entry("family")
        .or_insert_with(|| toml::Value::String("theory".into()));
    for key in table.keys() {
        if !matches!(key.as_str(), "model" | "seed" | "probe") && !RUN_KEYS.contains(&key.as_str())
        {
            bail!("unknown key `{key}` (a probe config has `seed`, `[model]` and `[probe]`)");
        }
    }
    let seed = match table.get("seed") {
        None => 0,
        Some(toml::Value::Integer(s)) if *s >= 0 => *s as u64,
        Some(other) => bail!("key `seed`: expected a non-negative integer, got {other}"),
    };
    let model_value = table.get("model").cloned().context("missing [model]")?;
    let model: ModelConfig = model_value
        .clone()
        .try_into()
        .map_err(
            |e: toml::de::Error| match crate::config::locate_model_error(&model_value) {
                Some((key, message)) => crate::error::err!("key `model.{key}`: {message}"),
                None => crate::error::err!("key `model`: {}", e.message()),
            },
        )?;
    model.validate().context("key `model`")?;
    check_image_size(&model, settings.image_size)?;
    let rules = probe_rules(&model, &settings)?;
    Ok(ProbePlan {
        model,
        seed,
        settings,
        rules,
        table,
        checkpoint,
    })
}

/// With `probe.checkpoint`: the checkpoint directory it names (a run directory stands
/// for its last checkpoint), whose model becomes the table's `[model]`. The model is the
/// checkpoint's alone: a `[model]` (from the config file, `--family`, `--depth`,
/// `--width` or `--set model.…`) is refused, as are τ rules (`probe.taus`, `--tau`).
fn checkpoint_model(
    table: &mut toml::Table,
    settings: &ProbeSettings,
) -> crate::Result<Option<PathBuf>> {
    let Some(given) = &settings.checkpoint else {
        return Ok(None);
    };
    if table.contains_key("model") {
        bail!(
            "--checkpoint (probe.checkpoint) probes the checkpoint's own model: drop the model \
             settings ([model], --family, --depth, --width, --set model.…)"
        );
    }
    if !settings.taus.is_empty() {
        bail!(
            "key `probe.taus` (--tau): a checkpoint is probed with its own τ (its weights were \
             trained with it)"
        );
    }
    let dir = checkpoint_dir(given)?;
    let record = tau_model::checkpoint::load_config(&dir.join(tau_model::checkpoint::CONFIG_FILE))
        .with_context(|| format!("key `probe.checkpoint`: {}", given.display()))?;
    let model = toml::Value::try_from(&record.model)
        .context("key `probe.checkpoint`: writing the checkpoint's model as TOML")?;
    table.insert("model".into(), model);
    Ok(Some(dir))
}

/// The checkpoint directory `path` stands for: itself when it holds a `config.json`, a run
/// directory's last checkpoint.
fn checkpoint_dir(path: &Path) -> crate::Result<PathBuf> {
    if path.join(tau_model::checkpoint::CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        bail!(
            "key `probe.checkpoint`: {} is not a directory (a checkpoint directory or a run \
             directory)",
            path.display()
        );
    }
    crate::trainer::last_checkpoint(path).with_context(|| {
        format!(
            "key `probe.checkpoint`: {} holds neither a checkpoint ({}) nor a run's checkpoints \
             ({}/last)",
            path.display(),
            tau_model::checkpoint::CONFIG_FILE,
            tau_records::CHECKPOINTS_DIR
        )
    })
}

/// The `[probe]` table, checked.
fn probe_settings(table: &toml::Table) -> crate::Result<ProbeSettings> {
    let settings: ProbeSettings = match table.get("probe") {
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e| crate::error::err!("key `probe`: {e}"))?,
        None => ProbeSettings {
            n_inputs: None,
            n_seeds: default_seeds(),
            taus: Vec::new(),
            image_size: None,
            grad_taus: None,
            checkpoint: None,
        },
    };
    if settings.n_seeds == 0 || settings.n_seeds > 1000 {
        bail!(
            "key `probe.n_seeds`: must be 1..=1000, got {}",
            settings.n_seeds
        );
    }
    if let Some(n) = settings.n_inputs
        && (n == 0 || n > 1 << 20)
    {
        bail!("key `probe.n_inputs`: must be 1..=1048576, got {n}");
    }
    Ok(settings)
}

/// `probe.image_size` of a ResNet: at least the family's [`min_image_size`] (a theory
/// network, which takes vectors, reads past it).
fn check_image_size(model: &ModelConfig, image_size: Option<usize>) -> crate::Result<()> {
    if image_size.is_some() && min_image_size(model).is_none() {
        bail!(
            "key `probe.image_size`: the {} network takes vectors, not images (its inputs \
             are `model.input_dim` long)",
            model.family()
        );
    }
    if let (Some(size), Some(min)) = (image_size, min_image_size(model))
        && size < min
    {
        bail!(
            "key `probe.image_size`: must be at least {min} for a {} (its total stride: the \
             last stage's maps are 1×1 there), got {size}",
            model.family()
        );
    }
    Ok(())
}

/// The τ rules to probe: the model's own, or `probe.taus` with the backward pass for
/// those in `probe.grad_taus` (all when it is absent).
fn probe_rules(model: &ModelConfig, settings: &ProbeSettings) -> crate::Result<Vec<ProbeTauRule>> {
    let scaling = model.scaling();
    if scaling != Scaling::Tau && !settings.taus.is_empty() {
        bail!(
            "key `probe.taus` (--tau): the model's branches are scaled by scaling = \"{scaling}\", not by τ; probe it without τ rules, or with scaling = \"tau\""
        );
    }
    let rules = if settings.taus.is_empty() {
        let rule = model.tau_rule();
        vec![ProbeTauRule {
            text: rule.to_string(),
            rule,
            backward: true,
        }]
    } else {
        settings
            .taus
            .iter()
            .map(|t| {
                let rule: TauRule = t.parse().with_context(|| "key `probe.taus`".to_string())?;
                Ok(ProbeTauRule {
                    text: t.clone(),
                    rule,
                    backward: settings
                        .grad_taus
                        .as_ref()
                        .is_none_or(|g| g.iter().any(|x| x == t)),
                })
            })
            .collect::<crate::Result<Vec<_>>>()?
    };
    if let Some(g) = &settings.grad_taus {
        for t in g {
            if !rules.iter().any(|r| &r.text == t) {
                bail!(
                    "key `probe.grad_taus`: `{t}` is not one of the probed rules {:?}",
                    rules.iter().map(|r| r.text.as_str()).collect::<Vec<_>>()
                );
            }
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `probe.image_size` below the family's total stride is refused up front, naming the
    /// key and the minimum (0 used to fail deep in the stem's convolution); the minimum
    /// itself is accepted, and the theory network reads past the key.
    #[test]
    fn image_size_below_the_total_stride_is_refused() {
        let resolve = |family: &str, depth: usize, image: usize| {
            let sets = [
                format!("model.family=\"{family}\""),
                format!("model.depth={depth}"),
                format!("probe.image_size={image}"),
            ];
            resolve_config(toml::Table::new(), &sets)
        };
        for (family, depth, min) in [("cifar_resnet", 8, 4), ("bottleneck_resnet", 50, 32)] {
            for bad in [0, 1, min - 1] {
                let err = resolve(family, depth, bad).unwrap_err().to_string();
                assert_eq!(
                    err,
                    format!(
                        "key `probe.image_size`: must be at least {min} for a {family} (its \
                         total stride: the last stage's maps are 1×1 there), got {bad}"
                    )
                );
            }
            let plan = resolve(family, depth, min).unwrap();
            assert_eq!(plan.settings.image_size, Some(min));
        }
        // The theory network takes vectors: any image size is refused.
        let err = resolve("theory", 4, 32).unwrap_err().to_string();
        assert!(err.contains("the theory network takes vectors"), "{err}");
    }
}
