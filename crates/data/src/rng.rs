//! Seeded random streams (ChaCha8, keyed by seed, purpose and position) and an unbiased
//! bounded integer draw, written out here so orders never change with a `rand` upgrade.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for; different purposes never share a stream.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Domain {
    EpochOrder = 1,
    Augment = 2,
    Subset = 3,
    SphereInputs = 4,
    SphereTargets = 5,
}

/// SplitMix64 finalizer (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A ChaCha8 stream determined by `(seed, domain, a)`.
pub(crate) fn stream_rng(seed: u64, domain: Domain, a: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(domain as u64)));
    rng.set_stream(a);
    rng
}

/// A ChaCha8 stream determined by `(seed, domain, a, b)`, cheap enough to create per example.
pub(crate) fn stream_rng2(seed: u64, domain: Domain, a: u64, b: u64) -> ChaCha8Rng {
    let key = splitmix(splitmix(seed ^ splitmix(domain as u64)) ^ a);
    let mut rng = ChaCha8Rng::seed_from_u64(key);
    rng.set_stream(b);
    rng
}

/// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-and-reject method.
pub(crate) fn bounded(rng: &mut impl RngCore, n: u64) -> u64 {
    debug_assert!(n > 0);
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// A uniform f64 in `[0, 1)` with 53 random bits.
pub(crate) fn unit_f64(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal draw (Box–Muller on two uniforms), defined here so the synthetic data
/// does not change with a `rand_distr` upgrade.
pub(crate) fn normal(rng: &mut impl RngCore) -> f64 {
    let u1 = 1.0 - unit_f64(rng); // (0, 1]
    let u2 = unit_f64(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_stays_in_range_and_covers_it() {
        let mut rng = stream_rng(1, Domain::Subset, 0);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            seen[bounded(&mut rng, 7) as usize] += 1;
        }
        // Each bucket expects 1000; 6 sigma is about 190.
        assert!(seen.iter().all(|&c| (810..1190).contains(&c)), "{seen:?}");
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut rng = stream_rng(2, Domain::SphereInputs, 0);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: mean 0.0032, variance 0.0045.
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
    }
}
