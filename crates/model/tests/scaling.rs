//! The residual-scaling schemes of the CIFAR ResNets (`scaling = tau | fixup | skipinit |
//! rezero`): logits against a PyTorch implementation on the same weights
//! (scripts/scaling-schemes-reference.py wrote the fixture), the initialization rules
//! against their closed forms, blocks that start as the identity, the fused blocks'
//! gradients against the composed candle path, checkpoints, names, kinds and bad configs.

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tau_model::checkpoint;
use tau_model::kernels::select::{KernelSet, Kernels, with_kernels};
use tau_model::{
    BottleneckResNetConfig, CifarResNet, CifarResNetConfig, Model, ModelConfig, Norm, ParamInit,
    ParamKind, Scaling, init_varmap, named_vars,
};

fn cifar(depth: usize, scaling: Scaling, norm: Norm) -> CifarResNetConfig {
    CifarResNetConfig {
        depth,
        norm,
        scaling,
        ..Default::default()
    }
}

/// max |a − b| / max |b|, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let v = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (v(a), v(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale.max(f64::MIN_POSITIVE)
}

fn fixture() -> HashMap<String, Tensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scaling-schemes.safetensors");
    candle::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// A VarMap holding `cfg`'s tensors, taken from `tensors` in `dtype`.
fn varmap_from(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, dtype: DType) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for spec in cfg.param_specs() {
            let t = tensors
                .get(&spec.name)
                .unwrap_or_else(|| panic!("fixture lacks {}", spec.name));
            data.insert(
                spec.name.clone(),
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap(),
            );
        }
    }
    vm
}

/// Logits of every scheme against PyTorch (float64) on the fixture's weights: f32 through
/// the fused kernels (≤ 1e-5 relative), f64 through candle's composed ops (≤ 1e-10);
/// BatchNorm cases in evaluation and training mode.
#[test]
fn logits_match_pytorch_for_every_scheme() {
    let tensors = fixture();
    let cases = [
        ("tau_none", Scaling::Tau, Norm::None),
        ("tau_bn", Scaling::Tau, Norm::BatchNorm),
        ("fixup", Scaling::Fixup, Norm::None),
        ("skipinit_bn", Scaling::SkipInit, Norm::BatchNorm),
        ("skipinit_none", Scaling::SkipInit, Norm::None),
        ("rezero", Scaling::ReZero, Norm::None),
    ];
    for (case, scaling, norm) in cases {
        let cfg = ModelConfig::CifarResnet(CifarResNetConfig {
            learnable_tau: scaling == Scaling::Tau, // reads τ = 0.4 from the fixture
            ..cifar(8, scaling, norm)
        });
        let modes: &[(&str, bool)] = match norm {
            Norm::BatchNorm => &[("eval", false), ("train", true)],
            Norm::None => &[("eval", false)],
        };
        for &(mode, train) in modes {
            let want = &tensors[&format!("logits.{case}.{mode}")];
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
                // A fresh copy each time: training mode moves the running statistics.
                let vm = varmap_from(&cfg, &tensors, dtype);
                let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
                let xs = tensors["input"].to_dtype(dtype).unwrap();
                let got = model.forward_t(&xs, train).unwrap();
                let e = rel_err(&got, want);
                assert!(
                    e <= tol,
                    "{case} {mode} {dtype:?}: relative error {e:e} > {tol:e}"
                );
            }
        }
    }
}

fn init_values(cfg: &ModelConfig, seed: u64) -> HashMap<String, Vec<f64>> {
    let vm = init_varmap(cfg, seed, DType::F64, &Device::Cpu).unwrap();
    named_vars(&vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Fixup's rules: every branch's last convolution and the classifier at zero, the
/// multipliers at 1, the biases at 0, and the branches' first convolutions drawn with the
/// He standard deviation √(2/(9·c_out)) times L^(−1/(2m−2)) = L^(−1/2) (m = 2): the
/// sample standard deviation over all of them against the closed form.
#[test]
fn fixup_initialization_follows_its_closed_form() {
    let c = cifar(56, Scaling::Fixup, Norm::None);
    let l = c.n_blocks() as f64;
    assert_eq!(c.fixup_std_factor(), 1.0 / l.sqrt());
    let cfg = ModelConfig::CifarResnet(c);
    let values = init_values(&cfg, 5);
    let (mut checked, mut scales) = (0, 0);
    for (name, v) in &values {
        if name.ends_with("conv2.weight") || name.starts_with("fc.") {
            assert!(v.iter().all(|&x| x == 0.0), "{name} is not zero");
        } else if name.ends_with(".scale") {
            assert_eq!(v, &[1.0], "{name}");
            scales += 1;
        } else if name.contains("bias") {
            assert_eq!(v, &[0.0], "{name}");
        } else if name.starts_with("layer") && name.ends_with("conv1.weight") {
            // N(0, σ²) with σ = √(2/(9·c_out))/√L: the normalized second moment is 1 up
            // to sampling error (≥ 2,304 draws per tensor; ≈ 4σ bound over all of them).
            let c_out: f64 = [16.0, 32.0, 64.0][values_stage(name) - 1];
            let sigma = (2.0 / (9.0 * c_out)).sqrt() / l.sqrt();
            let m2 = v.iter().map(|x| (x / sigma).powi(2)).sum::<f64>() / v.len() as f64;
            assert!(
                (m2 - 1.0).abs() < 4.0 * (2.0 / v.len() as f64).sqrt(),
                "{name}: {m2}"
            );
            checked += 1;
        }
    }
    assert_eq!((checked, scales), (27, 27));
    // All first convolutions together: one sample variance against the closed form.
    let (mut sum, mut n) = (0.0, 0usize);
    for (name, v) in &values {
        if name.starts_with("layer") && name.ends_with("conv1.weight") {
            let c_out: f64 = [16.0, 32.0, 64.0][values_stage(name) - 1];
            let sigma2 = 2.0 / (9.0 * c_out) / l;
            sum += v.iter().map(|x| x * x / sigma2).sum::<f64>();
            n += v.len();
        }
    }
    let m2 = sum / n as f64;
    assert!(
        (m2 - 1.0).abs() < 4.0 * (2.0 / n as f64).sqrt(),
        "pooled: {m2} over {n}"
    );
    // The specs say the same.
    for spec in cfg.param_specs() {
        if spec.name == "layer3.8.conv1.weight" {
            let std = (2.0 / (9.0 * 64.0) / l).sqrt();
            assert_eq!(spec.init, ParamInit::Normal { std });
        }
    }
}

fn values_stage(name: &str) -> usize {
    name[5..6].parse().unwrap()
}

/// With every α at 0 (SkipInit, ReZero at initialization) each block is the identity on
/// its input (SkipInit: relu(x) = x, its input being a ReLU's output), or at a stage
/// transition the option-A shortcut; the same holds for Fixup (zero last convolution,
/// zero biases). The hooked forward pass sees h_l = shortcut(h_{l−1}).
#[test]
fn blocks_are_the_identity_at_initialization() {
    let xs = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    for (scaling, norm) in [
        (Scaling::SkipInit, Norm::BatchNorm),
        (Scaling::SkipInit, Norm::None),
        (Scaling::ReZero, Norm::None),
        (Scaling::Fixup, Norm::None),
    ] {
        let cfg = ModelConfig::CifarResnet(cifar(14, scaling, norm));
        let vm = init_varmap(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
        let mut hs = Vec::new();
        let logits = model
            .forward_hooked(&xs, true, |_, h| {
                hs.push(h.clone());
                Ok(())
            })
            .unwrap();
        assert_eq!(hs.len(), 7);
        for l in 1..hs.len() {
            let (prev, h) = (&hs[l - 1], &hs[l]);
            let stride = if prev.dim(2).unwrap() == h.dim(2).unwrap() {
                1
            } else {
                2
            };
            let want =
                tau_model::kernels::option_a_shortcut(prev, stride, h.dim(1).unwrap()).unwrap();
            assert_eq!(rel_err(h, &want), 0.0, "{scaling} {norm:?}: block {l}");
        }
        if scaling == Scaling::Fixup {
            // The zero classifier: every logit 0.
            assert_eq!(
                logits
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
}

/// The per-block multipliers (τ's place in the fused blocks) get the gradients the
/// composed candle ops give, under every kernel set, with random non-zero values so that
/// every branch counts.
#[test]
fn per_block_scalars_get_the_composed_gradients_under_every_kernel_set() {
    let tensors = fixture();
    let xs = tensors["input"].clone();
    for (scaling, norm) in [
        (Scaling::Fixup, Norm::None),
        (Scaling::SkipInit, Norm::BatchNorm),
        (Scaling::SkipInit, Norm::None),
        (Scaling::ReZero, Norm::None),
    ] {
        let cfg = ModelConfig::CifarResnet(cifar(8, scaling, norm));
        let grads_under = |set: Kernels| -> Vec<(String, Tensor)> {
            with_kernels(set, || {
                let vm = varmap_from(&cfg, &tensors, DType::F32);
                let model = Model::from_varmap(&cfg, &vm, &Device::Cpu).unwrap();
                let loss = model
                    .forward_t(&xs, true)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                named_vars(&vm)
                    .into_iter()
                    .filter(|(n, _)| cfg.param_kind(n).is_trainable())
                    .map(|(n, v)| {
                        let g = grads
                            .get(v.as_tensor())
                            .unwrap_or_else(|| panic!("no grad for {n}"));
                        (n, g.clone())
                    })
                    .collect()
            })
        };
        let want = grads_under(Kernels::Candle);
        for set in KernelSet::available() {
            let got = grads_under(Kernels::Fused(set));
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let e = rel_err(g, w);
                assert!(
                    e < 1e-4,
                    "{scaling} {norm:?} ({set} kernels): d{name} rel err {e:e}"
                );
            }
        }
    }
}

/// Names and kinds: Fixup's `scale` (lr/10 group) and stem/head biases, SkipInit's and
/// ReZero's `alpha` (main-lr group), no `tau` outside the τ scheme, no biases in ReZero.
#[test]
fn scheme_tensors_have_pytorch_style_names_and_their_kinds() {
    let names = |scaling, norm| -> Vec<String> {
        ModelConfig::CifarResnet(cifar(8, scaling, norm))
            .param_specs()
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    let fixup = names(Scaling::Fixup, Norm::None);
    for n in [
        "bias1",
        "layer1.0.bias1a",
        "layer1.0.scale",
        "layer3.0.bias2b",
        "bias2",
    ] {
        assert!(fixup.contains(&n.to_string()), "fixup lacks {n}");
    }
    let rezero = names(Scaling::ReZero, Norm::None);
    assert_eq!(
        rezero
            .iter()
            .filter(|n| n.starts_with("layer1."))
            .collect::<Vec<_>>(),
        [
            "layer1.0.conv1.weight",
            "layer1.0.conv2.weight",
            "layer1.0.alpha"
        ]
    );
    let skip_bn = names(Scaling::SkipInit, Norm::BatchNorm);
    assert!(skip_bn.contains(&"layer2.0.alpha".to_string()));
    assert!(!skip_bn.iter().any(|n| n == "tau" || n.contains("bias1a")));
    let cfg = ModelConfig::CifarResnet(cifar(8, Scaling::Fixup, Norm::None));
    for (name, kind) in [
        ("layer1.0.scale", ParamKind::BranchScale),
        ("layer2.0.alpha", ParamKind::Alpha),
        ("bias1", ParamKind::ScalarBias),
        ("bias2", ParamKind::ScalarBias),
        ("layer1.0.bias2b", ParamKind::ScalarBias),
        ("fc.bias", ParamKind::Weight),
    ] {
        assert_eq!(cfg.param_kind(name), kind, "{name}");
    }
    for scaling in [Scaling::Fixup, Scaling::SkipInit, Scaling::ReZero] {
        let norm = if scaling == Scaling::SkipInit {
            Norm::BatchNorm
        } else {
            Norm::None
        };
        let cfg = ModelConfig::CifarResnet(cifar(8, scaling, norm));
        // Every spec's kind is the one the name alone gives (what checkpoints rely on).
        for spec in cfg.param_specs() {
            assert_eq!(
                cfg.param_kind(&spec.name),
                spec.kind,
                "{scaling}: {}",
                spec.name
            );
        }
        assert_eq!(cfg.tau_init(), 1.0);
        assert_eq!(cfg.scaling(), scaling);
    }
}

/// `scaling` reads from JSON (and so from a TOML `[model]` table and `--set`), defaults
/// to `tau`, and survives a checkpoint round trip with the same logits.
#[test]
fn scaling_round_trips_through_config_and_checkpoint() {
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "scaling": "rezero"}"#,
    )
    .unwrap();
    assert_eq!(cfg.scaling(), Scaling::ReZero);
    let old: ModelConfig =
        serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#).unwrap();
    assert_eq!(old.scaling(), Scaling::Tau);
    let err = serde_json::from_str::<ModelConfig>(
        r#"{"family": "cifar_resnet", "scaling": "batchnorm"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown variant `batchnorm`"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let xs = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    for (i, scaling) in [Scaling::Fixup, Scaling::SkipInit, Scaling::ReZero]
        .into_iter()
        .enumerate()
    {
        let cfg = ModelConfig::CifarResnet(cifar(8, scaling, Norm::None));
        // Non-trivial values: the fixture's weights.
        let vm = varmap_from(&cfg, &fixture(), DType::F32);
        let before = Model::from_varmap(&cfg, &vm, &Device::Cpu)
            .unwrap()
            .forward_t(&xs, false)
            .unwrap();
        let sub = dir.path().join(format!("m{i}"));
        checkpoint::save(&sub, &cfg, &vm).unwrap();
        let (cfg2, vm2) = checkpoint::load(&sub, &Device::Cpu).unwrap();
        assert_eq!(cfg2, cfg);
        let after = Model::from_varmap(&cfg2, &vm2, &Device::Cpu)
            .unwrap()
            .forward_t(&xs, false)
            .unwrap();
        assert_eq!(rel_err(&after, &before), 0.0, "{scaling}");
    }
}

#[test]
fn bad_combinations_are_named_errors() {
    let err = |c: ModelConfig| c.validate().unwrap_err().to_string();
    let e = err(ModelConfig::CifarResnet(cifar(
        8,
        Scaling::Fixup,
        Norm::BatchNorm,
    )));
    assert!(
        e.contains("scaling = \"fixup\" trains without normalization"),
        "{e}"
    );
    let e = err(ModelConfig::CifarResnet(cifar(
        8,
        Scaling::ReZero,
        Norm::BatchNorm,
    )));
    assert!(e.contains("scaling = \"rezero\""), "{e}");
    let e = err(ModelConfig::CifarResnet(CifarResNetConfig {
        learnable_tau: true,
        ..cifar(8, Scaling::SkipInit, Norm::None)
    }));
    assert!(
        e.contains("learnable_tau applies to scaling = \"tau\" only"),
        "{e}"
    );
    let e = err(ModelConfig::BottleneckResnet(BottleneckResNetConfig {
        scaling: Scaling::Fixup,
        norm: Norm::None,
        ..Default::default()
    }));
    assert!(
        e.contains("not supported for the bottleneck ResNets yet"),
        "{e}"
    );
    // Building from a VarBuilder validates too.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    assert!(CifarResNet::new(&cifar(8, Scaling::Fixup, Norm::BatchNorm), vb).is_err());
}
