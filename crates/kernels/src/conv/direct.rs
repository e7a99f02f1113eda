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
//! - forward ([`convolve`]): y[o, q] = Σ_c Σ_tap w[o, c, tap] · x̂[c, q + off(tap)], in
//!   register blocks of 8 output channels × 48 positions (24 of AVX-512's 32 registers), or
//!   with AVX2 6 output channels × 16 positions (12 of its 16 registers);
//! - input gradient ([`convolve`]): the forward kernel on the output gradient, with the
//!   weight transposed and rotated by 180° (the adjoint of a stride-1, padding-1, 3×3
//!   convolution is one);
//! - weight gradient ([`weight_grad`]): dw[o, c, tap] = Σ_q dy[o, q] · x̂[c, q + off(tap)],
//!   in register blocks of 3 output channels × 9 taps (AVX-512), or with AVX2 4 output
//!   channels × the 3 taps of one kernel row, one pass per row (12 accumulators), summed
//!   over the positions of a group of images before one horizontal reduction per
//!   (o, c, tap).
//!
//! The AVX2 blocks were chosen by measurement at the CIFAR ResNet shapes (16, 32, 64
//! channels at 32×32, 16×16, 8×8) on one quiet core of an AVX-512 Xeon whose AVX2 FMAs
//! peak near 91 GF/s: the forward ran at 82–88 GF/s with 6 × 16 positions (5 × 16: 83–84),
//! against 65–75 with 4 × 16 or 2 × 32 and 43–62 with blocks that spill (4 × 32, 3 × 32,
//! 7 × 16, 8 × 16); the weight gradient at 67–73 GF/s ([`weight_grad::AVX2_WG_CB`],
//! [`weight_grad::AVX2_WG_L1_BYTES`]). The AVX-512 kernels run at about 130 and 96–105
//! GF/s there.
//!
//! Which set runs follows the kernel set recorded in the convolution (`Geom::kernels`):
//! the AVX-512 kernels for [`KernelSet::Avx512`] where the CPU has AVX-512F, the AVX2 ones
//! for [`KernelSet::Avx2`] where it has AVX2 and FMA (both checked at run time, [`Isa`]);
//! elsewhere [`applies`] is false and the im2col + GEMM path runs.

use std::mem::MaybeUninit;

use super::cpu::Geom;
use crate::select::KernelSet;

mod convolve;
mod weight_grad;

pub(crate) use convolve::{backward_input, forward};
pub(crate) use weight_grad::backward_weight;

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
