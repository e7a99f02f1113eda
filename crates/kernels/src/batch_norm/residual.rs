//! relu(τ · BN(x) + shortcut): the end of a basic block with BatchNorm (BN2, the τ scaling,
//! the residual addition and the ReLU) as one custom op.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::{
    BnGeom, BnState, BnStats, batch_norm_t, bn_params_f32, bn_stats, bn_train_parts,
    update_running_stats,
};
use crate::elementwise::residual_relu;
use crate::util::{f32_data, fused_f32, lanes_sum, lock_state, relu_f32, written};

/// relu(τ · BN(`xs`) + `shortcut`) for a one-element `tau`: the end of a basic block with
/// BatchNorm (BN2, the τ scaling, the residual addition and the ReLU).
///
/// In training mode on the CPU for `f32`, one custom op (see [`batch_norm_t`] for the
/// statistics and the running-statistics update) whose backward is closed-form: with
/// m = dy ⊙ 1(y > 0), the shortcut's gradient is m, τ's is Σ m·BN(x), and BN's backward
/// runs on τ·m. In evaluation mode on the CPU for `f32`, one op computes
/// relu(τ·scale·x + τ·shift + s) (see [`batch_norm_t`]). Elsewhere it is [`batch_norm_t`]
/// followed by [`residual_relu`]; both compute the same `f32` numbers.
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
    if !train
        && tau.elem_count() == 1
        && shortcut.dims() == xs.dims()
        && super::eval::applies(bn, xs, &[tau, shortcut])
    {
        return super::eval::batch_norm_residual_relu_eval(bn, xs, tau, shortcut);
    }
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
pub(crate) fn bn_res_forward(
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
            o.write(relu_f32(tau * (v * a + b) + t));
        }
    })
}

/// The batch statistics of a BatchNorm in training mode, and its output written by `write`
/// plane by plane: `write(idx, y, x, scale, shift)` for plane `idx` (image idx / c,
/// channel idx % c) with BN(x) = scale·x + shift, on rayon's threads.
pub(crate) fn bn_forward_map<F>(
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
pub(crate) struct BnResFwd {
    pub(crate) geom: BnGeom,
    pub(crate) eps: f64,
    /// The statistics and τ, for the backward pass and the running statistics.
    pub(crate) state: Arc<Mutex<Option<(BnState, f32)>>>,
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
pub(crate) struct BnResBwd {
    pub(crate) geom: BnGeom,
    pub(crate) tau: f32,
    pub(crate) mean: Vec<f32>,
    pub(crate) invstd: Vec<f32>,
    pub(crate) gamma: Vec<f32>,
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

/// (Σ m, Σ m·(x − mean), Σ m·(scale·x + shift)) of one plane in f64, m = dy ⊙ 1(y > 0).
pub(crate) fn res_sums(
    dy: &[f32],
    x: &[f32],
    y: &[f32],
    mean: f32,
    scale: f32,
    shift: f32,
) -> [f64; 3] {
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
    pub(crate) fn compute(&self, dy: &[f32], x: &[f32], y: &[f32]) -> Vec<f32> {
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
