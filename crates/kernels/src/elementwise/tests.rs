//! The fused elementwise ops against candle's composed ops computed in `f64`.

use candle::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::test_util::{compare, random, rel_err};

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
                |t| crate::add_scalar(t[0], t[1], relu).unwrap(),
                |t, s| {
                    let y = t[0].broadcast_add(&s.at(t, 1, t[0])).unwrap();
                    if relu { y.relu().unwrap() } else { y }
                },
                &format!("add_scalar {dims:?} relu={relu}"),
            );
        }
    }
    let x = random(&mut rng, &[2, 2], -1.0, 1.0);
    assert!(crate::add_scalar(&x, &x, false).is_err());
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
                |t| crate::residual_relu(t[0], t[1], None, t[2]).unwrap(),
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
                |t| crate::residual_relu(t[0], t[1], Some(t[3]), t[2]).unwrap(),
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
    assert!(crate::residual_relu(&x, &tau, None, &y).is_err());
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
            |t| crate::bias_relu_bias(t[0], t[1], t[2]).unwrap(),
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
        |t| crate::bias_relu_bias(t[0], t[1], t[2]).unwrap(),
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
    let fused = crate::bias_relu_bias(&x, &b, &c).unwrap();
    let composed = crate::add_scalar(&crate::add_scalar(&x, &b, true).unwrap(), &c, false).unwrap();
    assert_eq!(rel_err(&fused, &composed), 0.0);
    assert!(crate::bias_relu_bias(&x, &x, &c).is_err());
}

/// Regression: the composed fallback (other devices, other dtypes, `Kernels::Candle`) ran
/// candle's `relu`, whose gradient is 1 at an input of exactly 0, where the fused ops (and
/// PyTorch) give 0. At a SkipInit block with α = 0 the ReLU sees the previous block's
/// zeros, and the two paths gave dα of opposite signs. Every op with a ReLU now has the
/// fused gradient on both paths, at exact zeros included.
#[test]
fn composed_relu_gradient_at_zero_is_zero_as_fused() {
    use crate::select::{KernelSet, Kernels, with_kernels};
    use candle::{DType, Var};
    // Exact zeros among negative and positive values; a zero bias, τ and shortcut.
    let x = Tensor::new(&[[-1f32, 0., 2., 0.], [0., 3., -0.5, 0.]], &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 2, 2))
        .unwrap();
    let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let r = Tensor::new(&[1f32, -2., 3., 4., 5., -6., 7., 8.], &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 2, 2))
        .unwrap();
    type Op<'a> = (&'a str, &'a dyn Fn(&Tensor) -> Tensor);
    let ops: [Op; 4] = [
        ("relu", &|x| crate::relu(x).unwrap()),
        ("add_scalar", &|x| {
            crate::add_scalar(x, &zero, true).unwrap()
        }),
        ("bias_relu_bias", &|x| {
            crate::bias_relu_bias(x, &zero, &zero).unwrap()
        }),
        ("residual_relu", &|x| {
            let branch = x.zeros_like().unwrap();
            crate::residual_relu(&branch, &zero, None, x).unwrap()
        }),
    ];
    // dL/dx of Σ r ⊙ op(x): r where x > 0, else 0.
    let want = [0f32, 0., 3., 0., 0., -6., 0., 0.];
    for (name, op) in ops {
        for k in [Kernels::Candle, Kernels::Fused(KernelSet::Portable)] {
            let v = Var::from_tensor(&x).unwrap();
            let g = with_kernels(k, || {
                let y = op(v.as_tensor());
                (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
            });
            let g = g.get(v.as_tensor()).unwrap();
            let got = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, want, "{name} under {k}");
        }
    }
}

/// A NaN goes through every fused ReLU as through PyTorch's (`f32::max(0)` would turn it
/// into 0 and hide a blown-up activation); negatives still become 0.
#[test]
fn fused_relus_keep_a_nan() {
    use crate::select::{KernelSet, with_kernels};
    let dev = Device::Cpu;
    let mut v: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32 / 7.0 - 4.0).collect();
    v[3] = f32::NAN;
    v[77] = f32::NAN;
    let x = Tensor::from_vec(v, (2, 3, 4, 5), &dev).unwrap();
    let zero = Tensor::new(&[0f32], &dev).unwrap();
    let one = Tensor::new(&[1f32], &dev).unwrap();
    let check = |y: Tensor, what: &str| {
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&yi, &xi)) in y.iter().zip(&x).enumerate() {
            if xi.is_nan() {
                assert!(yi.is_nan(), "{what}: element {i} is {yi}, not NaN");
            } else {
                assert_eq!(yi, xi.max(0.0), "{what}: element {i}");
            }
        }
    };
    for set in KernelSet::available() {
        with_kernels(set, || {
            check(crate::relu(&x).unwrap(), &format!("relu ({set})"));
            let y = crate::add_scalar(&x, &zero, true).unwrap();
            check(y, &format!("add_scalar ({set})"));
            let y = crate::bias_relu_bias(&x, &zero, &zero).unwrap();
            check(y, &format!("bias_relu_bias ({set})"));
            let y = crate::residual_relu(&x, &one, None, &x.zeros_like().unwrap()).unwrap();
            check(y, &format!("residual_relu ({set})"));
        });
    }
}
