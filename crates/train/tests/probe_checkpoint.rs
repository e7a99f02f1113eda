//! `tau-resnet probe --checkpoint`: the probe on trained weights. ReZero is the identity
//! at initialization (block 1's |h_1|/|h_0| is exactly 1) and no longer after a few
//! training steps; a checkpoint of the initial weights probes exactly as the
//! initialization does; model settings and τ rules beside a checkpoint are refused.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use tau_train::config::{apply_overrides, config_from_table};
use tau_train::loss::Targets;
use tau_train::probe::{ProbeRecord, resolve_config, run_probe, write_probe};
use tau_train::records::RunStatus;
use tau_train::setup::{Prepared, RunData, start};
use tau_train::trainer::{RunOptions, TensorData};

const RUN: &str = r#"
name = "rezero-probe"
seed = 3
steps = 5
device = "cpu"
[model]
family = "cifar_resnet"
depth = 8
norm = "none"
scaling = "rezero"
in_channels = 1
num_classes = 3
[data]
source = "synthetic"
n = 12
p = 64
d = 3
batch_size = 4
[loss]
kind = "squared"
[optim]
kind = "sgd"
lr = 0.05
momentum = 0.9
[log]
every = 1
eval_every = 0
checkpoint_every = 0
"#;

/// The same model as the run's, for a probe at initialization.
const MODEL_SETS: [&str; 5] = [
    "model.depth=8",
    "model.norm=\"none\"",
    "model.scaling=\"rezero\"",
    "model.in_channels=1",
    "model.num_classes=3",
];

/// A probe as `tau-resnet probe --seed 0 --seeds 1 [--checkpoint DIR] --set ... --out
/// OUT` runs it: the flags as the `--set` overrides they stand for.
struct ProbeArgs {
    sets: Vec<String>,
    out: PathBuf,
}

impl ProbeArgs {
    fn set(&mut self, set: &str) {
        self.sets.push(set.to_string());
    }
}

fn args(sets: &[&str], checkpoint: Option<&Path>, out: &Path) -> ProbeArgs {
    let mut all = vec!["seed=0".to_string(), "probe.n_seeds=1".to_string()];
    if let Some(c) = checkpoint {
        let path = toml::Value::String(c.display().to_string());
        all.push(format!("probe.checkpoint={path}"));
    }
    all.extend(sets.iter().map(|s| s.to_string()));
    all.extend([
        "probe.image_size=8".to_string(),
        "probe.n_inputs=4".to_string(),
    ]);
    ProbeArgs {
        sets: all,
        out: out.to_path_buf(),
    }
}

/// Resolves, runs and writes the probe (`probe.json` into `a.out`).
fn run(a: ProbeArgs) -> anyhow::Result<ProbeRecord> {
    let plan = resolve_config(toml::Table::new(), &a.sets)?;
    let done = run_probe(&plan)?;
    write_probe(&a.out, &plan, &done.record)?;
    Ok(done.record)
}

fn probe(a: ProbeArgs) -> ProbeRecord {
    let out = a.out.clone();
    run(a).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("probe.json")).unwrap()).unwrap()
}

/// Trains the run for 5 steps into `dir`.
fn train(dir: &Path) {
    let mut t: toml::Table = RUN.parse().unwrap();
    apply_overrides(&mut t, &[]).unwrap();
    let cfg = config_from_table(t).unwrap();
    let vals: Vec<f32> = (0..12 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let xs = Tensor::from_vec(vals, (12, 1, 8, 8), &Device::Cpu).unwrap();
    let ys = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
    let data = RunData {
        train: Box::new(TensorData::new(xs, Targets::Classes(ys, 3)).unwrap()),
        test: None,
        input_shape: vec![1, 8, 8],
        outputs: 3,
    };
    let prepared = Prepared::from_parts(&cfg, &Device::Cpu, data).unwrap();
    let s = start(prepared, dir, &RunOptions::default()).unwrap();
    assert_eq!((s.status, s.steps), (RunStatus::Finished, 5));
}

/// At initialization ReZero's α = 0 makes block 1 (stage 1, identity shortcut) pass its
/// input through: |h_1|/|h_0| = 1 exactly (log10 0). (|h_L|/|h_0| is not 1: the option-A
/// shortcuts of stages 2 and 3 subsample.) After 5 SGD steps α ≠ 0, and the probe of the
/// run's checkpoint measures another, finite ratio at block 1, with finite gradient ratios.
#[test]
fn rezero_is_the_identity_at_init_and_not_after_five_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let init = probe(args(
        &[&["model.family=\"cifar_resnet\""][..], &MODEL_SETS[..]].concat(),
        None,
        &tmp.path().join("init"),
    ));
    assert_eq!(init.blocks, vec![1, 2, 3]);
    assert_eq!(init.taus.len(), 1);
    assert_eq!(init.taus[0].rule, "rezero");
    assert_eq!(init.taus[0].block_log10_ratio_median[0], 0.0);

    let run_dir = tmp.path().join("run");
    train(&run_dir);
    let trained = probe(args(&[], Some(&run_dir), &tmp.path().join("trained")));
    let t = &trained.taus[0];
    assert_eq!(t.rule, "rezero");
    let block1 = t.block_log10_ratio_median[0];
    assert!(
        block1.is_finite() && block1 != 0.0,
        "block 1: log10 ratio {block1}"
    );
    assert_eq!(t.log10_ratio.len(), 4);
    assert!(
        t.log10_ratio.iter().all(|v| v.is_finite()),
        "{:?}",
        t.log10_ratio
    );
    assert!(!t.log10_grad_ratio.is_empty());
    assert!(t.log10_grad_ratio.iter().all(|v| v.is_finite()));
    // The resolved config names the checkpoint and holds its model.
    let cfg = std::fs::read_to_string(tmp.path().join("trained/config.toml")).unwrap();
    assert!(
        cfg.contains("checkpoint = ") && cfg.contains("scaling = \"rezero\""),
        "{cfg}"
    );
}

/// A checkpoint of seed 0's initial weights, probed with seed 0's inputs, gives the
/// initialization probe's numbers bit for bit: the probe uses the checkpoint's weights.
#[test]
fn a_checkpoint_of_the_initial_weights_probes_as_the_initialization() {
    let tmp = tempfile::tempdir().unwrap();
    let model: tau_model::ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "tau": "1/sqrt(L)", "in_channels": 1, "num_classes": 3}"#,
    )
    .unwrap();
    let varmap = tau_model::init_varmap(&model, 0, DType::F32, &Device::Cpu).unwrap();
    let ckpt = tmp.path().join("ckpt");
    tau_model::checkpoint::save(&ckpt, &model, &varmap).unwrap();
    let sets = [
        "model.family=\"cifar_resnet\"",
        "model.tau=\"1/sqrt(L)\"",
        "model.depth=8",
        "model.norm=\"none\"",
        "model.in_channels=1",
        "model.num_classes=3",
    ];
    let init = probe(args(&sets, None, &tmp.path().join("a")));
    let from_ckpt = probe(args(&[], Some(&ckpt), &tmp.path().join("b")));
    assert_eq!(init.taus, from_ckpt.taus);
    assert!(init.taus[0].block_log10_ratio_median[0] != 0.0);
}

/// Model settings or τ rules beside a checkpoint, and a path that is no checkpoint, are
/// errors that say so.
#[test]
fn checkpoint_probes_refuse_model_settings_and_bad_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let model: tau_model::ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "in_channels": 1, "num_classes": 3}"#,
    )
    .unwrap();
    let varmap = tau_model::init_varmap(&model, 0, DType::F32, &Device::Cpu).unwrap();
    let ckpt = tmp.path().join("ckpt");
    tau_model::checkpoint::save(&ckpt, &model, &varmap).unwrap();
    let out = tmp.path().join("out");
    let err = |a: ProbeArgs| format!("{:#}", run(a).unwrap_err());

    let mut a = args(&[], Some(&ckpt), &out);
    a.set("model.depth=20");
    assert!(err(a).contains("probes the checkpoint's own model"));
    let a = args(&["model.norm=\"none\""], Some(&ckpt), &out);
    assert!(err(a).contains("probes the checkpoint's own model"));
    let mut a = args(&[], Some(&ckpt), &out);
    a.set("probe.taus=[\"1\"]");
    assert!(err(a).contains("probed with its own τ"));
    let missing = tmp.path().join("missing");
    let e = err(args(&[], Some(&missing), &out));
    assert!(
        e.contains("missing") && e.contains("not a directory"),
        "{e}"
    );
    let e = err(args(&[], Some(tmp.path()), &out));
    assert!(e.contains("holds neither a checkpoint"), "{e}");
    assert!(!out.exists());
}
