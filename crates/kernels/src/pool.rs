//! Pooling: the 3×3/2 max pool of the bottleneck stem (PyTorch's semantics: the first
//! maximum of a window takes the gradient) and the global average pool, each one custom op
//! on the CPU for `f32`, and the max pool composed of shifts and maxima for other devices.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::shortcut::subsample2;
use crate::util::{f32_data, fused_f32, lock_state, sum_f64, written};

/// 3×3 max pooling with stride 2 and padding 1 (the bottleneck ResNets' stem), PyTorch's
/// `max_pool2d(x, 3, 2, 1)`: padding never wins (−∞), and the gradient of each output goes
/// to the first maximum of its window in row-major order, as PyTorch's CPU kernel routes it.
///
/// On the CPU for `f32`, one custom op that keeps the index of each window's maximum;
/// elsewhere [`max_pool_3x3_s2_composed`]'s composition of shifts and maxima, which
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
        return crate::pool::max_pool_3x3_s2_composed(xs);
    }
    let op = MaxPool {
        geom: PoolGeom { n, c, h, w },
        argmax: Arc::new(Mutex::new(Vec::new())),
    };
    xs.contiguous()?.apply_op1(op)
}

/// Sizes of a 3×3/2 max pool's input; the output is ⌈h/2⌉ × ⌈w/2⌉.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolGeom {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl PoolGeom {
    pub(crate) fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }
}

/// Forward of [`max_pool_3x3_s2`]: keeps, per output, the index of its maximum within the
/// input plane.
pub(crate) struct MaxPool {
    pub(crate) geom: PoolGeom,
    pub(crate) argmax: Arc<Mutex<Vec<u32>>>,
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
pub(crate) struct MaxPoolBwd {
    pub(crate) geom: PoolGeom,
    pub(crate) argmax: Arc<Mutex<Vec<u32>>>,
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
pub(crate) struct AvgPool {
    pub(crate) nc: (usize, usize),
    pub(crate) hw: usize,
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
pub(crate) struct AvgPoolBwd {
    pub(crate) nc: (usize, usize),
    pub(crate) hw: usize,
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

/// 3×3 max pooling, stride 2, padding 1, for nonnegative inputs (after a ReLU, where zero
/// padding equals PyTorch's −∞ padding), built from shifts and maxima so it has a gradient
/// on every device (tied maxima share the gradient).
pub fn max_pool_3x3_s2_composed(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let padded = xs.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
    let mut out: Option<Tensor> = None;
    for di in 0..3 {
        for dj in 0..3 {
            let v = subsample2(
                &padded
                    .narrow(2, di, 2 * ho - 1)?
                    .narrow(3, dj, 2 * wo - 1)?,
            )?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle::Error::Msg("max pool: empty window".into()))
}

#[cfg(test)]
mod tests;
