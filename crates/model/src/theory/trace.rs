//! The theory network's passes in log space: [`TheoryNet::forward_traced`], whose
//! [`TheoryTrace`] holds ln‖h_l‖ for every layer and input, and
//! [`TheoryNet::layer_grad_log_norms`], ln‖∂loss/∂W_l‖_F for the squared loss. Each rescales
//! the hidden states (and, backward, the back-propagated signals) to unit norm after every
//! block and carries the logarithm of the scale in f64, so both stay finite where the
//! norms overflow f64.
//!
//! # Example
//!
//! A scalar network (p = m = d = 1) with every weight 1 and τ = 1 doubles its hidden state
//! in each block. For the squared loss ½ y² of x = 1, ∂loss/∂W_l = y · τ · 2^(L−l) · h_{l−1}
//! = 2^L · 2^(L−l) · 2^(l−1) = 2^(2L−1) in every layer: at L = 600, e^831, beyond f64, yet
//! its logarithm comes out exact.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use candle::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use tau_model::{TheoryConfig, TheoryNet};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg = TheoryConfig {
//!     input_dim: 1, width: 1, depth: 600, output_dim: 1, tau: "1".parse()?,
//!     ..Default::default()
//! };
//! let one = Tensor::ones((1, 1), DType::F32, &dev)?;
//! let mut tensors: HashMap<String, Tensor> = (0..cfg.depth)
//!     .map(|l| (format!("blocks.{l}.weight"), one.clone()))
//!     .collect();
//! tensors.insert("input.weight".into(), one.clone());
//! tensors.insert("output.weight".into(), one.clone());
//! let net = TheoryNet::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
//!
//! let (xs, ys) = (Tensor::new(&[[1f32]], &dev)?, Tensor::new(&[[0f32]], &dev)?);
//! let want = 1199.0 * 2f64.ln(); // ≈ 831.1 > ln(f64::MAX) ≈ 709.8
//! let logs = net.layer_grad_log_norms(&xs, &ys)?;
//! assert_eq!(logs.len(), 600);
//! assert!(logs.iter().all(|l| (l - want).abs() < 1e-9), "{logs:?}");
//! assert!(net.layer_grad_norms(&xs, &ys)?.iter().all(|g| g.is_infinite()));
//! let trace = net.forward_traced(&xs)?;
//! assert!((trace.log_ratio(0).unwrap() - 600.0 * 2f64.ln()).abs() < 1e-9);
//! # Ok(()) }
//! ```

use candle::{DType, Device, Result, Tensor};

use super::TheoryNet;

/// ln‖h_l(x_i)‖ for every layer l = 0..=L and input i, from [`TheoryNet::forward_traced`].
///
/// # Example
///
/// A trace of two inputs through L = 2 blocks: the first doubles at each block, the
/// second halves and then dies.
///
/// ```
/// use candle::DType;
/// use tau_model::TheoryTrace;
///
/// let ln2 = 2f64.ln();
/// let trace = TheoryTrace {
///     log_norms: vec![vec![0.0, 0.0], vec![ln2, -ln2], vec![2.0 * ln2, f64::NEG_INFINITY]],
/// };
/// assert_eq!((trace.depth(), trace.n_inputs()), (2, 2));
/// assert_eq!((trace.collapsed_at(0), trace.collapsed_at(1)), (None, Some(2)));
/// assert_eq!(trace.log_ratio(0), Some(2.0 * ln2));
/// assert_eq!(trace.log_ratio(1), Some(f64::NEG_INFINITY));
/// assert_eq!(trace.log_ratios_at(1), [ln2, -ln2]);
/// // ‖h_2‖/‖h_0‖ is 4 and 0: the mean ratio is 2, its log ln 2.
/// assert_eq!(trace.mean_ratio(), Some(2.0));
/// assert!((trace.log_mean_ratio().unwrap() - ln2).abs() < 1e-15);
/// assert_eq!(trace.mean_log_ratio(), Some(f64::NEG_INFINITY));
/// assert_eq!(trace.mean_log_ratio_per_layer(), [0.0, 0.0, f64::NEG_INFINITY]);
/// assert_eq!(trace.max_log_norm(), 2.0 * ln2);
/// assert!(!trace.overflows(DType::F16));
/// // e^100 fits in f64 but not in f32 (whose largest value is about e^88.7).
/// let big = TheoryTrace { log_norms: vec![vec![0.0], vec![100.0]] };
/// assert!(big.overflows(DType::F32) && !big.overflows(DType::F64));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TheoryTrace {
    /// `log_norms[l][i]` = ln‖h_l(x_i)‖. A hidden state that is exactly zero (every unit
    /// dead) has log-norm −∞, and so do all later layers for that input; see
    /// [`TheoryTrace::collapsed_at`]. Never NaN.
    pub log_norms: Vec<Vec<f64>>,
}

impl TheoryTrace {
    /// L, the number of blocks traced.
    /// See the [example](TheoryTrace#example).
    pub fn depth(&self) -> usize {
        self.log_norms.len().saturating_sub(1)
    }

    /// Number of inputs.
    /// See the [example](TheoryTrace#example).
    pub fn n_inputs(&self) -> usize {
        self.log_norms.first().map_or(0, Vec::len)
    }

    /// The first layer at which input `i`'s hidden state is exactly zero, if any.
    /// See the [example](TheoryTrace#example).
    pub fn collapsed_at(&self, i: usize) -> Option<usize> {
        self.log_norms
            .iter()
            .position(|row| row.get(i).is_some_and(|v| *v == f64::NEG_INFINITY))
    }

    /// ln(‖h_L(x_i)‖ / ‖h_0(x_i)‖); `None` when h_0(x_i) is zero (the ratio is undefined).
    /// −∞ when h_L(x_i) is zero.
    /// See the [example](TheoryTrace#example).
    pub fn log_ratio(&self, i: usize) -> Option<f64> {
        let first = *self.log_norms.first()?.get(i)?;
        let last = *self.log_norms.last()?.get(i)?;
        (first.is_finite()).then_some(last - first)
    }

    /// ln(‖h_l(x_i)‖ / ‖h_0(x_i)‖) for every input with a nonzero h_0, at layer `l`.
    /// See the [example](TheoryTrace#example).
    pub fn log_ratios_at(&self, l: usize) -> Vec<f64> {
        let (Some(first), Some(row)) = (self.log_norms.first(), self.log_norms.get(l)) else {
            return Vec::new();
        };
        first
            .iter()
            .zip(row)
            .filter(|(f, _)| f.is_finite())
            .map(|(f, r)| r - f)
            .collect()
    }

    /// Mean over inputs of ‖h_L‖/‖h_0‖, in f64: `+∞` only beyond f64's range (≈1e308);
    /// use [`Self::log_mean_ratio`] there. `None` when no input has a nonzero h_0.
    /// See the [example](TheoryTrace#example).
    pub fn mean_ratio(&self) -> Option<f64> {
        let rs = self.log_ratios_at(self.depth());
        if rs.is_empty() {
            return None;
        }
        Some(rs.iter().map(|r| r.exp()).sum::<f64>() / rs.len() as f64)
    }

    /// ln of the mean ratio ‖h_L‖/‖h_0‖, by log-sum-exp: finite for any depth (−∞ only
    /// when every h_L is zero). `None` when no input has a nonzero h_0.
    /// See the [example](TheoryTrace#example).
    pub fn log_mean_ratio(&self) -> Option<f64> {
        log_mean_exp(&self.log_ratios_at(self.depth()))
    }

    /// Mean over inputs of ln(‖h_L‖/‖h_0‖). `None` when no input has a nonzero h_0.
    /// See the [example](TheoryTrace#example).
    pub fn mean_log_ratio(&self) -> Option<f64> {
        let rs = self.log_ratios_at(self.depth());
        (!rs.is_empty()).then(|| rs.iter().sum::<f64>() / rs.len() as f64)
    }

    /// For every layer l = 0..=L, the mean over inputs of ln(‖h_l‖/‖h_0‖) (inputs with a
    /// zero h_0 left out; −∞ where some input's h_l is zero). Empty when no input counts.
    /// See the [example](TheoryTrace#example).
    pub fn mean_log_ratio_per_layer(&self) -> Vec<f64> {
        (0..self.log_norms.len())
            .map_while(|l| {
                let rs = self.log_ratios_at(l);
                (!rs.is_empty()).then(|| rs.iter().sum::<f64>() / rs.len() as f64)
            })
            .collect()
    }

    /// The largest ln‖h_l(x_i)‖ over every layer and input (−∞ if all are zero).
    /// See the [example](TheoryTrace#example).
    pub fn max_log_norm(&self) -> f64 {
        self.log_norms
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Whether some hidden state's norm exceeds what `dtype` can hold, i.e. a plain
    /// (untraced) forward pass in that dtype would overflow to infinity.
    /// See the [example](TheoryTrace#example).
    pub fn overflows(&self, dtype: DType) -> bool {
        let max = match dtype {
            DType::F16 => f64::from(half::f16::MAX),
            DType::BF16 => f64::from(half::bf16::MAX),
            DType::F32 => f64::from(f32::MAX),
            _ => f64::MAX,
        };
        self.max_log_norm() > max.ln()
    }
}

/// ln(mean(exp(xs))) without overflow; `None` for an empty slice.
fn log_mean_exp(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return Some(m);
    }
    let s: f64 = xs.iter().map(|x| (x - m).exp()).sum();
    Some(m + (s / xs.len() as f64).ln())
}

/// A tiny positive floor for divisions by a norm, representable in `dtype`.
fn norm_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-7,
        _ => 1e-30,
    }
}

/// Row norms (n, 1) of `h`, and `h` with every nonzero row scaled to unit norm.
fn normalize_rows(h: &Tensor) -> Result<(Tensor, Tensor)> {
    let norms = h.sqr()?.sum_keepdim(1)?.sqrt()?;
    let unit = h.broadcast_div(&norms.maximum(norm_floor(h.dtype()))?)?;
    Ok((unit, norms))
}

/// Pulls a list of (n, 1) norm tensors to the CPU as f64 and turns them into cumulative
/// log-norms, failing on a non-finite norm (an overflow inside one block or a NaN input).
fn cumulative_log_norms(norms: &[Tensor], what: &str) -> Result<Vec<Vec<f64>>> {
    let stacked = Tensor::cat(norms, 1)?.to_dtype(DType::F64)?.t()?;
    let rows = stacked.to_vec2::<f64>()?;
    let mut out: Vec<Vec<f64>> = Vec::with_capacity(rows.len());
    for (l, row) in rows.into_iter().enumerate() {
        let mut logs = Vec::with_capacity(row.len());
        for (i, v) in row.into_iter().enumerate() {
            if !v.is_finite() {
                candle::bail!(
                    "{what}: non-finite norm {v} of the hidden state at layer {l} for input {i} \
                     (overflow inside one block, or a non-finite input)"
                )
            }
            let prev = out.last().map_or(0.0, |p| p[i]);
            logs.push(prev + v.ln());
        }
        out.push(logs);
    }
    Ok(out)
}

impl TheoryNet {
    /// ln‖h_l(x_i)‖ for l = 0..=L and every row x_i of `xs`, finite at any depth and τ.
    /// See the [example](TheoryNet#example).
    ///
    /// # Errors
    /// Wrong input shape or dtype; a non-finite input, or a norm that overflows within a
    /// single block (not within the whole network), is reported as an error.
    pub fn forward_traced(&self, xs: &Tensor) -> Result<TheoryTrace> {
        self.check_input(xs)?;
        let (mut h, n0) = normalize_rows(&self.stem(xs)?)?;
        let mut norms = Vec::with_capacity(self.ws.len() + 1);
        norms.push(n0);
        for w in &self.ws {
            let (unit, nl) = normalize_rows(&self.block(&h, w)?)?;
            h = unit;
            norms.push(nl);
        }
        Ok(TheoryTrace {
            log_norms: cumulative_log_norms(&norms, "theory network trace")?,
        })
    }

    /// ln‖∂loss/∂W_l‖_F for l = 1..L (index l−1), for the squared loss
    /// ½ Σ_i ‖y(x_i) − y*_i‖², with A and B fixed.
    ///
    /// The backward pass is done by hand on unit-norm rescaled hidden states and
    /// back-propagated signals, carrying each input's log-scale in f64; the per-input
    /// contributions g_i h_iᵀ to a layer's gradient are combined with weights
    /// exp(s_i − max s), so no intermediate overflows. −∞ means an exactly zero gradient.
    /// See the [example](TheoryNet#example).
    ///
    /// # Errors
    /// Shapes of `xs` (n, p) and `ys` (n, d) that do not fit; non-finite norms as in
    /// [`Self::forward_traced`].
    pub fn layer_grad_log_norms(&self, xs: &Tensor, ys: &Tensor) -> Result<Vec<f64>> {
        let n = self.check_input(xs)?;
        let d = self.cfg.output_dim;
        let (ny, dy) = ys.dims2()?;
        if (ny, dy) != (n, d) {
            candle::bail!("theory network: targets have shape ({ny}, {dy}), expected ({n}, {d})")
        }
        let dtype = self.a.dtype();
        let device = xs.device().clone();

        // Forward, keeping the unit-norm hidden states ĥ_0..ĥ_L.
        let (h0, n0) = normalize_rows(&self.stem(xs)?)?;
        let mut hs = Vec::with_capacity(self.ws.len() + 1);
        let mut norms = Vec::with_capacity(self.ws.len() + 1);
        let mut h = h0;
        norms.push(n0);
        for w in &self.ws {
            let (unit, nl) = normalize_rows(&self.block(&h, w)?)?;
            hs.push(std::mem::replace(&mut h, unit));
            norms.push(nl);
        }
        hs.push(h);
        let log_h = cumulative_log_norms(&norms, "theory network gradient")?;
        let last = self.ws.len();

        // Residual r_i = e^{c_i} ŷ_i − y*_i, kept as a unit vector r̂_i and a log-scale γ_i.
        let y_hat = hs[last]
            .matmul(&self.b.t()?)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let y_star = ys.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut gamma = vec![0.0f64; n];
        let mut r_unit = Vec::with_capacity(n * d);
        for i in 0..n {
            let c = log_h[last][i];
            let (scale, r): (f64, Vec<f64>) = if c > 0.0 {
                let k = (-c).exp();
                (c, (0..d).map(|j| y_hat[i][j] - y_star[i][j] * k).collect())
            } else {
                let k = c.exp();
                (
                    0.0,
                    (0..d).map(|j| y_hat[i][j] * k - y_star[i][j]).collect(),
                )
            };
            let nu = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            if !nu.is_finite() {
                candle::bail!("theory network gradient: non-finite residual for input {i}")
            }
            gamma[i] = scale + nu.ln();
            let inv = if nu > 0.0 { 1.0 / nu } else { 0.0 };
            r_unit.extend(r.iter().map(|v| v * inv));
        }
        let r_unit = Tensor::from_vec(r_unit, (n, d), &device)?.to_dtype(dtype)?;
        // ĝ_L = r̂ B, the (rescaled) gradient with respect to h_L.
        let mut g = r_unit.matmul(&self.b)?;
        let (gu, gn) = normalize_rows(&g)?;
        g = gu;
        add_logs(&mut gamma, &gn)?;

        let mut out = vec![0.0; last];
        for l in (1..=last).rev() {
            let mask = hs[l].gt(0.0)?.to_dtype(dtype)?;
            let gz = (&g * mask)?;
            // ∂loss/∂W_l = τ Σ_i e^{γ_i + c_{l−1,i}} ĝz_i ĥ_{l−1,i}ᵀ.
            let s: Vec<f64> = (0..n).map(|i| gamma[i] + log_h[l - 1][i]).collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            out[l - 1] = if m == f64::NEG_INFINITY {
                f64::NEG_INFINITY
            } else {
                let wts: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let f = weighted_outer_sum_norm(&gz, &hs[l - 1], &wts)?;
                self.tau.ln() + m + f.ln()
            };
            // ĝ_{l−1} = ĝz (I + τ W_l), renormalized.
            let back = (&gz + (gz.matmul(&self.ws[l - 1])? * self.tau)?)?;
            let (gu, gn) = normalize_rows(&back)?;
            g = gu;
            add_logs(&mut gamma, &gn)?;
        }
        Ok(out)
    }

    /// ‖∂loss/∂W_l‖_F for l = 1..L: the exponential of [`Self::layer_grad_log_norms`],
    /// so `+∞` only beyond f64's range (≈1e308); use the log form for such networks.
    /// See the [example](TheoryNet#example).
    ///
    /// # Errors
    /// As [`Self::layer_grad_log_norms`].
    pub fn layer_grad_norms(&self, xs: &Tensor, ys: &Tensor) -> Result<Vec<f64>> {
        Ok(self
            .layer_grad_log_norms(xs, ys)?
            .into_iter()
            .map(f64::exp)
            .collect())
    }
}

/// γ_i += ln ν_i for the (n, 1) norms ν.
fn add_logs(gamma: &mut [f64], norms: &Tensor) -> Result<()> {
    let v = norms
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    for (i, (g, nu)) in gamma.iter_mut().zip(v).enumerate() {
        if !nu.is_finite() {
            candle::bail!("theory network gradient: non-finite back-propagated norm for input {i}")
        }
        *g += nu.ln();
    }
    Ok(())
}

/// ‖Σ_i w_i a_i b_iᵀ‖_F for rows a_i, b_i of `a`, `b` (n, m) and weights w (n), in f64 at
/// the end: through the n×n Gram matrices when n ≤ m, else through the m×m sum itself.
fn weighted_outer_sum_norm(a: &Tensor, b: &Tensor, w: &[f64]) -> Result<f64> {
    let (n, m) = a.dims2()?;
    if n <= m {
        let ka = a.matmul(&a.t()?)?;
        let kb = b.matmul(&b.t()?)?;
        let k = (ka * kb)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut total = 0.0;
        for i in 0..n {
            for j in 0..n {
                total += w[i] * w[j] * k[i][j];
            }
        }
        Ok(total.max(0.0).sqrt())
    } else {
        let wt = Tensor::from_vec(w.to_vec(), (n, 1), &Device::Cpu)?
            .to_device(a.device())?
            .to_dtype(a.dtype())?;
        let g = a.broadcast_mul(&wt)?.t()?.matmul(b)?;
        let s = g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok(s.sqrt())
    }
}
