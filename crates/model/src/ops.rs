//! Fused CPU kernels for the ResNets' layers besides the convolution: BatchNorm in
//! training mode (optionally followed by ReLU), a scalar bias (optionally followed by
//! ReLU), relu(x + b) + c, the end of a residual block relu(τ·(branch + b) + shortcut),
//! ReLU, the global average pool, the option-A shortcut and the 3×3/2 max pool, each one
//! candle custom op with a hand-written backward. Every op is one node of candle's graph,
//! so one gradient tensor in `backward` (which zero-fills and accumulates each node's
//! gradient on the calling thread) instead of one per composed op.
//!
//! candle-nn's `BatchNorm` in training mode is a chain of about fifteen small tensor ops
//! forward and more backward, each allocating a fresh tensor and each a round trip through
//! candle's thread pool; at the CIFAR ResNet shapes it costs as much as the convolutions.
//! [`batch_norm_t`] computes, for `f32` tensors on the CPU, the per-channel batch mean and
//! variance, the normalization and the affine map in one op whose backward is the
//! closed-form BatchNorm gradient, all on rayon's threads. The running statistics are
//! updated outside the graph exactly as candle-nn does (momentum, unbiased variance, as
//! PyTorch). Elsewhere (other devices or dtypes, evaluation mode, no affine parameters)
//! candle-nn's `BatchNorm` runs.
//!
//! [`add_scalar`] and [`residual_relu`] replace chains of candle's broadcast ops (each a
//! fresh tensor and a pass over memory, and in the backward a reduction per scalar) with
//! one pass forward and one backward; on other devices and dtypes they run those chains.
//!
//! [`scalar_bias_block`] and [`batch_norm_block`] go one step further: a whole basic block
//! (both convolutions, the biases or BatchNorms, τ and the shortcut) is one op, so candle's
//! backward handles one gradient per block instead of one per layer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var,
};
use candle_nn::{BatchNorm, ModuleT};
use rayon::prelude::*;

use crate::conv::{f32_data, written};

static FUSED_OFF: AtomicBool = AtomicBool::new(false);

/// Turns the fused CPU ops of this module on (the default) or off for the whole process;
/// benchmarks use it to measure candle-nn's composed ops with the same models.
pub fn set_fused_cpu_ops(on: bool) {
    FUSED_OFF.store(!on, Ordering::Relaxed);
}

/// Whether the fused CPU ops are on (see [`set_fused_cpu_ops`]).
pub fn fused_cpu_ops() -> bool {
    !FUSED_OFF.load(Ordering::Relaxed)
}

/// `bn.forward_t(xs, train)`, followed by ReLU when `relu` is set.
///
/// In training mode on the CPU with `f32` (N, C, H, W) input and an affine `bn`, one fused
/// op computes it (see the module docs) and updates `bn`'s running statistics like
/// candle-nn: `running = (1 − momentum)·running + momentum·batch`, the batch variance
/// unbiased (÷ (N·H·W − 1)).
///
/// # Errors
/// Shapes that do not fit `bn`, or a device error.
pub fn batch_norm_t(bn: &BatchNorm, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
    let fused = train
        && fused_cpu_ops()
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && xs.rank() == 4
        && bn_params_f32(bn);
    if !fused {
        let ys = bn.forward_t(xs, train)?;
        return if relu { ys.relu() } else { Ok(ys) };
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
fn bn_params_f32(bn: &BatchNorm) -> bool {
    bn.running_mean().dtype() == DType::F32
        && bn
            .weight_and_bias()
            .is_some_and(|(w, b)| w.dtype() == DType::F32 && b.dtype() == DType::F32)
}

/// γ, β and the sizes of a fused training-mode BatchNorm of `xs`, checked: the channel
/// counts agree and there is more than one value per channel. `what` names the caller.
fn bn_train_parts<'a>(
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
fn update_running_stats(bn: &BatchNorm, st: &BnState, geom: BnGeom) -> Result<()> {
    let m = (geom.n * geom.hw) as f64;
    update_running(bn.running_mean(), &st.mean, bn.momentum(), 1.0)?;
    update_running(bn.running_var(), &st.var, bn.momentum(), m / (m - 1.0))
}

/// The state of a fused op's forward pass, locked.
fn lock_state<T>(state: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    state
        .lock()
        .map_err(|_| candle::Error::Msg("fused op state poisoned".into()))
}

/// relu(τ · BN(`xs`) + `shortcut`) for a one-element `tau`: the end of a basic block with
/// BatchNorm (BN2, the τ scaling, the residual addition and the ReLU).
///
/// In training mode on the CPU for `f32`, one custom op (see [`batch_norm_t`] for the
/// statistics and the running-statistics update) whose backward is closed-form: with
/// m = dy ⊙ 1(y > 0), the shortcut's gradient is m, τ's is Σ m·BN(x), and BN's backward
/// runs on τ·m. Elsewhere it is [`batch_norm_t`] followed by [`residual_relu`]; both
/// compute the same `f32` numbers.
///
/// # Errors
/// Shapes that do not fit `bn` or each other, a `tau` with more than one element, or a
/// device error.
pub fn batch_norm_residual_relu(
    bn: &BatchNorm,
    xs: &Tensor,
    train: bool,
    tau: &Tensor,
    shortcut: &Tensor,
) -> Result<Tensor> {
    let fused = train
        && fused_f32(&[xs, tau, shortcut])
        && xs.rank() == 4
        && tau.elem_count() == 1
        && shortcut.dims() == xs.dims()
        && bn_params_f32(bn);
    if !fused {
        return residual_relu(&batch_norm_t(bn, xs, train, false)?, tau, None, shortcut);
    }
    let (weight, bias, geom) = bn_train_parts(bn, xs.dims4()?, "batch_norm_residual_relu")?;
    let params = Tensor::cat(&[weight, bias, &tau.flatten_all()?], 0)?;
    let state = Arc::new(Mutex::new(None));
    let op = BnResFwd {
        geom,
        eps: bn.eps(),
        state: state.clone(),
    };
    let ys = xs
        .contiguous()?
        .apply_op3(&params, &shortcut.contiguous()?, op)?;
    let guard = lock_state(&state)?;
    let Some((st, _)) = guard.as_ref() else {
        candle::bail!("batch norm forward left no statistics");
    };
    update_running_stats(bn, st, geom)?;
    Ok(ys)
}

/// relu(τ·BN(x) + s) in training mode, and the batch statistics.
fn bn_res_forward(
    geom: BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    tau: f32,
    sc: &[f32],
    eps: f64,
) -> (Vec<f32>, BnState) {
    let hw = geom.hw;
    bn_forward_map(geom, x, gamma, beta, eps, |idx, yb, xb, a, b| {
        let sb = &sc[idx * hw..(idx + 1) * hw];
        for ((o, &v), &t) in yb.iter_mut().zip(xb).zip(sb) {
            o.write((tau * (v * a + b) + t).max(0.0));
        }
    })
}

/// The batch statistics of a BatchNorm in training mode, and its output written by `write`
/// plane by plane: `write(idx, y, x, scale, shift)` for plane `idx` (image idx / c,
/// channel idx % c) with BN(x) = scale·x + shift, on rayon's threads.
fn bn_forward_map<F>(
    geom: BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    write: F,
) -> (Vec<f32>, BnState)
where
    F: Fn(usize, &mut [std::mem::MaybeUninit<f32>], &[f32], f32, f32) + Sync,
{
    let BnGeom { n, c, hw, .. } = geom;
    let BnStats {
        mean,
        var,
        invstd,
        scale,
        shift,
    } = bn_stats(geom, x, gamma, beta, eps);
    let y = written(n * c * hw, |y| {
        if hw == 0 {
            return;
        }
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(idx, (yb, xb))| write(idx, yb, xb, scale[idx % c], shift[idx % c]))
    });
    let st = BnState {
        mean,
        var,
        invstd,
        gamma: gamma.to_vec(),
        scale,
        shift,
    };
    (y, st)
}

/// Forward of [`batch_norm_residual_relu`]: (x, [γ, β, τ], s) → relu(τ·BN(x) + s).
struct BnResFwd {
    geom: BnGeom,
    eps: f64,
    /// The statistics and τ, for the backward pass and the running statistics.
    state: Arc<Mutex<Option<(BnState, f32)>>>,
}

impl CustomOp3 for BnResFwd {
    fn name(&self) -> &'static str {
        "batch-norm-residual-relu-fused"
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
        let len = n * c * hw;
        let x = f32_data(s1, l1, len, self.name(), "input")?;
        let params = f32_data(s2, l2, 2 * c + 1, self.name(), "parameters")?;
        let sc = f32_data(s3, l3, len, self.name(), "shortcut")?;
        let (gamma, beta, tau) = (&params[..c], &params[c..2 * c], params[2 * c]);
        let (y, st) = bn_res_forward(self.geom, x, gamma, beta, tau, sc, self.eps);
        *lock_state(&self.state)? = Some((st, tau));
        Ok((CpuStorage::F32(y), Shape::from(self.geom.dims)))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        shortcut: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let st = lock_state(&self.state)?;
        let Some((st, tau)) = st.as_ref() else {
            candle::bail!("batch norm backward before its forward");
        };
        let op = st.res_backward(self.geom, *tau);
        let out =
            grad.contiguous()?
                .apply_op3_no_bwd(&xs.contiguous()?, &res.contiguous()?, &op)?;
        let len = n * c * hw;
        let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
        let ds = out.narrow(0, len, len)?.reshape(shortcut.shape())?;
        let dp = out.narrow(0, 2 * len, 2 * c + 1)?;
        Ok((
            xs.track_op().then_some(dx),
            params.track_op().then_some(dp),
            shortcut.track_op().then_some(ds),
        ))
    }
}

/// Backward of [`BnResFwd`]: (dy, x, y) → [dx, ds, dγ, dβ, dτ] in one buffer.
struct BnResBwd {
    geom: BnGeom,
    tau: f32,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// (Σ m, Σ m·(x − mean), Σ m·(scale·x + shift)) of one plane in f64, m = dy ⊙ 1(y > 0).
fn res_sums(dy: &[f32], x: &[f32], y: &[f32], mean: f32, scale: f32, shift: f32) -> [f64; 3] {
    let mut acc = [[0f32; 16]; 3];
    for (i, ((&g, &v), &o)) in dy.iter().zip(x).zip(y).enumerate() {
        let m = if o > 0.0 { g } else { 0.0 };
        acc[0][i % 16] += m;
        acc[1][i % 16] += m * (v - mean);
        acc[2][i % 16] += m * (v * scale + shift);
    }
    acc.map(|a| lanes_sum(&a))
}

impl BnResBwd {
    /// [dx, ds, dγ, dβ, dτ] from the output gradient, the input and the output.
    fn compute(&self, dy: &[f32], x: &[f32], y: &[f32]) -> Vec<f32> {
        let BnGeom { n, c, hw, .. } = self.geom;
        let len = n * c * hw;
        let m = (n * hw) as f64;
        let tau = self.tau as f64;
        let sums: Vec<[f64; 3]> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n)
                    .map(|i| {
                        let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                        res_sums(
                            &dy[r.clone()],
                            &x[r.clone()],
                            &y[r],
                            self.mean[ch],
                            self.scale[ch],
                            self.shift[ch],
                        )
                    })
                    .fold([0.0; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]])
            })
            .collect();
        written(2 * len + 2 * c + 1, |out| {
            let (dx, rest) = out.split_at_mut(len);
            let (ds, tail) = rest.split_at_mut(len);
            // BN's backward on d = τ·m: dβ = Σ d, dγ = invstd·Σ d·(x − mean),
            // dx = k·d − k·mean_d − a·(x − mean), k = γ·invstd, a = k·invstd·dγ/M.
            let coef: Vec<(f32, f32, f32)> = (0..c)
                .map(|ch| {
                    let inv = self.invstd[ch] as f64;
                    let k = self.gamma[ch] as f64 * inv;
                    let mean_d = tau * sums[ch][0] / m;
                    let dgamma = tau * sums[ch][1] * inv;
                    (
                        (k * tau) as f32,
                        (k * mean_d) as f32,
                        (k * inv * dgamma / m) as f32,
                    )
                })
                .collect();
            if hw > 0 {
                dx.par_chunks_mut(hw)
                    .zip(ds.par_chunks_mut(hw))
                    .zip(
                        dy.par_chunks(hw)
                            .zip(x.par_chunks(hw).zip(y.par_chunks(hw))),
                    )
                    .enumerate()
                    .for_each(|(idx, ((db, sb), (gb, (xb, yb))))| {
                        let ch = idx % c;
                        let (kt, b, a) = coef[ch];
                        let mean = self.mean[ch];
                        for ((((o, q), &g), &v), &yv) in
                            db.iter_mut().zip(sb.iter_mut()).zip(gb).zip(xb).zip(yb)
                        {
                            let mg = if yv > 0.0 { g } else { 0.0 };
                            q.write(mg);
                            o.write(kt * mg - b - a * (v - mean));
                        }
                    });
            }
            let mut dtau = 0f64;
            for ch in 0..c {
                tail[ch].write((tau * sums[ch][1] * self.invstd[ch] as f64) as f32);
                tail[c + ch].write((tau * sums[ch][0]) as f32);
                dtau += sums[ch][2];
            }
            tail[2 * c].write(dtau as f32);
        })
    }
}

impl CustomOp3 for BnResBwd {
    fn name(&self) -> &'static str {
        "batch-norm-residual-relu-fused-backward"
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
        let len = n * c * hw;
        let dy = f32_data(s1, l1, len, self.name(), "output gradient")?;
        let x = f32_data(s2, l2, len, self.name(), "input")?;
        let y = f32_data(s3, l3, len, self.name(), "output")?;
        let out = self.compute(dy, x, y);
        Ok((CpuStorage::F32(out), Shape::from(2 * len + 2 * c + 1)))
    }
}

/// `running ← (1 − momentum)·running + momentum·factor·batch`, as candle-nn computes it.
fn update_running(running: &Tensor, batch: &[f64], momentum: f64, factor: f64) -> Result<()> {
    let batch = Tensor::from_iter(batch.iter().map(|&v| v as f32), running.device())?;
    let updated = ((running.detach() * (1.0 - momentum))? + (batch * (momentum * factor))?)?;
    // `running` is the variable candle-nn's BatchNorm holds (`Var::from_tensor` of a
    // variable wraps the same storage).
    Var::from_tensor(running)?.set(&updated)
}

/// Sizes of a BatchNorm input: n images, c channels, hw values per channel and image.
#[derive(Debug, Clone, Copy)]
struct BnGeom {
    n: usize,
    c: usize,
    hw: usize,
    /// The input's (N, C, H, W).
    dims: (usize, usize, usize, usize),
}

/// What the forward pass keeps for the backward pass and the running statistics.
#[derive(Debug)]
struct BnState {
    /// Batch mean per channel.
    mean: Vec<f64>,
    /// Biased batch variance per channel.
    var: Vec<f64>,
    /// 1/sqrt(var + eps) per channel.
    invstd: Vec<f32>,
    /// γ per channel.
    gamma: Vec<f32>,
    /// y = scale·x + shift per channel (before the ReLU).
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BnState {
    /// The backward op of the BatchNorm (optionally followed by ReLU) whose forward kept
    /// these statistics.
    fn backward(&self, geom: BnGeom, relu: bool) -> BnBwd {
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
    fn res_backward(&self, geom: BnGeom, tau: f32) -> BnResBwd {
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
struct BnFwd {
    geom: BnGeom,
    eps: f64,
    relu: bool,
    state: Arc<Mutex<Option<BnState>>>,
}

/// Σ of 16 per-lane `f32` partial sums, in `f64` (the lanes of the vectorized reductions
/// here and in the convolution and block ops).
pub(crate) fn lanes_sum(acc: &[f32; 16]) -> f64 {
    acc.iter().map(|&v| v as f64).sum()
}

/// Sum of a slice in f64 (f32 lanes within the slice, which are short: one image-channel).
fn sum_f64(xs: &[f32]) -> f64 {
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

/// Σ (x − mean)² of a slice in f64.
fn centered_sq_f64(xs: &[f32], mean: f32) -> f64 {
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
fn grad_sums(dy: &[f32], x: &[f32], mean: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
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
struct BnStats {
    mean: Vec<f64>,
    var: Vec<f64>,
    invstd: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

/// Per-channel batch mean and (biased) variance of `x`, and the normalization's affine map.
fn bn_stats(geom: BnGeom, x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> BnStats {
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
fn bn_forward(
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
                o.write((v * a + b).max(0.0));
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
struct BnBwd {
    geom: BnGeom,
    relu: bool,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BnBwd {
    /// [dx, dγ, dβ] from the output gradient and the input.
    fn compute(&self, dy: &[f32], x: &[f32]) -> Vec<f32> {
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

/// Whether the fused elementwise path applies: `f32` CPU tensors, fused ops on.
fn fused_f32(ts: &[&Tensor]) -> bool {
    fused_cpu_ops()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

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
        return if relu { ys.relu() } else { Ok(ys) };
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
        return xs.relu();
    }
    xs.contiguous()?.apply_op1(Relu)
}

/// Forward of [`relu`].
struct Relu;

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
                        o.write(v.max(0.0));
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

/// 3×3 max pooling with stride 2 and padding 1 (the bottleneck ResNets' stem), PyTorch's
/// `max_pool2d(x, 3, 2, 1)`: padding never wins (−∞), and the gradient of each output goes
/// to the first maximum of its window in row-major order, as PyTorch's CPU kernel routes it.
///
/// On the CPU for `f32`, one custom op that keeps the index of each window's maximum;
/// elsewhere [`crate::resnet::max_pool_3x3_s2`]'s composition of shifts and maxima, which
/// gives the same output for nonnegative inputs (after a ReLU) but splits the gradient
/// among tied maxima.
///
/// # Errors
/// Input of rank other than 4, an empty image, or a device error.
pub fn max_pool_3x3_s2(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    if h == 0 || w == 0 {
        candle::bail!("max pool: empty {h}×{w} image");
    }
    if !fused_f32(&[xs]) {
        return crate::resnet::max_pool_3x3_s2_composed(xs);
    }
    let op = MaxPool {
        geom: PoolGeom { n, c, h, w },
        argmax: Arc::new(Mutex::new(Vec::new())),
    };
    xs.contiguous()?.apply_op1(op)
}

/// Sizes of a 3×3/2 max pool's input; the output is ⌈h/2⌉ × ⌈w/2⌉.
#[derive(Debug, Clone, Copy)]
struct PoolGeom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl PoolGeom {
    fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }
}

/// Forward of [`max_pool_3x3_s2`]: keeps, per output, the index of its maximum within the
/// input plane.
struct MaxPool {
    geom: PoolGeom,
    argmax: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let PoolGeom { n, c, h, w } = self.geom;
        let (ho, wo) = self.geom.out_hw();
        let x = f32_data(s1, l1, n * c * h * w, self.name(), "input")?;
        let mut idx = vec![0u32; n * c * ho * wo];
        let y = written(n * c * ho * wo, |y| {
            y.par_chunks_mut(ho * wo)
                .zip(idx.par_chunks_mut(ho * wo))
                .zip(x.par_chunks(h * w))
                .for_each(|((yp, ip), xp)| {
                    for i in 0..ho {
                        for j in 0..wo {
                            let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                            for r in (2 * i).saturating_sub(1)..(2 * i + 2).min(h) {
                                for q in (2 * j).saturating_sub(1)..(2 * j + 2).min(w) {
                                    let v = xp[r * w + q];
                                    // PyTorch: `val > maxval || isnan(val)`
                                    if at == usize::MAX || v > best || v.is_nan() {
                                        (best, at) = (v, r * w + q);
                                    }
                                }
                            }
                            yp[i * wo + j].write(best);
                            ip[i * wo + j] = at as u32;
                        }
                    }
                })
        });
        *lock_state(&self.argmax)? = idx;
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = MaxPoolBwd {
            geom: self.geom,
            argmax: self.argmax.clone(),
        };
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&op)?
                .reshape(xs.shape())?,
        ))
    }
}

/// Backward of [`MaxPool`]: each output gradient added at its window's maximum.
struct MaxPoolBwd {
    geom: PoolGeom,
    argmax: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-fused-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let PoolGeom { n, c, h, w } = self.geom;
        let (ho, wo) = self.geom.out_hw();
        let dy = f32_data(s1, l1, n * c * ho * wo, self.name(), "output gradient")?;
        let idx = lock_state(&self.argmax)?;
        if idx.len() != dy.len() {
            candle::bail!("{}: backward before the forward", self.name());
        }
        let mut dx = vec![0f32; n * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(dy.par_chunks(ho * wo).zip(idx.par_chunks(ho * wo)))
            .for_each(|(dp, (gp, ip))| {
                for (&g, &k) in gp.iter().zip(ip) {
                    dp[k as usize] += g;
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }
}

/// Global average pool (N, C, H, W) → (N, C); on the CPU for `f32` one custom op (sums in
/// `f64`) whose backward spreads each gradient over its plane, instead of candle's
/// reshape, sum and scaling with their activation-sized backward.
///
/// # Errors
/// Input of rank other than 4, or a device error.
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    if !fused_f32(&[xs]) || h * w == 0 {
        return xs.flatten_from(2)?.mean(2);
    }
    xs.contiguous()?.apply_op1(AvgPool {
        nc: (n, c),
        hw: h * w,
    })
}

/// Forward of [`global_avg_pool`].
struct AvgPool {
    nc: (usize, usize),
    hw: usize,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "global-avg-pool-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = self.nc;
        let hw = self.hw;
        let x = f32_data(s1, l1, n * c * hw, self.name(), "input")?;
        let y: Vec<f32> = x
            .par_chunks(hw)
            .map(|p| (sum_f64(p) / hw as f64) as f32)
            .collect();
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = grad.contiguous()?.apply_op1_no_bwd(&AvgPoolBwd {
            nc: self.nc,
            hw: self.hw,
        })?;
        Ok(Some(out.reshape(xs.shape())?))
    }
}

/// Backward of [`AvgPool`]: dy (N, C) → dx (N·C·H·W), dx = dy / (H·W) over each plane.
struct AvgPoolBwd {
    nc: (usize, usize),
    hw: usize,
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "global-avg-pool-fused-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = self.nc;
        let hw = self.hw;
        let dy = f32_data(s1, l1, n * c, self.name(), "output gradient")?;
        let inv = 1.0 / hw as f64;
        let dx = written(n * c * hw, |dx| {
            dx.par_chunks_mut(hw)
                .zip(dy.par_iter())
                .for_each(|(p, &g)| {
                    let v = (g as f64 * inv) as f32;
                    for o in p {
                        o.write(v);
                    }
                })
        });
        Ok((CpuStorage::F32(dx), Shape::from(n * c * hw)))
    }
}

/// The option-A shortcut of a CIFAR ResNet: every other row and column when `stride` is 2
/// (`x[:, :, ::2, ::2]`), then zero channels appended up to `c_out`. On the CPU for `f32`
/// one custom op (forward and backward one parallel pass each) instead of candle's pad,
/// reshape, narrow and concatenation nodes; elsewhere those.
///
/// # Errors
/// Input of rank other than 4, a stride other than 1 or 2, `c_out` below the input's
/// channels, or a device error.
pub fn option_a_shortcut(xs: &Tensor, stride: usize, c_out: usize) -> Result<Tensor> {
    let (n, c_in, h, w) = xs.dims4()?;
    if stride != 1 && stride != 2 {
        candle::bail!("option-A shortcut: stride must be 1 or 2, got {stride}");
    }
    if c_out < c_in {
        candle::bail!("option-A shortcut: {c_out} output channels for {c_in} input channels");
    }
    if stride == 1 && c_out == c_in {
        return Ok(xs.clone());
    }
    if !fused_f32(&[xs]) {
        let xs = if stride == 2 {
            crate::resnet::subsample2(xs)?
        } else {
            xs.clone()
        };
        return if c_out > c_in {
            xs.pad_with_zeros(1, 0, c_out - c_in)
        } else {
            Ok(xs)
        };
    }
    xs.contiguous()?.apply_op1(ShortcutA(ShortcutGeom {
        n,
        c_in,
        c_out,
        h,
        w,
        stride,
    }))
}

/// Sizes of an option-A shortcut.
#[derive(Debug, Clone, Copy)]
struct ShortcutGeom {
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    stride: usize,
}

impl ShortcutGeom {
    fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }
}

/// The option-A shortcut of `x` (n × c_in × h × w): every `stride`-th pixel of each
/// channel, then zero channels up to c_out.
fn shortcut_a_forward(g: ShortcutGeom, x: &[f32]) -> Vec<f32> {
    let (ho, wo) = g.out_hw();
    written(g.n * g.c_out * ho * wo, |y| {
        if ho * wo == 0 {
            return;
        }
        y.par_chunks_mut(ho * wo).enumerate().for_each(|(idx, p)| {
            let (i, c) = (idx / g.c_out, idx % g.c_out);
            if c >= g.c_in {
                for o in p {
                    o.write(0.0);
                }
                return;
            }
            let src = &x[(i * g.c_in + c) * g.h * g.w..][..g.h * g.w];
            for (r, row) in p.chunks_mut(wo).enumerate() {
                let s = &src[r * g.stride * g.w..];
                for (j, o) in row.iter_mut().enumerate() {
                    o.write(s[j * g.stride]);
                }
            }
        })
    })
}

/// Forward of [`option_a_shortcut`].
struct ShortcutA(ShortcutGeom);

impl CustomOp1 for ShortcutA {
    fn name(&self) -> &'static str {
        "option-a-shortcut-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (ho, wo) = g.out_hw();
        let x = f32_data(s1, l1, g.n * g.c_in * g.h * g.w, self.name(), "input")?;
        let y = shortcut_a_forward(g, x);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c_out, ho, wo))))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = grad.contiguous()?.apply_op1_no_bwd(&ShortcutABwd(self.0))?;
        Ok(Some(out.reshape(xs.shape())?))
    }
}

/// The adjoint of [`shortcut_a_forward`]: dy (n × c_out × h' × w') → dx (n × c_in × h × w),
/// dy's first c_in channels at the kept positions, zero elsewhere.
fn shortcut_a_backward(g: ShortcutGeom, dy: &[f32]) -> Vec<f32> {
    let (ho, wo) = g.out_hw();
    written(g.n * g.c_in * g.h * g.w, |dx| {
        if g.h * g.w == 0 {
            return;
        }
        dx.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(idx, p)| {
                let (i, c) = (idx / g.c_in, idx % g.c_in);
                let src = &dy[(i * g.c_out + c) * ho * wo..][..ho * wo];
                for (r, row) in p.chunks_mut(g.w).enumerate() {
                    if r % g.stride != 0 {
                        for o in row {
                            o.write(0.0);
                        }
                        continue;
                    }
                    let s = &src[(r / g.stride) * wo..][..wo];
                    for (col, o) in row.iter_mut().enumerate() {
                        o.write(if col % g.stride == 0 {
                            s[col / g.stride]
                        } else {
                            0.0
                        });
                    }
                }
            })
    })
}

/// Backward of [`ShortcutA`]: dy (N, C_out, H', W') → dx (N·C_in·H·W), dy's first C_in
/// channels at the kept positions, zero elsewhere.
struct ShortcutABwd(ShortcutGeom);

impl CustomOp1 for ShortcutABwd {
    fn name(&self) -> &'static str {
        "option-a-shortcut-fused-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (ho, wo) = g.out_hw();
        let dy = f32_data(
            s1,
            l1,
            g.n * g.c_out * ho * wo,
            self.name(),
            "output gradient",
        )?;
        let len = g.n * g.c_in * g.h * g.w;
        let dx = shortcut_a_backward(g, dy);
        Ok((CpuStorage::F32(dx), Shape::from(len)))
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
    if !fused_f32(&[xs, b, c]) {
        return add_scalar(&add_scalar(xs, b, true)?, c, false);
    }
    xs.contiguous()?
        .apply_op3(&b.flatten_all()?, &c.flatten_all()?, BiasReluBias)
}

/// Forward of [`bias_relu_bias`]: (x, b, c) → relu(x + b) + c.
struct BiasReluBias;

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
                        o.write((v + b).max(0.0) + c);
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
struct BiasReluBiasBwd {
    b: f32,
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
    if !fused_f32(&all) {
        let branch = match b {
            Some(b) => branch.broadcast_add(b)?,
            None => branch.clone(),
        };
        return (branch.broadcast_mul(tau)? + shortcut)?.relu();
    }
    let ab = match b {
        Some(b) => Tensor::cat(&[tau.flatten_all()?, b.flatten_all()?], 0)?,
        None => tau.flatten_all()?,
    };
    branch
        .contiguous()?
        .apply_op3(&ab, &shortcut.contiguous()?, ResidualRelu)
}

/// Reads the one or two scalars of a small storage.
fn scalars(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<f32>> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(data[start..end].to_vec()),
        None => candle::bail!("{what} is not contiguous"),
    }
}

/// Values per parallel work item of the elementwise ops.
const CHUNK: usize = 1 << 14;

/// Forward of [`add_scalar`]: (x, b) → x + b, optionally ReLU'd.
struct AddScalar {
    relu: bool,
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
                            o.write((v + b).max(0.0));
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
struct MaskSum {
    relu: bool,
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
struct ResidualRelu;

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
                        o.write((a * v + c + t).max(0.0));
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
struct ResidualReluBwd {
    ab: Vec<f32>,
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

mod block;
pub use block::{batch_norm_block, scalar_bias_block};

#[cfg(test)]
mod tests;
