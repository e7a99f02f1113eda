//! CPU kernels of the convolution: im2col, col2im and the three GEMMs (forward, input
//! gradient, weight gradient) of a 2-D convolution on NCHW `f32` tensors.
//!
//! Each image is lowered on its own into a column buffer of (C_in·K·K) × (H_out·W_out)
//! floats (caffe's im2col layout) that stays in the core's cache, and multiplied with the
//! `gemm` crate. Images are spread over rayon's threads; with fewer images than threads the
//! GEMMs themselves run in parallel instead.

use gemm::{Parallelism, gemm};

use crate::select::KernelSet;
use rayon::prelude::*;

/// Sizes of one convolution: input (n, c_in, h, w), weight (c_out, c_in, k, k), output
/// (n, c_out, h_out, w_out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub h_out: usize,
    pub w_out: usize,
    /// The kernels selected when the op was built ([`crate::select::kernels`]).
    pub kernels: KernelSet,
}

impl Geom {
    /// Rows of the column matrix: c_in · k · k.
    fn ckk(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// Columns of the column matrix: h_out · w_out.
    fn hw_out(&self) -> usize {
        self.h_out * self.w_out
    }

    fn hw_in(&self) -> usize {
        self.h * self.w
    }

    /// A 1×1, stride-1, unpadded convolution multiplies the image itself: no im2col.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// The half-open range of output positions `o` along one axis for which the input
    /// position `o·stride + kk − padding` lies inside `0..len`.
    fn valid_range(&self, kk: usize, len: usize, len_out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // o·s + kk ≥ p  ⇔  o ≥ ceil((p − kk) / s)
        let lo = if kk >= p { 0 } else { (p - kk).div_ceil(s) };
        // o·s + kk − p ≤ len − 1  ⇔  o ≤ (len − 1 + p − kk) / s
        let hi = if len + p > kk {
            ((len - 1 + p - kk) / s + 1).min(len_out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Whether the images are split over threads (true) or each GEMM is (false).
    fn per_image_parallel(&self) -> bool {
        self.n >= rayon::current_num_threads()
    }

    fn gemm_parallelism(&self) -> Parallelism {
        if self.per_image_parallel() {
            Parallelism::None
        } else {
            Parallelism::Rayon(rayon::current_num_threads())
        }
    }
}

/// Lowers one image `x` (c_in × h × w) into `cols` ((c_in·k·k) × (h_out·w_out)).
fn im2col(g: &Geom, x: &[f32], cols: &mut [f32]) {
    let (k, s, p) = (g.k, g.stride, g.padding);
    let hw_out = g.hw_out();
    for c in 0..g.c_in {
        let xc = &x[c * g.hw_in()..(c + 1) * g.hw_in()];
        for ki in 0..k {
            let (oh_lo, oh_hi) = g.valid_range(ki, g.h, g.h_out);
            for kj in 0..k {
                let (ow_lo, ow_hi) = g.valid_range(kj, g.w, g.w_out);
                let row = ((c * k + ki) * k + kj) * hw_out;
                let dst = &mut cols[row..row + hw_out];
                dst[..oh_lo * g.w_out].fill(0.0);
                dst[oh_hi * g.w_out..].fill(0.0);
                for oh in oh_lo..oh_hi {
                    let ih = oh * s + ki - p;
                    let d = &mut dst[oh * g.w_out..(oh + 1) * g.w_out];
                    d[..ow_lo].fill(0.0);
                    d[ow_hi..].fill(0.0);
                    if ow_lo < ow_hi {
                        let iw0 = ow_lo * s + kj - p;
                        let src = &xc[ih * g.w..(ih + 1) * g.w];
                        if s == 1 {
                            d[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
                        } else {
                            for (i, v) in d[ow_lo..ow_hi].iter_mut().enumerate() {
                                *v = src[iw0 + i * s];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)` for the few floats of one kernel row, inlined for 1×1 and
/// 3×3 kernels (a `memcpy` call per three floats costs more than the copy).
#[inline(always)]
fn copy_small(dst: &mut [f32], src: &[f32]) {
    match (dst, src) {
        ([d0, d1, d2], [s0, s1, s2]) => {
            *d0 = *s0;
            *d1 = *s1;
            *d2 = *s2;
        }
        ([d0], [s0]) => *d0 = *s0,
        (dst, src) => dst.copy_from_slice(src),
    }
}

/// Lowers one image `x` (c_in × h × w) into the transposed column matrix `rows`
/// ((h_out·w_out) × (c_in·k·k)): row p holds the receptive field of output position p.
///
/// The weight gradient multiplies by this matrix: in this layout the `gemm` crate reads it
/// in place, where the (c_in·k·k) × (h_out·w_out) layout of [`im2col`] would be repacked
/// on every call, with strided reads that cost more than the multiplication at the narrow
/// stages.
fn im2col_t(g: &Geom, x: &[f32], rows: &mut [f32]) {
    let (k, s, p) = (g.k, g.stride, g.padding);
    let ckk = g.ckk();
    let hw_in = g.hw_in();
    for oh in 0..g.h_out {
        for ow in 0..g.w_out {
            let row = &mut rows[(oh * g.w_out + ow) * ckk..(oh * g.w_out + ow + 1) * ckk];
            let iw0 = (ow * s) as isize - p as isize;
            for ki in 0..k {
                let ih = (oh * s + ki) as isize - p as isize;
                if ih < 0 || ih >= g.h as isize {
                    for c in 0..g.c_in {
                        row[(c * k + ki) * k..(c * k + ki + 1) * k].fill(0.0);
                    }
                    continue;
                }
                let ih = ih as usize;
                if iw0 >= 0 && iw0 as usize + k <= g.w {
                    let iw0 = iw0 as usize;
                    for c in 0..g.c_in {
                        let src = &x[c * hw_in + ih * g.w + iw0..c * hw_in + ih * g.w + iw0 + k];
                        copy_small(&mut row[(c * k + ki) * k..(c * k + ki + 1) * k], src);
                    }
                } else {
                    for c in 0..g.c_in {
                        let src = &x[c * hw_in + ih * g.w..(c * hw_in + (ih + 1) * g.w)];
                        let dst = &mut row[(c * k + ki) * k..(c * k + ki + 1) * k];
                        for (kj, d) in dst.iter_mut().enumerate() {
                            let iw = iw0 + kj as isize;
                            *d = if iw >= 0 && (iw as usize) < g.w {
                                src[iw as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
}

/// Adds the columns `cols` ((c_in·k·k) × (h_out·w_out)) back into one image `dx`
/// (c_in × h × w): the adjoint of [`im2col`].
fn col2im_add(g: &Geom, cols: &[f32], dx: &mut [f32]) {
    let (k, s, p) = (g.k, g.stride, g.padding);
    let hw_out = g.hw_out();
    for c in 0..g.c_in {
        let dxc = &mut dx[c * g.hw_in()..(c + 1) * g.hw_in()];
        for ki in 0..k {
            let (oh_lo, oh_hi) = g.valid_range(ki, g.h, g.h_out);
            for kj in 0..k {
                let (ow_lo, ow_hi) = g.valid_range(kj, g.w, g.w_out);
                if ow_lo >= ow_hi {
                    continue;
                }
                let row = ((c * k + ki) * k + kj) * hw_out;
                let src = &cols[row..row + hw_out];
                for oh in oh_lo..oh_hi {
                    let ih = oh * s + ki - p;
                    let iw0 = ow_lo * s + kj - p;
                    let d = &mut dxc[ih * g.w..(ih + 1) * g.w];
                    let sr = &src[oh * g.w_out + ow_lo..oh * g.w_out + ow_hi];
                    if s == 1 {
                        for (dv, sv) in d[iw0..iw0 + sr.len()].iter_mut().zip(sr) {
                            *dv += *sv;
                        }
                    } else {
                        for (i, sv) in sr.iter().enumerate() {
                            d[iw0 + i * s] += *sv;
                        }
                    }
                }
            }
        }
    }
}

/// dst (m × n, row-major, row stride `n`) = lhs · rhs, every operand given by its
/// (column stride, row stride); `accumulate` adds to dst instead of overwriting it.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the slices cover every element addressed by the given sizes and strides
    // (checked by the callers' construction and the debug assertions above); dst does
    // not alias lhs or rhs since it is borrowed mutably.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Calls `one(buf, (i, &mut dst_i))` for every image i, where dst_i is image i's block of
/// `image_len` floats in `dst`: the images split into one contiguous run per thread, each
/// with one scratch buffer of `buf_len` floats reused over its images (a fresh buffer per
/// image would page-fault on every first touch). Each buffer starts zeroed.
pub(crate) fn per_thread_images<T: Send, F>(
    g: &Geom,
    dst: &mut [T],
    image_len: usize,
    buf_len: usize,
    one: F,
) where
    F: Fn(&mut Vec<f32>, (usize, &mut [T])) + Sync,
{
    if g.per_image_parallel() {
        let per = g.n.div_ceil(rayon::current_num_threads());
        dst.par_chunks_mut(per * image_len)
            .enumerate()
            .for_each(|(t, run)| {
                let mut buf = vec![0f32; buf_len];
                for (j, dst_i) in run.chunks_mut(image_len).enumerate() {
                    one(&mut buf, (t * per + j, dst_i));
                }
            });
    } else {
        let mut buf = vec![0f32; buf_len];
        for item in dst.chunks_mut(image_len).enumerate() {
            one(&mut buf, item);
        }
    }
}

/// Forward: `out` (n × c_out × h_out × w_out) = conv(`x`, `w`).
pub(crate) fn forward(g: &Geom, x: &[f32], w: &[f32], out: &mut [f32]) {
    let (ckk, hw_out, hw_in) = (g.ckk(), g.hw_out(), g.hw_in());
    let par = g.gemm_parallelism();
    let one = |cols: &mut Vec<f32>, (i, out_i): (usize, &mut [f32])| {
        let x_i = &x[i * g.c_in * hw_in..(i + 1) * g.c_in * hw_in];
        let cols: &[f32] = if g.is_pointwise() {
            x_i
        } else {
            im2col(g, x_i, cols);
            cols
        };
        // out_i (c_out × hw_out) = w (c_out × ckk) · cols (ckk × hw_out)
        sgemm(
            g.c_out,
            hw_out,
            ckk,
            out_i,
            false,
            w,
            (1, ckk),
            cols,
            (1, hw_out),
            par,
        );
    };
    let buf_len = if g.is_pointwise() { 0 } else { ckk * hw_out };
    per_thread_images(g, out, g.c_out * hw_out, buf_len, one);
}

/// Input gradient: `dx` (n × c_in × h × w) = convᵀ(`dy`, `w`), i.e. col2im(wᵀ · dy).
pub(crate) fn backward_input(g: &Geom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (ckk, hw_out, hw_in) = (g.ckk(), g.hw_out(), g.hw_in());
    let par = g.gemm_parallelism();
    let one = |cols: &mut Vec<f32>, (i, dx_i): (usize, &mut [f32])| {
        let dy_i = &dy[i * g.c_out * hw_out..(i + 1) * g.c_out * hw_out];
        // dcols (ckk × hw_out) = wᵀ (ckk × c_out) · dy_i (c_out × hw_out)
        let dst: &mut [f32] = if g.is_pointwise() { dx_i } else { cols };
        sgemm(
            ckk,
            hw_out,
            g.c_out,
            dst,
            false,
            w,
            (ckk, 1),
            dy_i,
            (1, hw_out),
            par,
        );
        if !g.is_pointwise() {
            dx_i.fill(0.0);
            col2im_add(g, cols, dx_i);
        }
    };
    let buf_len = if g.is_pointwise() { 0 } else { ckk * hw_out };
    per_thread_images(g, dx, g.c_in * hw_in, buf_len, one);
}

/// Weight gradient: `dw` (c_out × c_in × k × k) = Σ_images dy_i · im2col(x_i)ᵀ.
pub(crate) fn backward_weight(g: &Geom, dy: &[f32], x: &[f32], dw: &mut [f32]) {
    let (ckk, hw_out, hw_in) = (g.ckk(), g.hw_out(), g.hw_in());
    // Images [lo, hi) accumulated into `acc` (c_out × ckk), overwriting it.
    let range = |lo: usize, hi: usize, acc: &mut [f32], cols: &mut [f32], par: Parallelism| {
        for i in lo..hi {
            let x_i = &x[i * g.c_in * hw_in..(i + 1) * g.c_in * hw_in];
            let dy_i = &dy[i * g.c_out * hw_out..(i + 1) * g.c_out * hw_out];
            // acc (c_out × ckk) += dy_i (c_out × hw_out) · colsᵀ (hw_out × ckk)
            let (rows, strides): (&[f32], _) = if g.is_pointwise() {
                (x_i, (hw_out, 1))
            } else {
                im2col_t(g, x_i, cols);
                (cols, (1, ckk))
            };
            sgemm(
                g.c_out,
                ckk,
                hw_out,
                acc,
                i > lo,
                dy_i,
                (1, hw_out),
                rows,
                strides,
                par,
            );
        }
        if hi == lo {
            acc.fill(0.0);
        }
    };
    let buf_len = if g.is_pointwise() { 0 } else { ckk * hw_out };
    let n_threads = rayon::current_num_threads();
    if g.per_image_parallel() && n_threads > 1 {
        let per = g.n.div_ceil(n_threads);
        let partials: Vec<Vec<f32>> = (0..n_threads)
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0f32; g.c_out * ckk];
                let mut cols = vec![0f32; buf_len];
                let (lo, hi) = ((t * per).min(g.n), ((t + 1) * per).min(g.n));
                range(lo, hi, &mut acc, &mut cols, Parallelism::None);
                acc
            })
            .collect();
        dw.fill(0.0);
        for p in &partials {
            for (d, v) in dw.iter_mut().zip(p) {
                *d += *v;
            }
        }
    } else {
        let mut cols = vec![0f32; buf_len];
        range(0, g.n, dw, &mut cols, g.gemm_parallelism());
    }
}
