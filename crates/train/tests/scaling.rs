//! The residual-scaling schemes in training runs: `--set model.scaling=…` reads, bad
//! combinations are named errors, each scheme's scalars land in their paper's
//! learning-rate group, and a few steps of each scheme train (the loss falls, α leaves 0).

use candle::{DType, Device};
use tau_train::config::{RunConfig, apply_overrides, config_from_table};
use tau_train::records::RunStatus;
use tau_train::setup::{Prepared, TauModel, start};
use tau_train::trainer::RunOptions;

mod support;

use support::twelve_images;

const RUN: &str = r#"
name = "schemes"
seed = 3
steps = 30
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
batch_size = 12
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
checkpoint_every = 0
"#;

fn config(sets: &[&str]) -> anyhow::Result<RunConfig> {
    let mut t: toml::Table = RUN.parse()?;
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    apply_overrides(&mut t, &sets)?;
    Ok(config_from_table(t)?)
}

#[test]
fn scaling_is_set_from_the_command_line_and_bad_combinations_are_named() {
    for scheme in ["tau", "fixup", "skipinit", "rezero"] {
        let cfg = config(&[&format!("model.scaling={scheme}")]).unwrap();
        assert_eq!(cfg.model.scaling().name(), scheme);
    }
    let err = format!(
        "{:#}",
        config(&["model.scaling=fixup", "model.norm=batch_norm"]).unwrap_err()
    );
    assert!(
        err.contains("scaling = \"fixup\" trains without normalization"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        config(&["model.scaling=rezero", "model.learnable_tau=true"]).unwrap_err()
    );
    assert!(
        err.contains("learnable_tau applies to scaling = \"tau\" only"),
        "{err}"
    );
    let err = format!("{:#}", config(&["model.scaling=fix_up"]).unwrap_err());
    assert!(err.contains("fix_up"), "{err}");
}

/// Fixup: its scalar biases and multipliers at lr × small_lr_factor with weight decay (the
/// Fixup authors' groups); SkipInit and ReZero: α at the main lr, without weight decay.
#[test]
fn each_scheme_s_scalars_get_their_paper_s_learning_rate() {
    let cfg = config(&["optim.small_lr_factor=0.1"]).unwrap();
    let groups = |scheme: &str, norm: &str| {
        let model: tau_model::ModelConfig = serde_json::from_str(&format!(
            r#"{{"family": "cifar_resnet", "depth": 8, "norm": "{norm}", "scaling": "{scheme}", "in_channels": 1, "num_classes": 3}}"#
        ))
        .unwrap();
        let m = TauModel::init(&model, 0, DType::F32, &Device::Cpu).unwrap();
        m.params(&cfg)
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.spec))
            .collect::<Vec<_>>()
    };
    let find = |g: &[(String, tau_train::optim::ParamSpec)], name: &str| {
        g.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1
    };
    let fixup = groups("fixup", "none");
    for name in [
        "layer1.0.scale",
        "layer2.0.bias1a",
        "layer3.0.bias2b",
        "bias1",
        "bias2",
    ] {
        let s = find(&fixup, name);
        assert_eq!(
            (s.lr_mult, s.grad_scale, s.weight_decay),
            (0.1, 1.0, true),
            "{name}"
        );
    }
    for name in ["fc.weight", "fc.bias", "layer1.0.conv2.weight"] {
        assert_eq!(find(&fixup, name).lr_mult, 1.0, "{name}");
    }
    assert!(!fixup.iter().any(|(n, _)| n == "tau"));
    for (scheme, norm) in [
        ("skipinit", "batch_norm"),
        ("skipinit", "none"),
        ("rezero", "none"),
    ] {
        let g = groups(scheme, norm);
        let alphas: Vec<_> = g.iter().filter(|(n, _)| n.ends_with(".alpha")).collect();
        assert_eq!(alphas.len(), 3, "{scheme}");
        for (name, s) in alphas {
            assert_eq!(
                (s.lr_mult, s.grad_scale, s.weight_decay),
                (1.0, 1.0, false),
                "{name}"
            );
        }
    }
}

/// 30 full-batch SGD steps of each scheme: the run finishes, the training loss falls
/// below its first value, and the schemes that start as the identity (α = 0) have moved α.
#[test]
fn every_scheme_trains() {
    for (scheme, norm) in [
        ("tau", "none"),
        ("fixup", "none"),
        ("skipinit", "batch_norm"),
        ("skipinit", "none"),
        ("rezero", "none"),
    ] {
        let cfg = config(&[
            &format!("model.scaling={scheme}"),
            &format!("model.norm={norm}"),
        ])
        .unwrap();
        let prepared = Prepared::from_parts(&cfg, &Device::Cpu, twelve_images()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let s = start(prepared, tmp.path(), &RunOptions::default()).unwrap();
        assert_eq!(s.status, RunStatus::Finished, "{scheme}/{norm}");
        let records = tau_train::records::read_metrics(&tmp.path().join("metrics.jsonl")).unwrap();
        let first = records[0].train_loss.unwrap();
        let last = records.last().unwrap().train_loss.unwrap();
        assert!(last < 0.9 * first, "{scheme}/{norm}: loss {first} → {last}");
        if scheme == "skipinit" || scheme == "rezero" {
            let (cfg_m, vm) =
                tau_model::checkpoint::load(&tmp.path().join("checkpoints/last"), &Device::Cpu)
                    .unwrap();
            assert_eq!(cfg_m.scaling().name(), scheme);
            let alpha = tau_model::named_vars(&vm)
                .into_iter()
                .find(|(n, _)| n == "layer3.0.alpha")
                .unwrap()
                .1;
            let a = alpha.as_tensor().to_vec1::<f32>().unwrap()[0];
            assert!(a != 0.0, "{scheme}/{norm}: α still 0");
        }
    }
}
