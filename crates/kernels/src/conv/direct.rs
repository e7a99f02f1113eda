//! Direct AVX-512 kernels for the 3×3, stride-1, padding-1 convolutions that make up most
//! of a CIFAR ResNet: forward, input gradient and weight gradient without im2col, col2im
//! or GEMM packing.
//!
//! Positions keep the dense layout q = oh·W + ow, 16 per vector. Each image channel is
//! copied once, whole, into a plane with W + 1 zeros before it and at least W + 1 after it
//! (the padding rows above and below): there the input pixel under kernel tap (a, b) of
//! output position q sits at q + a·W + b, one 16-float load at a fixed offset per tap. The
//! left and right padding columns are masked lanes: a tap with b = 0 reads the previous
//! row's last pixel where ow = 0 and one with b = 2 the next row's first where ow = W − 1,
//! so those loads zero the lanes of such positions. No output position is wasted on
//! padding columns, the copy into the plane is one contiguous run per channel, and where
//! H·W is a multiple of 16 the outputs are written and the output gradient read in place.
//!
//! - forward: y[o, q] = Σ_c Σ_tap w[o, c, tap] · x̂[c, q + off(tap)], in register blocks of
//!   8 output channels × 48 positions (24 accumulators);
//! - input gradient: the forward kernel on the output gradient, with the weight transposed
//!   and rotated by 180° (the adjoint of a stride-1, padding-1, 3×3 convolution is one);
//! - weight gradient: dw[o, c, tap] = Σ_q dy[o, q] · x̂[c, q + off(tap)], in register blocks
//!   of 3 output channels × 9 taps, summed over the positions of one image before one
//!   horizontal reduction per (o, c, tap).
//!
//! They run where the CPU has AVX-512F (checked at run time); elsewhere [`applies`] is false
//! and the im2col + GEMM path runs.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::{Geom, per_thread_images};
use crate::select::KernelSet;

/// Lanes of one AVX-512 vector of `f32`.
const LANES: usize = 16;

/// Whether the direct kernels handle this convolution with its selected kernel set (and,
/// what the kernels' safety rests on, whether the CPU has AVX-512F).
pub(crate) fn applies(g: &Geom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.padding == 1
        && g.h_out == g.h
        && g.w_out == g.w
        && g.kernels >= KernelSet::Avx512
        && KernelSet::Avx512.supported()
}

/// Geometry of the dense positions and the zero-framed input planes of an h × w image.
#[derive(Debug, Clone)]
struct Plane {
    w: usize,
    /// Pixels per channel: h·w.
    hw: usize,
    /// Output positions, rounded up to whole vectors.
    qp: usize,
    /// Floats per channel of an input plane: w + 1 zeros, the h·w pixels, zeros; every tap
    /// of every output vector (up to qp − 1 + 2·w + 2) lies inside.
    xl: usize,
    /// Per output vector, the lanes whose position has a left neighbour in its row
    /// (ow ≠ 0): the mask of the taps with b = 0.
    left: Vec<u16>,
    /// Per output vector, the lanes whose position has a right neighbour in its row
    /// (ow ≠ w − 1): the mask of the taps with b = 2.
    right: Vec<u16>,
}

impl Plane {
    fn new(h: usize, w: usize) -> Self {
        let hw = h * w;
        let qp = hw.next_multiple_of(LANES);
        let xl = (qp + 2 * w + 2).next_multiple_of(LANES);
        let mask = |keep: &dyn Fn(usize) -> bool| -> Vec<u16> {
            (0..qp / LANES)
                .map(|v| {
                    (0..LANES)
                        .filter(|&l| keep((v * LANES + l) % w.max(1)))
                        .fold(0u16, |m, l| m | (1 << l))
                })
                .collect()
        };
        let left = mask(&|ow| ow != 0);
        let right = mask(&|ow| ow + 1 != w);
        Self {
            w,
            hw,
            qp,
            xl,
            left,
            right,
        }
    }

    /// Offsets of the nine taps (a, b), row-major, from an output position.
    fn offsets(&self) -> [usize; 9] {
        let mut o = [0; 9];
        for (t, v) in o.iter_mut().enumerate() {
            *v = (t / 3) * self.w + t % 3;
        }
        o
    }

    /// Copies `c` channels of an h × w image into the interiors of zeroed planes (their
    /// frames must already be zero; they are never written), adding `bias` to every copied
    /// value when there is one (the frames stay zero: the convolution of x + bias with zero
    /// padding).
    fn pad_input(&self, c: usize, x: &[f32], xp: &mut [f32], bias: Option<f32>) {
        let (hw, lead) = (self.hw, self.w + 1);
        for ci in 0..c {
            let src = &x[ci * hw..(ci + 1) * hw];
            let dst = &mut xp[ci * self.xl + lead..ci * self.xl + lead + hw];
            match bias {
                None => dst.copy_from_slice(src),
                Some(b) => {
                    for (o, &v) in dst.iter_mut().zip(src) {
                        *o = v + b;
                    }
                }
            }
        }
    }

    /// Writes every element of the dense images `y` (`c` channels of h·w) from `c`
    /// channels of qp positions.
    fn unpad_output(&self, c: usize, yp: &[f32], y: &mut [MaybeUninit<f32>]) {
        let hw = self.hw;
        assert_eq!(y.len(), c * hw);
        for co in 0..c {
            let src = &yp[co * self.qp..co * self.qp + hw];
            for (d, s) in y[co * hw..(co + 1) * hw].iter_mut().zip(src) {
                d.write(*s);
            }
        }
    }

    /// Copies `c` channels of dense h·w images into channels of qp positions whose tails
    /// (from h·w) must already be zero.
    fn pad_output_grad(&self, c: usize, dy: &[f32], dyp: &mut [f32]) {
        let hw = self.hw;
        for co in 0..c {
            dyp[co * self.qp..co * self.qp + hw].copy_from_slice(&dy[co * hw..(co + 1) * hw]);
        }
    }
}

/// `f32` storage viewed as possibly uninitialized, for the kernels that only write it.
fn as_uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and every `f32` is a valid
    // `MaybeUninit<f32>`; only initialized values are written through the view.
    unsafe { &mut *(v as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// y (c_out channels of qp positions, `ys` floats apart) = the 3×3 convolution of the
/// planes `xp` (c_in × xl) with `w` (c_out × c_in × 9). Writes positions 0..qp of every
/// channel.
fn conv_planes(
    p: &Plane,
    (c_in, c_out): (usize, usize),
    w: &[f32],
    xp: &[f32],
    (y, ys): (&mut [MaybeUninit<f32>], usize),
) {
    assert!(w.len() >= c_out * c_in * 9);
    assert!(xp.len() >= c_in * p.xl);
    assert!(ys >= p.qp && (c_out == 0 || y.len() >= (c_out - 1) * ys + p.qp));
    let offs = p.offsets();
    let y = y.as_mut_ptr().cast::<f32>();
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
            let v = q / LANES;
            // SAFETY: AVX-512F is present (`applies`); the weight rows co..co+cb, the
            // planes' taps q + off + 16·qb ≤ qp + 2·w + 2 ≤ xl, the masks of vectors
            // v..v+qb ≤ qp/16 and the outputs (co + cb − 1)·ys + q + 16·qb ≤ (c_out − 1)·ys
            // + qp all lie inside the slices, as asserted above.
            unsafe {
                let args = ConvArgs {
                    c_in,
                    xl: p.xl,
                    offs: &offs,
                    left: p.left.as_ptr().add(v),
                    right: p.right.as_ptr().add(v),
                    w: w.as_ptr().add(co * c_in * 9),
                    xp: xp.as_ptr().add(q),
                    yp: y.add(co * ys + q),
                    ys,
                };
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

/// Arguments of [`conv_block`].
struct ConvArgs<'a> {
    c_in: usize,
    /// Floats per input plane.
    xl: usize,
    offs: &'a [usize; 9],
    /// The left-neighbour masks of the block's vectors.
    left: *const u16,
    /// The right-neighbour masks of the block's vectors.
    right: *const u16,
    /// The block's first weight row.
    w: *const f32,
    /// The input planes at the block's first position.
    xp: *const f32,
    /// The output at the block's first channel and position.
    yp: *mut f32,
    /// Floats from one output channel to the next.
    ys: usize,
}

/// CB output channels × QB vectors of output positions.
///
/// # Safety
/// AVX-512F must be available, and every address described in [`conv_planes`] valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv_block<const CB: usize, const QB: usize>(a: ConvArgs<'_>) {
    use std::arch::x86_64::*;
    // masks[b][j]: the lanes of vector j that tap column b reads.
    // SAFETY: in bounds by the caller's contract.
    let masks: [[u16; QB]; 3] = unsafe {
        [
            std::array::from_fn(|j| *a.left.add(j)),
            [0xffff; QB],
            std::array::from_fn(|j| *a.right.add(j)),
        ]
    };
    let mut acc = [[_mm512_setzero_ps(); QB]; CB];
    for ci in 0..a.c_in {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let xc = a.xp.add(ci * a.xl);
            let wc = a.w.add(ci * 9);
            for (t, &off) in a.offs.iter().enumerate() {
                let m = &masks[t % 3];
                let mut xv = [_mm512_setzero_ps(); QB];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m[j], xc.add(off + j * LANES));
                }
                for (o, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*wc.add(o * a.c_in * 9 + t));
                    for (acc, v) in row.iter_mut().zip(&xv) {
                        *acc = _mm512_fmadd_ps(wv, *v, *acc);
                    }
                }
            }
        }
    }
    for (o, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm512_storeu_ps(a.yp.add(o * a.ys + j * LANES), *v) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn conv_block<const CB: usize, const QB: usize>(_: ConvArgs<'_>) {
    unreachable!("the direct kernels run only where AVX-512F is present")
}

/// `conv_planes` of one image's planes into `out_i` (c_out × h·w): in place where h·w is
/// whole vectors, through the scratch `yp` (c_out × qp) otherwise.
fn conv_image(
    p: &Plane,
    (c_in, c_out): (usize, usize),
    w: &[f32],
    xp: &[f32],
    yp: &mut [f32],
    out_i: &mut [MaybeUninit<f32>],
) {
    if p.hw == p.qp {
        conv_planes(p, (c_in, c_out), w, xp, (out_i, p.hw));
    } else {
        conv_planes(p, (c_in, c_out), w, xp, (as_uninit(yp), p.qp));
        p.unpad_output(c_out, yp, out_i);
    }
}

/// Scratch floats for the outputs of one image: none where they are written in place.
fn out_scratch(p: &Plane, c: usize) -> usize {
    if p.hw == p.qp { 0 } else { c * p.qp }
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
    let buf_len = xp_len + out_scratch(&p, g.c_out);
    per_thread_images(g, out, g.c_out * hw, buf_len, |buf, (i, out_i)| {
        let (xp, yp) = buf.split_at_mut(xp_len);
        p.pad_input(g.c_in, &x[i * g.c_in * hw..(i + 1) * g.c_in * hw], xp, bias);
        conv_image(&p, (g.c_in, g.c_out), w, xp, yp, out_i);
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
    let buf_len = dyp_len + out_scratch(&p, g.c_in);
    per_thread_images(g, dx, g.c_in * hw, buf_len, |buf, (i, dx_i)| {
        let (dyp, dxp) = buf.split_at_mut(dyp_len);
        p.pad_input(
            g.c_out,
            &dy[i * g.c_out * hw..(i + 1) * g.c_out * hw],
            dyp,
            None,
        );
        conv_image(&p, (g.c_out, g.c_in), &wt, dyp, dxp, dx_i);
    });
}

/// dw (c_out × c_in × 9) += the weight gradient of `nb` images, from their input planes
/// `xp` (nb × c_in × xl) and output gradients `dyp` (nb × c_out × qp, zero from h·w).
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
            // co..co+cb of its dyp, the taps q + off + 16 ≤ qp + 2·w + 2 ≤ xl of its plane
            // ci, the masks of the qp/16 vectors, and the weights (co + cb − 1)·c_in·9 +
            // ci·9 + 9 ≤ c_out·c_in·9 lie inside, as asserted above.
            unsafe {
                let args = WgradArgs {
                    nb,
                    qp: p.qp,
                    offs: &offs,
                    left: p.left.as_ptr(),
                    right: p.right.as_ptr(),
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
    /// The left-neighbour masks, one per vector of positions.
    left: *const u16,
    /// The right-neighbour masks, one per vector of positions.
    right: *const u16,
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
                let masks = [*a.left.add(q / LANES), 0xffff, *a.right.add(q / LANES)];
                let mut d = [_mm512_setzero_ps(); CB];
                for (o, v) in d.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(dyp.add(o * a.qp + q));
                }
                for (t, &off) in a.offs.iter().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(masks[t % 3], xc.add(q + off));
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

/// Bytes of planes the weight gradient keeps per thread: images are taken in groups that
/// fit a core's L2 cache, so the horizontal reductions are paid once per group.
const WGRAD_GROUP_BYTES: usize = 512 << 10;

/// Weight gradient: `dw` (c_out × c_in × 3 × 3) = Σ_images of a 3×3, stride-1, padding-1
/// convolution of `x` + `bias` ([`applies`] must hold); one partial sum per thread. Where
/// h·w is whole vectors the output gradient is read in place.
pub(crate) fn backward_weight(g: &Geom, dy: &[f32], x: &[f32], bias: Option<f32>, dw: &mut [f32]) {
    let p = Plane::new(g.h, g.w);
    let hw = g.h * g.w;
    let in_place = p.hw == p.qp;
    let (xp_len, dyp_len) = (g.c_in * p.xl, g.c_out * p.qp);
    let group = (WGRAD_GROUP_BYTES / (4 * (xp_len + dyp_len))).clamp(1, g.n.max(1));
    let images = |lo: usize, hi: usize, acc: &mut [f32]| {
        let mut xp = vec![0f32; group * xp_len];
        let mut dyp = vec![0f32; if in_place { 0 } else { group * dyp_len }];
        let mut i0 = lo;
        while i0 < hi {
            let nb = group.min(hi - i0);
            for b in 0..nb {
                let i = i0 + b;
                let xs = &x[i * g.c_in * hw..(i + 1) * g.c_in * hw];
                p.pad_input(g.c_in, xs, &mut xp[b * xp_len..(b + 1) * xp_len], bias);
                if !in_place {
                    let dys = &dy[i * g.c_out * hw..(i + 1) * g.c_out * hw];
                    p.pad_output_grad(g.c_out, dys, &mut dyp[b * dyp_len..(b + 1) * dyp_len]);
                }
            }
            let dys: &[f32] = if in_place {
                &dy[i0 * dyp_len..(i0 + nb) * dyp_len]
            } else {
                &dyp
            };
            wgrad_planes(&p, (nb, g.c_in, g.c_out), dys, &xp, acc);
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
    /// 1–13 channels, images of whole vectors (written in place) and not, widths that divide
    /// 16, that 16 divides and neither, a width of 1, a single image.
    #[test]
    fn direct_kernels_match_the_gemm_path() {
        if !KernelSet::Avx512.supported() {
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
            (3, 5, 7, 4, 4),
            (2, 3, 4, 2, 16),
            (2, 2, 3, 16, 1),
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
                kernels: KernelSet::Avx512,
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
