//! `cargo xtask report runs/<sweep>`: regenerates `results.csv`, `report.md` and
//! `figures/` from a sweep's stored config and its run records alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::aggregate;
use crate::analysis::{self, RuleCurve, fmt_log10};
use crate::figures::{Chart, Series, YAxis};
use crate::records::{self, PointState, SWEEP_COPY, Status, write_atomic};
use crate::spec::{RunCommand, SweepSpec, display_value};

/// Arguments of `cargo xtask report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The sweep's output folder, e.g. `runs/stability`.
    pub dir: PathBuf,
    /// Also copy the figures (SVG) into this folder, e.g. `docs/figures/stability` for
    /// the figures that docs/RESULTS.md shows.
    #[arg(long)]
    pub figures_out: Option<PathBuf>,
}

/// Runs `cargo xtask report`.
///
/// # Errors
/// A folder without a stored sweep config, or I/O errors.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let out = generate(&args.dir)?;
    if let Some(dest) = &args.figures_out {
        let n = publish_figures(&args.dir.join("figures"), dest)?;
        println!("copied {n} figures (SVG) to {}", dest.display());
    }
    println!("{}", out.summary_line);
    println!("wrote {}", args.dir.join("results.csv").display());
    println!("wrote {}", args.dir.join("report.md").display());
    println!(
        "wrote {} figures under {}",
        out.n_figures,
        args.dir.join("figures").display()
    );
    Ok(())
}

/// Copies the SVG figures of `src` into `dest` (created if needed), replacing files of
/// the same name; returns how many were copied.
///
/// # Errors
/// I/O errors, or `src` without any SVG figure.
pub fn publish_figures(src: &Path, dest: &Path) -> anyhow::Result<usize> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    names.sort();
    if names.is_empty() {
        anyhow::bail!("{} holds no SVG figure to copy", src.display());
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for path in &names {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().unwrap_or_default();
        write_atomic(&dest.join(name), &bytes)?;
    }
    Ok(names.len())
}

/// What [`generate`] produced.
#[derive(Debug)]
pub struct Generated {
    /// Every point's state, in grid order.
    pub states: Vec<PointState>,
    /// One line: counts per status.
    pub summary_line: String,
    /// Figures drawn (each as PNG and SVG).
    pub n_figures: usize,
}

/// Loads the stored sweep config of a sweep folder.
///
/// # Errors
/// Missing or invalid `sweep.toml`.
pub fn load_stored_spec(root: &Path) -> anyhow::Result<SweepSpec> {
    let path = root.join(SWEEP_COPY);
    if !path.exists() {
        anyhow::bail!(
            "{} has no {SWEEP_COPY}: not a sweep folder written by `cargo xtask sweep`",
            root.display()
        );
    }
    SweepSpec::from_file(&path)
}

/// Writes `results.csv`, `report.md` and the figures of the sweep in `root`.
///
/// # Errors
/// Missing stored config or I/O errors. A figure that cannot be drawn is reported in the
/// report rather than failing the whole report.
pub fn generate(root: &Path) -> anyhow::Result<Generated> {
    let spec = load_stored_spec(root)?;
    let states = records::read_sweep(&spec, root)?;
    let csv = records::results_csv(&spec, &states)?;
    write_atomic(&root.join("results.csv"), &csv)?;
    let fig_dir = root.join("figures");
    std::fs::create_dir_all(&fig_dir).with_context(|| format!("creating {}", fig_dir.display()))?;
    let mut md = String::new();
    let summary_line = status_line(&states);
    let _ = writeln!(md, "# Sweep `{}`\n", spec.name);
    if let Some(d) = &spec.description {
        let _ = writeln!(md, "{}\n", d.trim());
    }
    let _ = writeln!(
        md,
        "Command: `tau-resnet {}` per point, {} points over {}. {summary_line}.\n\
         Per-point records are in `<point>/`; one row per {} in `results.csv`.\n",
        spec.command,
        states.len(),
        spec.axes
            .iter()
            .map(|a| format!("`{}` ({} values)", a.key, a.values.len()))
            .collect::<Vec<_>>()
            .join(" × "),
        match spec.command {
            RunCommand::Probe => "(point, τ rule)",
            RunCommand::Train => "point",
        }
    );
    let figures = match spec.command {
        RunCommand::Probe => probe_report(&spec, &states, &fig_dir, &mut md),
        RunCommand::Train => train_report(&spec, &states, &fig_dir, &mut md),
    };
    let mut n_figures = 0;
    for (name, chart) in figures {
        match chart.save(&fig_dir.join(&name)) {
            Ok(()) => n_figures += 1,
            Err(err) => {
                let _ = writeln!(md, "\nFigure `{name}` could not be drawn: {err:#}\n");
            }
        }
    }
    failures_section(&states, &mut md);
    write_atomic(&root.join("report.md"), md.as_bytes())?;
    Ok(Generated {
        states,
        summary_line,
        n_figures,
    })
}

fn status_line(states: &[PointState]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in states {
        *counts.entry(s.status.as_str()).or_default() += 1;
    }
    let order = ["finished", "diverged", "interrupted", "failed", "pending"];
    order
        .iter()
        .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn failures_section(states: &[PointState], md: &mut String) {
    let bad: Vec<&PointState> = states
        .iter()
        .filter(|s| {
            matches!(
                s.status,
                Status::Failed | Status::Pending | Status::Interrupted
            )
        })
        .collect();
    if bad.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Points without a result\n");
    let _ = writeln!(md, "| point | status | cause |\n| --- | --- | --- |");
    for s in bad {
        let cause = s.message.clone().unwrap_or_else(|| match s.status {
            Status::Pending => "not run yet (or stopped before it wrote a record)".into(),
            Status::Interrupted => "interrupted; resumed by the next `cargo xtask sweep`".into(),
            _ => String::new(),
        });
        let _ = writeln!(
            md,
            "| `{}` | {} | {} |",
            s.point.name,
            s.status,
            cause.replace('|', "\\|")
        );
    }
}

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

fn probe_report(
    spec: &SweepSpec,
    states: &[PointState],
    fig_dir: &Path,
    md: &mut String,
) -> Vec<(String, Chart)> {
    let _ = fig_dir;
    let curves = analysis::rule_curves(states);
    let mut figs = Vec::new();
    if curves.is_empty() {
        let _ = writeln!(md, "No probe records yet.\n");
        return figs;
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
    let n_samples = curves[0].depths.first().map_or(0, |d| d.forward.n);

    // Forward table.
    let _ = writeln!(md, "## Forward pass: ‖h_L‖/‖h_0‖ at initialization\n");
    let _ = writeln!(
        md,
        "Mean over inputs and seeds ({n_samples} samples per cell at the smallest depth), with the \
         10%–90% range of the per-input ratios in brackets. L is the number of residual blocks.\n"
    );
    table_by_depth(md, &featured, &depths, |d| {
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
    let series = |f: &dyn Fn(&analysis::DepthStat) -> (f64, f64, f64), cs: &[&RuleCurve]| {
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
            .collect::<Vec<_>>()
    };
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
            series: series(&fwd, &featured),
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
            series: series(&fwd, &featured)
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

    // Backward.
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
        table_by_depth(md, &featured, &depths, |d| {
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
                series: series(&bwd, &featured),
                vlines: Vec::new(),
                hlines: vec![0.0],
            },
        ));
    }

    // Growth per rule.
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
    for c in &curves {
        let g = analysis::growth(c);
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {} | {:.3e} | {} | {} |",
            rule_label(c),
            c.alpha.map_or("–".into(), |a| format!("{a:.2}")),
            c.depths.last().map_or(f64::NAN, |d| d.tau),
            fmt_log10(g.ln_ratio_at_max / std::f64::consts::LN_10),
            g.slope_per_block,
            if g.exponent.is_finite() {
                format!("{:.3} ± {:.3} ({})", g.exponent, g.exponent_se, g.n_fit)
            } else {
                "– (ratio ≈ 1)".into()
            },
            if g.grows { "grows" } else { "bounded" }
        );
    }

    // α*.
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
        if power.len() < 3 {
            continue;
        }
        let crit = analysis::critical_exponent(&power);
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
            format!("growth_vs_alpha_{}", sanitize_file(&group))
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
        // Every α on one chart: the transition at a glance.
        let mut by_alpha = power.clone();
        by_alpha.sort_by(|a, b| a.alpha.unwrap_or(0.0).total_cmp(&b.alpha.unwrap_or(0.0)));
        by_alpha.dedup_by(|a, b| a.alpha == b.alpha);
        let stem = if group.is_empty() {
            "norm_ratio_vs_depth_alpha".to_string()
        } else {
            format!("norm_ratio_vs_depth_alpha_{}", sanitize_file(&group))
        };
        let _ = writeln!(
            md,
            "![norm ratio vs depth for every alpha](figures/{stem}.png)\n"
        );
        figs.push((
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
        ));
    }
    figs
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

fn sanitize_file(s: &str) -> String {
    crate::spec::sanitize(s)
}

/// Keys whose last component names the depth or the seed.
fn axis_role(key: &str) -> Option<&'static str> {
    match key.rsplit('.').next().unwrap_or(key) {
        "depth" => Some("depth"),
        "seed" => Some("seed"),
        _ => None,
    }
}

/// Reads `(step, train loss)` pairs from a run's `metrics.jsonl`.
fn loss_curve(dir: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join(tau_records::METRICS_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let step = v.get("step")?.as_f64()?;
            let loss = ["train_loss", "loss"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_f64()))?;
            Some((step, loss))
        })
        .collect()
}

/// Picks a test-accuracy number out of a flattened summary.
fn accuracy(flat: &BTreeMap<String, String>, preferred: Option<&str>) -> Option<(String, f64)> {
    let keys: Vec<&str> = match preferred {
        Some(k) => vec![k],
        // tau-resnet train's summary.json: the last metrics record, then the best test
        // accuracy over the run.
        None => vec!["final_metrics.test_acc", "best_test_acc"],
    };
    keys.iter()
        .find_map(|k| {
            flat.get(*k)
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| (k.to_string(), v))
        })
        .or_else(|| {
            flat.iter()
                .filter(|(k, _)| k.contains("test") && k.contains("acc"))
                .find_map(|(k, v)| v.parse::<f64>().ok().map(|x| (k.clone(), x)))
        })
}

fn train_report(
    spec: &SweepSpec,
    states: &[PointState],
    _fig_dir: &Path,
    md: &mut String,
) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    // Results table: axes, status, loss/accuracy numbers.
    let flat: Vec<BTreeMap<String, String>> = states
        .iter()
        .map(|s| {
            s.summary
                .as_ref()
                .map(records::summary_scalars)
                .unwrap_or_default()
        })
        .collect();
    let mut cols: Vec<String> = flat
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| {
            (k.contains("loss") || k.contains("acc") || k.contains("diverged")) && !k.contains("lr")
        })
        .cloned()
        .collect();
    cols.sort();
    cols.dedup();
    cols.truncate(8);
    let _ = writeln!(md, "## Results\n");
    let _ = write!(md, "| point |");
    for a in &spec.axes {
        let _ = write!(md, " {} |", a.key);
    }
    let _ = write!(md, " status |");
    for c in &cols {
        let _ = write!(md, " {c} |");
    }
    let _ = write!(md, "\n| --- |");
    for _ in 0..spec.axes.len() + 1 + cols.len() {
        let _ = write!(md, " --- |");
    }
    let _ = writeln!(md);
    for (s, m) in states.iter().zip(&flat) {
        let _ = write!(md, "| `{}` |", s.point.name);
        for (_, v) in &s.point.values {
            let _ = write!(md, " {} |", display_value(v));
        }
        let _ = write!(md, " {} |", s.status);
        for c in &cols {
            let v = m.get(c).map(String::as_str).unwrap_or("");
            let short = if v.parse::<i64>().is_ok() {
                v.to_string()
            } else {
                v.parse::<f64>()
                    .map_or(v.to_string(), |x| format!("{x:.4}"))
            };
            let _ = write!(md, " {short} |");
        }
        let _ = writeln!(md);
    }

    // Group points by the axes other than depth and seed.
    let group_of = |s: &PointState| {
        s.point
            .values
            .iter()
            .filter(|(k, _)| axis_role(k).is_none())
            .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), display_value(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let depth_of = |s: &PointState| {
        s.point
            .values
            .iter()
            .find(|(k, _)| axis_role(k) == Some("depth"))
            .and_then(|(_, v)| v.as_integer())
    };
    let seed_of = |s: &PointState| {
        s.point
            .values
            .iter()
            .find(|(k, _)| axis_role(k) == Some("seed"))
            .map(|(_, v)| display_value(v))
    };
    let mut groups: Vec<String> = states.iter().map(group_of).collect();
    groups.sort();
    groups.dedup();

    // Loss vs step: one figure per group, one line per depth (first seed).
    for g in &groups {
        let mut series = Vec::new();
        let first_seed = states
            .iter()
            .filter(|s| &group_of(s) == g)
            .find_map(seed_of);
        for s in states
            .iter()
            .filter(|s| &group_of(s) == g && seed_of(s) == first_seed)
        {
            let curve: Vec<(f64, f64)> = loss_curve(&s.dir)
                .into_iter()
                .filter(|(_, l)| l.is_finite() && *l > 0.0)
                .map(|(st, l)| (st.max(1.0), l.log10()))
                .collect();
            if curve.is_empty() {
                continue;
            }
            let label = match depth_of(s) {
                Some(d) => format!(
                    "depth {d}{}",
                    if s.status == Status::Diverged {
                        " (diverged)"
                    } else {
                        ""
                    }
                ),
                None => s.point.name.clone(),
            };
            series.push(Series::new(label, curve));
        }
        if series.is_empty() {
            continue;
        }
        let stem = if g.is_empty() {
            "loss_vs_step".to_string()
        } else {
            format!("loss_vs_step_{}", sanitize_file(g))
        };
        let _ = writeln!(md, "\n![training loss vs step {g}](figures/{stem}.png)\n");
        figs.push((
            stem,
            Chart {
                title: if g.is_empty() {
                    "Training loss vs step".into()
                } else {
                    format!("Training loss vs step ({})", group_display(g))
                },
                x_desc: "step (log scale)".into(),
                y_desc: "training loss (log scale)".into(),
                x_log: true,
                y_axis: YAxis::Log10Values,
                y_range: None,
                series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }

    // Test accuracy vs depth: a table and one line per group, mean over seeds, the band
    // spanning the seeds' range.
    let mut acc_table = aggregate::Table::new();
    let mut metric_name = None;
    for (s, m) in states.iter().zip(&flat) {
        let Some(d) = depth_of(s) else { continue };
        let outcome = match (
            s.status,
            accuracy(m, spec.report.accuracy_metric.as_deref()),
        ) {
            (Status::Diverged, _) => aggregate::Outcome::Diverged,
            (Status::Finished, Some((k, a))) => {
                metric_name.get_or_insert(k);
                aggregate::Outcome::Value(if a <= 1.0 { 100.0 * a } else { a })
            }
            (Status::Finished, None) => aggregate::Outcome::NotReached,
            _ => continue,
        };
        acc_table.entry((group_of(s), d)).or_default().push(outcome);
    }
    let mut acc_series = Vec::new();
    for g in &groups {
        let cells: Vec<(i64, &aggregate::Cell)> = acc_table
            .iter()
            .filter(|((gg, _), c)| gg == g && !c.values.is_empty())
            .map(|((_, d), c)| (*d, c))
            .collect();
        if cells.is_empty() {
            continue;
        }
        let mut series = Series::new(
            if g.is_empty() {
                "all".to_string()
            } else {
                group_display(g)
            },
            cells
                .iter()
                .filter_map(|(d, c)| c.mean().map(|m| (*d as f64, m)))
                .collect(),
        );
        series.band = cells
            .iter()
            .filter(|(_, c)| c.values.len() > 1)
            .filter_map(|(d, c)| c.range().map(|(lo, hi)| (*d as f64, lo, hi)))
            .collect();
        acc_series.push(series);
    }
    if !acc_table.is_empty() {
        let metric = metric_name.clone().unwrap_or_default();
        let n_seeds = states
            .iter()
            .filter_map(seed_of)
            .collect::<BTreeSet<_>>()
            .len();
        let _ = writeln!(md, "\n## Test accuracy by depth\n");
        let _ = writeln!(
            md,
            "`{metric}` (%) from each run's summary: the mean over the runs of each cell ({n_seeds} seed(s) in the grid), \
             the lowest and highest run in parentheses; diverged runs have no accuracy and are counted.\n"
        );
        aggregate::write_table(
            md,
            &acc_table,
            &groups,
            &|g| {
                if g.is_empty() {
                    "all".into()
                } else {
                    group_display(g)
                }
            },
            &|v| format!("{v:.2}"),
            "without an accuracy",
        );
        within_spread_notes(md, &acc_table, &groups, "points");
    }
    if !acc_series.is_empty() {
        let metric = metric_name.unwrap_or_default();
        let _ = writeln!(
            md,
            "\n![test accuracy vs depth](figures/accuracy_vs_depth.png)\n"
        );
        let _ = writeln!(
            md,
            "Accuracy: `{metric}` from each run's summary, mean over seeds (shaded: the seeds' range); diverged runs have no accuracy.\n"
        );
        figs.push((
            "accuracy_vs_depth".to_string(),
            Chart {
                title: "Test accuracy vs depth".into(),
                x_desc: "network depth (log scale)".into(),
                y_desc: format!("test accuracy (%) [{metric}]"),
                x_log: true,
                y_axis: YAxis::Linear,
                y_range: None,
                series: acc_series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }

    // Steps until the training loss first falls to the threshold.
    if let Some(threshold) = spec.report.loss_threshold {
        let mut steps_table = aggregate::Table::new();
        for s in states {
            let Some(d) = depth_of(s) else { continue };
            let outcome = match s.status {
                Status::Diverged => aggregate::Outcome::Diverged,
                Status::Finished => {
                    match aggregate::first_step_at_or_below(&loss_curve(&s.dir), threshold) {
                        Some(step) => aggregate::Outcome::Value(step),
                        None => aggregate::Outcome::NotReached,
                    }
                }
                _ => continue,
            };
            steps_table
                .entry((group_of(s), d))
                .or_default()
                .push(outcome);
        }
        let _ = writeln!(md, "\n## Steps to training loss ≤ {threshold:e}\n");
        let _ = writeln!(
            md,
            "The first logged step (records every `log.every` steps) at which the training loss \
             is at most {threshold:e}; the mean over seeds, the lowest and highest in parentheses.\n"
        );
        aggregate::write_table(
            md,
            &steps_table,
            &groups,
            &|g| {
                if g.is_empty() {
                    "all".into()
                } else {
                    group_display(g)
                }
            },
            &|v| format!("{v:.0}"),
            "did not reach it in the run",
        );
        within_spread_notes(md, &steps_table, &groups, "steps");
        let series: Vec<Series> = groups
            .iter()
            .filter_map(|g| {
                let pts: Vec<(f64, f64)> = steps_table
                    .iter()
                    .filter(|((gg, _), _)| gg == g)
                    .filter_map(|((_, d), c)| c.mean().map(|m| (*d as f64, m)))
                    .collect();
                (!pts.is_empty()).then(|| {
                    Series::new(
                        if g.is_empty() {
                            "all".to_string()
                        } else {
                            group_display(g)
                        },
                        pts,
                    )
                })
            })
            .collect();
        if !series.is_empty() {
            let _ = writeln!(
                md,
                "\n![steps to the loss threshold vs depth](figures/steps_to_threshold_vs_depth.png)\n\n\
                 Groups whose runs never reached the threshold have no line.\n"
            );
            figs.push((
                "steps_to_threshold_vs_depth".to_string(),
                Chart {
                    title: format!("Steps to training loss ≤ {threshold:e}"),
                    x_desc: "network depth (log scale)".into(),
                    y_desc: "steps".into(),
                    x_log: true,
                    y_axis: YAxis::Linear,
                    y_range: None,
                    series,
                    vlines: Vec::new(),
                    hlines: Vec::new(),
                },
            ));
        }
    }
    figs
}

/// Notes, per depth, the pairs of groups whose difference lies within the seeds' spread
/// (their ranges over seeds overlap), so that such a difference is not read as an effect.
fn within_spread_notes(md: &mut String, table: &aggregate::Table, groups: &[String], unit: &str) {
    let mut depths: Vec<i64> = table.keys().map(|(_, d)| *d).collect();
    depths.sort_unstable();
    depths.dedup();
    let mut notes = Vec::new();
    for d in depths {
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                let (Some(ca), Some(cb)) = (table.get(&(a.clone(), d)), table.get(&(b.clone(), d)))
                else {
                    continue;
                };
                if ca.values.len() < 2 || cb.values.len() < 2 {
                    continue;
                }
                if aggregate::ranges_overlap(ca, cb) == Some(true) {
                    let diff = (ca.mean().unwrap_or(0.0) - cb.mean().unwrap_or(0.0)).abs();
                    notes.push(format!(
                        "depth {d}: {} vs {}: the difference of the means ({diff:.2} {unit}) is within the seeds' spread",
                        group_display(a),
                        group_display(b)
                    ));
                }
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNot separated by these seeds:\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }
}

/// A group of grid values (`tau=1/sqrt(L), lr=0.1`) as figure text:
/// `τ = 1/sqrt(L), lr = 0.1`.
fn group_display(g: &str) -> String {
    g.split(", ")
        .map(|kv| match kv.split_once('=') {
            Some(("tau", v)) => format!("τ = {v}"),
            Some((k, v)) => format!("{k} = {v}"),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A train sweep's report from planted run records: the accuracy table shows the mean
    /// and range over seeds and counts diverged runs, differences within the seeds' spread
    /// are called so, and the loss-threshold table reads the first step at or below it.
    #[test]
    fn train_report_from_planted_records_aggregates_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("planted-train");
        let spec_text = "name = \"planted-train\"\ncommand = \"train\"\n[grid]\n\"model.depth\" = [20, 56]\n\"model.tau\" = [\"1/sqrt(L)\", \"1\"]\nseed = [0, 1]\n[report]\nloss_threshold = 1e-3\n";
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join(SWEEP_COPY), spec_text).unwrap();
        let spec = load_stored_spec(&root).unwrap();
        for p in spec.points().unwrap() {
            let get = |k: &str| {
                p.values
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| display_value(v))
                    .unwrap()
            };
            let (depth, tau, seed) = (get("model.depth"), get("model.tau"), get("seed"));
            let seed: f64 = seed.parse().unwrap();
            let dir = root.join(&p.name);
            std::fs::create_dir_all(&dir).unwrap();
            // τ = 1 diverges at depth 56 and learns less at 20; τ = 1/√L: 97 + seed (depth
            // 20), 98 + seed / 2 (depth 56); its loss reaches 1e-3 at step 30 + 10·seed.
            let (status, acc) = match (tau.as_str(), depth.as_str()) {
                ("1", "56") => ("diverged", None),
                ("1", _) => ("finished", Some(0.5 + 0.01 * seed)),
                (_, "20") => ("finished", Some(0.97 + 0.01 * seed)),
                _ => ("finished", Some(0.98 + 0.005 * seed)),
            };
            let reach = 3 + seed as u64;
            let mut metrics = String::new();
            for i in 1..=6u64 {
                let loss = if tau == "1" {
                    2.0
                } else if i >= reach {
                    1e-4
                } else {
                    0.5
                };
                metrics.push_str(&format!("{{\"step\":{},\"epoch\":0,\"epoch_end\":false,\"lr\":0.1,\"train_loss\":{loss},\"grad_norm\":1.0,\"layer_grad_norms\":[]}}\n", 10 * i));
            }
            std::fs::write(dir.join(tau_records::METRICS_FILE), metrics).unwrap();
            let summary = serde_json::json!({
                "name": p.name, "status": status,
                "diverged_at_step": if status == "diverged" { Some(3) } else { None },
                "divergence_reason": null, "steps": 60, "epochs_completed": 0,
                "reached_target_at_step": null,
                "final_metrics": acc.map(|a| serde_json::json!({
                    "step": 60, "epoch": 0, "epoch_end": false, "lr": 0.0, "train_loss": 0.1,
                    "test_acc": a, "grad_norm": 1.0, "layer_grad_norms": [],
                    "examples_per_s": 1.0, "wall_s": 1.0})),
                "best_train_loss": null, "best_test_loss": null, "best_test_acc": acc,
                "wall_s": 1.0, "device": "cpu",
                "version": {"crate_version": "0.1.0", "git_commit": null}
            });
            std::fs::write(dir.join(tau_records::SUMMARY_FILE), summary.to_string()).unwrap();
        }
        let out = generate(&root).unwrap();
        assert_eq!(out.summary_line, "6 finished, 2 diverged");
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(md.contains("## Test accuracy by depth"), "{md}");
        assert!(
            md.contains("| depth | τ = 1 | τ = 1/sqrt(L) |\n| --- | --- | --- |\n| 20 | 50.50 (50.00–51.00) | 97.50 (97.00–98.00) |\n| 56 | 2 of 2 diverged | 98.25 (98.00–98.50) |"),
            "{md}"
        );
        assert!(!md.contains("Not separated by these seeds"), "{md}");
        assert!(md.contains("## Steps to training loss ≤ 1e-3"), "{md}");
        assert!(
            md.contains("| 20 | 2 of 2 did not reach it in the run | 35 (30–40) |"),
            "{md}"
        );
        assert!(md.contains("| 56 | 2 of 2 diverged | 35 (30–40) |"), "{md}");
        for fig in ["accuracy_vs_depth", "steps_to_threshold_vs_depth"] {
            assert!(
                root.join("figures").join(format!("{fig}.png")).exists(),
                "{fig}"
            );
        }
    }

    #[test]
    fn probe_report_from_planted_records_finds_alpha_star() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("planted");
        let spec_text = "name = \"planted\"\ncommand = \"probe\"\n[grid]\n\"model.depth\" = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]\nseed = [0, 1, 2]\n[report]\nrules = [\"L^-0.25\", \"L^-0.50\", \"L^-1.00\"]\n";
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join(SWEEP_COPY), spec_text).unwrap();
        for s in crate::analysis::tests::planted(0.5) {
            let dir = root.join(&s.point.name);
            std::fs::create_dir_all(&dir).unwrap();
            let json = serde_json::to_string(s.probe.as_ref().unwrap()).unwrap();
            std::fs::write(dir.join(tau_records::PROBE_FILE), json).unwrap();
        }
        let out = generate(&root).unwrap();
        assert_eq!(out.summary_line, "39 finished");
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(md.contains("**Measured α* = 0.5"), "{md}");
        assert!(md.contains("| τ = L^-0.25 | 0.25 |"), "{md}");
        for fig in [
            "norm_ratio_vs_depth",
            "norm_ratio_vs_depth_zoom",
            "grad_ratio_vs_depth",
            "growth_vs_alpha",
            "norm_ratio_vs_depth_alpha",
        ] {
            assert!(
                root.join("figures").join(format!("{fig}.png")).exists(),
                "{fig}"
            );
            assert!(
                root.join("figures").join(format!("{fig}.svg")).exists(),
                "{fig}"
            );
        }
        let csv = std::fs::read_to_string(root.join("results.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 39 * 16);
        if let Ok(keep) = std::env::var("XTASK_KEEP_PLANTED_REPORT") {
            let _ = std::fs::remove_dir_all(&keep);
            std::fs::rename(&root, keep).unwrap();
        }
    }
}
