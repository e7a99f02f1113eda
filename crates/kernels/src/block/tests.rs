//! The whole-block ops against candle / candle-nn in `f64` and against the composed fused
//! ops in `f32`.

use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::select::{KernelSet, with_kernels};
use crate::test_util::{Reference, Terms, compare, make_bn, random, rel_err};

/// The option-A shortcut of a block on `x` with conv1 weight `w1` and `stride`, in candle's
/// own ops (the identity when the shapes agree).
fn shortcut_reference(x: &Tensor, w1: &Tensor, stride: usize) -> Tensor {
    let (c_out, c_in) = (w1.dim(0).unwrap(), x.dim(1).unwrap());
    let s = if stride == 2 {
        crate::shortcut::subsample2(x).unwrap()
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
    crate::scalar_bias_block(t[0], t[1], t[2], [t[3], t[4], t[5], t[6]], t[7], stride).unwrap()
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

/// Fixup's block in candle's own ops (f64 reference): as [`block_reference`] with the
/// multiplier (input 7) applied to conv2's output before the last bias (input 6).
fn fixup_reference(t: &[&Tensor], s: &Terms, stride: usize) -> Tensor {
    let (x, w1, w2) = (t[0], t[1], t[2]);
    let y1 = x
        .broadcast_add(&s.at(t, 3, x))
        .unwrap()
        .conv2d(w1, 1, stride, 1, 1)
        .unwrap();
    let h = y1.broadcast_add(&s.at(t, 4, &y1)).unwrap().relu().unwrap();
    let h = h.broadcast_add(&s.at(t, 5, &h)).unwrap();
    let y2 = h.conv2d(w2, 1, 1, 1, 1).unwrap();
    let y2 = y2.broadcast_mul(&s.at(t, 7, &y2)).unwrap();
    let y2 = y2.broadcast_add(&s.at(t, 6, &y2)).unwrap();
    (y2 + shortcut_reference(x, w1, stride))
        .unwrap()
        .relu()
        .unwrap()
}

fn fused_fixup(t: &[&Tensor], stride: usize) -> Tensor {
    crate::fixup_block(t[0], t[1], t[2], [t[3], t[4], t[5], t[6]], t[7], stride).unwrap()
}

/// Fixup's block (the bias after the multiplier): output and every gradient, the
/// multiplier's and b2b's included, under every kernel set (the candle set is the
/// composed fallback).
#[test]
fn fixup_block_matches_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (dims, c_out, stride) in [
        ([2, 3, 5, 7], 3, 1),
        ([1, 16, 8, 8], 16, 1),
        ([2, 8, 32, 32], 8, 1),
        ([2, 4, 8, 8], 8, 2),
        ([3, 3, 7, 5], 6, 2),
    ] {
        let inputs = block_inputs(&mut rng, dims, c_out);
        compare(
            &inputs,
            |t| fused_fixup(t, stride),
            |t, s| fixup_reference(t, s, stride),
            &format!("fixup_block {dims:?} → {c_out} stride {stride}"),
        );
    }
    // A multiplier of 0 (Fixup's zero-initialized branch): the block is relu(b2b + x).
    let mut t = block_inputs(&mut rng, [2, 4, 6, 6], 4);
    t[7] = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let args: Vec<&Tensor> = t.iter().collect();
    let want = t[0].broadcast_add(&t[6]).unwrap().relu().unwrap();
    assert!(rel_err(&fused_fixup(&args, 1), &want) < 1e-7);
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
        crate::scalar_bias_block(x, w1, w2, bs, tau, stride)
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
    let y = crate::batch_norm_block(v(0), (v(1), &f[0].0), (v(2), &f[1].0), v(3), stride, true)
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
    let h = crate::batch_norm_t(
        &f2[0].0,
        &crate::conv::conv2d(v2(0), v2(1), stride, 1).unwrap(),
        true,
        true,
    )
    .unwrap();
    let y2 = crate::batch_norm_residual_relu(
        &f2[1].0,
        &crate::conv::conv2d(&h, v2(2), 1, 1).unwrap(),
        true,
        v2(3),
        &crate::option_a_shortcut(v2(0), stride, c_out).unwrap(),
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
    assert!(crate::batch_norm_block(&t[0], (&wide, &bn), (&t[2], &bn), &t[7], 1, true).is_err());
    assert!(crate::batch_norm_block(&t[0], (&t[1], &bn), (&t[2], &bn), &two, 1, true).is_err());
    let x8 = random(&mut rng, &[2, 8, 4, 4], -1.0, 1.0);
    let w8 = random(&mut rng, &[8, 8, 3, 3], -0.1, 0.1);
    assert!(crate::batch_norm_block(&x8, (&w8, &bn), (&w8, &bn), &t[7], 1, true).is_err());
}
