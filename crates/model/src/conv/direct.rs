//! Direct AVX-512 kernels for the 3×3, stride-1, padding-1 convolutions that make up most
//! of a CIFAR ResNet: forward, input gradient and weight gradient without im2col, col2im
//! or GEMM packing.
//!
//! Each image is copied once into a zero-bordered plane per channel of width W + 2 (the
//! left and right padding), with a zero row above and below. On that plane the input pixel
//! under kernel tap (a, b) of output position q = oh·(W + 2) + ow sits at q + a·(W + 2) + b:
//! every tap is one unaligned 16-float load at a fixed offset. The outputs are computed on
//! the same padded width (the two extra columns per row are discarded, or multiplied by
//! zeros), 16 positions per vector:
//!
//! - forward: y[o, q] = Σ_c Σ_tap w[o, c, tap] · x̂[c, q + off(tap)], in register blocks of
//!   8 output channels × 48 positions (24 accumulators);
//! - input gradient: the forward kernel on the output gradient, with the weight transposed
//!   and rotated by 180° (the adjoint of a stride-1, padding-1, 3×3 convolution is one);
//! - weight gradient: dw[o, c, tap] = Σ_q dŷ[o, q] · x̂[c, q + off(tap)], in register blocks
//!   of 3 output channels × 9 taps, summed over the positions of one image before one
//!   horizontal reduction per (o, c, tap).
//!
//! They run where the CPU has AVX-512F (checked at run time); elsewhere [`applies`] is false
//! and the im2col + GEMM path runs.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::{Geom, per_thread_images};

/// Lanes of one AVX-512 vector of `f32`.
const LANES: usize = 16;

/// Whether the direct kernels handle this convolution on this CPU.
pub(crate) fn applies(g: &Geom) -> bool {
    g.k == 3 && g.stride == 1 && g.padding == 1 && g.h_out == g.h && g.w_out == g.w && has_avx512()
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// `dst.copy_from_slice(src)` for one image row (8–32 floats in a CIFAR ResNet): whole
/// vectors of 16 inline, where a `memcpy` call per row costs about as much as the copy.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (d, s) in (&mut d).zip(&mut s) {
        d.copy_from_slice(s);
    }
    let mut d = d.into_remainder().chunks_exact_mut(8);
    let mut s = s.remainder().chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        d.copy_from_slice(s);
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = *s;
    }
}

/// Sizes of the padded planes of an h × w image.
#[derive(Debug, Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
    /// Row length of the padded plane: w + 2.
    wp: usize,
    /// Output positions on the padded width, rounded up to whole vectors.
    qp: usize,
    /// Floats per channel of the padded input plane: every tap of every output vector
    /// (up to qp − 1 + 2·wp + 2) lies inside.
    xl: usize,
}

impl Plane {
    fn new(h: usize, w: usize) -> Self {
        let wp = w + 2;
        let qp = (h * wp).next_multiple_of(LANES);
        let xl = (qp + 2 * wp + 2).next_multiple_of(LANES);
        Self { h, w, wp, qp, xl }
    }

    /// Offsets of the nine taps (a, b), row-major, from an output position.
    fn offsets(&self) -> [usize; 9] {
        let mut o = [0; 9];
        for (t, v) in o.iter_mut().enumerate() {
            *v = (t / 3) * self.wp + t % 3;
        }
        o
    }

    /// Copies `c` channels of an h × w image into the interiors of zeroed padded planes
    /// (the borders of `xp` must already be zero; they are never written), adding `bias`
    /// to every copied value when there is one (the borders stay zero: the convolution of
    /// x + bias with zero padding).
    fn pad_input(&self, c: usize, x: &[f32], xp: &mut [f32], bias: Option<f32>) {
        let (h, w, wp) = (self.h, self.w, self.wp);
        for ci in 0..c {
            let src = &x[ci * h * w..(ci + 1) * h * w];
            let dst = &mut xp[ci * self.xl..(ci + 1) * self.xl];
            for r in 0..h {
                let d0 = (r + 1) * wp + 1;
                let (d, s) = (&mut dst[d0..d0 + w], &src[r * w..(r + 1) * w]);
                match bias {
                    None => copy_row(d, s),
                    Some(b) => {
                        for (o, &v) in d.iter_mut().zip(s) {
                            *o = v + b;
                        }
                    }
                }
            }
        }
    }

    /// Writes every element of the dense h × w image `y` (`c` channels) from an
    /// output-position image (rows of wp, the two last columns ignored).
    fn unpad_output(&self, c: usize, yp: &[f32], y: &mut [MaybeUninit<f32>]) {
        let (h, w, wp) = (self.h, self.w, self.wp);
        assert_eq!(y.len(), c * h * w);
        for co in 0..c {
            let src = &yp[co * self.qp..(co + 1) * self.qp];
            let dst = &mut y[co * h * w..(co + 1) * h * w];
            for r in 0..h {
                for (d, s) in dst[r * w..(r + 1) * w]
                    .iter_mut()
                    .zip(&src[r * wp..r * wp + w])
                {
                    d.write(*s);
                }
            }
        }
    }

    /// Copies `c` channels of a dense h × w image into output-position rows of wp whose
    /// two last columns (and the tail up to qp) must already be zero.
    fn pad_output_grad(&self, c: usize, dy: &[f32], dyp: &mut [f32]) {
        let (h, w, wp) = (self.h, self.w, self.wp);
        for co in 0..c {
            let src = &dy[co * h * w..(co + 1) * h * w];
            let dst = &mut dyp[co * self.qp..(co + 1) * self.qp];
            for r in 0..h {
                copy_row(&mut dst[r * wp..r * wp + w], &src[r * w..(r + 1) * w]);
            }
        }
    }
}

/// y (c_out × qp) = the 3×3 convolution of the padded planes `xp` (c_in × xl) with `w`
/// (c_out × c_in × 9), on the padded output positions.
fn conv_planes(p: &Plane, c_in: usize, c_out: usize, w: &[f32], xp: &[f32], yp: &mut [f32]) {
    assert!(w.len() >= c_out * c_in * 9);
    assert!(xp.len() >= c_in * p.xl);
    assert!(yp.len() >= c_out * p.qp);
    let offs = p.offsets();
    let mut co = 0;
    while co < c_out {
        let cb = (c_out - co).min(8);
        let cb = if cb >= 8 {
            8
        } else if cb >= 4 {
            4
        } else if cb >= 2 {
            2
        } else {
            1
        };
        let mut q = 0;
        while q < p.qp {
            let qb = ((p.qp - q) / LANES).min(3);
            // SAFETY: AVX-512F is present (`applies`); the weight rows co..co+cb, the
            // planes' taps q + off + 16·qb ≤ qp + 2·wp + 2 ≤ xl and the outputs
            // (co + cb − 1)·qp + q + 16·qb ≤ c_out·qp all lie inside the slices, as
            // asserted above.
            unsafe {
                let wp = w.as_ptr().add(co * c_in * 9);
                let xq = xp.as_ptr().add(q);
                let yq = yp.as_mut_ptr().add(co * p.qp + q);
                let args = (c_in, p.xl, &offs, wp, xq, yq, p.qp);
                match (cb, qb) {
                    (8, 3) => conv_block::<8, 3>(args),
                    (8, 2) => conv_block::<8, 2>(args),
                    (8, _) => conv_block::<8, 1>(args),
                    (4, 3) => conv_block::<4, 3>(args),
                    (4, 2) => conv_block::<4, 2>(args),
                    (4, _) => conv_block::<4, 1>(args),
                    (2, 3) => conv_block::<2, 3>(args),
                    (2, 2) => conv_block::<2, 2>(args),
                    (2, _) => conv_block::<2, 1>(args),
                    (_, 3) => conv_block::<1, 3>(args),
                    (_, 2) => conv_block::<1, 2>(args),
                    (_, _) => conv_block::<1, 1>(args),
                }
            }
            q += qb * LANES;
        }
        co += cb;
    }
}

/// Arguments of [`conv_block`]: c_in, plane length, tap offsets, weight rows, input planes
/// at the block's first position, output at the block's first channel and position, and
/// the output's channel stride.
type ConvArgs<'a> = (
    usize,
    usize,
    &'a [usize; 9],
    *const f32,
    *const f32,
    *mut f32,
    usize,
);

/// CB output channels × QB vectors of output positions.
///
/// # Safety
/// AVX-512F must be available, and every address described in [`conv_planes`] valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv_block<const CB: usize, const QB: usize>(
    (c_in, xl, offs, w, xp, yp, qp): ConvArgs<'_>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); QB]; CB];
    for ci in 0..c_in {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let xc = xp.add(ci * xl);
            let wc = w.add(ci * 9);
            for (t, &off) in offs.iter().enumerate() {
                let mut xv = [_mm512_setzero_ps(); QB];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xc.add(off + j * LANES));
                }
                for (o, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*wc.add(o * c_in * 9 + t));
                    for (a, v) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, *v, *a);
                    }
                }
            }
        }
    }
    for (o, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm512_storeu_ps(yp.add(o * qp + j * LANES), *a) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn conv_block<const CB: usize, const QB: usize>(_: ConvArgs<'_>) {
    unreachable!("the direct kernels run only where AVX-512F is present")
}

/// Forward: `out` (n × c_out × h × w) = conv(`x` + `bias`, `w`) for a 3×3, stride-1,
/// padding-1 convolution ([`applies`] must hold). Writes every element of `out`.
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    bias: Option<f32>,
    w: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    assert_eq!(out.len(), g.n * g.c_out * g.h * g.w);
    let p = Plane::new(g.h, g.w);
    let hw = g.h * g.w;
    let xp_len = g.c_in * p.xl;
    let buf_len = xp_len + g.c_out * p.qp;
    per_thread_images(g, out, g.c_out * hw, buf_len, |buf, (i, out_i)| {
        let (xp, yp) = buf.split_at_mut(xp_len);
        p.pad_input(g.c_in, &x[i * g.c_in * hw..(i + 1) * g.c_in * hw], xp, bias);
        conv_planes(&p, g.c_in, g.c_out, w, xp, yp);
        p.unpad_output(g.c_out, yp, out_i);
    });
}

/// Input gradient: `dx` (n × c_in × h × w) of a 3×3, stride-1, padding-1 convolution, as the
/// convolution of `dy` with the transposed, 180°-rotated weight ([`applies`] must hold).
/// Writes every element of `dx`.
pub(crate) fn backward_input(g: &Geom, dy: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) {
    assert_eq!(dx.len(), g.n * g.c_in * g.h * g.w);
    // w̃[c, o, 8 − tap] = w[o, c, tap]
    let mut wt = vec![0f32; w.len()];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            for t in 0..9 {
                wt[(c * g.c_out + o) * 9 + 8 - t] = w[(o * g.c_in + c) * 9 + t];
            }
        }
    }
    let p = Plane::new(g.h, g.w);
    let hw = g.h * g.w;
    let dyp_len = g.c_out * p.xl;
    let buf_len = dyp_len + g.c_in * p.qp;
    per_thread_images(g, dx, g.c_in * hw, buf_len, |buf, (i, dx_i)| {
        let (dyp, dxp) = buf.split_at_mut(dyp_len);
        p.pad_input(
            g.c_out,
            &dy[i * g.c_out * hw..(i + 1) * g.c_out * hw],
            dyp,
            None,
        );
        conv_planes(&p, g.c_out, g.c_in, &wt, dyp, dxp);
        p.unpad_output(g.c_in, dxp, dx_i);
    });
}

/// dw (c_out × c_in × 9) += the weight gradient of `nb` images, from their padded input
/// planes `xp` (nb × c_in × xl) and output gradients `dyp` (nb × c_out × qp, zero outside
/// the images).
fn wgrad_planes(
    p: &Plane,
    (nb, c_in, c_out): (usize, usize, usize),
    dyp: &[f32],
    xp: &[f32],
    dw: &mut [f32],
) {
    assert!(dw.len() >= c_out * c_in * 9);
    assert!(xp.len() >= nb * c_in * p.xl);
    assert!(dyp.len() >= nb * c_out * p.qp);
    let offs = p.offsets();
    let mut co = 0;
    while co < c_out {
        let cb = (c_out - co).min(3);
        for ci in 0..c_in {
            // SAFETY: AVX-512F is present (`applies`); for every image b < nb, rows
            // co..co+cb of its dyp, the taps q + off + 16 ≤ qp + 2·wp + 2 ≤ xl of its plane
            // ci, and the weights (co + cb − 1)·c_in·9 + ci·9 + 9 ≤ c_out·c_in·9 lie inside,
            // as asserted above.
            unsafe {
                let args = WgradArgs {
                    nb,
                    qp: p.qp,
                    offs: &offs,
                    dyp: dyp.as_ptr().add(co * p.qp),
                    dyp_image: c_out * p.qp,
                    xc: xp.as_ptr().add(ci * p.xl),
                    xp_image: c_in * p.xl,
                    dw: dw.as_mut_ptr().add((co * c_in + ci) * 9),
                    dw_stride: c_in * 9,
                };
                match cb {
                    3 => wgrad_block::<3>(args),
                    2 => wgrad_block::<2>(args),
                    _ => wgrad_block::<1>(args),
                }
            }
        }
        co += cb;
    }
}

/// Arguments of [`wgrad_block`].
struct WgradArgs<'a> {
    /// Images.
    nb: usize,
    /// Positions per output-gradient row.
    qp: usize,
    offs: &'a [usize; 9],
    /// The first output-gradient row of the block, first image.
    dyp: *const f32,
    /// Floats from one image's output gradient to the next.
    dyp_image: usize,
    /// The input plane, first image.
    xc: *const f32,
    /// Floats from one image's input planes to the next.
    xp_image: usize,
    /// The block's first weight-gradient entry.
    dw: *mut f32,
    /// Floats from one output channel's weight gradient to the next.
    dw_stride: usize,
}

/// CB output channels × 9 taps of one input channel, summed over the positions of all
/// images before one horizontal reduction each.
///
/// # Safety
/// AVX-512F must be available, and every address described in [`wgrad_planes`] valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wgrad_block<const CB: usize>(a: WgradArgs<'_>) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 9]; CB];
    for b in 0..a.nb {
        // SAFETY: in bounds by the caller's contract.
        let (dyp, xc) = unsafe { (a.dyp.add(b * a.dyp_image), a.xc.add(b * a.xp_image)) };
        let mut q = 0;
        while q < a.qp {
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let mut d = [_mm512_setzero_ps(); CB];
                for (o, v) in d.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(dyp.add(o * a.qp + q));
                }
                for (t, &off) in a.offs.iter().enumerate() {
                    let xv = _mm512_loadu_ps(xc.add(q + off));
                    for (row, dv) in acc.iter_mut().zip(&d) {
                        row[t] = _mm512_fmadd_ps(*dv, xv, row[t]);
                    }
                }
            }
            q += LANES;
        }
    }
    for (o, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { *a.dw.add(o * a.dw_stride + t) += _mm512_reduce_add_ps(*v) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn wgrad_block<const CB: usize>(_: WgradArgs<'_>) {
    unreachable!("the direct kernels run only where AVX-512F is present")
}

/// Bytes of padded planes the weight gradient keeps per thread: images are taken in groups
/// that fit a core's L2 cache, so the horizontal reductions are paid once per group.
const WGRAD_GROUP_BYTES: usize = 512 << 10;

/// Weight gradient: `dw` (c_out × c_in × 3 × 3) = Σ_images of a 3×3, stride-1, padding-1
/// convolution of `x` + `bias` ([`applies`] must hold); one partial sum per thread.
pub(crate) fn backward_weight(g: &Geom, dy: &[f32], x: &[f32], bias: Option<f32>, dw: &mut [f32]) {
    let p = Plane::new(g.h, g.w);
    let hw = g.h * g.w;
    let (xp_len, dyp_len) = (g.c_in * p.xl, g.c_out * p.qp);
    let group = (WGRAD_GROUP_BYTES / (4 * (xp_len + dyp_len))).clamp(1, g.n.max(1));
    let images = |lo: usize, hi: usize, acc: &mut [f32]| {
        let mut xp = vec![0f32; group * xp_len];
        let mut dyp = vec![0f32; group * dyp_len];
        let mut i0 = lo;
        while i0 < hi {
            let nb = group.min(hi - i0);
            for b in 0..nb {
                let i = i0 + b;
                let xs = &x[i * g.c_in * hw..(i + 1) * g.c_in * hw];
                p.pad_input(g.c_in, xs, &mut xp[b * xp_len..(b + 1) * xp_len], bias);
                let dys = &dy[i * g.c_out * hw..(i + 1) * g.c_out * hw];
                p.pad_output_grad(g.c_out, dys, &mut dyp[b * dyp_len..(b + 1) * dyp_len]);
            }
            wgrad_planes(&p, (nb, g.c_in, g.c_out), &dyp, &xp, acc);
            i0 += nb;
        }
    };
    dw.fill(0.0);
    let n_threads = rayon::current_num_threads().min(g.n);
    if n_threads > 1 {
        let per = g.n.div_ceil(n_threads);
        let partials: Vec<Vec<f32>> = (0..n_threads)
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0f32; dw.len()];
                images((t * per).min(g.n), ((t + 1) * per).min(g.n), &mut acc);
                acc
            })
            .collect();
        for part in &partials {
            for (d, v) in dw.iter_mut().zip(part) {
                *d += *v;
            }
        }
    } else {
        images(0, g.n, dw);
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::cpu;
    use super::*;

    fn max_rel(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b
            .iter()
            .fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs() as f64));
        let diff = a
            .iter()
            .zip(b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
        diff / scale
    }

    /// The direct kernels against the im2col + GEMM path (itself checked against `f64`
    /// references in `conv::tests`) on shapes that exercise every register block:
    /// 1–13 channels, widths whose padded rows are not whole vectors, a single image.
    #[test]
    fn direct_kernels_match_the_gemm_path() {
        if !has_avx512() {
            println!("skipped: this CPU has no AVX-512F, the direct kernels never run");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (n, c_in, c_out, h, w) in [
            (1, 1, 1, 1, 1),
            (2, 3, 16, 5, 7),
            (3, 13, 11, 9, 4),
            (1, 16, 16, 32, 32),
            (2, 9, 13, 8, 8),
            (5, 2, 3, 3, 17),
            (40, 4, 5, 6, 6),
        ] {
            let g = Geom {
                n,
                c_in,
                h,
                w,
                c_out,
                k: 3,
                stride: 1,
                padding: 1,
                h_out: h,
                w_out: w,
            };
            assert!(applies(&g));
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let x = draw(n * c_in * h * w);
            let wt = draw(c_out * c_in * 9);
            let dy = draw(n * c_out * h * w);
            let mut y0 = vec![0f32; dy.len()];
            cpu::forward(&g, &x, &wt, &mut y0);
            let y1 = super::super::written(dy.len(), |y| forward(&g, &x, None, &wt, y));
            assert!(
                max_rel(&y1, &y0) <= 1e-5,
                "forward {:?}",
                (c_in, c_out, h, w)
            );
            let mut dx0 = vec![0f32; x.len()];
            cpu::backward_input(&g, &dy, &wt, &mut dx0);
            let dx1 = super::super::written(x.len(), |dx| backward_input(&g, &dy, &wt, dx));
            assert!(
                max_rel(&dx1, &dx0) <= 1e-5,
                "input grad {:?}",
                (c_in, c_out, h, w)
            );
            let (mut dw0, mut dw1) = (vec![0f32; wt.len()], vec![1f32; wt.len()]);
            cpu::backward_weight(&g, &dy, &x, &mut dw0);
            backward_weight(&g, &dy, &x, None, &mut dw1);
            assert!(
                max_rel(&dw1, &dw0) <= 1e-5,
                "weight grad {:?}",
                (c_in, c_out, h, w)
            );
        }
    }
}
