//! Gradient check of the no-BN τ-ResNet training step: the autograd gradient of the
//! cross-entropy loss with respect to the shared learnable τ, the scalar biases and
//! convolution / linear weight entries of a tiny no-BN ResNet-8, in f64, against central
//! finite differences; and the SGD step's use of it (τ at lr/10 with its gradient ÷ L).

use candle::{DType, Device, Tensor, Var};
use tau_kernels::select::{KernelSet, with_kernels};
use tau_model::ModelConfig;
use tau_train::config::{LossKind, WeightDecayMode};
use tau_train::loss::{Targets, loss_sum};
use tau_train::optim::{Sgd, SgdConfig};
use tau_train::setup::TauModel;

const BATCH: usize = 3;
const CLASSES: usize = 4;

fn model() -> TauModel {
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true,
            "tau": "1/sqrt(L)", "in_channels": 1, "num_classes": 4}"#,
    )
    .unwrap();
    let m = TauModel::init(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    // The scalar biases start at 0; give them distinct non-zero values so that their
    // gradients and their effect on the others are exercised.
    let data = m.varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        if name.contains(".bias") && data[*name].elem_count() == 1 {
            let v = 0.05 * ((i as f64) * 0.7).sin();
            data[*name]
                .set(&Tensor::new(&[v], &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    drop(data);
    m
}

/// A fixed batch: smooth deterministic images of shape (3, 1, 8, 8) and labels.
fn batch() -> (Tensor, Targets) {
    let n = BATCH * 64;
    let xs: Vec<f64> = (0..n)
        .map(|i| (i as f64 * 0.37).sin() + 0.3 * (i as f64 * 0.11).cos())
        .collect();
    let xs = Tensor::from_vec(xs, (BATCH, 1, 8, 8), &Device::Cpu).unwrap();
    let ys = Tensor::new(&[1u32, 3, 0], &Device::Cpu).unwrap();
    (xs, Targets::Classes(ys, CLASSES))
}

/// The mean cross-entropy over the batch (training mode, as in a step).
fn loss(m: &TauModel, xs: &Tensor, ys: &Targets) -> Tensor {
    let preds = m.forward_t_for_test(xs);
    loss_sum(LossKind::CrossEntropy, &preds, ys)
        .unwrap()
        .affine(1.0 / BATCH as f64, 0.0)
        .unwrap()
}

trait ForwardForTest {
    fn forward_t_for_test(&self, xs: &Tensor) -> Tensor;
}

impl ForwardForTest for TauModel {
    fn forward_t_for_test(&self, xs: &Tensor) -> Tensor {
        use tau_train::trainer::TrainModel;
        self.forward_t(xs, true).unwrap()
    }
}

fn var(m: &TauModel, name: &str) -> Var {
    m.varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no tensor `{name}`"))
        .clone()
}

fn get(v: &Var, i: usize) -> f64 {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[i]
}

fn set(v: &Var, i: usize, x: f64) {
    let mut flat = v
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    flat[i] = x;
    let t = Tensor::from_vec(flat, v.dims(), &Device::Cpu).unwrap();
    v.set(&t).unwrap();
}

/// (L(w + h) − L(w − h)) / 2h for entry `i` of `name`, restoring the entry after.
fn finite_difference(m: &TauModel, name: &str, i: usize, h: f64) -> f64 {
    let (xs, ys) = batch();
    let v = var(m, name);
    let w = get(&v, i);
    set(&v, i, w + h);
    let lp = loss(m, &xs, &ys).to_scalar::<f64>().unwrap();
    set(&v, i, w - h);
    let lm = loss(m, &xs, &ys).to_scalar::<f64>().unwrap();
    set(&v, i, w);
    (lp - lm) / (2.0 * h)
}

fn autograd(m: &TauModel, name: &str, i: usize) -> f64 {
    let (xs, ys) = batch();
    let grads = loss(m, &xs, &ys).backward().unwrap();
    let v = var(m, name);
    let g = grads
        .get(v.as_tensor())
        .unwrap_or_else(|| panic!("no gradient for `{name}`"));
    g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[i]
}

#[test]
fn autograd_matches_central_differences_in_f64() {
    let m = model();
    let cases: &[(&str, usize)] = &[
        ("tau", 0),
        ("layer1.0.bias1a", 0),
        ("layer1.0.bias1b", 0),
        ("layer2.0.bias2a", 0),
        ("layer3.0.bias2b", 0),
        ("conv1.weight", 4),
        ("layer1.0.conv1.weight", 17),
        ("layer2.0.conv2.weight", 101),
        ("layer3.0.conv1.weight", 7),
        ("fc.weight", 9),
        ("fc.bias", 2),
    ];
    for &(name, i) in cases {
        let a = autograd(&m, name, i);
        let f = finite_difference(&m, name, i, 1e-6);
        // Central differences in f64 with h = 1e-6: truncation O(h²) and rounding
        // O(ε/h) ≈ 1e-10 relative to the loss (≈ 1.4).
        let tol = 1e-7 * (1.0 + f.abs());
        assert!(
            (a - f).abs() < tol,
            "`{name}`[{i}]: autograd {a:e}, finite difference {f:e}"
        );
        assert!(
            f.abs() > 1e-6,
            "`{name}`[{i}]: gradient {f:e} too small to test"
        );
    }
}

#[test]
fn sgd_step_moves_tau_by_lr_over_10_times_grad_over_l() {
    let m = model();
    let cfg_text = r#"
name = "g"
seed = 0
steps = 1
[model]
family = "cifar_resnet"
depth = 8
norm = "none"
learnable_tau = true
in_channels = 1
num_classes = 4
[data]
source = "mnist"
batch_size = 1
[loss]
kind = "cross_entropy"
[optim]
kind = "sgd"
lr = 0.3
momentum = 0.9
weight_decay = 1e-4
"#;
    let cfg = tau_train::config::config_from_table(cfg_text.parse().unwrap()).unwrap();
    let params = m.params(&cfg).unwrap();
    let mut opt = Sgd::new(
        params,
        SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            weight_decay_mode: WeightDecayMode::Coupled,
        },
    );
    let (xs, ys) = batch();
    let grads = loss(&m, &xs, &ys).backward().unwrap();
    let per_param: Vec<Option<Tensor>> = opt
        .params()
        .iter()
        .map(|p| grads.get(p.var.as_tensor()).cloned())
        .collect();
    let tau = var(&m, "tau");
    let bias = var(&m, "layer2.0.bias1b");
    let (t0, b0) = (get(&tau, 0), get(&bias, 0));
    let (gt, gb) = (autograd(&m, "tau", 0), autograd(&m, "layer2.0.bias1b", 0));
    opt.step(&per_param, 0.3).unwrap();
    // L = 3 blocks; τ: no weight decay; the bias: coupled decay 1e-4; first step, so the
    // momentum buffer is the gradient itself.
    let want_tau = t0 - 0.3 * 0.1 * gt / 3.0;
    let want_bias = b0 - 0.3 * 0.1 * (gb + 1e-4 * b0);
    assert!((get(&tau, 0) - want_tau).abs() < 1e-12);
    assert!((get(&bias, 0) - want_bias).abs() < 1e-12);
}

/// The f32 forward and backward (the dtype of real runs, with its own CPU kernels) agree
/// with the f64 ones on the same weights, on a batch large enough to be split across
/// threads: 32 images of 1 × 16 × 16.
#[test]
fn f32_gradients_match_f64() {
    let m64 = model();
    let vm32 = candle_nn::VarMap::new();
    {
        let src = m64.varmap.data().lock().unwrap();
        let mut dst = vm32.data().lock().unwrap();
        for (name, v) in src.iter() {
            let t = v.as_tensor().to_dtype(DType::F32).unwrap();
            dst.insert(name.clone(), Var::from_tensor(&t).unwrap());
        }
    }
    let m32 = TauModel::from_varmap(&m64.cfg, vm32, &Device::Cpu).unwrap();
    let n = 32;
    let xs: Vec<f64> = (0..n * 256)
        .map(|i| (i as f64 * 0.731).sin() * 1.5 + 0.2 * (i as f64 * 0.013).cos())
        .collect();
    let xs = Tensor::from_vec(xs, (n, 1, 16, 16), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 4).collect();
    let ys = Targets::Classes(Tensor::new(labels.as_slice(), &Device::Cpu).unwrap(), 4);
    let grads_of = |m: &TauModel, xs: &Tensor| {
        let l = loss_sum(LossKind::CrossEntropy, &m.forward_t_for_test(xs), &ys).unwrap();
        let g = l.backward().unwrap();
        let data = m.varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let out: Vec<(String, Vec<f64>)> = names
            .iter()
            .map(|name| {
                let t = g.get(data[*name].as_tensor()).unwrap();
                let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                (name.to_string(), t.to_vec1::<f64>().unwrap())
            })
            .collect();
        (
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            out,
        )
    };
    let (l64, g64) = grads_of(&m64, &xs);
    // Under every kernel set this CPU runs (the AVX-512 one runs what an AVX2 CPU runs).
    for set in KernelSet::available() {
        let xs32 = xs.to_dtype(DType::F32).unwrap();
        let (l32, g32) = with_kernels(set, || grads_of(&m32, &xs32));
        assert!(
            (l64 - l32).abs() < 1e-4 * l64.abs(),
            "{set}: loss {l64} vs {l32}"
        );
        for ((name, a), (_, b)) in g64.iter().zip(&g32) {
            let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>()
                .sqrt();
            assert!(
                diff <= 1e-4 * norm + 1e-6,
                "{set}: `{name}`: f32 gradient differs from f64 by {diff:e} (norm {norm:e})"
            );
        }
    }
}
