//! 2-D convolution for deep ResNets: one entry point, a fast CPU path, candle's kernels
//! everywhere else.
//!
//! On the CPU, for `f32`, [`conv2d`] runs a candle custom op. 3×3, stride-1, padding-1
//! convolutions (most of a CIFAR ResNet) run direct AVX-512 or AVX2 kernels on
//! zero-bordered image planes where the selected kernel set and the CPU have them
//! (`direct`); every other shape runs im2col + GEMM forward and two more GEMMs backward
//! (the weight gradient against the re-lowered input, the input gradient through col2im)
//! with the `gemm` crate (`cpu`). Both use all of rayon's threads. Stock candle 0.11.1
//! computes the backward of its `conv2d` with direct loops (`conv_transpose2d`, and a
//! convolution with an image-sized kernel), which is an order of magnitude slower. On CUDA
//! and Metal, for other dtypes, and with [`crate::select::Kernels::Candle`], candle's own
//! `conv2d` runs, except that with the `cudnn` feature, `f32` convolutions on CUDA run
//! cuDNN's forward, backward-data and backward-filter passes (`cudnn`).

mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;
mod direct;

use candle::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::util::{f32_data, par_sum, written, written_with_spare};
pub(crate) use cpu::Geom;

/// Convolves `xs` (N, C_in, H, W) with `weight` (C_out, C_in, K, K), no bias.
///
/// # Shapes
/// Output is (N, C_out, (H + 2p − K)/s + 1, (W + 2p − K)/s + 1).
///
/// # Errors
/// Fails when the shapes do not fit together, when the weight has no input or output
/// channels, or when `stride` is zero.
pub fn conv2d(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = (xs.device().is_cpu() || (cfg!(feature = "cudnn") && xs.device().is_cuda()))
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && crate::select::kernels().own_conv();
    if !fast {
        return xs.conv2d(weight, padding, stride, 1, 1);
    }
    let g = geometry(xs, weight, stride, padding)?;
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op2(&weight, Conv2dGemm(g))
}

/// Checks the shapes of a convolution and derives its output size.
pub(crate) fn geometry(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Geom> {
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
        kernels: crate::select::kernels().set(),
    })
}

/// The output of conv(x + b) (conv(x) when `b` is `None`) as a storage and its shape.
fn forward_storage(g: &Geom, x: &[f32], b: Option<f32>, w: &[f32]) -> (CpuStorage, Shape) {
    let out = forward_vec(g, x, b, w);
    let shape = Shape::from((g.n, g.c_out, g.h_out, g.w_out));
    (CpuStorage::F32(out), shape)
}

/// conv(x + b) (conv(x) when `b` is `None`), n × c_out × h_out × w_out: the direct kernels
/// where they apply (they add `b` while copying the input), otherwise im2col + GEMM on a
/// shifted copy of the input.
pub(crate) fn forward_vec(g: &Geom, x: &[f32], b: Option<f32>, w: &[f32]) -> Vec<f32> {
    let len = g.n * g.c_out * g.h_out * g.w_out;
    if direct::applies(g) {
        written(len, |out| direct::forward(g, x, b, w, out))
    } else {
        let mut out = vec![0f32; len];
        match b {
            Some(b) => cpu::forward(g, &shifted(x, b), w, &mut out),
            None => cpu::forward(g, x, w, &mut out),
        }
        out
    }
}

/// The input gradient (n × c_in × h × w) of a convolution, in a vector with capacity for
/// `spare` more elements (pushed later without a copy).
pub(crate) fn backward_input_vec(g: &Geom, dy: &[f32], w: &[f32], spare: usize) -> Vec<f32> {
    let len = g.n * g.c_in * g.h * g.w;
    if direct::applies(g) {
        written_with_spare(len, spare, |dx| direct::backward_input(g, dy, w, dx))
    } else {
        let mut dx = Vec::with_capacity(len + spare);
        dx.resize(len, 0f32);
        cpu::backward_input(g, dy, w, &mut dx);
        dx
    }
}

/// The weight gradient (c_out × c_in × k × k) of the convolution of `x` + `bias`.
pub(crate) fn backward_weight_vec(g: &Geom, dy: &[f32], x: &[f32], bias: Option<f32>) -> Vec<f32> {
    let mut dw = vec![0f32; g.c_out * g.c_in * g.k * g.k];
    if direct::applies(g) {
        direct::backward_weight(g, dy, x, bias, &mut dw);
    } else {
        match bias {
            None => cpu::backward_weight(g, dy, x, &mut dw),
            Some(b) => cpu::backward_weight(g, dy, &shifted(x, b), &mut dw),
        }
    }
    dw
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
        let x = f32_data(s1, l1, g.n * g.c_in * g.h * g.w, "conv2d", "input")?;
        let w = f32_data(s2, l2, g.c_out * g.c_in * g.k * g.k, "conv2d", "weight")?;
        Ok(forward_storage(g, x, None, w))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        cudnn::forward(&self.0, s1, l1, s2, l2)
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
            Some(grad.apply_op2_no_bwd(
                weight,
                &Conv2dGemmGradInput {
                    g: self.0,
                    sum: false,
                },
            )?)
        } else {
            None
        };
        let d_weight = if weight.track_op() {
            Some(grad.apply_op2_no_bwd(
                xs,
                &Conv2dGemmGradWeight {
                    g: self.0,
                    bias: None,
                },
            )?)
        } else {
            None
        };
        Ok((d_xs, d_weight))
    }
}

/// `conv2d(xs + b, weight, stride, padding)` for a one-element `b` (a scalar bias added to
/// the input, zero padding outside it), without an activation-sized tensor for `xs + b`.
///
/// On the CPU for `f32` (with the fused ops selected in [`crate::select`]), one custom op: the direct
/// kernels add `b` while copying each image into its zero-bordered planes, the im2col +
/// GEMM path convolves a shifted copy of the input that lives only inside the op; the
/// backward gives dx (the convolution's input gradient), dW (against x + b, recomputed
/// the same way) and db = Σ dx. Elsewhere it is [`crate::elementwise::add_scalar`] followed by
/// [`conv2d`]. Either way the result equals that composition: x + b is rounded to `f32`
/// before the convolution in both.
///
/// # Errors
/// As [`conv2d`], or a `b` with more than one element.
pub fn conv2d_shifted(
    xs: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if b.elem_count() != 1 {
        candle::bail!(
            "conv2d_shifted: bias must have one element, got {:?}",
            b.dims()
        );
    }
    let fast = xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && b.dtype() == DType::F32
        && b.device().is_cpu()
        && crate::select::kernels().fused();
    if !fast {
        return conv2d(
            &crate::elementwise::add_scalar(xs, b, false)?,
            weight,
            stride,
            padding,
        );
    }
    let g = geometry(xs, weight, stride, padding)?;
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    xs.apply_op3(&weight, &b.flatten_all()?, Conv2dShifted(g))
}

/// `x + b` for every element, on rayon's threads.
fn shifted(x: &[f32], b: f32) -> Vec<f32> {
    written(x.len(), |out| {
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(oc, xc)| {
                for (o, &v) in oc.iter_mut().zip(xc) {
                    o.write(v + b);
                }
            })
    })
}

/// Forward of [`conv2d_shifted`]: (x, weight, b) → conv(x + b, weight).
struct Conv2dShifted(Geom);

impl CustomOp3 for Conv2dShifted {
    fn name(&self) -> &'static str {
        "conv2d-shifted-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let x = f32_data(s1, l1, g.n * g.c_in * g.h * g.w, "conv2d", "input")?;
        let w = f32_data(s2, l2, g.c_out * g.c_in * g.k * g.k, "conv2d", "weight")?;
        let b = f32_data(s3, l3, 1, "conv2d", "input bias")?[0];
        Ok(forward_storage(g, x, Some(b), w))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let grad = grad.contiguous()?;
        let (d_xs, d_b) = if xs.track_op() || b.track_op() {
            let out = grad.apply_op2_no_bwd(weight, &Conv2dGemmGradInput { g, sum: true })?;
            let len = g.n * g.c_in * g.h * g.w;
            let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
            let db = out.narrow(0, len, 1)?.reshape(b.shape())?;
            (xs.track_op().then_some(dx), b.track_op().then_some(db))
        } else {
            (None, None)
        };
        let d_weight = if weight.track_op() {
            let bias = b.flatten_all()?.to_vec1::<f32>()?[0];
            Some(grad.apply_op2_no_bwd(
                xs,
                &Conv2dGemmGradWeight {
                    g,
                    bias: Some(bias),
                },
            )?)
        } else {
            None
        };
        Ok((d_xs, d_weight, d_b))
    }
}

/// Input gradient of [`Conv2dGemm`] and [`Conv2dShifted`]: (grad of output, weight) →
/// grad of input, followed, when `sum` is set, by one more element: the sum of that
/// gradient (the gradient of the input bias of [`conv2d_shifted`]).
struct Conv2dGemmGradInput {
    g: Geom,
    sum: bool,
}

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
        let g = &self.g;
        let dy = f32_data(
            s1,
            l1,
            g.n * g.c_out * g.h_out * g.w_out,
            "conv2d",
            "output gradient",
        )?;
        let w = f32_data(s2, l2, g.c_out * g.c_in * g.k * g.k, "conv2d", "weight")?;
        let len = g.n * g.c_in * g.h * g.w;
        // One spare element for the sum: pushing it into a full vector would copy dx.
        let mut dx = backward_input_vec(g, dy, w, usize::from(self.sum));
        if !self.sum {
            return Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c_in, g.h, g.w))));
        }
        let total = par_sum(&dx);
        dx.push(total as f32);
        Ok((CpuStorage::F32(dx), Shape::from(len + 1)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        if self.sum {
            // conv2d_shifted is composed (add_scalar, then conv2d) off the CPU.
            candle::bail!("conv2d (cuDNN): no input-bias gradient on CUDA");
        }
        cudnn::backward_input(&self.g, s1, l1, s2, l2)
    }
}

/// Weight gradient of [`Conv2dGemm`] and [`Conv2dShifted`]: (grad of output, input) →
/// grad of weight, for the convolution of the input + `bias`.
struct Conv2dGemmGradWeight {
    g: Geom,
    bias: Option<f32>,
}

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
        let g = &self.g;
        let dy = f32_data(
            s1,
            l1,
            g.n * g.c_out * g.h_out * g.w_out,
            "conv2d",
            "output gradient",
        )?;
        let x = f32_data(s2, l2, g.n * g.c_in * g.h * g.w, "conv2d", "input")?;
        let dw = backward_weight_vec(g, dy, x, self.bias);
        Ok((
            CpuStorage::F32(dw),
            Shape::from((g.c_out, g.c_in, g.k, g.k)),
        ))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        if self.bias.is_some() {
            candle::bail!("conv2d (cuDNN): no shifted-input convolution on CUDA");
        }
        cudnn::backward_weight(&self.g, s1, l1, s2, l2)
    }
}

#[cfg(test)]
pub(crate) mod tests;
