//! What the training tests share: a tiny theory-network run config, twelve tiny images,
//! and helpers to build configs and read records. Included by the library's tests
//! (`crates/train/tests/*.rs`) and, by path, the binary's (`crates/cli/tests/train.rs`).

#![allow(dead_code)]

use std::path::Path;

use candle::{Device, Tensor};
use tau_train::config::{RunConfig, apply_overrides, config_from_table};
use tau_train::loss::Targets;
use tau_train::records::{MetricsRecord, read_metrics};
use tau_train::setup::RunData;
use tau_train::trainer::{RunOptions, TensorData};

/// A 4-block theory network on 16 synthetic points: SGD with momentum, cosine warmup,
/// a record every step, evaluation every 3 and a checkpoint every 2.
pub const THEORY: &str = r#"
name = "t"
seed = 7
steps = 12
device = "cpu"
[model]
family = "theory"
input_dim = 8
width = 32
depth = 4
output_dim = 1
tau = "1/sqrt(L)"
[data]
source = "synthetic"
n = 16
p = 8
d = 1
n_test = 8
batch_size = 4
[loss]
kind = "squared"
[optim]
kind = "sgd"
lr = 0.05
momentum = 0.9
nesterov = true
weight_decay = 1e-3
schedule = "cosine"
warmup = 2
[log]
every = 1
eval_every = 3
checkpoint_every = 2
"#;

/// `base` with the `--set`-style overrides `sets` applied.
pub fn config(base: &str, sets: &[&str]) -> RunConfig {
    let mut t: toml::Table = base.parse().unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    apply_overrides(&mut t, &sets).unwrap();
    config_from_table(t).unwrap()
}

/// The run's metrics records with their timing fields cleared (comparable across runs).
pub fn records_without_timing(dir: &Path) -> Vec<MetricsRecord> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(MetricsRecord::without_timing)
        .collect()
}

/// Run options that stop the run after `k` steps, as an interrupt would.
pub fn stop_after(k: u64) -> RunOptions {
    RunOptions {
        stop_after_steps: Some(k),
        ..RunOptions::default()
    }
}

/// Twelve 8×8 single-channel images in three classes (for the CIFAR ResNets' schemes).
pub fn twelve_images() -> RunData {
    let vals: Vec<f32> = (0..12 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let xs = Tensor::from_vec(vals, (12, 1, 8, 8), &Device::Cpu).unwrap();
    let ys = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
    RunData {
        train: Box::new(TensorData::new(xs, Targets::Classes(ys, 3)).unwrap()),
        test: None,
        input_shape: vec![1, 8, 8],
        outputs: 3,
    }
}
