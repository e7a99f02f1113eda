//! The no-BN τ-ResNet against a PyTorch transcription of the companion code's
//! `resnet_cifar_nobn.py` (1-channel stem): logits, mean cross-entropy and the gradient of
//! every parameter on fixed weights and inputs, in f64 (candle's own ops) and in f32 (the
//! CPU kernels real runs use). The finite-difference checks show that the model
//! differentiates its own function; this shows that the function is the reference's
//! (block order, where the scalar biases sit relative to τ, option-A shortcut on an odd
//! size, global pooling, classifier). A last test checks the MNIST batches the trainer
//! feeds it (normalization, image/label alignment) against numpy.
//!
//! Reference values (PyTorch 2, float64), with `Net` a line-by-line copy of the companion
//! code's `ResNet_NoBN` (`in_channels = 1`, shared learnable `tau`, `x[:, :, ::2, ::2]`
//! plus zero channels as the shortcut):
//!
//! ```python
//! net = Net(depth=8, cin=1, classes=10).double()
//! names = sorted(n for n, _ in net.named_parameters())
//! params = dict(net.named_parameters())
//! for t, name in enumerate(names):
//!     p = params[name]; j = torch.arange(p.numel(), dtype=torch.float64)
//!     if name == "tau": v = torch.tensor([0.4], dtype=torch.float64)
//!     elif p.dim() == 4: v = math.sqrt(2 / (p.shape[2] * p.shape[3] * p.shape[0])) * 1.7 * torch.sin(0.37 * j + t)
//!     elif p.dim() == 2: v = 0.12 * torch.sin(0.37 * j + t)
//!     else: v = 0.05 * torch.sin(0.37 * j + t)
//!     p.data.copy_(v.reshape(p.shape))
//! i = torch.arange(4 * 14 * 14, dtype=torch.float64)
//! x = (torch.sin(0.731 * i) * 1.5 + 0.2 * torch.cos(0.013 * i)).reshape(4, 1, 14, 14)
//! out = net(x); loss = F.cross_entropy(out, torch.tensor([3, 7, 0, 9])); loss.backward()
//! # out[0], loss.item(), and params[name].grad.norm() for every name
//! ```

use std::path::Path;

use candle::{DType, Device, Tensor};
use tau_kernels::select::{KernelSet, with_kernels};
use tau_model::ModelConfig;
use tau_train::config::LossKind;
use tau_train::loss::{Targets, loss_sum};
use tau_train::setup::TauModel;
use tau_train::trainer::TrainModel;

const LOGITS_0: [f64; 10] = [
    -6.0617598264e-01,
    1.1687522012e+00,
    9.6130779101e-01,
    -8.6201309829e-01,
    -1.0944677669e+00,
    6.5424156281e-01,
    1.2719987197e+00,
    -3.6098693017e-01,
    -1.3923466678e+00,
    -2.6463853356e-02,
];

const LOSS: f64 = 3.745022614082e+00;

/// ‖∂loss/∂p‖ for every parameter, in sorted name order.
const GRAD_NORMS: [(&str, f64); 22] = [
    ("conv1.weight", 4.5208658719e+00),
    ("fc.bias", 4.5766571528e-01),
    ("fc.weight", 8.4798466409e+00),
    ("layer1.0.bias1a", 1.4724511553e+00),
    ("layer1.0.bias1b", 8.1805454039e-01),
    ("layer1.0.bias2a", 9.1438901455e-02),
    ("layer1.0.bias2b", 4.2103191956e-01),
    ("layer1.0.conv1.weight", 1.7176089052e+00),
    ("layer1.0.conv2.weight", 1.6637154318e+00),
    ("layer2.0.bias1a", 2.1120896042e-01),
    ("layer2.0.bias1b", 3.7843372532e-01),
    ("layer2.0.bias2a", 4.5145323007e-03),
    ("layer2.0.bias2b", 9.8626862354e-02),
    ("layer2.0.conv1.weight", 1.2705164417e+00),
    ("layer2.0.conv2.weight", 1.3688093783e+00),
    ("layer3.0.bias1a", 3.7422805134e-04),
    ("layer3.0.bias1b", 1.6141145107e-02),
    ("layer3.0.bias2a", 2.7749604658e-03),
    ("layer3.0.bias2b", 1.4419335486e-01),
    ("layer3.0.conv1.weight", 6.4188418481e+00),
    ("layer3.0.conv2.weight", 6.2301341363e-01),
    ("tau", 9.6271923685e+00),
];

/// A no-BN ResNet-8 with a 1-channel stem whose every parameter is set by the formula of
/// the module docs.
fn model(dtype: DType) -> TauModel {
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true,
            "tau": "1/sqrt(L)", "in_channels": 1, "num_classes": 10}"#,
    )
    .unwrap();
    let m = TauModel::init(&cfg, 0, dtype, &Device::Cpu).unwrap();
    {
        let data = m.varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (t, name) in names.iter().enumerate() {
            let v = &data[*name];
            let dims = v.dims().to_vec();
            let k = v.elem_count();
            let amp = match dims.len() {
                _ if name.as_str() == "tau" => 0.0,
                4 => (2.0 / (dims[2] * dims[3] * dims[0]) as f64).sqrt() * 1.7,
                2 => 0.12,
                _ => 0.05,
            };
            let vals: Vec<f64> = if name.as_str() == "tau" {
                vec![0.4]
            } else {
                (0..k)
                    .map(|j| amp * (0.37 * j as f64 + t as f64).sin())
                    .collect()
            };
            let t = Tensor::from_vec(vals, dims, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            v.set(&t).unwrap();
        }
    }
    m
}

fn inputs(dtype: DType) -> (Tensor, Targets) {
    let n = 4 * 14 * 14;
    let xs: Vec<f64> = (0..n)
        .map(|i| (0.731 * i as f64).sin() * 1.5 + 0.2 * (0.013 * i as f64).cos())
        .collect();
    let xs = Tensor::from_vec(xs, (4, 1, 14, 14), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let ys = Tensor::new(&[3u32, 7, 0, 9], &Device::Cpu).unwrap();
    (xs, Targets::Classes(ys, 10))
}

fn check(dtype: DType, tol: f64) {
    let m = model(dtype);
    let (xs, ys) = inputs(dtype);
    let logits = m.forward_t(&xs, true).unwrap();
    let row: Vec<f64> = logits
        .get(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in row.iter().zip(LOGITS_0) {
        assert!(
            (got - want).abs() <= tol * (1.0 + want.abs()),
            "{dtype:?} logits[0]: {row:?} vs {LOGITS_0:?}"
        );
    }
    let loss = loss_sum(LossKind::CrossEntropy, &logits, &ys)
        .unwrap()
        .affine(0.25, 0.0)
        .unwrap();
    let l = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (l - LOSS).abs() <= tol * LOSS,
        "{dtype:?} loss {l} vs {LOSS}"
    );
    let grads = loss.backward().unwrap();
    let data = m.varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let got_names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let want_names: Vec<&str> = GRAD_NORMS.iter().map(|(n, _)| *n).collect();
    assert_eq!(got_names, want_names);
    for (name, want) in GRAD_NORMS {
        let g = grads
            .get(data[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let norm = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        // The smallest gradients (a few 1e-4) are differences of sums over thousands of
        // terms: their f32 error is relative to the gradient scale, not to themselves.
        assert!(
            (norm - want).abs() <= tol * want.max(0.1),
            "{dtype:?} ‖∂loss/∂{name}‖ = {norm:e}, PyTorch {want:e}"
        );
    }
}

#[test]
fn f64_matches_pytorch_reference() {
    check(DType::F64, 1e-9);
}

#[test]
fn f32_matches_pytorch_reference() {
    // Under every kernel set this CPU runs (the AVX-512 one runs what an AVX2 CPU runs).
    for set in KernelSet::available() {
        println!("kernel set: {set}");
        with_kernels(set, || check(DType::F32, 1e-4));
    }
}

/// The training inputs as the trainer gets them, against numpy on the real MNIST files
/// (skipped when they are absent): the first 128 training images normalized with mean
/// 0.1307 and std 0.3081, and their labels.
///
/// ```python
/// x = images[:128].astype(np.float64); z = (x / 255 - 0.1307) / 0.3081
/// z.mean(), z.std(), z[0, 0, 14, :].sum(), labels[:16], labels[:128].sum()
/// ```
#[test]
fn mnist_batches_match_numpy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: MNIST not found at {}", dir.display());
        return;
    }
    let split = tau_data::mnist::load_dir(&dir).unwrap();
    let idx: Vec<usize> = (0..128).collect();
    let (xs, ys) = tau_data::make_batch(
        &split.train,
        &idx,
        &tau_data::Normalize::mnist(),
        tau_data::Augment::None,
        0,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(xs.dims(), [128, 1, 28, 28]);
    let v: Vec<f64> = xs
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    let row: f64 = v[14 * 28..15 * 28].iter().sum();
    assert!((mean - -0.010539379862623433).abs() < 1e-6, "mean {mean}");
    assert!((std - 0.9879271423842059).abs() < 1e-6, "std {std}");
    assert!((row - 0.4811526687922807).abs() < 1e-5, "row sum {row}");
    let labels: Vec<u32> = ys.to_vec1().unwrap();
    assert_eq!(
        labels[..16],
        [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7]
    );
    assert_eq!(labels.iter().sum::<u32>(), 519);
}
