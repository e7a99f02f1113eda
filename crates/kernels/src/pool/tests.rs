//! The 3×3/2 max pool against PyTorch's rule (loops in `f64`) and the composed ops.

use candle::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::test_util::{compare, random, to_f64_vec};

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
        let y = crate::max_pool_3x3_s2(xv.as_tensor()).unwrap();
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
    assert!(crate::max_pool_3x3_s2(&empty).is_err());
}

/// Without ties (continuous positive inputs) the fused op and the composition of shifts and
/// maxima agree exactly, gradients included.
#[test]
fn max_pool_matches_the_composed_ops_without_ties() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let x = random(&mut rng, &[2, 3, 9, 6], 0.1, 1.0);
    compare(
        &[x],
        |t| crate::max_pool_3x3_s2(t[0]).unwrap(),
        |t, _| crate::pool::max_pool_3x3_s2_composed(t[0]).unwrap(),
        "max pool",
    );
}
