//! The fused ops against candle's composed ops computed in `f64` (candle-nn's `BatchNorm`
//! for the BatchNorm): outputs, the gradients of every input, and BatchNorm's running
//! statistics, with and without ReLU.

use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batch_norm_t;
use crate::conv::tests::{rel_err, to_f64_vec};
use crate::kernel_set::{KernelSet, with_kernels};

fn random(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// A BatchNorm over `c` channels with the given parameters, in `dtype`; returns it and the
/// γ, β variables.
fn make_bn(
    gamma: &Tensor,
    beta: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    dtype: DType,
) -> (BatchNorm, Var, Var) {
    let c = gamma.elem_count();
    let g = Var::from_tensor(&gamma.to_dtype(dtype).unwrap()).unwrap();
    let b = Var::from_tensor(&beta.to_dtype(dtype).unwrap()).unwrap();
    let bn = BatchNorm::new_with_momentum(
        c,
        rm.to_dtype(dtype).unwrap(),
        rv.to_dtype(dtype).unwrap(),
        g.as_tensor().clone(),
        b.as_tensor().clone(),
        1e-5,
        0.1,
    )
    .unwrap();
    (bn, g, b)
}

fn check(dims: [usize; 4], relu: bool, offset: f32, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = dims[1];
    let x = (random(&mut rng, &dims, -2.0, 2.0) + offset as f64).unwrap();
    let r = random(&mut rng, &dims, -1.0, 1.0);
    let gamma = random(&mut rng, &[c], 0.5, 1.5);
    let beta = random(&mut rng, &[c], -0.5, 0.5);
    let rm = random(&mut rng, &[c], -0.1, 0.1);
    let rv = random(&mut rng, &[c], 0.9, 1.1);

    // Fused, f32.
    let (bn, g, b) = make_bn(&gamma, &beta, &rm, &rv, DType::F32);
    let xv = Var::from_tensor(&x).unwrap();
    let y = batch_norm_t(&bn, xv.as_tensor(), true, relu).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

    // Reference: candle-nn's composed ops in f64.
    let (bn64, g64, b64) = make_bn(&gamma, &beta, &rm, &rv, DType::F64);
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let y64 = bn64.forward_t(x64.as_tensor(), true).unwrap();
    let y64 = if relu { y64.relu().unwrap() } else { y64 };
    let r64 = r.to_dtype(DType::F64).unwrap();
    let grads64 = (&y64 * &r64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let tol = 1e-5;
    let e = rel_err(&y, &y64);
    assert!(e < tol, "{dims:?} relu={relu}: output rel err {e}");
    for (name, a, b) in [
        ("x", xv.as_tensor(), x64.as_tensor()),
        ("gamma", g.as_tensor(), g64.as_tensor()),
        ("beta", b.as_tensor(), b64.as_tensor()),
    ] {
        let e = rel_err(grads.get(a).unwrap(), grads64.get(b).unwrap());
        assert!(e < tol, "{dims:?} relu={relu}: d{name} rel err {e}");
    }
    let e = rel_err(bn.running_mean(), bn64.running_mean());
    assert!(e < 1e-6, "{dims:?}: running mean rel err {e}");
    let e = rel_err(bn.running_var(), bn64.running_var());
    assert!(e < 1e-6, "{dims:?}: running var rel err {e}");
    // The running statistics really moved (momentum 0.1 towards the batch's).
    assert!(rel_err(bn.running_var(), &rv) > 1e-3);
}

#[test]
fn fused_batch_norm_matches_candle_nn() {
    // Odd sizes (remainders of the 16-lane loops), a single image, a 1×1 map.
    check([3, 5, 7, 9], false, 0.0, 1);
    check([3, 5, 7, 9], true, 0.0, 2);
    check([1, 4, 6, 6], true, 0.3, 3);
    check([9, 3, 1, 1], false, 0.0, 4);
    check([2, 16, 8, 8], true, 0.0, 5);
}

#[test]
fn fused_batch_norm_with_a_large_mean() {
    // Values far from zero: the two-pass variance stays accurate.
    check([4, 3, 8, 8], false, 100.0, 6);
}

#[test]
fn eval_mode_and_off_switch_use_candle_nn() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = random(&mut rng, &[2, 3, 4, 4], -1.0, 1.0);
    let gamma = random(&mut rng, &[3], 0.5, 1.5);
    let beta = random(&mut rng, &[3], -0.5, 0.5);
    let rm = random(&mut rng, &[3], -0.1, 0.1);
    let rv = random(&mut rng, &[3], 0.9, 1.1);
    let (bn, _, _) = make_bn(&gamma, &beta, &rm, &rv, DType::F32);
    let y = batch_norm_t(&bn, &x, false, true).unwrap();
    let want = bn.forward_t(&x, false).unwrap().relu().unwrap();
    assert_eq!(rel_err(&y, &want), 0.0);
    // Evaluation leaves the running statistics alone.
    assert_eq!(rel_err(bn.running_mean(), &rm), 0.0);
}

#[test]
fn wrong_channel_count_is_an_error() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = random(&mut rng, &[2, 4, 3, 3], -1.0, 1.0);
    let p = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let (bn, _, _) = make_bn(&p, &p, &p, &p, DType::F32);
    assert!(batch_norm_t(&bn, &x, true, false).is_err());
}

/// How an `f64` reference applies a one-element parameter θ: as a full-shape copy (one
/// variable per element) whose gradient holds the terms of θ's gradient, dθ = Σᵢ ∂ℓ/∂θᵢ.
/// Such a gradient sums terms of both signs that can cancel to near zero, so its error is
/// measured against Σᵢ |∂ℓ/∂θᵢ|, the size of what was summed (as for dγ, dβ and dτ of the
/// fused BatchNorm below), not against its own possibly tiny value.
#[derive(Default)]
struct Terms {
    copies: std::cell::RefCell<Vec<(usize, Var)>>,
}

impl Terms {
    /// Input `i` of `t` (one element) as a full-shape copy shaped like `like`.
    fn at(&self, t: &[&Tensor], i: usize, like: &Tensor) -> Tensor {
        assert_eq!(t[i].elem_count(), 1, "Terms::at on input {i}, not a scalar");
        let full = t[i]
            .flatten_all()
            .unwrap()
            .broadcast_as(like.shape())
            .unwrap()
            .contiguous()
            .unwrap();
        let var = Var::from_tensor(&full).unwrap();
        self.copies.borrow_mut().push((i, var.clone()));
        var.as_tensor().clone()
    }
}

/// A reference result: the output of `reference` on `inputs` in `f64`, the weights `r` of
/// the loss Σ r ⊙ y, and per input the gradient of that loss with the scale its error is
/// measured against: the largest magnitude of the gradient, or for a one-element input
/// that the reference applies through [`Terms::at`], the sum of its terms' magnitudes.
struct Reference {
    y: Tensor,
    r: Tensor,
    grads: Vec<(Vec<f64>, f64)>,
}

impl Reference {
    fn new<G>(inputs: &[Tensor], reference: G) -> Self
    where
        G: Fn(&[&Tensor], &Terms) -> Tensor,
    {
        let vars64: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
            .collect();
        let terms = Terms::default();
        let y = reference(
            &vars64.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(),
            &terms,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let r = random(&mut rng, y.dims(), -1.0, 1.0);
        let grads64 = (&y * &r.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let copies = terms.copies.borrow();
        let grads = vars64
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let direct = grads64.get(v.as_tensor()).map(to_f64_vec);
                let parts: Vec<Vec<f64>> = copies
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, c)| to_f64_vec(grads64.get(c.as_tensor()).unwrap()))
                    .collect();
                if parts.is_empty() {
                    let g = direct.unwrap_or_else(|| vec![0.0; v.elem_count()]);
                    let scale = g.iter().fold(f64::MIN_POSITIVE, |m, x| m.max(x.abs()));
                    (g, scale)
                } else {
                    let direct = direct.map_or(0.0, |g| g[0]);
                    let sum = parts.iter().flatten().sum::<f64>() + direct;
                    let scale = parts.iter().flatten().map(|x| x.abs()).sum::<f64>() + direct.abs();
                    (vec![sum], scale.max(f64::MIN_POSITIVE))
                }
            })
            .collect();
        Reference { y, r, grads }
    }

    /// Checks `y` (computed from `vars`, the first inputs) and the gradients of Σ r ⊙ y
    /// with respect to `vars` within 1e-5 of the reference.
    fn check(&self, y: &Tensor, vars: &[Var], what: &str) {
        let e = rel_err(y, &self.y);
        assert!(e < 1e-5, "{what}: output rel err {e}");
        let grads = (y * &self.r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, (v, (g64, scale))) in vars.iter().zip(&self.grads).enumerate() {
            let g = grads.get(v.as_tensor()).unwrap();
            assert_eq!(g.dims(), v.dims(), "{what}: gradient {i} shape");
            let g = to_f64_vec(g);
            assert_eq!(g.len(), g64.len(), "{what}: gradient {i} length");
            let diff = g
                .iter()
                .zip(g64)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            let e = diff / scale;
            assert!(e < 1e-5, "{what}: gradient {i} rel err {e}");
        }
    }
}

/// Output and gradients of `f` (fused, f32) and `reference` (composed candle ops, f64) of
/// Σ r ⊙ f(inputs), within 1e-5 relative (see [`Reference`]), under every kernel set this
/// CPU runs.
fn compare<F, G>(inputs: &[Tensor], f: F, reference: G, what: &str)
where
    F: Fn(&[&Tensor]) -> Tensor,
    G: Fn(&[&Tensor], &Terms) -> Tensor,
{
    let want = Reference::new(inputs, reference);
    for set in KernelSet::available() {
        with_kernels(set, || {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let y = f(&vars.iter().map(|v| v.as_tensor()).collect::<Vec<_>>());
            want.check(&y, &vars, &format!("{what} ({set} kernels)"));
        });
    }
}

#[test]
fn add_scalar_matches_composed_ops() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // Sizes around the parallel chunk (2^14) and odd ones.
    for dims in [[2, 3, 5, 7], [4, 16, 16, 17], [1, 1, 1, 1]] {
        let x = random(&mut rng, &dims, -1.0, 1.0);
        let b = random(&mut rng, &[1], -0.3, 0.3);
        for relu in [false, true] {
            compare(
                &[x.clone(), b.clone()],
                |t| super::add_scalar(t[0], t[1], relu).unwrap(),
                |t, s| {
                    let y = t[0].broadcast_add(&s.at(t, 1, t[0])).unwrap();
                    if relu { y.relu().unwrap() } else { y }
                },
                &format!("add_scalar {dims:?} relu={relu}"),
            );
        }
    }
    let x = random(&mut rng, &[2, 2], -1.0, 1.0);
    assert!(super::add_scalar(&x, &x, false).is_err());
}

#[test]
fn residual_relu_matches_composed_ops() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for dims in [[2, 3, 5, 7], [3, 16, 16, 17]] {
        let x = random(&mut rng, &dims, -1.0, 1.0);
        let s = random(&mut rng, &dims, -1.0, 1.0);
        // τ as a scalar (rank 0) tensor and as a one-element vector.
        let tau0 = Tensor::new(0.7f32, &Device::Cpu).unwrap();
        let tau1 = random(&mut rng, &[1], 0.2, 1.0);
        let b = random(&mut rng, &[1], -0.3, 0.3);
        for tau in [tau0, tau1] {
            compare(
                &[x.clone(), tau.clone(), s.clone()],
                |t| super::residual_relu(t[0], t[1], None, t[2]).unwrap(),
                |t, s| {
                    (t[0].broadcast_mul(&s.at(t, 1, t[0])).unwrap() + t[2])
                        .unwrap()
                        .relu()
                        .unwrap()
                },
                &format!("residual_relu {dims:?}"),
            );
            compare(
                &[x.clone(), tau.clone(), s.clone(), b.clone()],
                |t| super::residual_relu(t[0], t[1], Some(t[3]), t[2]).unwrap(),
                |t, s| {
                    let br = t[0].broadcast_add(&s.at(t, 3, t[0])).unwrap();
                    (br.broadcast_mul(&s.at(t, 1, &br)).unwrap() + t[2])
                        .unwrap()
                        .relu()
                        .unwrap()
                },
                &format!("residual_relu with bias {dims:?}"),
            );
        }
    }
    let x = random(&mut rng, &[2, 3], -1.0, 1.0);
    let y = random(&mut rng, &[3, 2], -1.0, 1.0);
    let tau = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(super::residual_relu(&x, &tau, None, &y).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    #[test]
    fn bias_relu_bias_matches_composed_ops(
        seed in proptest::prelude::any::<u64>(),
        n in 1usize..4,
        c in 1usize..6,
        h in 1usize..12,
        w in 1usize..12,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dims = [n, c, h, w];
        let x = random(&mut rng, &dims, -1.0, 1.0);
        let b = random(&mut rng, &[1], -0.5, 0.5);
        let c2 = random(&mut rng, &[1], -0.5, 0.5);
        compare(
            &[x, b, c2],
            |t| super::bias_relu_bias(t[0], t[1], t[2]).unwrap(),
            |t, s| {
                let h = t[0].broadcast_add(&s.at(t, 1, t[0])).unwrap().relu().unwrap();
                h.broadcast_add(&s.at(t, 2, &h)).unwrap()
            },
            &format!("bias_relu_bias {dims:?}"),
        );
    }
}

#[test]
fn bias_relu_bias_across_parallel_chunks_and_bitwise() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // Larger than the parallel chunk (2^14), not a multiple of it.
    let x = random(&mut rng, &[3, 16, 19, 21], -1.0, 1.0);
    let b = random(&mut rng, &[1], -0.3, 0.3);
    let c = random(&mut rng, &[1], -0.3, 0.3);
    compare(
        &[x.clone(), b.clone(), c.clone()],
        |t| super::bias_relu_bias(t[0], t[1], t[2]).unwrap(),
        |t, s| {
            let h = t[0]
                .broadcast_add(&s.at(t, 1, t[0]))
                .unwrap()
                .relu()
                .unwrap();
            h.broadcast_add(&s.at(t, 2, &h)).unwrap()
        },
        "bias_relu_bias large",
    );
    // The same f32 numbers as the two add_scalar ops it replaces.
    let fused = super::bias_relu_bias(&x, &b, &c).unwrap();
    let composed = super::add_scalar(&super::add_scalar(&x, &b, true).unwrap(), &c, false).unwrap();
    assert_eq!(rel_err(&fused, &composed), 0.0);
    assert!(super::bias_relu_bias(&x, &x, &c).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// ReLU, global average pool and the option-A shortcut (stride 1 and 2, odd sizes,
    /// with and without appended channels) against candle's composed ops in `f64` (for
    /// `f64` input the public functions run the composed ops).
    #[test]
    fn relu_pool_and_shortcut_match_composed_ops(
        seed in proptest::prelude::any::<u64>(),
        n in 1usize..4,
        c in 1usize..6,
        extra in 0usize..4,
        h in 1usize..12,
        w in 1usize..12,
        stride in 1usize..3,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dims = [n, c, h, w];
        let x = random(&mut rng, &dims, -1.0, 1.0);
        compare(
            std::slice::from_ref(&x),
            |t| super::relu(t[0]).unwrap(),
            |t, _| t[0].relu().unwrap(),
            &format!("relu {dims:?}"),
        );
        compare(
            std::slice::from_ref(&x),
            |t| super::global_avg_pool(t[0]).unwrap(),
            |t, _| t[0].flatten_from(2).unwrap().mean(2).unwrap(),
            &format!("global_avg_pool {dims:?}"),
        );
        if stride == 1 && extra == 0 {
            return Ok(());
        }
        let c_out = c + extra;
        compare(
            std::slice::from_ref(&x),
            |t| super::option_a_shortcut(t[0], stride, c_out).unwrap(),
            |t, _| {
                assert_eq!(t[0].dtype(), DType::F64);
                super::option_a_shortcut(t[0], stride, c_out).unwrap()
            },
            &format!("option_a_shortcut {dims:?} stride {stride} -> {c_out}"),
        );
        // The kept values are copied exactly.
        let fused = super::option_a_shortcut(&x, stride, c_out).unwrap();
        let composed = super::option_a_shortcut(&x.to_dtype(DType::F64).unwrap(), stride, c_out)
            .unwrap();
        proptest::prop_assert_eq!(rel_err(&fused, &composed), 0.0);
    }
}

#[test]
fn shortcut_rejects_impossible_settings() {
    let x = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(super::option_a_shortcut(&x, 3, 8).is_err());
    assert!(super::option_a_shortcut(&x, 2, 2).is_err());
    assert!(super::global_avg_pool(&x.flatten_all().unwrap()).is_err());
}

/// relu(τ·BN(x) + s), fused in `f32`, against candle-nn's BatchNorm and candle's ops in
/// `f64`: output, the gradients of x, γ, β, τ and s, and the running statistics.
fn check_bn_residual(dims: [usize; 4], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = dims[1];
    let x = random(&mut rng, &dims, -2.0, 2.0);
    let s = random(&mut rng, &dims, -1.0, 1.0);
    let r = random(&mut rng, &dims, -1.0, 1.0);
    let tau = random(&mut rng, &[1], 0.2, 1.0);
    let gamma = random(&mut rng, &[c], 0.5, 1.5);
    let beta = random(&mut rng, &[c], -0.5, 0.5);
    let rm = random(&mut rng, &[c], -0.1, 0.1);
    let rv = random(&mut rng, &[c], 0.9, 1.1);

    let (bn, g, b) = make_bn(&gamma, &beta, &rm, &rv, DType::F32);
    let (xv, sv, tv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&s).unwrap(),
        Var::from_tensor(&tau).unwrap(),
    );
    let y =
        super::batch_norm_residual_relu(&bn, xv.as_tensor(), true, tv.as_tensor(), sv.as_tensor())
            .unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

    let (bn64, g64, b64) = make_bn(&gamma, &beta, &rm, &rv, DType::F64);
    let to64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
    let (x64, s64, t64) = (to64(&x), to64(&s), to64(&tau));
    let bn_out64 = bn64.forward_t(x64.as_tensor(), true).unwrap();
    let y64 = (bn_out64.broadcast_mul(t64.as_tensor()).unwrap() + s64.as_tensor())
        .unwrap()
        .relu()
        .unwrap();
    let r64 = r.to_dtype(DType::F64).unwrap();
    // dγ, dβ and dτ are sums of terms of both signs, which can cancel to near zero: their
    // errors are measured against the sums of the terms' absolute values (the size of what
    // was summed). w = |r|·1(y > 0)·|τ| per element; dβ sums w·sign, dγ w·x̂, dτ r·BN(x).
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mask = y64.gt(0.0).unwrap().to_dtype(DType::F64).unwrap();
    let w = (r64.abs().unwrap() * &mask)
        .unwrap()
        .broadcast_mul(&t64.as_tensor().detach().abs().unwrap())
        .unwrap();
    let per_channel = |t: Tensor| {
        flat(
            t.sum_keepdim(0)
                .unwrap()
                .sum_keepdim(2)
                .unwrap()
                .sum_keepdim(3)
                .unwrap(),
        )
    };
    let bn_out = bn_out64.detach();
    let g_col = g64.as_tensor().detach().reshape((1, c, 1, 1)).unwrap();
    let b_col = b64.as_tensor().detach().reshape((1, c, 1, 1)).unwrap();
    let xhat = bn_out
        .broadcast_sub(&b_col)
        .unwrap()
        .broadcast_div(&g_col)
        .unwrap();
    let scale_beta = per_channel(w.clone());
    let scale_gamma = per_channel((&w * xhat.abs().unwrap()).unwrap());
    let scale_tau = vec![
        flat(
            (r64.abs().unwrap() * &mask)
                .unwrap()
                .mul(&bn_out.abs().unwrap())
                .unwrap()
                .sum_all()
                .unwrap(),
        )[0],
    ];
    let grads64 = (&y64 * &r64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let tol = 1e-5;
    let e = rel_err(&y, &y64);
    assert!(e < tol, "{dims:?}: output rel err {e}");
    for (name, a, b) in [
        ("x", xv.as_tensor(), x64.as_tensor()),
        ("gamma", g.as_tensor(), g64.as_tensor()),
        ("beta", b.as_tensor(), b64.as_tensor()),
        ("tau", tv.as_tensor(), t64.as_tensor()),
        ("shortcut", sv.as_tensor(), s64.as_tensor()),
    ] {
        let ga = grads.get(a).unwrap();
        assert_eq!(ga.dims(), a.dims(), "{dims:?}: d{name} shape");
        let gb = grads64.get(b).unwrap();
        let scale = match name {
            "gamma" => Some(&scale_gamma),
            "beta" => Some(&scale_beta),
            "tau" => Some(&scale_tau),
            _ => None,
        };
        let e = match scale {
            Some(sc) => {
                let (a, b) = (flat(ga.to_dtype(DType::F64).unwrap()), flat(gb.clone()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                diff / sc.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(*v))
            }
            None => rel_err(ga, gb),
        };
        assert!(e < tol, "{dims:?}: d{name} rel err {e}");
    }
    // f32 updates of values that can be near zero: 1e-5 relative to the largest.
    let e = rel_err(bn.running_mean(), bn64.running_mean());
    assert!(e < tol, "{dims:?}: running mean rel err {e}");
    let e = rel_err(bn.running_var(), bn64.running_var());
    assert!(e < tol, "{dims:?}: running var rel err {e}");
    // The running statistics moved (towards the batch's, which are never exactly equal).
    assert!(rel_err(bn.running_var(), &rv) > 0.0);

    // The same f32 numbers as BN then the residual end.
    let (bn2, _, _) = make_bn(&gamma, &beta, &rm, &rv, DType::F32);
    let composed = super::residual_relu(
        &batch_norm_t(&bn2, &x, true, false).unwrap(),
        &tau,
        None,
        &s,
    )
    .unwrap();
    assert_eq!(rel_err(&y, &composed), 0.0, "{dims:?}: fused vs two ops");
}

#[test]
fn fused_batch_norm_residual_matches_composed_ops() {
    check_bn_residual([3, 5, 7, 9], 21);
    check_bn_residual([1, 4, 6, 6], 22);
    check_bn_residual([9, 3, 1, 1], 23);
    check_bn_residual([2, 16, 8, 8], 24);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]

    #[test]
    fn fused_batch_norm_residual_on_random_shapes(
        seed in proptest::prelude::any::<u64>(),
        n in 1usize..4,
        c in 1usize..6,
        h in 1usize..10,
        w in 1usize..10,
    ) {
        // With two values per channel the normalized values are ±1 whatever x is, so the
        // true dx is 0 and a relative error means nothing; from four on it is well posed.
        proptest::prop_assume!(n * h * w >= 4);
        check_bn_residual([n, c, h, w], seed);
    }
}

/// The option-A shortcut of a block on `x` with conv1 weight `w1` and `stride`, in candle's
/// own ops (the identity when the shapes agree).
fn shortcut_reference(x: &Tensor, w1: &Tensor, stride: usize) -> Tensor {
    let (c_out, c_in) = (w1.dim(0).unwrap(), x.dim(1).unwrap());
    let s = if stride == 2 {
        crate::resnet::subsample2(x).unwrap()
    } else {
        x.clone()
    };
    if c_out > c_in {
        s.pad_with_zeros(1, 0, c_out - c_in).unwrap()
    } else {
        s
    }
}

/// The block without normalization, in candle's own ops (f64 reference); the biases and τ
/// (inputs 3–7) go through `s`.
fn block_reference(t: &[&Tensor], s: &Terms, stride: usize) -> Tensor {
    let (x, w1, w2) = (t[0], t[1], t[2]);
    let y1 = x
        .broadcast_add(&s.at(t, 3, x))
        .unwrap()
        .conv2d(w1, 1, stride, 1, 1)
        .unwrap();
    let h = y1.broadcast_add(&s.at(t, 4, &y1)).unwrap().relu().unwrap();
    let h = h.broadcast_add(&s.at(t, 5, &h)).unwrap();
    let y2 = h.conv2d(w2, 1, 1, 1, 1).unwrap();
    let y2 = y2.broadcast_add(&s.at(t, 6, &y2)).unwrap();
    (y2.broadcast_mul(&s.at(t, 7, &y2)).unwrap() + shortcut_reference(x, w1, stride))
        .unwrap()
        .relu()
        .unwrap()
}

/// Random inputs of a block from `dims[1]` to `c_out` channels: x (dims), the c_out×c_in×3×3
/// and c_out×c_out×3×3 weights, four biases, τ.
fn block_inputs(rng: &mut ChaCha8Rng, dims: [usize; 4], c_out: usize) -> Vec<Tensor> {
    let c = dims[1];
    let scale = (2.0 / (9.0 * c as f32)).sqrt();
    let mut t = vec![
        random(rng, &dims, -1.0, 1.0),
        random(rng, &[c_out, c, 3, 3], -2.0 * scale, 2.0 * scale),
        random(rng, &[c_out, c_out, 3, 3], -2.0 * scale, 2.0 * scale),
    ];
    for _ in 0..4 {
        t.push(random(rng, &[1], -0.3, 0.3));
    }
    t.push(random(rng, &[1], 0.2, 1.0));
    t
}

fn fused_block(t: &[&Tensor], stride: usize) -> Tensor {
    super::scalar_bias_block(t[0], t[1], t[2], [t[3], t[4], t[5], t[6]], t[7], stride).unwrap()
}

#[test]
fn scalar_bias_block_matches_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // Identity blocks: whole vectors per channel (direct kernels, in place), odd sizes, a
    // single image, a 1×1 map, more values than one parallel chunk (2^14). Transitions:
    // stride 2 with more output channels (even and odd sizes), stride 1 with more channels.
    for (dims, c_out, stride) in [
        ([2, 3, 5, 7], 3, 1),
        ([1, 16, 8, 8], 16, 1),
        ([3, 4, 4, 4], 4, 1),
        ([2, 2, 1, 1], 2, 1),
        ([2, 8, 32, 32], 8, 1),
        ([2, 4, 8, 8], 8, 2),
        ([3, 3, 7, 5], 6, 2),
        ([2, 8, 32, 32], 16, 2),
        ([2, 3, 6, 6], 5, 1),
    ] {
        let inputs = block_inputs(&mut rng, dims, c_out);
        compare(
            &inputs,
            |t| fused_block(t, stride),
            |t, s| block_reference(t, s, stride),
            &format!("scalar_bias_block {dims:?} → {c_out} stride {stride}"),
        );
    }
}

/// With a constant τ (no gradient, as in the non-learnable configs) the op keeps less and
/// writes its output in place; the gradients of the rest are unchanged. Without any
/// gradient (evaluation) it keeps nothing and gives the same output.
#[test]
fn scalar_bias_block_with_constant_tau_and_without_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let t = block_inputs(&mut rng, [2, 16, 4, 4], 16);
    let want = Reference::new(&t, |a, s| block_reference(a, s, 1));
    for set in KernelSet::available() {
        with_kernels(set, || {
            let vars: Vec<Var> = t[..7]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let mut args: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            args.push(&t[7]);
            let y = fused_block(&args, 1);
            want.check(&y, &vars, &format!("constant τ ({set} kernels)"));
            let plain: Vec<&Tensor> = t.iter().collect();
            assert_eq!(rel_err(&fused_block(&plain, 1), &y), 0.0);
        });
    }
}

#[test]
fn scalar_bias_block_rejects_impossible_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let t = block_inputs(&mut rng, [1, 4, 4, 4], 4);
    let b = &t[3];
    let w_wide = random(&mut rng, &[8, 4, 3, 3], -0.1, 0.1);
    let w_narrow = random(&mut rng, &[2, 4, 3, 3], -0.1, 0.1);
    let w_5x5 = random(&mut rng, &[4, 4, 5, 5], -0.1, 0.1);
    let two = random(&mut rng, &[2], -0.1, 0.1);
    let bs = [b, b, b, b];
    let block = |x: &Tensor, w1: &Tensor, w2: &Tensor, bs, tau: &Tensor, stride| {
        super::scalar_bias_block(x, w1, w2, bs, tau, stride)
    };
    // conv2 must take conv1's output channels; conv1 must not lose channels.
    assert!(block(&t[0], &w_wide, &t[2], bs, &t[7], 1).is_err());
    assert!(block(&t[0], &w_narrow, &w_narrow, bs, &t[7], 1).is_err());
    assert!(block(&t[0], &t[1], &w_5x5, bs, &t[7], 1).is_err());
    assert!(block(&t[0], &t[1], &t[2], [b, &two, b, b], &t[7], 1).is_err());
    assert!(block(&t[0], &t[1], &t[2], bs, &two, 1).is_err());
    assert!(block(&t[0], &t[1], &t[2], bs, &t[7], 3).is_err());
    assert!(block(&t[0], &t[1], &t[2], bs, &t[7], 0).is_err());
    assert!(block(&t[1].flatten_all().unwrap(), &t[1], &t[2], bs, &t[7], 1).is_err());
}

/// The block with BatchNorm in training mode against candle / candle-nn in `f64` (output,
/// every gradient, both BatchNorms' running statistics), and against the composed fused
/// ops in `f32`, which compute the very same numbers.
fn check_bn_block(dims: [usize; 4], c_out: usize, stride: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = c_out;
    let t = block_inputs(&mut rng, dims, c_out);
    let (x, w1, w2, tau) = (&t[0], &t[1], &t[2], &t[7]);
    let bn_params: Vec<[Tensor; 4]> = (0..2)
        .map(|_| {
            [
                random(&mut rng, &[c], 0.5, 1.5),
                random(&mut rng, &[c], -0.5, 0.5),
                random(&mut rng, &[c], -0.1, 0.1),
                random(&mut rng, &[c], 0.9, 1.1),
            ]
        })
        .collect();
    let bns = |dtype| -> Vec<(BatchNorm, Var, Var)> {
        bn_params
            .iter()
            .map(|[g, b, rm, rv]| make_bn(g, b, rm, rv, dtype))
            .collect()
    };
    let (ho, wo) = (dims[2].div_ceil(stride), dims[3].div_ceil(stride));
    let r = random(&mut rng, &[dims[0], c_out, ho, wo], -1.0, 1.0);

    let f = bns(DType::F32);
    let vars: Vec<Var> = [x, w1, w2, tau]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let v = |i: usize| vars[i].as_tensor();
    let y = super::batch_norm_block(v(0), (v(1), &f[0].0), (v(2), &f[1].0), v(3), stride, true)
        .unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

    let d = bns(DType::F64);
    let vars64: Vec<Var> = [x, w1, w2, tau]
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let v64 = |i: usize| vars64[i].as_tensor();
    let h64 = d[0]
        .0
        .forward_t(&v64(0).conv2d(v64(1), 1, stride, 1, 1).unwrap(), true)
        .unwrap()
        .relu()
        .unwrap();
    let b64 = d[1]
        .0
        .forward_t(&h64.conv2d(v64(2), 1, 1, 1, 1).unwrap(), true)
        .unwrap();
    let y64 = (b64.broadcast_mul(v64(3)).unwrap() + shortcut_reference(v64(0), v64(1), stride))
        .unwrap()
        .relu()
        .unwrap();
    let r64 = r.to_dtype(DType::F64).unwrap();
    let grads64 = (&y64 * &r64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let e = rel_err(&y, &y64);
    assert!(e < 1e-5, "{dims:?}: output rel err {e}");
    let mut pairs: Vec<(String, Tensor, Tensor)> = ["x", "conv1", "conv2", "tau"]
        .iter()
        .enumerate()
        .map(|(i, name)| (name.to_string(), v(i).clone(), v64(i).clone()))
        .collect();
    for (k, ((_, g32, b32), (_, g64, b64))) in f.iter().zip(&d).enumerate() {
        pairs.push((
            format!("gamma{}", k + 1),
            g32.as_tensor().clone(),
            g64.as_tensor().clone(),
        ));
        pairs.push((
            format!("beta{}", k + 1),
            b32.as_tensor().clone(),
            b64.as_tensor().clone(),
        ));
    }
    for (name, a, b) in &pairs {
        let ga = grads.get(a).unwrap();
        assert_eq!(ga.dims(), a.dims(), "{dims:?}: d{name} shape");
        let e = rel_err(ga, grads64.get(b).unwrap());
        assert!(e < 1e-4, "{dims:?}: d{name} rel err {e}");
    }
    for ((bn, _, _), (bn64, _, _)) in f.iter().zip(&d) {
        let e = rel_err(bn.running_mean(), bn64.running_mean());
        assert!(e < 1e-5, "{dims:?}: running mean rel err {e}");
        let e = rel_err(bn.running_var(), bn64.running_var());
        assert!(e < 1e-5, "{dims:?}: running var rel err {e}");
    }

    // The composed fused ops: the same f32 numbers, outputs and gradients alike.
    let f2 = bns(DType::F32);
    let vars2: Vec<Var> = [x, w1, w2, tau]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let v2 = |i: usize| vars2[i].as_tensor();
    let h = super::batch_norm_t(
        &f2[0].0,
        &crate::conv::conv2d(v2(0), v2(1), stride, 1).unwrap(),
        true,
        true,
    )
    .unwrap();
    let y2 = super::batch_norm_residual_relu(
        &f2[1].0,
        &crate::conv::conv2d(&h, v2(2), 1, 1).unwrap(),
        true,
        v2(3),
        &super::option_a_shortcut(v2(0), stride, c_out).unwrap(),
    )
    .unwrap();
    assert_eq!(rel_err(&y, &y2), 0.0, "{dims:?}: block vs composed output");
    let grads2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for i in 0..4 {
        let e = rel_err(grads.get(v(i)).unwrap(), grads2.get(v2(i)).unwrap());
        assert_eq!(e, 0.0, "{dims:?}: gradient {i} block vs composed");
    }
    for ((bn, _, _), (bn2, _, _)) in f.iter().zip(&f2) {
        assert_eq!(rel_err(bn.running_var(), bn2.running_var()), 0.0);
    }
}

#[test]
fn batch_norm_block_matches_candle_nn() {
    for set in KernelSet::available() {
        // Shown with the failing assertion's message.
        println!("kernel set: {set}");
        with_kernels(set, || {
            check_bn_block([2, 3, 5, 7], 3, 1, 31);
            check_bn_block([1, 16, 8, 8], 16, 1, 32);
            check_bn_block([4, 4, 4, 4], 4, 1, 33);
            check_bn_block([3, 8, 16, 16], 8, 1, 34);
            // stage transitions
            check_bn_block([2, 4, 8, 8], 8, 2, 36);
            check_bn_block([3, 3, 7, 5], 6, 2, 37);
            check_bn_block([2, 3, 6, 6], 5, 1, 38);
        });
    }
}

#[test]
fn batch_norm_block_rejects_impossible_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(35);
    let t = block_inputs(&mut rng, [2, 4, 4, 4], 4);
    let ones = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let (bn, _, _) = make_bn(&ones, &ones, &ones, &ones, DType::F32);
    let wide = random(&mut rng, &[8, 4, 3, 3], -0.1, 0.1);
    let two = random(&mut rng, &[2], -0.1, 0.1);
    assert!(super::batch_norm_block(&t[0], (&wide, &bn), (&t[2], &bn), &t[7], 1, true).is_err());
    assert!(super::batch_norm_block(&t[0], (&t[1], &bn), (&t[2], &bn), &two, 1, true).is_err());
    let x8 = random(&mut rng, &[2, 8, 4, 4], -1.0, 1.0);
    let w8 = random(&mut rng, &[8, 8, 3, 3], -0.1, 0.1);
    assert!(super::batch_norm_block(&x8, (&w8, &bn), (&w8, &bn), &t[7], 1, true).is_err());
}

/// PyTorch's max_pool2d(x, 3, 2, 1) of one plane and the gradient of Σ r ⊙ y, in `f64` with
/// loops: padding never wins; the first maximum of each window (row-major) takes the
/// gradient.
fn max_pool_reference(x: &[f64], h: usize, w: usize, r: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
    let (mut y, mut dx) = (vec![0.0; ho * wo], vec![0.0; h * w]);
    for i in 0..ho {
        for j in 0..wo {
            let mut best: Option<(f64, usize)> = None;
            for a in 0..3 {
                for b in 0..3 {
                    let (row, col) = ((2 * i + a) as isize - 1, (2 * j + b) as isize - 1);
                    if row < 0 || col < 0 || row >= h as isize || col >= w as isize {
                        continue;
                    }
                    let k = row as usize * w + col as usize;
                    if best.is_none_or(|(m, _)| x[k] > m) {
                        best = Some((x[k], k));
                    }
                }
            }
            let (m, k) = best.unwrap();
            y[i * wo + j] = m;
            dx[k] += r[i * wo + j];
        }
    }
    (y, dx)
}

#[test]
fn max_pool_matches_pytorch_rule_with_ties() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    for (n, c, h, w) in [
        (2, 3, 7, 5),
        (1, 2, 8, 8),
        (2, 1, 1, 1),
        (1, 1, 2, 3),
        (2, 4, 16, 9),
    ] {
        // ReLU'd values rounded to a coarse grid: many zeros and many ties.
        let x = random(&mut rng, &[n, c, h, w], -1.0, 1.0);
        let x = ((x * 4.0).unwrap().round().unwrap() / 4.0)
            .unwrap()
            .relu()
            .unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = super::max_pool_3x3_s2(xv.as_tensor()).unwrap();
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        assert_eq!(y.dims(), [n, c, ho, wo]);
        let r = random(&mut rng, y.dims(), -1.0, 1.0);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap();
        let [xf, yf, rf, dxf] = [&x, &y, &r, dx].map(to_f64_vec);
        for p in 0..n * c {
            let (want_y, want_dx) = max_pool_reference(
                &xf[p * h * w..(p + 1) * h * w],
                h,
                w,
                &rf[p * ho * wo..(p + 1) * ho * wo],
            );
            assert_eq!(
                &yf[p * ho * wo..(p + 1) * ho * wo],
                &want_y[..],
                "plane {p}"
            );
            for (a, b) in dxf[p * h * w..(p + 1) * h * w].iter().zip(&want_dx) {
                assert!(
                    (a - b).abs() < 1e-6,
                    "{n}×{c}×{h}×{w} plane {p}: {a} vs {b}"
                );
            }
        }
    }
    let empty = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(super::max_pool_3x3_s2(&empty).is_err());
}

/// Without ties (continuous positive inputs) the fused op and the composition of shifts and
/// maxima agree exactly, gradients included.
#[test]
fn max_pool_matches_the_composed_ops_without_ties() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let x = random(&mut rng, &[2, 3, 9, 6], 0.1, 1.0);
    compare(
        &[x],
        |t| super::max_pool_3x3_s2(t[0]).unwrap(),
        |t, _| crate::resnet::max_pool_3x3_s2_composed(t[0]).unwrap(),
        "max pool",
    );
}
