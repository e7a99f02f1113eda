//! The fused BatchNorm against candle-nn's composed `BatchNorm` computed in `f64`: output,
//! the gradients of input, γ and β, and the running statistics, with and without ReLU.

use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batch_norm_t;

/// max |a − b| / max |b| over all elements.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let a = a.to_vec1::<f64>().unwrap();
    let b = b.to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

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
