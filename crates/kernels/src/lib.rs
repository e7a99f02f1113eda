//! CPU kernels for deep ResNets in candle, each a candle custom op with a hand-written
//! backward, and each falling back to a composition of candle's own ops on other devices,
//! for other dtypes, or when [`select`] says so. On CUDA, the `cudnn` feature runs the
//! convolutions and training-mode BatchNorms through cuDNN, and any CUDA build runs ReLU,
//! the blocks' elementwise chains and the SGD update as the crate's own CUDA kernels.
//!
//! | module | ops |
//! | --- | --- |
//! | [`conv`] | 2-D convolution: direct 3×3 kernels (AVX-512 or AVX2 + FMA, chosen at run time), im2col + GEMM elsewhere; the convolution of a shifted input |
//! | [`batch_norm`] | BatchNorm in training mode (+ ReLU), and the end of a basic block relu(τ·BN(x) + shortcut) |
//! | [`elementwise`] | a scalar bias (+ ReLU), ReLU, relu(x + b) + c, relu(τ·(x + b) + shortcut) |
//! | [`pool`] | the 3×3/2 max pool (PyTorch's semantics), the global average pool |
//! | [`shortcut`] | the option-A shortcut, the stride-2 subsample |
//! | [`block`] | a whole basic block, with or without BatchNorm, as one op |
//! | [`matmul`], [`probe`] | the theory network's block product (one op, and whole chains of blocks run by one team of threads for full-batch GD) and the element-wise passes of its stability probe |
//! | [`sgd`] | the SGD update (weight decay, momentum, Nesterov) in place |
//! | [`select`] | which kernels run: candle's, the convolution only, or every op with a [`select::KernelSet`] |
//! | [`alloc`] | the allocator policy for CPU training |
//!
//! Every op is one node of candle's graph, so one gradient tensor in candle's `backward`
//! (which zero-fills and accumulates each node's gradient on the calling thread) instead of
//! one per composed op; the elementwise passes run on rayon's threads and reduce in `f64`.
//! The crate knows tensors and kernels only: no model names, no configs.
//!
//! # Example
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use tau_kernels::select::{KernelSet, with_kernels};
//!
//! # fn main() -> candle::Result<()> {
//! let x = Var::randn(0f32, 1., (2, 16, 8, 8), &Device::Cpu)?;
//! let w = Var::randn(0f32, 0.1, (16, 16, 3, 3), &Device::Cpu)?;
//! let b = Tensor::new(&[0.1f32], &Device::Cpu)?;
//! // conv(relu(x + b)), its gradients through the crate's backward ops.
//! let h = tau_kernels::add_scalar(x.as_tensor(), &b, true)?;
//! let y = tau_kernels::conv2d(&h, w.as_tensor(), 1, 1)?;
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(w.as_tensor()).unwrap().dims(), [16, 16, 3, 3]);
//! // The same with the portable kernels, whatever the CPU.
//! let y2 = with_kernels(KernelSet::Portable, || tau_kernels::conv2d(&h, w.as_tensor(), 1, 1))?;
//! let diff = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok(()) }
//! ```

pub mod alloc;
pub mod batch_norm;
pub mod block;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod elementwise;
pub mod matmul;
pub mod pool;
pub mod probe;
pub mod select;
pub mod sgd;
pub mod shortcut;
mod team;
mod util;

#[cfg(test)]
mod test_util;

pub use batch_norm::{batch_norm_residual_relu, batch_norm_t};
pub use block::{batch_norm_block, fixup_block, scalar_bias_block};
pub use conv::{conv2d, conv2d_shifted};
pub use elementwise::{add_scalar, bias_relu_bias, relu, residual_relu};
pub use pool::{global_avg_pool, max_pool_3x3_s2, max_pool_3x3_s2_composed};
pub use shortcut::{option_a_shortcut, subsample2};
