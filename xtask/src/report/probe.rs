//! The report of a probe sweep: norm and gradient-ratio tables by depth, the growth fit
//! of every τ rule, α*, and their figures.

use std::fmt::Write as _;
use std::path::Path;

use super::sanitize_file;
use crate::analysis::{self, RuleCurve, fmt_log10};
use crate::figures::{Chart, Series, YAxis};
use crate::records::PointState;
use crate::spec::SweepSpec;

fn rule_label(c: &RuleCurve) -> String {
    let rule = match c.rule.as_str() {
        "1" => "τ = 1".to_string(),
        r => format!("τ = {r}"),
    };
    if c.group.is_empty() {
        rule
    } else {
        format!("{rule} ({})", c.group)
    }
}

pub(super) fn probe_report(
    spec: &SweepSpec,
    states: &[PointState],
    fig_dir: &Path,
    md: &mut String,
) -> Vec<(String, Chart)> {
    let _ = fig_dir;
    let curves = analysis::rule_curves(states);
    if curves.is_empty() {
        let _ = writeln!(md, "No probe records yet.\n");
        return Vec::new();
    }
    let rules: Vec<&str> = curves.iter().map(|c| c.rule.as_str()).collect();
    if let Some(note) = identity_schemes_note(&rules) {
        let _ = writeln!(md, "{note}\n");
    }
    let featured: Vec<&RuleCurve> = if spec.report.rules.is_empty() {
        curves.iter().collect()
    } else {
        spec.report
            .rules
            .iter()
            .flat_map(|r| curves.iter().filter(move |c| &c.rule == r))
            .collect()
    };
    let depths: Vec<usize> = {
        let mut d: Vec<usize> = curves
            .iter()
            .flat_map(|c| c.depths.iter().map(|d| d.n_blocks))
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    };
    let mut figs = forward_section(md, &curves, &featured, &depths);
    figs.extend(backward_section(md, &featured, &depths));
    growth_section(md, &curves, &depths);
    let groups: Vec<String> = {
        let mut g: Vec<String> = curves.iter().map(|c| c.group.clone()).collect();
        g.dedup();
        g
    };
    for group in groups {
        let power: Vec<&RuleCurve> = curves
            .iter()
            .filter(|c| c.group == group && c.alpha.is_some())
            .collect();
        if power.len() >= 3 {
            figs.extend(critical_exponent_section(md, &group, &power));
        }
    }
    figs
}

/// What the probe measures for the residual-scaling schemes that start every block as the
/// identity (their rows are named after the scheme), said plainly: `None` when no such
/// row is probed.
fn identity_schemes_note(rules: &[&str]) -> Option<String> {
    let mut schemes: Vec<&str> = ["skipinit", "rezero", "fixup"]
        .into_iter()
        .filter(|s| rules.contains(s))
        .collect();
    if schemes.is_empty() {
        return None;
    }
    schemes.sort_unstable();
    let list: Vec<String> = schemes.iter().map(|s| format!("`{s}`")).collect();
    Some(format!(
        "**At initialization the {} rows measure the identity.** SkipInit and ReZero start \
         every block at α = 0, Fixup with the last convolution of every branch at 0: each block \
         passes its input through unchanged, so |h_l|/|h_0| is 1 exactly at every block with \
         an identity shortcut and changes only at the option-A shortcuts where a stage \
         subsamples, whatever the depth; SkipInit's and ReZero's blocks have only α's \
         gradient, and Fixup's zero classifier lets none reach the blocks. These rows say \
         nothing about depth; the schemes differ once training moves the branches: \
         `tau-resnet probe --checkpoint RUN_DIR` probes a trained run's weights.",
        list.join(", ")
    ))
}

/// One series per curve of `f(depth stat)` = (value, band low, band high) against L.
fn band_series(
    f: &dyn Fn(&analysis::DepthStat) -> (f64, f64, f64),
    cs: &[&RuleCurve],
) -> Vec<Series> {
    cs.iter()
        .map(|c| Series {
            label: rule_label(c),
            points: c
                .depths
                .iter()
                .map(|d| (d.n_blocks as f64, f(d).0))
                .collect(),
            band: c
                .depths
                .iter()
                .map(|d| (d.n_blocks as f64, f(d).1, f(d).2))
                .collect(),
            dashed: false,
        })
        .collect()
}

/// The forward-norm table and its two figures.
fn forward_section(
    md: &mut String,
    curves: &[RuleCurve],
    featured: &[&RuleCurve],
    depths: &[usize],
) -> Vec<(String, Chart)> {
    let n_samples = curves[0].depths.first().map_or(0, |d| d.forward.n);
    let mut figs = Vec::new();
    // Forward table.
    let _ = writeln!(md, "## Forward pass: ‖h_L‖/‖h_0‖ at initialization\n");
    let _ = writeln!(
        md,
        "Mean over inputs and seeds ({n_samples} samples per cell at the smallest depth), with the \
         10%–90% range of the per-input ratios in brackets. L is the number of residual blocks.\n"
    );
    table_by_depth(md, featured, depths, |d| {
        format!(
            "{} [{}, {}]",
            fmt_log10(d.forward.log10_mean),
            fmt_log10(d.forward.q10),
            fmt_log10(d.forward.q90)
        )
    });
    let _ = writeln!(
        md,
        "\n![norm ratio vs depth](figures/norm_ratio_vs_depth.png)\n"
    );
    let _ = writeln!(
        md,
        "![norm ratio vs depth, bounded range](figures/norm_ratio_vs_depth_zoom.png)\n"
    );
    let fwd = |d: &analysis::DepthStat| (d.forward.log10_mean, d.forward.q10, d.forward.q90);
    figs.push((
        "norm_ratio_vs_depth".to_string(),
        Chart {
            title: "Forward norm at initialization vs depth".into(),
            x_desc: "depth L (residual blocks, log scale)".into(),
            y_desc: "mean ‖h_L‖/‖h_0‖ (log scale; band: 10–90% of inputs)".into(),
            x_log: true,
            y_axis: YAxis::Log10Values,
            y_range: None,
            series: band_series(&fwd, featured),
            vlines: Vec::new(),
            hlines: vec![0.0],
        },
    ));
    figs.push((
        "norm_ratio_vs_depth_zoom".to_string(),
        Chart {
            title: "Forward norm vs depth, bounded range (ratio 0.8–4)".into(),
            x_desc: "depth L (residual blocks, log scale)".into(),
            y_desc: "mean ‖h_L‖/‖h_0‖ (linear scale)".into(),
            x_log: true,
            y_axis: YAxis::Linear,
            y_range: Some((0.8, 4.0)),
            series: band_series(&fwd, featured)
                .into_iter()
                .map(|mut s| {
                    s.band.clear();
                    for p in &mut s.points {
                        p.1 = 10f64.powf(p.1);
                    }
                    s
                })
                .collect(),
            vlines: Vec::new(),
            hlines: vec![1.0],
        },
    ));

    figs
}

/// The backward gradient-ratio table and its figure, when the records have gradients.
fn backward_section(
    md: &mut String,
    featured: &[&RuleCurve],
    depths: &[usize],
) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let has_grad = featured
        .iter()
        .any(|c| c.depths.iter().any(|d| d.backward.n > 0));
    if has_grad {
        let _ = writeln!(
            md,
            "## Backward pass: ‖∂ℓ/∂W_1‖/‖∂ℓ/∂W_L‖ at initialization\n"
        );
        let _ = writeln!(
            md,
            "Gradient norm of the first block's weights relative to the last block's, per input \
             (the squared loss of one input; for one output the ratio does not depend on the \
             target). Median over inputs and seeds, 10%–90% range in brackets.\n"
        );
        table_by_depth(md, featured, depths, |d| {
            format!(
                "{} [{}, {}]",
                fmt_log10(d.backward.median),
                fmt_log10(d.backward.q10),
                fmt_log10(d.backward.q90)
            )
        });
        let _ = writeln!(
            md,
            "\n![gradient ratio vs depth](figures/grad_ratio_vs_depth.png)\n"
        );
        let bwd = |d: &analysis::DepthStat| (d.backward.median, d.backward.q10, d.backward.q90);
        figs.push((
            "grad_ratio_vs_depth".to_string(),
            Chart {
                title: "Backward: first-block vs last-block gradient norm".into(),
                x_desc: "depth L (residual blocks, log scale)".into(),
                y_desc: "median ‖∂ℓ/∂W_1‖/‖∂ℓ/∂W_L‖ (log scale)".into(),
                x_log: true,
                y_axis: YAxis::Log10Values,
                y_range: None,
                series: band_series(&bwd, featured),
                vlines: Vec::new(),
                hlines: vec![0.0],
            },
        ));
    }

    figs
}

/// The table of every rule's growth fit.
fn growth_section(md: &mut String, curves: &[RuleCurve], depths: &[usize]) {
    let _ = writeln!(md, "## Growth with depth, per τ rule\n");
    let _ = writeln!(
        md,
        "For each rule, ln E‖h_L‖/‖h_0‖ (E: the mean above) is fitted against depth over \
         L ≥ {min} (all depths when fewer than three are that deep): the slope against L \
         (nats per block: constant for an exponential blow-up), and the exponent γ of \
         ln E‖h_L‖/‖h_0‖ ∝ L^γ (least squares of ln ln E ratio on ln L, points with \
         E ratio > 1). A rule **grows** when γ > {tol}: its log-norm increases as a power of \
         the depth, without bound. Otherwise it is **bounded**.\n",
        min = analysis::FIT_MIN_DEPTH,
        tol = analysis::GROWTH_TOLERANCE,
    );
    let _ = writeln!(
        md,
        "| τ rule | α | τ at L = {0} | E ratio at L = {0} | slope (nats/block) | γ ± s.e. (depths fitted) | verdict |\n| --- | --- | --- | --- | --- | --- | --- |",
        depths.last().copied().unwrap_or(0)
    );
    for c in curves {
        let g = analysis::growth(c);
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {} | {:.3e} | {} | {} |",
            rule_label(c),
            c.alpha.map_or("–".into(), |a| format!("{a:.2}")),
            c.depths.last().map_or(f64::NAN, |d| d.tau),
            fmt_log10(g.ln_ratio_at_max / std::f64::consts::LN_10),
            g.slope_per_block,
            if depths.len() < 3 {
                format!("– ({} depths; a fit needs 3)", depths.len())
            } else if g.exponent.is_finite() {
                format!("{:.3} ± {:.3} ({})", g.exponent, g.exponent_se, g.n_fit)
            } else {
                "– (ratio ≈ 1)".into()
            },
            match (depths.len() < 3, g.grows) {
                (true, _) => "too few depths",
                (false, true) => "grows",
                (false, false) => "bounded",
            }
        );
    }
}

/// The α* estimate of one group of τ = L^-α rules (at least three), its table and
/// figures.
fn critical_exponent_section(
    md: &mut String,
    group: &str,
    power: &[&RuleCurve],
) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let crit = analysis::critical_exponent(power);
    let suffix = if group.is_empty() {
        String::new()
    } else {
        format!(" ({group})")
    };
    let _ = writeln!(md, "\n## Critical exponent α*{suffix}\n");
    let _ = writeln!(
        md,
        "Method: for every rule τ = L^-α the growth exponent γ(α) is fitted as above. The \
         heuristic of PAPER.md (each block multiplies E‖h‖² by about 1 + cτ²) predicts \
         ln E‖h_L‖/‖h_0‖ ≈ (c/2)·L^(1−2α), i.e. γ = 1 − 2α: growth for α < 1/2, bounded \
         for α ≥ 1/2. α* is where the measured γ(α) first falls to zero, interpolated \
         linearly between neighbouring grid values of α. As a check, a straight line \
         γ ≈ a − b·α is fitted to γ(α) on α ∈ [{:.2}, {:.2}] (beyond, ln E ratio is too \
         close to 0 for its logarithm to be measured), giving α* = a/b. The paper's \
         claim: α* = 0.5.\n",
        crit.line_range.0, crit.line_range.1
    );
    match crit.crossing {
        Some(a) => {
            let _ = writeln!(md, "**Measured α* = {a:.3}** (zero crossing of γ(α)).\n");
        }
        None => {
            let _ = writeln!(
                md,
                "γ(α) does not change sign on this grid: α* is outside [{:.2}, {:.2}].\n",
                crit.gamma_by_alpha.first().map_or(f64::NAN, |p| p.0),
                crit.gamma_by_alpha.last().map_or(f64::NAN, |p| p.0)
            );
        }
    }
    if let Some((a, b)) = crit.line {
        let _ = writeln!(
            md,
            "Line fit: γ ≈ {a:.3} − {b:.3}·α, so α* = {:.3} (theory: γ = 1 − 2α, α* = 0.5).\n",
            a / b
        );
    }
    let _ = writeln!(md, "| α | γ(α) |\n| --- | --- |");
    for (a, g) in &crit.gamma_by_alpha {
        let _ = writeln!(md, "| {a:.2} | {g:.3} |");
    }
    let stem = if group.is_empty() {
        "growth_vs_alpha".to_string()
    } else {
        format!("growth_vs_alpha_{}", sanitize_file(group))
    };
    let _ = writeln!(md, "\n![growth exponent vs alpha](figures/{stem}.png)\n");
    let (lo, hi) = (
        crit.gamma_by_alpha.first().map_or(0.0, |p| p.0),
        crit.gamma_by_alpha.last().map_or(1.0, |p| p.0),
    );
    let mut vlines = Vec::new();
    if let Some(a) = crit.crossing {
        vlines.push((a, format!("measured α* = {a:.3}")));
    }
    figs.push((
        stem,
        Chart {
            title: "Growth exponent of ln E‖h_L‖/‖h_0‖ vs α (τ = L^-α)".into(),
            x_desc: "α (τ = L^-α)".into(),
            y_desc: "γ: ln E‖h_L‖/‖h_0‖ ∝ L^γ".into(),
            x_log: false,
            y_axis: YAxis::Linear,
            y_range: None,
            series: vec![
                Series::new("measured γ(α)", crit.gamma_by_alpha.clone()),
                Series {
                    label: "theory: γ = 1 − 2α".into(),
                    points: vec![(lo, 1.0 - 2.0 * lo), (hi, 1.0 - 2.0 * hi)],
                    band: Vec::new(),
                    dashed: true,
                },
            ],
            vlines,
            hlines: vec![0.0],
        },
    ));
    figs.push(alpha_figure(md, group, power));
    figs
}

/// Every α of a group on one chart: the forward norm against depth, the transition at a
/// glance.
fn alpha_figure(md: &mut String, group: &str, power: &[&RuleCurve]) -> (String, Chart) {
    let mut by_alpha = power.to_vec();
    by_alpha.sort_by(|a, b| a.alpha.unwrap_or(0.0).total_cmp(&b.alpha.unwrap_or(0.0)));
    by_alpha.dedup_by(|a, b| a.alpha == b.alpha);
    let stem = if group.is_empty() {
        "norm_ratio_vs_depth_alpha".to_string()
    } else {
        format!("norm_ratio_vs_depth_alpha_{}", sanitize_file(group))
    };
    let _ = writeln!(
        md,
        "![norm ratio vs depth for every alpha](figures/{stem}.png)\n"
    );
    (
        stem,
        Chart {
            title: "Forward norm vs depth for τ = L^-α".into(),
            x_desc: "depth L (residual blocks, log scale)".into(),
            y_desc: "mean ‖h_L‖/‖h_0‖ (log scale)".into(),
            x_log: true,
            y_axis: YAxis::Log10Values,
            y_range: None,
            series: by_alpha
                .iter()
                .map(|c| {
                    Series::new(
                        format!("α = {:.2}", c.alpha.unwrap_or(f64::NAN)),
                        c.depths
                            .iter()
                            .map(|d| (d.n_blocks as f64, d.forward.log10_mean))
                            .collect(),
                    )
                })
                .collect(),
            vlines: Vec::new(),
            hlines: vec![0.0],
        },
    )
}

fn table_by_depth(
    md: &mut String,
    curves: &[&RuleCurve],
    depths: &[usize],
    cell: impl Fn(&analysis::DepthStat) -> String,
) {
    let _ = write!(md, "| L |");
    for c in curves {
        let _ = write!(md, " {} |", rule_label(c));
    }
    let _ = write!(md, "\n| --- |");
    for _ in curves {
        let _ = write!(md, " --- |");
    }
    let _ = writeln!(md);
    for &l in depths {
        let _ = write!(md, "| {l} |");
        for c in curves {
            let text = c
                .depths
                .iter()
                .find(|d| d.n_blocks == l)
                .map_or("–".into(), &cell);
            let _ = write!(md, " {text} |");
        }
        let _ = writeln!(md);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scheme rows get the plain statement that they measure the identity at
    /// initialization; τ rules alone get none.
    #[test]
    fn identity_schemes_are_named_in_the_note() {
        assert_eq!(identity_schemes_note(&["1", "1/sqrt(L)"]), None);
        let note = identity_schemes_note(&["1/sqrt(L)", "rezero", "fixup"]).unwrap();
        assert!(
            note.starts_with(
                "**At initialization the `fixup`, `rezero` rows measure the identity.**"
            ),
            "{note}"
        );
        assert!(note.contains("|h_l|/|h_0| is 1 exactly") && note.contains("--checkpoint"));
    }
}
