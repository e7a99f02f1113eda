//! The option-A shortcut of a CIFAR ResNet (stride-2 subsampling, zero channels appended)
//! as one custom op on the CPU for `f32`, and the stride-2 subsample in candle's ops.

use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::util::{f32_data, fused_f32, written};

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
            crate::shortcut::subsample2(xs)?
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
pub(crate) struct ShortcutGeom {
    pub(crate) n: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) stride: usize,
}

impl ShortcutGeom {
    pub(crate) fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }
}

/// The option-A shortcut of `x` (n × c_in × h × w): every `stride`-th pixel of each
/// channel, then zero channels up to c_out.
pub(crate) fn shortcut_a_forward(g: ShortcutGeom, x: &[f32]) -> Vec<f32> {
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
pub(crate) struct ShortcutA(pub(crate) ShortcutGeom);

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
pub(crate) fn shortcut_a_backward(g: ShortcutGeom, dy: &[f32]) -> Vec<f32> {
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
pub(crate) struct ShortcutABwd(ShortcutGeom);

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

/// Every other row and column, starting at the first: a stride-2 subsample that autograd
/// can differentiate (PyTorch's `AvgPool2d(1, stride=2)`, or `x[:, :, ::2, ::2]`).
pub fn subsample2(xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let xs = if h % 2 == 1 {
        xs.pad_with_zeros(2, 0, 1)?
    } else {
        xs.clone()
    };
    let xs = if w % 2 == 1 {
        xs.pad_with_zeros(3, 0, 1)?
    } else {
        xs
    };
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    xs.reshape((n, c, h2, 2, w2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, h2, w2))
}

#[cfg(test)]
mod tests;
