//! CIFAR and bottleneck τ-ResNets: parameter counts against PyTorch, shapes, BatchNorm
//! train vs eval, the option-A shortcut, τ's placement, and bad configs.

use candle::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tau_kernels::select::{KernelSet, with_kernels};
use tau_model::resnet::{max_pool_3x3_s2, subsample2};
use tau_model::{
    BottleneckResNetConfig, CifarResNetConfig, Model, ModelConfig, Norm, ParamKind, TauRule,
    init_varmap,
};

fn cifar(depth: usize, norm: Norm) -> CifarResNetConfig {
    CifarResNetConfig {
        depth,
        norm,
        ..Default::default()
    }
}

fn build(cfg: &ModelConfig, seed: u64) -> (Model, VarMap) {
    let vm = init_varmap(cfg, seed, DType::F32, &Device::Cpu).unwrap();
    let model = Model::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    (model, vm)
}

fn input(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn get(vm: &VarMap, name: &str) -> Tensor {
    vm.data().lock().unwrap()[name].as_tensor().clone()
}

/// `sum(p.numel() for p in model.parameters())` in PyTorch: 269,722 / 853,018 / 1,727,962
/// for the CIFAR ResNets 20/56/110 with BN (option A), 25,557,032 for torchvision's
/// ResNet-50.
#[test]
fn parameter_counts_equal_pytorch() {
    for (depth, want) in [(20, 269_722), (56, 853_018), (110, 1_727_962)] {
        let cfg = ModelConfig::CifarResnet(cifar(depth, Norm::BatchNorm));
        assert_eq!(cfg.num_parameters(), want, "ResNet-{depth}");
    }
    let cfg = ModelConfig::BottleneckResnet(BottleneckResNetConfig::default());
    assert_eq!(cfg.num_parameters(), 25_557_032);
    // The built model owns exactly the tensors the specs list.
    let cfg = ModelConfig::CifarResnet(cifar(20, Norm::BatchNorm));
    let (_, vm) = build(&cfg, 0);
    let counted: usize = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| cfg.param_kind(k) != ParamKind::Buffer)
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(counted, 269_722);
}

#[test]
fn output_shapes_for_every_family() {
    let x = input((2, 3, 32, 32), 1);
    for norm in [Norm::BatchNorm, Norm::None] {
        let cfg = ModelConfig::CifarResnet(CifarResNetConfig {
            depth: 8,
            norm,
            learnable_tau: norm == Norm::None,
            ..Default::default()
        });
        let (model, _) = build(&cfg, 1);
        for train in [true, false] {
            assert_eq!(model.forward_t(&x, train).unwrap().dims(), [2, 10]);
        }
        assert_eq!(model.n_blocks(), 3);
    }
    // MNIST: 1×28×28 (28 → 14 → 7 through the stages), 10 classes.
    let cfg = ModelConfig::CifarResnet(CifarResNetConfig {
        depth: 8,
        norm: Norm::None,
        learnable_tau: true,
        in_channels: 1,
        ..Default::default()
    });
    let (model, _) = build(&cfg, 2);
    let y = model.forward_t(&input((2, 1, 28, 28), 2), true).unwrap();
    assert_eq!(y.dims(), [2, 10]);
    // Bottleneck ResNet-50, with and without BN, on a small image.
    for norm in [Norm::BatchNorm, Norm::None] {
        let cfg = ModelConfig::BottleneckResnet(BottleneckResNetConfig {
            norm,
            num_classes: 7,
            ..Default::default()
        });
        let (model, _) = build(&cfg, 3);
        assert_eq!(model.n_blocks(), 6);
        let y = model.forward_t(&input((2, 3, 32, 32), 3), false).unwrap();
        assert_eq!(y.dims(), [2, 7]);
        assert!(
            y.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())
        );
    }
    let theory = ModelConfig::Theory(Default::default());
    let (model, _) = build(&theory, 4);
    let y = model.forward_t(
        &Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
        true,
    );
    assert_eq!(y.unwrap().dims(), [3, 1]);
}

/// Train mode normalizes with batch statistics and moves the running statistics in the
/// VarMap by momentum 0.1; eval mode uses (and keeps) the running statistics.
#[test]
fn batch_norm_train_vs_eval() {
    let cfg = ModelConfig::CifarResnet(cifar(8, Norm::BatchNorm));
    let (model, vm) = build(&cfg, 5);
    let x = input((2, 3, 8, 8), 5);
    let eval0 = model.forward_t(&x, false).unwrap();
    let eval1 = model.forward_t(&x, false).unwrap();
    assert_eq!(
        eval0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        eval1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let zeros = vec![0f32; 16];
    assert_eq!(
        get(&vm, "bn1.running_mean").to_vec1::<f32>().unwrap(),
        zeros
    );

    let train = model.forward_t(&x, true).unwrap();
    let diff = (train - &eval0).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-4);
    // running_mean = 0.9·0 + 0.1·(batch mean of conv1(x) per channel).
    let c = tau_kernels::conv2d(&x, &get(&vm, "conv1.weight"), 1, 1).unwrap();
    let mean = c
        .transpose(0, 1)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .mean(1)
        .unwrap();
    let want = (mean * 0.1).unwrap().to_vec1::<f32>().unwrap();
    let got = get(&vm, "bn1.running_mean").to_vec1::<f32>().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    let deep = get(&vm, "layer3.0.bn2.running_var")
        .to_vec1::<f32>()
        .unwrap();
    assert!(deep.iter().any(|v| (v - 1.0).abs() > 1e-4));
    // Eval now uses the moved statistics.
    let eval2 = model.forward_t(&x, false).unwrap();
    let diff = (eval2 - eval0).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
}

/// With τ → 0 every block passes its input through the option-A shortcut only, so the
/// no-BN network equals fc(avgpool(shortcut(relu(conv1 x)))), computed here directly.
#[test]
fn tiny_tau_leaves_only_the_option_a_shortcut() {
    let cfg = ModelConfig::CifarResnet(CifarResNetConfig {
        depth: 14,
        norm: Norm::None,
        tau: TauRule::Fixed(1e-30),
        ..Default::default()
    });
    let (model, vm) = build(&cfg, 6);
    let x = input((2, 3, 9, 9), 6);
    let h = tau_kernels::conv2d(&x, &get(&vm, "conv1.weight"), 1, 1)
        .unwrap()
        .relu()
        .unwrap();
    // Stage 2: 16 → 32 channels, 9×9 → 5×5 (rows and columns 0, 2, 4, 6, 8).
    let idx = Tensor::new(&[0u32, 2, 4, 6, 8], &Device::Cpu).unwrap();
    let h = h
        .index_select(&idx, 2)
        .unwrap()
        .index_select(&idx, 3)
        .unwrap();
    let h = h.pad_with_zeros(1, 0, 16).unwrap();
    let idx = Tensor::new(&[0u32, 2, 4], &Device::Cpu).unwrap();
    let h = h
        .index_select(&idx, 2)
        .unwrap()
        .index_select(&idx, 3)
        .unwrap();
    let h = h.pad_with_zeros(1, 0, 32).unwrap();
    let pooled = h.flatten_from(2).unwrap().mean(D::Minus1).unwrap();
    let want = pooled
        .matmul(&get(&vm, "fc.weight").t().unwrap())
        .unwrap()
        .broadcast_add(&get(&vm, "fc.bias"))
        .unwrap();
    let got = model.forward_t(&x, true).unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}

/// The learnable τ is one shared scalar named `tau`, initialized at the rule's value, and
/// it receives a gradient.
#[test]
fn learnable_tau_is_shared_and_trainable() {
    let cfg = ModelConfig::CifarResnet(CifarResNetConfig {
        depth: 8,
        norm: Norm::None,
        learnable_tau: true,
        in_channels: 1,
        ..Default::default()
    });
    let (model, vm) = build(&cfg, 7);
    assert!((model.tau().unwrap() - 1.0 / 3f64.sqrt()).abs() < 1e-7);
    assert_eq!(cfg.param_kind("tau"), ParamKind::Tau);
    let y = model.forward_t(&input((2, 1, 12, 12), 7), true).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let g = grads
        .get(data["tau"].as_tensor())
        .expect("tau has a gradient");
    assert!(g.to_vec1::<f32>().unwrap()[0].abs() > 0.0);
    assert!(grads.get(data["layer2.0.bias1a"].as_tensor()).is_some());
    drop(data);
    vm.data().lock().unwrap()["tau"]
        .set(&Tensor::new(&[0.25f32], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(model.tau().unwrap(), 0.25);
}

#[test]
fn param_kinds_follow_the_names() {
    let cifar = ModelConfig::CifarResnet(cifar(20, Norm::BatchNorm));
    for (name, kind) in [
        ("conv1.weight", ParamKind::Weight),
        ("bn1.weight", ParamKind::BnAffine),
        ("bn1.running_var", ParamKind::Buffer),
        ("layer2.0.bn2.bias", ParamKind::BnAffine),
        ("layer2.0.bn2.num_batches_tracked", ParamKind::Buffer),
        ("layer1.0.bias1a", ParamKind::ScalarBias),
        ("layer4.0.downsample.1.weight", ParamKind::BnAffine),
        ("layer4.0.downsample.0.weight", ParamKind::Weight),
        ("fc.weight", ParamKind::Weight),
        ("fc.bias", ParamKind::Weight),
        ("tau", ParamKind::Tau),
    ] {
        assert_eq!(cifar.param_kind(name), kind, "{name}");
    }
    let theory = ModelConfig::Theory(Default::default());
    assert_eq!(theory.param_kind("input.weight"), ParamKind::Frozen);
    assert_eq!(theory.param_kind("blocks.3.weight"), ParamKind::Weight);
    assert_eq!(theory.param_kind("output.weight"), ParamKind::Frozen);
    let trained = ModelConfig::Theory(tau_model::TheoryConfig {
        train_b: true,
        ..Default::default()
    });
    assert_eq!(trained.param_kind("output.weight"), ParamKind::Weight);
    // Every spec's kind agrees with param_kind.
    for cfg in [
        cifar,
        ModelConfig::CifarResnet(CifarResNetConfig {
            norm: Norm::None,
            learnable_tau: true,
            ..Default::default()
        }),
        ModelConfig::BottleneckResnet(Default::default()),
        ModelConfig::BottleneckResnet(BottleneckResNetConfig {
            norm: Norm::None,
            ..Default::default()
        }),
        theory,
    ] {
        for spec in cfg.param_specs() {
            assert_eq!(cfg.param_kind(&spec.name), spec.kind, "{}", spec.name);
        }
    }
}

#[test]
fn torchvision_and_companion_names() {
    let names = |cfg: ModelConfig| -> Vec<String> {
        cfg.param_specs().into_iter().map(|s| s.name).collect()
    };
    let bn = names(ModelConfig::BottleneckResnet(Default::default()));
    for n in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
        "fc.bias",
    ] {
        assert!(bn.iter().any(|x| x == n), "{n}");
    }
    assert!(!bn.iter().any(|x| x == "layer1.1.downsample.0.weight"));
    let nobn = names(ModelConfig::CifarResnet(CifarResNetConfig {
        norm: Norm::None,
        learnable_tau: true,
        ..Default::default()
    }));
    for n in [
        "layer1.0.bias1a",
        "layer3.2.bias2b",
        "tau",
        "layer2.0.conv1.weight",
    ] {
        assert!(nobn.iter().any(|x| x == n), "{n}");
    }
    assert!(!nobn.iter().any(|x| x.contains("bn")));
}

#[test]
fn subsample_and_max_pool_match_direct_loops() {
    let x = input((1, 2, 7, 5), 8);
    let s = subsample2(&x).unwrap();
    assert_eq!(s.dims(), [1, 2, 4, 3]);
    for c in 0..2 {
        for i in 0..4 {
            for j in 0..3 {
                let a = s.i((0, c, i, j)).unwrap().to_scalar::<f32>().unwrap();
                let b = x
                    .i((0, c, 2 * i, 2 * j))
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(a, b);
            }
        }
    }
    let x = x.relu().unwrap();
    let p = max_pool_3x3_s2(&x).unwrap();
    assert_eq!(p.dims(), [1, 2, 4, 3]);
    for c in 0..2 {
        for i in 0..4usize {
            for j in 0..3usize {
                let mut m = 0f32; // PyTorch pads with −∞; inputs are ≥ 0 and windows nonempty
                for di in 0..3 {
                    for dj in 0..3 {
                        let (r, q) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                        if (0..7).contains(&r) && (0..5).contains(&q) {
                            let v = x.i((0, c, r as usize, q as usize)).unwrap();
                            m = m.max(v.to_scalar::<f32>().unwrap());
                        }
                    }
                }
                let got = p.i((0, c, i, j)).unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(got, m);
            }
        }
    }
}

#[test]
fn bad_configs_are_errors() {
    for depth in [0, 7, 21, 33] {
        let err = ModelConfig::CifarResnet(cifar(depth, Norm::BatchNorm))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("6n+2"), "{depth}: {err}");
    }
    let err = ModelConfig::BottleneckResnet(BottleneckResNetConfig {
        depth: 34,
        ..Default::default()
    })
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("50, 101 or 152"), "{err}");
    let err = ModelConfig::CifarResnet(CifarResNetConfig {
        in_channels: 0,
        ..Default::default()
    })
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("in_channels"), "{err}");
    let err = ModelConfig::CifarResnet(CifarResNetConfig {
        tau: TauRule::Fixed(-1.0),
        ..Default::default()
    })
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("tau"), "{err}");
    let err =
        serde_json::from_str::<ModelConfig>(r#"{"family": "cifar_resnet", "norm": "layer_norm"}"#)
            .unwrap_err()
            .to_string();
    assert!(err.contains("layer_norm"), "{err}");
    let err = serde_json::from_str::<ModelConfig>(r#"{"family": "vgg"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vgg"), "{err}");
    // A model built from a VarMap missing a tensor names it.
    let cfg = ModelConfig::CifarResnet(cifar(8, Norm::BatchNorm));
    let vm = init_varmap(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    vm.data().lock().unwrap().remove("layer2.0.conv1.weight");
    let vb = VarBuilder::from_tensors(
        vm.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
        &Device::Cpu,
    );
    let err = Model::new(&cfg, vb).unwrap_err().to_string();
    assert!(err.contains("layer2.0.conv1.weight"), "{err}");
}

/// The whole bottleneck ResNet-50 in `f32` (tau-model's CPU convolution and fused ops:
/// max pool, BatchNorm, the fused block ends) against the same weights in `f64` (candle's
/// own ops throughout), in training mode: logits, and the gradient of every parameter.
/// Two 3×64×64 images: the last stage is 2×2, so its BatchNorms see eight values per
/// channel (with two the normalization is close to discontinuous). The inputs are
/// continuous, so the max pool has no ties (where the fused op routes the gradient as
/// PyTorch does and the composed one splits it).
///
/// Without normalization the weights and the input are made nonnegative, so that every
/// pre-activation is positive and no ReLU sits at its kink: with the He-initialized
/// weights as drawn, some pre-activation lies within f32 rounding of zero for most
/// inputs, and its ReLU flips between f32 and f64. Measured with inputs 1, 5 and 7: the
/// largest relative gradient error was 2e-5 to 0.17 depending on the input, for candle's
/// own f32 convolution as for this crate's kernels, while the median stayed near 1e-6.
/// With no kink in reach, every gradient is a smooth function of the rounded values: the
/// largest relative error was 7.1e-7 for inputs 1, 5 and 7 under every kernel set.
#[test]
fn bottleneck_f32_fused_matches_f64_composed() {
    for norm in [Norm::BatchNorm, Norm::None] {
        let cfg = ModelConfig::BottleneckResnet(BottleneckResNetConfig {
            norm,
            num_classes: 5,
            learnable_tau: true,
            ..Default::default()
        });
        let (m32, vm32) = build(&cfg, 3);
        if norm == Norm::None {
            for (name, v) in vm32.data().lock().unwrap().iter() {
                if name.ends_with("weight") {
                    // |w| / sqrt(fan-in): each layer about preserves the activations' scale.
                    let t = v.as_tensor();
                    let fan_in = t.elem_count() / t.dim(0).unwrap();
                    let w = (t.abs().unwrap() / (fan_in as f64).sqrt()).unwrap();
                    v.set(&w).unwrap();
                }
            }
        }
        let vm64 = VarMap::new();
        {
            let src = vm32.data().lock().unwrap();
            let mut dst = vm64.data().lock().unwrap();
            for (name, v) in src.iter() {
                let t = v.as_tensor().to_dtype(DType::F64).unwrap();
                dst.insert(name.clone(), candle::Var::from_tensor(&t).unwrap());
            }
        }
        let m64 = Model::new(
            &cfg,
            VarBuilder::from_varmap(&vm64, DType::F64, &Device::Cpu),
        )
        .unwrap();
        let x = match norm {
            Norm::BatchNorm => input((2, 3, 64, 64), 5),
            Norm::None => input((2, 3, 64, 64), 5).abs().unwrap(),
        };
        let r = input((2, 5, 1, 1), 9).reshape((2, 5)).unwrap();
        let run = |m: &Model, vm: &VarMap, dtype: DType| {
            let y = m.forward_t(&x.to_dtype(dtype).unwrap(), true).unwrap();
            let loss = (&y * &r.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            let mut names: Vec<String> = data.keys().cloned().collect();
            names.sort();
            let grads: Vec<(String, Vec<f64>)> = names
                .iter()
                .filter_map(|n| {
                    let t = g.get(data[n].as_tensor())?;
                    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    Some((n.clone(), t.to_vec1::<f64>().unwrap()))
                })
                .collect();
            let y = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (y.to_vec1::<f64>().unwrap(), grads)
        };
        let (y64, g64) = run(&m64, &vm64, DType::F64);
        // Without normalization every gradient agrees within 1e-5 of its norm (see above).
        // With BatchNorm in training mode on two images the f32 rounding is amplified layer
        // by layer on the way back (the relative error grows from 1e-5 at layer4 to 5e-3 at
        // the stem, the same for every kind of layer), so the bound is looser there; a
        // wiring error is off by O(1).
        let tol = match norm {
            Norm::BatchNorm => 2e-2,
            Norm::None => 1e-5,
        };
        let close = |a: &[f64], b: &[f64]| {
            let norm = b.iter().map(|v| v * v).sum::<f64>().sqrt();
            let diff = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f64>();
            diff.sqrt() <= tol * norm + 1e-7
        };
        // Under every kernel set this CPU runs (the AVX-512 one runs what an AVX2 CPU runs).
        for set in KernelSet::available() {
            let (y32, g32) = with_kernels(set, || run(&m32, &vm32, DType::F32));
            assert!(
                close(&y32, &y64),
                "{norm:?} {set}: logits {y32:?} vs {y64:?}"
            );
            assert_eq!(g32.len(), g64.len(), "{norm:?}");
            assert!(g32.len() > 100, "{norm:?}: {} gradients", g32.len());
            for ((name, a), (_, b)) in g32.iter().zip(&g64) {
                assert!(close(a, b), "{norm:?} {set}: gradient of {name}");
            }
        }
    }
}

/// The hooked forward pass is the model's forward pass: the same logits, the stem's
/// output first (h_0, the first block's input), then one output per block of the residual
/// chain, the last of which the head turns into the logits.
#[test]
fn forward_hooked_sees_the_stem_and_every_block() {
    for (cfg, image, chain, stem) in [
        (
            ModelConfig::CifarResnet(cifar(14, Norm::BatchNorm)),
            8,
            6,
            [16, 8, 8],
        ),
        (
            ModelConfig::CifarResnet(cifar(8, Norm::None)),
            8,
            3,
            [16, 8, 8],
        ),
        (
            ModelConfig::BottleneckResnet(BottleneckResNetConfig {
                num_classes: 10,
                ..Default::default()
            }),
            32,
            16,
            [64, 8, 8],
        ),
    ] {
        let (model, _vm) = build(&cfg, 3);
        let c = cfg.in_channels().unwrap();
        let xs = input((2, c, image, image), 3);
        let mut seen: Vec<(usize, Tensor)> = Vec::new();
        let logits = model
            .forward_hooked(&xs, true, |l, h| {
                seen.push((l, h.clone()));
                Ok(())
            })
            .unwrap();
        let ls: Vec<usize> = seen.iter().map(|(l, _)| *l).collect();
        assert_eq!(ls, (0..=chain).collect::<Vec<_>>(), "{}", cfg.family());
        assert_eq!(chain, cfg.stage_blocks().iter().sum::<usize>());
        assert_eq!(seen[0].1.dims()[1..], stem);
        let plain = model.forward_t(&xs, true).unwrap();
        assert_eq!(
            logits.to_vec2::<f32>().unwrap(),
            plain.to_vec2::<f32>().unwrap()
        );
        let (stem_out, head_out) = match &model {
            Model::CifarResNet(m) => (m.stem(&xs, true).unwrap(), m.head(&seen[chain].1).unwrap()),
            Model::BottleneckResNet(m) => {
                (m.stem(&xs, true).unwrap(), m.head(&seen[chain].1).unwrap())
            }
            Model::Theory(_) => unreachable!(),
        };
        assert_eq!(
            stem_out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            seen[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            head_out.to_vec2::<f32>().unwrap(),
            plain.to_vec2::<f32>().unwrap()
        );
    }
    // A hook's error stops the pass and comes back.
    let cfg = ModelConfig::CifarResnet(cifar(8, Norm::None));
    let (model, _vm) = build(&cfg, 3);
    let err = model
        .forward_hooked(&input((1, 3, 8, 8), 3), false, |l, _| {
            if l == 2 {
                candle::bail!("stop at 2")
            }
            Ok(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("stop at 2"), "{err}");
}

/// `Model::inference`: the trained model's evaluation outputs bit for bit, without a graph
/// on the fused kernels (every family, with and without BatchNorm), sharing the weights'
/// storage (an update of a weight shows in the next forward pass).
#[test]
fn the_inference_model_has_the_same_outputs_and_no_graph() {
    let cases = [
        (
            r#"{"family": "cifar_resnet", "depth": 8}"#,
            vec![2, 3, 8, 8],
        ),
        (
            r#"{"family": "cifar_resnet", "depth": 8, "norm": "none"}"#,
            vec![2, 3, 8, 8],
        ),
        (
            r#"{"family": "bottleneck_resnet", "depth": 50, "num_classes": 5}"#,
            vec![2, 3, 32, 32],
        ),
        (
            r#"{"family": "theory", "input_dim": 5, "width": 16, "depth": 9}"#,
            vec![2, 5],
        ),
    ];
    for (json, input) in cases {
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        let dev = Device::Cpu;
        let varmap = init_varmap(&cfg, 3, DType::F32, &dev).unwrap();
        let xs = Tensor::randn(0f32, 1., input, &dev).unwrap();
        with_kernels(KernelSet::detected(), || {
            let model = Model::from_varmap(&cfg, &varmap, &dev).unwrap();
            let view = Model::inference(&cfg, &varmap, &dev).unwrap();
            let want = model.forward_t(&xs, false).unwrap();
            let got = view.forward_t(&xs, false).unwrap();
            let diff = (&want - &got).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{json}");
            assert!(want.track_op(), "{json}: the trained model records a graph");
            assert!(!got.track_op(), "{json}: the inference model records one");
            // A weight changed in place (as the optimizer does) shows in the view.
            // The first convolution or the first block's W (never zero at initialization).
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            let name = names
                .into_iter()
                .find(|n| n.ends_with(".weight") && !n.contains("bn"))
                .unwrap()
                .clone();
            let var = &data[&name];
            var.set(&(var.as_tensor() * 2.0).unwrap()).unwrap();
            drop(data);
            let again = view.forward_t(&xs, false).unwrap();
            let moved = (&got - &again).unwrap().abs().unwrap().max_all().unwrap();
            assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{json}: {name}");
        });
    }
}
