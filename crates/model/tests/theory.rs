//! The theory network against PAPER.md's table, a float64 computation by hand, and
//! candle's autograd.

use std::collections::HashMap;

use candle::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tau_model::{Model, ModelConfig, TauRule, TheoryConfig, TheoryNet, init_varmap};

/// `n` Gaussian inputs of dimension `p` scaled to unit norm.
fn unit_inputs(n: usize, p: usize, seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n * p);
    for _ in 0..n {
        let row: Vec<f64> = (0..p).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.extend(row.iter().map(|x| x / norm));
    }
    Tensor::from_vec(v, (n, p), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn theory(cfg: TheoryConfig, seed: u64, dtype: DType) -> TheoryNet {
    let mcfg = ModelConfig::Theory(cfg);
    let vm = init_varmap(&mcfg, seed, dtype, &Device::Cpu).unwrap();
    let model = Model::new(&mcfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    model.as_theory().unwrap().clone()
}

fn paper_net(tau: &str) -> (TheoryNet, Tensor) {
    let cfg = TheoryConfig {
        input_dim: 32,
        width: 256,
        depth: 256,
        tau: tau.parse().unwrap(),
        ..Default::default()
    };
    (
        theory(cfg, 0, DType::F32),
        unit_inputs(64, 32, 1, DType::F32),
    )
}

/// PAPER.md's table, L = 256, width 256, 64 unit-norm inputs: mean ‖h_L‖/‖h_0‖ is 1.69
/// for τ = 1/√L, 1.2e3 for τ = L^-1/4 and 1.6e31 (beyond f32) for τ = 1.
#[test]
fn norm_growth_matches_the_paper_table_at_depth_256() {
    let (net, xs) = paper_net("1/sqrt(L)");
    let trace = net.forward_traced(&xs).unwrap();
    assert_eq!(trace.depth(), 256);
    let per_layer = trace.mean_log_ratio_per_layer();
    assert_eq!(per_layer.len(), 257);
    assert_eq!(per_layer[0], 0.0);
    assert!((per_layer[256] - trace.mean_log_ratio().unwrap()).abs() < 1e-12);
    assert_eq!(trace.n_inputs(), 64);
    let r = trace.mean_ratio().unwrap();
    eprintln!("L = 256, tau = 1/sqrt(L): mean ratio {r}");
    assert!((1.2..=2.2).contains(&r), "1/sqrt(L): mean ratio {r}");

    let (net, xs) = paper_net("L^-0.25");
    let r = net.forward_traced(&xs).unwrap().mean_ratio().unwrap();
    eprintln!("L = 256, tau = L^-1/4: mean ratio {r}");
    assert!(r > 100.0, "L^-1/4: mean ratio {r}");

    let (net, xs) = paper_net("1");
    let trace = net.forward_traced(&xs).unwrap();
    let log_r = trace.log_mean_ratio().unwrap();
    eprintln!("L = 256, tau = 1: ln mean ratio {log_r}");
    assert!(
        log_r.is_finite() && log_r > 50.0,
        "tau = 1: log mean ratio {log_r}"
    );
    assert!(trace.overflows(DType::F32) || log_r < 88.0);
    assert!(trace.log_norms.iter().flatten().all(|v| !v.is_nan()));
}

/// τ = 1 at L = 1024 (ratio ≈ 1e123 in the paper's table) stays finite in f32.
#[test]
fn tau_one_at_depth_1024_is_finite_in_f32() {
    let cfg = TheoryConfig {
        input_dim: 16,
        width: 64,
        depth: 1024,
        tau: TauRule::Fixed(1.0),
        ..Default::default()
    };
    let net = theory(cfg, 3, DType::F32);
    let xs = unit_inputs(8, 16, 4, DType::F32);
    let trace = net.forward_traced(&xs).unwrap();
    let log_r = trace.log_mean_ratio().unwrap();
    assert!(log_r.is_finite() && log_r > 88.0, "log ratio {log_r}");
    assert!(trace.overflows(DType::F32));
    let ys = Tensor::zeros((8, 1), DType::F32, &Device::Cpu).unwrap();
    let g = net.layer_grad_log_norms(&xs, &ys).unwrap();
    assert_eq!(g.len(), 1024);
    assert!(g.iter().all(|v| v.is_finite()), "{:?}", &g[..4]);
    // The gradient of the first block is the largest: it passes through every block.
    assert!(g[0] > 88.0, "first-layer log gradient norm {}", g[0]);
}

/// A 2-block network with hand-picked weights against plain f64 arithmetic.
#[test]
fn forward_matches_a_hand_computation_in_f64() {
    let tau = 0.5;
    let a = [[1.0, -0.5], [0.25, 2.0], [-1.0, 0.5]]; // m=3, p=2
    let w1 = [[0.1, -0.2, 0.3], [0.0, 0.5, -0.4], [-0.6, 0.2, 0.1]];
    let w2 = [[0.3, 0.1, -0.2], [-0.5, 0.4, 0.2], [0.2, -0.3, 0.6]];
    let b = [[1.0, -1.0, 0.5]]; // d=1
    let xs = [[0.6, 0.8], [-0.8, 0.6]];

    let relu = |v: f64| v.max(0.0);
    let matvec = |m: &[[f64; 3]; 3], h: &[f64; 3]| {
        let mut o = [0.0; 3];
        for (i, row) in m.iter().enumerate() {
            o[i] = row.iter().zip(h).map(|(a, b)| a * b).sum();
        }
        o
    };
    let mut want_y = vec![];
    let mut want_logs: [Vec<f64>; 3] = Default::default();
    for x in &xs {
        let mut h = [0.0; 3];
        for i in 0..3 {
            h[i] = relu(a[i][0] * x[0] + a[i][1] * x[1]);
        }
        want_logs[0].push(h.iter().map(|v| v * v).sum::<f64>().sqrt().ln());
        for (l, w) in [&w1, &w2].into_iter().enumerate() {
            let wh = matvec(w, &h);
            for i in 0..3 {
                h[i] = relu(h[i] + tau * wh[i]);
            }
            want_logs[l + 1].push(h.iter().map(|v| v * v).sum::<f64>().sqrt().ln());
        }
        want_y.push(b[0].iter().zip(&h).map(|(a, b)| a * b).sum::<f64>());
    }

    let dev = Device::Cpu;
    let t = |v: Vec<f64>, s: (usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
    let mut ts = HashMap::new();
    ts.insert("input.weight".to_string(), t(a.concat(), (3, 2)));
    ts.insert("blocks.0.weight".to_string(), t(w1.concat(), (3, 3)));
    ts.insert("blocks.1.weight".to_string(), t(w2.concat(), (3, 3)));
    ts.insert("output.weight".to_string(), t(b.concat(), (1, 3)));
    let cfg = TheoryConfig {
        input_dim: 2,
        width: 3,
        depth: 2,
        output_dim: 1,
        tau: TauRule::Fixed(tau),
        ..Default::default()
    };
    let net = TheoryNet::new(&cfg, VarBuilder::from_tensors(ts, DType::F64, &dev)).unwrap();
    let x = t(xs.concat(), (2, 2));
    let y = net
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (got, want) in y.iter().zip(&want_y) {
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
    let trace = net.forward_traced(&x).unwrap();
    for (l, want_row) in want_logs.iter().enumerate() {
        for (i, want) in want_row.iter().enumerate() {
            let got = trace.log_norms[l][i];
            assert!(
                (got - want).abs() < 1e-12,
                "layer {l} input {i}: {got} vs {want}"
            );
        }
    }
    assert_eq!(net.tau(), tau);
    assert_eq!(net.weights().len(), 2);
}

/// The rescaled hand-written backward pass against candle's autograd, in f64.
#[test]
fn layer_grad_norms_match_autograd() {
    let cfg = TheoryConfig {
        input_dim: 6,
        width: 10,
        depth: 4,
        output_dim: 3,
        tau: TauRule::Fixed(0.7),
        ..Default::default()
    };
    let mcfg = ModelConfig::Theory(cfg.clone());
    let dev = Device::Cpu;
    for n in [5, 16] {
        // n = 5 exercises the Gram path (n ≤ m), n = 16 the direct sum.
        let vm = init_varmap(&mcfg, 11, DType::F64, &dev).unwrap();
        let net = TheoryNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
        let xs = unit_inputs(n, 6, 12, DType::F64);
        let ys = (unit_inputs(n, 3, 13, DType::F64) * 3.0).unwrap();
        let ours = net.layer_grad_norms(&xs, &ys).unwrap();

        let loss = ((net.forward(&xs).unwrap() - &ys)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            * 0.5)
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        for (l, got) in ours.iter().enumerate() {
            let var: &Var = &data[&format!("blocks.{l}.weight")];
            let g = grads.get(var.as_tensor()).unwrap();
            let want = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt();
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "n={n} layer {l}: {got} vs {want}"
            );
        }
    }
}

/// Dead inputs (h_0 = 0) are reported, never NaN.
#[test]
fn zero_input_is_reported_not_nan() {
    let cfg = TheoryConfig {
        input_dim: 4,
        width: 8,
        depth: 3,
        ..Default::default()
    };
    let net = theory(cfg, 1, DType::F32);
    let xs = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let trace = net.forward_traced(&xs).unwrap();
    assert_eq!(trace.collapsed_at(0), Some(0));
    assert_eq!(trace.log_ratio(0), None);
    assert_eq!(trace.mean_ratio(), None);
    assert!(
        trace
            .log_norms
            .iter()
            .flatten()
            .all(|v| *v == f64::NEG_INFINITY)
    );
    let ys = Tensor::ones((2, 1), DType::F32, &Device::Cpu).unwrap();
    let g = net.layer_grad_norms(&xs, &ys).unwrap();
    assert!(g.iter().all(|v| *v == 0.0), "{g:?}");
}

#[test]
fn wrong_input_shape_is_an_error() {
    let net = theory(
        TheoryConfig {
            input_dim: 4,
            width: 8,
            depth: 2,
            ..Default::default()
        },
        1,
        DType::F32,
    );
    let xs = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward(&xs).unwrap_err().to_string();
    assert!(err.contains("5 features"), "{err}");
    let xs = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let ys = Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(net.layer_grad_norms(&xs, &ys).is_err());
}

#[test]
fn toml_style_model_table_and_bad_settings() {
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"family": "theory", "depth": 16, "width": 512, "tau": "1/sqrt(L)"}"#,
    )
    .unwrap();
    assert_eq!(cfg.n_blocks(), 16);
    assert!((cfg.tau_init() - 0.25).abs() < 1e-15);
    cfg.validate().unwrap();
    let err = serde_json::from_str::<ModelConfig>(r#"{"family": "theory", "widht": 5}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("widht"), "{err}");
    let bad = ModelConfig::Theory(TheoryConfig {
        width: 0,
        ..Default::default()
    });
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("width"), "{err}");
    let err = init_varmap(&bad, 0, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("width"), "{err}");
    let bad = ModelConfig::Theory(TheoryConfig {
        w_var: f64::NAN,
        ..Default::default()
    });
    assert!(bad.validate().unwrap_err().to_string().contains("w_var"));
    let huge = ModelConfig::Theory(TheoryConfig {
        width: 1 << 20,
        depth: 1 << 20,
        ..Default::default()
    });
    assert!(huge.validate().unwrap_err().to_string().contains("maximum"));
    // τ that resolves to a non-finite value.
    let bad = ModelConfig::Theory(TheoryConfig {
        depth: 100_000,
        width: 4,
        tau: "L^400".parse().unwrap(),
        ..Default::default()
    });
    assert!(bad.validate().unwrap_err().to_string().contains("tau"));
}

/// The `[model]` table of a run config, as TOML.
#[test]
fn model_table_from_toml() {
    let cfg: ModelConfig =
        toml::from_str("family = \"theory\"\ndepth = 16\nwidth = 512\ntau = \"1/sqrt(L)\"\n")
            .unwrap();
    let ModelConfig::Theory(t) = &cfg else {
        panic!("not a theory config: {cfg:?}")
    };
    assert_eq!((t.depth, t.width, t.input_dim, t.a_var), (16, 512, 32, 2.0));
    let cfg: ModelConfig = toml::from_str(
        "family = \"cifar_resnet\"\ndepth = 110\nnorm = \"none\"\ntau = 0.136\nlearnable_tau = true\n",
    )
    .unwrap();
    assert_eq!(cfg.n_blocks(), 54);
    assert_eq!(cfg.tau_init(), 0.136);
    let err = toml::from_str::<ModelConfig>("family = \"theory\"\ndepht = 16\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("depht"), "{err}");
    let err = toml::from_str::<ModelConfig>("family = \"theory\"\ntau = \"1/sqrt(K)\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("accepted forms"), "{err}");
}

/// `loss_backward` (the blocks' backward written out) gives autograd's gradients: bit for
/// bit in f32 on the fused CPU path for every W_l, A and B (A and B trained here), and
/// within rounding in f64 (the composed fallback), with the squared and a cross-entropy-like
/// loss; the output and the loss are the forward pass's.
#[test]
fn loss_backward_equals_autograd() {
    for dtype in [DType::F32, DType::F64] {
        let cfg = TheoryConfig {
            input_dim: 5,
            width: 24,
            depth: 6,
            output_dim: 3,
            train_a: true,
            train_b: true,
            ..TheoryConfig::default()
        };
        let net = theory(cfg, 3, dtype);
        let xs = unit_inputs(7, 5, 4, dtype);
        let ys = unit_inputs(7, 3, 5, dtype);
        type Loss<'a> = &'a dyn Fn(&Tensor) -> candle::Result<Tensor>;
        let losses: [Loss; 2] = [
            &|p: &Tensor| (p - &ys)?.sqr()?.sum_all()?.affine(0.5 / 7.0, 0.0),
            &|p: &Tensor| candle_nn::ops::log_softmax(p, 1)?.sum_all()?.neg(),
        ];
        for (k, loss) in losses.iter().enumerate() {
            let (preds, value, grads) = net.loss_backward(&xs, loss).unwrap();
            let want_preds = net.forward(&xs).unwrap();
            let want = loss(&want_preds).unwrap();
            let auto = want.backward().unwrap();
            let flat = |t: &Tensor| -> Vec<f64> {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(
                flat(&preds),
                flat(&want_preds),
                "{dtype:?} loss {k}: output"
            );
            assert_eq!(flat(&value), flat(&want), "{dtype:?} loss {k}: loss");
            let tensors: Vec<&Tensor> = net
                .weights()
                .iter()
                .chain([net.input_weight(), net.output_weight()])
                .collect();
            for (i, t) in tensors.iter().enumerate() {
                let (got, exp) = (flat(grads.get(t).unwrap()), flat(auto.get(t).unwrap()));
                if dtype == DType::F32 {
                    assert_eq!(got, exp, "f32 loss {k}: gradient {i}");
                } else {
                    let scale = exp.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let err = got
                        .iter()
                        .zip(&exp)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-12 * scale,
                        "f64 loss {k}: gradient {i}: {err} of {scale}"
                    );
                }
            }
        }
    }
}
