//! A whole basic block as one custom op: without normalization
//! relu(τ · (conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b) + shortcut(x)) (or Fixup's
//! relu(s · conv2(…) + b2b + shortcut(x)), the bias after the multiplier), with BatchNorm
//! relu(τ · BN2(conv2(relu(BN1(conv1 x)))) + shortcut(x)); the shortcut is the identity or,
//! at a stage transition, option A (stride-2 subsampling and zero channels).
//!
//! Composed of the per-layer ops, a block is four activation-sized nodes of candle's graph
//! (conv1 of the shifted input, relu(· + b1b) + b2a, conv2, the residual end), and candle's
//! `backward` zero-fills a gradient tensor for each node's inputs and adds the op's
//! gradient into it, on the calling thread while the other cores wait; the block input
//! gets two such additions (branch and shortcut). As one op the block has one node: its
//! backward runs the two convolutions' gradients and three elementwise passes on rayon's
//! threads, and hands candle one input gradient (branch and shortcut already summed) and
//! one small vector of parameter gradients.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use crate::batch_norm::{
    BnGeom, BnState, batch_norm_residual_relu, batch_norm_t, bn_forward, bn_params_f32,
    bn_res_forward, bn_train_parts, update_running_stats,
};
use crate::conv::{
    Geom, backward_input_vec, backward_weight_vec, conv2d, conv2d_shifted, forward_vec,
};
use crate::elementwise::{bias_relu_bias, residual_relu};
use crate::shortcut::{ShortcutGeom, option_a_shortcut, shortcut_a_backward, shortcut_a_forward};
use crate::util::{CHUNK, f32_data, fused_f32, lanes_sum, lock_state, relu_f32, written};

mod batch_norm;
#[cfg(test)]
mod tests;

pub use batch_norm::batch_norm_block;

/// relu(τ · (conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b) + shortcut(x)): a basic block
/// without normalization, 3×3 convolutions with padding 1 (conv1 with `stride`, 1 or 2),
/// one-element biases `[b1a, b1b, b2a, b2b]` and a one-element `tau`. The shortcut is the
/// identity for stride 1 and as many output channels as input channels, otherwise
/// [`option_a_shortcut`].
///
/// On the CPU for `f32` (with the fused ops selected in [`crate::select`]), one custom op whose
/// backward is written out; elsewhere the composition
/// [`conv2d_shifted`], [`bias_relu_bias`], [`conv2d`], [`residual_relu`] with
/// [`option_a_shortcut`], which computes the same function.
///
/// # Errors
/// `xs` not of rank 4, a conv1 weight that is not (C_out, C_in, 3, 3) for the C_in channels
/// of `xs` with C_out ≥ C_in, a conv2 weight that is not (C_out, C_out, 3, 3), a stride
/// other than 1 or 2, a bias or `tau` with more than one element, or a device error.
pub fn scalar_bias_block(
    xs: &Tensor,
    conv1: &Tensor,
    conv2: &Tensor,
    biases: [&Tensor; 4],
    tau: &Tensor,
    stride: usize,
) -> Result<Tensor> {
    bias_block(
        "scalar_bias_block",
        xs,
        [conv1, conv2],
        biases,
        tau,
        stride,
        false,
    )
}

/// relu(s · conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b + shortcut(x)): the basic block
/// of Fixup (Zhang, Dauphin & Ma 2019, Figure 1 and the authors' CIFAR code), with the
/// branch's one-element multiplier `scale` (s) applied before the last bias, where
/// [`scalar_bias_block`] scales the biased branch. Same weights, biases, shortcut, fast
/// path and fallback as [`scalar_bias_block`]; only the place of b2b differs.
///
/// # Errors
/// As [`scalar_bias_block`], with `scale` in place of `tau`.
pub fn fixup_block(
    xs: &Tensor,
    conv1: &Tensor,
    conv2: &Tensor,
    biases: [&Tensor; 4],
    scale: &Tensor,
    stride: usize,
) -> Result<Tensor> {
    bias_block(
        "fixup_block",
        xs,
        [conv1, conv2],
        biases,
        scale,
        stride,
        true,
    )
}

/// [`scalar_bias_block`] (`bias_after_scale` false) or [`fixup_block`] (true).
fn bias_block(
    what: &str,
    xs: &Tensor,
    [conv1, conv2]: [&Tensor; 2],
    biases: [&Tensor; 4],
    tau: &Tensor,
    stride: usize,
    bias_after_scale: bool,
) -> Result<Tensor> {
    let [b1a, b1b, b2a, b2b] = biases;
    if biases.iter().any(|b| b.elem_count() != 1) || tau.elem_count() != 1 {
        candle::bail!("{what}: the biases and the branch multiplier must have one element each");
    }
    let bg = BlockGeom::new(what, xs, conv1, conv2, stride)?;
    let fast = fused_f32(&[xs, conv1, conv2, b1a, b1b, b2a, b2b, tau]);
    if !fast {
        let out = conv2d_shifted(xs, b1a, conv1, stride, 1)?;
        let out = bias_relu_bias(&out, b1b, b2a)?;
        let out = conv2d(&out, conv2, 1, 1)?;
        let shortcut = option_a_shortcut(xs, stride, bg.g1.c_out)?;
        if bias_after_scale {
            return residual_relu(&out, tau, None, &shortcut.broadcast_add(b2b)?);
        }
        return residual_relu(&out, tau, Some(b2b), &shortcut);
    }
    let params = Tensor::cat(
        &[
            conv1.flatten_all()?,
            conv2.flatten_all()?,
            b1a.flatten_all()?,
            b1b.flatten_all()?,
            b2a.flatten_all()?,
            b2b.flatten_all()?,
            tau.flatten_all()?,
        ],
        0,
    )?;
    let op = BlockFwd {
        bg,
        bias_after_scale,
        keep: xs.track_op() || params.track_op(),
        keep_branch: tau.track_op(),
        state: Arc::new(Mutex::new(None)),
    };
    xs.contiguous()?.apply_op2(&params, op)
}

/// Sizes of a basic block: its two convolutions and its shortcut.
#[derive(Debug, Clone, Copy)]
struct BlockGeom {
    /// conv1: C_in → C_out, with the block's stride.
    g1: Geom,
    /// conv2: C_out → C_out, stride 1, on conv1's output.
    g2: Geom,
    /// The option-A shortcut; `None` for the identity.
    shortcut: Option<ShortcutGeom>,
}

impl BlockGeom {
    /// Checks the shapes of a block on `xs` (see [`scalar_bias_block`]).
    fn new(what: &str, xs: &Tensor, conv1: &Tensor, conv2: &Tensor, stride: usize) -> Result<Self> {
        let (n, c_in, h, w) = xs.dims4()?;
        let c_out = conv1.dim(0)?;
        if conv1.dims() != [c_out, c_in, 3, 3] || c_out < c_in {
            candle::bail!(
                "{what}: conv1 weight {:?} does not fit a block on {c_in} channels (expected \
                 [C_out, {c_in}, 3, 3] with C_out ≥ {c_in})",
                conv1.dims()
            );
        }
        if conv2.dims() != [c_out, c_out, 3, 3] {
            candle::bail!(
                "{what}: conv2 weight {:?} does not fit a block of {c_out} channels (expected \
                 [{c_out}, {c_out}, 3, 3])",
                conv2.dims()
            );
        }
        if stride != 1 && stride != 2 {
            candle::bail!("{what}: stride must be 1 or 2, got {stride}");
        }
        let g1 = crate::conv::geometry(xs, conv1, stride, 1)?;
        let g2 = Geom {
            n,
            c_in: c_out,
            h: g1.h_out,
            w: g1.w_out,
            c_out,
            k: 3,
            stride: 1,
            padding: 1,
            h_out: g1.h_out,
            w_out: g1.w_out,
            kernels: g1.kernels,
        };
        let shortcut = (stride != 1 || c_out != c_in).then_some(ShortcutGeom {
            n,
            c_in,
            c_out,
            h,
            w,
            stride,
        });
        Ok(Self { g1, g2, shortcut })
    }

    fn len_in(&self) -> usize {
        self.g1.n * self.g1.c_in * self.g1.h * self.g1.w
    }

    fn len_out(&self) -> usize {
        self.g2.n * self.g2.c_out * self.g2.h * self.g2.w
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.g2.n, self.g2.c_out, self.g2.h, self.g2.w))
    }

    /// Elements of conv1's and conv2's weights.
    fn weights(&self) -> (usize, usize) {
        (
            self.g1.c_out * self.g1.c_in * 9,
            self.g2.c_out * self.g2.c_in * 9,
        )
    }

    /// The shortcut of `x`: `x` itself, or its option-A shortcut.
    fn shortcut<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match self.shortcut {
            None => Cow::Borrowed(x),
            Some(sg) => Cow::Owned(shortcut_a_forward(sg, x)),
        }
    }

    /// The operands (dy, y, x) of a block's backward op, checked against the block's sizes.
    fn bwd_operands<'a>(
        &self,
        op: &str,
        dy: (&'a CpuStorage, &Layout),
        y: (&'a CpuStorage, &Layout),
        x: (&'a CpuStorage, &Layout),
    ) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
        let (len_in, len) = (self.len_in(), self.len_out());
        Ok((
            f32_data(dy.0, dy.1, len, op, "output gradient")?,
            f32_data(y.0, y.1, len, op, "output")?,
            f32_data(x.0, x.1, len_in, op, "input")?,
        ))
    }

    /// dx = `dx_branch` + the shortcut's adjoint applied to `m`, in place; returns Σ of
    /// `dx_branch` (before the addition).
    fn add_shortcut_grad(&self, dx_branch: &mut [f32], m: &[f32]) -> f64 {
        let ds = match self.shortcut {
            None => Cow::Borrowed(m),
            Some(sg) => Cow::Owned(shortcut_a_backward(sg, m)),
        };
        dx_branch
            .par_chunks_mut(CHUNK)
            .zip(ds.par_chunks(CHUNK))
            .map(|(dc, mc)| sum_then_add(dc, mc))
            .sum()
    }
}

/// The one-element parameters, in their order at the end of the packed parameter vector.
const SCALARS: usize = 5;

/// The packed parameters: conv1 and conv2 weights, then b1a, b1b, b2a, b2b, τ.
struct Params<'a> {
    w1: &'a [f32],
    w2: &'a [f32],
    b1a: f32,
    b1b: f32,
    b2a: f32,
    b2b: f32,
    tau: f32,
}

impl<'a> Params<'a> {
    fn len(bg: &BlockGeom) -> usize {
        let (k1, k2) = bg.weights();
        k1 + k2 + SCALARS
    }

    fn split(bg: &BlockGeom, p: &'a [f32]) -> Self {
        let (k1, k2) = bg.weights();
        let s = &p[k1 + k2..];
        Self {
            w1: &p[..k1],
            w2: &p[k1..k1 + k2],
            b1a: s[0],
            b1b: s[1],
            b2a: s[2],
            b2b: s[3],
            tau: s[4],
        }
    }
}

/// What the backward needs from the forward.
struct State {
    /// relu(conv1(x + b1a) + b1b) + b2a, conv2's input.
    h: Vec<f32>,
    /// 1 where conv1(x + b1a) + b1b > 0.
    mask: Vec<u8>,
    /// conv2's output, kept only when τ needs a gradient (Σ m·(y2 + b2b)).
    y2: Option<Vec<f32>>,
}

/// Forward of [`scalar_bias_block`]: (x, packed parameters) → the block's output.
struct BlockFwd {
    bg: BlockGeom,
    /// b2b added after τ (Fixup's multiplier) rather than before.
    bias_after_scale: bool,
    /// Keep the intermediates for a backward (some input needs a gradient).
    keep: bool,
    /// Keep conv2's output too (τ needs a gradient).
    keep_branch: bool,
    state: Arc<Mutex<Option<State>>>,
}

/// What a block's forward kept for its backward, or an error naming the backward op.
fn kept_state<'a, T>(state: &'a Option<T>, op: &str) -> Result<&'a T> {
    state.as_ref().ok_or_else(|| {
        candle::Error::Msg(format!("{op}: the forward kept no state for a backward"))
    })
}

/// Runs a block's backward op on (dy, y, x), whose result is [dx, dparams] in one vector,
/// and splits it into the gradients of the input and of the packed parameters.
fn block_grads(
    op: &impl CustomOp3,
    xs: &Tensor,
    params: &Tensor,
    res: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let out = grad.contiguous()?.apply_op3_no_bwd(res, xs, op)?;
    let len = xs.elem_count();
    let dx = out.narrow(0, 0, len)?.reshape(xs.shape())?;
    let dp = out.narrow(0, len, params.elem_count())?;
    Ok((xs.track_op().then_some(dx), params.track_op().then_some(dp)))
}

// The elementwise passes of the backward below work on 16-float groups with one partial
// sum per lane (`chunks_exact(16)` and fixed-size loops, which the compiler vectorizes),
// then the remainder.

/// m = dy ⊙ 1(y > 0) into `m`; returns (Σ m·(y2 + b2b), Σ m), the first 0 without `y2`.
fn mask_sums(
    m: &mut [MaybeUninit<f32>],
    dy: &[f32],
    y: &[f32],
    y2: Option<(&[f32], f32)>,
) -> (f64, f64) {
    let mut s_m = [0f32; 16];
    let mut s_my = [0f32; 16];
    let full = dy.len() / 16 * 16;
    let one = |o: &mut MaybeUninit<f32>, g: f32, yv: f32| {
        let mv = if yv > 0.0 { g } else { 0.0 };
        o.write(mv);
        mv
    };
    match y2 {
        Some((y2, b)) => {
            let groups = m[..full]
                .chunks_exact_mut(16)
                .zip(dy[..full].chunks_exact(16))
                .zip(y[..full].chunks_exact(16).zip(y2[..full].chunks_exact(16)));
            for ((mc, gc), (yc, y2c)) in groups {
                for l in 0..16 {
                    let mv = one(&mut mc[l], gc[l], yc[l]);
                    s_m[l] += mv;
                    s_my[l] += mv * (y2c[l] + b);
                }
            }
            for i in full..dy.len() {
                let mv = one(&mut m[i], dy[i], y[i]);
                s_m[i - full] += mv;
                s_my[i - full] += mv * (y2[i] + b);
            }
        }
        None => {
            let groups = m[..full]
                .chunks_exact_mut(16)
                .zip(dy[..full].chunks_exact(16).zip(y[..full].chunks_exact(16)));
            for (mc, (gc, yc)) in groups {
                for l in 0..16 {
                    s_m[l] += one(&mut mc[l], gc[l], yc[l]);
                }
            }
            for i in full..dy.len() {
                s_m[i - full] += one(&mut m[i], dy[i], y[i]);
            }
        }
    }
    (lanes_sum(&s_my), lanes_sum(&s_m))
}

/// d ← d ⊙ mask in place; returns (Σ d before, Σ d after).
fn relu_mask_sums(d: &mut [f32], mask: &[u8]) -> (f64, f64) {
    let mut s_in = [0f32; 16];
    let mut s_out = [0f32; 16];
    let full = d.len() / 16 * 16;
    // keep is 0 or 1: its negation is an all-zero or all-one bit mask, so the masking is a
    // bitwise AND (+0.0 where the ReLU was off), which vectorizes without branches.
    let one = |v: &mut f32, keep: u8| {
        let before = *v;
        *v = f32::from_bits(before.to_bits() & u32::from(keep).wrapping_neg());
        (before, *v)
    };
    for (dc, mc) in d[..full]
        .chunks_exact_mut(16)
        .zip(mask[..full].chunks_exact(16))
    {
        for l in 0..16 {
            let (a, b) = one(&mut dc[l], mc[l]);
            s_in[l] += a;
            s_out[l] += b;
        }
    }
    for i in full..d.len() {
        let (a, b) = one(&mut d[i], mask[i]);
        s_in[i - full] += a;
        s_out[i - full] += b;
    }
    (lanes_sum(&s_in), lanes_sum(&s_out))
}

/// Σ d, then d ← d + m.
fn sum_then_add(d: &mut [f32], m: &[f32]) -> f64 {
    let mut s = [0f32; 16];
    let full = d.len() / 16 * 16;
    for (dc, mc) in d[..full]
        .chunks_exact_mut(16)
        .zip(m[..full].chunks_exact(16))
    {
        for l in 0..16 {
            s[l] += dc[l];
            dc[l] += mc[l];
        }
    }
    for i in full..d.len() {
        s[i - full] += d[i];
        d[i] += m[i];
    }
    lanes_sum(&s)
}

impl CustomOp2 for BlockFwd {
    fn name(&self) -> &'static str {
        "scalar-bias-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bg = &self.bg;
        let (len_in, len) = (bg.len_in(), bg.len_out());
        let x = f32_data(s1, l1, len_in, self.name(), "input")?;
        let p = Params::split(
            bg,
            f32_data(s2, l2, Params::len(bg), self.name(), "parameters")?,
        );
        // h = relu(conv1(x + b1a) + b1b) + b2a, in place, and the ReLU's mask.
        let mut h = forward_vec(&bg.g1, x, Some(p.b1a), p.w1);
        let mut mask: Vec<u8> = Vec::with_capacity(if self.keep { len } else { 0 });
        let (b1b, b2a) = (p.b1b, p.b2a);
        if self.keep {
            h.par_chunks_mut(CHUNK)
                .zip(mask.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
                .for_each(|(hc, mc)| {
                    for (v, m) in hc.iter_mut().zip(mc) {
                        let pre = *v + b1b;
                        m.write(u8::from(pre > 0.0));
                        *v = relu_f32(pre) + b2a;
                    }
                });
            // SAFETY: the pass above wrote all `len` elements; the capacity is `len`.
            unsafe { mask.set_len(len) };
        } else {
            h.par_chunks_mut(CHUNK).for_each(|hc| {
                for v in hc {
                    *v = relu_f32(*v + b1b) + b2a;
                }
            });
        }
        // out = relu(τ·(conv2(h) + b2b) + shortcut(x)), like `residual_relu`.
        let mut y2 = forward_vec(&bg.g2, &h, None, p.w2);
        let sc = bg.shortcut(x);
        let (a, c) = if self.bias_after_scale {
            (p.tau, p.b2b)
        } else {
            (p.tau, p.tau * p.b2b)
        };
        let end = |yc: &[f32], xc: &[f32], oc: &mut [MaybeUninit<f32>]| {
            for ((o, &v), &t) in oc.iter_mut().zip(yc).zip(xc) {
                o.write(relu_f32(a * v + c + t));
            }
        };
        let out = if self.keep && self.keep_branch {
            written(len, |out| {
                out.par_chunks_mut(CHUNK)
                    .zip(y2.par_chunks(CHUNK).zip(sc.par_chunks(CHUNK)))
                    .for_each(|(oc, (yc, xc))| end(yc, xc, oc))
            })
        } else {
            y2.par_chunks_mut(CHUNK)
                .zip(sc.par_chunks(CHUNK))
                .for_each(|(yc, xc)| {
                    for (v, &t) in yc.iter_mut().zip(xc) {
                        *v = relu_f32(a * *v + c + t);
                    }
                });
            std::mem::take(&mut y2)
        };
        if self.keep {
            *lock_state(&self.state)? = Some(State {
                h,
                mask,
                y2: self.keep_branch.then_some(y2),
            });
        }
        Ok((CpuStorage::F32(out), bg.out_shape()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = BlockBwd {
            bg: self.bg,
            bias_after_scale: self.bias_after_scale,
            params: params.to_vec1()?,
            state: self.state.clone(),
        };
        block_grads(&op, xs, params, res, grad)
    }
}

/// Backward of [`BlockFwd`]: (dy, y, x) → [dx, dw1, dw2, db1a, db1b, db2a, db2b, dτ].
struct BlockBwd {
    bg: BlockGeom,
    /// As [`BlockFwd`]'s.
    bias_after_scale: bool,
    params: Vec<f32>,
    state: Arc<Mutex<Option<State>>>,
}

impl CustomOp3 for BlockBwd {
    fn name(&self) -> &'static str {
        "scalar-bias-block-backward"
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
        let bg = &self.bg;
        let len = bg.len_out();
        let (dy, y, x) = bg.bwd_operands(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let p = Params::split(bg, &self.params);
        let guard = lock_state(&self.state)?;
        let st = kept_state(&guard, self.name())?;
        // m = dy ⊙ 1(y > 0): the shortcut's gradient; the branch's is τ·m.
        // Sums: Σ m·(y2 + b2b) (dτ) and Σ m (db2b = τ·Σ m); with the bias after the
        // multiplier (Fixup) Σ m·y2 (dτ) and Σ m (db2b = Σ m).
        let b2b = if self.bias_after_scale { 0.0 } else { p.b2b };
        let mut sums = (0f64, 0f64);
        let m = written(len, |m| {
            sums = m
                .par_chunks_mut(CHUNK)
                .enumerate()
                .zip(dy.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .map(|((ci, mc), (gc, yc))| match &st.y2 {
                    Some(y2) => mask_sums(mc, gc, yc, Some((&y2[ci * CHUNK..][..gc.len()], b2b))),
                    None => mask_sums(mc, gc, yc, None),
                })
                .reduce(|| (0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
        });
        let (sum_my, sum_m) = sums;
        let tau = p.tau;
        // conv2: dW2 = τ·wgrad(m, h), dh = conv2ᵀ(m) with τ·W2.
        let mut dw2 = backward_weight_vec(&bg.g2, &m, &st.h, None);
        for v in &mut dw2 {
            *v *= tau;
        }
        let w2_tau: Vec<f32> = p.w2.iter().map(|&v| v * tau).collect();
        let mut dh = backward_input_vec(&bg.g2, &m, &w2_tau, 0);
        // db2a = Σ dh; dy1 = dh ⊙ mask (in place); db1b = Σ dy1.
        let (sum_dh, sum_dy1) = dh
            .par_chunks_mut(CHUNK)
            .zip(st.mask.par_chunks(CHUNK))
            .map(|(dc, mc)| relu_mask_sums(dc, mc))
            .reduce(|| (0.0, 0.0), |p, q| (p.0 + q.0, p.1 + q.1));
        let dy1 = dh;
        // conv1 of x + b1a: dW1, and dx = conv1ᵀ(dy1) + shortcutᵀ(m); db1a = Σ conv1ᵀ(dy1).
        let dw1 = backward_weight_vec(&bg.g1, &dy1, x, Some(p.b1a));
        let mut dx = backward_input_vec(&bg.g1, &dy1, p.w1, Params::len(bg));
        let sum_dxb = bg.add_shortcut_grad(&mut dx, &m);
        dx.extend_from_slice(&dw1);
        dx.extend_from_slice(&dw2);
        dx.extend_from_slice(&[
            sum_dxb as f32,
            sum_dy1 as f32,
            sum_dh as f32,
            if self.bias_after_scale {
                sum_m as f32
            } else {
                (tau as f64 * sum_m) as f32
            },
            sum_my as f32,
        ]);
        let total = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(total)))
    }
}
