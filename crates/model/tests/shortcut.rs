//! The CIFAR ResNet's `shortcut` option against PyTorch: `subsample_bn` (the paper authors'
//! BN model: every other pixel, BatchNorm, zero channels appended) and `conv_bn` (option B:
//! 1×1 strided convolution + BatchNorm), each on the weights of a PyTorch network
//! (tests/fixtures/pth, written by scripts/make-pth-fixtures.py, whose network mirrors
//! `CifarResNet` with the same three shortcuts) giving PyTorch's float64 logits; names,
//! parameter counts, gradients and configs.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use tau_model::pth::{PthOptions, load_pth};
use tau_model::{CifarResNetConfig, Model, ModelConfig, Norm, Shortcut, init_varmap};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn cifar(depth: usize, shortcut: Shortcut) -> ModelConfig {
    ModelConfig::CifarResnet(CifarResNetConfig {
        depth,
        tau: "1/sqrt(L)".parse().unwrap(),
        shortcut,
        ..Default::default()
    })
}

fn expected(name: &str) -> Tensor {
    let t = candle::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    t[name].clone()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap()
}

fn load(shortcut: Shortcut, dtype: DType) -> (ModelConfig, VarMap) {
    let cfg = cifar(8, shortcut);
    let options = PthOptions {
        dtype: Some(dtype),
        ..Default::default()
    };
    let file = fixture(&format!("cifar8-{shortcut}.pth"));
    let (vm, _) = load_pth(&file, &cfg, &options, &Device::Cpu).unwrap();
    (cfg, vm)
}

/// Eval mode (running statistics, the shortcut's BN included) and train mode (batch
/// statistics) against PyTorch's float64 logits: f32 on the CPU kernels within 1e-5, f64
/// within 1e-9. The default zero_pad is the same check in tests/pth.rs.
#[test]
fn shortcuts_give_pytorchs_logits() {
    let xs = expected("input");
    for shortcut in [Shortcut::SubsampleBn, Shortcut::ConvBn] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-9)] {
            let (cfg, vm) = load(shortcut, dtype);
            let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
            for train in [false, true] {
                let name = format!("logits_{}.{shortcut}", if train { "train" } else { "eval" });
                let got = model
                    .forward_t(&xs.to_dtype(dtype).unwrap(), train)
                    .unwrap();
                let err = rel_err(&got, &expected(&name));
                assert!(err <= tol, "{name} in {dtype:?}: relative error {err:e}");
            }
        }
    }
    // The shortcut matters: the option-A network on the subsample_bn weights (without the
    // shortcut's BN) computes something else.
    let (_, vm) = load(Shortcut::SubsampleBn, DType::F32);
    {
        let mut data = vm.data().lock().unwrap();
        data.retain(|name, _| !name.contains(".downsample."));
    }
    let cfg = cifar(8, Shortcut::ZeroPad);
    let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
    let got = model.forward_t(&xs, false).unwrap();
    assert!(rel_err(&got, &expected("logits_eval.subsample_bn")) > 1e-2);
}

/// `sum(p.numel() for p in model.parameters())` of the script's PyTorch network at depth 20
/// (and of chenyaofo/pytorch-cifar-models' `cifar10_resnet20`, 272,474, for option B).
#[test]
fn parameter_counts_and_names() {
    for (shortcut, want) in [
        (Shortcut::ZeroPad, 269_722),
        (Shortcut::SubsampleBn, 269_818),
        (Shortcut::ConvBn, 272_474),
    ] {
        let cfg = cifar(20, shortcut);
        println!(
            "ResNet-20, shortcut = {shortcut}: {} parameters",
            cfg.num_parameters()
        );
        assert_eq!(cfg.num_parameters(), want, "{shortcut}");
    }
    let shapes = |shortcut| -> Vec<(String, Vec<usize>)> {
        cifar(20, shortcut)
            .param_specs()
            .into_iter()
            .filter(|s| s.name.contains("downsample"))
            .map(|s| (s.name, s.shape))
            .collect()
    };
    assert!(shapes(Shortcut::ZeroPad).is_empty());
    let bn = |p: &str, c: usize| -> Vec<(String, Vec<usize>)> {
        ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|l| (format!("{p}.downsample.1.{l}"), vec![c]))
            .collect()
    };
    // The authors' BN normalizes the subsampled input: 16 and 32 channels.
    assert_eq!(
        shapes(Shortcut::SubsampleBn),
        [bn("layer2.0", 16), bn("layer3.0", 32)].concat()
    );
    let conv = |p: &str, c_out: usize, c_in: usize| {
        vec![(format!("{p}.downsample.0.weight"), vec![c_out, c_in, 1, 1])]
    };
    assert_eq!(
        shapes(Shortcut::ConvBn),
        [
            conv("layer2.0", 32, 16),
            bn("layer2.0", 32),
            conv("layer3.0", 64, 32),
            bn("layer3.0", 64)
        ]
        .concat()
    );
    let cfg = cifar(20, Shortcut::ConvBn);
    use tau_model::ParamKind;
    assert_eq!(
        cfg.param_kind("layer2.0.downsample.0.weight"),
        ParamKind::Weight
    );
    assert_eq!(
        cfg.param_kind("layer2.0.downsample.1.weight"),
        ParamKind::BnAffine
    );
    assert_eq!(
        cfg.param_kind("layer2.0.downsample.1.running_var"),
        ParamKind::Buffer
    );
}

/// Train-mode gradients of every tensor, f32 (the CPU kernels' per-layer ops) against f64
/// (candle's own ops) on the same initial weights: the shortcut's parameters get
/// gradients, and both paths agree.
#[test]
fn gradients_flow_through_the_shortcut() {
    for shortcut in [Shortcut::SubsampleBn, Shortcut::ConvBn] {
        let cfg = cifar(8, shortcut);
        let grads = |dtype: DType| {
            let vm = init_varmap(&cfg, 5, dtype, &Device::Cpu).unwrap();
            let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
            let xs = expected("input").to_dtype(dtype).unwrap();
            let ys = Tensor::new(&[3u32, 8], &Device::Cpu).unwrap();
            let logits = model.forward_t(&xs, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &ys).unwrap();
            let g = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            let mut out: Vec<(String, Option<Tensor>)> = data
                .iter()
                .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).cloned()))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        };
        let (g32, g64) = (grads(DType::F32), grads(DType::F64));
        let mut checked = 0;
        for ((name, a), (_, b)) in g32.iter().zip(&g64) {
            if name.contains("running_") {
                continue;
            }
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let norm = b
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt();
            assert!(norm > 0.0, "{shortcut}: no gradient for {name}");
            let err = rel_err(a, b);
            assert!(
                err < 1e-3,
                "{shortcut}: {name}: f32 vs f64 relative error {err:e}"
            );
            checked += name.contains("downsample") as usize;
        }
        let want = if shortcut == Shortcut::ConvBn { 6 } else { 4 };
        assert_eq!(checked, want, "{shortcut}: the shortcut's parameters");
    }
}

#[test]
fn configs_default_to_zero_pad_and_check_the_norm() {
    let cfg: ModelConfig =
        serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 20}"#).unwrap();
    let ModelConfig::CifarResnet(c) = &cfg else {
        unreachable!()
    };
    assert_eq!(c.shortcut, Shortcut::ZeroPad);
    // Left out of written configs, so checkpoints from before the option are unchanged.
    assert!(!serde_json::to_string(&cfg).unwrap().contains("shortcut"));
    let json = serde_json::to_string(&cifar(20, Shortcut::SubsampleBn)).unwrap();
    assert!(json.contains(r#""shortcut":"subsample_bn""#), "{json}");
    let toml_cfg: ModelConfig = toml::from_str(
        "family = \"cifar_resnet\"\ndepth = 56\ntau = \"1/sqrt(L)\"\nshortcut = \"conv_bn\"\n",
    )
    .unwrap();
    assert_eq!(toml_cfg, cifar(56, Shortcut::ConvBn));

    let err = serde_json::from_str::<ModelConfig>(
        r#"{"family": "cifar_resnet", "depth": 20, "shortcut": "option_b"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("zero_pad") && err.contains("conv_bn"), "{err}");
    let no_bn = ModelConfig::CifarResnet(CifarResNetConfig {
        norm: Norm::None,
        shortcut: Shortcut::ConvBn,
        ..Default::default()
    });
    let err = no_bn.validate().unwrap_err().to_string();
    assert!(
        err.contains("shortcut = \"conv_bn\"") && err.contains("norm = \"batch_norm\""),
        "{err}"
    );
}

/// A file of another shortcut than the config's: the mismatch error names the shortcut
/// its `downsample` tensors belong to.
#[test]
fn a_mismatch_names_the_files_shortcut() {
    for shortcut in [Shortcut::SubsampleBn, Shortcut::ConvBn] {
        let file = fixture(&format!("cifar8-{shortcut}.pth"));
        let cfg = cifar(8, Shortcut::ZeroPad);
        let Err(err) = load_pth(&file, &cfg, &PthOptions::default(), &Device::Cpu) else {
            panic!("{shortcut}: imported into an option-A network");
        };
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("looks like shortcut = \"{shortcut}\"")),
            "{msg}"
        );
    }
}
