//! Synthetic regression data for the theory experiments (PAPER.md, "The theory network"):
//! `n` inputs uniform on the unit sphere of R^p, with Gaussian targets or targets produced by
//! a random ReLU teacher network, all determined by one seed.

use candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::{Domain, normal, stream_rng};

/// How the targets are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// Independent standard normal targets, unrelated to the inputs.
    Gaussian,
    /// The outputs of a random fully connected ReLU network without biases (the teacher):
    /// `z_0 = x`, `z_k = relu(V_k z_{k-1})` for `k = 1..=depth` with `V_k` of shape
    /// `width × fan_in` and entries `N(0, 2 / width)`, then `y = U z_depth` with `U` of shape
    /// `d × fan_in` and entries `N(0, 1)`. Over the teacher's weights,
    /// `E|z_k|² = |x|² = 1` and `E[y_r²] = 1`: the targets have the scale of the Gaussian
    /// ones. With `depth = 0` the teacher is linear, `y = U x`. Its weights come from the
    /// same seed as the data.
    Teacher {
        /// Hidden width of the teacher.
        width: usize,
        /// Number of hidden ReLU layers.
        depth: usize,
    },
}

/// Inputs and targets, row-major, in float64.
#[derive(Debug, Clone, PartialEq)]
pub struct SphereData {
    /// Inputs, `n * p`, row `i` is example `i` (unit norm).
    pub xs: Vec<f64>,
    /// Targets, `n * d`.
    pub ys: Vec<f64>,
    /// Number of examples.
    pub n: usize,
    /// Input dimension.
    pub p: usize,
    /// Output dimension.
    pub d: usize,
}

impl SphereData {
    /// The inputs as an `(n, p)` tensor and the targets as an `(n, d)` tensor, in `dtype`
    /// on `device`.
    ///
    /// # Errors
    /// As candle's tensor creation and dtype conversion.
    pub fn to_tensors(&self, dtype: DType, device: &Device) -> candle::Result<(Tensor, Tensor)> {
        let xs = Tensor::from_slice(&self.xs, (self.n, self.p), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let ys = Tensor::from_slice(&self.ys, (self.n, self.d), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok((xs, ys))
    }
}

/// `n` inputs uniform on the unit sphere in R^p (normalized standard Gaussian vectors) and
/// their `d`-dimensional targets, fully determined by `seed`. The inputs depend only on
/// `(n, p, seed)`, not on the kind of targets. With `p = 0` the inputs are empty vectors.
pub fn sphere(n: usize, p: usize, d: usize, targets: Targets, seed: u64) -> SphereData {
    let mut rng = stream_rng(seed, Domain::SphereInputs, 0);
    let mut xs = vec![0.0f64; n * p];
    for row in xs.chunks_mut(p.max(1)).take(if p == 0 { 0 } else { n }) {
        loop {
            for v in row.iter_mut() {
                *v = normal(&mut rng);
            }
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 1e-12 {
                row.iter_mut().for_each(|v| *v /= norm);
                break;
            }
        }
    }
    let mut rng = stream_rng(seed, Domain::SphereTargets, 0);
    let ys = match targets {
        Targets::Gaussian => (0..n * d).map(|_| normal(&mut rng)).collect(),
        Targets::Teacher { width, depth } => {
            let teacher = Teacher::new(p, d, width, depth, &mut rng);
            (0..n)
                .flat_map(|i| teacher.forward(&xs[i * p..(i + 1) * p]))
                .collect()
        }
    };
    SphereData { xs, ys, n, p, d }
}

/// A random fully connected ReLU network without biases (see [`Targets::Teacher`]).
struct Teacher {
    /// Hidden layers as (rows, cols, row-major weights).
    layers: Vec<(usize, usize, Vec<f64>)>,
    /// The output layer, `d × fan_in` row-major.
    out: (usize, usize, Vec<f64>),
}

fn matvec(rows: usize, cols: usize, w: &[f64], z: &[f64]) -> impl Iterator<Item = f64> {
    (0..rows).map(move |r| {
        w[r * cols..(r + 1) * cols]
            .iter()
            .zip(z)
            .map(|(a, b)| a * b)
            .sum()
    })
}

impl Teacher {
    fn new(p: usize, d: usize, width: usize, depth: usize, rng: &mut impl rand::RngCore) -> Self {
        let mut layers = Vec::with_capacity(depth);
        let mut fan_in = p;
        let sd = (2.0 / width.max(1) as f64).sqrt();
        for _ in 0..depth {
            let w = (0..width * fan_in).map(|_| sd * normal(rng)).collect();
            layers.push((width, fan_in, w));
            fan_in = width;
        }
        let u = (0..d * fan_in).map(|_| normal(rng)).collect();
        Teacher {
            layers,
            out: (d, fan_in, u),
        }
    }

    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let mut z = x.to_vec();
        for (rows, cols, w) in &self.layers {
            z = matvec(*rows, *cols, w, &z).map(|v| v.max(0.0)).collect();
        }
        let (rows, cols, u) = &self.out;
        matvec(*rows, *cols, u, &z).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_unit_norm_and_seeded() {
        let a = sphere(20, 5, 2, Targets::Gaussian, 1);
        assert_eq!((a.xs.len(), a.ys.len()), (100, 40));
        for row in a.xs.chunks(5) {
            let norm: f64 = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-12);
        }
        assert_eq!(a, sphere(20, 5, 2, Targets::Gaussian, 1));
        assert_ne!(a.xs, sphere(20, 5, 2, Targets::Gaussian, 2).xs);
        // Inputs do not depend on the kind of targets.
        let t = sphere(20, 5, 2, Targets::Teacher { width: 8, depth: 2 }, 1);
        assert_eq!(a.xs, t.xs);
    }

    #[test]
    fn inputs_are_uniform_on_the_sphere() {
        // For x uniform on the sphere in R^p, E[x_j] = 0 and E[x_j^2] = 1/p.
        let (n, p) = (20_000, 4);
        let s = sphere(n, p, 1, Targets::Gaussian, 3);
        for j in 0..p {
            let m: f64 = s.xs.iter().skip(j).step_by(p).sum::<f64>() / n as f64;
            let m2: f64 = s.xs.iter().skip(j).step_by(p).map(|v| v * v).sum::<f64>() / n as f64;
            assert!(m.abs() < 0.02, "mean {m}");
            assert!((m2 - 0.25).abs() < 0.01, "second moment {m2}");
        }
    }

    #[test]
    fn teacher_is_homogeneous_and_linear_at_depth_zero() {
        let mut rng = stream_rng(4, Domain::SphereTargets, 0);
        let x = [0.6, -0.8, 0.0];
        let neg: Vec<f64> = x.iter().map(|v| -v).collect();
        let twice: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
        let linear = Teacher::new(3, 2, 5, 0, &mut rng);
        let (y, y_neg) = (linear.forward(&x), linear.forward(&neg));
        assert!(y.iter().zip(&y_neg).all(|(a, b)| (a + b).abs() < 1e-12));
        // A bias-free ReLU network is positively homogeneous but not odd.
        let relu = Teacher::new(3, 2, 16, 2, &mut rng);
        let (y, y2, y_neg) = (relu.forward(&x), relu.forward(&twice), relu.forward(&neg));
        assert!(y.iter().zip(&y2).all(|(a, b)| (2.0 * a - b).abs() < 1e-12));
        assert!(y.iter().zip(&y_neg).any(|(a, b)| (a + b).abs() > 1e-6));
    }

    #[test]
    fn teacher_targets_have_unit_second_moment() {
        // Hidden weights N(0, 2/width) keep E|z_k|^2 = |x|^2 = 1 exactly (E relu(g)^2 =
        // var/2), and output weights N(0, 1) then give E[y^2] = 1; averaged over teachers.
        let (mut sum, mut count) = (0.0, 0);
        for seed in 0..200 {
            let s = sphere(
                10,
                6,
                2,
                Targets::Teacher {
                    width: 32,
                    depth: 3,
                },
                seed,
            );
            sum += s.ys.iter().map(|v| v * v).sum::<f64>();
            count += s.ys.len();
        }
        let m2 = sum / count as f64;
        assert!((m2 - 1.0).abs() < 0.15, "E[y^2] = {m2}");
    }

    #[test]
    fn to_tensors_has_the_shapes() -> candle::Result<()> {
        let s = sphere(6, 3, 2, Targets::Gaussian, 0);
        let (xs, ys) = s.to_tensors(DType::F32, &Device::Cpu)?;
        assert_eq!(xs.dims(), &[6, 3]);
        assert_eq!(ys.dims(), &[6, 2]);
        let back: Vec<Vec<f64>> = xs.to_dtype(DType::F64)?.to_vec2()?;
        assert!((back[1][2] - s.xs[5]).abs() < 1e-6);
        Ok(())
    }
}
