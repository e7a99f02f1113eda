//! Statistics of probe records: per-(τ rule, depth) summaries, the growth of the forward
//! norm with depth, and the critical exponent α* where growth sets in.
//!
//! The heuristic of PAPER.md: each block multiplies E‖h‖² by about (1 + cτ²), so with
//! τ = L^-α, ln E‖h_L‖/‖h_0‖ ≈ (c/2)·L^(1−2α): it grows with depth for α < 1/2 and stays
//! bounded for α ≥ 1/2. We fit the exponent γ of ln E‖h_L‖/‖h_0‖ ∝ L^γ for every α and
//! locate α* where γ crosses zero.

use std::collections::BTreeMap;

use tau_records::ProbeRecord;

use crate::records::PointState;
use crate::spec::display_value;

/// Depths below this are left out of the growth fits (the heuristic is asymptotic).
pub const FIT_MIN_DEPTH: usize = 16;
/// A τ rule "grows" when its fitted exponent γ exceeds this.
pub const GROWTH_TOLERANCE: f64 = 0.1;

/// Summary of a sample of log10 ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Sample size.
    pub n: usize,
    /// log10 of the mean ratio (computed stably in the log domain).
    pub log10_mean: f64,
    /// Median of the log10 values.
    pub median: f64,
    /// 10% quantile of the log10 values.
    pub q10: f64,
    /// 90% quantile of the log10 values.
    pub q90: f64,
}

impl Summary {
    /// Summarises log10 values; non-finite values are left out. An empty sample gives NaNs.
    pub fn of_log10(values: &[f64]) -> Summary {
        let mut xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        xs.sort_by(f64::total_cmp);
        if xs.is_empty() {
            return Summary {
                n: 0,
                log10_mean: f64::NAN,
                median: f64::NAN,
                q10: f64::NAN,
                q90: f64::NAN,
            };
        }
        let max = xs[xs.len() - 1];
        let sum: f64 = xs.iter().map(|x| 10f64.powf(x - max)).sum();
        Summary {
            n: xs.len(),
            log10_mean: max + (sum / xs.len() as f64).log10(),
            median: quantile(&xs, 0.5),
            q10: quantile(&xs, 0.1),
            q90: quantile(&xs, 0.9),
        }
    }
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// One τ rule's measurements at one depth, pooled over seeds.
#[derive(Debug, Clone)]
pub struct DepthStat {
    /// L.
    pub n_blocks: usize,
    /// Resolved τ.
    pub tau: f64,
    /// ‖h_L‖/‖h_0‖ (log10).
    pub forward: Summary,
    /// ‖∂W_1‖/‖∂W_L‖ (log10).
    pub backward: Summary,
}

/// A τ rule measured over depth (within one group of the non-depth, non-seed axes).
#[derive(Debug, Clone)]
pub struct RuleCurve {
    /// The τ rule as written.
    pub rule: String,
    /// α when the rule is L^-α.
    pub alpha: Option<f64>,
    /// The values of the other axes (empty in the default sweep).
    pub group: String,
    /// By increasing depth.
    pub depths: Vec<DepthStat>,
}

fn is_pooled_axis(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    matches!(last, "seed" | "seeds" | "depth" | "n_blocks")
}

/// Groups probe records into curves: one per (other axes, τ rule), pooling seeds.
#[allow(clippy::type_complexity)]
pub fn rule_curves(states: &[PointState]) -> Vec<RuleCurve> {
    type Key = (String, String);
    let mut acc: BTreeMap<Key, (Option<f64>, BTreeMap<usize, (f64, Vec<f64>, Vec<f64>)>)> =
        BTreeMap::new();
    let mut order: Vec<Key> = Vec::new();
    for s in states {
        let Some(p) = &s.probe else { continue };
        let group = s
            .point
            .values
            .iter()
            .filter(|(k, _)| !is_pooled_axis(k))
            .map(|(k, v)| format!("{k}={}", display_value(v)))
            .collect::<Vec<_>>()
            .join(", ");
        add_record(&mut acc, &mut order, &group, p);
    }
    order
        .into_iter()
        .filter_map(|key| {
            let (alpha, by_depth) = acc.remove(&key)?;
            Some(RuleCurve {
                rule: key.1,
                alpha,
                group: key.0,
                depths: by_depth
                    .into_iter()
                    .map(|(n_blocks, (tau, f, b))| DepthStat {
                        n_blocks,
                        tau,
                        forward: Summary::of_log10(&f),
                        backward: Summary::of_log10(&b),
                    })
                    .collect(),
            })
        })
        .collect()
}

#[allow(clippy::type_complexity)]
fn add_record(
    acc: &mut BTreeMap<(String, String), (Option<f64>, BTreeMap<usize, (f64, Vec<f64>, Vec<f64>)>)>,
    order: &mut Vec<(String, String)>,
    group: &str,
    p: &ProbeRecord,
) {
    for t in &p.taus {
        let key = (group.to_string(), t.rule.clone());
        let entry = acc.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            (t.alpha, BTreeMap::new())
        });
        let d = entry
            .1
            .entry(p.n_blocks)
            .or_insert((t.tau, Vec::new(), Vec::new()));
        d.1.extend_from_slice(&t.log10_ratio);
        d.2.extend_from_slice(&t.log10_grad_ratio);
    }
}

/// Least-squares line `y = a + b x`: returns `(a, b, standard error of b)`.
pub fn linear_fit(xs: &[f64], ys: &[f64]) -> Option<(f64, f64, f64)> {
    let n = xs.len();
    if n < 2 || n != ys.len() {
        return None;
    }
    let nf = n as f64;
    let mx = xs.iter().sum::<f64>() / nf;
    let my = ys.iter().sum::<f64>() / nf;
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let se = if n > 2 {
        let rss: f64 = xs
            .iter()
            .zip(ys)
            .map(|(x, y)| (y - a - b * x).powi(2))
            .sum();
        (rss / (nf - 2.0) / sxx).sqrt()
    } else {
        f64::NAN
    };
    Some((a, b, se))
}

/// The growth of one τ rule's forward norm with depth.
#[derive(Debug, Clone, Copy)]
pub struct Growth {
    /// Slope of ln E‖h_L‖/‖h_0‖ against L (nats per block), depths ≥ [`FIT_MIN_DEPTH`].
    pub slope_per_block: f64,
    /// γ in ln E‖h_L‖/‖h_0‖ ∝ L^γ (fit of ln ln E ratio on ln L), NaN when undefined.
    pub exponent: f64,
    /// Standard error of γ.
    pub exponent_se: f64,
    /// Depths used in the fit.
    pub n_fit: usize,
    /// ln E‖h_L‖/‖h_0‖ at the largest depth.
    pub ln_ratio_at_max: f64,
    /// γ > [`GROWTH_TOLERANCE`].
    pub grows: bool,
}

/// Fits the growth of a curve's forward norm.
pub fn growth(curve: &RuleCurve) -> Growth {
    let ln10 = std::f64::consts::LN_10;
    let mut pts: Vec<(f64, f64)> = curve
        .depths
        .iter()
        .filter(|d| d.n_blocks >= FIT_MIN_DEPTH && d.forward.log10_mean.is_finite())
        .map(|d| (d.n_blocks as f64, d.forward.log10_mean * ln10))
        .collect();
    if pts.len() < 3 {
        pts = curve
            .depths
            .iter()
            .filter(|d| d.forward.log10_mean.is_finite())
            .map(|d| (d.n_blocks as f64, d.forward.log10_mean * ln10))
            .collect();
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
    let slope_per_block = linear_fit(&xs, &ys).map_or(f64::NAN, |f| f.1);
    let (lx, ly): (Vec<f64>, Vec<f64>) = pts
        .iter()
        .filter(|(_, y)| *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .unzip();
    let (exponent, exponent_se) = if lx.len() >= 3 {
        linear_fit(&lx, &ly).map_or((f64::NAN, f64::NAN), |f| (f.1, f.2))
    } else {
        (f64::NAN, f64::NAN)
    };
    Growth {
        slope_per_block,
        exponent,
        exponent_se,
        n_fit: lx.len(),
        ln_ratio_at_max: pts.last().map_or(f64::NAN, |p| p.1),
        grows: exponent > GROWTH_TOLERANCE,
    }
}

/// Where growth sets in along α.
#[derive(Debug, Clone, PartialEq)]
pub struct CriticalExponent {
    /// `(α, γ(α))` for every L^-α rule with a defined γ, by increasing α.
    pub gamma_by_alpha: Vec<(f64, f64)>,
    /// α* where γ(α) first falls to zero (linear interpolation between grid values);
    /// `None` when γ never changes sign on the grid.
    pub crossing: Option<f64>,
    /// A straight-line fit γ ≈ a − b·α over the α in [`Self::line_range`]: `(a, b)`.
    pub line: Option<(f64, f64)>,
    /// The α range the line was fitted on.
    pub line_range: (f64, f64),
}

/// Locates α* from the curves of L^-α rules (one group).
pub fn critical_exponent(curves: &[&RuleCurve]) -> CriticalExponent {
    let mut gamma_by_alpha: Vec<(f64, f64)> = curves
        .iter()
        .filter_map(|c| Some((c.alpha?, growth(c).exponent)))
        .filter(|(_, g)| g.is_finite())
        .collect();
    gamma_by_alpha.sort_by(|a, b| a.0.total_cmp(&b.0));
    gamma_by_alpha.dedup_by(|a, b| a.0 == b.0);
    let crossing = gamma_by_alpha.windows(2).find_map(|w| {
        let ((a0, g0), (a1, g1)) = (w[0], w[1]);
        (g0 > 0.0 && g1 <= 0.0).then(|| a0 + (a1 - a0) * g0 / (g0 - g1))
    });
    // The line is fitted where γ is well measured: up to the first α past the crossing
    // by 0.25 (beyond, ln E ratio is tiny and the fit of its logarithm is noise).
    let hi = crossing.map_or(f64::INFINITY, |c| c + 0.25);
    let near: Vec<(f64, f64)> = gamma_by_alpha
        .iter()
        .copied()
        .filter(|(a, _)| *a <= hi)
        .collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) = near.iter().copied().unzip();
    let line = linear_fit(&xs, &ys).map(|(a, b, _)| (a, -b));
    let line_range = (
        xs.first().copied().unwrap_or(f64::NAN),
        xs.last().copied().unwrap_or(f64::NAN),
    );
    CriticalExponent {
        gamma_by_alpha,
        crossing,
        line,
        line_range,
    }
}

/// Formats a log10 value as a plain number (`1.69`, `1.6e31`), beyond f64's range too.
pub fn fmt_log10(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_string();
    }
    if x.abs() < 3.0 {
        let v = 10f64.powf(x);
        return if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        };
    }
    let mut e = x.floor();
    let mut m = 10f64.powf(x - e);
    if m >= 9.95 {
        m /= 10.0;
        e += 1.0;
    }
    format!("{m:.1}e{e:.0}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::records::Status;
    use crate::spec::Point;
    use tau_records::{PROBE_FORMAT, ProbeTau};

    /// Synthetic probe records where ln ratio = c·L^(2(α*−α)) (+ small deterministic
    /// noise), for α on the default sweep's grid.
    pub(crate) fn planted(alpha_star: f64) -> Vec<PointState> {
        let mut states = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut noise = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for k in 0..13 {
            let depth = 1usize << k;
            for seed in 0..3u64 {
                let taus = (0..16)
                    .map(|i| {
                        let alpha = 0.25 + 0.05 * i as f64;
                        let ln_ratio = 0.5 * (depth as f64).powf(2.0 * (alpha_star - alpha));
                        ProbeTau {
                            rule: format!("L^-{alpha:.2}"),
                            alpha: Some(alpha),
                            tau: (depth as f64).powf(-alpha),
                            log10_ratio: (0..8)
                                .map(|_| {
                                    ln_ratio * (1.0 + 0.02 * noise()) / std::f64::consts::LN_10
                                })
                                .collect(),
                            log10_grad_ratio: vec![0.0; 8],
                            block_log10_ratio_median: Vec::new(),
                            block_log10_grad_median: Vec::new(),
                        }
                    })
                    .collect();
                states.push(PointState {
                    point: Point {
                        name: format!("depth-{depth}_seed-{seed}"),
                        values: vec![
                            ("model.depth".into(), toml::Value::Integer(depth as i64)),
                            ("seed".into(), toml::Value::Integer(seed as i64)),
                        ],
                    },
                    dir: std::path::PathBuf::new(),
                    status: Status::Finished,
                    message: None,
                    summary: None,
                    probe: Some(ProbeRecord {
                        format: PROBE_FORMAT.into(),
                        family: "theory".into(),
                        n_blocks: depth,
                        seeds: vec![seed],
                        n_inputs: 8,
                        blocks: Vec::new(),
                        taus,
                        wall_s: 0.0,
                        version: "0.1.0".into(),
                    }),
                });
            }
        }
        states
    }

    #[test]
    fn summary_of_log10_values() {
        // ratios 1, 10, 100: mean 37, median 10.
        let s = Summary::of_log10(&[0.0, 1.0, 2.0, f64::NAN]);
        assert_eq!(s.n, 3);
        assert!((s.log10_mean - 37f64.log10()).abs() < 1e-12);
        assert_eq!(s.median, 1.0);
        assert!((s.q10 - 0.2).abs() < 1e-12);
        // far beyond f64's range, the mean stays finite in the log domain.
        let s = Summary::of_log10(&[500.0, 500.0]);
        assert!((s.log10_mean - 500.0).abs() < 1e-12);
    }

    #[test]
    fn alpha_star_estimator_recovers_a_planted_threshold() {
        for alpha_star in [0.5, 0.35, 0.62] {
            let states = planted(alpha_star);
            let curves = rule_curves(&states);
            assert_eq!(curves.len(), 16);
            assert_eq!(curves[0].depths.len(), 13);
            assert_eq!(curves[0].depths[0].forward.n, 24);
            let refs: Vec<&RuleCurve> = curves.iter().collect();
            let crit = critical_exponent(&refs);
            let found = crit.crossing.unwrap();
            assert!(
                (found - alpha_star).abs() < 0.02,
                "planted {alpha_star}, found {found}"
            );
            let (a, b) = crit.line.unwrap();
            assert!((a / b - alpha_star).abs() < 0.02, "line {a} {b}");
            assert!((b - 2.0).abs() < 0.1, "slope {b}");
            // rules well below α* grow, rules above stay bounded.
            let low = curves.iter().find(|c| c.alpha == Some(0.25)).unwrap();
            let high = curves.iter().find(|c| c.alpha == Some(1.0)).unwrap();
            assert!(growth(low).grows == (alpha_star > 0.25 + GROWTH_TOLERANCE / 2.0));
            assert!(!growth(high).grows);
        }
    }

    #[test]
    fn growth_of_exponential_blowup_is_linear_in_depth() {
        // τ = 1: ln ratio = 0.27 L exactly.
        let curve = RuleCurve {
            rule: "1".into(),
            alpha: None,
            group: String::new(),
            depths: (0..13)
                .map(|k| {
                    let l = 1usize << k;
                    let v = 0.27 * l as f64 / std::f64::consts::LN_10;
                    DepthStat {
                        n_blocks: l,
                        tau: 1.0,
                        forward: Summary::of_log10(&[v]),
                        backward: Summary::of_log10(&[0.0]),
                    }
                })
                .collect(),
        };
        let g = growth(&curve);
        assert!((g.slope_per_block - 0.27).abs() < 1e-9);
        assert!((g.exponent - 1.0).abs() < 1e-9);
        assert!(g.grows);
    }

    #[test]
    fn log10_formatting() {
        assert_eq!(fmt_log10(0.0), "1.000");
        assert_eq!(fmt_log10(31.2), "1.6e31");
        assert_eq!(fmt_log10(490.0), "1.0e490");
        assert_eq!(fmt_log10(-5.0), "1.0e-5");
        assert_eq!(fmt_log10(f64::NAN), "–");
    }
}
