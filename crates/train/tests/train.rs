//! End-to-end tests of training runs through the library: full-batch GD convergence on
//! the theory network, exact resume, divergence as a result, parameter groups, the
//! shipped run configs. Tiny widths, depths and data so the suite stays fast. The CLI's
//! side (exit codes, signals, bad input) is tested with the `tau-resnet` binary.

use std::path::Path;

use candle::{DType, Device, Tensor};
use tau_train::config::RunConfig;
use tau_train::loss::Targets;
use tau_train::records::RunStatus;
use tau_train::setup::{Prepared, RunData, TauModel, prepare, resume, start};
use tau_train::trainer::{RunOptions, TensorData};

mod support;

use support::*;

/// Runs `cfg` once straight through and once stopped after `k` steps and resumed, and
/// checks the records are bitwise equal apart from wall-clock fields.
fn check_resume_is_exact(cfg: &RunConfig, k: u64, make: impl Fn(&RunConfig) -> Prepared) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let s = start(make(cfg), &a, &RunOptions::default()).unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    let s = start(make(cfg), &b, &stop_after(k)).unwrap();
    assert_eq!(s.status, RunStatus::Interrupted);
    assert_eq!(s.steps, k);
    let s = resume(make(cfg), &b, &RunOptions::default()).unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    let (ra, rb) = (records_without_timing(&a), records_without_timing(&b));
    assert!(ra.len() > k as usize, "{} records", ra.len());
    assert_eq!(ra, rb);
    // The line bytes too (apart from timing), and the final weights.
    let wa = std::fs::read(a.join("checkpoints/last/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/last/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ after resume");
}

#[test]
fn sgd_resume_after_interrupt_is_bitwise_equal() {
    let cfg = config(THEORY, &[]);
    // Stop between checkpoints (5 is odd, checkpoints every 2): the interrupt writes its
    // own checkpoint, including the momentum buffers and the running metrics.
    check_resume_is_exact(&cfg, 5, |c| prepare(c, &Device::Cpu).unwrap());
}

/// The observer hears the start and every step, with the loop's loss and learning rate,
/// and a resumed session starts where the first one stopped.
#[test]
fn observer_hears_every_step() {
    use std::sync::{Arc, Mutex};
    use tau_train::trainer::{Progress, RunObserver};

    #[derive(Default)]
    struct Log(Mutex<Vec<(&'static str, Progress)>>);
    impl RunObserver for Log {
        fn started(&self, _: &tracing::Span, p: &Progress) {
            self.0.lock().unwrap().push(("start", *p));
        }
        fn stepped(&self, _: &tracing::Span, p: &Progress) {
            self.0.lock().unwrap().push(("step", *p));
        }
    }
    let cfg = config(THEORY, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::default());
    let opts = RunOptions {
        stop_after_steps: Some(5),
        observer: Some(log.clone()),
        ..RunOptions::default()
    };
    start(prepare(&cfg, &Device::Cpu).unwrap(), tmp.path(), &opts).unwrap();
    let opts = RunOptions {
        observer: Some(log.clone()),
        ..RunOptions::default()
    };
    resume(prepare(&cfg, &Device::Cpu).unwrap(), tmp.path(), &opts).unwrap();
    let events = log.0.lock().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.0).collect();
    let mut want = vec!["start"];
    want.extend(["step"; 5]);
    want.push("start");
    want.extend(["step"; 7]);
    assert_eq!(kinds, want);
    let steps: Vec<u64> = events.iter().map(|e| e.1.step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert!(
        events
            .iter()
            .all(|e| e.1.total == 12 && e.1.steps_per_epoch == 4)
    );
    // Each step's loss is the record's training loss (a record every step here).
    let records = records_without_timing(tmp.path());
    for (e, r) in events.iter().filter(|e| e.0 == "step").zip(&records) {
        assert_eq!(Some(e.1.loss), r.train_loss, "step {}", e.1.step);
        assert_eq!(e.1.lr, r.lr, "step {}", e.1.step);
    }
    assert!(events[0].1.loss.is_nan() && events[6].1.loss.is_nan());
}

/// A tiny BN ResNet on random 8×8 single-channel images: BatchNorm running statistics,
/// momentum and the data order must all resume exactly.
#[test]
fn batchnorm_resnet_resume_is_bitwise_equal() {
    let cfg = config(
        THEORY,
        &[
            "model={ family = \"cifar_resnet\", depth = 8, in_channels = 1, num_classes = 3 }",
            "steps=6",
            "log.checkpoint_every=4",
        ],
    );
    let make = |c: &RunConfig| {
        let vals: Vec<f32> = (0..12 * 64)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let xs = Tensor::from_vec(vals, (12, 1, 8, 8), &Device::Cpu).unwrap();
        let ys = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
        let data = RunData {
            train: Box::new(TensorData::new(xs.clone(), Targets::Classes(ys.clone(), 3)).unwrap()),
            test: Some(Box::new(
                TensorData::new(xs, Targets::Classes(ys, 3)).unwrap(),
            )),
            input_shape: vec![1, 8, 8],
            outputs: 3,
        };
        Prepared::from_parts(c, &Device::Cpu, data).unwrap()
    };
    check_resume_is_exact(&cfg, 3, make);
}

#[test]
fn full_batch_gd_drives_the_loss_below_target() {
    // Theory network, width 64, depth 4, τ = 1/√L, 8 points: the loss falls below 1e-3.
    let cfg = config(
        THEORY,
        &[
            "model.width=64",
            "data.n=8",
            "data.n_test=0",
            "data.batch_size=3",
            "optim={ kind = \"gd\", lr = 0.05 }",
            "steps=3000",
            "target_loss=1e-3",
            "log.every=100",
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let s = start(
        prepare(&cfg, &Device::Cpu).unwrap(),
        tmp.path(),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    let reached = s.reached_target_at_step.expect("target loss not reached");
    assert!(reached < 3000);
    let last = s.final_metrics.unwrap();
    assert!(last.train_loss.unwrap() < 1e-3);
    // h_L/h_0 stays near 1 at τ = 1/√L.
    let r = last.h_ratio.unwrap();
    assert!(r > 0.5 && r < 2.0, "{r}");
}

/// The full gradient summed over chunks equals the gradient of one big batch: the same
/// first GD step (up to float32 summation order).
#[test]
fn gd_gradient_is_the_same_in_chunks() {
    let base = [
        "data.n_test=0",
        "optim={ kind = \"gd\", lr = 0.05 }",
        "steps=3",
        "dtype=\"f64\"",
    ];
    let run = |bs: &str| {
        let mut sets = base.to_vec();
        sets.push(bs);
        let cfg = config(THEORY, &sets);
        let tmp = tempfile::tempdir().unwrap();
        start(
            prepare(&cfg, &Device::Cpu).unwrap(),
            tmp.path(),
            &RunOptions::default(),
        )
        .unwrap();
        records_without_timing(tmp.path())
    };
    let (one, chunked) = (run("data.batch_size=16"), run("data.batch_size=5"));
    assert_eq!(one.len(), chunked.len());
    for (a, b) in one.iter().zip(&chunked) {
        let (la, lb) = (a.train_loss.unwrap(), b.train_loss.unwrap());
        assert!((la - lb).abs() <= 1e-12 * la.abs(), "{la} vs {lb}");
        let (ga, gb) = (a.grad_norm.unwrap(), b.grad_norm.unwrap());
        assert!((ga - gb).abs() <= 1e-12 * ga.abs(), "{ga} vs {gb}");
    }
}

#[test]
fn parameter_groups_follow_the_model_kinds() {
    // Theory: only the W_l are trained.
    let cfg = config(THEORY, &[]);
    let p = prepare(&cfg, &Device::Cpu).unwrap();
    let names: Vec<&str> = p
        .optimizer
        .params()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "blocks.0.weight",
            "blocks.1.weight",
            "blocks.2.weight",
            "blocks.3.weight"
        ]
    );
    // No-BN ResNet: τ at lr/10 with its gradient over L = 3 blocks, scalar biases at lr/10.
    let model: tau_model::ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true, "in_channels": 1, "num_classes": 3}"#,
    )
    .unwrap();
    let m = TauModel::init(&model, 0, DType::F32, &Device::Cpu).unwrap();
    let params = m.params(&cfg).unwrap();
    let tau = params.iter().find(|p| p.name == "tau").unwrap();
    assert_eq!(tau.spec.lr_mult, 0.1);
    assert!((tau.spec.grad_scale - 1.0 / 3.0).abs() < 1e-15);
    assert!(!tau.spec.weight_decay);
    let bias = params.iter().find(|p| p.name.ends_with("bias1a")).unwrap();
    assert_eq!(bias.spec.lr_mult, 0.1);
    let conv = params.iter().find(|p| p.name == "conv1.weight").unwrap();
    assert_eq!(conv.spec.lr_mult, 1.0);
}

#[test]
fn shipped_run_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".toml") && !name.starts_with("sweep-") {
            tau_train::config::load_config(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} run configs found in {}", dir.display());
}
