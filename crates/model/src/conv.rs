//! 2-D convolution for the τ-ResNets: one entry point, a fast CPU path, candle's kernels
//! everywhere else.
//!
//! On the CPU, for `f32`, [`conv2d`] runs a candle custom op. 3×3, stride-1, padding-1
//! convolutions (most of a CIFAR ResNet) run direct AVX-512 kernels on zero-bordered image
//! planes where the CPU has AVX-512F (`direct`); every other shape runs im2col + GEMM
//! forward and two more GEMMs backward (the weight gradient against the re-lowered input,
//! the input gradient through col2im) with the `gemm` crate (`cpu`). Both use all of
//! rayon's threads. Stock candle 0.11.1 computes the backward of its `conv2d` with direct
//! loops (`conv_transpose2d`, and a convolution with an image-sized kernel), which is an
//! order of magnitude slower. On CUDA and Metal, and for other dtypes, candle's own
//! `conv2d` runs.

mod cpu;
mod direct;

use std::sync::atomic::{AtomicBool, Ordering};

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use cpu::Geom;

/// Which implementation [`conv2d`] uses on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuConvBackend {
    /// im2col + GEMM forward and backward (the default).
    Gemm,
    /// candle's own `Tensor::conv2d` and its autograd (the slow baseline, for comparison).
    Candle,
}

static USE_CANDLE_ON_CPU: AtomicBool = AtomicBool::new(false);

/// Selects the CPU convolution for the whole process; benchmarks use it to measure the
/// stock-candle baseline with the same models.
pub fn set_cpu_backend(backend: CpuConvBackend) {
    USE_CANDLE_ON_CPU.store(backend == CpuConvBackend::Candle, Ordering::Relaxed);
}

/// The CPU convolution currently selected by [`set_cpu_backend`].
pub fn cpu_backend() -> CpuConvBackend {
    if USE_CANDLE_ON_CPU.load(Ordering::Relaxed) {
        CpuConvBackend::Candle
    } else {
        CpuConvBackend::Gemm
    }
}

/// Convolves `xs` (N, C_in, H, W) with `weight` (C_out, C_in, K, K), no bias.
///
/// # Shapes
/// Output is (N, C_out, (H + 2p − K)/s + 1, (W + 2p − K)/s + 1).
///
/// # Errors
/// Fails when the shapes do not fit together, when the weight has no input or output
/// channels, or when `stride` is zero.
pub fn conv2d(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && cpu_backend() == CpuConvBackend::Gemm;
    if !fast {
        return xs.conv2d(weight, padding, stride, 1, 1);
    }
    let g = geometry(xs, weight, stride, padding)?;
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op2(&weight, Conv2dGemm(g))
}

/// Checks the shapes of a convolution and derives its output size.
fn geometry(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Geom> {
    let (n, c_in, h, w) = xs.dims4()?;
    let (c_out, c_in_w, kh, kw) = weight.dims4()?;
    if c_in != c_in_w {
        candle::bail!(
            "conv2d: input has {c_in} channels but the weight {:?} expects {c_in_w}",
            weight.dims()
        );
    }
    if c_in == 0 || c_out == 0 {
        candle::bail!(
            "conv2d: the weight {:?} has no input or no output channels",
            weight.dims()
        );
    }
    if kh != kw {
        candle::bail!("conv2d: only square kernels are supported, got {kh}×{kw}");
    }
    if stride == 0 {
        candle::bail!("conv2d: stride must be at least 1");
    }
    if kh == 0 || h + 2 * padding < kh || w + 2 * padding < kh {
        candle::bail!(
            "conv2d: kernel {kh}×{kh} does not fit the padded input {}×{}",
            h + 2 * padding,
            w + 2 * padding
        );
    }
    Ok(Geom {
        n,
        c_in,
        h,
        w,
        c_out,
        k: kh,
        stride,
        padding,
        h_out: (h + 2 * padding - kh) / stride + 1,
        w_out: (w + 2 * padding - kh) / stride + 1,
    })
}

/// The contiguous `f32` data of a storage, checked to hold exactly `len` elements.
fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, len: usize, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(&data[start..end]),
        Some((start, end)) => candle::bail!(
            "conv2d: {what} holds {} elements, expected {len}",
            end - start
        ),
        None => candle::bail!("conv2d: {what} is not contiguous"),
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
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialized all `len` elements (its contract; the direct kernels assert
    // the length and write every element of it), and the capacity is at least `len`.
    unsafe { v.set_len(len) };
    v
}

/// Forward of the CPU convolution; its backward is [`Conv2dGemmGradInput`] and
/// [`Conv2dGemmGradWeight`].
struct Conv2dGemm(Geom);

impl CustomOp2 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let x = f32_data(s1, l1, g.n * g.c_in * g.h * g.w, "input")?;
        let w = f32_data(s2, l2, g.c_out * g.c_in * g.k * g.k, "weight")?;
        let len = g.n * g.c_out * g.h_out * g.w_out;
        let out = if direct::applies(g) {
            written(len, |out| direct::forward(g, x, w, out))
        } else {
            let mut out = vec![0f32; len];
            cpu::forward(g, x, w, &mut out);
            out
        };
        let shape = Shape::from((g.n, g.c_out, g.h_out, g.w_out));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The input of the first layer is data: its gradient is never used.
        let d_xs = if xs.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &Conv2dGemmGradInput(self.0))?)
        } else {
            None
        };
        let d_weight = if weight.track_op() {
            Some(grad.apply_op2_no_bwd(xs, &Conv2dGemmGradWeight(self.0))?)
        } else {
            None
        };
        Ok((d_xs, d_weight))
    }
}

/// Input gradient of [`Conv2dGemm`]: (grad of output, weight) → grad of input.
struct Conv2dGemmGradInput(Geom);

impl CustomOp2 for Conv2dGemmGradInput {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dy = f32_data(s1, l1, g.n * g.c_out * g.h_out * g.w_out, "output gradient")?;
        let w = f32_data(s2, l2, g.c_out * g.c_in * g.k * g.k, "weight")?;
        let len = g.n * g.c_in * g.h * g.w;
        let dx = if direct::applies(g) {
            written(len, |dx| direct::backward_input(g, dy, w, dx))
        } else {
            let mut dx = vec![0f32; len];
            cpu::backward_input(g, dy, w, &mut dx);
            dx
        };
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c_in, g.h, g.w))))
    }
}

/// Weight gradient of [`Conv2dGemm`]: (grad of output, input) → grad of weight.
struct Conv2dGemmGradWeight(Geom);

impl CustomOp2 for Conv2dGemmGradWeight {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dy = f32_data(s1, l1, g.n * g.c_out * g.h_out * g.w_out, "output gradient")?;
        let x = f32_data(s2, l2, g.n * g.c_in * g.h * g.w, "input")?;
        let mut dw = vec![0f32; g.c_out * g.c_in * g.k * g.k];
        if direct::applies(g) {
            direct::backward_weight(g, dy, x, &mut dw);
        } else {
            cpu::backward_weight(g, dy, x, &mut dw);
        }
        Ok((
            CpuStorage::F32(dw),
            Shape::from((g.c_out, g.c_in, g.k, g.k)),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests;
