//! Fused elementwise ops of the ResNets, each one candle custom op with a hand-written
//! backward: a scalar bias (optionally followed by ReLU), ReLU, relu(x + b) + c, and the end
//! of a residual block relu(τ·(branch + b) + shortcut).
//!
//! They replace chains of candle's broadcast ops (each a fresh tensor and a pass over
//! memory, and in the backward a reduction per scalar) with one pass forward and one
//! backward; every op is one node of candle's graph, so one gradient tensor in `backward`
//! (which zero-fills and accumulates each node's gradient on the calling thread) instead of
//! one per composed op. On other devices and dtypes they run those chains.

use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::util::{CHUNK, f32_data, fused_f32, lanes_sum, relu_f32, scalars, sum_f64, written};

/// `xs + b` for a one-element `b` (a scalar bias), optionally followed by ReLU.
///
/// On the CPU for `f32`, one custom op (forward and backward) instead of candle's
/// broadcast add, ReLU, and the reductions of their backward.
///
/// # Errors
/// `b` with more than one element, or a device error.
pub fn add_scalar(xs: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    if b.elem_count() != 1 {
        candle::bail!("add_scalar: bias must have one element, got {:?}", b.dims());
    }
    if !fused_f32(&[xs, b]) {
        let ys = xs.broadcast_add(b)?;
        return if relu { relu_composed(&ys) } else { Ok(ys) };
    }
    xs.contiguous()?
        .apply_op2(&b.flatten_all()?, AddScalar { relu })
}

/// ReLU; on the CPU for `f32` one custom op whose backward masks the output gradient
/// where the output is positive (candle's own ReLU backward makes four passes over memory
/// on the calling thread: a zero tensor, a comparison, a conversion and a product).
///
/// # Errors
/// A device error.
pub fn relu(xs: &Tensor) -> Result<Tensor> {
    if !fused_f32(&[xs]) {
        return relu_composed(xs);
    }
    xs.contiguous()?.apply_op1(Relu)
}

/// ReLU composed of candle ops with the gradient of the fused ops and of PyTorch:
/// `xs ⊙ 1(xs > 0)`, whose backward passes the gradient where the input is positive.
/// candle's own `relu` passes it where the input is ≥ 0, which differs wherever an input
/// is exactly zero: the identity shortcut of a block whose branch multiplier is 0 (SkipInit
/// and Fixup at initialization) feeds the block's ReLU the zeros of the previous one. The
/// fallback of every op of the crate (other devices, other dtypes, `Kernels::Candle`)
/// runs it, so every device computes the same gradients. With the `cuda` feature, `f32`
/// tensors on CUDA (fused ops selected) run one kernel instead, with the same gradient
/// (`crate::cuda`).
pub(crate) fn relu_composed(xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::fused_cuda_f32(&[xs]) {
        return crate::cuda::relu(xs);
    }
    xs * xs.gt(0f64)?.to_dtype(xs.dtype())?
}

/// Forward of [`relu`].
pub(crate) struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count();
        let x = f32_data(s1, l1, len, self.name(), "input")?;
        let y = written(len, |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(yc, xc)| {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        o.write(relu_f32(v));
                    }
                })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let len = grad.elem_count();
        let out = grad
            .contiguous()?
            .apply_op2_no_bwd(&res.contiguous()?, &MaskSum { relu: true })?;
        Ok(Some(out.narrow(0, 0, len)?.reshape(xs.shape())?))
    }
}

/// relu(`xs` + `b`) + `c` for one-element `b` and `c`: the middle of a no-BN basic block
/// (the bias after conv1, the ReLU, the bias before conv2).
///
/// On the CPU for `f32`, one custom op whose backward is closed-form: with
/// m = dy ⊙ 1(x + b > 0), dx = m, db = Σ m, dc = Σ dy. It computes exactly what
/// `add_scalar(&add_scalar(xs, b, true)?, c, false)` computes, with one activation-sized
/// tensor (and gradient) instead of two.
///
/// # Errors
/// `b` or `c` with more than one element, or a device error.
pub fn bias_relu_bias(xs: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    if b.elem_count() != 1 || c.elem_count() != 1 {
        candle::bail!(
            "bias_relu_bias: biases must have one element each, got {:?} and {:?}",
            b.dims(),
            c.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if crate::cuda::fused_cuda_f32(&[xs, b, c]) {
        let bc = Tensor::cat(&[b.flatten_all()?, c.flatten_all()?], 0)?;
        return crate::cuda::bias_relu_bias(xs, &bc);
    }
    if !fused_f32(&[xs, b, c]) {
        return add_scalar(&add_scalar(xs, b, true)?, c, false);
    }
    xs.contiguous()?
        .apply_op3(&b.flatten_all()?, &c.flatten_all()?, BiasReluBias)
}

/// Forward of [`bias_relu_bias`]: (x, b, c) → relu(x + b) + c.
pub(crate) struct BiasReluBias;

impl CustomOp3 for BiasReluBias {
    fn name(&self) -> &'static str {
        "bias-relu-bias-fused"
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
        let len = l1.shape().elem_count();
        let x = f32_data(s1, l1, len, self.name(), "input")?;
        let b = f32_data(s2, l2, 1, self.name(), "bias")?[0];
        let c = f32_data(s3, l3, 1, self.name(), "bias")?[0];
        let y = written(len, |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(yc, xc)| {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        o.write(relu_f32(v + b) + c);
                    }
                })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let len = grad.elem_count();
        // [m (len), Σ m, Σ dy] with m = dy ⊙ 1(x + b > 0)
        let out = grad.contiguous()?.apply_op2_no_bwd(
            &xs.contiguous()?,
            &BiasReluBiasBwd {
                b: b.flatten_all()?.to_vec1::<f32>()?[0],
            },
        )?;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let db = out.narrow(0, len, 1)?.reshape(b.shape())?;
        let dc = out.narrow(0, len + 1, 1)?.reshape(c.shape())?;
        Ok((
            xs.track_op().then_some(dx),
            b.track_op().then_some(db),
            c.track_op().then_some(dc),
        ))
    }
}

/// Backward of [`BiasReluBias`]: (dy, x) → [dy ⊙ 1(x + b > 0), its sum, Σ dy].
pub(crate) struct BiasReluBiasBwd {
    pub(crate) b: f32,
}

impl CustomOp2 for BiasReluBiasBwd {
    fn name(&self) -> &'static str {
        "bias-relu-bias-fused-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count();
        let dy = f32_data(s1, l1, len, self.name(), "output gradient")?;
        let x = f32_data(s2, l2, len, self.name(), "input")?;
        let b = self.b;
        let out = written(len + 2, |out| {
            let (dx, tail) = out.split_at_mut(len);
            let (sum_m, sum_g) = dx
                .par_chunks_mut(CHUNK)
                .zip(dy.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
                .map(|(oc, (gc, xc))| {
                    let mut s1 = [0f32; 16];
                    let mut s2 = [0f32; 16];
                    for (i, ((o, &g), &v)) in oc.iter_mut().zip(gc).zip(xc).enumerate() {
                        let m = if v + b > 0.0 { g } else { 0.0 };
                        o.write(m);
                        s1[i % 16] += m;
                        s2[i % 16] += g;
                    }
                    (lanes_sum(&s1), lanes_sum(&s2))
                })
                .reduce(|| (0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
            tail[0].write(sum_m as f32);
            tail[1].write(sum_g as f32);
        });
        Ok((CpuStorage::F32(out), Shape::from(len + 2)))
    }
}

/// relu(τ · (branch + b) + shortcut) for one-element `tau` and `b`: the end of a residual
/// block, one custom op on the CPU for `f32`.
///
/// # Errors
/// Shapes that differ, a `tau` or `b` with more than one element, or a device error.
pub fn residual_relu(
    branch: &Tensor,
    tau: &Tensor,
    b: Option<&Tensor>,
    shortcut: &Tensor,
) -> Result<Tensor> {
    if tau.elem_count() != 1 || b.is_some_and(|b| b.elem_count() != 1) {
        candle::bail!("residual_relu: tau and the bias must have one element each");
    }
    if branch.dims() != shortcut.dims() {
        candle::bail!(
            "residual_relu: branch {:?} and shortcut {:?} differ in shape",
            branch.dims(),
            shortcut.dims()
        );
    }
    let mut all = vec![branch, tau, shortcut];
    all.extend(b);
    let cuda = crate::util::fused_cuda_f32(&all);
    if !cuda && !fused_f32(&all) {
        let branch = match b {
            Some(b) => branch.broadcast_add(b)?,
            None => branch.clone(),
        };
        return relu_composed(&(branch.broadcast_mul(tau)? + shortcut)?);
    }
    let ab = match b {
        Some(b) => Tensor::cat(&[tau.flatten_all()?, b.flatten_all()?], 0)?,
        None => tau.flatten_all()?,
    };
    #[cfg(feature = "cuda")]
    if cuda {
        return crate::cuda::residual_relu(branch, &ab, b.is_some(), shortcut);
    }
    branch
        .contiguous()?
        .apply_op3(&ab, &shortcut.contiguous()?, ResidualRelu)
}

/// Forward of [`add_scalar`]: (x, b) → x + b, optionally ReLU'd.
pub(crate) struct AddScalar {
    pub(crate) relu: bool,
}

impl CustomOp2 for AddScalar {
    fn name(&self) -> &'static str {
        "add-scalar-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count();
        let x = f32_data(s1, l1, len, self.name(), "input")?;
        let b = f32_data(s2, l2, 1, self.name(), "bias")?[0];
        let relu = self.relu;
        let y = written(len, |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(yc, xc)| {
                    if relu {
                        for (o, &v) in yc.iter_mut().zip(xc) {
                            o.write(relu_f32(v + b));
                        }
                    } else {
                        for (o, &v) in yc.iter_mut().zip(xc) {
                            o.write(v + b);
                        }
                    }
                })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let len = grad.elem_count();
        // [masked dy (len), Σ masked dy]
        let out = grad
            .contiguous()?
            .apply_op2_no_bwd(&res.contiguous()?, &MaskSum { relu: self.relu })?;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let db = out.narrow(0, len, 1)?.reshape(b.shape())?;
        Ok((xs.track_op().then_some(dx), b.track_op().then_some(db)))
    }
}

/// Backward of [`AddScalar`]: (dy, y) → [dy ⊙ 1(y > 0) (or dy), its sum].
pub(crate) struct MaskSum {
    pub(crate) relu: bool,
}

impl CustomOp2 for MaskSum {
    fn name(&self) -> &'static str {
        "add-scalar-fused-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let len = l1.shape().elem_count();
        let dy = f32_data(s1, l1, len, self.name(), "output gradient")?;
        let y = f32_data(s2, l2, len, self.name(), "output")?;
        let relu = self.relu;
        let out = written(len + 1, |out| {
            let (dx, tail) = out.split_at_mut(len);
            let sum: f64 = dx
                .par_chunks_mut(CHUNK)
                .zip(dy.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .map(|(oc, (gc, yc))| {
                    if relu {
                        let mut acc = [0f32; 16];
                        for (i, ((o, &g), &v)) in oc.iter_mut().zip(gc).zip(yc).enumerate() {
                            let m = if v > 0.0 { g } else { 0.0 };
                            o.write(m);
                            acc[i % 16] += m;
                        }
                        lanes_sum(&acc)
                    } else {
                        for (o, &g) in oc.iter_mut().zip(gc) {
                            o.write(g);
                        }
                        sum_f64(gc)
                    }
                })
                .sum();
            tail[0].write(sum as f32);
        });
        Ok((CpuStorage::F32(out), Shape::from(len + 1)))
    }
}

/// Forward of [`residual_relu`]: (x, [τ, b?], s) → relu(τ·(x + b) + s).
pub(crate) struct ResidualRelu;

impl CustomOp3 for ResidualRelu {
    fn name(&self) -> &'static str {
        "residual-relu-fused"
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
        let len = l1.shape().elem_count();
        let x = f32_data(s1, l1, len, self.name(), "branch")?;
        let ab = scalars(s2, l2, "tau")?;
        let s = f32_data(s3, l3, len, self.name(), "shortcut")?;
        let a = ab[0];
        let c = a * ab.get(1).copied().unwrap_or(0.0);
        let y = written(len, |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(s.par_chunks(CHUNK)))
                .for_each(|(yc, (xc, sc))| {
                    for ((o, &v), &t) in yc.iter_mut().zip(xc).zip(sc) {
                        o.write(relu_f32(a * v + c + t));
                    }
                })
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        ab: &Tensor,
        shortcut: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let len = grad.elem_count();
        // [dx (len), ds (len), Σ m·(x + b), Σ m] with m = dy ⊙ 1(y > 0)
        let out = grad.contiguous()?.apply_op3_no_bwd(
            &res.contiguous()?,
            &xs.contiguous()?,
            &ResidualReluBwd { ab: ab.to_vec1()? },
        )?;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let ds = out.narrow(0, len, len)?.reshape(shortcut.shape())?;
        let dab = out.narrow(0, 2 * len, ab.elem_count())?;
        Ok((
            xs.track_op().then_some(dx),
            ab.track_op().then_some(dab),
            shortcut.track_op().then_some(ds),
        ))
    }
}

/// Backward of [`ResidualRelu`]: (dy, y, x) → [τ·m, m, Σ m·(x + b), τ·Σ m (if b)].
pub(crate) struct ResidualReluBwd {
    pub(crate) ab: Vec<f32>,
}

impl CustomOp3 for ResidualReluBwd {
    fn name(&self) -> &'static str {
        "residual-relu-fused-backward"
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
        let len = l1.shape().elem_count();
        let dy = f32_data(s1, l1, len, self.name(), "output gradient")?;
        let y = f32_data(s2, l2, len, self.name(), "output")?;
        let x = f32_data(s3, l3, len, self.name(), "branch")?;
        let a = self.ab[0];
        let b = self.ab.get(1).copied().unwrap_or(0.0);
        let out = written(2 * len + self.ab.len(), |out| {
            let (dx, rest) = out.split_at_mut(len);
            let (ds, tail) = rest.split_at_mut(len);
            let (sum_mx, sum_m) = dx
                .par_chunks_mut(CHUNK)
                .zip(ds.par_chunks_mut(CHUNK))
                .zip(dy.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .zip(x.par_chunks(CHUNK))
                .map(|(((dxc, dsc), (gc, yc)), xc)| {
                    let mut s1 = [0f32; 16];
                    let mut s2 = [0f32; 16];
                    for (i, (((o, q), &g), &v)) in dxc
                        .iter_mut()
                        .zip(dsc.iter_mut())
                        .zip(gc)
                        .zip(yc)
                        .enumerate()
                    {
                        let m = if v > 0.0 { g } else { 0.0 };
                        q.write(m);
                        o.write(a * m);
                        s1[i % 16] += m * (xc[i] + b);
                        s2[i % 16] += m;
                    }
                    (lanes_sum(&s1), lanes_sum(&s2))
                })
                .reduce(|| (0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
            tail[0].write(sum_mx as f32);
            if tail.len() > 1 {
                tail[1].write((a as f64 * sum_m) as f32);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(2 * len + self.ab.len())))
    }
}

#[cfg(test)]
mod tests;
