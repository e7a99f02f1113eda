//! Direct kernels for the 3×3, stride-1, padding-1 convolutions that make up most of a
//! CIFAR ResNet: forward, input gradient and weight gradient without im2col, col2im or GEMM
//! packing, in two instruction sets: AVX-512F and AVX2 + FMA.
//!
//! Positions keep the dense layout q = oh·W + ow, 16 per vector (one AVX-512 vector, two
//! 8-lane AVX2 halves). Each image channel is copied once, whole, into a plane with W + 1
//! zeros before it and at least W + 1 after it (the padding rows above and below): there
//! the input pixel under kernel tap (a, b) of output position q sits at q + a·W + b, one
//! load at a fixed offset per tap. The left and right padding columns are masked lanes: a
//! tap with b = 0 reads the previous row's last pixel where ow = 0 and one with b = 2 the
//! next row's first where ow = W − 1, so those loads zero the lanes of such positions
//! (AVX-512: a masked load under 16 mask bits per vector; AVX2: a plain load and a bitwise
//! and with a vector of all-ones or zero lanes made from the same bits). No output position
//! is wasted on padding columns, the copy into the plane is one contiguous run per channel,
//! and where H·W is a multiple of 16 the outputs are written and the output gradient read
//! in place.
//!
//! - forward: y[o, q] = Σ_c Σ_tap w[o, c, tap] · x̂[c, q + off(tap)], in register blocks of
//!   8 output channels × 48 positions (24 of AVX-512's 32 registers), or with AVX2 6 output
//!   channels × 16 positions (12 of its 16 registers);
//! - input gradient: the forward kernel on the output gradient, with the weight transposed
//!   and rotated by 180° (the adjoint of a stride-1, padding-1, 3×3 convolution is one);
//! - weight gradient: dw[o, c, tap] = Σ_q dy[o, q] · x̂[c, q + off(tap)], in register blocks
//!   of 3 output channels × 9 taps (AVX-512), or with AVX2 4 output channels × the 3 taps
//!   of one kernel row, one pass per row (12 accumulators), summed over the positions of a
//!   group of images before one horizontal reduction per (o, c, tap).
//!
//! The AVX2 blocks were chosen by measurement at the CIFAR ResNet shapes (16, 32, 64
//! channels at 32×32, 16×16, 8×8) on one quiet core of an AVX-512 Xeon whose AVX2 FMAs
//! peak near 91 GF/s: the forward ran at 82–88 GF/s with 6 × 16 positions (5 × 16: 83–84),
//! against 65–75 with 4 × 16 or 2 × 32 and 43–62 with blocks that spill (4 × 32, 3 × 32,
//! 7 × 16, 8 × 16); the weight gradient at 67–73 GF/s ([`AVX2_WG_CB`],
//! [`AVX2_WG_L1_BYTES`]). The AVX-512 kernels run at about 130 and 96–105 GF/s there.
//!
//! Which set runs follows the kernel set recorded in the convolution (`Geom::kernels`):
//! the AVX-512 kernels for [`KernelSet::Avx512`] where the CPU has AVX-512F, the AVX2 ones
//! for [`KernelSet::Avx2`] where it has AVX2 and FMA (both checked at run time, [`Isa`]);
//! elsewhere [`applies`] is false and the im2col + GEMM path runs.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::{Geom, per_thread_images};
use crate::select::KernelSet;

/// Positions per vector: one AVX-512 vector of `f32`, two AVX2 ones.
const LANES: usize = 16;

/// Lanes of one AVX2 vector of `f32`: half a vector of positions.
const HALF: usize = 8;

/// The instructions the direct kernels run with, made only by [`Isa::of`], which checks at
/// run time that the CPU has them: what the kernels' safety rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX2 and FMA: 8-lane vectors, masked lanes by a bitwise and.
    Avx2,
    /// AVX-512F: 16-lane vectors, masked loads.
    Avx512,
}

impl Isa {
    /// The kernels of the selected set, where the CPU runs them: AVX-512 ones for
    /// [`KernelSet::Avx512`] (and any later set), AVX2 ones for [`KernelSet::Avx2`], none for
    /// [`KernelSet::Portable`].
    fn of(set: KernelSet) -> Option<Isa> {
        if set >= KernelSet::Avx512 {
            KernelSet::Avx512.supported().then_some(Isa::Avx512)
        } else if set == KernelSet::Avx2 {
            KernelSet::Avx2.supported().then_some(Isa::Avx2)
        } else {
            None
        }
    }

    /// The kernels of a convolution [`applies`] holds for.
    fn of_geom(g: &Geom) -> Isa {
        Isa::of(g.kernels).expect("the direct kernels run only where `applies` holds")
    }
}

/// Whether the direct kernels handle this convolution with its selected kernel set (and,
/// what the kernels' safety rests on, whether the CPU has the set's instructions: AVX-512F
/// for [`KernelSet::Avx512`], AVX2 and FMA for [`KernelSet::Avx2`]).
pub(crate) fn applies(g: &Geom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.padding == 1
        && g.h_out == g.h
        && g.w_out == g.w
        && Isa::of(g.kernels).is_some()
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
    isa: Isa,
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
    // Register blocks: output channels (the largest of the list that fits) × vectors of
    // positions.
    let (cbs, qb_max): (&[usize], usize) = match isa {
        Isa::Avx512 => (&[8, 4, 2, 1], 3),
        Isa::Avx2 => (&[6, 4, 2, 1], 1),
    };
    let mut co = 0;
    while co < c_out {
        let cb = cbs.iter().copied().find(|&b| b <= c_out - co).unwrap_or(1);
        let mut q = 0;
        while q < p.qp {
            let qb = ((p.qp - q) / LANES).min(qb_max);
            let v = q / LANES;
            // SAFETY: the CPU has the instructions of `isa` (`Isa::of`); the weight rows
            // co..co+cb, the planes' taps q + off + 16·qb ≤ qp + 2·w + 2 ≤ xl, the masks of
            // vectors v..v+qb ≤ qp/16 and the outputs (co + cb − 1)·ys + q + 16·qb ≤
            // (c_out − 1)·ys + qp all lie inside the slices, as asserted above.
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
                match isa {
                    Isa::Avx512 => match (cb, qb) {
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
                    },
                    Isa::Avx2 => match cb {
                        6 => conv_block_avx2::<6, 1>(args),
                        4 => conv_block_avx2::<4, 1>(args),
                        2 => conv_block_avx2::<2, 1>(args),
                        _ => conv_block_avx2::<1, 1>(args),
                    },
                }
            }
            q += qb * LANES;
        }
        co += cb;
    }
}

/// Arguments of [`conv_block`] and [`conv_block_avx2`].
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

/// The lanes of the two halves of a vector of positions that `bits` keeps, as all-ones or
/// zero `f32` lanes for `_mm256_and_ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lane_masks(bits: u16) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let half = |b: u16| {
        let v = _mm256_and_si256(_mm256_set1_epi32(i32::from(b)), sel);
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel))
    };
    [half(bits & 0xff), half(bits >> 8)]
}

/// [`conv_block`] with AVX2 and FMA: CB output channels × QB vectors of output positions,
/// each vector two 8-lane halves; the taps of the padding columns are plain loads with the
/// lanes of the padding positions zeroed by a bitwise and (all of every load lies inside
/// the plane, as for the masked AVX-512 loads).
///
/// # Safety
/// AVX2 and FMA must be available, and every address described in [`conv_planes`] valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv_block_avx2<const CB: usize, const QB: usize>(a: ConvArgs<'_>) {
    use std::arch::x86_64::*;
    // edge[s][j][h]: the lanes of half h of vector j that the taps of column 0 (s = 0) or
    // column 2 (s = 1) read.
    // SAFETY: in bounds by the caller's contract.
    let edge: [[[__m256; 2]; QB]; 2] = unsafe {
        [
            std::array::from_fn(|j| lane_masks(*a.left.add(j))),
            std::array::from_fn(|j| lane_masks(*a.right.add(j))),
        ]
    };
    let mut acc = [[[_mm256_setzero_ps(); 2]; QB]; CB];
    // One tap: column `b` (a literal, so whether and how it is masked is fixed at compile
    // time) of the kernel row at `x` (the input plane at the row's offset) and `wc` (the
    // weights of the row). Indexed loops over the fixed-size blocks, which LLVM unrolls
    // into registers: a loop over the 9 taps with iterator adaptors (`flatten`) kept the
    // accumulators in memory and ran at 3–5 GF/s.
    macro_rules! tap {
        ($x:expr, $wc:expr, $b:literal) => {
            let mut xv = [[_mm256_setzero_ps(); 2]; QB];
            for j in 0..QB {
                for h in 0..2 {
                    let v = _mm256_loadu_ps($x.add($b + j * LANES + h * HALF));
                    xv[j][h] = match $b {
                        0 => _mm256_and_ps(v, edge[0][j][h]),
                        2 => _mm256_and_ps(v, edge[1][j][h]),
                        _ => v,
                    };
                }
            }
            for o in 0..CB {
                let wv = _mm256_broadcast_ss(&*$wc.add(o * a.c_in * 9 + $b));
                for j in 0..QB {
                    for h in 0..2 {
                        acc[o][j][h] = _mm256_fmadd_ps(wv, xv[j][h], acc[o][j][h]);
                    }
                }
            }
        };
    }
    for ci in 0..a.c_in {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            for r in 0..3 {
                let x = a.xp.add(ci * a.xl + a.offs[3 * r]);
                let wc = a.w.add(ci * 9 + 3 * r);
                tap!(x, wc, 0);
                tap!(x, wc, 1);
                tap!(x, wc, 2);
            }
        }
    }
    for (o, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            for (h, v) in v.iter().enumerate() {
                // SAFETY: in bounds by the caller's contract.
                unsafe { _mm256_storeu_ps(a.yp.add(o * a.ys + j * LANES + h * HALF), *v) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn conv_block_avx2<const CB: usize, const QB: usize>(_: ConvArgs<'_>) {
    unreachable!("the direct kernels run only where AVX2 and FMA are present")
}

/// `conv_planes` of one image's planes into `out_i` (c_out × h·w): in place where h·w is
/// whole vectors, through the scratch `yp` (c_out × qp) otherwise.
fn conv_image(
    p: &Plane,
    isa: Isa,
    (c_in, c_out): (usize, usize),
    w: &[f32],
    xp: &[f32],
    yp: &mut [f32],
    out_i: &mut [MaybeUninit<f32>],
) {
    if p.hw == p.qp {
        conv_planes(p, isa, (c_in, c_out), w, xp, (out_i, p.hw));
    } else {
        conv_planes(p, isa, (c_in, c_out), w, xp, (as_uninit(yp), p.qp));
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
    let isa = Isa::of_geom(g);
    let p = Plane::new(g.h, g.w);
    let hw = g.h * g.w;
    let xp_len = g.c_in * p.xl;
    let buf_len = xp_len + out_scratch(&p, g.c_out);
    per_thread_images(g, out, g.c_out * hw, buf_len, |buf, (i, out_i)| {
        let (xp, yp) = buf.split_at_mut(xp_len);
        p.pad_input(g.c_in, &x[i * g.c_in * hw..(i + 1) * g.c_in * hw], xp, bias);
        conv_image(&p, isa, (g.c_in, g.c_out), w, xp, yp, out_i);
    });
}

/// Input gradient: `dx` (n × c_in × h × w) of a 3×3, stride-1, padding-1 convolution, as the
/// convolution of `dy` with the transposed, 180°-rotated weight ([`applies`] must hold).
/// Writes every element of `dx`.
pub(crate) fn backward_input(g: &Geom, dy: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) {
    assert_eq!(dx.len(), g.n * g.c_in * g.h * g.w);
    let isa = Isa::of_geom(g);
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
        conv_image(&p, isa, (g.c_out, g.c_in), &wt, dyp, dxp, dx_i);
    });
}

/// dw (c_out × c_in × 9) += the weight gradient of `nb` images, from their input planes
/// `xp` (nb × c_in × xl) and output gradients `dyp` (nb × c_out × qp, zero from h·w).
fn wgrad_planes(
    p: &Plane,
    isa: Isa,
    (nb, c_in, c_out): (usize, usize, usize),
    dyp: &[f32],
    xp: &[f32],
    dw: &mut [f32],
) {
    assert!(dw.len() >= c_out * c_in * 9);
    assert!(xp.len() >= nb * c_in * p.xl);
    assert!(dyp.len() >= nb * c_out * p.qp);
    if isa == Isa::Avx2 {
        wgrad_planes_avx2(p, (nb, c_in, c_out), dyp, xp, dw);
        return;
    }
    let offs = p.offsets();
    let mut co = 0;
    while co < c_out {
        let cb = (c_out - co).min(3);
        for ci in 0..c_in {
            // SAFETY: AVX-512F is present (`Isa::of`); for every image b < nb, rows
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

/// [`wgrad_planes`] with the AVX2 kernels (the CPU must have AVX2 and FMA: `Isa::of`): blocks
/// of [`AVX2_WG_CB`] output channels × the 3 taps of one kernel row, one pass per row, over
/// sub-groups of images small enough that a block's output-gradient rows and one input
/// plane stay in L1 ([`AVX2_WG_L1_BYTES`]) across the input channels and the three passes.
fn wgrad_planes_avx2(
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
    // The lane masks of `wgrad_block_avx2`, 2·qp floats: per half vector of positions, its
    // 8 left-neighbour then its 8 right-neighbour lanes, all-ones or zero. Built once per
    // call rather than from the bits at every vector (4 more instructions per tap row).
    let lanes: Vec<f32> = p
        .left
        .iter()
        .zip(&p.right)
        .flat_map(|(&l, &r)| {
            (0..2).flat_map(move |h| {
                [l, r].into_iter().flat_map(move |bits| {
                    (0..HALF).map(move |i| {
                        let on = bits >> (h * HALF + i) & 1 != 0;
                        f32::from_bits(if on { u32::MAX } else { 0 })
                    })
                })
            })
        })
        .collect();
    let sub = (AVX2_WG_L1_BYTES / (4 * (AVX2_WG_CB * p.qp + p.xl))).clamp(1, nb.max(1));
    let mut b0 = 0;
    while b0 < nb {
        let s = sub.min(nb - b0);
        let mut co = 0;
        while co < c_out {
            let cb = (c_out - co).min(AVX2_WG_CB);
            for ci in 0..c_in {
                // SAFETY: the CPU has AVX2 and FMA (`Isa::of`); for every image b0 + b <
                // nb, rows co..co+cb of its dyp, the taps q + off + 8 ≤ qp + 2·w + 2 ≤ xl of
                // its plane ci, the 2·qp lane masks, and the weights (co + cb − 1)·c_in·9 +
                // ci·9 + 9 ≤ c_out·c_in·9 lie inside, as asserted above.
                unsafe {
                    let args = WgradArgs {
                        nb: s,
                        qp: p.qp,
                        offs: &offs,
                        left: p.left.as_ptr(),
                        right: p.right.as_ptr(),
                        dyp: dyp.as_ptr().add((b0 * c_out + co) * p.qp),
                        dyp_image: c_out * p.qp,
                        xc: xp.as_ptr().add((b0 * c_in + ci) * p.xl),
                        xp_image: c_in * p.xl,
                        dw: dw.as_mut_ptr().add((co * c_in + ci) * 9),
                        dw_stride: c_in * 9,
                    };
                    let l = lanes.as_ptr();
                    match cb {
                        4 => (0..3).for_each(|r| wgrad_block_avx2::<4, 1>(&args, r, l)),
                        3 => (0..3).for_each(|r| wgrad_block_avx2::<3, 1>(&args, r, l)),
                        2 => (0..3).for_each(|r| wgrad_block_avx2::<2, 1>(&args, r, l)),
                        _ => wgrad_block_avx2::<1, 3>(&args, 0, l),
                    }
                }
            }
            co += cb;
        }
        b0 += s;
    }
}

/// Bytes of output-gradient rows and input planes per sub-group of images of the AVX2 weight
/// gradient: 1 image of 32×32, 2 of 16×16, 8 of 8×8 with 4-channel blocks. Measured on one
/// core at 16, 32 and 64 channels (32×32, 16×16, 8×8): passes over the whole L2 group read
/// it from L2 three times per input channel (60, 55, 48 GF/s); one image per pass pays 12
/// horizontal sums per image (73, 65, 44); 12 KiB runs at 73, 70, 67; 24 KiB holds 17 images
/// of 8×8, whose rows 16 KiB apart then overflow the associativity of L1 (73, 72, 56).
const AVX2_WG_L1_BYTES: usize = 12 << 10;

/// Output channels per AVX2 weight-gradient block: 4 × 3 taps fill 12 accumulators, with 3
/// registers for the input taps and one for the output gradient. Per 8 positions that is
/// 12 FMAs for 9 loads (4 output-gradient, 3 input, 2 lane masks) and 2 ands; 1 channel ×
/// 9 taps (9 accumulators) needs 12 loads and 6 ands for 9 FMAs, and ran at 41–44 GF/s to
/// 4 × 3's 67–73 (3 × 3: 58–62, 2 × 3: 38–52).
const AVX2_WG_CB: usize = 4;

/// Arguments of [`wgrad_block`] and [`wgrad_block_avx2`].
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

/// The sum of the lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// [`wgrad_block`] with AVX2 and FMA: CB output channels × the taps of R kernel rows from
/// `r0`, of one input channel, on 8-lane halves of the vectors of positions, the padding
/// columns' taps zeroed by the lane masks `lanes` (see [`wgrad_planes_avx2`]).
///
/// # Safety
/// AVX2 and FMA must be available, every address described in [`wgrad_planes_avx2`] valid,
/// and r0 + R ≤ 3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wgrad_block_avx2<const CB: usize, const R: usize>(
    a: &WgradArgs<'_>,
    r0: usize,
    lanes: *const f32,
) {
    use std::arch::x86_64::*;
    let offs: [usize; R] = std::array::from_fn(|r| a.offs[3 * (r0 + r)]);
    let mut acc = [[[_mm256_setzero_ps(); 3]; R]; CB];
    for b in 0..a.nb {
        // SAFETY: in bounds by the caller's contract.
        let (dyp, xc) = unsafe { (a.dyp.add(b * a.dyp_image), a.xc.add(b * a.xp_image)) };
        let mut q = 0;
        while q < a.qp {
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let ml = _mm256_loadu_ps(lanes.add(2 * q));
                let mr = _mm256_loadu_ps(lanes.add(2 * q + HALF));
                let mut d = [_mm256_setzero_ps(); CB];
                for (o, v) in d.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(dyp.add(o * a.qp + q));
                }
                for (r, &off) in offs.iter().enumerate() {
                    let x = xc.add(q + off);
                    let xv = [
                        _mm256_and_ps(_mm256_loadu_ps(x), ml),
                        _mm256_loadu_ps(x.add(1)),
                        _mm256_and_ps(_mm256_loadu_ps(x.add(2)), mr),
                    ];
                    for (row, dv) in acc.iter_mut().zip(&d) {
                        for (acc, xv) in row[r].iter_mut().zip(&xv) {
                            *acc = _mm256_fmadd_ps(*dv, *xv, *acc);
                        }
                    }
                }
            }
            q += HALF;
        }
    }
    for (o, row) in acc.iter().enumerate() {
        for (r, taps) in row.iter().enumerate() {
            for (b, v) in taps.iter().enumerate() {
                // SAFETY: in bounds by the caller's contract.
                unsafe { *a.dw.add(o * a.dw_stride + 3 * (r0 + r) + b) += hsum(*v) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn wgrad_block_avx2<const CB: usize, const R: usize>(
    _: &WgradArgs<'_>,
    _: usize,
    _: *const f32,
) {
    unreachable!("the direct kernels run only where AVX2 and FMA are present")
}

/// Bytes of planes the weight gradient keeps per thread: images are taken in groups that
/// fit a core's L2 cache, so the horizontal reductions are paid once per group.
const WGRAD_GROUP_BYTES: usize = 512 << 10;

/// Weight gradient: `dw` (c_out × c_in × 3 × 3) = Σ_images of a 3×3, stride-1, padding-1
/// convolution of `x` + `bias` ([`applies`] must hold); one partial sum per thread. Where
/// h·w is whole vectors the output gradient is read in place.
pub(crate) fn backward_weight(g: &Geom, dy: &[f32], x: &[f32], bias: Option<f32>, dw: &mut [f32]) {
    let isa = Isa::of_geom(g);
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
            wgrad_planes(&p, isa, (nb, g.c_in, g.c_out), dys, &xp, acc);
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

    /// The direct kernels of every instruction set (AVX2 and AVX-512) against the im2col +
    /// GEMM path (itself checked against `f64` references in `conv::tests`) on shapes that
    /// exercise every register block: 1–13 channels, images of whole vectors (written in
    /// place) and not, widths that divide 16, that 16 divides and neither, a width of 1, a
    /// single image.
    #[test]
    fn direct_kernels_match_the_gemm_path() {
        for set in [KernelSet::Avx2, KernelSet::Avx512] {
            if !set.supported() {
                println!("{set} skipped: this CPU lacks its instructions, its kernels never run");
                continue;
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
                    kernels: set,
                };
                assert!(applies(&g));
                let mut draw = |len: usize| -> Vec<f32> {
                    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
                };
                let x = draw(n * c_in * h * w);
                let wt = draw(c_out * c_in * 9);
                let dy = draw(n * c_out * h * w);
                let shape = (set, c_in, c_out, h, w);
                let mut y0 = vec![0f32; dy.len()];
                cpu::forward(&g, &x, &wt, &mut y0);
                let y1 = super::super::written(dy.len(), |y| forward(&g, &x, None, &wt, y));
                assert!(max_rel(&y1, &y0) <= 1e-5, "forward {shape:?}");
                let mut dx0 = vec![0f32; x.len()];
                cpu::backward_input(&g, &dy, &wt, &mut dx0);
                let dx1 = super::super::written(x.len(), |dx| backward_input(&g, &dy, &wt, dx));
                assert!(max_rel(&dx1, &dx0) <= 1e-5, "input grad {shape:?}");
                let (mut dw0, mut dw1) = (vec![0f32; wt.len()], vec![1f32; wt.len()]);
                cpu::backward_weight(&g, &dy, &x, &mut dw0);
                backward_weight(&g, &dy, &x, None, &mut dw1);
                assert!(max_rel(&dw1, &dw0) <= 1e-5, "weight grad {shape:?}");
            }
        }
    }

    /// [`applies`] admits each instruction set where the CPU has it, never the portable
    /// one, and only the 3×3, stride-1, padding-1, same-size shape.
    #[test]
    fn applies_follows_the_kernel_set() {
        let g = |kernels, stride| Geom {
            n: 2,
            c_in: 4,
            h: 8,
            w: 8,
            c_out: 4,
            k: 3,
            stride,
            padding: 1,
            h_out: (8 + 2 - 3) / stride + 1,
            w_out: (8 + 2 - 3) / stride + 1,
            kernels,
        };
        assert!(!applies(&g(KernelSet::Portable, 1)));
        for set in [KernelSet::Avx2, KernelSet::Avx512] {
            assert_eq!(applies(&g(set, 1)), set.supported(), "{set}");
            assert!(!applies(&g(set, 2)), "{set}");
        }
    }
}
