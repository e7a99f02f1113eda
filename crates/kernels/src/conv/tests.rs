//! The CPU convolution against candle's reference `conv2d` and against direct loops, both
//! computed in `f64`: forward output and the gradients of both inputs, on random shapes.
//!
//! candle 0.11.1's own `conv2d` backward fails (a shape mismatch) when the height and the
//! width leave different remainders modulo the stride: it derives the `conv_transpose2d`
//! output padding from the height alone. There, only the direct loops are the reference.

use candle::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::conv2d;
use crate::select::{KernelSet, with_kernels};
use crate::test_util::{rel_err, to_f64_vec};

fn random(rng: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Output, input gradient and weight gradient of Σ r ⊙ conv(x, w) by direct loops in `f64`,
/// straight from the definition y[n,o,i,j] = Σ_{c,a,b} x[n,c,i·s+a−p,j·s+b−p] w[o,c,a,b].
fn direct_loops(
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    stride: usize,
    padding: usize,
) -> (Tensor, Tensor, Tensor) {
    let (n, c_in, h, wd) = x.dims4().unwrap();
    let (c_out, _, k, _) = w.dims4().unwrap();
    let (_, _, h_out, w_out) = r.dims4().unwrap();
    let (xv, wv, rv) = (to_f64_vec(x), to_f64_vec(w), to_f64_vec(r));
    let mut y = vec![0f64; n * c_out * h_out * w_out];
    let mut dx = vec![0f64; xv.len()];
    let mut dw = vec![0f64; wv.len()];
    for b in 0..n {
        for o in 0..c_out {
            for i in 0..h_out {
                for j in 0..w_out {
                    let yi = ((b * c_out + o) * h_out + i) * w_out + j;
                    for c in 0..c_in {
                        for a in 0..k {
                            for e in 0..k {
                                let (ih, iw) = (i * stride + a, j * stride + e);
                                if ih < padding || iw < padding {
                                    continue;
                                }
                                let (ih, iw) = (ih - padding, iw - padding);
                                if ih >= h || iw >= wd {
                                    continue;
                                }
                                let xi = ((b * c_in + c) * h + ih) * wd + iw;
                                let wi = ((o * c_in + c) * k + a) * k + e;
                                y[yi] += xv[xi] * wv[wi];
                                dx[xi] += rv[yi] * wv[wi];
                                dw[wi] += rv[yi] * xv[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    let t = |v: Vec<f64>, d: &[usize]| Tensor::from_vec(v, d, &Device::Cpu).unwrap();
    (
        t(y, &[n, c_out, h_out, w_out]),
        t(dx, x.dims()),
        t(dw, w.dims()),
    )
}

/// The element-wise worst of `errs` over every kernel set this CPU runs.
fn worst_over_sets<const N: usize>(errs: impl Fn(KernelSet) -> [f64; N]) -> [f64; N] {
    KernelSet::available()
        .into_iter()
        .map(errs)
        .fold([0.0; N], |w, e| std::array::from_fn(|i| w[i].max(e[i])))
}

/// Output and gradients (input, weight) of Σ r ⊙ conv(xs, w) with [`conv2d`] in `f32`, and
/// their worst relative errors against [`direct_loops`] and (where its backward works)
/// candle's `conv2d`, both in `f64`.
#[allow(clippy::too_many_arguments)]
fn compare_under(
    set: KernelSet,
    seed: u64,
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    non_contiguous: bool,
) -> [f64; 3] {
    with_kernels(set, || {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // A non-contiguous input: stored as (N, C, W, H) and transposed.
        let x0 = if non_contiguous {
            random(&mut rng, &[n, c_in, w, h])
        } else {
            random(&mut rng, &[n, c_in, h, w])
        };
        let w0 = random(&mut rng, &[c_out, c_in, k, k]);
        let h_out = (h + 2 * padding - k) / stride + 1;
        let w_out = (w + 2 * padding - k) / stride + 1;
        let r = random(&mut rng, &[n, c_out, h_out, w_out]);

        let run = |dtype: DType, reference: bool| {
            let xv = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
            let wv = Var::from_tensor(&w0.to_dtype(dtype).unwrap()).unwrap();
            let xs = if non_contiguous {
                xv.as_tensor().transpose(2, 3).unwrap()
            } else {
                xv.as_tensor().clone()
            };
            if non_contiguous && h > 1 && w > 1 {
                assert!(!xs.is_contiguous());
            }
            let ys = if reference {
                xs.conv2d(wv.as_tensor(), padding, stride, 1, 1).unwrap()
            } else {
                conv2d(&xs, wv.as_tensor(), stride, padding).unwrap()
            };
            let loss = (&ys * r.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap().clone();
            // the gradient of the NCHW view xs
            let dx = if non_contiguous {
                dx.transpose(2, 3).unwrap()
            } else {
                dx
            };
            let dw = grads.get(wv.as_tensor()).unwrap().clone();
            (ys, dx, dw)
        };
        let (ys, dx, dw) = run(DType::F32, false);
        let errs = |(ys_ref, dx_ref, dw_ref): (Tensor, Tensor, Tensor)| {
            assert_eq!(ys.dims(), ys_ref.dims());
            assert_eq!(dx.dims(), dx_ref.dims());
            assert_eq!(dw.dims(), dw_ref.dims());
            [
                rel_err(&ys, &ys_ref),
                rel_err(&dx, &dx_ref),
                rel_err(&dw, &dw_ref),
            ]
        };
        let x_nchw = if non_contiguous {
            x0.transpose(2, 3).unwrap()
        } else {
            x0.clone()
        };
        let mut worst = errs(direct_loops(&x_nchw, &w0, &r, stride, padding));
        let candle_backward_works =
            (h + 2 * padding - k) % stride == (w + 2 * padding - k) % stride;
        if candle_backward_works {
            let vs_candle = errs(run(DType::F64, true));
            for (a, b) in worst.iter_mut().zip(vs_candle) {
                *a = a.max(b);
            }
        }
        worst
    })
}

/// The worst errors of [`compare_under`] over every kernel set this CPU runs.
#[allow(clippy::too_many_arguments)]
fn compare(
    seed: u64,
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    non_contiguous: bool,
) -> [f64; 3] {
    worst_over_sets(|set| {
        compare_under(
            set,
            seed,
            n,
            c_in,
            c_out,
            h,
            w,
            k,
            stride,
            padding,
            non_contiguous,
        )
    })
}

const TOL: f64 = 1e-5;

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn matches_candle_reference(
        seed in any::<u64>(),
        n in 1usize..4,
        c_in in 1usize..6,
        c_out in 1usize..6,
        h in 1usize..10,
        w in 1usize..10,
        k in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3,
        padding in 0usize..2,
        non_contiguous in any::<bool>(),
    ) {
        prop_assume!(h + 2 * padding >= k && w + 2 * padding >= k);
        let errs = compare(seed, n, c_in, c_out, h, w, k, stride, padding, non_contiguous);
        prop_assert!(errs.iter().all(|e| *e <= TOL), "relative errors (y, dx, dw) {errs:?}");
    }
}

#[test]
fn matches_candle_reference_at_resnet_shapes() {
    // A stage-1 block convolution (16 → 16, 3×3, stride 1) and a stage transition
    // (16 → 32, stride 2) at the CIFAR resolution, batch 2 and batch 1.
    for (n, c_in, c_out, hw, stride) in [(2, 16, 16, 32, 1), (1, 16, 32, 32, 2)] {
        let errs = compare(7, n, c_in, c_out, hw, hw, 3, stride, 1, false);
        assert!(errs.iter().all(|e| *e <= TOL), "{errs:?}");
    }
}

#[test]
fn pointwise_and_large_kernel() {
    // 1×1 stride 2 (the im2col path for k = 1) and a 5×5 kernel with padding 2.
    let errs = compare(3, 2, 4, 6, 7, 9, 1, 2, 0, false);
    assert!(errs.iter().all(|e| *e <= TOL), "{errs:?}");
    let errs = compare(4, 3, 3, 2, 8, 5, 5, 1, 2, true);
    assert!(errs.iter().all(|e| *e <= TOL), "{errs:?}");
}

#[test]
fn input_without_gradient_still_gives_the_weight_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let xs = random(&mut rng, &[2, 3, 6, 6]);
    let wv = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3])).unwrap();
    let loss = conv2d(&xs, wv.as_tensor(), 1, 1)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let ours = grads.get(wv.as_tensor()).unwrap().clone();
    // data needs no gradient: none is computed
    assert!(grads.get(&xs).is_none());
    let reference = xs
        .conv2d(wv.as_tensor(), 1, 1, 1, 1)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = reference.backward().unwrap();
    let reference = grads.get(wv.as_tensor()).unwrap();
    assert!(rel_err(&ours, reference) <= TOL);
}

#[test]
fn empty_batch_gives_empty_output_and_gradients() {
    for (stride, k) in [(1, 3), (2, 3), (1, 1)] {
        let xs = Var::from_tensor(&Tensor::zeros((0, 3, 8, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::ones((4, 3, k, k), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let ys = conv2d(xs.as_tensor(), w.as_tensor(), stride, k / 2).unwrap();
        assert_eq!(ys.dims()[0], 0);
        let grads = ys.sum_all().unwrap().backward().unwrap();
        let dw = grads.get(w.as_tensor()).unwrap();
        let dw_max = dw
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(dw_max, 0.0);
    }
}

#[test]
fn bad_shapes_are_errors() {
    let xs = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w_wrong_channels = Tensor::zeros((2, 5, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs, &w_wrong_channels, 1, 1).is_err());
    let w_too_big = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs, &w_too_big, 1, 1).is_err());
    let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs, &w, 0, 1).is_err());
    let w_rect = Tensor::zeros((2, 3, 3, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs, &w_rect, 1, 1).is_err());
    // no output channels, no input channels: errors, not a panic
    let w_empty = Tensor::zeros((0, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs, &w_empty, 1, 1).is_err());
    let xs_empty = Tensor::zeros((1, 0, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w_no_in = Tensor::zeros((2, 0, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&xs_empty, &w_no_in, 1, 1).is_err());
}

/// Output and gradients (x, w, b) of Σ r ⊙ conv(x + b, w): [`super::conv2d_shifted`] in
/// `f32` against the composition x + b then the convolution, computed in `f64` by direct
/// loops (db = Σ dx of the shifted input) and, where its backward works, by candle's
/// `broadcast_add` + `conv2d`. Returns the worst relative errors (y, dx, dw, db; db's
/// relative to Σ |dx|).
#[allow(clippy::too_many_arguments)]
fn compare_shifted_under(
    set: KernelSet,
    seed: u64,
    n: usize,
    c_in: usize,
    c_out: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
) -> [f64; 4] {
    with_kernels(set, || {
        let (h, w) = hw;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x0 = random(&mut rng, &[n, c_in, h, w]);
        let w0 = random(&mut rng, &[c_out, c_in, k, k]);
        let b0 = random(&mut rng, &[1]);
        let h_out = (h + 2 * padding - k) / stride + 1;
        let w_out = (w + 2 * padding - k) / stride + 1;
        let r = random(&mut rng, &[n, c_out, h_out, w_out]);

        let run = |dtype: DType, reference: bool| {
            let xv = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
            let wv = Var::from_tensor(&w0.to_dtype(dtype).unwrap()).unwrap();
            let bv = Var::from_tensor(&b0.to_dtype(dtype).unwrap()).unwrap();
            let ys = if reference {
                xv.as_tensor()
                    .broadcast_add(bv.as_tensor())
                    .unwrap()
                    .conv2d(wv.as_tensor(), padding, stride, 1, 1)
                    .unwrap()
            } else {
                super::conv2d_shifted(
                    xv.as_tensor(),
                    bv.as_tensor(),
                    wv.as_tensor(),
                    stride,
                    padding,
                )
                .unwrap()
            };
            let loss = (&ys * r.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let get = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (ys, get(&xv), get(&wv), get(&bv))
        };
        let (ys, dx, dw, db) = run(DType::F32, false);
        assert_eq!(db.dims(), b0.dims());
        // db = Σ dx sums terms of both signs that can cancel: its error is measured against
        // Σ |dx| (the size of what was summed), not against a result that may be near zero.
        let abs_sum = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let shifted64 = x0
            .to_dtype(DType::F64)
            .unwrap()
            .broadcast_add(&b0.to_dtype(DType::F64).unwrap())
            .unwrap();
        // dw sums products of both signs too (a 1×1 kernel over one channel is one sum of
        // h·w products): its error is measured against the sum of the magnitudes of its
        // terms, the weight gradient of |x + b| with upstream |r|.
        let (_, _, dw_terms) = direct_loops(
            &shifted64.abs().unwrap(),
            &w0,
            &r.abs().unwrap(),
            stride,
            padding,
        );
        let dw_scale = abs_sum(&dw_terms).max(f64::MIN_POSITIVE);
        let errs = |(y_ref, dx_ref, dw_ref, db_ref): (Tensor, Tensor, Tensor, Tensor)| {
            let dw_diff =
                (dw.to_dtype(DType::F64).unwrap() - dw_ref.to_dtype(DType::F64).unwrap()).unwrap();
            let db_diff =
                (db.to_dtype(DType::F64).unwrap() - db_ref.to_dtype(DType::F64).unwrap()).unwrap();
            [
                rel_err(&ys, &y_ref),
                rel_err(&dx, &dx_ref),
                abs_sum(&dw_diff) / dw_scale,
                abs_sum(&db_diff) / abs_sum(&dx_ref).max(f64::MIN_POSITIVE),
            ]
        };
        let (y64, dx64, dw64) = direct_loops(&shifted64, &w0, &r, stride, padding);
        let db64 = dx64.sum_all().unwrap().reshape(1).unwrap();
        let mut worst = errs((y64, dx64, dw64, db64));
        if (h + 2 * padding - k) % stride == (w + 2 * padding - k) % stride {
            for (a, b) in worst.iter_mut().zip(errs(run(DType::F64, true))) {
                *a = a.max(b);
            }
        }
        worst
    })
}

/// The worst errors of [`compare_shifted_under`] over every kernel set this CPU runs.
#[allow(clippy::too_many_arguments)]
fn compare_shifted(
    seed: u64,
    n: usize,
    c_in: usize,
    c_out: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
) -> [f64; 4] {
    worst_over_sets(|set| compare_shifted_under(set, seed, n, c_in, c_out, hw, k, stride, padding))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn shifted_input_matches_the_composition(
        seed in any::<u64>(),
        n in 1usize..4,
        c_in in 1usize..6,
        c_out in 1usize..6,
        h in 1usize..10,
        w in 1usize..10,
        k in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3,
        padding in 0usize..2,
    ) {
        prop_assume!(h + 2 * padding >= k && w + 2 * padding >= k);
        let errs = compare_shifted(seed, n, c_in, c_out, (h, w), k, stride, padding);
        prop_assert!(errs.iter().all(|e| *e <= TOL), "relative errors (y, dx, dw, db) {errs:?}");
    }
}

#[test]
fn shifted_input_weight_gradient_that_cancels() {
    // A case proptest found: a 1×1 kernel over one channel, so dw is one sum of 20
    // products of both signs; against |dw| alone its f32 error looked like 3.1e-5.
    let errs = compare_shifted(13234914615830753139, 1, 1, 1, (5, 4), 1, 1, 0);
    assert!(errs.iter().all(|e| *e <= TOL), "{errs:?}");
}

#[test]
fn shifted_input_at_resnet_shapes() {
    // A block convolution (direct kernels under the AVX2 and AVX-512 sets) and a stage
    // transition (im2col + GEMM), batch 2 and batch 1.
    for (n, c_in, c_out, hw, stride) in [(2, 16, 16, 32, 1), (1, 16, 32, 32, 2)] {
        let errs = compare_shifted(8, n, c_in, c_out, (hw, hw), 3, stride, 1);
        assert!(errs.iter().all(|e| *e <= TOL), "{errs:?}");
    }
}

#[test]
fn shifted_input_is_bitwise_the_composition() {
    // conv(x + b) with x + b rounded to f32 first: the same f32 numbers as add_scalar then
    // conv2d, on both CPU paths.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for stride in [1, 2] {
        let x = random(&mut rng, &[3, 4, 9, 8]);
        let w = random(&mut rng, &[5, 4, 3, 3]);
        let b = random(&mut rng, &[1]);
        let fused = super::conv2d_shifted(&x, &b, &w, stride, 1).unwrap();
        let composed = conv2d(&x.broadcast_add(&b).unwrap(), &w, stride, 1).unwrap();
        assert_eq!(rel_err(&fused, &composed), 0.0, "stride {stride}");
    }
    let x = random(&mut rng, &[1, 2, 3, 3]);
    let w = random(&mut rng, &[2, 2, 3, 3]);
    assert!(super::conv2d_shifted(&x, &x, &w, 1, 1).is_err());
}

#[test]
fn shifted_input_without_input_gradient_still_gives_the_bias_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let x = random(&mut rng, &[2, 3, 6, 6]);
    let wv = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3])).unwrap();
    let bv = Var::from_tensor(&random(&mut rng, &[1])).unwrap();
    let y = super::conv2d_shifted(&x, bv.as_tensor(), wv.as_tensor(), 1, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let db = grads.get(bv.as_tensor()).unwrap();
    // Reference: Σ over outputs of ∂y/∂b = Σ_o Σ positions Σ over the in-image taps of w.
    let y64 = x
        .to_dtype(DType::F64)
        .unwrap()
        .broadcast_add(&bv.as_tensor().to_dtype(DType::F64).unwrap())
        .unwrap();
    let r = Tensor::ones((2, 4, 6, 6), DType::F64, &Device::Cpu).unwrap();
    let (_, dx, _) = direct_loops(&y64, wv.as_tensor(), &r, 1, 1);
    let want = dx.sum_all().unwrap().reshape(1).unwrap();
    assert!(rel_err(db, &want) <= TOL);
}
