//! BatchNorm in training mode, optionally followed by ReLU, as one candle custom op with a
//! closed-form backward.
//!
//! candle-nn's `BatchNorm` in training mode is a chain of about fifteen small tensor ops
//! forward and more backward, each allocating a fresh tensor and each a round trip through
//! candle's thread pool; at the CIFAR ResNet shapes it costs as much as the convolutions.
//! [`batch_norm_t`] computes, for `f32` tensors on the CPU, the per-channel batch mean and
//! variance, the normalization and the affine map in one op whose backward is the
//! closed-form BatchNorm gradient, all on rayon's threads. The running statistics are
//! updated outside the graph exactly as candle-nn does (momentum, unbiased variance, as
//! PyTorch). Evaluation mode on the CPU is one fused per-channel affine map (`eval`:
//! scale·x + shift from the running statistics), on other devices and dtypes the same map
//! from two of candle's broadcast ops. Elsewhere (training mode on other devices or dtypes
//! or without affine parameters, or candle's ops selected in [`crate::select`])
//! candle-nn's `BatchNorm` runs, except that with the `cudnn` feature, training mode on
//! CUDA runs cuDNN's BatchNorm (`cudnn`). [`residual::batch_norm_residual_relu`] fuses the
//! end of a basic block with it.

#[cfg(feature = "cudnn")]
mod cudnn;
mod eval;
mod residual;

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use candle_nn::{BatchNorm, ModuleT};
use rayon::prelude::*;

pub use residual::batch_norm_residual_relu;
pub(crate) use residual::{BnResBwd, bn_res_forward};

use residual::bn_forward_map;

use crate::util::{f32_data, lanes_sum, lock_state, relu_f32, sum_f64, written};

/// `bn.forward_t(xs, train)`, followed by ReLU when `relu` is set.
///
/// In training mode on the CPU with `f32` (N, C, H, W) input and an affine `bn`, one fused
/// op computes it (see the module docs) and updates `bn`'s running statistics like
/// candle-nn: `running = (1 − momentum)·running + momentum·batch`, the batch variance
/// unbiased (÷ (N·H·W − 1)). In evaluation mode on the CPU with `f32`, one fused op
/// computes scale·x + shift with scale = γ/√(running_var + ε), shift = β − running_mean·scale
/// (the running statistics detached: they get no gradient), as PyTorch's CPU kernel does;
/// on other devices and dtypes the same map from two of candle's broadcast ops.
///
/// # Errors
/// Shapes that do not fit `bn`, or a device error.
pub fn batch_norm_t(bn: &BatchNorm, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    if !train && eval::applies(bn, xs, &[]) {
        return eval::batch_norm_eval(bn, xs, relu);
    }
    if !train && eval::composed_applies(bn, xs) {
        return eval::batch_norm_eval_composed(bn, xs, relu);
    }
    // The fused op's conditions but the device: the CPU runs the fused op, CUDA (with
    // `cudnn`) cuDNN's BatchNorm, anything else candle-nn's.
    let fusable = train
        && crate::select::kernels().fused()
        && xs.dtype() == DType::F32
        && xs.rank() == 4
        && bn_params_f32(bn);
    if !(fusable && xs.device().is_cpu()) {
        #[cfg(feature = "cudnn")]
        let ys = if fusable && xs.device().is_cuda() {
            cudnn::batch_norm_train(bn, xs)?
        } else {
            bn.forward_t(xs, train)?
        };
        #[cfg(not(feature = "cudnn"))]
        let ys = bn.forward_t(xs, train)?;
        return if relu {
            crate::elementwise::relu_composed(&ys)
        } else {
            Ok(ys)
        };
    }
    let (weight, bias, geom) = bn_train_parts(bn, xs.dims4()?, "batch_norm_t")?;
    let state = Arc::new(Mutex::new(None));
    let op = BnFwd {
        geom,
        eps: bn.eps(),
        relu,
        state: state.clone(),
    };
    let ys = xs.contiguous()?.apply_op3(weight, bias, op)?;
    let guard = lock_state(&state)?;
    let Some(st) = guard.as_ref() else {
        candle::bail!("batch norm forward left no statistics");
    };
    update_running_stats(bn, st, geom)?;
    Ok(ys)
}

/// Whether `bn`'s running statistics and affine parameters are `f32` (the fused path's
/// condition on the layer).
pub(crate) fn bn_params_f32(bn: &BatchNorm) -> bool {
    bn.running_mean().dtype() == DType::F32
        && bn
            .weight_and_bias()
            .is_some_and(|(w, b)| w.dtype() == DType::F32 && b.dtype() == DType::F32)
}

/// γ, β and the sizes of a fused training-mode BatchNorm of `xs`, checked: the channel
/// counts agree and there is more than one value per channel. `what` names the caller.
pub(crate) fn bn_train_parts<'a>(
    bn: &'a BatchNorm,
    dims: (usize, usize, usize, usize),
    what: &str,
) -> Result<(&'a Tensor, &'a Tensor, BnGeom)> {
    let Some((weight, bias)) = bn.weight_and_bias() else {
        candle::bail!("{what}: fused path needs affine parameters");
    };
    let (n, c, h, w) = dims;
    if weight.dims() != [c] || bias.dims() != [c] || bn.running_mean().dims() != [c] {
        candle::bail!(
            "batch norm over {} channels applied to input {:?}",
            bn.running_mean().elem_count(),
            [n, c, h, w]
        );
    }
    if n * h * w < 2 {
        candle::bail!("batch norm in training mode needs more than one value per channel");
    }
    let geom = BnGeom {
        n,
        c,
        hw: h * w,
        dims: (n, c, h, w),
    };
    Ok((weight, bias, geom))
}

/// Folds one batch's statistics into `bn`'s running mean and (unbiased) running variance.
pub(crate) fn update_running_stats(bn: &BatchNorm, st: &BnState, geom: BnGeom) -> Result<()> {
    let m = (geom.n * geom.hw) as f64;
    update_running(bn.running_mean(), &st.mean, bn.momentum(), 1.0)?;
    update_running(bn.running_var(), &st.var, bn.momentum(), m / (m - 1.0))
}

/// `running ← (1 − momentum)·running + momentum·factor·batch`, as candle-nn computes it.
pub(crate) fn update_running(
    running: &Tensor,
    batch: &[f64],
    momentum: f64,
    factor: f64,
) -> Result<()> {
    let batch = Tensor::from_iter(batch.iter().map(|&v| v as f32), running.device())?;
    let updated = ((running.detach() * (1.0 - momentum))? + (batch * (momentum * factor))?)?;
    // `running` is the variable candle-nn's BatchNorm holds (`Var::from_tensor` of a
    // variable wraps the same storage).
    Var::from_tensor(running)?.set(&updated)
}

/// Sizes of a BatchNorm input: n images, c channels, hw values per channel and image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BnGeom {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) hw: usize,
    /// The input's (N, C, H, W).
    pub(crate) dims: (usize, usize, usize, usize),
}

/// What the forward pass keeps for the backward pass and the running statistics.
#[derive(Debug)]
pub(crate) struct BnState {
    /// Batch mean per channel.
    pub(crate) mean: Vec<f64>,
    /// Biased batch variance per channel.
    pub(crate) var: Vec<f64>,
    /// 1/sqrt(var + eps) per channel.
    pub(crate) invstd: Vec<f32>,
    /// γ per channel.
    pub(crate) gamma: Vec<f32>,
    /// y = scale·x + shift per channel (before the ReLU).
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

impl BnState {
    /// The backward op of the BatchNorm (optionally followed by ReLU) whose forward kept
    /// these statistics.
    pub(crate) fn backward(&self, geom: BnGeom, relu: bool) -> BnBwd {
        BnBwd {
            geom,
            relu,
            mean: self.mean.iter().map(|&v| v as f32).collect(),
            invstd: self.invstd.clone(),
            gamma: self.gamma.clone(),
            scale: self.scale.clone(),
            shift: self.shift.clone(),
        }
    }

    /// The backward op of relu(τ·BN(x) + s) whose forward kept these statistics.
    pub(crate) fn res_backward(&self, geom: BnGeom, tau: f32) -> BnResBwd {
        BnResBwd {
            geom,
            tau,
            mean: self.mean.iter().map(|&v| v as f32).collect(),
            invstd: self.invstd.clone(),
            gamma: self.gamma.clone(),
            scale: self.scale.clone(),
            shift: self.shift.clone(),
        }
    }
}

/// Forward of the fused BatchNorm: (x, γ, β) → y.
pub(crate) struct BnFwd {
    pub(crate) geom: BnGeom,
    pub(crate) eps: f64,
    pub(crate) relu: bool,
    pub(crate) state: Arc<Mutex<Option<BnState>>>,
}

/// Σ (x − mean)² of a slice in f64.
pub(crate) fn centered_sq_f64(xs: &[f32], mean: f32) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            let d = *v - mean;
            *a += d * d;
        }
    }
    lanes_sum(&acc) + rest as f64
}

/// (Σ dy, Σ dy·(x − mean)) of two slices in f64, with dy masked where `mask` says the
/// ReLU was off (y = scale·x + shift ≤ 0).
pub(crate) fn grad_sums(dy: &[f32], x: &[f32], mean: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    let mut s1 = [0f32; 16];
    let mut s2 = [0f32; 16];
    let mut r1 = 0f64;
    let mut r2 = 0f64;
    let n16 = dy.len() / 16 * 16;
    let term = |d: f32, v: f32| -> f32 {
        match relu {
            Some((scale, shift)) if v * scale + shift <= 0.0 => 0.0,
            _ => d,
        }
    };
    for (dc, xc) in dy[..n16].chunks_exact(16).zip(x[..n16].chunks_exact(16)) {
        for i in 0..16 {
            let d = term(dc[i], xc[i]);
            s1[i] += d;
            s2[i] += d * (xc[i] - mean);
        }
    }
    for (&d, &v) in dy[n16..].iter().zip(&x[n16..]) {
        let d = term(d, v);
        r1 += d as f64;
        r2 += (d * (v - mean)) as f64;
    }
    (lanes_sum(&s1) + r1, lanes_sum(&s2) + r2)
}

/// Batch statistics and the affine map y = scale·x + shift of a BatchNorm in training mode.
pub(crate) struct BnStats {
    pub(crate) mean: Vec<f64>,
    pub(crate) var: Vec<f64>,
    pub(crate) invstd: Vec<f32>,
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

/// Per-channel batch mean and (biased) variance of `x`, and the normalization's affine map.
pub(crate) fn bn_stats(geom: BnGeom, x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> BnStats {
    let BnGeom { n, c, hw, .. } = geom;
    let m = (n * hw) as f64;
    // Two passes per channel (mean, then centered squares): a channel's values stay
    // in the core's cache between them.
    let stats: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let block = |i: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            let mean = (0..n).map(|i| sum_f64(block(i))).sum::<f64>() / m;
            let var = (0..n)
                .map(|i| centered_sq_f64(block(i), mean as f32))
                .sum::<f64>()
                / m;
            (mean, var)
        })
        .collect();
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
    let invstd: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
        .collect();
    let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * invstd[ch]).collect();
    let shift: Vec<f32> = (0..c)
        .map(|ch| beta[ch] - mean[ch] as f32 * scale[ch])
        .collect();
    BnStats {
        mean,
        var,
        invstd,
        scale,
        shift,
    }
}

/// BN(x) in training mode, optionally ReLU'd, and the batch statistics.
pub(crate) fn bn_forward(
    geom: BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
) -> (Vec<f32>, BnState) {
    bn_forward_map(geom, x, gamma, beta, eps, |_, yb, xb, a, b| {
        if relu {
            for (o, &v) in yb.iter_mut().zip(xb) {
                o.write(relu_f32(v * a + b));
            }
        } else {
            for (o, &v) in yb.iter_mut().zip(xb) {
                o.write(v * a + b);
            }
        }
    })
}

impl CustomOp3 for BnFwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-fused"
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
        let BnGeom { n, c, hw, .. } = self.geom;
        let x = f32_data(s1, l1, n * c * hw, self.name(), "input")?;
        let gamma = f32_data(s2, l2, c, self.name(), "weight")?;
        let beta = f32_data(s3, l3, c, self.name(), "bias")?;
        let (y, st) = bn_forward(self.geom, x, gamma, beta, self.eps, self.relu);
        *lock_state(&self.state)? = Some(st);
        Ok((CpuStorage::F32(y), Shape::from(self.geom.dims)))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let st = lock_state(&self.state)?;
        let Some(st) = st.as_ref() else {
            candle::bail!("batch norm backward before its forward");
        };
        let op = st.backward(self.geom, self.relu);
        let out = grad.contiguous()?.apply_op2_no_bwd(xs, &op)?;
        let len = n * c * hw;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let dgamma = out.narrow(0, len, c)?.reshape(gamma.shape())?;
        let dbeta = out.narrow(0, len + c, c)?.reshape(beta.shape())?;
        Ok((
            xs.track_op().then_some(dx),
            gamma.track_op().then_some(dgamma),
            beta.track_op().then_some(dbeta),
        ))
    }
}

/// Backward of the fused BatchNorm: (dy, x) → [dx (flattened), dγ, dβ] in one buffer.
pub(crate) struct BnBwd {
    pub(crate) geom: BnGeom,
    pub(crate) relu: bool,
    pub(crate) mean: Vec<f32>,
    pub(crate) invstd: Vec<f32>,
    pub(crate) gamma: Vec<f32>,
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

impl BnBwd {
    /// [dx, dγ, dβ] from the output gradient and the input.
    pub(crate) fn compute(&self, dy: &[f32], x: &[f32]) -> Vec<f32> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let len = n * c * hw;
        let m = (n * hw) as f64;
        let relu_of = |ch: usize| self.relu.then(|| (self.scale[ch], self.shift[ch]));
        // Per channel: dβ = Σ dy, Σ dy·(x − mean); dγ = invstd · the latter.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n)
                    .map(|i| {
                        let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                        grad_sums(&dy[r.clone()], &x[r], self.mean[ch], relu_of(ch))
                    })
                    .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
            })
            .collect();
        written(len + 2 * c, |out| {
            let (dx, rest) = out.split_at_mut(len);
            // dx = γ·invstd·(dy − dβ/m − x̂·dγ/m), x̂ = (x − mean)·invstd.
            let coef: Vec<(f32, f32, f32)> = (0..c)
                .map(|ch| {
                    let inv = self.invstd[ch] as f64;
                    let k = self.gamma[ch] as f64 * inv;
                    let mean_dy = sums[ch].0 / m;
                    let dgamma = sums[ch].1 * inv;
                    // dx = k·dy − k·mean_dy − k·inv·dγ/m·(x − mean)
                    let a = (k * inv * dgamma / m) as f32;
                    (k as f32, (k * mean_dy) as f32, a)
                })
                .collect();
            dx.par_chunks_mut(hw)
                .zip(dy.par_chunks(hw).zip(x.par_chunks(hw)))
                .enumerate()
                .for_each(|(idx, (db, (gb, xb)))| {
                    let ch = idx % c;
                    let (k, b, a) = coef[ch];
                    let mean = self.mean[ch];
                    match relu_of(ch) {
                        Some((s, t)) => {
                            for ((o, &g), &v) in db.iter_mut().zip(gb).zip(xb) {
                                let g = if v * s + t <= 0.0 { 0.0 } else { g };
                                o.write(k * g - b - a * (v - mean));
                            }
                        }
                        None => {
                            for ((o, &g), &v) in db.iter_mut().zip(gb).zip(xb) {
                                o.write(k * g - b - a * (v - mean));
                            }
                        }
                    }
                });
            for ch in 0..c {
                rest[ch].write((sums[ch].1 * self.invstd[ch] as f64) as f32);
                rest[c + ch].write(sums[ch].0 as f32);
            }
        })
    }
}

impl CustomOp2 for BnBwd {
    fn name(&self) -> &'static str {
        "batch-norm-train-fused-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let len = n * c * hw;
        let dy = f32_data(s1, l1, len, self.name(), "output gradient")?;
        let x = f32_data(s2, l2, len, self.name(), "input")?;
        let out = self.compute(dy, x);
        Ok((CpuStorage::F32(out), Shape::from(len + 2 * c)))
    }
}

#[cfg(test)]
mod tests;
