//! The SGD update in place: one pass over a parameter (two with a momentum buffer) instead
//! of candle's four to six temporary tensors per parameter and step.
//!
//! [`sgd_update`] computes, element by element and in the same order of `f32` operations,
//! exactly what the composed update computes with candle's ops (`affine` is `v * a + b`,
//! here with `b = 0`), so a run gives the same bits either way:
//!
//! ```text
//! d = g · s                                  (s: the gradient scale; g itself when s = 1)
//! d = d + w · λ                              (coupled weight decay λ)
//! w = w · (1 − η λ)                          (decoupled weight decay)
//! b = d  (first step)   or   b = b · μ + d   (momentum μ)
//! d = d + b · μ  (Nesterov)   or   d = b
//! w = w − d · η                              (learning rate η)
//! ```
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use tau_kernels::sgd::{SgdUpdate, sgd_update};
//!
//! # fn main() -> candle::Result<()> {
//! let w = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
//! let g = Tensor::new(&[0.5f32, 0.5, -1.0], &Device::Cpu)?;
//! let u = SgdUpdate { lr: 0.1, ..SgdUpdate::default() };
//! // Ok(false) would mean: not applicable here (another device or dtype), compose it.
//! assert!(sgd_update(w.as_tensor(), &g, None, &u)?);
//! assert_eq!(w.to_vec1::<f32>()?, [1.0 - 0.05, -2.0 - 0.05, 3.0 + 0.1]);
//! # Ok(()) }
//! ```

use candle::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::util::{CHUNK, f32_data, par_sum_squares};

/// One parameter's SGD step (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdUpdate {
    /// η, the parameter's learning rate.
    pub lr: f64,
    /// s, the factor on the gradient.
    pub grad_scale: f64,
    /// λ, the weight decay (0: none).
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay instead of adding λ·w to the gradient.
    pub decoupled: bool,
    /// μ, the momentum (0: none, and no buffer).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// The buffer holds nothing yet: this step sets it to d.
    pub first: bool,
}

impl Default for SgdUpdate {
    fn default() -> Self {
        Self {
            lr: 0.0,
            grad_scale: 1.0,
            weight_decay: 0.0,
            decoupled: false,
            momentum: 0.0,
            nesterov: false,
            first: true,
        }
    }
}

/// The update's constants in `f32`, as candle's `affine` converts them (the CUDA kernels
/// take them too).
#[derive(Clone, Copy)]
pub(crate) struct Consts {
    pub(crate) scale: Option<f32>,
    pub(crate) coupled: Option<f32>,
    pub(crate) decay: Option<f32>,
    pub(crate) momentum: Option<f32>,
    pub(crate) nesterov: bool,
    pub(crate) first: bool,
    pub(crate) lr: f32,
}

impl Consts {
    fn new(u: &SgdUpdate) -> Self {
        let wd = u.weight_decay != 0.0;
        Self {
            scale: (u.grad_scale != 1.0).then_some(u.grad_scale as f32),
            coupled: (wd && !u.decoupled).then_some(u.weight_decay as f32),
            decay: (wd && u.decoupled).then_some((1.0 - u.lr * u.weight_decay) as f32),
            momentum: (u.momentum != 0.0).then_some(u.momentum as f32),
            nesterov: u.nesterov,
            first: u.first,
            lr: u.lr as f32,
        }
    }

    /// d from the gradient and the (undecayed) weight.
    #[inline(always)]
    fn direction(&self, g: f32, w: f32) -> f32 {
        let mut d = match self.scale {
            Some(s) => g * s + 0.0,
            None => g,
        };
        if let Some(l) = self.coupled {
            d += w * l + 0.0;
        }
        d
    }

    /// The new buffer from the old one and d.
    #[inline(always)]
    fn buffer(&self, b: f32, d: f32, mu: f32) -> f32 {
        if self.first { d } else { (b * mu + 0.0) + d }
    }

    /// The new weight from the old one, d and the new buffer.
    #[inline(always)]
    fn weight(&self, w: f32, d: f32, b: Option<f32>) -> f32 {
        let step = match (self.momentum, b) {
            (Some(mu), Some(b)) if self.nesterov => d + (b * mu + 0.0),
            (Some(_), Some(b)) => b,
            _ => d,
        };
        let w = match self.decay {
            Some(k) => w * k + 0.0,
            None => w,
        };
        w - (step * self.lr + 0.0)
    }
}

/// Applies one SGD step to `w` in place, and to the momentum buffer `buf` (same shape,
/// required when `u.momentum != 0`; with `u.first` its old contents are ignored).
///
/// Returns `Ok(false)`, touching nothing, where the in-place kernel does not apply (a
/// device other than the CPU, a dtype other than `f32`, non-contiguous tensors, or
/// [`crate::select`] naming candle's ops): the caller then composes the update from
/// candle's ops. With the `cuda` feature, contiguous `f32` tensors on CUDA run the same
/// update as one CUDA kernel (two with momentum) in the same `f32` operations. Without
/// momentum, `buf` is ignored.
///
/// # Errors
/// Shapes that differ, or a missing buffer with momentum.
pub fn sgd_update(w: &Tensor, g: &Tensor, buf: Option<&Tensor>, u: &SgdUpdate) -> Result<bool> {
    if w.shape() != g.shape() {
        candle::bail!(
            "sgd_update: gradient {:?} for a parameter {:?}",
            g.dims(),
            w.dims()
        )
    }
    let buf = if u.momentum != 0.0 {
        match buf {
            Some(b) if b.shape() == w.shape() => Some(b),
            Some(b) => candle::bail!(
                "sgd_update: momentum buffer {:?} for a parameter {:?}",
                b.dims(),
                w.dims()
            ),
            None => candle::bail!("sgd_update: momentum without a buffer"),
        }
    } else {
        None
    };
    let mut ts = vec![w, g];
    ts.extend(buf);
    let c = Consts::new(u);
    #[cfg(feature = "cuda")]
    if crate::cuda::fused_cuda_f32(&ts) && ts.iter().all(|t| t.is_contiguous()) {
        crate::cuda::sgd_update(w, g, buf, c)?;
        return Ok(true);
    }
    if !crate::util::fused_f32(&ts) || !ts.iter().all(|t| t.is_contiguous()) {
        return Ok(false);
    }
    match buf {
        None => w.inplace_op2(g, &WeightOp(c))?,
        Some(b) => {
            b.inplace_op3(g, w, &BufferOp(c))?;
            w.inplace_op3(g, b, &MomentumWeightOp(c))?;
        }
    }
    Ok(true)
}

/// The contiguous `f32` data of an in-place destination.
fn dst_f32<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let len = l.shape().elem_count();
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle::Error::Msg(format!("{op}: destination is not contiguous")))?;
    match s {
        CpuStorage::F32(v) if end - start == len => Ok(&mut v[start..end]),
        _ => candle::bail!("{op}: destination is not {len} contiguous f32 values"),
    }
}

/// dst ← f(dst, a, b) element by element, on rayon's threads, for the in-place ops with
/// two operands (errors name `op` and the operands, `names`).
fn update3(
    dst: &mut CpuStorage,
    dl: &Layout,
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    op: &str,
    names: [&str; 2],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Result<()> {
    let d = dst_f32(dst, dl, op)?;
    let a = f32_data(a, al, d.len(), op, names[0])?;
    let b = f32_data(b, bl, d.len(), op, names[1])?;
    d.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(dc, (ac, bc))| {
            for ((d, &a), &b) in dc.iter_mut().zip(ac).zip(bc) {
                *d = f(*d, a, b);
            }
        });
    Ok(())
}

/// w ← the new weight, from g (no momentum).
struct WeightOp(Consts);

impl InplaceOp2 for WeightOp {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let w = dst_f32(s1, l1, self.name())?;
        let g = f32_data(s2, l2, w.len(), self.name(), "gradient")?;
        let c = self.0;
        // Plain gradient descent, w − g·η, has a loop of its own that the compiler
        // vectorizes; the general one branches on the options per element.
        let plain = c.scale.is_none() && c.coupled.is_none() && c.decay.is_none();
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(wc, gc)| {
                if plain {
                    let lr = c.lr;
                    for (w, &g) in wc.iter_mut().zip(gc) {
                        *w -= g * lr + 0.0;
                    }
                } else {
                    for (w, &g) in wc.iter_mut().zip(gc) {
                        *w = c.weight(*w, c.direction(g, *w), None);
                    }
                }
            });
        Ok(())
    }
}

/// w ← the new weight, from g and the new momentum buffer.
struct MomentumWeightOp(Consts);

impl InplaceOp3 for MomentumWeightOp {
    fn name(&self) -> &'static str {
        "sgd-update-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let c = self.0;
        update3(
            s1,
            l1,
            (s2, l2),
            (s3, l3),
            self.name(),
            ["gradient", "buffer"],
            |w, g, b| c.weight(w, c.direction(g, w), Some(b)),
        )
    }
}

/// b ← the new momentum buffer, from g and w.
struct BufferOp(Consts);

impl InplaceOp3 for BufferOp {
    fn name(&self) -> &'static str {
        "sgd-momentum-buffer"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let c = self.0;
        let mu = c.momentum.unwrap_or(0.0);
        update3(
            s1,
            l1,
            (s2, l2),
            (s3, l3),
            self.name(),
            ["gradient", "weight"],
            |b, g, w| c.buffer(b, c.direction(g, w), mu),
        )
    }
}

/// Σ x² of a tensor's elements, in `f64`: a gradient's squared norm, for the gradient norms
/// a trainer records and clips by. One pass over a contiguous CPU `f32` tensor (`f32` lanes
/// within chunks of 2¹⁴ elements, `f64` across them, on rayon's threads) where candle's
/// `sqr().sum_all()` writes a temporary as large as the tensor first; that composition
/// (summed in the tensor's dtype) on other devices and dtypes, for non-contiguous tensors,
/// and when [`crate::select`] names candle's ops.
///
/// ```
/// use candle::{Device, Tensor};
///
/// # fn main() -> candle::Result<()> {
/// let g = Tensor::new(&[3f32, -4.0, 12.0], &Device::Cpu)?;
/// assert_eq!(tau_kernels::sgd::sum_squares(&g)?, 169.0);
/// # Ok(()) }
/// ```
///
/// # Errors
/// Device errors of the composed path.
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    if crate::util::fused_f32(&[t]) && t.is_contiguous() {
        let (guard, layout) = t.storage_and_layout();
        if let candle::Storage::Cpu(s) = &*guard {
            let x = f32_data(s, layout, t.elem_count(), "sum_squares", "input")?;
            return Ok(par_sum_squares(x));
        }
    }
    t.sqr()?
        .sum_all()?
        .to_dtype(candle::DType::F64)?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{Kernels, with_kernels};
    use candle::{DType, Device, Var};

    /// The composed update, as the optimizer wrote it with candle's ops.
    fn composed(
        w: &Tensor,
        g: &Tensor,
        b: Option<&Tensor>,
        u: &SgdUpdate,
    ) -> (Tensor, Option<Tensor>) {
        let mut w = w.clone();
        let mut d = if u.grad_scale == 1.0 {
            g.clone()
        } else {
            g.affine(u.grad_scale, 0.0).unwrap()
        };
        if u.weight_decay != 0.0 {
            if u.decoupled {
                w = w.affine(1.0 - u.lr * u.weight_decay, 0.0).unwrap();
            } else {
                d = (d + w.affine(u.weight_decay, 0.0).unwrap()).unwrap();
            }
        }
        let mut nb = None;
        if u.momentum != 0.0 {
            let b = if u.first {
                d.clone()
            } else {
                (b.unwrap().affine(u.momentum, 0.0).unwrap() + &d).unwrap()
            };
            d = if u.nesterov {
                (d + b.affine(u.momentum, 0.0).unwrap()).unwrap()
            } else {
                b.clone()
            };
            nb = Some(b);
        }
        ((w - d.affine(u.lr, 0.0).unwrap()).unwrap(), nb)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn matches_the_composed_update_bit_for_bit() {
        let dev = Device::Cpu;
        // Long enough for several rayon chunks, with an odd tail.
        let n = 3 * CHUNK + 17;
        let w0 = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let b0 = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        for momentum in [0.0, 0.9] {
            for nesterov in [false, true] {
                for (weight_decay, decoupled) in [(0.0, false), (5e-4, false), (5e-4, true)] {
                    for grad_scale in [1.0, 1.0 / 3.0] {
                        for first in [true, false] {
                            let u = SgdUpdate {
                                lr: 0.07,
                                grad_scale,
                                weight_decay,
                                decoupled,
                                momentum,
                                nesterov,
                                first,
                            };
                            let (want_w, want_b) = composed(&w0, &g, Some(&b0), &u);
                            let w = Var::from_tensor(&w0).unwrap();
                            let b = b0.copy().unwrap();
                            assert!(
                                sgd_update(w.as_tensor(), &g, Some(&b), &u).unwrap(),
                                "{u:?}"
                            );
                            assert_eq!(bits(w.as_tensor()), bits(&want_w), "{u:?}");
                            if let Some(want_b) = want_b {
                                assert_eq!(bits(&b), bits(&want_b), "{u:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_cover_and_rejects_bad_shapes() {
        let dev = Device::Cpu;
        let u = SgdUpdate {
            lr: 0.1,
            ..SgdUpdate::default()
        };
        let w64 = Tensor::zeros(4, DType::F64, &dev).unwrap();
        assert!(!sgd_update(&w64, &w64.ones_like().unwrap(), None, &u).unwrap());
        let w = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let g = w.ones_like().unwrap();
        assert!(!with_kernels(Kernels::Candle, || sgd_update(&w, &g, None, &u)).unwrap());
        assert_eq!(w.to_vec1::<f32>().unwrap(), [0.0; 4]);
        let err =
            sgd_update(&w, &Tensor::zeros(5, DType::F32, &dev).unwrap(), None, &u).unwrap_err();
        assert!(err.to_string().contains("gradient [5]"), "{err}");
        let m = SgdUpdate { momentum: 0.9, ..u };
        assert!(
            sgd_update(&w, &g, None, &m)
                .unwrap_err()
                .to_string()
                .contains("without a buffer")
        );
    }

    /// Σ x² against the same sum in f64, for lengths around the lane and chunk sizes; the
    /// composed path (candle's ops forced, a transposed tensor, f64) gives the same value.
    #[test]
    fn sum_squares_matches_an_f64_sum() {
        let dev = Device::Cpu;
        for n in [0usize, 1, 15, 16, 17, (1 << 14) - 1, (1 << 14) + 5, 100_003] {
            let vals: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 3.0)
                .collect();
            let exact: f64 = vals.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let t = Tensor::from_vec(vals, n, &dev).unwrap();
            let fused = sum_squares(&t).unwrap();
            let tol = 1e-6 * exact.max(1e-30);
            assert!((fused - exact).abs() <= tol, "n = {n}: {fused} vs {exact}");
            let composed = with_kernels(Kernels::Candle, || sum_squares(&t)).unwrap();
            assert!(
                (composed - exact).abs() <= 1e-5 * exact.max(1e-30),
                "n = {n}"
            );
        }
        let m = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let exact: f64 = (0..12).map(|i| (i * i) as f64).sum();
        assert_eq!(sum_squares(&m.t().unwrap()).unwrap(), exact);
        assert_eq!(
            sum_squares(&m.to_dtype(DType::F64).unwrap()).unwrap(),
            exact
        );
    }
}
