//! The element-wise passes of the theory network's stability probe (`tau-resnet probe`):
//! the ReLU step of a block with the squared norm of its result, the linear step of the
//! backward pass, and the ReLU mask kept between them, on 16-float groups that vectorize.

use crate::select::KernelSet;
use crate::util::relu_f32;

/// Lanes of the vectorizable per-row loops.
const LANES: usize = 16;

/// `z ← max(s·z + (s·τ)·p, 0)` element-wise; returns ‖z‖² of the result.
///
/// Compiled twice, for the baseline x86-64 target and for AVX2 (used when `set` is
/// [`KernelSet::Avx2`] or above and the CPU has AVX2): the same lane-wise operations in the
/// same order, so both give the same bits.
pub fn relu_step(set: KernelSet, z: &mut [f32], p: &[f32], s: f32, tau: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if set >= KernelSet::Avx2 && KernelSet::Avx2.supported() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { relu_step_avx2(z, p, s, tau) };
        }
    }
    let _ = set;
    relu_step_body(z, p, s, tau)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn relu_step_avx2(z: &mut [f32], p: &[f32], s: f32, tau: f32) -> f64 {
    relu_step_body(z, p, s, tau)
}

#[inline(always)]
fn relu_step_body(z: &mut [f32], p: &[f32], s: f32, tau: f32) -> f64 {
    let st = s * tau;
    // max(v, 0) as a select: NaN and −0 give 0, as f32::max(v, 0) does up to the sign
    // of zero, which the square and the next step do not see.
    let mut acc = [0f32; LANES];
    let mut zc = z.chunks_exact_mut(LANES);
    let mut pc = p.chunks_exact(LANES);
    for (zs, ps) in (&mut zc).zip(&mut pc) {
        for k in 0..LANES {
            let v = relu_f32(s * zs[k] + st * ps[k]);
            zs[k] = v;
            acc[k] += v * v;
        }
    }
    let mut tail = 0f32;
    for (zj, pj) in zc.into_remainder().iter_mut().zip(pc.remainder()) {
        let v = relu_f32(s * *zj + st * pj);
        *zj = v;
        tail += v * v;
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

/// `g ← s·g + (s·τ)·q` element-wise.
pub fn linear_step(g: &mut [f32], q: &[f32], s: f32, tau: f32) {
    let st = s * tau;
    for (gj, qj) in g.iter_mut().zip(q) {
        *gj = s * *gj + st * qj;
    }
}

/// The ReLU mask of `z` (bit j of word j/64 set where z_j > 0).
pub fn set_mask(z: &[f32], mask: &mut [u64]) {
    for (word, chunk) in mask.iter_mut().zip(z.chunks(64)) {
        let mut bits = 0u64;
        for (j, &v) in chunk.iter().enumerate() {
            bits |= u64::from(v > 0.0) << j;
        }
        *word = bits;
    }
}

/// Zeroes `g` where the mask is clear; returns ‖g‖² of the result.
pub fn apply_mask(g: &mut [f32], mask: &[u64]) -> f64 {
    let mut acc = [0f32; LANES];
    let mut tail = 0f32;
    for (chunk, &word) in g.chunks_mut(64).zip(mask) {
        for (s, sub) in chunk.chunks_mut(LANES).enumerate() {
            let bits = word >> (s * LANES);
            if let Ok(sub) = <&mut [f32; LANES]>::try_from(&mut *sub) {
                for k in 0..LANES {
                    let kept = if (bits >> k) & 1 == 1 { sub[k] } else { 0.0 };
                    sub[k] = kept;
                    acc[k] += kept * kept;
                }
            } else {
                for (k, v) in sub.iter_mut().enumerate() {
                    let kept = if (bits >> k) & 1 == 1 { *v } else { 0.0 };
                    *v = kept;
                    tail += kept * kept;
                }
            }
        }
    }
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_wise_passes_match_plain_loops() {
        // Width 70: whole 16-lane groups, a partial group and a partial 64-bit word.
        let m: usize = 70;
        let z0: Vec<f32> = (0..m)
            .map(|j| ((j * 37 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let p: Vec<f32> = (0..m).map(|j| ((j * 11 % 17) as f32 - 8.0) * 0.2).collect();
        let (s, tau) = (0.5f32, 0.3f32);
        let mut z = z0.clone();
        let n2 = relu_step(KernelSet::detected(), &mut z, &p, s, tau);
        let want: Vec<f32> = z0
            .iter()
            .zip(&p)
            .map(|(a, b)| relu_f32(s * a + s * tau * b))
            .collect();
        assert_eq!(z, want);
        let want_n2: f64 = want.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((n2 - want_n2).abs() < 1e-5 * want_n2);
        let mut z_base = z0.clone();
        assert_eq!(
            relu_step_body(&mut z_base, &p, s, tau).to_bits(),
            n2.to_bits(),
            "dispatched and baseline passes give the same bits"
        );
        assert_eq!(z_base, z);
        let mut mask = vec![0u64; m.div_ceil(64)];
        set_mask(&z, &mut mask);
        for (j, &v) in z.iter().enumerate() {
            assert_eq!((mask[j / 64] >> (j % 64)) & 1 == 1, v > 0.0, "bit {j}");
        }
        let mut g = p.clone();
        let n2 = apply_mask(&mut g, &mask);
        let want: Vec<f32> = p
            .iter()
            .zip(&z)
            .map(|(&gj, &zj)| if zj > 0.0 { gj } else { 0.0 })
            .collect();
        assert_eq!(g, want);
        let want_n2: f64 = want.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((n2 - want_n2).abs() < 1e-5 * want_n2);
    }
}
