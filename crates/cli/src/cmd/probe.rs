//! `tau-resnet probe`: forward/backward stability of a model at initialization
//! (PAPER.md, claims 1 and 2), for any model family, over several seeds; or of the
//! trained weights of a checkpoint (`--checkpoint`), where the seeds draw only the inputs.
//! The probe itself is `tau_train::probe`; this is its command line and its table.

use crate::cmd::outln;
use std::path::PathBuf;

use anyhow::Context;
use tau_train::probe::{ProbePlan, resolve_config, run_probe, write_probe};

use super::Outcome;

mod table;

use table::print_table;

/// Arguments of `tau-resnet probe`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tau-resnet probe --depth 256 --tau 1 --tau 'L^-0.25' --tau '1/sqrt(L)' --tau 1/L\n  tau-resnet probe --config configs/theory-gd.toml --set model.depth=1024 --json\n  tau-resnet probe --family cifar_resnet --depth 110 --set model.norm=none --tau 1 --tau '1/sqrt(L)'\n  tau-resnet probe --checkpoint runs/schemes-mnist/depth-20_scaling-rezero_seed-0 --seeds 1\n\nThe config may be a run config (its [model] table and seed are used) or a probe config:\n  seed = 0\n  [model]  family = \"theory\", width = 256, depth = 64, ...\n  [probe]  n_inputs = 64, n_seeds = 3, taus = [\"1\", \"1/sqrt(L)\"], image_size = 32\n           grad_taus = [\"1/sqrt(L)\"]  (theory network: backward probe for these only; default all)"
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
    /// Read and check the config (with the flags and --set overrides), print it resolved,
    /// and exit without probing.
    #[arg(long)]
    pub dry_run: bool,
    /// Probe the trained weights of this checkpoint directory, or of a run directory's last
    /// checkpoint (`probe.checkpoint`), instead of freshly drawn ones: the model is the
    /// checkpoint's (no model settings, no --tau), the seeds draw only the inputs (and the
    /// labels of the backward pass), the image size defaults to the checkpoint's input size.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
}

/// The command line's options as `--set` overrides, before the user's own `--set`s.
fn cli_sets(args: &ProbeArgs) -> Vec<String> {
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
    if let Some(c) = &args.checkpoint {
        let path = toml::Value::String(c.display().to_string());
        sets.push(format!("probe.checkpoint={path}"));
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
    sets
}

/// The config the command line names (empty without `--config`) and its flags as `--set`
/// overrides, resolved.
fn resolve(args: &ProbeArgs) -> anyhow::Result<ProbePlan> {
    let table = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("parsing config {}", path.display()))?
        }
        None => toml::Table::new(),
    };
    Ok(resolve_config(table, &cli_sets(args))?)
}

/// Runs `tau-resnet probe`.
///
/// # Errors
/// A bad config or setting (naming the key), a model too large for memory, or I/O errors
/// writing the record.
pub fn run(args: ProbeArgs) -> anyhow::Result<Outcome> {
    let plan = resolve(&args)?;
    if args.dry_run {
        let table = toml::to_string(&plan.table).context("serializing the resolved config")?;
        outln!(
            "# tau-resnet probe --dry-run: config OK\n{}",
            table.trim_end()
        )?;
        return Ok(Outcome::Finished);
    }
    let run = run_probe(&plan)?;
    if let Some(dir) = &args.out {
        write_probe(dir, &plan, &run.record)?;
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&run.record)?)?;
    } else {
        print_table(&run.record, &plan.model, run.trained.as_ref())?;
    }
    Ok(Outcome::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use table::scheme_note;
    use tau_train::probe::{ProbeRecord, chain_len, probe_resnet, sample_blocks};

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
            dry_run: false,
            checkpoint: None,
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
        let out = probe_resnet(&r.model, &r.rules, &[0], 2, 8, None).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].log10_ratio.len(), 2);
        assert_eq!(
            out[0].block_log10_ratio_median.len(),
            sample_blocks(3).len()
        );
        assert_eq!(out[0].log10_grad_ratio.len(), 1);
        assert!(out[1].log10_ratio.iter().all(|v| v.is_finite()));
    }

    /// The other scaling schemes: one row named after the scheme with τ = 1; ReZero's and
    /// Fixup's blocks pass their input through at initialization, so h_1 = h_0 (stage 1,
    /// identity shortcut), and the table says so; τ rules are refused with the scheme.
    #[test]
    fn scaling_schemes_are_probed_and_their_identity_start_is_said() {
        for scheme in ["fixup", "skipinit", "rezero"] {
            let set = format!("model.scaling=\"{scheme}\"");
            let mut a = args(&[
                "model.depth=8",
                "model.norm=\"none\"",
                &set,
                "probe.n_inputs=2",
                "probe.n_seeds=1",
                "probe.image_size=8",
            ]);
            a.family = Some("cifar_resnet".into());
            let r = resolve(&a).unwrap();
            let out = probe_resnet(&r.model, &r.rules, &[0], 2, 8, None).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!((out[0].rule.as_str(), out[0].tau), (scheme, 1.0));
            // Block 1 (stage 1, stride 1): |h_1| / |h_0| = 1 exactly.
            assert_eq!(sample_blocks(3)[0], 1);
            assert_eq!(out[0].block_log10_ratio_median[0], 0.0, "{scheme}");
            assert!(
                out[0].log10_grad_ratio.iter().all(|v| v.is_finite()),
                "{scheme}"
            );
            let note = scheme_note(&r.model, false).unwrap();
            assert!(
                note.contains(scheme) && note.contains("passes its input through"),
                "{note}"
            );
            a.taus = vec!["1".into()];
            let err = format!("{:#}", resolve(&a).err().unwrap());
            assert!(err.contains("not by τ"), "{err}");
        }
        let tau = resolve(&args(&["model.depth=8"])).unwrap();
        assert_eq!(scheme_note(&tau.model, false), None);
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
        let out = probe_resnet(&r.model, &r.rules, &[0], 2, 32, None).unwrap();
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
