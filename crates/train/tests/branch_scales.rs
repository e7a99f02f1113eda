//! The per-block scalars of the residual-scaling schemes in `metrics.jsonl`: every record
//! of a SkipInit, ReZero or Fixup run carries each block's α or multiplier by name, equal
//! to the parameter itself; τ runs write none; a resumed run records the same values.

use std::path::Path;

use candle::Device;
use tau_train::config::RunConfig;
use tau_train::records::{MetricsRecord, RunStatus, read_metrics};
use tau_train::setup::{Prepared, resume, start};
use tau_train::trainer::RunOptions;

mod support;

use support::{config as config_from, twelve_images};

const RUN: &str = r#"
name = "scales"
seed = 3
steps = 6
device = "cpu"
[model]
family = "cifar_resnet"
depth = 8
norm = "none"
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
weight_decay = 1e-4
[log]
every = 1
eval_every = 0
checkpoint_every = 4
"#;

fn config(sets: &[&str]) -> RunConfig {
    config_from(RUN, sets)
}

fn prepared(cfg: &RunConfig) -> Prepared {
    Prepared::from_parts(cfg, &Device::Cpu, twelve_images()).unwrap()
}

fn records(dir: &Path) -> Vec<MetricsRecord> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

/// The value of each one-element parameter named `*.{leaf}` in the run's last checkpoint.
fn checkpoint_scalars(dir: &Path, leaf: &str) -> Vec<(String, f32)> {
    let (_, vm) = tau_model::checkpoint::load(&dir.join("checkpoints/last"), &Device::Cpu).unwrap();
    let mut out: Vec<(String, f32)> = tau_model::named_vars(&vm)
        .into_iter()
        .filter(|(n, _)| n.ends_with(&format!(".{leaf}")))
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()[0],
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// ReZero and SkipInit record each block's α, Fixup each block's multiplier: one entry per
/// block (3 at depth 8), named as the parameter, in every record; the last record's values
/// are the final checkpoint's bit for bit, and training has moved every one from its
/// initial value (α = 0, Fixup's multiplier 1).
#[test]
fn every_record_holds_each_block_s_scalar() {
    for (scheme, leaf, init) in [
        ("rezero", "alpha", 0.0f32),
        ("skipinit", "alpha", 0.0),
        ("fixup", "scale", 1.0),
    ] {
        let cfg = config(&[&format!("model.scaling={scheme}")]);
        let tmp = tempfile::tempdir().unwrap();
        let s = start(prepared(&cfg), tmp.path(), &RunOptions::default()).unwrap();
        assert_eq!(s.status, RunStatus::Finished, "{scheme}");
        let recs = records(tmp.path());
        assert_eq!(recs.len(), 6, "{scheme}");
        let names: Vec<String> = (1..=3).map(|s| format!("layer{s}.0.{leaf}")).collect();
        for r in &recs {
            let scales = r.branch_scales.as_ref().expect("branch_scales");
            assert_eq!(
                scales.keys().cloned().collect::<Vec<_>>(),
                names,
                "{scheme} step {}",
                r.step
            );
            assert!(scales.values().all(|v| v.is_finite()), "{scheme}");
        }
        let last = recs.last().unwrap().branch_scales.clone().unwrap();
        assert!(
            last.values().all(|v| *v != init),
            "{scheme}: {last:?} still at {init}"
        );
        let want = checkpoint_scalars(tmp.path(), leaf);
        assert_eq!(last.into_iter().collect::<Vec<_>>(), want, "{scheme}");
        assert_eq!(
            s.final_metrics.unwrap().branch_scales,
            recs[5].branch_scales
        );
    }
}

/// A τ model (fixed or learnable) has no per-block scalar: its records have no
/// `branch_scales` key at all (a learnable τ is in `tau`).
#[test]
fn tau_runs_write_no_branch_scales() {
    for sets in [&[][..], &["model.learnable_tau=true"][..]] {
        let cfg = config(sets);
        let tmp = tempfile::tempdir().unwrap();
        start(prepared(&cfg), tmp.path(), &RunOptions::default()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 6, "{sets:?}");
        assert!(!text.contains("branch_scales"), "{sets:?}: {text}");
        let learnable = records(tmp.path()).iter().all(|r| r.tau.is_some());
        assert_eq!(learnable, !sets.is_empty(), "{sets:?}");
    }
}

/// A ReZero run stopped after 3 steps (between checkpoints) and resumed writes the same
/// records, α included, as the run straight through, apart from the wall-clock fields.
#[test]
fn rezero_resume_records_the_same_alphas() {
    let cfg = config(&["model.scaling=rezero"]);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    start(prepared(&cfg), &a, &RunOptions::default()).unwrap();
    let stop = RunOptions {
        stop_after_steps: Some(3),
        ..RunOptions::default()
    };
    let s = start(prepared(&cfg), &b, &stop).unwrap();
    assert_eq!((s.status, s.steps), (RunStatus::Interrupted, 3));
    let s = resume(prepared(&cfg), &b, &RunOptions::default()).unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    let strip = |d: &Path| {
        records(d)
            .iter()
            .map(MetricsRecord::without_timing)
            .collect::<Vec<_>>()
    };
    let (ra, rb) = (strip(&a), strip(&b));
    assert_eq!(ra.len(), 6);
    assert!(ra.iter().all(|r| r.branch_scales.is_some()));
    assert_eq!(ra, rb);
}
