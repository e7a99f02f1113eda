//! Helpers of the op tests: random tensors, BatchNorms, relative errors, and the
//! comparison of an op and its gradients against an `f64` reference under every kernel set.

use candle::{DType, Device, Tensor, Var};
use candle_nn::BatchNorm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::select::{KernelSet, with_kernels};

/// All elements of `t`, flattened, as `f64`.
pub(crate) fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max |a − b| / max |b| over all elements.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_f64_vec(a), to_f64_vec(b));
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

pub(crate) fn random(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// A BatchNorm over `c` channels with the given parameters, in `dtype`; returns it and the
/// γ, β variables.
pub(crate) fn make_bn(
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

/// How an `f64` reference applies a one-element parameter θ: as a full-shape copy (one
/// variable per element) whose gradient holds the terms of θ's gradient, dθ = Σᵢ ∂ℓ/∂θᵢ.
/// Such a gradient sums terms of both signs that can cancel to near zero, so its error is
/// measured against Σᵢ |∂ℓ/∂θᵢ|, the size of what was summed (as for dγ, dβ and dτ of the
/// fused BatchNorm below), not against its own possibly tiny value.
#[derive(Default)]
pub(crate) struct Terms {
    pub(crate) copies: std::cell::RefCell<Vec<(usize, Var)>>,
}

impl Terms {
    /// Input `i` of `t` (one element) as a full-shape copy shaped like `like`.
    pub(crate) fn at(&self, t: &[&Tensor], i: usize, like: &Tensor) -> Tensor {
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
pub(crate) struct Reference {
    y: Tensor,
    r: Tensor,
    grads: Vec<(Vec<f64>, f64)>,
}

impl Reference {
    pub(crate) fn new<G>(inputs: &[Tensor], reference: G) -> Self
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
    pub(crate) fn check(&self, y: &Tensor, vars: &[Var], what: &str) {
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
pub(crate) fn compare<F, G>(inputs: &[Tensor], f: F, reference: G, what: &str)
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
