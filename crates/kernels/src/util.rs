//! Pieces every CPU op shares: checked access to a storage's `f32` data, outputs filled
//! without zeroing first, `f64` sums of `f32` lanes, the scalars of small operands, and
//! whether the fused path applies to a set of tensors.

use std::sync::Mutex;

use candle::{CpuStorage, DType, Layout, Result, Tensor};
use rayon::prelude::*;

/// The contiguous `f32` data of a storage, checked to hold exactly `len` elements; errors
/// name the op and the operand (`what`). Shared by every op of the crate.
pub(crate) fn f32_data<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(&data[start..end]),
        Some((start, end)) => candle::bail!(
            "{op}: {what} holds {} elements, expected {len}",
            end - start
        ),
        None => candle::bail!("{op}: {what} is not contiguous"),
    }
}

/// A vector of `len` floats filled by `fill`, which must write every element of the slice
/// it is given. The outputs of the direct kernels and of the fused ops are fully
/// overwritten, so zeroing them first (megabytes per call, on the calling thread, where the
/// other cores wait) is wasted.
pub(crate) fn written(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    written_with_spare(len, 0, fill)
}

/// [`written`] with capacity for `spare` more elements, to be pushed without a copy.
pub(crate) fn written_with_spare(
    len: usize,
    spare: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + spare);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialized all `len` elements (its contract; the direct kernels assert
    // the length and write every element of it), and the capacity is at least `len`.
    unsafe { v.set_len(len) };
    v
}

/// Σ x in `f64`, on rayon's threads (16 `f32` lanes within each chunk).
/// max(v, 0) that keeps a NaN, as PyTorch's ReLU does (`f32::max` would return 0): a
/// non-finite hidden state then shows as a non-finite loss instead of silently becoming
/// zero. Compiles to one `max` instruction with the operands in this order.
#[inline(always)]
pub(crate) fn relu_f32(v: f32) -> f32 {
    if 0.0 > v { 0.0 } else { v }
}

pub(crate) fn par_sum(x: &[f32]) -> f64 {
    par_lane_sum(x, |v| v)
}

/// Σ x² in `f64`, on rayon's threads (16 `f32` lanes within each chunk).
pub(crate) fn par_sum_squares(x: &[f32]) -> f64 {
    par_lane_sum(x, |v| v * v)
}

/// Σ f(x) in `f64`, on rayon's threads: chunks of 2¹⁴ elements, element i of a chunk added
/// into `f32` lane i mod 16, the lanes and the chunks summed in `f64`.
fn par_lane_sum(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> f64 {
    x.par_chunks(1 << 14)
        .map(|c| {
            let mut acc = [0f32; 16];
            let mut lanes = c.chunks_exact(16);
            for ch in &mut lanes {
                for (a, &v) in acc.iter_mut().zip(ch) {
                    *a += f(v);
                }
            }
            for (a, &v) in acc.iter_mut().zip(lanes.remainder()) {
                *a += f(v);
            }
            lanes_sum(&acc)
        })
        .sum()
}

/// Σ of 16 per-lane `f32` partial sums, in `f64` (the lanes of the vectorized reductions
/// here and in the convolution and block ops).
pub(crate) fn lanes_sum(acc: &[f32; 16]) -> f64 {
    acc.iter().map(|&v| v as f64).sum()
}

/// The state of a fused op's forward pass, locked.
pub(crate) fn lock_state<T>(state: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    state
        .lock()
        .map_err(|_| candle::Error::Msg("fused op state poisoned".into()))
}

/// Reads the one or two scalars of a small storage.
pub(crate) fn scalars(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f32>> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(data[start..end].to_vec()),
        None => candle::bail!("{what} is not contiguous"),
    }
}

/// Values per parallel work item of the elementwise ops.
pub(crate) const CHUNK: usize = 1 << 14;

/// Whether the fused elementwise path applies: `f32` CPU tensors, fused ops selected.
pub(crate) fn fused_f32(ts: &[&Tensor]) -> bool {
    crate::select::kernels().fused()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether the fused CUDA ops apply (`crate::cuda::fused_cuda_f32`); never without the
/// `cuda` feature.
pub(crate) fn fused_cuda_f32(ts: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    return crate::cuda::fused_cuda_f32(ts);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ts;
        false
    }
}

/// Sum of a slice in f64 (f32 lanes within the slice, which are short: one image-channel).
pub(crate) fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += *v;
        }
    }
    lanes_sum(&acc) + rest as f64
}
