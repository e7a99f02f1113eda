//! Fused elementwise ops on CUDA (the `cuda` feature): ReLU, the middle of a no-BN block
//! relu(x + b) + c, and the end of a residual block relu(τ·(x + b) + s), each one kernel
//! forward and one backward, where candle's
//! composition (`x ⊙ 1(x > 0)`, broadcast products and sums) launches three to five kernels
//! forward and more backward, each a pass over the activation.
//!
//! The kernels are `src/cuda/elementwise.cu`, compiled to PTX by the build script and
//! loaded once per device (`CudaDevice::get_or_load_custom_func`). The scalars τ and b stay
//! on the device (no copy to the host, so no synchronization); their gradients, which only
//! trainable τ and b need, are sums composed of candle ops.

use candle::cuda_backend::WrapErr;
use candle::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3};
use candle::{DType, Layout, Result, Shape, Tensor};

use crate::sgd::Consts;

/// The PTX of `src/cuda/elementwise.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
/// The module name the PTX is cached under on each device.
const MODULE: &str = "tau_kernels_elementwise";

/// Whether the fused CUDA ops apply: `f32` tensors on a CUDA device, fused ops selected.
pub(crate) fn fused_cuda_f32(ts: &[&Tensor]) -> bool {
    crate::select::kernels().fused()
        && ts
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
}

/// A contiguous `f32` operand of `len` elements of the CUDA op `op`, as a view from its
/// layout's offset (shared by every CUDA op of the crate).
pub(crate) fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let range = contiguous_range(l, len, op, what)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(range))
}

/// The element range of a contiguous operand of `len` elements, or an error naming it.
fn contiguous_range(
    l: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<std::ops::Range<usize>> {
    if !l.is_contiguous() || l.shape().elem_count() != len {
        candle::bail!(
            "{op}: {what} must be a contiguous tensor of {len} elements, got {:?}",
            l.dims()
        );
    }
    Ok(l.start_offset()..l.start_offset() + len)
}

/// A dimension of a cuDNN descriptor (an `i32`), or an error naming the op.
#[cfg(feature = "cudnn")]
pub(crate) fn dim_i32(v: usize, op: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle::Error::Msg(format!("{op}: dimension {v} exceeds i32")))
}

/// The element count as the kernels take it.
fn count(len: usize) -> Result<u32> {
    u32::try_from(len)
        .map_err(|_| candle::Error::Msg(format!("fused CUDA op: {len} elements exceed u32")))
}

/// An uninitialized output of `len` `f32` (every kernel and cuDNN call that receives one
/// writes all of it).
pub(crate) fn output(
    dev: &CudaDevice,
    len: usize,
) -> Result<candle::cuda_backend::cudarc::driver::CudaSlice<f32>> {
    // SAFETY: whatever receives it writes every element before it is read.
    unsafe { dev.alloc::<f32>(len) }
}

/// `max(x, 0)` with the gradient masked where the output is positive.
pub(crate) fn relu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(ReluCuda)
}

struct ReluCuda;

impl CustomOp1 for ReluCuda {
    fn name(&self) -> &'static str {
        "relu-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let len = l.shape().elem_count();
        let n = count(len)?;
        let dev = &s.device;
        let x = f32_view(s, l, len, self.name(), "input")?;
        let y = output(dev, len)?;
        let func = dev.get_or_load_custom_func("tau_relu_fwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&x);
        b.arg(&y);
        // SAFETY: the arguments match the kernel's signature; x and y hold n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, xs: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = grad.contiguous()?.apply_op2_no_bwd(res, &ReluBwdCuda)?;
        Ok(Some(dx.reshape(xs.shape())?))
    }
}

/// (dy, y) → dy ⊙ 1(y > 0).
struct ReluBwdCuda;

impl CustomOp2 for ReluBwdCuda {
    fn name(&self) -> &'static str {
        "relu-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = &s1.device;
        let dy = f32_view(s1, l1, len, self.name(), "output gradient")?;
        let y = f32_view(s2, l2, len, self.name(), "output")?;
        let dx = output(dev, len)?;
        let func = dev.get_or_load_custom_func("tau_relu_bwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&dy);
        b.arg(&y);
        b.arg(&dx);
        // SAFETY: as in the forward.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            l1.shape().clone(),
        ))
    }
}

/// relu(τ·(branch + b) + shortcut), `ab` = [τ] or [τ, b] (`has_b`), shapes checked by the
/// caller.
pub(crate) fn residual_relu(
    branch: &Tensor,
    ab: &Tensor,
    has_b: bool,
    shortcut: &Tensor,
) -> Result<Tensor> {
    branch
        .contiguous()?
        .apply_op3(ab, &shortcut.contiguous()?, ResidualReluCuda { has_b })
}

struct ResidualReluCuda {
    has_b: bool,
}

impl CustomOp3 for ResidualReluCuda {
    fn name(&self) -> &'static str {
        "residual-relu-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = &s1.device;
        let x = f32_view(s1, l1, len, self.name(), "branch")?;
        let ab = f32_view(s2, l2, 1 + usize::from(self.has_b), self.name(), "scalars")?;
        let s = f32_view(s3, l3, len, self.name(), "shortcut")?;
        let y = output(dev, len)?;
        let has_b = i32::from(self.has_b);
        let func = dev.get_or_load_custom_func("tau_residual_relu_fwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&x);
        b.arg(&ab);
        b.arg(&has_b);
        b.arg(&s);
        b.arg(&y);
        // SAFETY: as in the ReLU.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        branch: &Tensor,
        ab: &Tensor,
        shortcut: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let len = branch.elem_count();
        let out = grad
            .contiguous()?
            .apply_op3_no_bwd(res, ab, &ResidualReluBwdCuda)?;
        let dx = out.narrow(0, 0, len)?.reshape(branch.shape())?;
        // m = dy ⊙ 1(y > 0), the shortcut's gradient.
        let m = out.narrow(0, len, len)?.reshape(shortcut.shape())?;
        let d_ab = if ab.track_op() {
            let tau = ab.narrow(0, 0, 1)?;
            let pre = if self.has_b {
                branch.broadcast_add(&ab.narrow(0, 1, 1)?)?
            } else {
                branch.clone()
            };
            // dτ = Σ m·(x + b); db = τ·Σ m.
            let d_tau = (&m * &pre)?.sum_all()?.reshape(1)?;
            Some(if self.has_b {
                let d_b = (m.sum_all()?.reshape(1)? * &tau)?;
                Tensor::cat(&[&d_tau, &d_b], 0)?
            } else {
                d_tau
            })
        } else {
            None
        };
        Ok((Some(dx), d_ab, Some(m)))
    }
}

/// (dy, y, ab) → [τ·m, m] with m = dy ⊙ 1(y > 0), 2·len elements.
struct ResidualReluBwdCuda;

impl CustomOp3 for ResidualReluBwdCuda {
    fn name(&self) -> &'static str {
        "residual-relu-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = &s1.device;
        let dy = f32_view(s1, l1, len, self.name(), "output gradient")?;
        let y = f32_view(s2, l2, len, self.name(), "output")?;
        let ab = f32_view(s3, l3, l3.shape().elem_count(), self.name(), "scalars")?;
        let out = output(dev, 2 * len)?;
        let func = dev.get_or_load_custom_func("tau_residual_relu_bwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&dy);
        b.arg(&y);
        b.arg(&ab);
        b.arg(&out);
        // SAFETY: as in the ReLU; `out` holds 2n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(2 * len),
        ))
    }
}

/// relu(x + b) + c for one-element `b` and `c` (`bc` = [b, c]).
pub(crate) fn bias_relu_bias(xs: &Tensor, bc: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op2(bc, BiasReluBiasCuda)
}

struct BiasReluBiasCuda;

impl CustomOp2 for BiasReluBiasCuda {
    fn name(&self) -> &'static str {
        "bias-relu-bias-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = &s1.device;
        let x = f32_view(s1, l1, len, self.name(), "input")?;
        let bc = f32_view(s2, l2, 2, self.name(), "biases")?;
        let y = output(dev, len)?;
        let func = dev.get_or_load_custom_func("tau_bias_relu_bias_fwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&x);
        b.arg(&bc);
        b.arg(&y);
        // SAFETY: as in the ReLU.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        bc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // m = dy ⊙ 1(x + b > 0): dx = m, db = Σ m, dc = Σ dy.
        let m = grad.apply_op3_no_bwd(&xs.contiguous()?, bc, &BiasReluBiasBwdCuda)?;
        let d_bc = if bc.track_op() {
            Some(Tensor::cat(
                &[m.sum_all()?.reshape(1)?, grad.sum_all()?.reshape(1)?],
                0,
            )?)
        } else {
            None
        };
        Ok((Some(m.reshape(xs.shape())?), d_bc))
    }
}

/// (dy, x, [b, c]) → dy ⊙ 1(x + b > 0).
struct BiasReluBiasBwdCuda;

impl CustomOp3 for BiasReluBiasBwdCuda {
    fn name(&self) -> &'static str {
        "bias-relu-bias-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = &s1.device;
        let dy = f32_view(s1, l1, len, self.name(), "output gradient")?;
        let x = f32_view(s2, l2, len, self.name(), "input")?;
        let bc = f32_view(s3, l3, 2, self.name(), "biases")?;
        let dx = output(dev, len)?;
        let func = dev.get_or_load_custom_func("tau_bias_relu_bias_bwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&n);
        b.arg(&dy);
        b.arg(&x);
        b.arg(&bc);
        b.arg(&dx);
        // SAFETY: as in the ReLU.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            l1.shape().clone(),
        ))
    }
}

/// One SGD step of `w` in place (and of the momentum buffer `buf`, which `a.momentum`
/// requires), `f32` tensors on CUDA, contiguous: one kernel, two with momentum. `a` holds
/// the step's constants as the CPU kernel takes them.
pub(crate) fn sgd_update(w: &Tensor, g: &Tensor, buf: Option<&Tensor>, a: Consts) -> Result<()> {
    match (a.momentum, buf) {
        (Some(_), Some(b)) => {
            b.inplace_op3(g, w, &SgdBufferCuda(a))?;
            w.inplace_op3(g, b, &SgdWeightCuda(a))
        }
        (Some(_), None) => candle::bail!("sgd_update: momentum without a buffer"),
        (None, _) => w.inplace_op2(g, &SgdWeightCuda(a)),
    }
}

/// The flag and value of an optional constant, as the kernels take them.
fn opt(v: Option<f32>) -> (i32, f32) {
    (i32::from(v.is_some()), v.unwrap_or(0.0))
}

/// b ← b·μ + d (d on the first step), from (g, w).
struct SgdBufferCuda(Consts);

impl candle::InplaceOp3 for SgdBufferCuda {
    fn name(&self) -> &'static str {
        "sgd-momentum-buffer-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = s1.device.clone();
        let g = f32_view(s2, l2, len, self.name(), "gradient")?;
        let w = f32_view(s3, l3, len, self.name(), "weight")?;
        let (use_scale, scale) = opt(self.0.scale);
        let (use_coupled, coupled) = opt(self.0.coupled);
        let mu = self.0.momentum.unwrap_or(0.0);
        let first = i32::from(self.0.first);
        let mut b = f32_view_mut(s1, l1, len, self.name(), "buffer")?;
        let func = dev.get_or_load_custom_func("tau_sgd_buffer", MODULE, PTX)?;
        let mut l = func.builder();
        l.arg(&n);
        l.arg(&mut b);
        l.arg(&g);
        l.arg(&w);
        l.arg(&use_scale);
        l.arg(&scale);
        l.arg(&use_coupled);
        l.arg(&coupled);
        l.arg(&mu);
        l.arg(&first);
        // SAFETY: the arguments match the kernel's signature; every buffer holds n elements.
        unsafe { l.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }
}

/// w ← w·k − step·η, from g and, with momentum, the new buffer.
struct SgdWeightCuda(Consts);

impl SgdWeightCuda {
    /// Launches the weight update on `w` (s1, l1) with the gradient `g` and the buffer `b`
    /// (`None` without momentum: the kernel then does not read it).
    fn launch(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        g: CudaView<'_, f32>,
        b: Option<CudaView<'_, f32>>,
    ) -> Result<()> {
        let len = l1.shape().elem_count();
        let n = count(len)?;
        let dev = s1.device.clone();
        let a = self.0;
        let has_buf = i32::from(b.is_some());
        let (use_scale, scale) = opt(a.scale);
        let (use_coupled, coupled) = opt(a.coupled);
        let (use_decay, decay) = opt(a.decay);
        let mu = a.momentum.unwrap_or(0.0);
        let nesterov = i32::from(a.nesterov);
        let lr = a.lr;
        let mut w = f32_view_mut(s1, l1, len, "sgd-update-cuda", "weight")?;
        let func = dev.get_or_load_custom_func("tau_sgd_weight", MODULE, PTX)?;
        let mut l = func.builder();
        l.arg(&n);
        l.arg(&mut w);
        l.arg(&g);
        // Without a buffer the kernel does not read this argument: the gradient stands in.
        let b = b.unwrap_or(g.slice(..));
        l.arg(&b);
        l.arg(&has_buf);
        l.arg(&use_scale);
        l.arg(&scale);
        l.arg(&use_coupled);
        l.arg(&coupled);
        l.arg(&use_decay);
        l.arg(&decay);
        l.arg(&mu);
        l.arg(&nesterov);
        l.arg(&lr);
        // SAFETY: the arguments match the kernel's signature; every buffer holds n elements.
        unsafe { l.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }
}

impl candle::InplaceOp2 for SgdWeightCuda {
    fn name(&self) -> &'static str {
        "sgd-update-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let len = l1.shape().elem_count();
        let g = f32_view(s2, l2, len, self.name(), "gradient")?;
        self.launch(s1, l1, g, None)
    }
}

impl candle::InplaceOp3 for SgdWeightCuda {
    fn name(&self) -> &'static str {
        "sgd-update-momentum-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle::bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let len = l1.shape().elem_count();
        let g = f32_view(s2, l2, len, candle::InplaceOp3::name(self), "gradient")?;
        let b = f32_view(s3, l3, len, candle::InplaceOp3::name(self), "buffer")?;
        self.launch(s1, l1, g, Some(b))
    }
}

/// A contiguous `f32` in-place destination of `len` elements as a mutable view.
fn f32_view_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<candle::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let range = contiguous_range(l, len, op, what)?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(range))
}

#[cfg(test)]
mod tests {
    use super::PTX;

    /// The parameters of each `.entry` of the PTX, by kernel name.
    fn entries() -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for part in PTX.split(".entry ").skip(1) {
            let name = part.split('(').next().unwrap_or("").trim().to_string();
            let params = part.split(')').next().unwrap_or("");
            out.push((name, params.matches(".param").count()));
        }
        out
    }

    /// Every kernel the ops launch is in the PTX the build script compiled, with the number
    /// of parameters the launch pushes (a wrong name or argument count would only fail on
    /// a GPU, at the first launch; this runs wherever the `cuda` feature builds).
    #[test]
    fn ptx_has_every_kernel_with_the_arguments_the_launches_push() {
        let entries = entries();
        let expected = [
            ("tau_relu_fwd", 3),
            ("tau_relu_bwd", 4),
            ("tau_residual_relu_fwd", 6),
            ("tau_residual_relu_bwd", 5),
            ("tau_bias_relu_bias_fwd", 4),
            ("tau_bias_relu_bias_bwd", 5),
            ("tau_sgd_buffer", 10),
            ("tau_sgd_weight", 14),
        ];
        for (name, params) in expected {
            let found = entries.iter().find(|(n, _)| n == name);
            assert_eq!(
                found.map(|(_, p)| *p),
                Some(params),
                "kernel {name} in the PTX (entries: {entries:?})"
            );
        }
        assert_eq!(entries.len(), expected.len(), "entries: {entries:?}");
        // Every name the ops load, from this file's own source.
        let src = include_str!("cuda.rs");
        for (name, _) in &entries {
            assert!(
                src.contains(&format!("get_or_load_custom_func(\"{name}\"")),
                "{name} is compiled but never launched"
            );
        }
    }
}
