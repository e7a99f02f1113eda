//! `tau-resnet probe`: forward/backward stability of a model at initialization
//! (PAPER.md, claims 1 and 2), for any model family, over several seeds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use tau_model::{Model, ModelConfig, TauRule};
use tau_records::{CONFIG_FILE, PROBE_FILE, write_atomic};

use super::Outcome;
use crate::probe::{
    PROBE_FORMAT, ProbeRecord, ProbeTau, ProbeTauRule, median, probe_theory, rule_alpha,
    sample_blocks,
};

/// Arguments of `tau-resnet probe`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tau-resnet probe --depth 256 --tau 1 --tau 'L^-0.25' --tau '1/sqrt(L)' --tau 1/L\n  tau-resnet probe --config configs/theory-gd.toml --set model.depth=1024 --json\n  tau-resnet probe --family cifar_resnet --depth 110 --set model.norm=none --tau 1 --tau '1/sqrt(L)'\n\nThe config may be a run config (its [model] table and seed are used) or a probe config:\n  seed = 0\n  [model]  family = \"theory\", width = 256, depth = 64, ...\n  [probe]  n_inputs = 64, n_seeds = 3, taus = [\"1\", \"1/sqrt(L)\"], image_size = 32\n           grad_taus = [\"1/sqrt(L)\"]  (theory network: backward probe for these only; default all)"
)]
pub struct ProbeArgs {
    /// A TOML file with a `[model]` table (a run config works), optional `seed` and `[probe]`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key (dotted), e.g. `--set model.depth=64`; applied after the flags.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Model family when no config gives one: theory, cifar_resnet or bottleneck_resnet.
    #[arg(long)]
    pub family: Option<String>,
    /// Network depth (`model.depth`): L blocks for the theory network, 6n+2 for CIFAR ResNets.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Width of the theory network (`model.width`).
    #[arg(long)]
    pub width: Option<usize>,
    /// A τ rule to probe; repeat for several (default: the model's own τ).
    #[arg(long = "tau", value_name = "RULE")]
    pub taus: Vec<String>,
    /// First seed (`seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of seeds, consecutive from the first (`probe.n_seeds`, default 3).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Inputs per seed (`probe.n_inputs`, default 64 for the theory network, 8 for ResNets).
    #[arg(long)]
    pub inputs: Option<usize>,
    /// Print the record as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write `probe.json` (and the resolved `config.toml`) into this directory, atomically.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The `[probe]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSettings {
    #[serde(default)]
    n_inputs: Option<usize>,
    #[serde(default = "default_seeds")]
    n_seeds: usize,
    #[serde(default)]
    taus: Vec<String>,
    #[serde(default)]
    image_size: Option<usize>,
    /// The τ rules (a subset of `taus`, as written there) that get the backward probe of
    /// the theory network; absent: all of them.
    #[serde(default)]
    grad_taus: Option<Vec<String>>,
}

fn default_seeds() -> usize {
    3
}

/// Top-level keys of a run config that the probe reads past.
const RUN_KEYS: &[&str] = &[
    "name", "steps", "epochs", "device", "dtype", "out_dir", "data", "loss", "optim", "log",
];

struct Resolved {
    model: ModelConfig,
    seed: u64,
    settings: ProbeSettings,
    rules: Vec<ProbeTauRule>,
    table: toml::Table,
}

/// Checks that `table` with the `--set` overrides `sets` applied is a valid probe config
/// (the keys, the model, the `[probe]` settings and every τ rule), as `tau-resnet probe
/// --config FILE --set ...` would read it, without probing anything.
///
/// # Errors
/// The first problem found, naming the key.
pub fn validate_config(table: toml::Table, sets: &[String]) -> anyhow::Result<()> {
    let args = ProbeArgs {
        config: None,
        sets: sets.to_vec(),
        family: None,
        depth: None,
        width: None,
        taus: Vec::new(),
        seed: None,
        seeds: None,
        inputs: None,
        json: false,
        out: None,
    };
    resolve_table(table, &args).map(|_| ())
}

fn resolve(args: &ProbeArgs) -> anyhow::Result<Resolved> {
    let table = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("parsing config {}", path.display()))?
        }
        None => toml::Table::new(),
    };
    resolve_table(table, args)
}

fn resolve_table(mut table: toml::Table, args: &ProbeArgs) -> anyhow::Result<Resolved> {
    let mut sets = Vec::new();
    if let Some(f) = &args.family {
        sets.push(format!("model.family=\"{f}\""));
    }
    if let Some(d) = args.depth {
        sets.push(format!("model.depth={d}"));
    }
    if let Some(w) = args.width {
        sets.push(format!("model.width={w}"));
    }
    if let Some(s) = args.seed {
        sets.push(format!("seed={s}"));
    }
    if let Some(n) = args.seeds {
        sets.push(format!("probe.n_seeds={n}"));
    }
    if let Some(n) = args.inputs {
        sets.push(format!("probe.n_inputs={n}"));
    }
    if !args.taus.is_empty() {
        let list = toml::Value::Array(
            args.taus
                .iter()
                .map(|t| toml::Value::String(t.clone()))
                .collect(),
        );
        sets.push(format!("probe.taus={list}"));
    }
    sets.extend(args.sets.iter().cloned());
    crate::config::apply_overrides(&mut table, &sets)?;
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
    let model: ModelConfig = table
        .get("model")
        .cloned()
        .context("missing [model]")?
        .try_into()
        .map_err(|e| anyhow::anyhow!("key `model`: {e}"))?;
    model.validate().context("key `model`")?;
    let settings: ProbeSettings = match table.get("probe") {
        Some(v) => v
            .clone()
            .try_into()
            .map_err(|e| anyhow::anyhow!("key `probe`: {e}"))?,
        None => ProbeSettings {
            n_inputs: None,
            n_seeds: default_seeds(),
            taus: Vec::new(),
            image_size: None,
            grad_taus: None,
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
            .collect::<anyhow::Result<Vec<_>>>()?
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
    Ok(Resolved {
        model,
        seed,
        settings,
        rules,
        table,
    })
}

/// Available memory in bytes (Linux), to refuse a probe that cannot fit.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `tau-resnet probe`.
///
/// # Errors
/// A bad config or setting (naming the key), a model too large for memory, or I/O errors
/// writing the record.
pub fn run(args: ProbeArgs) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let r = resolve(&args)?;
    let seeds: Vec<u64> = (0..r.settings.n_seeds as u64).map(|k| r.seed + k).collect();
    let n_blocks = r.model.n_blocks();
    let needed = match &r.model {
        ModelConfig::Theory(c) => {
            let rows = (c.width as u64)
                * (r.settings.n_inputs.unwrap_or(64) as u64)
                * r.rules.len() as u64;
            // The weights in f32, drawn once and kept for the backward pass, two working
            // matrices of all (τ, input) rows, and per block the ReLU mask bits and
            // log-norms of the rows.
            4 * r.model.num_parameters() as u64
                + 2 * 4 * rows
                + (c.depth as u64) * (rows / 8 + rows / c.width.max(1) as u64 * 8)
        }
        _ => 8 * r.model.num_parameters() as u64,
    };
    if let Some(avail) = available_memory()
        && needed > avail
    {
        bail!(
            "this probe needs about {:.1} GiB of memory, {:.1} GiB are available: lower model.depth or model.width",
            needed as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    let (family, n_inputs, taus) = match &r.model {
        ModelConfig::Theory(c) => {
            let n = r.settings.n_inputs.unwrap_or(64);
            ("theory", n, probe_theory(c, &r.rules, &seeds, n)?)
        }
        other => {
            let n = r.settings.n_inputs.unwrap_or(8);
            let image = r.settings.image_size.unwrap_or(match other {
                ModelConfig::BottleneckResnet(_) => 64,
                _ => 32,
            });
            (
                other.family(),
                n,
                probe_resnet(other, &r.rules, &seeds, n, image)?,
            )
        }
    };
    let record = ProbeRecord {
        format: PROBE_FORMAT.into(),
        family: family.into(),
        n_blocks,
        seeds: seeds.clone(),
        n_inputs,
        blocks: sample_blocks(chain_len(&r.model)),
        taus,
        wall_s: start.elapsed().as_secs_f64(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg_text = toml::to_string(&r.table).context("serializing the resolved config")?;
        write_atomic(&dir.join(CONFIG_FILE), cfg_text.as_bytes())?;
        let json = serde_json::to_string(&record).context("serializing the probe record")?;
        write_atomic(&dir.join(PROBE_FILE), json.as_bytes())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print_table(&record, &r.model);
    }
    Ok(Outcome::Finished)
}

fn fmt_log10(x: f64) -> String {
    if !x.is_finite() {
        return "overflow".into();
    }
    if x.abs() < 3.0 {
        return format!("{:.3}", 10f64.powf(x));
    }
    let e = x.floor();
    format!("{:.2}e{e:.0}", 10f64.powf(x - e))
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

fn log10_mean(values: &[f64]) -> f64 {
    let xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() || !m.is_finite() {
        return f64::NAN;
    }
    m + (xs.iter().map(|x| 10f64.powf(x - m)).sum::<f64>() / xs.len() as f64).log10()
}

fn print_table(rec: &ProbeRecord, model: &ModelConfig) {
    let what = match model {
        ModelConfig::Theory(c) => format!(
            "theory network, width {}, input dim {}",
            c.width, c.input_dim
        ),
        ModelConfig::CifarResnet(c) => format!("CIFAR ResNet-{} ({:?})", c.depth, c.norm),
        ModelConfig::BottleneckResnet(c) => format!("bottleneck ResNet-{} ({:?})", c.depth, c.norm),
    };
    println!(
        "{what}: L = {} blocks, {} inputs x {} seeds ({}..={}), {:.2}s",
        rec.n_blocks,
        rec.n_inputs,
        rec.seeds.len(),
        rec.seeds.first().unwrap_or(&0),
        rec.seeds.last().unwrap_or(&0),
        rec.wall_s
    );
    println!(
        "\n{:<14} {:>10}  {:>12} {:>10} {:>22}  {:>12} {:>22}",
        "tau rule", "tau", "mean |h_L|", "median", "[10%, 90%]", "|dW_1|/|dW_L|", "[10%, 90%]"
    );
    println!("{:<14} {:>10}  {:>12}", "", "", "/ |h_0|");
    for t in &rec.taus {
        let g = &t.log10_grad_ratio;
        println!(
            "{:<14} {:>10.4e}  {:>12} {:>10} {:>22}  {:>12} {:>22}",
            t.rule,
            t.tau,
            fmt_log10(log10_mean(&t.log10_ratio)),
            fmt_log10(median(&t.log10_ratio)),
            format!(
                "[{}, {}]",
                fmt_log10(quantile(&t.log10_ratio, 0.1)),
                fmt_log10(quantile(&t.log10_ratio, 0.9))
            ),
            if g.is_empty() {
                "-".into()
            } else {
                fmt_log10(median(g))
            },
            if g.is_empty() {
                "-".into()
            } else {
                format!(
                    "[{}, {}]",
                    fmt_log10(quantile(g, 0.1)),
                    fmt_log10(quantile(g, 0.9))
                )
            },
        );
    }
    for t in &rec.taus {
        println!(
            "\nper block, tau = {} ({:.4e}): medians over inputs and seeds",
            t.rule, t.tau
        );
        println!(
            "{:>8}  {:>14}  {:>16}",
            "block l", "|h_l|/|h_0|", "|dW_l|/|dW_L|"
        );
        for (k, b) in rec.blocks.iter().enumerate() {
            println!(
                "{:>8}  {:>14}  {:>16}",
                b,
                fmt_log10(
                    t.block_log10_ratio_median
                        .get(k)
                        .copied()
                        .unwrap_or(f64::NAN)
                ),
                fmt_log10(
                    t.block_log10_grad_median
                        .get(k)
                        .copied()
                        .unwrap_or(f64::NAN)
                ),
            );
        }
        if rec.taus.len() > 4 {
            println!("\n(per-block tables of the other rules: --json)");
            break;
        }
    }
}

/// Per-sample ln‖x‖ of a batch (N, ...), in f64.
fn sample_log_norms(xs: &Tensor) -> candle::Result<Vec<f64>> {
    let n = xs.dim(0)?;
    let flat = xs.reshape((n, ()))?.to_dtype(DType::F64)?;
    let sq = flat.sqr()?.sum(1)?.to_vec1::<f64>()?;
    Ok(sq.into_iter().map(|s| 0.5 * s.ln()).collect())
}

/// The number of residual blocks one after another, which the per-block values are
/// reported over: L, except in a bottleneck ResNet, whose L is its longest stage.
fn chain_len(cfg: &ModelConfig) -> usize {
    cfg.stage_blocks().iter().sum()
}

/// The ResNets: per-sample ‖h_l‖/‖h_0‖ after each block (h_0: the stem's output), and
/// the gradient norm of each block's parameters for the cross-entropy of random labels,
/// relative to the last block's. BatchNorm uses batch statistics, as in training.
fn probe_resnet(
    cfg: &ModelConfig,
    rules: &[ProbeTauRule],
    seeds: &[u64],
    n: usize,
    image: usize,
) -> anyhow::Result<Vec<ProbeTau>> {
    let dev = Device::Cpu;
    let n_blocks = cfg.n_blocks();
    // The residual chain: L blocks in a CIFAR ResNet, more in a bottleneck ResNet (whose
    // L is its longest stage).
    let chain = chain_len(cfg);
    let blocks = sample_blocks(chain);
    let ln10 = std::f64::consts::LN_10;
    let mut out = Vec::new();
    for rule in rules {
        let mut c = cfg.clone();
        match &mut c {
            ModelConfig::CifarResnet(x) => x.tau = rule.rule,
            ModelConfig::BottleneckResnet(x) => x.tau = rule.rule,
            ModelConfig::Theory(_) => bail!("the theory network takes the fast path"),
        }
        let (in_ch, classes) = match &c {
            ModelConfig::CifarResnet(x) => (x.in_channels, x.num_classes),
            ModelConfig::BottleneckResnet(x) => (x.in_channels, x.num_classes),
            ModelConfig::Theory(_) => (1, 1),
        };
        let mut ratios = Vec::new();
        let mut grad_ratio = Vec::new();
        let mut block_ratio: Vec<Vec<f64>> = vec![Vec::new(); blocks.len()];
        let mut block_grad: Vec<Vec<f64>> = vec![Vec::new(); blocks.len()];
        for &seed in seeds {
            let varmap = tau_model::init_varmap(&c, seed, DType::F32, &dev)?;
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let model = Model::new(&c, vb.clone())?;
            let dim = in_ch * image * image;
            let data = tau_data::synthetic::sphere(
                n,
                dim,
                1,
                tau_data::synthetic::Targets::Gaussian,
                seed,
            );
            let xs = (Tensor::from_slice(&data.xs, (n, in_ch, image, image), &dev)?
                .to_dtype(DType::F32)?
                * (dim as f64).sqrt())?;
            // One forward pass of the model itself, the stem's output and the sampled
            // blocks' outputs measured on the way; its logits feed the backward pass.
            let mut log0 = Vec::new();
            let mut last = Vec::new();
            let mut logs_at: Vec<Vec<f64>> = Vec::new();
            let logits = model.forward_hooked(&xs, true, |l, h| {
                if l == 0 {
                    log0 = sample_log_norms(h)?;
                    last = log0.clone();
                } else if blocks.contains(&l) || l == chain {
                    last = sample_log_norms(h)?;
                    if blocks.contains(&l) {
                        logs_at.push(
                            last.iter()
                                .zip(&log0)
                                .map(|(a, b)| (a - b) / ln10)
                                .collect(),
                        );
                    }
                }
                Ok(())
            })?;
            ratios.extend(
                last.iter()
                    .zip(&log0)
                    .map(|(a, b)| (a - b) / ln10)
                    .filter(|v| v.is_finite()),
            );
            for (dst, src) in block_ratio.iter_mut().zip(&logs_at) {
                dst.extend(src.iter().copied().filter(|v| v.is_finite()));
            }
            // Backward: cross-entropy of random labels.
            let labels: Vec<u32> = (0..n)
                .map(|i| ((seed as usize + 7 * i) % classes) as u32)
                .collect();
            let labels = Tensor::from_vec(labels, n, &dev)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            let data = varmap
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
            let mut per_block = vec![0f64; chain];
            // In name order, so that the sums (and the record) repeat bit for bit.
            let mut named: Vec<_> = data.iter().collect();
            named.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (name, var) in named {
                let Some(b) = c.block_index(name) else {
                    continue;
                };
                if let Some(g) = grads.get(var.as_tensor()) {
                    let s = g
                        .to_dtype(DType::F64)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                    per_block[b] += s;
                }
            }
            let log_last = 0.5 * per_block[chain - 1].ln();
            let rel: Vec<f64> = per_block
                .iter()
                .map(|s| (0.5 * s.ln() - log_last) / ln10)
                .collect();
            if rel[0].is_finite() {
                grad_ratio.push(rel[0]);
            }
            for (k, &b) in blocks.iter().enumerate() {
                if rel[b - 1].is_finite() {
                    block_grad[k].push(rel[b - 1]);
                }
            }
        }
        out.push(ProbeTau {
            rule: rule.text.clone(),
            alpha: rule_alpha(&rule.rule),
            tau: rule.rule.resolve(n_blocks),
            log10_ratio: ratios,
            log10_grad_ratio: grad_ratio,
            block_log10_ratio_median: block_ratio.iter().map(|v| median(v)).collect(),
            block_log10_grad_median: block_grad.iter().map(|v| median(v)).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(sets: &[&str]) -> ProbeArgs {
        ProbeArgs {
            config: None,
            sets: sets.iter().map(|s| s.to_string()).collect(),
            family: None,
            depth: None,
            width: None,
            taus: Vec::new(),
            seed: None,
            seeds: None,
            inputs: None,
            json: false,
            out: None,
        }
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases: &[(&[&str], &str)] = &[
            (&["model.widht=3"], "widht"),
            (&["probe.taus=[\"1/sqrt(K)\"]"], "probe.taus"),
            (&["probe.n_seeds=0"], "probe.n_seeds"),
            (&["probe.colour=1"], "colour"),
            (&["sead=1"], "sead"),
            (&["model.family=\"mlp\""], "model"),
            (&["model.depth=0"], "depth"),
        ];
        for (sets, needle) in cases {
            let err = match resolve(&args(sets)) {
                Ok(_) => panic!("{sets:?} accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(needle), "{sets:?}: {err}");
        }
    }

    #[test]
    fn writes_a_record_the_sweep_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(&[
            "model.width=16",
            "model.depth=4",
            "probe.n_inputs=3",
            "probe.n_seeds=2",
        ]);
        a.taus = vec!["1".into(), "1/sqrt(L)".into()];
        a.out = Some(dir.path().to_path_buf());
        assert_eq!(run(a).unwrap(), Outcome::Finished);
        let rec: ProbeRecord =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("probe.json")).unwrap())
                .unwrap();
        assert_eq!(rec.n_blocks, 4);
        assert_eq!(rec.seeds, vec![0, 1]);
        assert_eq!(rec.taus.len(), 2);
        assert_eq!(rec.taus[1].log10_ratio.len(), 6);
        assert_eq!(rec.blocks, vec![1, 2, 4]);
        assert!(dir.path().join("config.toml").exists());
    }

    #[test]
    fn cifar_resnet_probe_runs_and_reports_every_block() {
        let mut a = args(&[
            "model.depth=8",
            "model.norm=\"none\"",
            "probe.n_inputs=2",
            "probe.n_seeds=1",
            "probe.image_size=8",
        ]);
        a.family = Some("cifar_resnet".into());
        a.taus = vec!["1".into(), "1/sqrt(L)".into()];
        let r = resolve(&a).unwrap();
        let out = probe_resnet(&r.model, &r.rules, &[0], 2, 8).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].log10_ratio.len(), 2);
        assert_eq!(
            out[0].block_log10_ratio_median.len(),
            sample_blocks(3).len()
        );
        assert_eq!(out[0].log10_grad_ratio.len(), 1);
        assert!(out[1].log10_ratio.iter().all(|v| v.is_finite()));
    }

    /// A bottleneck ResNet's per-block values run over its whole residual chain (16
    /// blocks in ResNet-50, whose L is 6), the gradients grouped by the block of each
    /// parameter, and the record's block list matches.
    #[test]
    fn bottleneck_probe_covers_the_residual_chain() {
        let mut a = args(&[
            "model.depth=50",
            "model.num_classes=10",
            "probe.n_inputs=2",
            "probe.n_seeds=1",
            "probe.image_size=32",
        ]);
        a.family = Some("bottleneck_resnet".into());
        let r = resolve(&a).unwrap();
        assert_eq!((r.model.n_blocks(), chain_len(&r.model)), (6, 16));
        let out = probe_resnet(&r.model, &r.rules, &[0], 2, 32).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tau, 1.0 / 6f64.sqrt());
        assert_eq!(out[0].log10_ratio.len(), 2);
        assert_eq!(sample_blocks(16), vec![1, 2, 4, 8, 16]);
        assert_eq!(out[0].block_log10_ratio_median.len(), 5);
        assert_eq!(out[0].block_log10_grad_median.len(), 5);
        // Relative to the last block: 1 there, and finite at every sampled block.
        assert_eq!(out[0].block_log10_grad_median[4], 0.0);
        assert!(out[0].block_log10_grad_median.iter().all(|v| v.is_finite()));
        assert_eq!(out[0].log10_grad_ratio.len(), 1);
    }
}
