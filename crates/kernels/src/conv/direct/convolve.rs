//! The direct convolution of zero-framed planes (see [`super`]): the forward pass and,
//! with the weight transposed and rotated, the input gradient, each with its AVX-512 and
//! AVX2 register-block kernels.

use super::super::cpu::per_thread_images;
use super::*;

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
// Read only by the x86-64 kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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
