//! The direct weight gradient (see [`super`]): the planes of a group of images against
//! their output gradients, in AVX-512 and AVX2 register-block kernels, one partial sum per
//! thread.

use rayon::prelude::*;

use super::*;

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
pub(super) const AVX2_WG_L1_BYTES: usize = 12 << 10;

/// Output channels per AVX2 weight-gradient block: 4 × 3 taps fill 12 accumulators, with 3
/// registers for the input taps and one for the output gradient. Per 8 positions that is
/// 12 FMAs for 9 loads (4 output-gradient, 3 input, 2 lane masks) and 2 ands; 1 channel ×
/// 9 taps (9 accumulators) needs 12 loads and 6 ands for 9 FMAs, and ran at 41–44 GF/s to
/// 4 × 3's 67–73 (3 × 3: 58–62, 2 × 3: 38–52).
pub(super) const AVX2_WG_CB: usize = 4;

/// Arguments of [`wgrad_block`] and [`wgrad_block_avx2`].
// Read only by the x86-64 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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
